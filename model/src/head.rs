//! The head: lm_head (with its adapter) and the token loss, forward and backward by hand.
//!
//! Rows are processed in chunks so that at most one chunk of full-vocabulary logits exists
//! at a time. On the CPU in f32 the loss kernel works in place on the chunk: one pass finds
//! the max, one computes exp and its sum, and for rows that carry gradient the same buffer
//! becomes `dℓ/dlogp · (onehot − softmax)`; rows whose derivative is 0 (weight 0, padding)
//! are left out of the backward matmuls altogether. Other devices and dtypes compute the
//! same quantities with candle ops.

use std::sync::Mutex;

use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor, D};
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

/// Logits per chunk on `dev`: about 16 M (64 MiB of f32) on the CPU, whose kernel works
/// in cache-sized pieces; about 128 M (512 MiB of f32) elsewhere, where each chunk costs
/// kernel launches and host round trips (at vocab 151936, 2^24 logits is 110 rows: ~38
/// chunks for a 4x1024 batch).
fn chunk_logits(dev: &Device) -> usize {
    if dev.is_cpu() {
        1 << 24
    } else {
        1 << 27
    }
}

/// Rows per chunk: about `logits` logits at a time.
fn chunk_rows(vocab: usize, n: usize, logits: usize) -> usize {
    (logits / vocab.max(1)).clamp(1, n.max(1))
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
    run_chunked(
        h,
        lm_head,
        batch,
        kind,
        adapters,
        want_grad,
        chunk_logits(h.device()),
    )
}

