//! `ringtune forward-backward`: tinker's forward_backward as a command, for checking and
//! scripting. Reads a batch file (`input_ids` [B, T] and `loss_weights` [B, T], weights
//! aligned to the tokens as in ../shared/reference: inputs = tokens[:-1], targets =
//! tokens[1:], loss_weights[:, 0] unused; the policy-gradient losses also read `logprobs`
//! and `advantages` [B, T], aligned the same way), prints one JSON line with the loss, and
//! writes the gradient of every LoRA tensor under its PEFT key name.

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
    /// Batch file: safetensors with `input_ids` [B, T] (integer) and `loss_weights` [B, T];
    /// for the policy-gradient losses also `advantages` [B, T] and (all but `linear`) the
    /// sampler's `logprobs` [B, T], aligned to the tokens like the weights (column 0 unused).
    #[arg(long)]
    batch: PathBuf,
    /// Where to write the gradients (safetensors, PEFT key names).
    #[arg(long)]
    grads_out: PathBuf,
    /// Loss function (tinker's name): cross_entropy, importance_sampling, ppo, cispo or
    /// linear.
    #[arg(long, default_value = "cross_entropy")]
    loss: String,
    /// ppo/cispo: tinker's clip_low_threshold, a bound on the ratio (ppo 0.8, cispo 0).
    #[arg(long, value_name = "RATIO")]
    clip_low: Option<f32>,
    /// ppo/cispo: tinker's clip_high_threshold (ppo 1.2, cispo 4).
    #[arg(long, value_name = "RATIO")]
    clip_high: Option<f32>,
    /// Gradients (and the printed `loss`) of the weighted mean (`mean`, as the reference
    /// data holds) or of the sum (`sum`, what a data-parallel step all-reduces, and what
    /// tinker's policy-gradient losses are). Default: mean for cross_entropy, else sum.
    #[arg(long, value_parser = ["mean", "sum"])]
    reduction: Option<String>,
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

