//! CUDA kernels for the ops of [`crate::ops`] (the `cuda` feature).
//!
//! The kernels live in `src/cuda/kernels.cu`, compiled to PTX by `build.rs` and loaded once
//! per device. The attention op is cuBLAS strided-batched GEMMs around two row kernels;
//! it keeps no `T × T` tensor between forward and backward: the backward recomputes the
//! probabilities from q and k (one more GEMM) instead of holding them for every layer.
//!
//! `RINGTUNE_CUDA_KERNELS=0` turns all of this off (the device-independent compositions
//! run instead), `RINGTUNE_CUDA_KERNELS=attn,rms` keeps only the families named: to
//! compare the two on a GPU and tell a faulty kernel apart.

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::cublas::{result::gemm_strided_batched_ex, sys};
use candle_core::cuda::cudarc::driver::{
    CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{bail, CudaStorage, Layout, Result, Storage, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ringtune_kernels.ptx"));
const MODULE: &str = "ringtune_kernels";

/// Whether the custom CUDA kernels of family `name` (`attn`, `rms`, `rope`, `swiglu`, `lora`, `head`) are
/// on: `RINGTUNE_CUDA_KERNELS` unset = all, `0` = none, else a comma list of the families
/// to use (to tell a faulty kernel apart on a GPU).
pub(crate) fn enabled(name: &str) -> bool {
    static ON: std::sync::OnceLock<Option<Vec<String>>> = std::sync::OnceLock::new();
    let on = ON.get_or_init(|| {
        std::env::var("RINGTUNE_CUDA_KERNELS")
            .ok()
            .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
    });
    match on {
        None => true,
        Some(list) => list.iter().any(|s| s == name),
    }
}

/// One block per row, `threads` a multiple of 32.
fn rows_cfg(rows: usize, width: usize) -> LaunchConfig {
    let threads = if width >= 1 << 16 {
        1024
    } else if width >= 1024 {
        512
    } else if width >= 256 {
        256
    } else {
        128
    };
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Grid-stride element-wise launch.
fn elems_cfg(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A contiguous f32 view's device pointer (bytes offset included).
pub(crate) fn ptr(s: &CudaStorage, l: &Layout, what: &str) -> Result<u64> {
    ptr_of::<f32>(s, l, what)
}

/// A contiguous view's device pointer for element type `T`.
fn ptr_of<
    T: candle_core::cuda::cudarc::driver::DeviceRepr + candle_core::cuda_backend::CudaDType,
>(
    s: &CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<u64> {
    if !l.is_contiguous() {
        bail!(
            "{what}: expects a contiguous input, got strides {:?}",
            l.stride()
        )
    }
    let dev = s.device();
    let stream = dev.cuda_stream();
    let sl = s.as_cuda_slice::<T>()?;
    let (p, _guard) = sl.device_ptr(&stream);
    Ok(p + (l.start_offset() * std::mem::size_of::<T>()) as u64)
}

/// The device pointer of a captured (non-argument) f32 tensor.
pub(crate) fn tensor_ptr(t: &Tensor, what: &str) -> Result<u64> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cuda(c) => ptr(c, l, what),
        _ => bail!("{what}: expected a CUDA tensor"),
    }
}

pub(crate) fn out_ptr(dev: &CudaDevice, s: &mut CudaSlice<f32>) -> u64 {
    let stream = dev.cuda_stream();
    let (p, _guard) = s.device_ptr_mut(&stream);
    p
}

/// Launches kernel `$name` of the PTX module with the given arguments (locals, pushed by
/// reference in the kernel signature's order).
macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let f = $dev.get_or_load_custom_func($name, MODULE, PTX)?;
        let mut b = f.builder();
        $( b.arg(&$arg); )*
        // SAFETY: the arguments follow the kernel's signature (types and order), and the
        // pointers cover the extents it reads and writes (checked by the callers).
        unsafe { b.launch($cfg) }.w()?;
    }};
}

/// Row-major strided-batched f32 GEMM: for each of `batch` items,
/// `C[m×n] = alpha · op(A) · op(B) + beta · C`, where `A` is stored `[m×k]` (`[k×m]` when
/// `ta`) and `B` `[k×n]` (`[n×k]` when `tb`), all contiguous, item strides in elements.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    dev: &CudaDevice,
    dims: (usize, usize, usize),
    batch: usize,
    a: (u64, bool, usize),
    b: (u64, bool, usize),
    c: (u64, usize),
    alpha: f32,
    beta: f32,
    tf32: bool,
) -> Result<()> {
    let compute = if tf32 {
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
    } else {
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
    };
    let f32t = sys::cudaDataType_t::CUDA_R_32F;
    gemm_typed(
        dev,
        dims,
        batch,
        a,
        b,
        c,
        (alpha, beta),
        (f32t, f32t),
        compute,
    )
}

/// [`gemm`] with bf16 operands, f32 accumulation and an f32 result.
#[allow(clippy::too_many_arguments)]
fn gemm_bf16(
    dev: &CudaDevice,
    dims: (usize, usize, usize),
    batch: usize,
    a: (u64, bool, usize),
    b: (u64, bool, usize),
    c: (u64, usize),
    alpha: f32,
) -> Result<()> {
    let bf = sys::cudaDataType_t::CUDA_R_16BF;
    let compute = sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
    gemm_typed(dev, dims, batch, a, b, c, (alpha, 0.0), (bf, bf), compute)
}

