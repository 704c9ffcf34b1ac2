//! The head: lm_head (with its adapter) and the token loss, forward and backward by hand.
//!
//! Rows are processed in chunks so that at most one chunk of full-vocabulary logits exists
//! at a time. On the CPU in f32 the loss kernel works in place on the chunk: one pass finds
//! the max, one computes exp and its sum, and for rows that carry gradient the same buffer
//! becomes `dℓ/dlogp · (onehot − softmax)`; rows whose derivative is 0 (weight 0, padding)
//! are left out of the backward matmuls altogether. Other devices and dtypes compute the
//! same quantities with candle ops.

use std::sync::Mutex;

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Tensor, D};
use rayon::prelude::*;

use crate::error::Result;
use crate::lora::{Adapters, LoraLinear};
use crate::loss::{Batch, LossKind, LossOutput};
use crate::ops;

/// What the head computed.
pub(crate) struct HeadOutput {
    pub loss: LossOutput,
    /// ∂L/∂h `[N, hidden]` f32, when gradients were asked for.
    pub grad_h: Option<Tensor>,
    /// Gradients of lm_head's adapter (A, B), when it has one and gradients were asked for.
    pub lm_head_grads: Option<(Tensor, Tensor)>,
}

/// Per row of a chunk: (logp, loss term, dℓ/dlogp).
type RowOut = (f32, f64, f32);

/// The in-place loss kernel for one chunk of logits rows.
struct LossRows<'a> {
    targets: &'a [u32],
    weights: &'a [f32],
    /// Sampler logprobs and advantages of the chunk's rows (zeros when the batch has none).
    q: &'a [f32],
    a: &'a [f32],
    valid: &'a [bool],
    kind: LossKind,
    want_grad: bool,
    out: Mutex<Vec<RowOut>>,
}

impl InplaceOp1 for LossRows<'_> {
    fn name(&self) -> &'static str {
        "token-loss-rows"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (n, v) = layout.shape().dims2()?;
        if !layout.is_contiguous() {
            candle_core::bail!("token-loss-rows expects contiguous logits")
        }
        let off = layout.start_offset();
        let data = match storage {
            CpuStorage::F32(d) => &mut d[off..off + n * v],
            _ => candle_core::bail!("token-loss-rows expects f32 logits"),
        };
        let res: Vec<RowOut> = data
            .par_chunks_mut(v)
            .enumerate()
            .map(|(i, row)| {
                if !self.valid[i] {
                    return (0.0, 0.0, 0.0);
                }
                let tgt = self.targets[i] as usize;
                let m = ops::row_max(row);
                let xt = row[tgt];
                let sum = ops::exp_shift_sum(row, m);
                // log_softmax = x − max − log Σ exp(x − max), as PyTorch computes it.
                let logp = (xt - m) - sum.ln();
                let (term, coef) =
                    self.kind
                        .token_term(logp, self.weights[i], self.q[i], self.a[i]);
                if self.want_grad && coef != 0.0 {
                    // ∂ℓ/∂logits = coef · (onehot − softmax)
                    let s = -coef / sum;
                    row.iter_mut().for_each(|x| *x *= s);
                    row[tgt] += coef;
                }
                (logp, term, coef)
            })
            .collect();
        *self.out.lock().expect("row output poisoned") = res;
        Ok(())
    }
}

/// Rows per chunk: about 16 M logits (64 MiB of f32) at a time.
fn chunk_rows(vocab: usize, n: usize) -> usize {
    ((1usize << 24) / vocab.max(1)).clamp(1, n.max(1))
}

