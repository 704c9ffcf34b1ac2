//! The `ringtune` command line. This is the only crate that uses `anyhow`: every
//! library error is turned into a report with context here.
//!
//! Each subcommand lives in its own module under `cmd/` with an `Args` struct and a
//! `run` function, so subcommands can change without touching each other.

use clap::{Parser, Subcommand};

mod cmd;

#[derive(Parser)]
#[command(
    name = "ringtune",
    version,
    about = "Distributed data-parallel LoRA fine-tuning"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a LoRA adapter as a run config says (see configs/README.md).
    Train(cmd::train::Args),
    /// Schedule a distributed run: nodes register here (see README, Distributed runtime).
    Coordinator(cmd::coordinator::Args),
    /// One rank of a distributed run: joins the coordinator and trains what it is given.
    Node(cmd::node::Args),
    /// Write a random-init model folder with a matching tokenizer (no hub needed).
    InitModel(cmd::init_model::Args),
    /// Merge a PEFT adapter into its base model, writing a full model folder.
    Merge(cmd::merge::Args),
    /// Mean NLL of a dataset under a base model, or base + adapter.
    Eval(cmd::eval::Args),
    /// Forward + backward of one batch (tinker's forward_backward): prints the loss, writes
    /// the gradient of every LoRA tensor under its PEFT key name.
    ForwardBackward(cmd::forward_backward::Args),
    /// Sample completions (a prompt or a JSONL of chats) from a base model or base + adapter.
    Sample(cmd::sample::Args),
    /// Show a run config's examples as the trainer sees them: each token run with its loss
    /// weight (check a chat format, train_on and truncation before training).
    Render(cmd::render::Args),
    /// Benchmarks: `bench train` (LoRA training step), `bench allreduce` (ring all-reduce),
    /// `bench sample` (decoding).
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
    /// Internal: a worker process started by `bench allreduce` (not for direct use).
    #[command(hide = true)]
    AllreduceWorker(cmd::bench_allreduce::WorkerArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Train(args) => cmd::train::run(args),
        Command::Coordinator(args) => cmd::coordinator::run(args),
        Command::Node(args) => cmd::node::run(args),
        Command::InitModel(args) => cmd::init_model::run(args),
        Command::Merge(args) => cmd::merge::run(args),
        Command::Eval(args) => cmd::eval::run(args),
        Command::ForwardBackward(args) => cmd::forward_backward::run(args),
        Command::Sample(args) => cmd::sample::run(args),
        Command::Render(args) => cmd::render::run(args),
        Command::Bench(cmd::bench::BenchCommand::Sample(args)) => cmd::sample::run_bench(args),
        Command::Bench(cmd::bench::BenchCommand::Train(args)) => cmd::bench_train::run(args),
        Command::Bench(cmd::bench::BenchCommand::Allreduce(args)) => {
            cmd::bench_allreduce::run(args)
        }
        Command::AllreduceWorker(args) => cmd::bench_allreduce::run_worker(args),
    }
}
