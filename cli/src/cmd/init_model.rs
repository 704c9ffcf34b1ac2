//! `ringtune init-model`: writes a random-init Hugging Face model folder and a matching
//! tokenizer.json, so training can be tried with no model hub.

use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model shape: quickstart (2 layers, hidden 128), tiny (4 layers, hidden 256) or smol
    /// (SmolLM-135M's shape).
    #[arg(long, default_value = "quickstart")]
    pub preset: String,
    /// Folder to create (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Target vocabulary size of the tokenizer (the model's embedding matches the real one).
    #[arg(long, default_value_t = ringtune_node::trainer::DEFAULT_VOCAB)]
    pub vocab_size: usize,
}

pub fn run(args: Args) -> Result<()> {
    let r = ringtune_node::init_model(&args.preset, &args.out, args.seed, args.vocab_size)
        .with_context(|| format!("cannot write model {}", args.out.display()))?;
    eprintln!(
        "wrote {} (preset {}, {} parameters, vocab {})",
        r.dir.display(),
        r.preset,
        r.parameters,
        r.vocab_size
    );
    Ok(())
}
