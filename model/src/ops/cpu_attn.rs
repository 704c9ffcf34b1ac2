//! The whole attention between the projections on the CPU, as one op: q `[b·t, heads·d]`,
//! k and v `[b·t, kv·d]` → `[b·t, heads·d]`, with RoPE and the head layouts inside.
//!
//! Why one op: composed from candle ops, attention is a dozen autograd nodes per layer
//! (layout copies, RoPE, probabilities, `P·V`, the copy back), each with its own output
//! and gradient buffers, and every score matrix is computed in full although causal
//! attention needs only its lower triangle. Here each (batch row, kv head) is one task:
//! the query heads that share the kv head, row blocks of [`BLOCK`] positions, and for each
//! block only the key columns it can see — `(1 + 2 + … + n)/n²` of the full products, 62%
//! at four blocks. Autograd keeps the inputs; the op keeps the RoPE'd q and k. The
//! probabilities exist one block at a time and the backward recomputes them (one more GEMM
//! per block), so nothing `T × T` outlives a layer: at T = 2048 the composition kept 150 MB
//! of probabilities per SmolLM layer.

use std::sync::Mutex;

use super::*;

/// Query positions per row block.
const BLOCK: usize = 64;

/// Where the forward keeps what the backward needs: per task (batch row, kv head), the
/// RoPE'd queries `[rep·t, d]` (head-major) and keys `[t, d]`.
struct Saved {
    q: Vec<f32>,
    k: Vec<f32>,
}

pub(super) struct CpuAttnBlock {
    /// `[t, d/2]` f32.
    cos: Tensor,
    /// `[t, d/2]` f32.
    sin: Tensor,
    /// Batch rows, positions, query heads, kv heads, head dim.
    dims: (usize, usize, usize, usize, usize),
    scale: f32,
    mask: AttnMask,
    saved: Mutex<Option<Saved>>,
}

/// One row of `x` rotated by RoPE at position `p` (or by −θ with `sign = −1`, the backward).
#[inline]
fn rope_row(src: &[f32], dst: &mut [f32], cos: &[f32], sin: &[f32], sign: f32) {
    let half = src.len() / 2;
    let (x1, x2) = src.split_at(half);
    let (y1, y2) = dst.split_at_mut(half);
    for i in 0..half {
        let s = sign * sin[i];
        y1[i] = x1[i] * cos[i] - x2[i] * s;
        y2[i] = x2[i] * cos[i] + x1[i] * s;
    }
}

/// Per-task blocks (task = (batch row, kv head), then `rep` heads of `[t, d]`) back in the
/// projections' row layout `[b·t, kv·rep·d]` (`rep = 1` for keys and values).
fn to_rows(src: &[f32], (b, t, kv, rep, d): (usize, usize, usize, usize, usize)) -> Vec<f32> {
    let width = kv * rep * d;
    let mut out = vec![0f32; b * t * width];
    out.par_chunks_mut(width).enumerate().for_each(|(row, o)| {
        let (bi, i) = (row / t, row % t);
        for head in 0..kv * rep {
            let at = ((bi * kv + head / rep) * rep + head % rep) * t * d + i * d;
            o[head * d..][..d].copy_from_slice(&src[at..][..d]);
        }
    });
    out
}

/// The key columns `[c0, c1)` that query rows `[i0, i1)` can see (causal, sliding window).
fn cols(mask: &AttnMask, i0: usize, i1: usize) -> (usize, usize) {
    (mask.window.map_or(0, |w| (i0 + 1).saturating_sub(w)), i1)
}

impl CpuAttnBlock {
    pub(super) fn new(
        (cos, sin): (&Tensor, &Tensor),
        dims: (usize, usize, usize, usize, usize),
        scale: f64,
        mask: &AttnMask,
    ) -> Self {
        CpuAttnBlock {
            cos: cos.clone(),
            sin: sin.clone(),
            dims,
            scale: scale as f32,
            mask: mask.clone(),
            saved: Mutex::new(None),
        }
    }

    /// The probabilities of query rows `[i0, i1)` of head `h` in task row `bi` into `pb`
    /// (`[i1 − i0, t]`): the scores of the key columns `[c0, c1)` they can see, then each
    /// row's softmax, which zeroes every other column. Returns `(c0, c1)`.
    fn probs(
        &self,
        qg: &[f32],
        kg: &[f32],
        pb: &mut [f32],
        (bi, h): (usize, usize),
        (i0, i1): (usize, usize),
    ) -> (usize, usize) {
        let (_, t, _, _, d) = self.dims;
        let (c0, c1) = cols(&self.mask, i0, i1);
        sgemm_with(
            (i1 - i0, c1 - c0, d),
            (&mut pb[c0..], t),
            false,
            (&qg[(h * t + i0) * d..], d, 1),
            (&kg[c0 * d..], 1, d),
            1.0,
            gemm::Parallelism::None,
        );
        for (r, row) in pb.chunks_exact_mut(t).take(i1 - i0).enumerate() {
            softmax_row_inplace(row, self.scale, &self.mask, bi, i0 + r);
        }
        (c0, c1)
    }

