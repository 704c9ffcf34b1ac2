//! The decoder's building blocks as candle ops with backward passes that suit LoRA.
//!
//! Why custom ops: candle's generic backward computes the gradient of *both* operands of
//! every matmul, so `x · Wᵀ` with a frozen `W` would spend a full matmul per layer on a
//! weight gradient nobody wants; and candle-nn's fused RMSNorm, RoPE and softmax have no
//! backward at all. Each op here has a CPU/f32 kernel (rows in parallel with rayon) and a
//! backward that produces exactly the input gradient. Other devices and dtypes take a
//! composition of plain candle ops with the same math (slower, but autograd-correct), so
//! the `cuda` feature compiles and runs.
//!
//! Mixed precision (a bf16/f16 base): activations, norms, RoPE, attention and the loss stay
//! f32; only the frozen GEMMs read their operands in the base dtype, and they return f32
//! ([`half_linear`], cuBLAS `GemmEx` on the GPU).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage,
    Tensor, D,
};
use rayon::prelude::*;

use crate::error::Result;

mod cpu_attn;

thread_local! {
    static FORCE_GENERIC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Makes this thread use the generic (device-independent) compositions instead of the CPU
/// kernels, so tests can check one against the other. Not for production use.
#[doc(hidden)]
pub fn set_force_generic(on: bool) {
    FORCE_GENERIC.with(|f| f.set(on));
}

/// 0: `RINGTUNE_ATTN` decides whether the CUDA attention block uses the flash kernels;
/// 1: on; 2: off. See [`set_flash_attention`].
pub(crate) static FLASH_ATTENTION: std::sync::atomic::AtomicU8 =
    std::sync::atomic::AtomicU8::new(0);

/// Overrides `RINGTUNE_ATTN=flash` for the whole process (`None`: the environment decides),
/// so `gpu_check` can compare the flash kernels with the default attention in one run.
/// Affects CUDA builds only (head size 64, half-precision base). Not for production use.
#[doc(hidden)]
pub fn set_flash_attention(on: Option<bool>) {
    let v = match on {
        None => 0,
        Some(true) => 1,
        Some(false) => 2,
    };
    FLASH_ATTENTION.store(v, std::sync::atomic::Ordering::Relaxed);
}

pub(crate) fn force_generic() -> bool {
    FORCE_GENERIC.with(|f| f.get())
}

/// Whether the fast CPU kernels apply.
fn cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && !force_generic()
}

/// Whether the custom CUDA kernels apply (f32 on a GPU, kernels on; see [`crate::cuda`]).
/// `family` names the kernels (`attn`, `rms`, `rope`, `swiglu`, `lora`; see `cuda::enabled`).
#[cfg(feature = "cuda")]
fn cuda_f32(t: &Tensor, family: &str) -> bool {
    t.device().is_cuda()
        && t.dtype() == DType::F32
        && !force_generic()
        && crate::cuda::enabled(family)
}

#[cfg(not(feature = "cuda"))]
fn cuda_f32(_: &Tensor, _: &str) -> bool {
    false
}

/// A contiguous f32 view of a CPU storage.
fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    if !l.is_contiguous() {
        bail!(
            "kernel expects a contiguous input, got strides {:?}",
            l.stride()
        )
    }
    let all = s.as_slice::<f32>()?;
    Ok(&all[l.start_offset()..l.start_offset() + l.shape().elem_count()])
}

/// Runs `f` on the f32 data of a captured (non-argument) CPU tensor.
fn with_cpu_f32<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => f(slice(c, l)?),
        _ => bail!("expected a CPU tensor"),
    }
}

// ---------------------------------------------------------------------------------------
// Fast exp. Cephes' expf polynomial after range reduction; ≤ 2 ulp on the range used
// here, and written without branches or libm calls so that the row loops vectorise.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 · 2^23: adding it rounds to an integer in the low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;

#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let p = p * r2 + r + 1.0;
    // 2^n from the integer sitting in t's low mantissa bits.
    let bits = (t.to_bits().wrapping_sub(ROUND_MAGIC.to_bits()) as i32 + 127) << 23;
    p * f32::from_bits(bits as u32)
}

/// `dst[i] = exp(src[i] - shift)`, returns Σ dst (f32 lanes, f64 final sum).
#[inline(always)]
fn exp_shift_sum_body(row: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = row.chunks_exact_mut(16);
    for c in &mut chunks {
        for (v, a) in c.iter_mut().zip(acc.iter_mut()) {
            *v = exp_approx(*v - shift);
            *a += *v;
        }
    }
    let mut tail = 0f32;
    for v in chunks.into_remainder() {
        *v = exp_approx(*v - shift);
        tail += *v;
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shift_sum_avx2(row: &mut [f32], shift: f32) -> f32 {
    exp_shift_sum_body(row, shift)
}

/// In place `row[i] = exp(row[i] - shift)`; returns the sum.
pub(crate) fn exp_shift_sum(row: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features the function was compiled for.
            return unsafe { exp_shift_sum_avx2(row, shift) };
        }
    }
    exp_shift_sum_body(row, shift)
}

#[inline(always)]
fn max_body(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for (v, a) in c.iter().zip(acc.iter_mut()) {
            *a = a.max(*v);
        }
    }
    let m = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    acc.iter().fold(m, |m, &v| m.max(v))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn max_avx2(row: &[f32]) -> f32 {
    max_body(row)
}

/// Maximum of a row (−inf for an empty row).
pub(crate) fn row_max(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has the feature the function was compiled for.
            return unsafe { max_avx2(row) };
        }
    }
    max_body(row)
}

// ---------------------------------------------------------------------------------------
// Frozen linear: y = x · Wᵀ, gradient to x only.

struct FrozenLinear {
    w: Tensor,
}

impl FrozenLinear {
    fn fwd<S: BackendStorage>(
        &self,
        x: &S,
        xl: &Layout,
        w: &S,
        wl: &Layout,
    ) -> candle_core::Result<(S, Shape)> {
        if !xl.is_contiguous() || !wl.is_contiguous() {
            bail!("frozen-linear expects contiguous operands")
        }
        let dims = xl.dims();
        let k = *dims.last().unwrap_or(&0);
        let (out, k2) = (wl.dims()[0], wl.dims()[1]);
        if k != k2 {
            bail!(
                "frozen-linear: input width {k} does not match weight {:?}",
                wl.dims()
            )
        }
        let m = xl.shape().elem_count() / k.max(1);
        let lhs = Layout::contiguous_with_offset((m, k), xl.start_offset());
        let rhs = wl.transpose(0, 1)?;
        let y = x.matmul(w, (1, m, out, k), &lhs, &rhs)?;
        let mut od = dims.to_vec();
        *od.last_mut().expect("rank >= 1") = out;
        Ok((y, Shape::from(od)))
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        match &*ws {
            Storage::Cpu(w) => self.fwd(s, l, w, wl),
            _ => bail!("frozen-linear: weight is not on the CPU"),
        }
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        match &*ws {
            Storage::Cuda(w) => self.fwd(s, l, w, wl),
            _ => bail!("frozen-linear: weight is not on the GPU"),
        }
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let _p = crate::prof::op("frozen-linear (bwd)", grad);
        let out = self.w.dim(0)?;
        let g = grad.reshape(((), out))?;
        Ok(Some(g.matmul(&self.w)?.reshape(arg.shape())?))
    }
}

/// `x [.., in] · Wᵀ` with `W [out, in]` frozen: backward gives the gradient of `x` only.
pub(crate) fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    if !x.track_op() || force_generic() {
        // No gradient needed: a plain matmul is the same numbers with less bookkeeping.
        let (out, inp) = w.dims2()?;
        let lead: Vec<usize> = x.dims()[..x.rank() - 1].to_vec();
        let y = x.reshape(((), inp))?.matmul(&w.t()?)?;
        let mut od = lead;
        od.push(out);
        return Ok(y.reshape(od)?);
    }
    let _p = crate::prof::op("frozen-linear", &x);
    Ok(x.apply_op1_arc(Arc::new(Box::new(FrozenLinear { w: w.clone() })))?)
}

