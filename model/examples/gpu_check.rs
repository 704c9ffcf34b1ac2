//! One-call GPU check (issue 6): CUDA-vs-CPU parity of the loss and LoRA gradients on the
//! `tiny` preset, then LoRA training throughput on the Qwen2.5-0.5B and Llama-3.2-1B shapes
//! (the presets of ../shared/bench/gpu_peft_bench.py), ending with a markdown table.
//!
//!     gpu_check --device cuda:0 [--budget-s 200] [--quick] [--ops] [--no-throughput] [--no-parity]
//!               [--checkpointing] [--presets qwen05b,llama1b] [--parity-preset tiny|smol]
//!
//! `--quick` shrinks every shape so the whole thing runs in seconds on a CPU (`--device cpu`
//! compares the CPU with itself; it exercises the code path, not the numerics). Built here
//! with `--features ringtune-model/cuda` and run on the GPU machine by deploy/gpu/check.sh.
//!
//! Throughput counts FLOPs the way gpu_peft_bench.py does, so the two are comparable:
//! 4 · N_base per trained token position (forward 2N + input-gradient backward 2N; the LoRA
//! weight gradients and attention are left out). Peak memory is the maximum of nvidia-smi's
//! `memory.used` polled every 50 ms while the preset runs (whole GPU, CUDA context and
//! allocator cache included: an upper bound next to torch's `max_memory_allocated`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringtune_model::preset::random_tensors;
use ringtune_model::{
    AdamW, AdamWConfig, Architecture, Batch, DType, Device, DeviceAdamW, LoraConfig, LoraModel,
    LossKind, ModelConfig, ModelPreset, RopeScaling, Tensor,
};

/// H200 (and H100 SXM) dense bf16 peak, FLOP/s.
const PEAK_BF16: f64 = 989e12;

struct Args {
    device: String,
    quick: bool,
    budget: Duration,
    presets: Vec<String>,
    /// Also time each op of a decoder layer (forward and backward) at the measured batch.
    ops: bool,
    /// Parity only (no throughput presets).
    no_throughput: bool,
    /// Throughput only (no parity).
    no_parity: bool,
    /// Activation checkpointing on in the throughput runs.
    checkpointing: bool,
    /// The parity model: `tiny` (head size 32) or `smol` (head size 64, the size the flash
    /// attention kernels take).
    parity_preset: String,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        device: "cuda:0".into(),
        quick: false,
        budget: Duration::from_secs(200),
        presets: vec!["qwen05b".into(), "llama1b".into()],
        ops: false,
        no_throughput: false,
        no_parity: false,
        checkpointing: false,
        parity_preset: "tiny".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--device" => a.device = it.next().ok_or("--device needs a value")?,
            "--quick" => a.quick = true,
            "--ops" => a.ops = true,
            "--no-throughput" => a.no_throughput = true,
            "--no-parity" => a.no_parity = true,
            "--checkpointing" => a.checkpointing = true,
            "--budget-s" => {
                let v = it.next().ok_or("--budget-s needs a value")?;
                a.budget =
                    Duration::from_secs(v.parse().map_err(|e| format!("--budget-s {v}: {e}"))?);
            }
            "--presets" => {
                let v = it.next().ok_or("--presets needs a value")?;
                a.presets = v.split(',').map(str::to_string).collect();
            }
            "--parity-preset" => {
                let v = it.next().ok_or("--parity-preset needs a value")?;
                if v != "tiny" && v != "smol" {
                    return Err(format!("--parity-preset {v:?}: tiny or smol"));
                }
                a.parity_preset = v;
            }
            other => {
                return Err(format!(
                    "unknown argument {other:?} (--device, --quick, --ops, --no-throughput, --no-parity, --checkpointing, --budget-s, --presets, --parity-preset)"
                ))
            }
        }
    }
    Ok(a)
}

