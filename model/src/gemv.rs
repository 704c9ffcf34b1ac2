//! Linear layers for a handful of rows (incremental decoding): `y = x·Wᵀ (+ b)
//! + scale·(x·Aᵀ)·Bᵀ` computed straight from the row-major weights.
//!
//! Why not the training path: a GEMM library packs its operands into blocks before
//! multiplying, which pays off for thousands of rows but, with 8 rows, costs more than the
//! multiply itself (packing the 32000×256 lm_head every step was ~60% of decode time).
//! Here every weight row is read once and dotted with all the input rows while it is in
//! cache, split over threads by output. Only CPU f32; everything else, and more rows than
//! [`MAX_ROWS`], goes through [`LoraLinear::forward`].

use candle_core::{CpuStorage, Storage, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::lora::{Adapters, LoraLinear};

/// Above this many rows the GEMM path is faster.
pub(crate) const MAX_ROWS: usize = 32;

/// Runs `f` on the contiguous f32 data of a CPU tensor, or returns `None`.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(CpuStorage::F32(v)) => {
            let (a, b) = l.contiguous_offsets()?;
            Some(f(&v[a..b]))
        }
        _ => None,
    }
}

/// `x [m, k] · w[n, k]ᵀ` → `[m, n]`, all row-major.
fn xwt(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    // yᵀ [n, m]: one block of weight rows per task, each row against every input row.
    let mut yt = vec![0f32; n * m];
    let block = 64;
    yt.par_chunks_mut(block * m)
        .zip(w.par_chunks(block * k))
        .for_each(|(out, wb)| block_dots(x, wb, m, k, out));
    let mut y = vec![0f32; m * n];
    for (j, col) in yt.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            y[i * n + j] = v;
        }
    }
    y
}

/// `out[j·m + i] = x_i · w_j` for the weight rows of one block.
#[inline(always)]
fn block_dots_body(x: &[f32], wb: &[f32], m: usize, k: usize, out: &mut [f32]) {
    for (wj, o) in wb.chunks_exact(k).zip(out.chunks_exact_mut(m)) {
        for (xi, oi) in x.chunks_exact(k).zip(o.iter_mut()) {
            *oi = dot(xi, wj);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_dots_avx2(x: &[f32], wb: &[f32], m: usize, k: usize, out: &mut [f32]) {
    block_dots_body(x, wb, m, k, out)
}

fn block_dots(x: &[f32], wb: &[f32], m: usize, k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features the function was compiled for.
            return unsafe { block_dots_avx2(x, wb, m, k, out) };
        }
    }
    block_dots_body(x, wb, m, k, out)
}

/// A dot product with 16 independent lanes, so it vectorises.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (mut ac, mut bc) = (a.chunks_exact(16), b.chunks_exact(16));
    for (x, y) in (&mut ac).zip(&mut bc) {
        for ((s, p), q) in acc.iter_mut().zip(x).zip(y) {
            // One fused multiply-add where the CPU has FMA (the AVX2 build does).
            *s = p.mul_add(*q, *s);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (p, q) in ac.remainder().iter().zip(bc.remainder()) {
        s += p * q;
    }
    s
}

/// [`LoraLinear::forward`] (no dropout) for `x [m, in]` with few rows; falls back to it
/// where this path does not apply.
pub(crate) fn linear(l: &LoraLinear, x: &Tensor, adapters: Adapters) -> Result<Tensor> {
    let dims = x.dims();
    let k = *dims.last().unwrap_or(&0);
    let m = x.elem_count().checked_div(k).unwrap_or(0);
    if m == 0 || m > MAX_ROWS || crate::ops::force_generic() {
        return l.forward(x, adapters, None);
    }
    let x = x.contiguous()?;
    let n = l.weight.dim(0)?;
    let Some(mut y) = with_f32(&x, |xs| with_f32(&l.weight, |w| xwt(xs, w, m, n, k))).flatten()
    else {
        return l.forward(&x, adapters, None);
    };
    if let Some(b) = &l.bias {
        let ok = with_f32(b, |bv| {
            for row in y.chunks_exact_mut(n) {
                for (v, bb) in row.iter_mut().zip(bv) {
                    *v += bb;
                }
            }
        });
        if ok.is_none() {
            return l.forward(&x, adapters, None);
        }
    }
    if let (Some(ad), Adapters::On) = (&l.adapter, adapters) {
        let (a, b) = (ad.a.as_tensor(), ad.b.as_tensor());
        let r = a.dim(0)?;
        let delta = with_f32(&x, |xs| {
            with_f32(a, |av| {
                let xa = xwt(xs, av, m, r, k);
                with_f32(b, |bv| xwt(&xa, bv, m, n, r))
            })
        })
        .flatten()
        .flatten();
        let Some(delta) = delta else {
            return l.forward(&x, adapters, None);
        };
        let s = ad.scale as f32;
        for (v, d) in y.iter_mut().zip(delta) {
            *v += s * d;
        }
    }
    let mut shape = dims.to_vec();
    *shape.last_mut().unwrap_or(&mut 0) = n;
    Ok(Tensor::from_vec(y, shape, x.device())?)
}