// ---------------------------------------------------------------------------------------
// Mixed precision: a half-precision frozen weight applied to f32 activations.
//
// Under a bf16/f16 base the activations stay f32 and only the GEMM operands are rounded to
// the weight's dtype; the product is accumulated *and returned* in f32. Measured on the
// tiny preset (tests/mixed_precision.rs), rounding the GEMM outputs to bf16 as well — what
// a plain bf16 matmul does — is what pushes the LoRA gradients past 1e-2 of the f32
// computation; the roundings of the operands alone stay under it.

/// `y = half(x) · Wᵀ` (forward) or `dx = half(g) · W` (its backward) for `x`/`g` f32
/// `[m, ·]` and a frozen half-precision `W [out, in]`, f32 out.
struct HalfGemm {
    w: Tensor,
    /// `false`: `x [m, in] · Wᵀ → [m, out]`; `true`: `g [m, out] · W → [m, in]`.
    backward: bool,
}

impl HalfGemm {
    /// (m, n, k) of the product and its output shape.
    fn dims(&self, l: &Layout) -> candle_core::Result<(usize, usize, usize, Shape)> {
        let (out, inp) = self.w.dims2()?;
        let (n, k) = if self.backward {
            (inp, out)
        } else {
            (out, inp)
        };
        let dims = l.dims();
        if dims.last() != Some(&k) {
            bail!(
                "half-gemm: input {:?} does not fit the weight {:?}",
                dims,
                self.w.dims()
            )
        }
        let m = l.shape().elem_count() / k.max(1);
        let mut od = dims.to_vec();
        *od.last_mut().expect("rank >= 1") = n;
        Ok((m, n, k, Shape::from(od)))
    }
}

/// The values of a half-precision CPU tensor widened to f32.
fn widen_cpu(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    let t = t.to_dtype(DType::F32)?.flatten_all()?;
    t.to_vec1::<f32>()
}

impl CustomOp1 for HalfGemm {
    fn name(&self) -> &'static str {
        "half-gemm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let (m, n, k, shape) = self.dims(l)?;
        // Round the activations to the weight's dtype, as the GPU GEMM reads them.
        let xr: Vec<f32> = match self.w.dtype() {
            DType::BF16 => x
                .iter()
                .map(|v| half::bf16::from_f32(*v).to_f32())
                .collect(),
            DType::F16 => x.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect(),
            _ => x.to_vec(),
        };
        let w = widen_cpu(&self.w)?;
        let mut y = vec![0f32; m * n];
        // W is [out, in] row-major: forward reads it as Wᵀ (k = in), backward as W.
        let wm = if self.backward {
            (&w[..], n, 1)
        } else {
            (&w[..], 1, k)
        };
        sgemm((m, n, k), &mut y, false, (&xr, k, 1), wm, 1.0);
        Ok((CpuStorage::F32(y), shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        cuda_half_gemm::fwd(self, s, l)
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let _p = crate::prof::op("half-gemm (bwd)", grad);
        let g = grad.contiguous()?;
        let op = HalfGemm {
            w: self.w.clone(),
            backward: !self.backward,
        };
        Ok(Some(g.apply_op1_no_bwd(&op)?))
    }
}

#[cfg(feature = "cuda")]
mod cuda_half_gemm {
    //! cuBLAS `GemmEx` with half-precision operands, f32 accumulation and an f32 result
    //! (candle's own bf16 matmul writes a bf16 result).
    use super::HalfGemm;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::cublas::{result::gemm_ex, sys};
    use candle_core::cuda::cudarc::driver::DevicePtr;
    use candle_core::{bail, CudaStorage, DType, Layout, Shape, Storage};

    pub(super) fn fwd(
        op: &HalfGemm,
        s: &CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (m, n, _, shape) = op.dims(l)?;
        let dev = s.device().clone();
        // SAFETY: written by the GEMM (beta = 0) before anything reads it.
        let mut y = unsafe { dev.alloc::<f32>(m * n)? };
        let yp = crate::cuda::out_ptr(&dev, &mut y);
        into(op, s, l, yp, 0.0)?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), shape))
    }

    /// `Y = X·op(W) + beta·Y` into the f32 buffer at `yp`, which holds `m × n` (the output
    /// shape of [`HalfGemm::dims`]) on `s`'s device.
    pub(super) fn into(
        op: &HalfGemm,
        s: &CudaStorage,
        l: &Layout,
        yp: u64,
        beta: f32,
    ) -> candle_core::Result<()> {
        if !l.is_contiguous() {
            bail!("half-gemm expects a contiguous input")
        }
        let (m, n, k, _) = op.dims(l)?;
        let wdt = op.w.dtype();
        let dtype = match wdt {
            DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
            DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
            d => bail!("half-gemm: weight dtype {d:?}"),
        };
        let dev = s.device().clone();
        // The activations in the weight's dtype: as they are when they already have it,
        // else through candle's cast kernel (contiguous from 0).
        let cast;
        let (xh, x_off) = if s.dtype() == wdt {
            (s, l.start_offset())
        } else {
            cast = s.to_dtype(l, wdt)?;
            (&cast, 0)
        };
        let (ws, wl) = op.w.storage_and_layout();
        let Storage::Cuda(ws) = &*ws else {
            bail!("half-gemm: weight is not on the GPU")
        };
        if !wl.is_contiguous() {
            bail!("half-gemm: weight is not contiguous")
        }
        let stream = dev.cuda_stream();
        let blas = dev.cublas_handle();
        let alpha = 1f32;
        // Row-major C[m, n] is column-major Cᵀ[n, m]; W row-major [out, in] is column-major
        // Wᵀ with leading dimension `in`.
        //   forward  C = X·Wᵀ: Cᵀ = W·Xᵀ → op(A) = Aᵀ on W's buffer (lda = k), B = X (ldb = k)
        //   backward C = G·W : Cᵀ = Wᵀ·Gᵀ → op(A) = A on W's buffer (lda = n), B = G (ldb = k)
        let (transa, lda) = if op.backward {
            (sys::cublasOperation_t::CUBLAS_OP_N, n)
        } else {
            (sys::cublasOperation_t::CUBLAS_OP_T, k)
        };
        macro_rules! run {
            ($t:ty) => {{
                let x = xh.as_cuda_slice::<$t>()?.slice(x_off..);
                let w = ws.as_cuda_slice::<$t>()?.slice(wl.start_offset()..);
                let (xp, _gx) = x.device_ptr(&stream);
                let (wp, _gw) = w.device_ptr(&stream);
                // SAFETY: extents follow from the checked shapes (W [out, in] contiguous,
                // X [m, k] contiguous, Y [m, n] as the caller promises); all on `stream`.
                unsafe {
                    gemm_ex(
                        *blas.handle(),
                        transa,
                        sys::cublasOperation_t::CUBLAS_OP_N,
                        n as i32,
                        m as i32,
                        k as i32,
                        (&alpha) as *const f32 as *const _,
                        wp as *const _,
                        dtype,
                        lda as i32,
                        xp as *const _,
                        dtype,
                        k as i32,
                        (&beta) as *const f32 as *const _,
                        yp as *mut _,
                        sys::cudaDataType_t::CUDA_R_32F,
                        n as i32,
                        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                    .map_err(|e| candle_core::Error::Msg(format!("half-gemm: {e:?}")))?;
                }
            }};
        }
        match wdt {
            DType::BF16 => run!(half::bf16),
            _ => run!(half::f16),
        }
        Ok(())
    }
}

/// `x [.., in] · Wᵀ` for f32 activations and a frozen half-precision `W [out, in]`: the
/// GEMM reads both in the weight's dtype and accumulates and returns f32 (see
/// [`HalfGemm`]); the backward gives the gradient of `x` only, the same way.
pub(crate) fn half_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let _p = crate::prof::op("half-gemm", x);
    let x = x.contiguous()?;
    let op = HalfGemm {
        w: w.clone(),
        backward: false,
    };
    if !x.track_op() {
        return Ok(x.apply_op1_no_bwd(&op)?);
    }
    Ok(x.apply_op1_arc(Arc::new(Box::new(op)))?)
}

/// `x · Wᵀ` without autograd for the head: a plain matmul when the dtypes agree, the
/// half-precision GEMM with an f32 result when `x` is f32 and `W` is not.
pub(crate) fn matmul_wt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.dtype() == w.dtype() {
        return Ok(x.matmul(&w.t()?)?);
    }
    let _p = crate::prof::op("half-gemm", x);
    let op = HalfGemm {
        w: w.clone(),
        backward: false,
    };
    Ok(x.contiguous()?.apply_op1_no_bwd(&op)?)
}