fn parse_device(s: &str) -> ringtune_model::Result<Device> {
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ord = s
        .strip_prefix("cuda:")
        .or(if s == "cuda" { Some("0") } else { None })
        .and_then(|n| n.parse::<usize>().ok())
        .ok_or_else(|| {
            ringtune_model::Error::Unsupported(format!("device {s:?} (cpu or cuda:N)"))
        })?;
    Ok(Device::new_cuda(ord)?)
}

/// Polls nvidia-smi's memory.used (MiB) in the background, keeping the maximum since reset.
struct MemPoll {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicBool>,
}

impl MemPoll {
    fn start() -> Self {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicBool::new(false));
        let (p, s, o) = (peak.clone(), stop.clone(), ok.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(mib) = nvidia_smi_used_mib() {
                    o.store(true, Ordering::Relaxed);
                    p.fetch_max(mib, Ordering::Relaxed);
                } else {
                    return; // no nvidia-smi: report "n/a"
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        MemPoll { peak, stop, ok }
    }
    fn reset(&self) {
        self.peak.store(0, Ordering::Relaxed);
    }
    fn peak_gib(&self) -> Option<f64> {
        self.ok
            .load(Ordering::Relaxed)
            .then(|| self.peak.load(Ordering::Relaxed) as f64 / 1024.0)
    }
}

impl Drop for MemPoll {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn nvidia_smi_used_mib() -> Option<u64> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=memory.used",
            "--format=csv,noheader,nounits",
            "-i",
            "0",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Deterministic pseudo-random stream (LCG), for tokens and adapter values.
struct Lcg(u64);

impl Lcg {
    fn next_u32(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next_u32() as f64 / (1u64 << 31) as f64 * 2.0 - 1.0) as f32
    }
}

/// `rows` rows of `t + 1` random tokens, weight 1 on the second half of the positions.
fn make_batch(rows: usize, t: usize, vocab: usize, seed: u64) -> ringtune_model::Result<Batch> {
    let mut rng = Lcg(seed);
    let tokens: Vec<u32> = (0..rows * (t + 1))
        .map(|_| rng.next_u32() % vocab as u32)
        .collect();
    let weights: Vec<f32> = (0..rows)
        .flat_map(|_| (0..=t).map(move |i| if i > t / 2 { 1.0 } else { 0.0 }))
        .collect();
    Batch::from_dense_tokens(rows, t + 1, &tokens, &weights)
}

fn llama_like(
    arch: Architecture,
    (vocab, hidden, inter, layers, heads, kv): (usize, usize, usize, usize, usize, usize),
    theta: f64,
    qkv_bias: bool,
) -> ModelConfig {
    let mut c = ModelPreset::Tiny.config();
    c.architecture = arch;
    c.vocab_size = vocab;
    c.hidden_size = hidden;
    c.intermediate_size = inter;
    c.num_hidden_layers = layers;
    c.num_attention_heads = heads;
    c.num_key_value_heads = kv;
    c.head_dim = hidden / heads;
    c.rms_norm_eps = 1e-6;
    c.rope_theta = theta;
    c.rope_scaling = RopeScaling::Default;
    c.max_position_embeddings = 4096;
    c.tie_word_embeddings = true;
    c.qkv_bias = qkv_bias;
    c.sliding_windows = vec![None; layers];
    c
}

fn preset_config(name: &str, quick: bool) -> Option<ModelConfig> {
    if quick {
        // Same families, shrunk to run in seconds on 2 CPU cores.
        return match name {
            "qwen05b" => Some(llama_like(
                Architecture::Qwen2,
                (2000, 112, 304, 2, 7, 1),
                1e6,
                true,
            )),
            "llama1b" => Some(llama_like(
                Architecture::Llama,
                (2000, 128, 512, 2, 4, 2),
                5e5,
                false,
            )),
            _ => None,
        };
    }
    match name {
        "qwen05b" => Some(llama_like(
            Architecture::Qwen2,
            (151936, 896, 4864, 24, 14, 2),
            1e6,
            true,
        )),
        "llama1b" => Some(llama_like(
            Architecture::Llama,
            (128256, 2048, 8192, 16, 32, 8),
            5e5,
            false,
        )),
        _ => None,
    }
}

/// Builds the model with random base weights (transformers' init, seed 0) held in `dtype`
/// on `device`, in memory ([`LoraModel::from_tensors`]).
fn build_model(
    cfg: &ModelConfig,
    lora: &LoraConfig,
    device: &Device,
    dtype: DType,
    tag: &str,
) -> ringtune_model::Result<LoraModel> {
    let t0 = Instant::now();
    let m = LoraModel::from_tensors(random_tensors(cfg, 0)?, cfg, lora, device, dtype, 0)?;
    println!(
        "  ({tag}: random {dtype:?} model built in {:.1}s)",
        t0.elapsed().as_secs_f64()
    );
    Ok(m)
}

/// Normwise relative error ‖a − b‖ / ‖b‖ (b the reference).
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut n) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        d += (*x as f64 - *y as f64).powi(2);
        n += (*y as f64).powi(2);
    }
    if n == 0.0 {
        if d == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (d / n).sqrt()
    }
}

