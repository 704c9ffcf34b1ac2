//! DPO's pair math against plain f64 code, and DPO through the model: the gradient that
//! the per-token linear loss carries equals the finite difference of the mean pair loss,
//! and one step along it raises the chosen side's margin.

use std::path::{Path, PathBuf};

use ringtune_model::{Adapters, Batch, DType, Device, DpoPair, LoraModel, LossKind};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-tiny")
}

fn trained_tiny() -> LoraModel {
    LoraModel::load_with_adapter(
        &tiny().join("base"),
        &tiny().join("adapter_step2"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

/// −log σ(β·((πc − rc) − (πr − rr))), written directly.
fn f64_loss(beta: f64, pc: f64, pr: f64, rc: f64, rr: f64) -> f64 {
    let z = beta * ((pc - rc) - (pr - rr));
    -(1.0 / (1.0 + (-z).exp())).ln()
}

#[test]
fn pair_loss_derivative_and_rewards_match_f64() {
    for &(beta, pc, pr, rc, rr) in &[
        (0.1, -10.0, -12.0, -11.0, -11.5),
        (0.1, -30.0, -8.0, -29.0, -9.0),
        (0.5, -3.0, -3.0, -3.0, -3.0),
        (2.0, -1.0, -40.0, -20.0, -20.0),
    ] {
        let p = DpoPair::new(beta, pc, pr, rc, rr);
        let want = f64_loss(beta, pc, pr, rc, rr);
        assert!((p.loss - want).abs() < 1e-12, "{p:?} vs {want}");
        let h = 1e-5;
        let dc =
            (f64_loss(beta, pc + h, pr, rc, rr) - f64_loss(beta, pc - h, pr, rc, rr)) / (2.0 * h);
        let dr =
            (f64_loss(beta, pc, pr + h, rc, rr) - f64_loss(beta, pc, pr - h, rc, rr)) / (2.0 * h);
        assert!((p.d_chosen - dc).abs() < 1e-8, "{p:?}: d_chosen vs {dc}");
        assert!((-p.d_chosen - dr).abs() < 1e-8, "{p:?}: d_rejected vs {dr}");
        assert!((p.chosen_reward - beta * (pc - rc)).abs() < 1e-12);
        assert!((p.rejected_reward - beta * (pr - rr)).abs() < 1e-12);
    }
    // The sign: the chosen side winning lowers the loss below log 2, losing raises it.
    let win = DpoPair::new(0.1, -5.0, -9.0, -7.0, -7.0);
    let lose = DpoPair::new(0.1, -9.0, -5.0, -7.0, -7.0);
    assert!(win.loss < 2f64.ln() && lose.loss > 2f64.ln());
    assert_eq!((win.accuracy(), lose.accuracy()), (1.0, 0.0));
    assert_eq!(DpoPair::new(0.1, -1.0, -2.0, -1.0, -2.0).accuracy(), 0.5);
    // Raising π_c always lowers the loss.
    assert!(win.d_chosen < 0.0 && lose.d_chosen < 0.0);
    // Extreme margins stay finite.
    let far = DpoPair::new(1.0, 0.0, -5000.0, 0.0, 0.0);
    assert!(far.loss >= 0.0 && far.loss < 1e-300 && far.d_chosen.abs() < 1e-300);
    let bad = DpoPair::new(1.0, -5000.0, 0.0, 0.0, 0.0);
    assert!((bad.loss - 5000.0).abs() < 1e-9 && (bad.d_chosen + 1.0).abs() < 1e-12);
}

/// Three pairs over the tiny vocabulary: a shared prompt (weight 0), different replies.
fn pairs() -> (Batch, Batch) {
    let prompts = [vec![1u32, 4, 9], vec![3u32, 3, 7, 2], vec![5u32, 8]];
    let chosen_replies = [vec![11u32, 12, 13], vec![6u32, 2], vec![17u32, 4, 4, 9]];
    let rejected_replies = [vec![21u32, 2], vec![6u32, 30, 31], vec![1u32]];
    let side = |replies: &[Vec<u32>; 3]| {
        let (mut t, mut w) = (Vec::new(), Vec::new());
        for (p, r) in prompts.iter().zip(replies) {
            let mut toks = p.clone();
            toks.extend(r);
            let mut ws = vec![0f32; p.len()];
            ws.extend(vec![1f32; r.len()]);
            t.push(toks);
            w.push(ws);
        }
        Batch::from_token_rows(&t, &w, 0).unwrap()
    };
    (side(&chosen_replies), side(&rejected_replies))
}

const BETA: f64 = 0.5;

fn sums(model: &LoraModel, b: &Batch, adapters: Adapters) -> Vec<f64> {
    let out = model.logprobs(b, LossKind::CrossEntropy, adapters).unwrap();
    b.weighted_row_sums(&out.logprobs).unwrap()
}

fn dpo_pairs(model: &LoraModel, c: &Batch, r: &Batch) -> Vec<DpoPair> {
    let (pc, pr) = (sums(model, c, Adapters::On), sums(model, r, Adapters::On));
    let (rc, rr) = (sums(model, c, Adapters::Off), sums(model, r, Adapters::Off));
    (0..pc.len())
        .map(|i| DpoPair::new(BETA, pc[i], pr[i], rc[i], rr[i]))
        .collect()
}

fn mean_loss(model: &LoraModel, c: &Batch, r: &Batch) -> f64 {
    let p = dpo_pairs(model, c, r);
    p.iter().map(|p| p.loss).sum::<f64>() / p.len() as f64
}

/// The gradient of the mean pair loss through `linear`: advantage −∂loss/∂π / P on
/// every weighted token of each side.
fn dpo_grad(model: &LoraModel, c: &Batch, r: &Batch) -> Vec<f32> {
    let p = dpo_pairs(model, c, r);
    let n = p.len() as f64;
    let mut total: Option<Vec<f32>> = None;
    for (b, sign) in [(c, 1.0), (r, -1.0)] {
        let mut a = vec![0f32; b.rows() * b.seq()];
        for row in 0..b.rows() {
            for t in 0..b.lengths()[row] {
                a[row * b.seq() + t] = (-sign * p[row].d_chosen / n) as f32;
            }
        }
        let lin = b.clone().with_advantages(a).unwrap();
        let (_, g) = model.forward_backward(&lin, LossKind::Linear).unwrap();
        let g = g.to_flat().unwrap();
        total = Some(match total {
            None => g,
            Some(t) => t.iter().zip(&g).map(|(x, y)| x + y).collect(),
        });
    }
    total.unwrap()
}

#[test]
fn linear_loss_carries_the_dpo_gradient() {
    let model = trained_tiny();
    let (c, r) = pairs();
    let g = dpo_grad(&model, &c, &r);
    let base = model.params_flat().unwrap();
    let mut checked = 0;
    let mut offset = 0;
    for (key, shape) in model.param_layout().entries() {
        let n: usize = shape.iter().product();
        if key.contains("layers.0.self_attn.q_proj") || key.contains("lm_head") {
            let (i, gi) = g[offset..offset + n]
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                .unwrap();
            let eps = 1e-2f32;
            let at = |d: f32| {
                let mut p = base.clone();
                p[offset + i] += d;
                model.set_params_flat(&p).unwrap();
                mean_loss(&model, &c, &r)
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
            let rel = (fd - *gi as f64).abs() / (gi.abs() as f64);
            assert!(
                rel < 3e-2,
                "{key}[{i}]: analytic {gi} vs finite difference {fd}"
            );
            checked += 1;
        }
        offset += n;
    }
    model.set_params_flat(&base).unwrap();
    assert_eq!(checked, 4);
}

fn base_model() -> LoraModel {
    trained_tiny()
}

#[test]
fn a_dpo_step_raises_the_chosen_margin() {
    let model = trained_tiny();
    let (c, r) = pairs();
    let before = dpo_pairs(&model, &c, &r);
    let g = dpo_grad(&model, &c, &r);
    let norm = g.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt() as f32;
    let mut p = model.params_flat().unwrap();
    for (x, gi) in p.iter_mut().zip(&g) {
        *x -= 0.05 * gi / norm;
    }
    model.set_params_flat(&p).unwrap();
    let after = dpo_pairs(&model, &c, &r);
    let mean =
        |v: &[DpoPair], f: fn(&DpoPair) -> f64| v.iter().map(f).sum::<f64>() / v.len() as f64;
    assert!(
        mean(&after, DpoPair::margin) > mean(&before, DpoPair::margin),
        "margin {} -> {}",
        mean(&before, DpoPair::margin),
        mean(&after, DpoPair::margin)
    );
    assert!(mean(&after, |p| p.loss) < mean(&before, |p| p.loss));
    // The reference (adapter off) did not move; the policy did.
    let (r0, p0) = (
        sums(&base_model(), &c, Adapters::Off),
        sums(&base_model(), &c, Adapters::On),
    );
    assert_eq!(sums(&model, &c, Adapters::Off), r0);
    assert_ne!(sums(&model, &c, Adapters::On), p0);
}