/// `g · W` without autograd for the head (the input gradient of [`matmul_wt`]): a plain
/// matmul when the dtypes agree, except a half-precision `g` on a GPU (the logit gradients
/// the loss kernel writes as bf16), which, like an f32 `g` against a half-precision `W`,
/// goes through the half-precision GEMM with an f32 result.
pub(crate) fn matmul_w(g: &Tensor, w: &Tensor) -> Result<Tensor> {
    let half_on_gpu = g.device().is_cuda() && matches!(g.dtype(), DType::BF16 | DType::F16);
    if g.dtype() == w.dtype() && !half_on_gpu {
        return Ok(g.matmul(w)?);
    }
    let _p = crate::prof::op("half-gemm", g);
    let op = HalfGemm {
        w: w.clone(),
        backward: true,
    };
    Ok(g.contiguous()?.apply_op1_no_bwd(&op)?)
}

// ---------------------------------------------------------------------------------------
// Direct f32 GEMM (the gemm crate candle itself uses), for kernels that accumulate.

/// A row-major-or-strided f32 matrix operand: data, row stride, column stride.
type Mat<'a> = (&'a [f32], usize, usize);

/// `dst [m×n] (contiguous) = (accumulate ? dst : 0) + beta · A[m×k] · B[k×n]`.
fn sgemm(
    dims: (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    a: Mat<'_>,
    b: Mat<'_>,
    beta: f32,
) {
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    sgemm_with(dims, (dst, dims.1), accumulate, a, b, beta, par)
}

/// [`sgemm`] into `dst` with row stride `ldd ≥ n` (a block of a wider matrix).
fn sgemm_with(
    (m, n, k): (usize, usize, usize),
    (dst, ldd): (&mut [f32], usize),
    accumulate: bool,
    a: Mat<'_>,
    b: Mat<'_>,
    beta: f32,
    par: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldd >= n, "sgemm: row stride {ldd} < {n} columns");
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(ldd)
                .take(m)
                .for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    assert!(dst.len() >= (m - 1) * ldd + n, "sgemm: dst too small");
    // SAFETY: dst holds the m rows of stride ldd (checked above) and is a distinct borrow.
    unsafe {
        sgemm_raw(
            (m, n, k),
            dst.as_mut_ptr(),
            ldd,
            accumulate,
            a,
            b,
            beta,
            par,
        )
    }
}

/// `beta · A[m×k] · B[k×n]` into a new `[m × n]` buffer that the GEMM writes on its own:
/// `vec![0.0; m·n]` would first memset what the GEMM then overwrites.
fn sgemm_new(dims: (usize, usize, usize), a: Mat<'_>, b: Mat<'_>, beta: f32) -> Vec<f32> {
    let (m, n, k) = dims;
    if m == 0 || n == 0 || k == 0 {
        return vec![0.0; m * n];
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let mut v = Vec::<f32>::with_capacity(m * n);
    let dst = v.spare_capacity_mut()[..m * n].as_mut_ptr().cast::<f32>();
    // SAFETY: dst has room for the m·n elements; without accumulation gemm writes every
    // one and reads none, so all are initialised before `set_len`.
    unsafe {
        sgemm_raw(dims, dst, n, false, a, b, beta, par);
        v.set_len(m * n);
    }
    v
}

/// The gemm call behind [`sgemm_with`] and [`sgemm_new`], on a raw destination.
///
/// # Safety
/// `dst` must be valid for writes (and, with `accumulate`, reads) of `m` rows of `n`
/// elements at row stride `ldd`, and must not overlap `a` or `b`; `m, n, k ≥ 1`.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_raw(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    ldd: usize,
    accumulate: bool,
    a: Mat<'_>,
    b: Mat<'_>,
    beta: f32,
    par: gemm::Parallelism,
) {
    let (a, a_rs, a_cs) = a;
    let (b, b_rs, b_cs) = b;
    // The gemm call reads through raw pointers: check the operands' extents first.
    assert!(
        a.len() > (m - 1) * a_rs + (k - 1) * a_cs,
        "sgemm: lhs too small"
    );
    assert!(
        b.len() > (k - 1) * b_rs + (n - 1) * b_cs,
        "sgemm: rhs too small"
    );
    // SAFETY: operand extents checked above; dst as the caller promises.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            ldd as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        )
    }
}

/// [`sgemm`] on the calling thread only (for many small matmuls run side by side).
fn sgemm_serial(
    dims: (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    a: Mat<'_>,
    b: Mat<'_>,
    beta: f32,
) {
    sgemm_with(
        dims,
        (dst, dims.1),
        accumulate,
        a,
        b,
        beta,
        gemm::Parallelism::None,
    )
}

/// The contiguous f32 data of a CPU tensor (copying only if it is not contiguous).
fn host_f32(t: &Tensor) -> candle_core::Result<Tensor> {
    t.contiguous()
}

// ---------------------------------------------------------------------------------------
// LoRA linear, fused: y = x·Wᵀ (+ b) + s·(x·Aᵀ)·Bᵀ in one op with one output buffer.

struct LoraLinearOp {
    w: Tensor,
    bias: Option<Tensor>,
    scale: f32,
    /// `x·Aᵀ` from the forward pass, kept (it is small: [m, r]) for dB in the backward.
    t: std::sync::Mutex<Option<Vec<f32>>>,
}

impl CustomOp3 for LoraLinearOp {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, a, b) = (slice(sx, lx)?, slice(sa, la)?, slice(sb, lb)?);
        let (m, k) = lx.shape().dims2()?;
        let (r, k2) = la.shape().dims2()?;
        let (n, r2) = lb.shape().dims2()?;
        if k != k2 || r != r2 || self.w.dims() != [n, k] {
            bail!(
                "lora-linear: shapes x {:?} A {:?} B {:?} W {:?} do not fit",
                lx.dims(),
                la.dims(),
                lb.dims(),
                self.w.dims()
            )
        }
        let mut y = match &self.bias {
            Some(bias) => {
                let mut y = with_cpu_f32(bias, |bv| Ok(bv.repeat(m)))?;
                with_cpu_f32(&self.w, |w| {
                    sgemm((m, n, k), &mut y, true, (x, k, 1), (w, 1, k), 1.0);
                    Ok(())
                })?;
                y
            }
            None => with_cpu_f32(&self.w, |w| {
                Ok(sgemm_new((m, n, k), (x, k, 1), (w, 1, k), 1.0))
            })?,
        };
        let t = sgemm_new((m, r, k), (x, k, 1), (a, 1, k), 1.0);
        sgemm((m, n, r), &mut y, true, (&t, r, 1), (b, 1, r), self.scale);
        *self.t.lock().expect("lora-linear cache poisoned") = Some(t);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _p = crate::prof::op("lora-linear (bwd)", grad);
        let g = host_f32(grad)?;
        let (m, k) = x.dims2()?;
        let (r, n) = (a.dim(0)?, b.dim(0)?);
        let s = self.scale;
        let want_dx = x.track_op();
        let (gs, gl) = g.storage_and_layout();
        let (xs, xl) = x.storage_and_layout();
        let (as_, al) = a.storage_and_layout();
        let (bs, bl) = b.storage_and_layout();
        let (Storage::Cpu(gs), Storage::Cpu(xs), Storage::Cpu(as_), Storage::Cpu(bs)) =
            (&*gs, &*xs, &*as_, &*bs)
        else {
            bail!("lora-linear: backward expects CPU tensors")
        };
        let (g, xv, av, bv) = (
            slice(gs, gl)?,
            slice(xs, xl)?,
            slice(as_, al)?,
            slice(bs, bl)?,
        );
        // u = G·B [m, r]
        let u = sgemm_new((m, r, n), (g, n, 1), (bv, r, 1), 1.0);
        // dx = G·W + s·u·A [m, k]
        let dx = if want_dx {
            let mut dx = with_cpu_f32(&self.w, |w| {
                Ok(sgemm_new((m, k, n), (g, n, 1), (w, k, 1), 1.0))
            })?;
            sgemm((m, k, r), &mut dx, true, (&u, r, 1), (av, k, 1), s);
            Some(Tensor::from_vec(dx, (m, k), x.device())?)
        } else {
            None
        };
        // t = x·Aᵀ [m, r] (kept from the forward); dB = s·Gᵀ·t [n, r]; dA = s·uᵀ·x [r, k]
        let t = match self.t.lock().expect("lora-linear cache poisoned").take() {
            Some(t) if t.len() == m * r => t,
            _ => sgemm_new((m, r, k), (xv, k, 1), (av, 1, k), 1.0),
        };
        let db = sgemm_new((n, r, m), (g, 1, n), (&t, r, 1), s);
        let da = sgemm_new((r, k, m), (&u, 1, r), (xv, k, 1), s);
        Ok((
            dx,
            Some(Tensor::from_vec(da, (r, k), a.device())?),
            Some(Tensor::from_vec(db, (n, r), b.device())?),
        ))
    }
}