struct ParityRow {
    what: String,
    loss: f64,
    loss_rel: f64,
    grad_rel: f64,
    worst: String,
    target: f64,
}

/// Loss and gradients (key, flat f32) of one forward_backward.
type Run = (f64, Vec<(String, Vec<f32>)>);

/// forward_backward of the model on `weights` held in `dtype` on `device`, with the shared
/// adapter values.
fn run_one(
    weights: &[(String, Tensor)],
    cfg: &ModelConfig,
    lora: &LoraConfig,
    device: &Device,
    dtype: DType,
    params: &[f32],
    batch: &Batch,
) -> ringtune_model::Result<Run> {
    let model = LoraModel::from_tensors(weights.to_vec(), cfg, lora, device, dtype, 0)?;
    model.set_params_flat(params)?;
    let (out, grads) = model.forward_backward(batch, LossKind::CrossEntropy)?;
    let g = grads
        .tensors()
        .iter()
        .map(|(k, g)| Ok((k.clone(), g.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)))
        .collect::<ringtune_model::Result<Vec<_>>>()?;
    Ok((out.mean(), g))
}

/// Compares a run with its reference: loss and the worst per-tensor gradient error.
fn compare(what: String, got: &Run, reference: &Run, target: f64, secs: f64) -> ParityRow {
    let mut worst = (0f64, String::new());
    for ((k, g), (rk, rg)) in got.1.iter().zip(&reference.1) {
        assert_eq!(k, rk, "gradient order differs between runs");
        let e = rel_err(g, rg);
        if e >= worst.0 || worst.1.is_empty() {
            worst = (e, k.clone());
        }
    }
    let row = ParityRow {
        what,
        loss: got.0,
        loss_rel: (got.0 - reference.0).abs() / reference.0.abs().max(1e-30),
        grad_rel: worst.0,
        worst: worst.1,
        target,
    };
    println!(
        "  {}: loss {:.6} (rel err {:.2e}), max grad rel err {:.2e} ({}), target <= {:.0e}: {}  [{:.1}s]",
        row.what,
        row.loss,
        row.loss_rel,
        row.grad_rel,
        row.worst,
        target,
        if row.grad_rel <= target && row.loss_rel <= target { "PASS" } else { "FAIL" },
        secs
    );
    row
}

fn device_name(device: &Device) -> String {
    format!("{device:?}")
        .replace("Cuda(CudaDevice(DeviceId(", "cuda(")
        .replace(")))", ")")
        .to_lowercase()
}