/// Reads and checks the batch file for the loss `kind`; errors name the file and tensor.
fn read_batch(path: &Path, kind: LossKind) -> anyhow::Result<Batch> {
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
    let batch = Batch::from_dense_tokens(rows, n, &ids, &w)
        .with_context(|| format!("batch {}", path.display()))?;
    // The policy-gradient inputs, [B, T] aligned to the tokens: columns 1.. are the targets'.
    let per_target = |name: &str, needed: bool| -> anyhow::Result<Option<Vec<f32>>> {
        let Some(x) = t.get(name) else {
            if needed {
                bail!(
                    "{}: loss {} needs a `{name}` tensor [B, T] aligned to `input_ids` (found: \
                     {:?})",
                    path.display(),
                    kind.name(),
                    t.keys().collect::<Vec<_>>()
                )
            }
            return Ok(None);
        };
        if !needed {
            eprintln!(
                "forward-backward: note: {} holds `{name}`, which loss {} does not read",
                path.display(),
                kind.name()
            );
            return Ok(None);
        }
        if x.dims() != [rows, n] {
            bail!(
                "{}: `{name}` has shape {:?}, `input_ids` {:?}",
                path.display(),
                x.dims(),
                [rows, n]
            );
        }
        let v: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Ok(Some(
            v.chunks(n).flat_map(|r| r[1..].iter().copied()).collect(),
        ))
    };
    let logprobs = per_target("logprobs", kind.needs_sampler_logprobs())?;
    let advantages = per_target("advantages", kind.needs_advantages())?;
    match advantages {
        None => Ok(batch),
        // `linear` reads no sampler logprobs: zeros stand in for them.
        Some(a) => {
            let q = logprobs.unwrap_or_else(|| vec![0.0; a.len()]);
            batch
                .with_rl_inputs(q, a)
                .with_context(|| format!("batch {}", path.display()))
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    ringtune_model::init_cpu_runtime(None);
    let kind = LossKind::with_config(&args.loss, args.clip_low, args.clip_high).map_err(|e| {
        anyhow::anyhow!(
            "--loss {}: {e} (losses: cross_entropy, importance_sampling, ppo, cispo, linear; \
             --clip-low/--clip-high are for ppo and cispo)",
            args.loss
        )
    })?;
    let sum = match args.reduction.as_deref() {
        Some(r) => r == "sum",
        None => kind.reduction() == ringtune_model::Reduction::Sum,
    };
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
    let batch = read_batch(&args.batch, kind)?;
    let (out, mut grads) = model.forward_backward(&batch, kind)?;
    if !sum && out.weight_sum > 0.0 {
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
        "loss": if sum { out.loss_sum } else { out.mean() },
        "loss_sum": out.loss_sum,
        "weight_sum": out.weight_sum,
        "tokens": out.tokens,
        "loss_fn": kind.name(),
        "grad_reduction": if sum { "sum" } else { "mean" },
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
            clip_low: None,
            clip_high: None,
            reduction: None,
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

    fn grads_of(path: &Path) -> Vec<(String, Vec<f32>)> {
        let (t, _) = read_safetensors(path).unwrap();
        t.into_iter()
            .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1().unwrap()))
            .collect()
    }

    /// The policy-gradient losses read `logprobs` and `advantages` from the batch file: with
    /// the model's own logprobs as the sampler's (ratio 1) and advantage 2 everywhere,
    /// importance_sampling's gradient of the sum is twice cross_entropy's, and so is ppo's
    /// (no clipping at ratio 1); a missing tensor is named.
    #[test]
    fn policy_gradient_losses_read_their_inputs_from_the_batch_file() {
        let dir = tempfile::tempdir().unwrap();
        let model = LoraModel::load_with_adapter(
            &fixture("base"),
            &fixture("adapter_init"),
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        let batch = read_batch(&fixture("batch.safetensors"), LossKind::CrossEntropy).unwrap();
        let (out, _) = model
            .forward_backward(&batch, LossKind::CrossEntropy)
            .unwrap();
        let (tensors, _) = read_safetensors(&fixture("batch.safetensors")).unwrap();
        let ids = tensors
            .iter()
            .find(|(k, _)| k == "input_ids")
            .unwrap()
            .1
            .clone();
        let (b, t) = ids.dims2().unwrap();
        let seq = batch.seq();
        assert_eq!(seq, t - 1);
        // The logprobs aligned to the tokens: column 0 unused (here NaN, which must not
        // matter), column j + 1 is target j's.
        let mut q = vec![f32::NAN; b * t];
        for r in 0..b {
            q[r * t + 1..(r + 1) * t].copy_from_slice(&out.logprobs[r * seq..(r + 1) * seq]);
        }
        let cpu = &ringtune_model::Device::Cpu;
        let mut rl = tensors.clone();
        rl.push((
            "logprobs".into(),
            ringtune_model::Tensor::from_vec(q, (b, t), cpu).unwrap(),
        ));
        rl.push((
            "advantages".into(),
            ringtune_model::Tensor::full(2f32, (b, t), cpu).unwrap(),
        ));
        let rl_batch = dir.path().join("rl.safetensors");
        write_safetensors_atomic(&rl_batch, &rl, None).unwrap();
        let go = |loss: &str, batch: &Path, reduction: Option<&str>| {
            let out = dir.path().join(format!("{loss}.safetensors"));
            run(Args {
                model: fixture("base").display().to_string(),
                adapter: Some(fixture("adapter_init")),
                batch: batch.to_path_buf(),
                grads_out: out.clone(),
                loss: loss.into(),
                clip_low: None,
                clip_high: None,
                reduction: reduction.map(Into::into),
                rank: 32,
                seed: 0,
                device: ringtune_config::Device::Cpu,
            })
            .map(|()| grads_of(&out))
        };
        let ce = go("cross_entropy", &fixture("batch.safetensors"), Some("sum")).unwrap();
        for loss in ["importance_sampling", "ppo"] {
            let pg = go(loss, &rl_batch, None).unwrap();
            assert_eq!(pg.len(), ce.len());
            for ((k, a), (_, c)) in pg.iter().zip(&ce) {
                let d: f32 = a.iter().zip(c).map(|(x, y)| (x - 2.0 * y).powi(2)).sum();
                let n: f32 = c.iter().map(|y| (2.0 * y).powi(2)).sum();
                assert!(
                    d.sqrt() <= 1e-4 * n.sqrt(),
                    "{loss} {k}: {}",
                    (d / n).sqrt()
                );
            }
        }
        // Without the sampler's logprobs: named, with what the file holds.
        let no_q = dir.path().join("no_q.safetensors");
        let partial: Vec<_> = rl
            .iter()
            .filter(|(k, _)| k != "logprobs")
            .cloned()
            .collect();
        write_safetensors_atomic(&no_q, &partial, None).unwrap();
        let e = go("ppo", &no_q, None).unwrap_err().to_string();
        assert!(
            e.contains("loss ppo needs a `logprobs` tensor [B, T]"),
            "{e}"
        );
        // linear reads only the advantages; an unknown loss lists the known ones.
        assert!(go("linear", &no_q, None).is_ok());
        let e = go("kl", &no_q, None).unwrap_err().to_string();
        assert!(e.contains("importance_sampling, ppo, cispo, linear"), "{e}");
    }

    #[test]
    fn a_batch_without_weights_is_an_error_naming_the_tensor() {
        let e = read_batch(&fixture("grads_init.safetensors"), LossKind::CrossEntropy)
            .unwrap_err()
            .to_string();
        assert!(e.contains("input_ids"), "{e}");
    }
}