#[cfg(feature = "cuda")]
mod cuda_lora {
    //! The fused LoRA linear on the GPU: one op whose autograd node keeps only `x`, A, B
    //! and the output (the composition keeps four `[m, out]` intermediates per projection).
    //! Frozen GEMMs as in [`super::HalfGemm`] (half operands, f32 result) under a
    //! half-precision base, f32 otherwise; the small adapter GEMMs accumulate into the same
    //! buffers (TF32 under a half-precision base).
    use super::*;
    use crate::cuda::{add_bias_rows, gemm, out_ptr, ptr, tensor_ptr};
    use candle_core::cuda::cudarc::driver::CudaSlice;
    use candle_core::cuda_backend::CudaDevice;
    use std::sync::Mutex;

    pub(super) struct CudaLoraLinear {
        pub w: Tensor,
        /// f32 `[out]`.
        pub bias: Option<Tensor>,
        pub scale: f32,
        /// `t = x·Aᵀ [m, r]` from the forward, for the backward (which otherwise reads all
        /// of `x` again to recompute it).
        pub t: Mutex<Option<CudaSlice<f32>>>,
    }

    /// `Y = x·Wᵀ + beta·Y` (`backward == false`, `[m, k]` → `[m, n]`) or `Y = g·W + beta·Y`
    /// (`[m, n]` → `[m, k]`) for the frozen `W [n, k]`, into the f32 buffer at `yp`.
    #[allow(clippy::too_many_arguments)]
    fn frozen_into(
        w: &Tensor,
        dev: &CudaDevice,
        s: &CudaStorage,
        l: &Layout,
        m: usize,
        backward: bool,
        yp: u64,
        beta: f32,
    ) -> candle_core::Result<()> {
        if w.dtype() != DType::F32 {
            let op = HalfGemm {
                w: w.clone(),
                backward,
            };
            return super::cuda_half_gemm::into(&op, s, l, yp, beta);
        }
        let (n, k) = w.dims2()?;
        let wp = tensor_ptr(w, "lora-linear weight")?;
        let xp = ptr(s, l, "lora-linear input")?;
        // g [m, n]·W [n, k], or x [m, k]·Wᵀ.
        let (dims, transposed) = if backward {
            ((m, k, n), false)
        } else {
            ((m, n, k), true)
        };
        gemm(
            dev,
            dims,
            1,
            (xp, false, 0),
            (wp, transposed, 0),
            (yp, 0),
            1.0,
            beta,
            false,
        )
    }

    /// `t = x·Aᵀ` (`[m, r]`, a new buffer) for `x [m, k]` and `A [r, k]` (TF32 with `tf32`).
    fn lora_t(
        dev: &CudaDevice,
        (m, r, k): (usize, usize, usize),
        xp: u64,
        ap: u64,
        tf32: bool,
    ) -> candle_core::Result<CudaSlice<f32>> {
        // SAFETY: written by the GEMM (beta = 0) before anything reads it.
        let mut t = unsafe { dev.alloc::<f32>(m * r)? };
        let tp = out_ptr(dev, &mut t);
        gemm(
            dev,
            (m, r, k),
            1,
            (xp, false, 0),
            (ap, true, 0),
            (tp, 0),
            1.0,
            0.0,
            tf32,
        )?;
        Ok(t)
    }

    impl CudaLoraLinear {
        fn half(&self) -> bool {
            self.w.dtype() != DType::F32
        }
    }

    impl CustomOp3 for CudaLoraLinear {
        fn name(&self) -> &'static str {
            "lora-linear-cuda"
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
            bail!("lora-linear-cuda: GPU only")
        }

        fn cuda_fwd(
            &self,
            sx: &CudaStorage,
            lx: &Layout,
            sa: &CudaStorage,
            la: &Layout,
            sb: &CudaStorage,
            lb: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let dev = sx.device().clone();
            let (m, k) = lx.shape().dims2()?;
            let (r, k2) = la.shape().dims2()?;
            let (n, r2) = lb.shape().dims2()?;
            if k != k2 || r != r2 || self.w.dims() != [n, k] {
                bail!(
                    "lora-linear: shapes x {:?} A {:?} B {:?} W {:?} do not fit",
                    lx.dims(),
                    la.dims(),
                    lb.dims(),
                    self.w.dims()
                )
            }
            // SAFETY: written by the frozen GEMM (beta = 0) before anything reads it.
            let mut y = unsafe { dev.alloc::<f32>(m * n)? };
            let yp = out_ptr(&dev, &mut y);
            frozen_into(&self.w, &dev, sx, lx, m, false, yp, 0.0)?;
            if let Some(b) = &self.bias {
                add_bias_rows(&dev, yp, b, m, n)?;
            }
            let (xp, ap, bp) = (
                ptr(sx, lx, "lora-linear x")?,
                ptr(sa, la, "lora-linear A")?,
                ptr(sb, lb, "lora-linear B")?,
            );
            let tf32 = self.half();
            // t = x·Aᵀ, y += s·t·Bᵀ
            let mut t = lora_t(&dev, (m, r, k), xp, ap, tf32)?;
            let tp = out_ptr(&dev, &mut t);
            gemm(
                &dev,
                (m, n, r),
                1,
                (tp, false, 0),
                (bp, true, 0),
                (yp, 0),
                self.scale,
                1.0,
                tf32,
            )?;
            *self.t.lock().expect("lora-linear cache poisoned") = Some(t);
            Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((m, n))))
        }

        fn bwd(
            &self,
            x: &Tensor,
            a: &Tensor,
            b: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let _p = crate::prof::op("lora-linear (bwd)", grad);
            let g = grad.contiguous()?;
            let want_dx = x.track_op();
            let (m, k) = x.dims2()?;
            let t = self
                .t
                .lock()
                .expect("lora-linear cache poisoned")
                .take()
                .filter(|t| t.len() == m * a.dim(0).unwrap_or(0));
            let op = CudaLoraLinearBwd {
                w: self.w.clone(),
                a: a.clone(),
                b: b.clone(),
                scale: self.scale,
                want_dx,
                t: Mutex::new(t),
            };
            let all = x.apply_op2_no_bwd(&g, &op)?;
            let (na, nb) = (a.elem_count(), b.elem_count());
            let da = all.narrow(0, 0, na)?.reshape(a.shape())?;
            let db = all.narrow(0, na, nb)?.reshape(b.shape())?;
            let dx = if want_dx {
                Some(all.narrow(0, na + nb, m * k)?.reshape((m, k))?)
            } else {
                None
            };
            Ok((dx, Some(da), Some(db)))
        }
    }

    /// (x, G) → `[dA | dB | dx]` flat (dx only when wanted).
    struct CudaLoraLinearBwd {
        w: Tensor,
        a: Tensor,
        b: Tensor,
        scale: f32,
        want_dx: bool,
        /// `t = x·Aᵀ` kept from the forward (`None`: recompute it).
        t: Mutex<Option<CudaSlice<f32>>>,
    }

    impl CustomOp2 for CudaLoraLinearBwd {
        fn name(&self) -> &'static str {
            "lora-linear-cuda-bwd"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            bail!("lora-linear-cuda-bwd: GPU only")
        }

        fn cuda_fwd(
            &self,
            sx: &CudaStorage,
            lx: &Layout,
            sg: &CudaStorage,
            lg: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let dev = sx.device().clone();
            let (m, k) = lx.shape().dims2()?;
            let (r, n) = (self.a.dim(0)?, self.b.dim(0)?);
            if lg.dims() != [m, n] {
                bail!("lora-linear bwd: grad {:?}, expected [{m}, {n}]", lg.dims())
            }
            let half = self.w.dtype() != DType::F32;
            let (xp, gp) = (
                ptr(sx, lx, "lora-linear x")?,
                ptr(sg, lg, "lora-linear grad")?,
            );
            let ap = tensor_ptr(&self.a, "lora-linear A")?;
            let bp = tensor_ptr(&self.b, "lora-linear B")?;
            let (na, nb) = (r * k, n * r);
            let total = na + nb + if self.want_dx { m * k } else { 0 };
            // SAFETY: every part is written by a GEMM with beta = 0 before being read.
            let mut out = unsafe { dev.alloc::<f32>(total)? };
            let mut u = unsafe { dev.alloc::<f32>(m * r)? };
            let op = out_ptr(&dev, &mut out);
            let up = out_ptr(&dev, &mut u);
            let (dap, dbp, dxp) = (op, op + (na * 4) as u64, op + ((na + nb) * 4) as u64);
            let s = self.scale;
            // t = x·Aᵀ [m, r], kept from the forward or recomputed
            let mut t = match self.t.lock().expect("lora-linear cache poisoned").take() {
                Some(t) => t,
                None => lora_t(&dev, (m, r, k), xp, ap, half)?,
            };
            let tp = out_ptr(&dev, &mut t);
            // u = G·B [m, r]
            gemm(
                &dev,
                (m, r, n),
                1,
                (gp, false, 0),
                (bp, false, 0),
                (up, 0),
                1.0,
                0.0,
                half,
            )?;
            // dA = s·uᵀ·x [r, k]; dB = s·Gᵀ·t [n, r]
            gemm(
                &dev,
                (r, k, m),
                1,
                (up, true, 0),
                (xp, false, 0),
                (dap, 0),
                s,
                0.0,
                half,
            )?;
            gemm(
                &dev,
                (n, r, m),
                1,
                (gp, true, 0),
                (tp, false, 0),
                (dbp, 0),
                s,
                0.0,
                half,
            )?;
            if self.want_dx {
                // dx = s·u·A, then the frozen GEMM adds G·W in place (beta = 1): no
                // separate [m, k] buffer and no extra pass to add it.
                gemm(
                    &dev,
                    (m, k, r),
                    1,
                    (up, false, 0),
                    (ap, false, 0),
                    (dxp, 0),
                    s,
                    0.0,
                    half,
                )?;
                frozen_into(&self.w, &dev, sg, lg, m, true, dxp, 1.0)?;
            }
            drop((t, u));
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(total)))
        }
    }
}