fn parity(device: &Device, quick: bool, preset: &str) -> Vec<Result<ParityRow, String>> {
    println!(
        "## parity: {preset} preset, LoRA r=32 on q/k/v/o/gate/up/down + lm_head, CPU f32 reference \
         on the same base weights (bf16 rows: the weights rounded to bf16 once, for both sides)"
    );
    let mut cfg = match ModelPreset::from_name(preset, None) {
        Ok(p) => p.config(),
        Err(e) => return vec![Err(format!("parity preset: {e}"))],
    };
    let (rows, t) = if quick { (2, 32) } else { (4, 128) };
    if quick {
        cfg.vocab_size = 2000;
    }
    let lora = LoraConfig::from_tinker(32, true, true, true);
    let setup = (|| -> ringtune_model::Result<_> {
        let batch = make_batch(rows, t, cfg.vocab_size, 7)?;
        let w32 = random_tensors(&cfg, 0)?;
        let w16 = w32
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.to_dtype(DType::BF16)?)))
            .collect::<ringtune_model::Result<Vec<_>>>()?;
        // Adapters get nonzero values (PEFT's init has B = 0, which would make every
        // A-gradient zero and the comparison empty).
        let probe = LoraModel::from_tensors(w16.clone(), &cfg, &lora, &Device::Cpu, DType::F32, 0)?;
        let mut rng = Lcg(11);
        let params: Vec<f32> = (0..probe.param_layout().numel())
            .map(|_| 0.02 * rng.unit())
            .collect();
        Ok((batch, w32, w16, params))
    })();
    let (batch, w32, w16, params) = match setup {
        Ok(s) => s,
        Err(e) => return vec![Err(format!("setup: {e}"))],
    };
    let cpu_ref =
        |w: &[(String, Tensor)]| run_one(w, &cfg, &lora, &Device::Cpu, DType::F32, &params, &batch);
    let (ref32, ref16) = match (cpu_ref(&w32), cpu_ref(&w16)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return vec![Err(format!("cpu reference: {e}"))],
    };
    println!(
        "  cpu f32 references: loss {:.6} (f32 weights), {:.6} (bf16-rounded weights), {} \
         gradient tensors, {} params, batch {rows}x{t}",
        ref32.0,
        ref16.0,
        ref32.1.len(),
        params.len()
    );
    // For scale, not a check: what rounding the weights to bf16 alone does (f32 compute).
    compare(
        "(info) cpu f32, bf16-rounded vs f32 weights".into(),
        &ref16,
        &ref32,
        f64::INFINITY,
        0.0,
    );
    // With head size 64 on a GPU the bf16 row runs twice: the default attention (flash
    // forced off), then the flash-attention kernels, against the same reference.
    let flash_rows = !device.is_cpu() && cfg.head_dim == 64;
    let mut cases = vec![
        (device.clone(), DType::F32, &w32, &ref32, 1e-4, None),
        (
            device.clone(),
            DType::BF16,
            &w16,
            &ref16,
            1e-2,
            flash_rows.then_some(false),
        ),
    ];
    if !device.is_cpu() {
        if flash_rows {
            cases.push((device.clone(), DType::BF16, &w16, &ref16, 1e-2, Some(true)));
        }
        // The same mixed-precision numerics emulated on the CPU, next to the GPU's.
        cases.push((Device::Cpu, DType::BF16, &w16, &ref16, 1e-2, None));
    }
    let mut rows_out = Vec::new();
    for (dev, dtype, w, reference, target, flash) in cases {
        let t0 = Instant::now();
        let what = format!(
            "{} {dtype:?}{}",
            device_name(&dev),
            if flash == Some(true) {
                " flash attention"
            } else {
                ""
            }
        );
        ringtune_model::set_flash_attention(flash);
        let r = catch_unwind(AssertUnwindSafe(|| {
            run_one(w, &cfg, &lora, &dev, dtype, &params, &batch)
        }));
        let r = match r {
            Ok(Ok(run)) => Ok(compare(
                what,
                &run,
                reference,
                target,
                t0.elapsed().as_secs_f64(),
            )),
            Ok(Err(e)) => Err(format!("{what}: {e}")),
            Err(_) => Err(format!("{what}: panicked (see stderr)")),
        };
        if let Err(e) = &r {
            println!("  {e}");
        }
        rows_out.push(r);
    }
    ringtune_model::set_flash_attention(None);
    if flash_rows {
        // The flash kernels' own verdict: as accurate as the default attention against the
        // same reference (deep presets can exceed the 1e-2 target with either, since the
        // bf16 roundings add up over the layers).
        let find = |flash: bool| {
            rows_out.iter().flatten().find(|r| {
                r.what.starts_with("cuda") && r.what.contains("BF16") && {
                    r.what.ends_with("flash attention") == flash
                }
            })
        };
        if let (Some(d), Some(f)) = (find(false), find(true)) {
            let ratio = f.grad_rel / d.grad_rel.max(1e-30);
            println!(
                "  flash vs default attention: worst LoRA grad error {:.2e} vs {:.2e} ({ratio:.2}x), \
                 loss error {:.2e} vs {:.2e}: {}",
                f.grad_rel,
                d.grad_rel,
                f.loss_rel,
                d.loss_rel,
                if ratio <= 1.5 {
                    "as accurate (<= 1.5x)"
                } else {
                    "LESS ACCURATE than the default: do not switch"
                }
            );
        }
    }
    if preset == "tiny" {
        rows_out.push(no_head_adapter_row(device, &cfg, &w16, &batch));
    }
    rows_out
}