/// [`run`] with about `logits_per_chunk` logits per chunk (tests force small chunks).
fn run_chunked(
    h: &Tensor,
    lm_head: &LoraLinear,
    batch: &Batch,
    kind: LossKind,
    adapters: Adapters,
    want_grad: bool,
    logits_per_chunk: usize,
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
    // ∂L/∂h: the CPU kernel writes rows into a host buffer; other paths keep one
    // `[rows, hidden]` tensor per chunk on the device and concatenate them at the end
    // (no device → host → device round trip).
    let mut grad_h = if want_grad && fast {
        vec![0f32; n * hidden]
    } else {
        Vec::new()
    };
    let mut grad_parts: Vec<Tensor> = Vec::new();
    let mut d_a: Option<Tensor> = None;
    let mut d_b: Option<Tensor> = None;
    let step = chunk_rows(vocab, n, logits_per_chunk);
    let mut r0 = 0;
    while r0 < n {
        let rows = step.min(n - r0);
        let hc = h.narrow(0, r0, rows)?;
        let mut logits = {
            let _p = crate::prof::op("head logits", &hc);
            ops::matmul_wt(&hc, w)?
        };
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
        let loss_span = crate::prof::op("head loss", &logits);
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
        } else if cuda_head(&logits) {
            #[cfg(feature = "cuda")]
            {
                // A bf16 lm_head without an adapter needs the gradient only as the bf16
                // operand of ∂L/∂h's GEMM: the kernel writes that directly (the same values
                // as the f32 gradient cast to bf16), saving an f32 write and the cast's
                // read of every logit.
                let grad_half = adapter.is_none() && w.dtype() == DType::BF16;
                cuda_rows::rows(&logits, tg, wt, qc, ac, vd, kind, want_grad, grad_half)?
            }
            #[cfg(not(feature = "cuda"))]
            unreachable!("cuda_head is false without the cuda feature")
        } else {
            generic_rows(&logits, tg, wt, qc, ac, vd, kind, want_grad)?
        };
        drop(loss_span);
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
            if live.is_empty() {
                if !fast {
                    grad_parts.push(Tensor::zeros((rows, hidden), DType::F32, h.device())?);
                }
            } else {
                let mut live_idx = None;
                let (g, hsel, xsel) = if live.len() == rows {
                    (
                        g,
                        ha.as_ref().map(|p| p.0.clone()),
                        ha.as_ref().map(|p| p.1.clone()),
                    )
                } else {
                    let idx = Tensor::from_slice(&live, live.len(), g.device())?;
                    let idx = live_idx.insert(idx);
                    (
                        g.index_select(idx, 0)?,
                        ha.as_ref().map(|p| p.0.index_select(idx, 0)).transpose()?,
                        ha.as_ref().map(|p| p.1.index_select(idx, 0)).transpose()?,
                    )
                };
                // The weight stays in its dtype: converting a bf16 lm_head to f32 per
                // chunk would cost more than the matmul (ops::matmul_w: f32 result).
                let mut gh = {
                    let _p = crate::prof::op("head dh", &g);
                    ops::matmul_w(&g, w)?.to_dtype(DType::F32)?
                };
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
                if fast {
                    let gh = gh.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                    for (row, &i) in gh.iter().zip(&live) {
                        let at = (r0 + i as usize) * hidden;
                        grad_h[at..at + hidden].copy_from_slice(row);
                    }
                } else {
                    let gh = gh.to_dtype(DType::F32)?;
                    grad_parts.push(match &live_idx {
                        // Rows outside `live` carry no gradient: zeros.
                        Some(idx) => Tensor::zeros((rows, hidden), DType::F32, h.device())?
                            .index_add(idx, &gh, 0)?,
                        None => gh,
                    });
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
    let grad_h = match (want_grad, fast, grad_parts.is_empty()) {
        (false, _, _) => None,
        (true, true, _) => Some(Tensor::from_vec(grad_h, (n, hidden), h.device())?),
        (true, false, true) => Some(Tensor::zeros((n, hidden), DType::F32, h.device())?),
        (true, false, false) => Some(Tensor::cat(&grad_parts, 0)?),
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

/// Whether the loss rows run as the CUDA kernels ([`crate::cuda`], family `head`).
fn cuda_head(logits: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        logits.device().is_cuda()
            && logits.dtype() == DType::F32
            && !ops::force_generic()
            && crate::cuda::enabled("head")
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = logits;
        false
    }
}

#[cfg(feature = "cuda")]
mod cuda_rows {
    //! [`LossRows`](super::LossRows) on the GPU: one kernel for each row's log p(target) and
    //! log-sum-exp, the loss terms on the host (they are per row), one kernel that turns
    //! the logits into their gradient in place — two passes over the chunk's logits.
    use super::*;
    use candle_core::{CpuStorage, CudaStorage, CustomOp2, CustomOp3, InplaceOp3, Shape};

    struct Stats;

    impl CustomOp2 for Stats {
        fn name(&self) -> &'static str {
            "token-loss-stats"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("token-loss-stats: GPU only")
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let rows = l1.dims()[0];
            let out = crate::cuda::ce_row_stats((s1, l1), (s2, l2))?;
            Ok((out, Shape::from((rows, 2))))
        }
    }

    /// [`Grad`] into a new bf16 tensor (see `ce_row_grad_bf16`).
    struct GradBf16;

    impl CustomOp3 for GradBf16 {
        fn name(&self) -> &'static str {
            "token-loss-grad-bf16"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("token-loss-grad-bf16: GPU only")
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
            s3: &CudaStorage,
            l3: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let g = crate::cuda::ce_row_grad_bf16((s1, l1), (s2, l2), (s3, l3))?;
            Ok((g, l1.shape().clone()))
        }
    }

    struct Grad;

    impl InplaceOp3 for Grad {
        fn name(&self) -> &'static str {
            "token-loss-grad"
        }

        fn cpu_fwd(
            &self,
            _: &mut CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<()> {
            candle_core::bail!("token-loss-grad: GPU only")
        }

        fn cuda_fwd(
            &self,
            s1: &mut CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
            s3: &CudaStorage,
            l3: &Layout,
        ) -> candle_core::Result<()> {
            crate::cuda::ce_row_grad((s1, l1), (s2, l2), (s3, l3))
        }
    }

    /// The rows' outputs and, with `want_grad`, the logits' gradient: in place in `logits`
    /// (f32), or with `grad_bf16` as a new bf16 tensor, `logits` untouched.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rows(
        logits: &Tensor,
        targets: &[u32],
        weights: &[f32],
        q: &[f32],
        a: &[f32],
        valid: &[bool],
        kind: LossKind,
        want_grad: bool,
        grad_bf16: bool,
    ) -> Result<(Vec<RowOut>, Tensor)> {
        let dev = logits.device();
        let n = logits.dim(0)?;
        let tgt = Tensor::from_slice(targets, n, dev)?;
        let stats = logits.apply_op2_no_bwd(&tgt, &Stats)?.to_vec2::<f32>()?;
        let mut out = Vec::with_capacity(n);
        let mut lc = Vec::with_capacity(2 * n);
        for i in 0..n {
            let (logp, lse) = (stats[i][0], stats[i][1]);
            if !valid[i] {
                out.push((0.0, 0.0, 0.0));
                lc.extend([lse, 0.0]);
                continue;
            }
            let (term, coef) = kind.token_term(logp, weights[i], q[i], a[i]);
            out.push((logp, term, coef));
            lc.extend([lse, coef]);
        }
        if want_grad {
            let lc = Tensor::from_vec(lc, (n, 2), dev)?;
            if grad_bf16 {
                return Ok((out, logits.apply_op3_no_bwd(&tgt, &lc, &GradBf16)?));
            }
            logits.inplace_op3(&tgt, &lc, &Grad)?;
        }
        Ok((out, logits.clone()))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::{LoraAdapter, LoraConfig};

    fn randn(shape: (usize, usize), seed: u64) -> Tensor {
        // A small LCG: deterministic values in [-1, 1).
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
        d.max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// The generic head (what CUDA runs) split into many chunks, some with no live rows and
    /// some partly live, gives the CPU kernel's loss, logprobs, ∂h and lm_head adapter
    /// gradients.
    #[test]
    fn generic_head_in_many_chunks_matches_the_cpu_kernel() {
        let (vocab, hidden, rows, seq) = (1000, 16, 3, 8);
        let n = rows * seq;
        let cfg = LoraConfig::from_names(4, 8.0, &["lm_head"]).unwrap();
        let ad = LoraAdapter::init("lm_head".into(), hidden, vocab, &cfg, 7, &Device::Cpu).unwrap();
        ad.b.set(&(randn((vocab, 4), 3) * 0.1).unwrap()).unwrap();
        let lm_head = LoraLinear {
            weight: randn((vocab, hidden), 1),
            bias: None,
            adapter: Some(ad),
        };
        let h = randn((n, hidden), 2);
        let targets: Vec<u32> = (0..n).map(|i| ((i * 37 + 11) % vocab) as u32).collect();
        // Row 1 is short (padding after 2 positions), row 2 has a few weight-0 positions.
        let lengths = vec![seq, 2, seq];
        let weights: Vec<f32> = (0..n)
            .map(|i| {
                let (b, t) = (i / seq, i % seq);
                if t >= lengths[b] || (b == 2 && t % 3 == 0) {
                    0.0
                } else {
                    0.5 + t as f32 / 8.0
                }
            })
            .collect();
        let batch = Batch::new(rows, seq, targets.clone(), targets, weights, lengths).unwrap();
        let kind = LossKind::CrossEntropy;

        let fast = run(&h, &lm_head, &batch, kind, Adapters::On, true).unwrap();
        ops::set_force_generic(true);
        // 3 rows per chunk: 8 chunks, two without gradient, several partly live.
        let slow = run_chunked(&h, &lm_head, &batch, kind, Adapters::On, true, 3 * vocab);
        ops::set_force_generic(false);
        let slow = slow.unwrap();

        let rel = (fast.loss.loss_sum - slow.loss.loss_sum).abs() / fast.loss.loss_sum.abs();
        assert!(
            rel < 1e-5,
            "{} vs {}",
            fast.loss.loss_sum,
            slow.loss.loss_sum
        );
        for (a, b) in fast.loss.logprobs.iter().zip(&slow.loss.logprobs) {
            assert!((a - b).abs() < 1e-5, "logp {a} vs {b}");
        }
        let (gf, gs) = (fast.grad_h.unwrap(), slow.grad_h.unwrap());
        assert_eq!(gs.dims(), &[n, hidden]);
        assert!(max_abs_diff(&gf, &gs) < 1e-5);
        // Padding rows carry no gradient.
        let pad = gs.narrow(0, seq + 2, seq - 2).unwrap();
        assert_eq!(
            pad.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        assert!(
            gs.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
        let ((fa, fb), (sa, sb)) = (fast.lm_head_grads.unwrap(), slow.lm_head_grads.unwrap());
        assert!(max_abs_diff(&fa, &sa) < 1e-5);
        assert!(max_abs_diff(&fb, &sb) < 1e-5);
        assert!(
            fb.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );

        // Without gradients: the same loss, no ∂h.
        ops::set_force_generic(true);
        let nog = run_chunked(&h, &lm_head, &batch, kind, Adapters::On, false, 3 * vocab);
        ops::set_force_generic(false);
        let nog = nog.unwrap();
        assert!(nog.grad_h.is_none() && nog.lm_head_grads.is_none());
        assert!((nog.loss.loss_sum - slow.loss.loss_sum).abs() < 1e-9);
    }

    #[test]
    fn chunks_are_large_off_the_cpu() {
        assert_eq!(chunk_logits(&Device::Cpu), 1 << 24);
        assert_eq!(chunk_rows(151_936, 4096, 1 << 24), 110);
        assert_eq!(chunk_rows(151_936, 4096, 1 << 27), 883);
        assert_eq!(chunk_rows(10, 5, 1 << 27), 5);
    }
}