/// `x [m, in] → x·Wᵀ (+ b) + scale·(x·Aᵀ)·Bᵀ` as one op on the CPU in f32, `None` where
/// the fused kernel does not apply (the caller then composes the same math).
pub(crate) fn lora_linear_fused(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if cuda_f32(x, "lora")
        && x.rank() == 2
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && matches!(w.dtype(), DType::F32 | DType::BF16 | DType::F16)
    {
        let _p = crate::prof::op("lora-linear", x);
        let x = x.contiguous()?;
        let op = cuda_lora::CudaLoraLinear {
            w: w.clone(),
            bias: bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
            scale: scale as f32,
            t: Default::default(),
        };
        let (a, b) = (a.contiguous()?, b.contiguous()?);
        return Ok(Some(x.apply_op3_arc(&a, &b, Arc::new(Box::new(op)))?));
    }
    if !(cpu_f32(x) && x.rank() == 2 && w.dtype() == DType::F32 && a.dtype() == DType::F32) {
        return Ok(None);
    }
    let _p = crate::prof::op("lora-linear", x);
    let x = x.contiguous()?;
    let op = LoraLinearOp {
        w: w.clone(),
        bias: bias.cloned(),
        scale: scale as f32,
        t: Default::default(),
    };
    Ok(Some(x.apply_op3_arc(a, b, Arc::new(Box::new(op)))?))
}

// ---------------------------------------------------------------------------------------
// SwiGLU: silu(gate) · up in one op.

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u) = (slice(s1, l1)?, slice(s2, l2)?);
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(4096)
            .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
            .for_each(|(yc, (gc, uc))| {
                for ((y, &g), &u) in yc.iter_mut().zip(gc).zip(uc) {
                    *y = g / (1.0 + exp_approx(-g)) * u;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let y = crate::cuda::swiglu_fwd((s1, l1), (s2, l2))?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        d: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let _p = crate::prof::op("swiglu (bwd)", d);
        let d = d.contiguous()?;
        if !g.device().is_cpu() {
            // [dg | du] in one buffer from one kernel, split into views.
            let n = g.elem_count();
            let both = d.apply_op1_no_bwd(&SwiGluBwd {
                g: g.clone(),
                u: u.clone(),
            })?;
            return Ok((
                Some(both.narrow(0, 0, n)?.reshape(g.shape())?),
                Some(both.narrow(0, n, n)?.reshape(u.shape())?),
            ));
        }
        let (ds, dl) = d.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (us, ul) = u.storage_and_layout();
        let (Storage::Cpu(ds), Storage::Cpu(gs), Storage::Cpu(us)) = (&*ds, &*gs, &*us) else {
            bail!("swiglu: backward expects CPU tensors")
        };
        let (dv, gv, uv) = (slice(ds, dl)?, slice(gs, gl)?, slice(us, ul)?);
        let mut dg = vec![0f32; gv.len()];
        let mut du = vec![0f32; gv.len()];
        dg.par_chunks_mut(4096)
            .zip(du.par_chunks_mut(4096))
            .zip(
                gv.par_chunks(4096)
                    .zip(uv.par_chunks(4096))
                    .zip(dv.par_chunks(4096)),
            )
            .for_each(|((dgc, duc), ((gc, uc), dc))| {
                for i in 0..gc.len() {
                    let sig = 1.0 / (1.0 + exp_approx(-gc[i]));
                    let silu = gc[i] * sig;
                    dgc[i] = dc[i] * uc[i] * (sig * (1.0 + gc[i] * (1.0 - sig)));
                    duc[i] = dc[i] * silu;
                }
            });
        Ok((
            Some(Tensor::from_vec(dg, g.shape(), g.device())?),
            Some(Tensor::from_vec(du, u.shape(), u.device())?),
        ))
    }
}

/// SwiGLU's backward on the GPU: `d` → `[dg | du]` (flat, `2n`), `g` and `u` captured.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct SwiGluBwd {
    g: Tensor,
    u: Tensor,
}

impl CustomOp1 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "swiglu-bwd"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        bail!("swiglu-bwd: GPU only (the CPU backward is in SwiGlu::bwd)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let out = crate::cuda::swiglu_bwd((s, l), &self.g, &self.u)?;
        Ok((out, Shape::from(2 * l.shape().elem_count())))
    }
}

/// `silu(gate) · up`.
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if cpu_f32(gate) || (cuda_f32(gate, "swiglu") && up.dtype() == DType::F32) {
        let _p = crate::prof::op("swiglu", gate);
        let (g, u) = (gate.contiguous()?, up.contiguous()?);
        return Ok(g.apply_op2_arc(&u, Arc::new(Box::new(SwiGlu)))?);
    }
    Ok((gate.silu()? * up)?)
}

// ---------------------------------------------------------------------------------------
// RMSNorm with a frozen weight, over the last dimension.