/// The bf16 row again without an adapter on lm_head (the throughput benchmark's setting),
/// where the head takes another path on the GPU: the loss kernel writes the logits'
/// gradient as bf16 for the `∂L/∂h` GEMM. Its own CPU f32 reference and adapter values.
fn no_head_adapter_row(
    device: &Device,
    cfg: &ModelConfig,
    w16: &[(String, Tensor)],
    batch: &Batch,
) -> Result<ParityRow, String> {
    let what = format!("{} BF16, no lm_head adapter", device_name(device));
    let lora = LoraConfig::from_tinker(32, true, true, false);
    let t0 = Instant::now();
    let r = catch_unwind(AssertUnwindSafe(|| -> ringtune_model::Result<_> {
        let probe = LoraModel::from_tensors(w16.to_vec(), cfg, &lora, &Device::Cpu, DType::F32, 0)?;
        let mut rng = Lcg(13);
        let params: Vec<f32> = (0..probe.param_layout().numel())
            .map(|_| 0.02 * rng.unit())
            .collect();
        drop(probe);
        let reference = run_one(w16, cfg, &lora, &Device::Cpu, DType::F32, &params, batch)?;
        let got = run_one(w16, cfg, &lora, device, DType::BF16, &params, batch)?;
        Ok((got, reference))
    }));
    let r = match r {
        Ok(Ok((got, reference))) => Ok(compare(
            what,
            &got,
            &reference,
            1e-2,
            t0.elapsed().as_secs_f64(),
        )),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: panicked (see stderr)")),
    };
    if let Err(e) = &r {
        println!("  {e}");
    }
    r
}

struct ThroughputRow {
    preset: String,
    dtype: DType,
    rows: usize,
    t: usize,
    n_base: usize,
    n_lora: usize,
    steps: usize,
    step_med: f64,
    tokens_s: f64,
    tflops: f64,
    peak_gib: Option<f64>,
    loss: f64,
    note: String,
}

