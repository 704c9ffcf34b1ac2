//! `ringtune bench …`: the benchmark subcommands.

use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time forward+backward+AdamW LoRA steps on a random-init model of a preset shape.
    Train(super::bench_train::Args),
    /// Time the ring all-reduce between W local processes on 127.0.0.1 (QUIC, TCP + TLS or
    /// plain TCP).
    Allreduce(super::bench_allreduce::Args),
    /// Time sampling with the kv cache (decode tokens/s) on a random-init preset model.
    Sample(super::sample::BenchArgs),
}