struct RmsNorm {
    w: Tensor,
    eps: f32,
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-frozen"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let h = *l.dims().last().unwrap_or(&1);
        let mut y = vec![0f32; x.len()];
        with_cpu_f32(&self.w, |w| {
            y.par_chunks_mut(h)
                .zip(x.par_chunks(h))
                .for_each(|(yr, xr)| {
                    let ss: f32 = xr.iter().map(|v| v * v).sum();
                    let r = 1.0 / (ss / h as f32 + self.eps).sqrt();
                    for ((yv, xv), wv) in yr.iter_mut().zip(xr).zip(w) {
                        *yv = wv * (xv * r);
                    }
                });
            Ok(())
        })?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let y = crate::cuda::rms_norm_fwd(s, l, &self.w, self.eps)?;
        Ok((y, l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let _p = crate::prof::op("rms-norm (bwd)", grad);
        let g = grad.contiguous()?;
        Ok(Some(arg.apply_op2_no_bwd(
            &g,
            &RmsNormBwd {
                w: self.w.clone(),
                eps: self.eps,
            },
        )?))
    }
}

struct RmsNormBwd {
    w: Tensor,
    eps: f32,
}

impl CustomOp2 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms-norm-frozen-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, g) = (slice(s1, l1)?, slice(s2, l2)?);
        let h = *l1.dims().last().unwrap_or(&1);
        let mut dx = vec![0f32; x.len()];
        with_cpu_f32(&self.w, |w| {
            dx.par_chunks_mut(h)
                .zip(x.par_chunks(h).zip(g.par_chunks(h)))
                .for_each(|(dr, (xr, gr))| {
                    // y = w ⊙ x · r, r = (mean x² + eps)^-1/2:
                    // dx = r (w ⊙ g) − x · r³ · mean(w ⊙ g ⊙ x).
                    let ss: f32 = xr.iter().map(|v| v * v).sum();
                    let r = 1.0 / (ss / h as f32 + self.eps).sqrt();
                    let dot: f32 = xr.iter().zip(gr).zip(w).map(|((x, g), w)| x * g * w).sum();
                    let c = dot * r * r * r / h as f32;
                    for (((d, xv), gv), wv) in dr.iter_mut().zip(xr).zip(gr).zip(w) {
                        *d = r * (wv * gv) - xv * c;
                    }
                });
            Ok(())
        })?;
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dx = crate::cuda::rms_norm_bwd((s1, l1), (s2, l2), &self.w, self.eps)?;
        Ok((dx, l1.shape().clone()))
    }
}

/// RMSNorm over the last dimension with a frozen weight, as transformers computes it:
/// `w · (x · rsqrt(mean(x²) + eps))` in f32.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if cpu_f32(x) || (cuda_f32(x, "rms") && w.dtype() == DType::F32) {
        let _p = crate::prof::op("rms-norm", x);
        let x = x.contiguous()?;
        return Ok(x.apply_op1_arc(Arc::new(Box::new(RmsNorm {
            w: w.clone(),
            eps: eps as f32,
        })))?);
    }
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xf.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    Ok(y.to_dtype(dtype)?.broadcast_mul(w)?)
}

// ---------------------------------------------------------------------------------------
// Rotary embedding (the "rotate half" layout of transformers' Llama).

struct Rope {
    /// `[T, d/2]` f32.
    cos: Tensor,
    /// `[T, d/2]` f32.
    sin: Tensor,
    /// Rotate by −θ (the backward pass).
    inverse: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope-frozen"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let dims = l.dims();
        let (t, d) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let half = d / 2;
        let mut y = vec![0f32; x.len()];
        let sign = if self.inverse { -1f32 } else { 1f32 };
        with_cpu_f32(&self.cos, |cos| {
            with_cpu_f32(&self.sin, |sin| {
                y.par_chunks_mut(t * d)
                    .zip(x.par_chunks(t * d))
                    .for_each(|(yb, xb)| {
                        for p in 0..t {
                            let (c, sn) = (
                                &cos[p * half..(p + 1) * half],
                                &sin[p * half..(p + 1) * half],
                            );
                            let (xr, yr) = (&xb[p * d..(p + 1) * d], &mut yb[p * d..(p + 1) * d]);
                            let (x1, x2) = xr.split_at(half);
                            let (y1, y2) = yr.split_at_mut(half);
                            for i in 0..half {
                                let s = sign * sn[i];
                                // q·cos + rotate_half(q)·sin, rotate_half(q) = (−q2, q1).
                                y1[i] = x1[i] * c[i] + (-x2[i]) * s;
                                y2[i] = x2[i] * c[i] + x1[i] * s;
                            }
                        }
                    });
                Ok(())
            })
        })?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let y = crate::cuda::rope(s, l, &self.cos, &self.sin, self.inverse)?;
        Ok((y, l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // A rotation's transpose is the rotation by −θ.
        let _p = crate::prof::op("rope (bwd)", grad);
        let g = grad.contiguous()?;
        let inv = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            inverse: !self.inverse,
        };
        Ok(Some(g.apply_op1_no_bwd(&inv)?))
    }
}

/// RoPE on `x [.., T, d]` with tables `cos`, `sin` `[T, d/2]` (f32).
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let tables_f32 = cos.dtype() == DType::F32 && sin.dtype() == DType::F32;
    if cpu_f32(x) || (cuda_f32(x, "rope") && tables_f32 && x.dim(D::Minus1)? % 2 == 0) {
        let _p = crate::prof::op("rope", x);
        let x = x.contiguous()?;
        let op = Rope {
            cos: cos.clone(),
            sin: sin.clone(),
            inverse: false,
        };
        return Ok(x.apply_op1_arc(Arc::new(Box::new(op)))?);
    }
    let dtype = x.dtype();
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.to_dtype(dtype)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.to_dtype(dtype)?;
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?)?)
}

// ---------------------------------------------------------------------------------------
// Masked softmax of attention scores.

/// Which keys a query may see.
#[derive(Debug, Clone)]
pub(crate) struct AttnMask {
    /// Query positions per head group: row `r` of the scores is position `r % t`.
    pub t: usize,
    /// Sliding window (a query sees itself and the `w − 1` keys before it).
    pub window: Option<usize>,
    /// Per batch row, per key position: 0 = padding (never attended).
    pub key_valid: Option<Arc<Vec<u8>>>,
}

impl AttnMask {
    #[inline]
    fn allowed(&self, b: usize, i: usize, j: usize) -> bool {
        j <= i
            && self.window.is_none_or(|w| i - j < w)
            && self
                .key_valid
                .as_ref()
                .is_none_or(|m| m[b * self.t + j] != 0)
    }
}