fn train_steps(
    model: &LoraModel,
    rows: usize,
    t: usize,
    warmup: usize,
    steps: usize,
    deadline: Instant,
) -> ringtune_model::Result<(Vec<f64>, f64)> {
    let cfg = model.config();
    let mut opt = AdamW::new(AdamWConfig::default(), model.param_layout().clone());
    // On a GPU the optimizer state lives there too (no host round trip per step).
    let mut dev_opt = if model.device().is_cpu() {
        None
    } else {
        Some(DeviceAdamW::from_host(&opt, model.device())?)
    };
    let mut params = model.params_flat()?;
    let mut times = Vec::new();
    let mut loss = f64::NAN;
    for step in 0..warmup + steps {
        if step > 0 && Instant::now() > deadline {
            println!("  wall-clock guard hit after {step} steps");
            break;
        }
        let batch = make_batch(rows, t, cfg.vocab_size, 100 + step as u64)?;
        let t0 = Instant::now();
        let (out, mut grads) = model.forward_backward(&batch, LossKind::CrossEntropy)?;
        let t_fb = t0.elapsed().as_secs_f64();
        if let Some(o) = dev_opt.as_mut() {
            o.step_model(model, &grads, 1.0 / out.weight_sum, 1e-4)?;
            model.device().synchronize()?;
        } else {
            grads.scale(1.0 / out.weight_sum)?;
            let mut g = grads.to_flat()?;
            opt.step_flat(&mut params, &mut g, 1e-4)?;
            model.set_params_flat(&params)?;
        }
        let dt = t0.elapsed().as_secs_f64();
        loss = out.mean();
        println!(
            "  step {step}{}: loss {loss:.4}  fwd+bwd {t_fb:.3}s  step {dt:.3}s  {:.0} tokens/s",
            if step < warmup { " (warm-up)" } else { "" },
            (rows * t) as f64 / dt
        );
        if step >= warmup {
            times.push(dt);
        }
    }
    Ok((times, loss))
}

fn throughput(
    name: &str,
    cfg: &ModelConfig,
    device: &Device,
    (quick, ops, checkpointing): (bool, bool, bool),
    mem: &MemPoll,
    deadline: Instant,
) -> Result<ThroughputRow, String> {
    let lora = LoraConfig::from_tinker(32, true, true, false);
    let (warmup, steps) = if quick { (1, 2) } else { (2, 5) };
    let batches: &[(usize, usize)] = if quick {
        &[(2, 64)]
    } else {
        &[(8, 1024), (4, 1024), (2, 1024)]
    };
    let dtypes: &[DType] = if device.is_cpu() {
        &[DType::F32]
    } else {
        &[DType::BF16, DType::F32]
    };
    let mut notes = Vec::new();
    for &dtype in dtypes {
        mem.reset();
        let t0 = Instant::now();
        let built = catch_unwind(AssertUnwindSafe(|| {
            build_model(cfg, &lora, device, dtype, name)
        }));
        let model = match built {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                let n = format!("{dtype:?} build failed: {e}");
                println!("  {n}");
                notes.push(n);
                continue;
            }
            Err(_) => {
                notes.push(format!("{dtype:?} build panicked"));
                continue;
            }
        };
        model.set_activation_checkpointing(checkpointing);
        println!(
            "  built {name} {dtype:?} on {device:?} in {:.1}s ({:.0}M base, {:.1}M LoRA params{})",
            t0.elapsed().as_secs_f64(),
            cfg.num_parameters() as f64 / 1e6,
            model.param_layout().numel() as f64 / 1e6,
            if checkpointing {
                ", activation checkpointing"
            } else {
                ""
            }
        );
        for &(rows, t) in batches {
            if Instant::now() > deadline {
                notes.push("wall-clock guard hit before a batch".into());
                break;
            }
            println!("  batch {rows}x{t}, {dtype:?} compute, AdamW, {warmup} warm-up + {steps} timed steps");
            let r = catch_unwind(AssertUnwindSafe(|| {
                train_steps(&model, rows, t, warmup, steps, deadline)
            }));
            let err = match r {
                Ok(Ok((mut times, loss))) if !times.is_empty() => {
                    times.sort_by(f64::total_cmp);
                    let med = times[times.len() / 2];
                    let tokens_s = (rows * t) as f64 / med;
                    let n_base = cfg.num_parameters();
                    if ops {
                        print_ops(&model, rows, t, cfg.vocab_size);
                        print_stream_profile(&model, rows, t);
                    }
                    if (rows, t) != batches[0] {
                        notes.push(format!(
                            "batch {}x{} failed, fell back",
                            batches[0].0, batches[0].1
                        ));
                    }
                    return Ok(ThroughputRow {
                        preset: name.to_string(),
                        dtype,
                        rows,
                        t,
                        n_base,
                        n_lora: model.param_layout().numel(),
                        steps: times.len(),
                        step_med: med,
                        tokens_s,
                        tflops: 4.0 * n_base as f64 * tokens_s / 1e12,
                        peak_gib: mem.peak_gib(),
                        loss,
                        note: notes.join("; "),
                    });
                }
                Ok(Ok(_)) => "no timed step inside the wall-clock guard".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "panicked (see stderr)".to_string(),
            };
            let n = format!("{dtype:?} batch {rows}x{t}: {err}");
            println!("  {n}");
            notes.push(n);
        }
    }
    Err(notes.join("; "))
}