/// Runs the head on `h [N, hidden]` (detached) for `batch` (N = rows · seq).
pub(crate) fn run(
    h: &Tensor,
    lm_head: &LoraLinear,
    batch: &Batch,
    kind: LossKind,
    adapters: Adapters,
    want_grad: bool,
) -> Result<HeadOutput> {
    let (n, hidden) = h.dims2()?;
    let seq = batch.seq();
    batch.check_loss_inputs(kind)?;
    let valid: Vec<bool> = (0..n).map(|i| i % seq < batch.lengths()[i / seq]).collect();
    let no_rl;
    let (q_all, a_all) = match (batch.sampler_logprobs(), batch.advantages()) {
        (Some(q), Some(a)) => (q, a),
        _ => {
            no_rl = vec![0f32; n];
            (no_rl.as_slice(), no_rl.as_slice())
        }
    };
    let w = &lm_head.weight;
    let vocab = w.dim(0)?;
    let adapter = match adapters {
        Adapters::On => lm_head.adapter.as_ref(),
        Adapters::Off => None,
    };
    let h = h.contiguous()?;
    let fast = h.device().is_cpu() && h.dtype() == DType::F32 && !ops::force_generic();

    let mut logprobs = vec![0f32; n];
    let mut loss_sum = 0f64;
    let mut grad_h = if want_grad {
        vec![0f32; n * hidden]
    } else {
        Vec::new()
    };
    let mut d_a: Option<Tensor> = None;
    let mut d_b: Option<Tensor> = None;
    let step = chunk_rows(vocab, n);
    let mut r0 = 0;
    while r0 < n {
        let rows = step.min(n - r0);
        let hc = h.narrow(0, r0, rows)?;
        let mut logits = ops::matmul_wt(&hc, w)?;
        let mut ha = None;
        if let Some(ad) = adapter {
            let hcf = hc.to_dtype(DType::F32)?;
            let x = hcf.matmul(&ad.a.as_tensor().t()?)?;
            let delta = (x.matmul(&ad.b.as_tensor().t()?)? * ad.scale)?;
            let dt = logits.dtype();
            logits = (logits + delta.to_dtype(dt)?)?;
            ha = Some((hcf, x));
        }
        let logits = logits.to_dtype(DType::F32)?.contiguous()?;
        let (tg, wt, vd) = (
            &batch.target_ids()[r0..r0 + rows],
            &batch.weights()[r0..r0 + rows],
            &valid[r0..r0 + rows],
        );
        let (qc, ac) = (&q_all[r0..r0 + rows], &a_all[r0..r0 + rows]);
        let (rows_out, g) = if fast {
            let op = LossRows {
                targets: tg,
                weights: wt,
                q: qc,
                a: ac,
                valid: vd,
                kind,
                want_grad,
                out: Mutex::new(Vec::new()),
            };
            logits.inplace_op1(&op)?;
            (op.out.into_inner().expect("row output poisoned"), logits)
        } else {
            generic_rows(&logits, tg, wt, qc, ac, vd, kind, want_grad)?
        };
        for (i, &(lp, term, _)) in rows_out.iter().enumerate() {
            logprobs[r0 + i] = lp;
            loss_sum += term;
        }
        if want_grad {
            let live: Vec<u32> = rows_out
                .iter()
                .enumerate()
                .filter(|(_, r)| r.2 != 0.0)
                .map(|(i, _)| i as u32)
                .collect();
            if !live.is_empty() {
                let (g, hsel, xsel) = if live.len() == rows {
                    (
                        g,
                        ha.as_ref().map(|p| p.0.clone()),
                        ha.as_ref().map(|p| p.1.clone()),
                    )
                } else {
                    let idx = Tensor::from_slice(&live, live.len(), g.device())?;
                    (
                        g.index_select(&idx, 0)?,
                        ha.as_ref().map(|p| p.0.index_select(&idx, 0)).transpose()?,
                        ha.as_ref().map(|p| p.1.index_select(&idx, 0)).transpose()?,
                    )
                };
                // The weight stays in its dtype: converting a bf16 lm_head to f32 per
                // chunk would cost more than the matmul (ops::matmul_w: f32 result).
                let mut gh = ops::matmul_w(&g, w)?.to_dtype(DType::F32)?;
                if let (Some(ad), Some(hs), Some(xs)) = (adapter, hsel, xsel) {
                    let (a, b) = (ad.a.as_tensor(), ad.b.as_tensor());
                    // logits += s · (h Aᵀ) Bᵀ:
                    //   ∂B = s · Gᵀ (h Aᵀ),  u = G B,  ∂A = s · uᵀ h,  ∂h += s · u A.
                    let db = (g.t()?.matmul(&xs)? * ad.scale)?;
                    let u = g.matmul(b)?;
                    let da = (u.t()?.matmul(&hs)? * ad.scale)?;
                    gh = (gh + (u.matmul(a)? * ad.scale)?)?;
                    d_a = Some(match d_a {
                        Some(acc) => (acc + da)?,
                        None => da,
                    });
                    d_b = Some(match d_b {
                        Some(acc) => (acc + db)?,
                        None => db,
                    });
                }
                let gh = gh.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                for (row, &i) in gh.iter().zip(&live) {
                    let at = (r0 + i as usize) * hidden;
                    grad_h[at..at + hidden].copy_from_slice(row);
                }
            }
        }
        r0 += rows;
    }

    let lm_head_grads = match (want_grad, adapter) {
        (true, Some(ad)) => Some((
            d_a.map_or_else(|| ad.a.as_tensor().zeros_like(), Ok)?,
            d_b.map_or_else(|| ad.b.as_tensor().zeros_like(), Ok)?,
        )),
        _ => None,
    };
    let grad_h = if want_grad {
        Some(Tensor::from_vec(grad_h, (n, hidden), h.device())?)
    } else {
        None
    };
    let loss = LossOutput {
        kind,
        loss_sum,
        weight_sum: batch.weight_sum(),
        tokens: batch.tokens(),
        logprobs,
    };
    Ok(HeadOutput {
        loss,
        grad_h,
        lm_head_grads,
    })
}

/// The same as [`LossRows`] with candle ops, for devices without the CPU kernel.
#[allow(clippy::too_many_arguments)]
fn generic_rows(
    logits: &Tensor,
    targets: &[u32],
    weights: &[f32],
    q: &[f32],
    a: &[f32],
    valid: &[bool],
    kind: LossKind,
    want_grad: bool,
) -> Result<(Vec<RowOut>, Tensor)> {
    let dev = logits.device();
    let (n, v) = logits.dims2()?;
    let m = logits.max_keepdim(D::Minus1)?;
    let e = logits.broadcast_sub(&m)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    let idx = Tensor::from_slice(targets, (n, 1), dev)?;
    let xt = logits.gather(&idx, D::Minus1)?;
    let logp = ((xt - &m)? - sum.log()?)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(n);
    let mut coefs = Vec::with_capacity(n);
    for i in 0..n {
        if !valid[i] {
            out.push((0.0, 0.0, 0.0));
            coefs.push(0f32);
            continue;
        }
        let (term, coef) = kind.token_term(logp[i], weights[i], q[i], a[i]);
        out.push((logp[i], term, coef));
        coefs.push(coef);
    }
    if !want_grad {
        return Ok((out, logits.clone()));
    }
    let c = Tensor::from_vec(coefs, (n, 1), dev)?;
    let onehot = Tensor::zeros((n, v), DType::F32, dev)?.scatter_add(
        &idx,
        &Tensor::ones((n, 1), DType::F32, dev)?,
        D::Minus1,
    )?;
    let g = (onehot - e.broadcast_div(&sum)?)?.broadcast_mul(&c)?;
    Ok((out, g))
}
