//! Measures candle's CPU matmul throughput on the shapes that dominate LoRA training, to
//! tell kernel limits from overheads: `cargo run --release -p ringtune-model --example matmul_probe`.

use std::time::Instant;

use ringtune_model::{DType, Device, Tensor};

fn probe(name: &str, m: usize, k: usize, n: usize, transpose_rhs: bool) -> candle_core::Result<()> {
    let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
    let b = if transpose_rhs {
        Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?.t()?
    } else {
        Tensor::randn(0f32, 1.0, (k, n), &Device::Cpu)?
    };
    let mut ts = Vec::new();
    for _ in 0..7 {
        let t0 = Instant::now();
        let c = a.matmul(&b)?;
        let _ = c.dtype() == DType::F32;
        ts.push(t0.elapsed().as_secs_f64());
    }
    ts.sort_by(|x, y| x.total_cmp(y));
    let med = ts[ts.len() / 2];
    println!(
        "{name:<28} [{m}x{k}]·[{k}x{n}] median {:.1} ms  {:.1} GFLOP/s",
        med * 1e3,
        2.0 * (m * k * n) as f64 / med / 1e9
    );
    Ok(())
}

fn main() -> candle_core::Result<()> {
    let which = std::env::args().nth(1).unwrap_or_default();
    if which == "smol" {
        probe("smol q (x·Wᵀ)", 1024, 576, 576, true)?;
        probe("smol k (x·Wᵀ)", 1024, 576, 192, true)?;
        probe("smol qkv fused", 1024, 576, 960, true)?;
        probe("smol gate (x·Wᵀ)", 1024, 576, 1536, true)?;
        probe("smol gate+up fused", 1024, 576, 3072, true)?;
        probe("smol down fwd", 1024, 1536, 576, true)?;
        probe("smol down bwd (g·W)", 1024, 576, 1536, false)?;
        probe("smol gate bwd (g·W)", 1024, 1536, 576, false)?;
        probe("head fwd", 1024, 576, 49152, true)?;
        probe("head bwd", 1024, 49152, 576, false)?;
        probe("smol lora x·Aᵀ", 1024, 576, 32, true)?;
        probe("smol lora t·Bᵀ", 1024, 32, 1536, true)?;
        probe("smol dA = uᵀ·x", 32, 1024, 576, false)?;
        return Ok(());
    }
    probe("square 1024", 1024, 1024, 1024, false)?;
    probe("lm_head fwd chunk (x·Wᵀ)", 512, 256, 32000, true)?;
    probe("lm_head bwd (G·W)", 1024, 32000, 256, false)?;
    probe("q_proj fwd", 2048, 256, 256, true)?;
    probe("mlp up fwd", 2048, 256, 688, true)?;
    probe("mlp down bwd (g·W)", 2048, 256, 688, false)?;
    Ok(())
}
