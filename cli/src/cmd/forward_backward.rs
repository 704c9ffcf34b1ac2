//! `ringtune forward-backward`: tinker's forward_backward as a command, for checking and
//! scripting. Reads a batch file (`input_ids` [B, T] and `loss_weights` [B, T], weights
//! aligned to the tokens as in ../shared/reference: inputs = tokens[:-1], targets =
//! tokens[1:], loss_weights[:, 0] unused), prints one JSON line with the loss, and writes
//! the gradient of every LoRA tensor under its PEFT key name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ringtune_model::io::{read_safetensors, write_safetensors_atomic};
use ringtune_model::{resolve_model_dir, Batch, DType, Device, LoraConfig, LoraModel, LossKind};

#[derive(clap::Args)]
pub struct Args {
    /// Base model: a folder with config.json + safetensors, or hf:ORG/NAME[@REV] in the
    /// Hugging Face cache.
    #[arg(long)]
    model: String,
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors). Without it,
    /// fresh adapters (tinker defaults: rank --rank on all modules, B = 0) are used.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Batch file: safetensors with `input_ids` [B, T] (integer) and `loss_weights` [B, T].
    #[arg(long)]
    batch: PathBuf,
    /// Where to write the gradients (safetensors, PEFT key names).
    #[arg(long)]
    grads_out: PathBuf,
    /// Loss function (tinker's name).
    #[arg(long, default_value = "cross_entropy")]
    loss: String,
    /// Gradients of the weighted mean (`mean`, as the reference data holds) or of the sum
    /// Σ −logp·w (`sum`, what a data-parallel step all-reduces).
    #[arg(long, default_value = "mean", value_parser = ["mean", "sum"])]
    reduction: String,
    /// Rank of fresh adapters (only without --adapter).
    #[arg(long, default_value_t = 32)]
    rank: usize,
    /// Seed of fresh adapters' A (only without --adapter).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to run: cpu, cuda[:N], or auto (this process's GPU when built with CUDA and
    /// one is there, else cpu).
    #[arg(long, default_value = "cpu", value_parser = super::node::parse_device)]
    device: ringtune_config::Device,
}

/// Reads and checks the batch file; errors name the file and tensor.
fn read_batch(path: &Path) -> anyhow::Result<Batch> {
    let (tensors, _) =
        read_safetensors(path).with_context(|| format!("reading batch {}", path.display()))?;
    let t: BTreeMap<_, _> = tensors.into_iter().collect();
    let get = |name: &str| {
        t.get(name).with_context(|| {
            format!(
                "{}: no tensor `{name}` (found: {:?})",
                path.display(),
                t.keys().collect::<Vec<_>>()
            )
        })
    };
    let (ids, w) = (get("input_ids")?, get("loss_weights")?);
    let (rows, n) = ids.dims2().with_context(|| {
        format!(
            "{}: `input_ids` must be [B, T], is {:?}",
            path.display(),
            ids.dims()
        )
    })?;
    if w.dims() != [rows, n] {
        bail!(
            "{}: `loss_weights` has shape {:?}, `input_ids` {:?}",
            path.display(),
            w.dims(),
            ids.dims()
        );
    }
    if !ids.dtype().is_int() {
        bail!(
            "{}: `input_ids` must be an integer tensor, is {:?}",
            path.display(),
            ids.dtype()
        );
    }
    let ids64: Vec<i64> = ids.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
    if let Some(bad) = ids64.iter().find(|&&v| v < 0 || v > u32::MAX as i64) {
        bail!(
            "{}: `input_ids` holds {bad}, not a token id",
            path.display()
        );
    }
    let ids: Vec<u32> = ids64.into_iter().map(|v| v as u32).collect();
    let w: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Batch::from_dense_tokens(rows, n, &ids, &w).with_context(|| format!("batch {}", path.display()))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    ringtune_model::init_cpu_runtime(None);
    let kind = LossKind::from_name(&args.loss)
        .with_context(|| format!("unknown --loss {:?} (supported: cross_entropy)", args.loss))?;
    let model_dir = resolve_model_dir(&args.model)?;
    let device = ringtune_node::trainer::device_of(args.device)
        .with_context(|| format!("--device {}", args.device))?;
    let model = match &args.adapter {
        Some(a) => {
            LoraModel::load_with_adapter(&model_dir, a, &device, DType::F32).with_context(|| {
                format!(
                    "loading {} with adapter {}",
                    model_dir.display(),
                    a.display()
                )
            })?
        }
        None => LoraModel::load(
            &model_dir,
            &LoraConfig::from_tinker(args.rank, true, true, true),
            &device,
            DType::F32,
            args.seed,
        )
        .with_context(|| format!("loading {}", model_dir.display()))?,
    };
    let batch = read_batch(&args.batch)?;
    let (out, mut grads) = model.forward_backward(&batch, kind)?;
    if args.reduction == "mean" && out.weight_sum > 0.0 {
        grads.scale(1.0 / out.weight_sum)?;
    }
    let on_host = grads
        .tensors()
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    write_safetensors_atomic(&args.grads_out, &on_host, None)
        .with_context(|| format!("writing {}", args.grads_out.display()))?;
    let line = serde_json::json!({
        "loss": out.mean(),
        "loss_sum": out.loss_sum,
        "weight_sum": out.weight_sum,
        "tokens": out.tokens,
        "loss_fn": kind.name(),
        "grad_reduction": args.reduction,
    });
    println!("{line}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(p: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../model/tests/fixtures/llama-tiny")
            .join(p)
    }

    /// The command's gradients are the PyTorch + PEFT reference's (grads of the mean).
    #[test]
    fn writes_the_reference_gradients() {
        let out = std::env::temp_dir().join(format!(
            "ringtune-fb-test-{}.safetensors",
            std::process::id()
        ));
        run(Args {
            model: fixture("base").display().to_string(),
            adapter: Some(fixture("adapter_init")),
            batch: fixture("batch.safetensors"),
            grads_out: out.clone(),
            loss: "cross_entropy".into(),
            reduction: "mean".into(),
            rank: 32,
            seed: 0,
            device: ringtune_config::Device::Auto,
        })
        .unwrap();
        let (got, _) = read_safetensors(&out).unwrap();
        let (want, _) = read_safetensors(&fixture("grads_init.safetensors")).unwrap();
        std::fs::remove_file(&out).unwrap();
        assert_eq!(got.len(), want.len());
        for ((k, a), (k2, b)) in got.iter().zip(&want) {
            assert_eq!(k, k2);
            let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
            let d: f32 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y) * (x - y))
                .sum::<f32>()
                .sqrt();
            let n: f32 = b.iter().map(|y| y * y).sum::<f32>().sqrt();
            assert!(d <= 1e-5 * n, "{k}: relative error {}", d / n);
        }
    }

    #[test]
    fn a_batch_without_weights_is_an_error_naming_the_tensor() {
        let e = read_batch(&fixture("grads_init.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("input_ids"), "{e}");
    }
}