    /// The forward: the output `[b·t, heads·d]` and what the backward needs.
    fn run(&self, q: &[f32], k: &[f32], v: &[f32]) -> candle_core::Result<(Vec<f32>, Saved)> {
        let (b, t, heads, kv, d) = self.dims;
        let rep = heads / kv;
        let half = d / 2;
        let tasks = b * kv;
        let mut sq = vec![0f32; tasks * rep * t * d];
        let mut sk = vec![0f32; tasks * t * d];
        // Per task, the heads' outputs `[rep·t, d]`; scattered into the layout at the end.
        let mut og = vec![0f32; tasks * rep * t * d];
        with_cpu_f32(&self.cos, |cos| {
            with_cpu_f32(&self.sin, |sin| {
                sq.par_chunks_mut(rep * t * d)
                    .zip(sk.par_chunks_mut(t * d))
                    .zip(og.par_chunks_mut(rep * t * d))
                    .enumerate()
                    .for_each(|(task, ((qg, kg), og))| {
                        let (bi, g) = (task / kv, task % kv);
                        let mut vg = vec![0f32; t * d];
                        for i in 0..t {
                            let (c, s) = (&cos[i * half..][..half], &sin[i * half..][..half]);
                            let row = (bi * t + i) * kv * d + g * d;
                            rope_row(&k[row..][..d], &mut kg[i * d..][..d], c, s, 1.0);
                            vg[i * d..][..d].copy_from_slice(&v[row..][..d]);
                            for h in 0..rep {
                                let src = (bi * t + i) * heads * d + (g * rep + h) * d;
                                let dst = (h * t + i) * d;
                                rope_row(&q[src..][..d], &mut qg[dst..][..d], c, s, 1.0);
                            }
                        }
                        let mut pb = vec![0f32; BLOCK.min(t) * t];
                        for h in 0..rep {
                            for i0 in (0..t).step_by(BLOCK) {
                                let i1 = (i0 + BLOCK).min(t);
                                let (c0, c1) = self.probs(qg, kg, &mut pb, (bi, h), (i0, i1));
                                sgemm_with(
                                    (i1 - i0, d, c1 - c0),
                                    (&mut og[(h * t + i0) * d..], d),
                                    false,
                                    (&pb[c0..], t, 1),
                                    (&vg[c0 * d..], d, 1),
                                    1.0,
                                    gemm::Parallelism::None,
                                );
                            }
                        }
                    });
                Ok(())
            })
        })?;
        Ok((to_rows(&og, (b, t, kv, rep, d)), Saved { q: sq, k: sk }))
    }
}