/// Prints [`LoraModel::profile_ops`] at `rows x t` as a markdown table: each op's forward
/// and backward, and its share of a step (ms x how often a step runs it).
fn print_ops(model: &LoraModel, rows: usize, t: usize, vocab: usize) {
    let r = make_batch(rows, t, vocab, 11)
        .and_then(|b| model.profile_ops(&b, LossKind::CrossEntropy, 3));
    let ops = match r {
        Ok(o) => o,
        Err(e) => {
            println!("  op profile failed: {e}");
            return;
        }
    };
    println!("\n  op profile, batch {rows}x{t} (median of 3, device synchronised around each):\n");
    for line in ringtune_model::model::ops_table(&ops).lines() {
        println!("  {line}");
    }
    println!();
}

/// Prints the stream profile (`ringtune_model::prof`) of one real training step at
/// `rows x t` (forward_backward and AdamW, as [`train_steps`] times them), after one
/// unprofiled step to warm up.
fn print_stream_profile(model: &LoraModel, rows: usize, t: usize) {
    use ringtune_model::prof::{capture, span, Kind};
    let r = (|| -> ringtune_model::Result<ringtune_model::prof::Profile> {
        let dev = model.device();
        let opt = AdamW::new(AdamWConfig::default(), model.param_layout().clone());
        let mut dev_opt = (!dev.is_cpu())
            .then(|| DeviceAdamW::from_host(&opt, dev))
            .transpose()?;
        let mut host = (opt, model.params_flat()?);
        let mut step = |seed: u64| -> ringtune_model::Result<()> {
            let batch = make_batch(rows, t, model.config().vocab_size, seed)?;
            let (out, mut grads) = model.forward_backward(&batch, LossKind::CrossEntropy)?;
            let _opt = span("optimizer", Kind::Phase, dev);
            match dev_opt.as_mut() {
                Some(o) => o
                    .step_model(model, &grads, 1.0 / out.weight_sum, 1e-4)
                    .map(drop),
                None => {
                    grads.scale(1.0 / out.weight_sum)?;
                    let mut g = grads.to_flat()?;
                    host.0.step_flat(&mut host.1, &mut g, 1e-4)?;
                    model.set_params_flat(&host.1)
                }
            }
        };
        step(21)?;
        Ok(capture(dev, || step(22))?.1)
    })();
    match r {
        Ok(p) => {
            let clock = if model.device().is_cpu() {
                "the host clock"
            } else {
                "CUDA events, no synchronisation between ops"
            };
            println!("\n  stream profile of one step, batch {rows}x{t} ({clock}):\n");
            for line in p.to_string().lines() {
                println!("  {line}");
            }
            println!();
        }
        Err(e) => println!("  stream profile failed: {e}"),
    }
}

