//! The policy-gradient losses (tinker's `importance_sampling`, `ppo`, `cispo`) and the
//! `linear` loss: per-token terms and derivatives against values computed by hand and
//! against plain f64 code (including both sides of every clip boundary, positive and
//! negative advantages), the batch wiring of sampler logprobs and advantages through the
//! head, and one end-to-end finite-difference check of LoRA gradients under `ppo`.

use std::path::{Path, PathBuf};

use ringtune_model::{Adapters, Batch, DType, Device, LoraModel, LossKind};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-tiny")
}

/// The reference adapter after two steps (B ≠ 0), so every LoRA factor has a gradient.
fn trained_tiny() -> LoraModel {
    LoraModel::load_with_adapter(
        &tiny().join("base"),
        &tiny().join("adapter_step2"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

/// Plain f64 definitions, written from tinker's docs independently of the crate.
fn reference(kind: &str, lp: f64, q: f64, a: f64, lo: f64, hi: f64) -> f64 {
    let r = (lp - q).exp();
    match kind {
        "importance_sampling" => -(r * a),
        "ppo" => -f64::min(r * a, r.max(lo).min(hi) * a),
        // The clipped ratio is a constant (stop-gradient): evaluated at the point of
        // differentiation by the caller, see `cispo_reference`.
        _ => unreachable!(),
    }
}

fn cispo_reference(lp: f64, lp0: f64, q: f64, a: f64, lo: f64, hi: f64) -> f64 {
    let c = (lp0 - q).exp().max(lo).min(hi);
    -(c * lp * a)
}

fn close(x: f64, y: f64, tol: f64) -> bool {
    (x - y).abs() <= tol * (1.0 + y.abs())
}

#[test]
fn hand_computed_terms() {
    let e05 = 0.5f64.exp(); // r for logp −1, q −1.5
    let em1 = (-1f64).exp(); // r for logp −2, q −1
    #[rustfmt::skip]
    let cases: Vec<(LossKind, f32, f32, f32, f32, f64, f64)> = vec![
        // kind, logp, w, q, A, expected term, expected dℓ/dlogp
        (LossKind::CrossEntropy, -1.0, 0.5, 0.0, 0.0, 0.5, -0.5),
        (LossKind::Linear, -1.0, 1.0, 0.0, 3.0, 3.0, -3.0),
        (LossKind::ImportanceSampling, -1.0, 1.0, -1.5, 2.0, -2.0 * e05, -2.0 * e05),
        (LossKind::ImportanceSampling, -1.0, 1.0, -1.5, -2.0, 2.0 * e05, 2.0 * e05),
        // ppo, ratio 1.65 above 1.2: A > 0 is clipped (constant), A < 0 is not.
        (LossKind::PPO, -1.0, 1.0, -1.5, 2.0, -2.4, 0.0),
        (LossKind::PPO, -1.0, 1.0, -1.5, -2.0, 2.0 * e05, 2.0 * e05),
        // ppo, ratio 0.37 below 0.8: A > 0 is not clipped, A < 0 is.
        (LossKind::PPO, -2.0, 1.0, -1.0, 2.0, -2.0 * em1, -2.0 * em1),
        (LossKind::PPO, -2.0, 1.0, -1.0, -2.0, 1.6, 0.0),
        // ppo inside the range is importance sampling.
        (LossKind::PPO, -1.0, 1.0, -1.1, 2.0, -2.0 * 0.1f64.exp(), -2.0 * 0.1f64.exp()),
        // cispo: ratio 1.65 inside [0, 4]: −r·logp·A, derivative −r·A.
        (LossKind::CISPO, -1.0, 1.0, -1.5, 2.0, 2.0 * e05, -2.0 * e05),
        // cispo: ratio e^2.5 = 12.2 clipped to 4.
        (LossKind::CISPO, -0.5, 1.0, -3.0, -1.0, -2.0, 4.0),
        // weight scales every term; weight 0 masks.
        (LossKind::PPO, -1.0, 0.5, -1.5, -2.0, e05, e05),
        (LossKind::CISPO, -1.0, 0.0, -1.5, 2.0, 0.0, 0.0),
    ];
    for (kind, lp, w, q, a, term, d) in cases {
        let (t, g) = kind.token_term(lp, w, q, a);
        assert!(
            close(t, term, 1e-6),
            "{kind:?} lp {lp} q {q} A {a}: term {t}, expected {term}"
        );
        assert!(
            close(g as f64, d, 1e-6),
            "{kind:?} lp {lp} q {q} A {a}: dℓ/dlogp {g}, expected {d}"
        );
    }
}

/// Terms equal the f64 definitions and derivatives equal their central differences, on
/// a grid of ratios around and across both clip thresholds, for both signs of A.
#[test]
fn terms_and_derivatives_match_f64_definitions_across_clip_boundaries() {
    let q = -1.25f64;
    let mut ratios = vec![0.01, 0.3, 0.7, 0.95, 1.0, 1.05, 1.3, 2.5, 3.9, 4.1, 9.0];
    // Just inside and just outside each threshold of ppo (0.8, 1.2) and cispo (0, 4).
    for b in [0.8f64, 1.2, 4.0] {
        ratios.push(b * (1.0 - 1e-3));
        ratios.push(b * (1.0 + 1e-3));
    }
    let mut checked = 0;
    for &r in &ratios {
        let lp = q + r.ln();
        for a in [1.5f64, -0.75] {
            for (kind, name, lo, hi) in [
                (
                    LossKind::ImportanceSampling,
                    "importance_sampling",
                    0.0,
                    0.0,
                ),
                (LossKind::PPO, "ppo", 0.8, 1.2),
                (
                    LossKind::Ppo {
                        clip_low: 0.5,
                        clip_high: 2.0,
                    },
                    "ppo",
                    0.5,
                    2.0,
                ),
                (LossKind::CISPO, "cispo", 0.0, 4.0),
                (
                    LossKind::Cispo {
                        clip_low: 0.9,
                        clip_high: 1.1,
                    },
                    "cispo",
                    0.9,
                    1.1,
                ),
            ] {
                let f = |x: f64| {
                    if name == "cispo" {
                        cispo_reference(x, lp, q, a, lo, hi)
                    } else {
                        reference(name, x, q, a, lo, hi)
                    }
                };
                let (t, g) = kind.token_term(lp as f32, 1.0, q as f32, a as f32);
                // The crate computes from f32 inputs; compare at the f32-rounded point.
                let lp32 = lp as f32 as f64;
                let want = if name == "cispo" {
                    cispo_reference(lp32, lp32, q, a, lo, hi)
                } else {
                    reference(name, lp32, q, a, lo, hi)
                };
                assert!(
                    close(t, want, 1e-6),
                    "{name} [{lo}, {hi}] r {r} A {a}: term {t}, f64 {want}"
                );
                let h = 1e-6 * (1.0 + lp.abs());
                let fd = (f(lp + h) - f(lp - h)) / (2.0 * h);
                assert!(
                    close(g as f64, fd, 1e-4),
                    "{name} [{lo}, {hi}] r {r} A {a}: dℓ/dlogp {g}, central difference {fd}"
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, ratios.len() * 2 * 5);
}

#[test]
fn ppo_gradient_switches_off_exactly_past_the_threshold_the_advantage_pushes_towards() {
    let q = 0.0f32;
    for (r, a, live) in [
        (1.2 * 0.999, 1.0, true),
        (1.2 * 1.001, 1.0, false),
        (1.2 * 1.001, -1.0, true),
        (0.8 * 1.001, -1.0, true),
        (0.8 * 0.999, -1.0, false),
        (0.8 * 0.999, 1.0, true),
    ] {
        let lp = (r as f32).ln();
        let (_, g) = LossKind::PPO.token_term(lp, 1.0, q, a);
        assert_eq!(g != 0.0, live, "r {r} A {a}: derivative {g}");
    }
}

#[test]
fn names_and_thresholds_parse_like_tinker() {
    for n in [
        "cross_entropy",
        "importance_sampling",
        "ppo",
        "cispo",
        "linear",
    ] {
        assert_eq!(LossKind::from_name(n).unwrap().name(), n);
    }
    assert!(LossKind::from_name("dpo").is_none());
    assert_eq!(
        LossKind::from_name("ppo"),
        Some(LossKind::Ppo {
            clip_low: 0.8,
            clip_high: 1.2
        })
    );
    assert_eq!(
        LossKind::from_name("cispo"),
        Some(LossKind::Cispo {
            clip_low: 0.0,
            clip_high: 4.0
        })
    );
    assert_eq!(
        LossKind::with_config("ppo", Some(0.9), None).unwrap(),
        LossKind::Ppo {
            clip_low: 0.9,
            clip_high: 1.2
        }
    );
    assert!(LossKind::with_config("ppo", Some(1.5), Some(1.2)).is_err());
    assert!(LossKind::with_config("cross_entropy", Some(0.9), None).is_err());
    assert!(LossKind::with_config("cispo", None, Some(f32::NAN)).is_err());
}

/// A two-row batch over the llama-tiny vocabulary with ratios spread across the clip
/// range, from the current model's own logprobs.
fn rl_batch(model: &LoraModel) -> Batch {
    let tokens = vec![vec![1u32, 5, 9, 17, 3, 8, 2], vec![4u32, 6, 11, 2, 7]];
    let weights: Vec<Vec<f32>> = tokens
        .iter()
        .map(|t| {
            let mut w = vec![1f32; t.len()];
            w[1] = 0.0; // a prompt token: masked
            w
        })
        .collect();
    let plain = Batch::from_token_rows(&tokens, &weights, 0).unwrap();
    let lp = model
        .logprobs(&plain, LossKind::CrossEntropy, Adapters::On)
        .unwrap()
        .logprobs;
    let ratios = [0.5f32, 0.9, 1.1, 1.6, 3.0, 5.0];
    let advs = [1.0f32, -0.5, 2.0, -1.5];
    let seq = plain.seq();
    let (mut q, mut a) = (Vec::new(), Vec::new());
    for (b, t) in tokens.iter().enumerate() {
        let mut qr = vec![0f32; t.len()];
        let mut ar = vec![0f32; t.len()];
        for i in 1..t.len() {
            let k = b * 7 + i;
            // Aligned to tokens: value i belongs to target position i − 1.
            qr[i] = lp[b * seq + i - 1] - ratios[k % ratios.len()].ln();
            ar[i] = advs[k % advs.len()];
        }
        q.push(qr);
        a.push(ar);
    }
    Batch::from_token_rows(&tokens, &weights, 0)
        .unwrap()
        .with_rl_rows(&q, &a)
        .unwrap()
}

#[test]
fn head_sums_the_token_terms_with_the_batch_inputs_aligned() {
    let model = trained_tiny();
    let batch = rl_batch(&model);
    let (q, a, w) = (
        batch.sampler_logprobs().unwrap(),
        batch.advantages().unwrap(),
        batch.weights(),
    );
    for kind in [
        LossKind::ImportanceSampling,
        LossKind::PPO,
        LossKind::CISPO,
        LossKind::Linear,
    ] {
        let out = model.logprobs(&batch, kind, Adapters::On).unwrap();
        let mut want = 0f64;
        for b in 0..batch.rows() {
            for t in 0..batch.lengths()[b] {
                let i = b * batch.seq() + t;
                let (lp, q, a, w) = (
                    out.logprobs[i] as f64,
                    q[i] as f64,
                    a[i] as f64,
                    w[i] as f64,
                );
                want += w * match kind {
                    LossKind::Linear => -a * lp,
                    LossKind::Cispo { .. } => cispo_reference(lp, lp, q, a, 0.0, 4.0),
                    LossKind::Ppo { .. } => reference("ppo", lp, q, a, 0.8, 1.2),
                    _ => reference("importance_sampling", lp, q, a, 0.0, 0.0),
                };
            }
        }
        assert!(
            close(out.loss_sum, want, 1e-5),
            "{}: head {} vs f64 {want}",
            kind.name(),
            out.loss_sum
        );
        assert!(want.abs() > 1e-3, "{}: a degenerate case", kind.name());
    }
    // The ratios really sit on both sides of ppo's range.
    let out = model.logprobs(&batch, LossKind::PPO, Adapters::On).unwrap();
    let r: Vec<f32> = (0..out.logprobs.len())
        .filter(|&i| w[i] > 0.0)
        .map(|i| (out.logprobs[i] - q[i]).exp())
        .collect();
    assert!(r.iter().any(|&r| r < 0.8) && r.iter().any(|&r| r > 1.2));
}

#[test]
fn rl_losses_refuse_a_batch_without_their_inputs() {
    let model = trained_tiny();
    let b = Batch::from_token_rows(&[vec![1, 2, 3]], &[vec![1.0; 3]], 0).unwrap();
    let err = model.forward_backward(&b, LossKind::PPO).unwrap_err();
    assert!(err.to_string().contains("ppo"), "{err}");
    assert!(b
        .clone()
        .with_rl_inputs(vec![0.0; 1], vec![0.0; 2])
        .is_err());
    assert!(b
        .clone()
        .with_rl_inputs(vec![0.0, f32::NAN], vec![0.0; 2])
        .is_err());
    assert!(b.with_rl_rows(&[vec![0.0; 2]], &[vec![0.0; 3]]).is_err());
}

/// forward_backward's LoRA gradients under `ppo` (and `linear`) against central finite
/// differences of the loss sum, on the largest-gradient coordinate of a few tensors.
/// (`cispo`'s value has a stop-gradient inside, so its finite difference is not its
/// gradient; it is checked against `linear` with advantages sg(clip(r))·A below.)
#[test]
fn ppo_and_linear_lora_gradients_agree_with_finite_differences() {
    let model = trained_tiny();
    let rl = rl_batch(&model);
    let base = model.params_flat().unwrap();
    for kind in [LossKind::PPO, LossKind::Linear] {
        let batch = rl.clone();
        let (_, grads) = model.forward_backward(&batch, kind).unwrap();
        let flat_g = grads.to_flat().unwrap();
        assert!(flat_g.iter().any(|&g| g != 0.0));
        let mut checked = 0;
        let mut offset = 0;
        for (key, shape) in model.param_layout().entries() {
            let n: usize = shape.iter().product();
            if key.contains("layers.0.self_attn.v_proj") || key.contains("lm_head") {
                let (i, g) = flat_g[offset..offset + n]
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                    .unwrap();
                // Small enough that no token's ratio crosses a clip threshold.
                let eps = 2e-3f32;
                let loss_at = |d: f32| {
                    let mut p = base.clone();
                    p[offset + i] += d;
                    model.set_params_flat(&p).unwrap();
                    model.logprobs(&batch, kind, Adapters::On).unwrap().loss_sum
                };
                let fd = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps as f64);
                let rel = (fd - *g as f64).abs() / (g.abs() as f64);
                assert!(
                    rel < 3e-2,
                    "{} {key}[{i}]: analytic {g} vs finite difference {fd} (rel {rel:.2e})",
                    kind.name()
                );
                checked += 1;
            }
            offset += n;
        }
        model.set_params_flat(&base).unwrap();
        assert_eq!(checked, 4);
    }
}

#[test]
fn cispo_gradient_is_the_linear_gradient_with_the_clipped_ratio_frozen() {
    let model = trained_tiny();
    let batch = rl_batch(&model);
    let (out, g_cispo) = model.forward_backward(&batch, LossKind::CISPO).unwrap();
    let (q, a) = (
        batch.sampler_logprobs().unwrap(),
        batch.advantages().unwrap(),
    );
    let frozen: Vec<f32> = (0..q.len())
        .map(|i| ((out.logprobs[i] - q[i]).exp().clamp(0.0, 4.0)) * a[i])
        .collect();
    assert!(frozen
        .iter()
        .zip(a)
        .any(|(f, a)| *a != 0.0 && (f / a - 4.0).abs() < 1e-6));
    let lin = batch.clone().with_rl_inputs(q.to_vec(), frozen).unwrap();
    let (_, g_lin) = model.forward_backward(&lin, LossKind::Linear).unwrap();
    let (x, y) = (g_cispo.to_flat().unwrap(), g_lin.to_flat().unwrap());
    let n: f64 = y.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
    let d: f64 = x
        .iter()
        .zip(&y)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(n > 0.0 && d / n < 1e-5, "relative difference {:.2e}", d / n);
}

/// The device-independent head (what CUDA and bf16 run) computes the same policy-gradient
/// losses and gradients as the CPU kernel.
#[test]
fn generic_head_matches_the_cpu_kernel_for_the_rl_losses() {
    let model = trained_tiny();
    let batch = rl_batch(&model);
    for kind in [
        LossKind::ImportanceSampling,
        LossKind::PPO,
        LossKind::CISPO,
        LossKind::Linear,
    ] {
        let (fast, gf) = model.forward_backward(&batch, kind).unwrap();
        ringtune_model::set_force_generic(true);
        let slow = model.forward_backward(&batch, kind);
        ringtune_model::set_force_generic(false);
        let (slow, gs) = slow.unwrap();
        assert!(
            close(fast.loss_sum, slow.loss_sum, 1e-5),
            "{}: {} vs {}",
            kind.name(),
            fast.loss_sum,
            slow.loss_sum
        );
        let (x, y) = (gf.to_flat().unwrap(), gs.to_flat().unwrap());
        let n: f64 = y.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        let d: f64 = x
            .iter()
            .zip(&y)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            n > 0.0 && d / n < 1e-4,
            "{}: relative {:.2e}",
            kind.name(),
            d / n
        );
    }
}