impl CustomOp3 for CpuAttnBlock {
    fn name(&self) -> &'static str {
        "attention-block-cpu"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, t, heads, kv, d) = self.dims;
        if lq.dims() != [b * t, heads * d]
            || lk.dims() != [b * t, kv * d]
            || lv.dims() != [b * t, kv * d]
        {
            bail!(
                "attention-block: q {:?}, k {:?}, v {:?} do not fit b={b} t={t} heads={heads} kv={kv} d={d}",
                lq.dims(),
                lk.dims(),
                lv.dims()
            )
        }
        let (out, saved) = self.run(slice(sq, lq)?, slice(sk, lk)?, slice(sv, lv)?)?;
        *self.saved.lock().expect("attention-block cache poisoned") = Some(saved);
        Ok((CpuStorage::F32(out), Shape::from((b * t, heads * d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _p = crate::prof::op("attention (bwd)", grad);
        let (b, t, heads, kv, d) = self.dims;
        let rep = heads / kv;
        let half = d / 2;
        let tasks = b * kv;
        let g = grad.contiguous()?;
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let (gs, gl) = g.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (Storage::Cpu(gs), Storage::Cpu(vs)) = (&*gs, &*vs) else {
            bail!("attention-block: backward expects CPU tensors")
        };
        let (dout, vv) = (slice(gs, gl)?, slice(vs, vl)?);
        let saved = self
            .saved
            .lock()
            .expect("attention-block cache poisoned")
            .take();
        let saved = match saved {
            Some(s) => s,
            None => {
                // A second backward through the same graph: recompute the forward.
                let (qs, ql) = q.storage_and_layout();
                let (ks, kl) = k.storage_and_layout();
                let (Storage::Cpu(qs), Storage::Cpu(ks)) = (&*qs, &*ks) else {
                    bail!("attention-block: backward expects CPU tensors")
                };
                self.run(slice(qs, ql)?, slice(ks, kl)?, vv)?.1
            }
        };
        let mut dqg = vec![0f32; tasks * rep * t * d];
        let mut dkg = vec![0f32; tasks * t * d];
        let mut dvg = vec![0f32; tasks * t * d];
        with_cpu_f32(&self.cos, |cos| {
            with_cpu_f32(&self.sin, |sin| {
                dqg.par_chunks_mut(rep * t * d)
                    .zip(dkg.par_chunks_mut(t * d))
                    .zip(dvg.par_chunks_mut(t * d))
                    .enumerate()
                    .for_each(|(task, ((dq, dk), dv))| {
                        let (bi, g) = (task / kv, task % kv);
                        let qg = &saved.q[task * rep * t * d..][..rep * t * d];
                        let kg = &saved.k[task * t * d..][..t * d];
                        let mut vg = vec![0f32; t * d];
                        let mut dog = vec![0f32; rep * t * d];
                        for i in 0..t {
                            let row = (bi * t + i) * kv * d + g * d;
                            vg[i * d..][..d].copy_from_slice(&vv[row..][..d]);
                            for h in 0..rep {
                                let src = (bi * t + i) * heads * d + (g * rep + h) * d;
                                dog[(h * t + i) * d..][..d].copy_from_slice(&dout[src..][..d]);
                            }
                        }
                        // Rotated-space gradients of the keys, accumulated over the heads.
                        let mut dkr = vec![0f32; t * d];
                        let mut ds = vec![0f32; BLOCK.min(t) * t];
                        let mut pb = vec![0f32; BLOCK.min(t) * t];
                        for h in 0..rep {
                            for i0 in (0..t).step_by(BLOCK) {
                                let i1 = (i0 + BLOCK).min(t);
                                let (c0, c1) = self.probs(qg, kg, &mut pb, (bi, h), (i0, i1));
                                let (rows, width) = (i1 - i0, c1 - c0);
                                let r0 = h * t + i0;
                                // dP = dO·Vᵀ on the visible block.
                                sgemm_with(
                                    (rows, width, d),
                                    (&mut ds, width),
                                    false,
                                    (&dog[r0 * d..], d, 1),
                                    (&vg[c0 * d..], 1, d),
                                    1.0,
                                    gemm::Parallelism::None,
                                );
                                // dS = scale · P ⊙ (dP − Σ P ⊙ dP), row by row.
                                for r in 0..rows {
                                    let pr = &pb[r * t + c0..][..width];
                                    let dr = &mut ds[r * width..][..width];
                                    let dot: f32 =
                                        pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                                    for (o, &pv) in dr.iter_mut().zip(pr) {
                                        *o = self.scale * pv * (*o - dot);
                                    }
                                }
                                // dq = dS·k; dk += dSᵀ·q; dv += Pᵀ·dO.
                                sgemm_with(
                                    (rows, d, width),
                                    (&mut dq[r0 * d..], d),
                                    false,
                                    (&ds, width, 1),
                                    (&kg[c0 * d..], d, 1),
                                    1.0,
                                    gemm::Parallelism::None,
                                );
                                sgemm_with(
                                    (width, d, rows),
                                    (&mut dkr[c0 * d..], d),
                                    true,
                                    (&ds, 1, width),
                                    (&qg[r0 * d..], d, 1),
                                    1.0,
                                    gemm::Parallelism::None,
                                );
                                sgemm_with(
                                    (width, d, rows),
                                    (&mut dv[c0 * d..], d),
                                    true,
                                    (&pb[c0..], 1, t),
                                    (&dog[r0 * d..], d, 1),
                                    1.0,
                                    gemm::Parallelism::None,
                                );
                            }
                        }
                        // Back through RoPE: rotate by −θ.
                        let mut tmp = vec![0f32; d];
                        for i in 0..t {
                            let (c, s) = (&cos[i * half..][..half], &sin[i * half..][..half]);
                            rope_row(&dkr[i * d..][..d], &mut dk[i * d..][..d], c, s, -1.0);
                            for h in 0..rep {
                                let row = &mut dq[(h * t + i) * d..][..d];
                                rope_row(row, &mut tmp, c, s, -1.0);
                                row.copy_from_slice(&tmp);
                            }
                        }
                    });
                Ok(())
            })
        })?;
        // The per-task gradients in the projections' layouts.
        let dq = to_rows(&dqg, (b, t, kv, rep, d));
        let (dk, dv) = (
            to_rows(&dkg, (b, t, kv, 1, d)),
            to_rows(&dvg, (b, t, kv, 1, d)),
        );
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (b * t, heads * d), dev)?),
            Some(Tensor::from_vec(dk, (b * t, kv * d), dev)?),
            Some(Tensor::from_vec(dv, (b * t, kv * d), dev)?),
        ))
    }
}
