//! Times LoRA training steps on a random-init preset model, for profiling the model core
//! without the CLI: `cargo run --release -p ringtune-model --example train_step -- tiny 5`.
//! (`ringtune bench train` is the benchmark proper.)

use std::time::Instant;

use ringtune_model::{
    AdamW, AdamWConfig, Batch, Device, LoraConfig, LoraModel, LossKind, ModelPreset,
};

fn main() -> ringtune_model::Result<()> {
    ringtune_model::init_cpu_runtime(None);
    let args: Vec<String> = std::env::args().collect();
    let preset = ModelPreset::from_name(args.get(1).map_or("tiny", String::as_str), Some(32000))?;
    let steps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let cfg = preset.config();
    let (b, t) = preset.bench_batch();
    let model = LoraModel::random(
        &cfg,
        &LoraConfig::from_tinker(32, true, true, false),
        &Device::Cpu,
        0,
        0,
    )?;
    let mut opt = AdamW::new(AdamWConfig::default(), model.param_layout().clone());
    let mut params = model.params_flat()?;
    let weights: Vec<f32> = (0..b)
        .flat_map(|_| (0..=t).map(move |i| if i > t / 2 { 1.0 } else { 0.0 }))
        .collect();
    let mut state = 1u64;
    for step in 0..steps {
        let tokens: Vec<u32> = (0..b * (t + 1))
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) % cfg.vocab_size as u64) as u32
            })
            .collect();
        let batch = Batch::from_dense_tokens(b, t + 1, &tokens, &weights)?;
        let t0 = Instant::now();
        let (out, mut grads) = model.forward_backward(&batch, LossKind::CrossEntropy)?;
        let t1 = t0.elapsed().as_secs_f64();
        grads.scale(1.0 / out.weight_sum)?;
        let mut g = grads.to_flat()?;
        opt.step_flat(&mut params, &mut g, 1e-4)?;
        model.set_params_flat(&params)?;
        let dt = t0.elapsed().as_secs_f64();
        println!(
            "step {step}: loss {:.4}  fwd+bwd {t1:.3}s  total {dt:.3}s  {:.0} tokens/s",
            out.mean(),
            (b * t) as f64 / dt
        );
    }
    Ok(())
}