fn main() {
    ringtune_model::tune_allocator();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("gpu_check: {e}");
            std::process::exit(2);
        }
    };
    let start = Instant::now();
    let device = match parse_device(&args.device) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("gpu_check: device {}: {e}", args.device);
            std::process::exit(1);
        }
    };
    println!(
        "# ringtune gpu_check: device {:?}, quick {}, budget {:?}",
        device, args.quick, args.budget
    );
    let mem = MemPoll::start();
    std::thread::sleep(Duration::from_millis(200));
    if let Some(g) = mem.peak_gib() {
        println!("GPU memory used at start (CUDA context): {g:.2} GiB");
    }

    let par = if args.no_parity {
        Vec::new()
    } else {
        parity(&device, args.quick, &args.parity_preset)
    };

    println!("\n## throughput: LoRA r=32 alpha 32 on q/k/v/o/gate/up/down, AdamW, half the positions weighted");
    println!("MFU formula: 4 * N_base * tokens/s / {:.0} TFLOP/s (bf16 dense peak, H200/H100 SXM), as gpu_peft_bench.py", PEAK_BF16 / 1e12);
    let mut thr = Vec::new();
    let presets: &[String] = if args.no_throughput {
        &[]
    } else {
        &args.presets
    };
    let n = presets.len();
    for (i, name) in presets.iter().enumerate() {
        let Some(cfg) = preset_config(name, args.quick) else {
            thr.push(Err(format!("{name}: unknown preset (qwen05b, llama1b)")));
            continue;
        };
        // Split what is left of the budget evenly over the presets still to run.
        let left = args.budget.saturating_sub(start.elapsed());
        let deadline = Instant::now() + left / (n - i) as u32;
        println!(
            "\n### {name} (guard {:.0}s)",
            (deadline - Instant::now()).as_secs_f64()
        );
        thr.push(
            throughput(
                name,
                &cfg,
                &device,
                (args.quick, args.ops, args.checkpointing),
                &mem,
                deadline,
            )
            .map_err(|e| format!("{name}: {e}")),
        );
    }

    println!(
        "\n## summary (ringtune, {:?}, total {:.0}s)\n",
        device,
        start.elapsed().as_secs_f64()
    );
    println!("| parity vs CPU f32 | loss | loss rel err | max LoRA grad rel err | worst tensor | target | ok |");
    println!("|---|---|---|---|---|---|---|");
    for r in &par {
        match r {
            Ok(p) => println!(
                "| {} | {:.6} | {:.2e} | {:.2e} | {} | {:.0e} | {} |",
                p.what,
                p.loss,
                p.loss_rel,
                p.grad_rel,
                p.worst,
                p.target,
                if p.grad_rel <= p.target && p.loss_rel <= p.target {
                    "PASS"
                } else {
                    "FAIL"
                }
            ),
            Err(e) => println!("| {e} | | | | | | ERROR |"),
        }
    }
    println!();
    println!("| preset | compute | B x T | base params | lora params | steps | step s (med) | tokens/s | TFLOP/s (4N) | MFU | peak GiB (nvidia-smi) | loss | note |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &thr {
        match r {
            Ok(t) => println!(
                "| {} | {:?} | {}x{} | {:.0}M | {:.1}M | {} | {:.3} | {:.0} | {:.0} | {:.1}% | {} | {:.4} | {} |",
                t.preset,
                t.dtype,
                t.rows,
                t.t,
                t.n_base as f64 / 1e6,
                t.n_lora as f64 / 1e6,
                t.steps,
                t.step_med,
                t.tokens_s,
                t.tflops,
                100.0 * t.tflops * 1e12 / PEAK_BF16,
                t.peak_gib.map_or("n/a".into(), |g| format!("{g:.1}")),
                t.loss,
                t.note
            ),
            Err(e) => println!("| {e} | | | | | | | | | | | | ERROR |"),
        }
    }
}