/// Turns one row of raw scores (query position `i` of batch row `bi`) into masked softmax
/// probabilities of `scale · scores`, in place; masked keys become exactly 0, and a row
/// with no visible key (a padding query) becomes all zeros rather than NaN.
fn softmax_row_inplace(yr: &mut [f32], scale: f32, mask: &AttnMask, bi: usize, i: usize) {
    // Causal: keys 0..=i; the window and key padding remove more.
    let lo = mask.window.map_or(0, |w| (i + 1).saturating_sub(w));
    let hi = (i + 1).min(yr.len());
    yr[..lo].fill(0.0);
    yr[hi..].fill(0.0);
    if mask.key_valid.is_none() {
        // Every key in lo..hi is visible: scale, max, exp and normalise as whole-row passes
        // that vectorise (the same arithmetic as the masked loop below).
        let row = &mut yr[lo..hi];
        if row.is_empty() {
            return;
        }
        row.iter_mut().for_each(|v| *v *= scale);
        let m = row_max(row);
        let inv = 1.0 / exp_shift_sum(row, m);
        row.iter_mut().for_each(|v| *v *= inv);
        return;
    }
    let mut m = f32::NEG_INFINITY;
    for (j, v) in yr.iter_mut().enumerate().take(hi).skip(lo) {
        if mask.allowed(bi, i, j) {
            *v *= scale;
            m = m.max(*v);
        } else {
            *v = f32::NEG_INFINITY;
        }
    }
    if m == f32::NEG_INFINITY {
        yr[lo..hi].fill(0.0);
        return;
    }
    let mut sum = 0f32;
    for v in &mut yr[lo..hi] {
        *v = if *v == f32::NEG_INFINITY {
            0.0
        } else {
            exp_approx(*v - m)
        };
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in &mut yr[lo..hi] {
        *v *= inv;
    }
}

/// Attention probabilities straight from q and k: `P = masked_softmax(scale · q·kᵀ)` for
/// q `[B, G, R, d]`, k `[B, G, T, d]` (R = rep·T query rows per kv head). The raw scores
/// are never kept: the backward needs only P, q and k.
struct AttnProbs {
    scale: f32,
    mask: AttnMask,
}

impl AttnProbs {
    fn dims(lq: &Layout, lk: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (b, g, r, d) = lq.shape().dims4()?;
        let (b2, g2, t, d2) = lk.shape().dims4()?;
        if (b, g, d) != (b2, g2, d2) {
            bail!(
                "attn-probs: q {:?} and k {:?} do not fit",
                lq.dims(),
                lk.dims()
            )
        }
        Ok((b * g, r, t, d))
    }
}

impl CustomOp2 for AttnProbs {
    fn name(&self) -> &'static str {
        "attn-probs"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k) = (slice(sq, lq)?, slice(sk, lk)?);
        let (bg, r, t, d) = Self::dims(lq, lk)?;
        let groups = lq.dims()[1];
        let mut p = vec![0f32; bg * r * t];
        // One (batch, kv-head) block per task: small matmuls, run single-threaded in parallel.
        p.par_chunks_mut(r * t).enumerate().for_each(|(blk, pb)| {
            let (qb, kb) = (
                &q[blk * r * d..(blk + 1) * r * d],
                &k[blk * t * d..(blk + 1) * t * d],
            );
            sgemm_serial((r, t, d), pb, false, (qb, d, 1), (kb, 1, d), 1.0);
            let bi = blk / groups;
            for (row, pr) in pb.chunks_exact_mut(t).enumerate() {
                softmax_row_inplace(pr, self.scale, &self.mask, bi, row % self.mask.t);
            }
        });
        Ok((
            CpuStorage::F32(p),
            Shape::from(vec![lq.dims()[0], groups, r, t]),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        p: &Tensor,
        dp: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let _p = crate::prof::op("attention-probs (bwd)", dp);
        let dp = dp.contiguous()?;
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (ps, pl) = p.storage_and_layout();
        let (ds, dl) = dp.storage_and_layout();
        let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(ps), Storage::Cpu(ds)) =
            (&*qs, &*ks, &*ps, &*ds)
        else {
            bail!("attn-probs: backward expects CPU tensors")
        };
        let (qv, kv, pv, dv) = (
            slice(qs, ql)?,
            slice(ks, kl)?,
            slice(ps, pl)?,
            slice(ds, dl)?,
        );
        let (bg, r, t, d) = Self::dims(ql, kl)?;
        let mut dq = vec![0f32; bg * r * d];
        let mut dk = vec![0f32; bg * t * d];
        dq.par_chunks_mut(r * d)
            .zip(dk.par_chunks_mut(t * d))
            .enumerate()
            .for_each(|(blk, (dqb, dkb))| {
                let (pb, db) = (
                    &pv[blk * r * t..(blk + 1) * r * t],
                    &dv[blk * r * t..(blk + 1) * r * t],
                );
                // dS = scale · P ⊙ (dP − Σ dP ⊙ P), row by row.
                let mut ds = vec![0f32; r * t];
                for ((dsr, pr), dr) in ds
                    .chunks_exact_mut(t)
                    .zip(pb.chunks_exact(t))
                    .zip(db.chunks_exact(t))
                {
                    let dot: f32 = pr.iter().zip(dr).map(|(a, b)| a * b).sum();
                    for ((o, &pv), &dv) in dsr.iter_mut().zip(pr).zip(dr) {
                        *o = self.scale * pv * (dv - dot);
                    }
                }
                let (qb, kb) = (
                    &qv[blk * r * d..(blk + 1) * r * d],
                    &kv[blk * t * d..(blk + 1) * t * d],
                );
                // dq = dS·k [r, d]; dk = dSᵀ·q [t, d]
                sgemm_serial((r, d, t), dqb, false, (&ds, t, 1), (kb, d, 1), 1.0);
                sgemm_serial((t, d, r), dkb, false, (&ds, 1, t), (qb, d, 1), 1.0);
            });
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), q.device())?),
            Some(Tensor::from_vec(dk, k.shape(), k.device())?),
        ))
    }
}

/// Attention probabilities for q `[B, G, R, d]` and k `[B, G, T, d]`:
/// `masked_softmax(scale · q·kᵀ)` `[B, G, R, T]`.
pub(crate) fn attention_probs(
    q: &Tensor,
    k: &Tensor,
    scale: f64,
    mask: &AttnMask,
) -> Result<Tensor> {
    if cpu_f32(q) {
        let _p = crate::prof::op("attention-probs", q);
        let (q, k) = (q.contiguous()?, k.contiguous()?);
        let op = AttnProbs {
            scale: scale as f32,
            mask: mask.clone(),
        };
        return Ok(q.apply_op2_arc(&k, Arc::new(Box::new(op)))?);
    }
    masked_softmax(&q.matmul(&k.t()?)?, scale, mask)
}

/// The whole attention between the projections, on the GPU or the CPU (f32): q `[b·t, heads·d]`, k and v
/// `[b·t, kv·d]` (the projections' outputs) → `[b·t, heads·d]`, RoPE (tables `[t, d/2]`)
/// and the head layouts handled inside one op, so that autograd keeps nothing but q, k, v
/// and the output (the CPU op is in `ops/cpu_attn.rs`). `None` where it does not apply
/// (other dtypes, RoPE tables not `[t, d/2]`): the caller composes.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_block(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    (b, t, heads, kv, d): (usize, usize, usize, usize, usize),
    scale: f64,
    mask: &AttnMask,
    tf32: bool,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if cuda_f32(q, "attn")
        && k.dtype() == DType::F32
        && v.dtype() == DType::F32
        && cos.dtype() == DType::F32
        && sin.dtype() == DType::F32
        && d % 2 == 0
        && kv > 0
        && heads % kv == 0
        && mask.t == t
        && cos.dims() == [t, d / 2]
    {
        return Ok(Some(cuda_attn::block(
            q,
            k,
            v,
            (cos, sin),
            (b, t, heads, kv, d),
            scale,
            mask,
            tf32,
        )?));
    }
    let fits = d % 2 == 0
        && kv > 0
        && heads % kv == 0
        && mask.t == t
        && cos.dims() == [t, d / 2]
        && sin.dims() == [t, d / 2];
    // RINGTUNE_CPU_ATTN=0: the composition instead, for A/B runs in one binary.
    static CPU_ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let cpu_on =
        *CPU_ON.get_or_init(|| std::env::var("RINGTUNE_CPU_ATTN").map_or(true, |v| v != "0"));
    if cpu_on
        && cpu_f32(q)
        && fits
        && [k, v, cos, sin].iter().all(|x| x.dtype() == DType::F32)
        && cos.device().is_cpu()
    {
        let _p = crate::prof::op("attention", q);
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let op = cpu_attn::CpuAttnBlock::new((cos, sin), (b, t, heads, kv, d), scale, mask);
        return Ok(Some(q.apply_op3_arc(&k, &v, Arc::new(Box::new(op)))?));
    }
    let _ = tf32;
    Ok(None)
}

#[cfg(feature = "cuda")]
mod cuda_attn {
    use super::*;
    use crate::cuda::{AttnCfg, BlockDims};
    use candle_core::cuda::cudarc::driver::CudaSlice;
    use std::sync::Mutex;