#[allow(clippy::too_many_arguments)]
fn gemm_typed(
    dev: &CudaDevice,
    (m, n, k): (usize, usize, usize),
    batch: usize,
    (a, ta, sa): (u64, bool, usize),
    (b, tb, sb): (u64, bool, usize),
    (c, sc): (u64, usize),
    (alpha, beta): (f32, f32),
    (a_type, b_type): (sys::cudaDataType_t, sys::cudaDataType_t),
    compute: sys::cublasComputeType_t,
) -> Result<()> {
    use sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    // Column-major view: Cᵀ[n×m] = op(B)ᵀ · op(A)ᵀ; a row-major [r×c] buffer is a
    // column-major [c×r] one with leading dimension c.
    let (op_b, ldb) = if tb {
        (CUBLAS_OP_T, k)
    } else {
        (CUBLAS_OP_N, n)
    };
    let (op_a, lda) = if ta {
        (CUBLAS_OP_T, m)
    } else {
        (CUBLAS_OP_N, k)
    };
    let blas = dev.cublas_handle();
    // SAFETY: the callers size every buffer for `batch` items of the given shapes and
    // strides; all work is queued on the device's one stream, which the handle uses.
    unsafe {
        gemm_strided_batched_ex(
            *blas.handle(),
            op_b,
            op_a,
            n as i32,
            m as i32,
            k as i32,
            (&alpha) as *const f32 as *const _,
            b as *const _,
            b_type,
            ldb as i32,
            sb as i64,
            a as *const _,
            a_type,
            lda as i32,
            sa as i64,
            (&beta) as *const f32 as *const _,
            c as *mut _,
            sys::cudaDataType_t::CUDA_R_32F,
            n as i32,
            sc as i64,
            batch as i32,
            compute,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .map_err(|e| candle_core::Error::Msg(format!("strided-batched gemm: {e:?}")))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Attention.

/// Shapes of one attention call: q `[B, G, R, d]`, k and v `[B, G, T, d]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnDims {
    pub bg: usize,
    pub groups: usize,
    pub r: usize,
    pub t: usize,
    pub d: usize,
}

/// Settings of the attention kernels: mask, scale, TF32 GEMMs.
#[derive(Debug, Clone)]
pub(crate) struct AttnCfg {
    pub scale: f32,
    /// Query positions per block row: row `r` of a (batch, kv head) block is position
    /// `r % tq`.
    pub tq: usize,
    pub window: Option<usize>,
    /// `[B, T]` bytes, 0 = padding key (on the device).
    pub key_valid: Option<Tensor>,
    pub tf32: bool,
}

impl AttnCfg {
    fn key_valid_ptr(&self) -> Result<u64> {
        match &self.key_valid {
            None => Ok(0),
            Some(t) => {
                let (s, l) = t.storage_and_layout();
                let Storage::Cuda(c) = &*s else {
                    bail!("attention: key mask is not on the GPU")
                };
                let dev = c.device();
                let stream = dev.cuda_stream();
                let sl = c.as_cuda_slice::<u8>()?;
                let (p, _guard) = sl.device_ptr(&stream);
                Ok(p + l.start_offset() as u64)
            }
        }
    }

    /// `s = softmax(scale · q · kᵀ + mask)` for every block, into `s` (`[bg·r·t]`).
    fn probs(&self, dev: &CudaDevice, x: AttnDims, q: u64, k: u64, s: u64) -> Result<()> {
        gemm(
            dev,
            (x.r, x.t, x.d),
            x.bg,
            (q, false, x.r * x.d),
            (k, true, x.t * x.d),
            (s, x.r * x.t),
            self.scale,
            0.0,
            self.tf32,
        )?;
        let rows = x.bg * x.r;
        let kv = self.key_valid_ptr()?;
        let (r, t, g, tq) = (x.r as i32, x.t as i32, x.groups as i32, self.tq as i32);
        let w = self.window.unwrap_or(0) as i32;
        let rows_i = rows as i32;
        launch!(
            dev,
            "attn_softmax_fwd",
            rows_cfg(rows, x.t),
            s,
            rows_i,
            r,
            t,
            g,
            tq,
            w,
            kv
        );
        Ok(())
    }
}

/// `o = softmax(scale · q·kᵀ + mask) · v` on device pointers (packed layouts), into `o`.
fn attention_fwd_ptrs(
    dev: &CudaDevice,
    cfg: &AttnCfg,
    x: AttnDims,
    qp: u64,
    kp: u64,
    vp: u64,
    op: u64,
) -> Result<()> {
    // SAFETY: fully written by the GEMM (beta = 0) before anything reads it.
    let mut s = unsafe { dev.alloc::<f32>(x.bg * x.r * x.t)? };
    let sp = out_ptr(dev, &mut s);
    cfg.probs(dev, x, qp, kp, sp)?;
    gemm(
        dev,
        (x.r, x.d, x.t),
        x.bg,
        (sp, false, x.r * x.t),
        (vp, false, x.t * x.d),
        (op, x.r * x.d),
        1.0,
        0.0,
        cfg.tf32,
    )?;
    drop(s);
    Ok(())
}

/// The backward on device pointers (packed layouts): (q, k, v, dO) → (dq, dk, dv); the
/// probabilities are recomputed, not stored.
fn attention_bwd_ptrs(
    dev: &CudaDevice,
    cfg: &AttnCfg,
    x: AttnDims,
    (qp, kp, vp, gp): (u64, u64, u64, u64),
    (dq, dk, dv): (u64, u64, u64),
) -> Result<()> {
    let ns = x.bg * x.r * x.t;
    // SAFETY: each buffer is fully written (GEMMs with beta = 0, kernels over every row)
    // before it is read.
    let mut p = unsafe { dev.alloc::<f32>(ns)? };
    let mut dp = unsafe { dev.alloc::<f32>(ns)? };
    let pp = out_ptr(dev, &mut p);
    let dpp = out_ptr(dev, &mut dp);
    cfg.probs(dev, x, qp, kp, pp)?;
    // dV = Pᵀ · dO
    gemm(
        dev,
        (x.t, x.d, x.r),
        x.bg,
        (pp, true, x.r * x.t),
        (gp, false, x.r * x.d),
        (dv, x.t * x.d),
        1.0,
        0.0,
        cfg.tf32,
    )?;
    // dP = dO · Vᵀ
    gemm(
        dev,
        (x.r, x.t, x.d),
        x.bg,
        (gp, false, x.r * x.d),
        (vp, true, x.t * x.d),
        (dpp, x.r * x.t),
        1.0,
        0.0,
        cfg.tf32,
    )?;
    // dS = scale · P ⊙ (dP − rowsum(P ⊙ dP)), in place of dP.
    let rows = x.bg * x.r;
    let (rows_i, t_i) = (rows as i32, x.t as i32);
    let scale = cfg.scale;
    launch!(
        dev,
        "attn_softmax_bwd",
        rows_cfg(rows, x.t),
        pp,
        dpp,
        rows_i,
        t_i,
        scale
    );
    // dQ = dS · K, dK = dSᵀ · Q
    gemm(
        dev,
        (x.r, x.d, x.t),
        x.bg,
        (dpp, false, x.r * x.t),
        (kp, false, x.t * x.d),
        (dq, x.r * x.d),
        1.0,
        0.0,
        cfg.tf32,
    )?;
    gemm(
        dev,
        (x.t, x.d, x.r),
        x.bg,
        (dpp, true, x.r * x.t),
        (qp, false, x.r * x.d),
        (dk, x.t * x.d),
        1.0,
        0.0,
        cfg.tf32,
    )?;
    drop((p, dp));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The attention block: projection layouts in and out, RoPE and the packing done on the
// way, nothing between q/k/v and the output kept for the backward.

/// Shapes of an attention block: rows `[b, t, heads, d]` for q and `[b, t, kv, d]` for
/// k and v.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockDims {
    pub b: usize,
    pub t: usize,
    pub heads: usize,
    pub kv: usize,
    pub d: usize,
}

impl BlockDims {
    fn attn(&self) -> AttnDims {
        AttnDims {
            bg: self.b * self.kv,
            groups: self.kv,
            r: self.heads / self.kv * self.t,
            t: self.t,
            d: self.d,
        }
    }
}

/// Moves one tensor between the projection layout and the packed one (see `attn_pack`).
#[allow(clippy::too_many_arguments)]
fn pack(
    dev: &CudaDevice,
    x: BlockDims,
    heads: usize,
    (src, dst): (u64, u64),
    (cos, sin): (u64, u64),
    sign: i32,
    to_packed: bool,
) -> Result<()> {
    let n = x.b * x.t * heads * (x.d / 2);
    let (b, t, h, g, d) = (
        x.b as i32,
        x.t as i32,
        heads as i32,
        x.kv as i32,
        x.d as i32,
    );
    let to = to_packed as i32;
    launch!(
        dev,
        "attn_pack",
        elems_cfg(n),
        src,
        dst,
        cos,
        sin,
        b,
        t,
        h,
        g,
        d,
        sign,
        to
    );
    Ok(())
}

/// The attention output in the projection layout (`[b·t, heads·d]`) from the packed f32 one.
fn unpack_out(dev: &CudaDevice, x: BlockDims, o4: u64, tabs: (u64, u64)) -> Result<CudaSlice<f32>> {
    // SAFETY: the pack kernel writes every element.
    let mut o = unsafe { dev.alloc::<f32>(x.b * x.t * x.heads * x.d)? };
    let op = out_ptr(dev, &mut o);
    pack(dev, x, x.heads, (o4, op), tabs, 0, false)?;
    Ok(o)
}

/// `[dq | dk | dv]` in the projection layouts from the packed f32 gradients (the
/// rotation's transpose is the rotation by −θ).
fn unpack_grads(
    dev: &CudaDevice,
    x: BlockDims,
    (dq4, dk4, dv4): (u64, u64, u64),
    tabs: (u64, u64),
) -> Result<CudaSlice<f32>> {
    let (nq, nk) = (x.b * x.t * x.heads * x.d, x.b * x.t * x.kv * x.d);
    // SAFETY: the three pack kernels write every element.
    let mut out = unsafe { dev.alloc::<f32>(nq + 2 * nk)? };
    let op = out_ptr(dev, &mut out);
    let (dq, dk, dv) = (op, op + (nq * 4) as u64, op + ((nq + nk) * 4) as u64);
    pack(dev, x, x.heads, (dq4, dq), tabs, -1, false)?;
    pack(dev, x, x.kv, (dk4, dk), tabs, -1, false)?;
    pack(dev, x, x.kv, (dv4, dv), tabs, 0, false)?;
    Ok(out)
}

/// Forward of the block: q `[b·t, heads·d]`, k and v `[b·t, kv·d]` (contiguous), RoPE
/// tables `[t, d/2]` → o `[b·t, heads·d]`.
pub(crate) fn attn_block_fwd(
    cfg: &AttnCfg,
    x: BlockDims,
    (q, k, v): (u64, u64, u64),
    (cos, sin): (&Tensor, &Tensor),
    dev: &CudaDevice,
) -> Result<CudaSlice<f32>> {
    let (nq, nk) = (x.b * x.t * x.heads * x.d, x.b * x.t * x.kv * x.d);
    let tabs = (tensor_ptr(cos, "rope cos")?, tensor_ptr(sin, "rope sin")?);
    // SAFETY: every buffer is fully written (pack kernels, GEMMs) before it is read.
    let mut tmp = unsafe { dev.alloc::<f32>(2 * nq + 2 * nk)? };
    let base = out_ptr(dev, &mut tmp);
    let (q4, k4, v4, o4) = (
        base,
        base + (nq * 4) as u64,
        base + ((nq + nk) * 4) as u64,
        base + ((nq + 2 * nk) * 4) as u64,
    );
    pack(dev, x, x.heads, (q, q4), tabs, 1, true)?;
    pack(dev, x, x.kv, (k, k4), tabs, 1, true)?;
    pack(dev, x, x.kv, (v, v4), tabs, 0, true)?;
    attention_fwd_ptrs(dev, cfg, x.attn(), q4, k4, v4, o4)?;
    let o = unpack_out(dev, x, o4, tabs)?;
    drop(tmp);
    Ok(o)
}

/// Backward of the block: `[dq | dk | dv]` in the projection layouts.
pub(crate) fn attn_block_bwd(
    cfg: &AttnCfg,
    x: BlockDims,
    (q, k, v, g): (u64, u64, u64, u64),
    (cos, sin): (&Tensor, &Tensor),
    dev: &CudaDevice,
) -> Result<CudaSlice<f32>> {
    let (nq, nk) = (x.b * x.t * x.heads * x.d, x.b * x.t * x.kv * x.d);
    let tabs = (tensor_ptr(cos, "rope cos")?, tensor_ptr(sin, "rope sin")?);
    // SAFETY: every buffer is fully written (pack kernels, GEMMs) before it is read.
    let mut tmp = unsafe { dev.alloc::<f32>(3 * nq + 4 * nk)? };
    let base = out_ptr(dev, &mut tmp);
    let at = |i: usize| base + (i * 4) as u64;
    let (q4, g4, dq4) = (at(0), at(nq), at(2 * nq));
    let (k4, v4, dk4, dv4) = (
        at(3 * nq),
        at(3 * nq + nk),
        at(3 * nq + 2 * nk),
        at(3 * nq + 3 * nk),
    );
    pack(dev, x, x.heads, (q, q4), tabs, 1, true)?;
    pack(dev, x, x.kv, (k, k4), tabs, 1, true)?;
    pack(dev, x, x.kv, (v, v4), tabs, 0, true)?;
    pack(dev, x, x.heads, (g, g4), tabs, 0, true)?;
    attention_bwd_ptrs(dev, cfg, x.attn(), (q4, k4, v4, g4), (dq4, dk4, dv4))?;
    let out = unpack_grads(dev, x, (dq4, dk4, dv4), tabs)?;
    drop(tmp);
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Row and element-wise kernels.

/// RMSNorm forward over rows of `h`, frozen weight `w` (f32 on the device).
pub(crate) fn rms_norm_fwd(
    s: &CudaStorage,
    l: &Layout,
    w: &Tensor,
    eps: f32,
) -> Result<CudaStorage> {
    let dev = s.device().clone();
    let xp = ptr(s, l, "rms-norm")?;
    let wp = tensor_ptr(w, "rms-norm weight")?;
    let n = l.shape().elem_count();
    let h = *l.dims().last().unwrap_or(&1);
    let rows = n / h.max(1);
    // SAFETY: every row is written by the kernel.
    let mut y = unsafe { dev.alloc::<f32>(n)? };
    let yp = out_ptr(&dev, &mut y);
    let (rows_i, h_i) = (rows as i32, h as i32);
    launch!(
        &dev,
        "rms_norm_fwd",
        rows_cfg(rows, h),
        xp,
        wp,
        yp,
        rows_i,
        h_i,
        eps
    );
    Ok(CudaStorage::wrap_cuda_slice(y, dev))
}

/// RMSNorm's input gradient from `x` and `g` (same layout).
pub(crate) fn rms_norm_bwd(
    (x, xl): (&CudaStorage, &Layout),
    (g, gl): (&CudaStorage, &Layout),
    w: &Tensor,
    eps: f32,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let xp = ptr(x, xl, "rms-norm bwd x")?;
    let gp = ptr(g, gl, "rms-norm bwd grad")?;
    let wp = tensor_ptr(w, "rms-norm weight")?;
    let n = xl.shape().elem_count();
    if gl.shape().elem_count() != n {
        bail!(
            "rms-norm bwd: grad {:?} vs input {:?}",
            gl.dims(),
            xl.dims()
        )
    }
    let h = *xl.dims().last().unwrap_or(&1);
    let rows = n / h.max(1);
    // SAFETY: every row is written by the kernel.
    let mut dx = unsafe { dev.alloc::<f32>(n)? };
    let dp = out_ptr(&dev, &mut dx);
    let (rows_i, h_i) = (rows as i32, h as i32);
    launch!(
        &dev,
        "rms_norm_bwd",
        rows_cfg(rows, h),
        xp,
        gp,
        wp,
        dp,
        rows_i,
        h_i,
        eps
    );
    Ok(CudaStorage::wrap_cuda_slice(dx, dev))
}

/// `silu(g) · u`.
pub(crate) fn swiglu_fwd(
    (g, gl): (&CudaStorage, &Layout),
    (u, ul): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = g.device().clone();
    let n = gl.shape().elem_count();
    if ul.shape().elem_count() != n {
        bail!("swiglu: gate {:?} vs up {:?}", gl.dims(), ul.dims())
    }
    let (gp, up) = (ptr(g, gl, "swiglu gate")?, ptr(u, ul, "swiglu up")?);
    // SAFETY: every element is written by the kernel.
    let mut y = unsafe { dev.alloc::<f32>(n)? };
    let yp = out_ptr(&dev, &mut y);
    if let Some(n4) = float4s(n, &[gp, up, yp]) {
        launch!(
            &dev,
            "swiglu_fwd_v4",
            elems_cfg(n4 as usize),
            gp,
            up,
            yp,
            n4
        );
    } else {
        let n_i = n as i64;
        launch!(&dev, "swiglu_fwd", elems_cfg(n), gp, up, yp, n_i);
    }
    Ok(CudaStorage::wrap_cuda_slice(y, dev))
}

/// `n / 4` when `n` f32 values at each of `ptrs` can be read as float4s (`n` a multiple of
/// 4, every pointer 16-byte aligned), for the `_v4` kernels.
fn float4s(n: usize, ptrs: &[u64]) -> Option<i64> {
    (n.is_multiple_of(4) && ptrs.iter().all(|p| p.is_multiple_of(16))).then_some((n / 4) as i64)
}

/// SwiGLU's gradients `[dg | du]` from `g`, `u` (captured) and the output gradient `d`.
pub(crate) fn swiglu_bwd(
    (d, dl): (&CudaStorage, &Layout),
    g: &Tensor,
    u: &Tensor,
) -> Result<CudaStorage> {
    let dev = d.device().clone();
    let n = dl.shape().elem_count();
    let dp = ptr(d, dl, "swiglu grad")?;
    let (gp, up) = (tensor_ptr(g, "swiglu gate")?, tensor_ptr(u, "swiglu up")?);
    // SAFETY: every element of both halves is written by the kernel.
    let mut out = unsafe { dev.alloc::<f32>(2 * n)? };
    let op = out_ptr(&dev, &mut out);
    // The du half starts n floats in: aligned when n is a multiple of 4.
    if let Some(n4) = float4s(n, &[gp, up, dp, op]) {
        launch!(
            &dev,
            "swiglu_bwd_v4",
            elems_cfg(n4 as usize),
            gp,
            up,
            dp,
            op,
            n4
        );
    } else {
        let n_i = n as i64;
        launch!(&dev, "swiglu_bwd", elems_cfg(n), gp, up, dp, op, n_i);
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// RoPE on `x [.., T, d]` with `[T, d/2]` tables; `inverse` rotates by −θ.
pub(crate) fn rope(
    s: &CudaStorage,
    l: &Layout,
    cos: &Tensor,
    sin: &Tensor,
    inverse: bool,
) -> Result<CudaStorage> {
    let dev = s.device().clone();
    let dims = l.dims();
    if dims.len() < 2 {
        bail!("rope: input {dims:?} has no [T, d] tail")
    }
    let (t, d) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let n = l.shape().elem_count();
    let prefix = n / (t * d).max(1);
    let xp = ptr(s, l, "rope")?;
    let (cp, sp) = (tensor_ptr(cos, "rope cos")?, tensor_ptr(sin, "rope sin")?);
    // SAFETY: every element is written by the kernel (d even: checked by the caller).
    let mut y = unsafe { dev.alloc::<f32>(n)? };
    let yp = out_ptr(&dev, &mut y);
    let (prefix_i, t_i, d_i) = (prefix as i64, t as i32, d as i32);
    let sign = if inverse { -1f32 } else { 1f32 };
    launch!(
        &dev,
        "rope_fwd",
        elems_cfg(n / 2),
        xp,
        cp,
        sp,
        yp,
        prefix_i,
        t_i,
        d_i,
        sign
    );
    Ok(CudaStorage::wrap_cuda_slice(y, dev))
}

/// `y [m, n] += b` per row (`b` f32 `[n]` on the device).
pub(crate) fn add_bias_rows(
    dev: &CudaDevice,
    y: u64,
    b: &Tensor,
    m: usize,
    n: usize,
) -> Result<()> {
    if b.elem_count() != n {
        bail!("bias has {} values for {n} columns", b.elem_count())
    }
    let bp = tensor_ptr(b, "bias")?;
    let (m_i, n_i) = (m as i64, n as i32);
    launch!(dev, "add_bias_rows", elems_cfg(m * n), y, bp, m_i, n_i);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The head's token loss.

/// Per row of `logits [rows, V]` (f32) and `targets [rows]` (u32): `[rows, 2]` of
/// (log p(target), log-sum-exp).
pub(crate) fn ce_row_stats(
    (x, xl): (&CudaStorage, &Layout),
    (t, tl): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let (rows, v) = xl.shape().dims2()?;
    if tl.shape().elem_count() != rows {
        bail!(
            "token loss: {} targets for {rows} rows",
            tl.shape().elem_count()
        )
    }
    let xp = ptr(x, xl, "token-loss logits")?;
    let tp = ptr_of::<u32>(t, tl, "token-loss targets")?;
    // SAFETY: every row's two values are written by the kernel.
    let mut out = unsafe { dev.alloc::<f32>(2 * rows)? };
    let op = out_ptr(&dev, &mut out);
    let (rows_i, v_i) = (rows as i32, v as i32);
    launch!(
        &dev,
        "ce_row_stats",
        rows_cfg(rows, 1 << 20),
        xp,
        tp,
        op,
        rows_i,
        v_i
    );
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// Rows, vocabulary, and the targets' and coefficients' pointers of a gradient call.
fn ce_grad_args(
    xl: &Layout,
    (t, tl): (&CudaStorage, &Layout),
    (lc, ll): (&CudaStorage, &Layout),
) -> Result<(usize, usize, u64, u64)> {
    let (rows, v) = xl.shape().dims2()?;
    if tl.shape().elem_count() != rows || ll.shape().elem_count() != 2 * rows {
        bail!(
            "token-loss grad: targets {:?} / coefs {:?} for {rows} rows",
            tl.dims(),
            ll.dims()
        )
    }
    let tp = ptr_of::<u32>(t, tl, "token-loss targets")?;
    let lp = ptr(lc, ll, "token-loss coefs")?;
    Ok((rows, v, tp, lp))
}

/// The logits' gradient in place: `coef · (onehot − softmax)` per row, `lc [rows, 2]` =
/// (log-sum-exp, coef).
pub(crate) fn ce_row_grad(
    (x, xl): (&mut CudaStorage, &Layout),
    t: (&CudaStorage, &Layout),
    lc: (&CudaStorage, &Layout),
) -> Result<()> {
    let (rows, v, tp, lp) = ce_grad_args(xl, t, lc)?;
    let xp = ptr(x, xl, "token-loss logits")?;
    let dev = x.device().clone();
    let (rows_i, v_i) = (rows as i32, v as i32);
    launch!(
        &dev,
        "ce_row_grad",
        rows_cfg(rows, 1 << 20),
        xp,
        tp,
        lp,
        rows_i,
        v_i
    );
    Ok(())
}

/// [`ce_row_grad`] into a new bf16 `[rows, V]` buffer, the logits left as they are.
pub(crate) fn ce_row_grad_bf16(
    (x, xl): (&CudaStorage, &Layout),
    t: (&CudaStorage, &Layout),
    lc: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let (rows, v, tp, lp) = ce_grad_args(xl, t, lc)?;
    let xp = ptr(x, xl, "token-loss logits")?;
    let dev = x.device().clone();
    // SAFETY: the kernel writes every element of every row.
    let mut y = unsafe { dev.alloc::<half::bf16>(rows * v)? };
    let yp = bf16_ptr(&dev, &mut y);
    let (rows_i, v_i) = (rows as i32, v as i32);
    launch!(
        &dev,
        "ce_row_grad_bf16",
        rows_cfg(rows, 1 << 20),
        xp,
        yp,
        tp,
        lp,
        rows_i,
        v_i
    );
    Ok(CudaStorage::wrap_cuda_slice(y, dev))
}

/// Makes the device's default memory pool keep freed memory (release threshold ∞), as
/// PyTorch's caching allocator does. cudarc allocates stream-ordered from that pool, whose
/// default threshold of 0 hands every freed byte back to the driver at each
/// synchronisation, so the next step maps it again (every op's output is a fresh
/// allocation in candle). `RINGTUNE_CUDA_POOL=release` keeps the driver's default.
pub(crate) fn keep_pool(dev: &CudaDevice) -> Result<()> {
    use candle_core::cuda::cudarc::driver::sys;
    if std::env::var("RINGTUNE_CUDA_POOL").is_ok_and(|v| v == "release") {
        return Ok(());
    }
    let cu_dev = dev.cuda_stream().context().cu_device();
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: plain driver calls on a valid device handle with out-pointers to locals.
    unsafe {
        let r = sys::cuDeviceGetDefaultMemPool(&mut pool, cu_dev);
        if r != sys::CUresult::CUDA_SUCCESS {
            bail!("cuDeviceGetDefaultMemPool: {r:?}")
        }
        let r = sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold) as *mut u64 as *mut _,
        );
        if r != sys::CUresult::CUDA_SUCCESS {
            bail!("cuMemPoolSetAttribute(release threshold): {r:?}")
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The attention block under a half-precision base: bf16 operands and probabilities.

/// Whether the block runs its GEMMs in bf16 under a half-precision base (`RINGTUNE_ATTN=tf32`
/// keeps f32 operands with TF32 GEMMs instead, for comparison).
pub(crate) fn attn_bf16() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("RINGTUNE_ATTN").map_or(true, |v| v != "tf32"))
}

fn pack_bf16(
    dev: &CudaDevice,
    x: BlockDims,
    heads: usize,
    (src, dst): (u64, u64),
    (cos, sin): (u64, u64),
    sign: i32,
) -> Result<()> {
    let n = x.b * x.t * heads * (x.d / 2);
    let (b, t, h, g, d) = (
        x.b as i32,
        x.t as i32,
        heads as i32,
        x.kv as i32,
        x.d as i32,
    );
    launch!(
        dev,
        "attn_pack_bf16",
        elems_cfg(n),
        src,
        dst,
        cos,
        sin,
        b,
        t,
        h,
        g,
        d,
        sign
    );
    Ok(())
}

/// q, k (RoPE applied) and v from the projection layouts into packed bf16.
fn pack_qkv_bf16(
    dev: &CudaDevice,
    x: BlockDims,
    (q, k, v): (u64, u64, u64),
    (q4, k4, v4): (u64, u64, u64),
    tabs: (u64, u64),
) -> Result<()> {
    pack_bf16(dev, x, x.heads, (q, q4), tabs, 1)?;
    pack_bf16(dev, x, x.kv, (k, k4), tabs, 1)?;
    pack_bf16(dev, x, x.kv, (v, v4), tabs, 0)
}

/// A kernel-name suffix and its launch shape for a number of rows.
type WarpVariant = (&'static str, fn(usize) -> LaunchConfig);

/// The warp-per-row softmax variant for rows of `t` keys and its launch shape (`None`:
/// longer than 2048 keys, or `RINGTUNE_SOFTMAX=block`; the block-per-row kernels run).
fn warp_kernel(t: usize) -> Option<WarpVariant> {
    static BLOCK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *BLOCK.get_or_init(|| std::env::var("RINGTUNE_SOFTMAX").is_ok_and(|v| v == "block")) {
        return None;
    }
    match t {
        0..=1024 => Some(("w32", warp_cfg)),
        1025..=2048 => Some(("w64", warp_cfg)),
        _ => None,
    }
}

/// One warp per row, 8 rows per 256-thread block.
fn warp_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Scores (f32, into `s`) and bf16 probabilities (into `p`) for packed bf16 q, k.
fn probs_bf16(
    dev: &CudaDevice,
    cfg: &AttnCfg,
    x: AttnDims,
    (q, k): (u64, u64),
    (s, p): (u64, u64),
) -> Result<()> {
    gemm_bf16(
        dev,
        (x.r, x.t, x.d),
        x.bg,
        (q, false, x.r * x.d),
        (k, true, x.t * x.d),
        (s, x.r * x.t),
        cfg.scale,
    )?;
    let rows = x.bg * x.r;
    let kv = cfg.key_valid_ptr()?;
    let (r, t, g, tq) = (x.r as i32, x.t as i32, x.groups as i32, cfg.tq as i32);
    let w = cfg.window.unwrap_or(0) as i32;
    let rows_i = rows as i32;
    let warp = warp_kernel(x.t);
    let name = warp.map_or("attn_softmax_fwd_bf16".to_string(), |(sfx, _)| {
        format!("attn_softmax_fwd_bf16_{sfx}")
    });
    let cfg = warp.map_or(rows_cfg(rows, x.t), |(_, c)| c(rows));
    launch!(dev, &name, cfg, s, p, rows_i, r, t, g, tq, w, kv);
    Ok(())
}

/// [`attn_block_fwd`] with bf16 operands and probabilities.
pub(crate) fn attn_block_fwd_bf16(
    cfg: &AttnCfg,
    x: BlockDims,
    (q, k, v): (u64, u64, u64),
    (cos, sin): (&Tensor, &Tensor),
    dev: &CudaDevice,
) -> Result<CudaSlice<f32>> {
    let (nq, nk) = (x.b * x.t * x.heads * x.d, x.b * x.t * x.kv * x.d);
    let a = x.attn();
    let ns = a.bg * a.r * a.t;
    let tabs = (tensor_ptr(cos, "rope cos")?, tensor_ptr(sin, "rope sin")?);
    // SAFETY: every buffer is fully written (pack kernels, GEMMs, softmax) before it is
    // read. Layout: f32 [S (ns) | o4 (nq)], bf16 [q4 | k4 | v4 | P (ns)].
    let mut f = unsafe { dev.alloc::<f32>(ns + nq)? };
    let mut h = unsafe { dev.alloc::<half::bf16>(nq + 2 * nk + ns)? };
    let fb = out_ptr(dev, &mut f);
    let hb = {
        let stream = dev.cuda_stream();
        let (p, _g) = h.device_ptr_mut(&stream);
        p
    };
    let (sp, o4) = (fb, fb + (ns * 4) as u64);
    let hat = |i: usize| hb + (i * 2) as u64;
    let (q4, k4, v4, pp) = (hat(0), hat(nq), hat(nq + nk), hat(nq + 2 * nk));
    pack_qkv_bf16(dev, x, (q, k, v), (q4, k4, v4), tabs)?;
    probs_bf16(dev, cfg, a, (q4, k4), (sp, pp))?;
    gemm_bf16(
        dev,
        (a.r, a.d, a.t),
        a.bg,
        (pp, false, a.r * a.t),
        (v4, false, a.t * a.d),
        (o4, a.r * a.d),
        1.0,
    )?;
    let o = unpack_out(dev, x, o4, tabs)?;
    drop((f, h));
    Ok(o)
}

/// [`attn_block_bwd`] with bf16 operands and probabilities.
pub(crate) fn attn_block_bwd_bf16(
    cfg: &AttnCfg,
    x: BlockDims,
    (q, k, v, g): (u64, u64, u64, u64),
    (cos, sin): (&Tensor, &Tensor),
    dev: &CudaDevice,
) -> Result<CudaSlice<f32>> {
    let (nq, nk) = (x.b * x.t * x.heads * x.d, x.b * x.t * x.kv * x.d);
    let a = x.attn();
    let ns = a.bg * a.r * a.t;
    let tabs = (tensor_ptr(cos, "rope cos")?, tensor_ptr(sin, "rope sin")?);
    // SAFETY: every buffer is fully written before it is read. Layout: f32 [S, then dP
    // (ns) | dq4 (nq) | dk4 | dv4 (nk each)], bf16 [q4 | g4 (nq each) | k4 | v4 (nk each) |
    // P, then dS (ns)].
    let mut f = unsafe { dev.alloc::<f32>(ns + nq + 2 * nk)? };
    let mut h = unsafe { dev.alloc::<half::bf16>(2 * nq + 2 * nk + ns)? };
    let fb = out_ptr(dev, &mut f);
    let hb = {
        let stream = dev.cuda_stream();
        let (p, _g) = h.device_ptr_mut(&stream);
        p
    };
    let fat = |i: usize| fb + (i * 4) as u64;
    let hat = |i: usize| hb + (i * 2) as u64;
    let (sp, dq4, dk4, dv4) = (fat(0), fat(ns), fat(ns + nq), fat(ns + nq + nk));
    let (q4, g4, k4, v4, pp) = (
        hat(0),
        hat(nq),
        hat(2 * nq),
        hat(2 * nq + nk),
        hat(2 * nq + 2 * nk),
    );
    pack_qkv_bf16(dev, x, (q, k, v), (q4, k4, v4), tabs)?;
    pack_bf16(dev, x, x.heads, (g, g4), tabs, 0)?;
    probs_bf16(dev, cfg, a, (q4, k4), (sp, pp))?;
    // dV = Pᵀ · dO
    gemm_bf16(
        dev,
        (a.t, a.d, a.r),
        a.bg,
        (pp, true, a.r * a.t),
        (g4, false, a.r * a.d),
        (dv4, a.t * a.d),
        1.0,
    )?;
    // dP = dO · Vᵀ (into the scores' buffer)
    gemm_bf16(
        dev,
        (a.r, a.t, a.d),
        a.bg,
        (g4, false, a.r * a.d),
        (v4, true, a.t * a.d),
        (sp, a.r * a.t),
        1.0,
    )?;
    // dS = scale · P ⊙ (dP − rowsum(P ⊙ dP)), bf16, in place of P.
    let rows = a.bg * a.r;
    let (rows_i, t_i) = (rows as i32, a.t as i32);
    let scale = cfg.scale;
    let warp = warp_kernel(a.t);
    let name = warp.map_or("attn_softmax_bwd_bf16".to_string(), |(sfx, _)| {
        format!("attn_softmax_bwd_bf16_{sfx}")
    });
    let lc = warp.map_or(rows_cfg(rows, a.t), |(_, c)| c(rows));
    launch!(dev, &name, lc, pp, sp, rows_i, t_i, scale);
    // dQ = dS · K, dK = dSᵀ · Q
    gemm_bf16(
        dev,
        (a.r, a.d, a.t),
        a.bg,
        (pp, false, a.r * a.t),
        (k4, false, a.t * a.d),
        (dq4, a.r * a.d),
        1.0,
    )?;
    gemm_bf16(
        dev,
        (a.t, a.d, a.r),
        a.bg,
        (pp, true, a.r * a.t),
        (q4, false, a.r * a.d),
        (dk4, a.t * a.d),
        1.0,
    )?;
    let out = unpack_grads(dev, x, (dq4, dk4, dv4), tabs)?;
    drop((f, h));
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Flash attention (`src/cuda/flash.cu`): the block under a half-precision base with no
// `T × T` buffer at all, behind `RINGTUNE_ATTN=flash` (head size 64).

/// Whether the attention block runs the flash kernels: `RINGTUNE_ATTN=flash` and head size
/// 64 (under a half-precision base; the caller checks that). Off by default: the kernels
/// pass their CPU emulation (`tests/flash_emu.rs`) but have not yet run on a GPU.
pub(crate) fn attn_flash(d: usize) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = match crate::ops::FLASH_ATTENTION.load(std::sync::atomic::Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => *ON.get_or_init(|| std::env::var("RINGTUNE_ATTN").is_ok_and(|v| v == "flash")),
    };
    d == 64 && on
}

/// `o4` (f32 `[bg, r, 64]`) and `lse` (f32 `[bg·r]`) from packed bf16 q4, k4, v4.
fn flash_fwd(
    dev: &CudaDevice,
    cfg: &AttnCfg,
    a: AttnDims,
    (q4, k4, v4): (u64, u64, u64),
    (o4, lse): (u64, u64),
) -> Result<()> {
    let kv = cfg.key_valid_ptr()?;
    let (r, t, g, tq) = (a.r as i32, a.t as i32, a.groups as i32, cfg.tq as i32);
    let w = cfg.window.unwrap_or(0) as i32;
    let scale = cfg.scale;
    let lc = LaunchConfig {
        grid_dim: (a.r.div_ceil(64) as u32, a.bg as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(
        dev,
        "flash_fwd_d64",
        lc,
        q4,
        k4,
        v4,
        o4,
        lse,
        r,
        t,
        g,
        tq,
        w,
        kv,
        scale
    );
    Ok(())
}

/// The bf16 device pointer of a fresh buffer.
fn bf16_ptr(dev: &CudaDevice, s: &mut CudaSlice<half::bf16>) -> u64 {
    let stream = dev.cuda_stream();
    let (p, _g) = s.device_ptr_mut(&stream);
    p
}

/// [`attn_block_fwd_bf16`] through the flash kernel; also each row's log-sum-exp (f32,
/// `[bg·r]`), which lets the backward skip running the forward again.
pub(crate) fn attn_block_fwd_flash(
    cfg: &AttnCfg,
    x: BlockDims,
    (q, k, v): (u64, u64, u64),
    (cos, sin): (&Tensor, &Tensor),
    dev: &CudaDevice,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    if x.d != 64 {
        bail!("flash attention: head size {} (only 64)", x.d)
    }
    let (nq, nk) = (x.b * x.t * x.heads * x.d, x.b * x.t * x.kv * x.d);
    let a = x.attn();
    let tabs = (tensor_ptr(cos, "rope cos")?, tensor_ptr(sin, "rope sin")?);
    // SAFETY: every buffer is fully written (pack kernels; the flash kernel writes every
    // row of o4 and lse) before it is read. Layout: bf16 [q4 | k4 | v4].
    let mut h = unsafe { dev.alloc::<half::bf16>(nq + 2 * nk)? };
    let mut o4 = unsafe { dev.alloc::<f32>(nq)? };
    let mut lse = unsafe { dev.alloc::<f32>(a.bg * a.r)? };
    let hb = bf16_ptr(dev, &mut h);
    let hat = |i: usize| hb + (i * 2) as u64;
    let (q4, k4, v4) = (hat(0), hat(nq), hat(nq + nk));
    let (o4p, lsep) = (out_ptr(dev, &mut o4), out_ptr(dev, &mut lse));
    pack_qkv_bf16(dev, x, (q, k, v), (q4, k4, v4), tabs)?;
    flash_fwd(dev, cfg, a, (q4, k4, v4), (o4p, lsep))?;
    let o = unpack_out(dev, x, o4p, tabs)?;
    drop((o4, h));
    Ok((o, lse))
}

/// [`attn_block_bwd_bf16`] through the flash kernels: the output and log-sum-exp (from
/// `saved` = the forward's output `o` in the projection layout and its log-sum-exp, else by
/// running the forward again), the rows' `Σ dO ⊙ O`, then one pass over the key tiles.
pub(crate) fn attn_block_bwd_flash(
    cfg: &AttnCfg,
    x: BlockDims,
    (q, k, v, g): (u64, u64, u64, u64),
    (cos, sin): (&Tensor, &Tensor),
    saved: Option<(u64, u64)>,
    dev: &CudaDevice,
) -> Result<CudaSlice<f32>> {
    if x.d != 64 {
        bail!("flash attention: head size {} (only 64)", x.d)
    }
    let (nq, nk) = (x.b * x.t * x.heads * x.d, x.b * x.t * x.kv * x.d);
    let a = x.attn();
    let rows = a.bg * a.r;
    let tabs = (tensor_ptr(cos, "rope cos")?, tensor_ptr(sin, "rope sin")?);
    // SAFETY: every buffer is fully written before it is read (pack kernels; the forward
    // or the pack of `saved`'s output writes o4, the forward lse when nothing is saved, the
    // delta kernel every row). The gradients are zeroed: the backward adds into them.
    // Layout: bf16 [q4 | g4 | k4 | v4], f32 [o4 (nq) | lse | delta (rows each)], zeroed
    // f32 [dq4 (nq) | dk4 | dv4 (nk each)].
    let mut h = unsafe { dev.alloc::<half::bf16>(2 * nq + 2 * nk)? };
    let mut f = unsafe { dev.alloc::<f32>(nq + 2 * rows)? };
    let mut grads = dev.alloc_zeros::<f32>(nq + 2 * nk)?;
    let hb = bf16_ptr(dev, &mut h);
    let fb = out_ptr(dev, &mut f);
    let gz = out_ptr(dev, &mut grads);
    let hat = |i: usize| hb + (i * 2) as u64;
    let fat = |i: usize| fb + (i * 4) as u64;
    let (q4, g4, k4, v4) = (hat(0), hat(nq), hat(2 * nq), hat(2 * nq + nk));
    let (o4, delta) = (fat(0), fat(nq + rows));
    let (dq4, dk4, dv4) = (gz, gz + (nq * 4) as u64, gz + ((nq + nk) * 4) as u64);
    pack_qkv_bf16(dev, x, (q, k, v), (q4, k4, v4), tabs)?;
    pack_bf16(dev, x, x.heads, (g, g4), tabs, 0)?;
    let lse = match saved {
        // The output back in the packed layout (the inverse of `unpack_out`'s permutation,
        // so the forward's o4 exactly), and the forward's log-sum-exp as it is.
        Some((o, lse)) => {
            pack(dev, x, x.heads, (o, o4), tabs, 0, true)?;
            lse
        }
        None => {
            let lse = fat(nq);
            flash_fwd(dev, cfg, a, (q4, k4, v4), (o4, lse))?;
            lse
        }
    };
    let rows_i = rows as i32;
    launch!(
        dev,
        "flash_bwd_delta_d64",
        warp_cfg(rows),
        g4,
        o4,
        delta,
        rows_i
    );
    let kv = cfg.key_valid_ptr()?;
    let (r, t, gr, tq) = (a.r as i32, a.t as i32, a.groups as i32, cfg.tq as i32);
    let w = cfg.window.unwrap_or(0) as i32;
    let scale = cfg.scale;
    // Up to 4 blocks per key tile, one per 16 query tiles: the first key tiles are seen by
    // every query, and one block looping over all of them would be the critical path.
    let splits = (a.r.div_ceil(64) / 16).clamp(1, 4) as u32;
    let lc = LaunchConfig {
        grid_dim: (a.t.div_ceil(32) as u32, a.bg as u32, splits),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(
        dev,
        "flash_bwd_d64",
        lc,
        q4,
        k4,
        v4,
        g4,
        lse,
        delta,
        dq4,
        dk4,
        dv4,
        r,
        t,
        gr,
        tq,
        w,
        kv,
        scale
    );
    let out = unpack_grads(dev, x, (dq4, dk4, dv4), tabs)?;
    drop((f, h, grads));
    Ok(out)
}
