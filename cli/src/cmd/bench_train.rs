//! `ringtune bench train`: times LoRA training steps (forward + backward + AdamW) on a
//! random-init model of a preset shape, the same workload as
//! `../shared/bench/lora_train_torch.py` so the two can be compared side by side.
//!
//! Workload: LoRA r=32, alpha 32 on all seven projections; random tokens each step
//! (seeded); the second half of every row's targets weighted 1, the rest 0; loss = the
//! weighted mean; `batch × seq` input positions per step. Tokens/s counts those input
//! positions (as the PyTorch script does), from the median step time after warm-up.

use std::time::Instant;

use anyhow::{bail, Context};
use ringtune_model::prof::Kind;
use ringtune_model::{
    AdamW, AdamWConfig, Batch, Device, DeviceAdamW, LoraConfig, LoraModel, LossKind, ModelPreset,
};

#[derive(clap::Args)]
pub struct Args {
    /// Model shape: tiny, smol, or quickstart.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Compute threads (matmuls and kernels).
    #[arg(long, default_value_t = 2, value_parser = super::bench_threads)]
    threads: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Rows per batch (default: the preset's: tiny 8, smol 4).
    #[arg(long)]
    batch: Option<usize>,
    /// Positions per row (default 256).
    #[arg(long)]
    seq: Option<usize>,
    /// LoRA rank.
    #[arg(long, default_value_t = 32)]
    rank: usize,
    /// Vocabulary size for the quickstart preset.
    #[arg(long, default_value_t = 32000)]
    vocab: usize,
    /// Seed of the weights and tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to run: cpu, cuda[:N], or auto (this process's GPU when built with CUDA and
    /// one is there, else cpu). The model is f32 (bf16 on the GPU: the gpu_check example).
    #[arg(long, default_value = "cpu", value_parser = super::node::parse_device)]
    device: ringtune_config::Device,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    json: bool,
    /// Recompute each layer's activations in the backward (activation checkpointing).
    #[arg(long)]
    checkpointing: bool,
    /// After the timed steps, print an op-by-op profile of one step (each op's forward and
    /// backward on the first layer's shapes, times how often a step runs it).
    #[arg(long)]
    ops: bool,
    /// After the timed steps, print the stream profile of one more step: each op's time
    /// within a real step (on a GPU from CUDA events, without synchronising between ops),
    /// the step's phases, and the time outside ringtune's ops (to stderr).
    #[arg(long)]
    profile: bool,
}

/// Prints [`LoraModel::profile_ops`] at `b x t` as a markdown table (to stderr, so `--json`
/// output stays one object).
fn print_ops(
    model: &LoraModel,
    b: usize,
    t: usize,
    vocab: usize,
    rng: &mut u64,
) -> anyhow::Result<()> {
    let tokens: Vec<u32> = (0..b * (t + 1))
        .map(|_| (splitmix64(rng) % vocab as u64) as u32)
        .collect();
    let weights = vec![1.0f32; b * (t + 1)];
    let batch = Batch::from_dense_tokens(b, t + 1, &tokens, &weights)?;
    let ops = model.profile_ops(&batch, LossKind::CrossEntropy, 3)?;
    eprint!("{}", ringtune_model::model::ops_table(&ops));
    Ok(())
}

/// Peak resident set size of this process in bytes (VmHWM), where the OS tells it.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// splitmix64: a tiny seeded generator for the random token ids.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Machine-state probe, as the PyTorch script has one: median GFLOP/s of a 1024³ f32
/// matmul (candle's CPU kernel) at the configured thread count.
fn matmul_gflops() -> anyhow::Result<f64> {
    let n = 1024;
    let x = ringtune_model::Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let y = ringtune_model::Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let mut ts = Vec::new();
    for _ in 0..12 {
        let t0 = Instant::now();
        let _z = x.matmul(&y)?;
        ts.push(t0.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * n * n) as f64 / median(&ts[2..]) / 1e9)
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    // Matmuls and ringtune's kernels run on rayon's global pool, sized when first used;
    // nothing has touched it yet.
    ringtune_model::init_cpu_runtime(Some(args.threads));

    let gflops_before = matmul_gflops()?;
    let preset = ModelPreset::from_name(&args.preset, Some(args.vocab))?;
    let cfg = preset.config();
    let (def_b, def_t) = preset.bench_batch();
    let (b, t) = (args.batch.unwrap_or(def_b), args.seq.unwrap_or(def_t));
    if b == 0 || t == 0 {
        bail!("--batch and --seq must be at least 1");
    }
    let lora = LoraConfig::from_tinker(args.rank, true, true, false);
    let device = ringtune_node::trainer::device_of(args.device)
        .with_context(|| format!("--device {}", args.device))?;
    let model = LoraModel::random(&cfg, &lora, &device, args.seed, args.seed)
        .with_context(|| format!("building the {} model", preset.name()))?;
    model.set_activation_checkpointing(args.checkpointing);
    let rss_after_init = peak_rss_bytes();
    let mut opt = AdamW::new(AdamWConfig::default(), model.param_layout().clone());
    let mut params = model.params_flat()?;
    // On a GPU the AdamW state lives there, as in `ringtune train` (no host round trip).
    let mut dev_opt = if device.is_cpu() {
        None
    } else {
        Some(DeviceAdamW::from_host(&opt, &device)?)
    };

    let mut rng = args.seed.wrapping_add(1);
    // t + 1 tokens per row: t input positions and t targets, so the model runs on exactly
    // `t` positions per row like the PyTorch script. Targets in the second half weighted.
    let weights: Vec<f32> = (0..b)
        .flat_map(|_| (0..=t).map(move |i| if i > t / 2 { 1.0 } else { 0.0 }))
        .collect();
    let mut times = Vec::with_capacity(args.steps);
    let mut losses = Vec::with_capacity(args.warmup + args.steps);
    // One step: forward_backward and AdamW; the loss.
    let mut train_step = |rng: &mut u64| -> ringtune_model::Result<f64> {
        let tokens: Vec<u32> = (0..b * (t + 1))
            .map(|_| (splitmix64(rng) % cfg.vocab_size as u64) as u32)
            .collect();
        let batch = Batch::from_dense_tokens(b, t + 1, &tokens, &weights)?;
        let (out, mut grads) = model.forward_backward(&batch, LossKind::CrossEntropy)?;
        let _phase = ringtune_model::prof::span("optimizer", Kind::Phase, &device);
        let lr = opt.config().lr;
        if let Some(o) = dev_opt.as_mut() {
            o.step_model(&model, &grads, 1.0 / out.weight_sum, lr)?;
            device.synchronize()?;
        } else {
            grads.scale(1.0 / out.weight_sum)?;
            let mut g = grads.to_flat()?;
            opt.step_flat(&mut params, &mut g, lr)?;
            model.set_params_flat(&params)?;
        }
        Ok(out.mean())
    };
    for step in 0..args.warmup + args.steps {
        let t0 = Instant::now();
        losses.push(train_step(&mut rng)?);
        let dt = t0.elapsed().as_secs_f64();
        if step >= args.warmup {
            times.push(dt);
        }
    }
    if args.profile {
        let (_, p) = ringtune_model::prof::capture(&device, || train_step(&mut rng))?;
        eprintln!("stream profile of one more step:\n\n{p}");
    }
    if args.ops {
        print_ops(&model, b, t, cfg.vocab_size, &mut rng)?;
    }
    let med = median(&times);
    let min = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = times.iter().cloned().fold(0.0, f64::max);
    let tokens_per_s = (b * t) as f64 / med;
    let peak = peak_rss_bytes();
    let gflops_after = matmul_gflops()?;
    let lora_params = model.param_layout().numel();
    if args.json {
        let v = serde_json::json!({
            "impl": "ringtune",
            "device": format!("{:?}", device.location()),
            "preset": preset.name(),
            "batch": b,
            "seq": t,
            "threads": args.threads,
            "activation_checkpointing": args.checkpointing,
            "steps": args.steps,
            "warmup": args.warmup,
            "base_params": cfg.num_parameters(),
            "lora_params": lora_params,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_best": (b * t) as f64 / min,
            "step_s_median": med,
            "step_s_min": min,
            "step_s_max": max,
            "peak_rss_bytes": peak,
            "rss_after_init_bytes": rss_after_init,
            "matmul1024_gflops_before": gflops_before,
            "matmul1024_gflops_after": gflops_after,
            "losses": losses,
            "step_times_s": times,
        });
        println!("{v}");
    } else {
        println!(
            "{} on {:?}: B={b} T={t} base={:.2}M lora={:.3}M threads={}  step median {med:.3}s (min {min:.3} max {max:.3})  tokens/s median {tokens_per_s:.0}  peak RSS {} MiB  loss {:.4}->{:.4}",
            preset.name(),
            device.location(),
            cfg.num_parameters() as f64 / 1e6,
            lora_params as f64 / 1e6,
            args.threads,
            peak.map_or("?".to_string(), |p| (p / (1 << 20)).to_string()),
            losses.first().copied().unwrap_or(f64::NAN),
            losses.last().copied().unwrap_or(f64::NAN),
        );
    }
    Ok(())
}