    fn cfg_of(
        dev: &candle_core::Device,
        scale: f64,
        mask: &AttnMask,
        tf32: bool,
    ) -> Result<AttnCfg> {
        let key_valid = match &mask.key_valid {
            Some(m) => Some(Tensor::from_slice(m.as_slice(), m.len(), dev)?),
            None => None,
        };
        Ok(AttnCfg {
            scale: scale as f32,
            tq: mask.t,
            window: mask.window,
            key_valid,
            tf32,
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn block(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        (b, t, heads, kv, d): (usize, usize, usize, usize, usize),
        scale: f64,
        mask: &AttnMask,
        tf32: bool,
    ) -> Result<Tensor> {
        let _p = crate::prof::op("attention", q);
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        if q.dims() != [b * t, heads * d] || k.dims() != [b * t, kv * d] || v.dims() != k.dims() {
            return Err(candle_core::Error::Msg(format!(
                "attention block: q {:?}, k {:?}, v {:?} do not fit b={b} t={t} heads={heads} kv={kv} d={d}",
                q.dims(),
                k.dims(),
                v.dims()
            ))
            .into());
        }
        let op = AttnBlock {
            cfg: cfg_of(q.device(), scale, mask, tf32)?,
            dims: BlockDims { b, t, heads, kv, d },
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
            lse: Default::default(),
        };
        Ok(q.apply_op3_arc(&k, &v, Arc::new(Box::new(op)))?)
    }

    struct AttnBlock {
        cfg: AttnCfg,
        dims: BlockDims,
        cos: Tensor,
        sin: Tensor,
        /// The flash forward's per-row log-sum-exp, for the backward (with the op's output,
        /// it spares the backward a second forward).
        lse: Mutex<Option<CudaSlice<f32>>>,
    }

    impl CustomOp3 for AttnBlock {
        fn name(&self) -> &'static str {
            "attention-block"
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
            bail!("attention block: GPU only")
        }

        fn cuda_fwd(
            &self,
            q: &CudaStorage,
            ql: &Layout,
            k: &CudaStorage,
            kl: &Layout,
            v: &CudaStorage,
            vl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let dev = q.device().clone();
            let p = (
                crate::cuda::ptr(q, ql, "attention q")?,
                crate::cuda::ptr(k, kl, "attention k")?,
                crate::cuda::ptr(v, vl, "attention v")?,
            );
            let tabs = (&self.cos, &self.sin);
            let o = if self.cfg.tf32 && crate::cuda::attn_flash(self.dims.d) {
                let (o, lse) =
                    crate::cuda::attn_block_fwd_flash(&self.cfg, self.dims, p, tabs, &dev)?;
                *self.lse.lock().expect("attention lse poisoned") = Some(lse);
                o
            } else if self.cfg.tf32 && crate::cuda::attn_bf16() {
                crate::cuda::attn_block_fwd_bf16(&self.cfg, self.dims, p, tabs, &dev)?
            } else {
                crate::cuda::attn_block_fwd(&self.cfg, self.dims, p, tabs, &dev)?
            };
            Ok((CudaStorage::wrap_cuda_slice(o, dev), ql.shape().clone()))
        }

        fn bwd(
            &self,
            q: &Tensor,
            k: &Tensor,
            v: &Tensor,
            res: &Tensor,
            grad: &Tensor,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let _p = crate::prof::op("attention (bwd)", grad);
            let g = grad.contiguous()?;
            let lse = self.lse.lock().expect("attention lse poisoned").take();
            let op = AttnBlockBwd {
                cfg: self.cfg.clone(),
                dims: self.dims,
                cos: self.cos.clone(),
                sin: self.sin.clone(),
                k: k.clone(),
                v: v.clone(),
                saved: Mutex::new(lse.map(|l| (res.clone(), l))),
            };
            let all = q.apply_op2_no_bwd(&g, &op)?;
            let (nq, nk) = (q.elem_count(), k.elem_count());
            Ok((
                Some(all.narrow(0, 0, nq)?.reshape(q.shape())?),
                Some(all.narrow(0, nq, nk)?.reshape(k.shape())?),
                Some(all.narrow(0, nq + nk, nk)?.reshape(v.shape())?),
            ))
        }
    }

    /// (q, dO) → `[dq | dk | dv]` flat, in the projection layouts.
    struct AttnBlockBwd {
        cfg: AttnCfg,
        dims: BlockDims,
        cos: Tensor,
        sin: Tensor,
        k: Tensor,
        v: Tensor,
        /// The forward's output and the flash forward's log-sum-exp (`None`: the flash
        /// backward runs the forward again; the other paths need neither).
        saved: Mutex<Option<(Tensor, CudaSlice<f32>)>>,
    }

    impl CustomOp2 for AttnBlockBwd {
        fn name(&self) -> &'static str {
            "attention-block-bwd"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            bail!("attention-block-bwd: GPU only")
        }

        fn cuda_fwd(
            &self,
            q: &CudaStorage,
            ql: &Layout,
            g: &CudaStorage,
            gl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            if gl.dims() != ql.dims() {
                bail!(
                    "attention-block-bwd: grad {:?} vs q {:?}",
                    gl.dims(),
                    ql.dims()
                )
            }
            let dev = q.device().clone();
            let p = (
                crate::cuda::ptr(q, ql, "attention q")?,
                crate::cuda::tensor_ptr(&self.k, "attention k")?,
                crate::cuda::tensor_ptr(&self.v, "attention v")?,
                crate::cuda::ptr(g, gl, "attention grad")?,
            );
            let tabs = (&self.cos, &self.sin);
            let out = if self.cfg.tf32 && crate::cuda::attn_flash(self.dims.d) {
                let mut saved = self.saved.lock().expect("attention lse poisoned").take();
                let saved_ptrs = match &mut saved {
                    Some((o, lse)) if lse.len() == self.dims.b * self.dims.heads * self.dims.t => {
                        let o = crate::cuda::tensor_ptr(o, "attention output")?;
                        Some((o, crate::cuda::out_ptr(&dev, lse)))
                    }
                    _ => None,
                };
                let out = crate::cuda::attn_block_bwd_flash(
                    &self.cfg, self.dims, p, tabs, saved_ptrs, &dev,
                )?;
                drop(saved);
                out
            } else if self.cfg.tf32 && crate::cuda::attn_bf16() {
                crate::cuda::attn_block_bwd_bf16(&self.cfg, self.dims, p, tabs, &dev)?
            } else {
                crate::cuda::attn_block_bwd(&self.cfg, self.dims, p, tabs, &dev)?
            };
            let n = ql.shape().elem_count() + 2 * self.k.elem_count();
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(n)))
        }
    }
}

/// The composition behind [`attention_probs`] for devices without the CPU kernel:
/// `softmax(scale · scores + mask)` over the last dimension for scores
/// `[B, groups, rows, T]` (row `r` is query position `r % mask.t`); masked keys get
/// probability 0 and a row with no visible key is all zeros.
pub(crate) fn masked_softmax(scores: &Tensor, scale: f64, mask: &AttnMask) -> Result<Tensor> {
    // Composition for other devices: an additive −inf mask, then a max-shifted softmax.
    // The mask depends only on (batch row, query position, key) — [B or 1, 1, T, T] —
    // and is broadcast over the head groups, never built at the scores' full size.
    let dims = scores.dims().to_vec();
    let (b, t) = (dims[0], dims[dims.len() - 1]);
    let groups = scores.elem_count() / b / t / mask.t;
    let mb = if mask.key_valid.is_some() { b } else { 1 };
    let mut add = vec![0f32; mb * mask.t * t];
    for bi in 0..mb {
        for i in 0..mask.t {
            for j in 0..t {
                if !mask.allowed(bi, i, j) {
                    add[(bi * mask.t + i) * t + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    let add = Tensor::from_vec(add, (mb, 1, mask.t, t), scores.device())?;
    let s4 = scores.reshape((b, groups, mask.t, t))?;
    let x = (s4.to_dtype(DType::F32)? * scale)?.broadcast_add(&add)?;
    let m = x.max_keepdim(D::Minus1)?.detach();
    // A fully masked row has max −inf; shift it by 0 instead so it becomes all zeros.
    let m = m.ne(f32::NEG_INFINITY)?.where_cond(&m, &m.zeros_like()?)?;
    let e = x.broadcast_sub(&m)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    let sum = (sum.clone() + sum.eq(0f32)?.to_dtype(DType::F32)?)?;
    Ok(e.broadcast_div(&sum)?
        .to_dtype(scores.dtype())?
        .reshape(dims.as_slice())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -80f32;
        while x < 0.5 {
            let e = exp_approx(x) as f64;
            let r = (x as f64).exp();
            worst = worst.max(((e - r) / r).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
    }

    #[test]
    fn exp_shift_sum_matches_scalar() {
        let row: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32) * 0.05 - 2.0)
            .collect();
        let mut a = row.clone();
        let s = exp_shift_sum(&mut a, 1.5);
        let s_ref: f64 = row.iter().map(|&v| ((v - 1.5) as f64).exp()).sum();
        assert!(((s as f64 - s_ref) / s_ref).abs() < 1e-6);
        for (x, y) in row.iter().zip(&a) {
            assert!((((x - 1.5) as f64).exp() - *y as f64).abs() < 1e-6 * (*y as f64).max(1e-30));
        }
        assert_eq!(row_max(&row), row.iter().cloned().fold(f32::MIN, f32::max));
    }
}
