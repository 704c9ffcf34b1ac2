//! `ringtune merge ADAPTER --out DIR`: folds a PEFT adapter into its base model and writes a
//! complete Hugging Face model folder. The folder appears only when complete (it is written
//! beside `--out` and renamed).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use ringtune_model::{merge, resolve_model_dir, AdapterConfig};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The adapter folder (adapter_config.json + adapter_model.safetensors).
    pub adapter: PathBuf,
    /// The merged model folder to create (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// The base model (folder or hf:org/name); default: the adapter's base_model_name_or_path.
    #[arg(long)]
    pub model: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    if args.out.exists() {
        bail!(
            "{} already exists; merge writes a new folder only",
            args.out.display()
        );
    }
    let (spec, from_adapter) = match args.model {
        Some(m) => (m, false),
        None => (
            AdapterConfig::read(&args.adapter)?
                .base_model_name_or_path
                .with_context(|| {
                    format!(
                        "{} names no base_model_name_or_path; pass --model",
                        args.adapter.display()
                    )
                })?,
            true,
        ),
    };
    let model_dir = resolve_model_dir(&spec).with_context(|| {
        if from_adapter {
            format!(
                "the base model named by {}'s base_model_name_or_path ({spec:?}; a relative \
                 path, as adapters written before ringtune recorded absolute ones hold, is \
                 taken from the working folder); pass --model DIR to name it",
                args.adapter.join("adapter_config.json").display()
            )
        } else {
            format!("--model {spec}")
        }
    })?;
    let parent = match args.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = args
        .out
        .file_name()
        .context("--out needs a folder name")?
        .to_string_lossy()
        .into_owned();
    let tmp = parent.join(format!(".tmp-merge-{name}-{}", std::process::id()));
    let report = match merge(&model_dir, &args.adapter, &tmp) {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e).context(format!(
                "cannot merge {} into {}",
                args.adapter.display(),
                model_dir.display()
            ));
        }
    };
    std::fs::rename(&tmp, &args.out)
        .with_context(|| format!("renaming into {}", args.out.display()))?;
    eprintln!(
        "wrote {}: {} tensors merged, {} shard(s), {} bytes",
        args.out.display(),
        report.merged_tensors,
        report.shards,
        report.total_bytes
    );
    Ok(())
}
