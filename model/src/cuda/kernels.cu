// ringtune's CUDA kernels (compiled to PTX by model/build.rs under the `cuda` feature and
// loaded at run time by model/src/cuda.rs). All f32, all contiguous row-major. Also compiled
// on the CPU against emu.h (RINGTUNE_EMU) by model/tests/kernels_emu.rs, which checks every
// kernel here against a double-precision reference without a GPU.
//
// One block per row for the row-wise kernels (softmax, RMSNorm); grid-stride loops for the
// element-wise ones. Reductions: warp shuffles, then one value per warp in shared memory.

#include <stdint.h>
#ifndef RINGTUNE_EMU
#include <cuda_bf16.h>

#define NEG_INF (__int_as_float(0xff800000))
#endif

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // `part` may still be read by a previous call
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = lane < (blockDim.x >> 5) ? part[lane] : 0.f;
        w = warp_sum(w);
        if (lane == 0) total = w;
    }
    __syncthreads();
    return total;
}

__device__ float block_max(float v) {
    __shared__ float part[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = lane < (blockDim.x >> 5) ? part[lane] : NEG_INF;
        w = warp_max(w);
        if (lane == 0) total = w;
    }
    __syncthreads();
    return total;
}

// Masked softmax of attention scores, in place. `s` is [rows, T], rows = B·G·R where each
// of the B·G (batch, kv head) blocks stacks R = rep·tq query rows, row r of a block being
// query position r % tq; batch row b = block / groups. Key j is visible to query i when
// j <= i, (window == 0 or i − j < window) and (key_valid == NULL or key_valid[b·T + j]).
// Masked keys get exactly 0; a row that sees no key becomes all zeros. The scores already
// carry the 1/√d scale (the GEMM's alpha).
extern "C" __global__ void attn_softmax_fwd(float* s, int rows, int R, int T, int groups,
                                            int tq, int window, const uint8_t* key_valid) {
    int row = blockIdx.x;
    if (row >= rows) return;
    int blk = row / R;
    int i = (row % R) % tq;
    int b = blk / groups;
    float* x = s + (size_t)row * T;
    int lo = window > 0 ? max(0, i + 1 - window) : 0;
    int hi = min(i + 1, T);
    const uint8_t* kv = key_valid ? key_valid + (size_t)b * T : nullptr;
    float m = NEG_INF;
    for (int j = lo + threadIdx.x; j < hi; j += blockDim.x)
        if (!kv || kv[j]) m = fmaxf(m, x[j]);
    m = block_max(m);
    float sum = 0.f;
    if (m != NEG_INF)
        for (int j = lo + threadIdx.x; j < hi; j += blockDim.x)
            if (!kv || kv[j]) sum += expf(x[j] - m);
    sum = block_sum(sum);
    float inv = (m == NEG_INF || sum == 0.f) ? 0.f : 1.f / sum;
    for (int j = threadIdx.x; j < T; j += blockDim.x) {
        bool ok = j >= lo && j < hi && (!kv || kv[j]) && m != NEG_INF;
        x[j] = ok ? expf(x[j] - m) * inv : 0.f;
    }
}

// Softmax backward, in place on dp: ds = scale · p ⊙ (dp − Σ p ⊙ dp), rows of length T.
extern "C" __global__ void attn_softmax_bwd(const float* p, float* dp, int rows, int T,
                                            float scale) {
    int row = blockIdx.x;
    if (row >= rows) return;
    const float* pr = p + (size_t)row * T;
    float* gr = dp + (size_t)row * T;
    float dot = 0.f;
    for (int j = threadIdx.x; j < T; j += blockDim.x) dot += pr[j] * gr[j];
    dot = block_sum(dot);
    for (int j = threadIdx.x; j < T; j += blockDim.x) gr[j] = scale * pr[j] * (gr[j] - dot);
}

// RMSNorm with a frozen weight: y = w ⊙ x · rsqrt(mean(x²) + eps), rows of length h.
extern "C" __global__ void rms_norm_fwd(const float* x, const float* w, float* y, int rows,
                                        int h, float eps) {
    int row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + (size_t)row * h;
    float* yr = y + (size_t)row * h;
    float ss = 0.f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) ss += xr[j] * xr[j];
    ss = block_sum(ss);
    float r = rsqrtf(ss / h + eps);
    for (int j = threadIdx.x; j < h; j += blockDim.x) yr[j] = w[j] * (xr[j] * r);
}

// Its input gradient: dx = r (w ⊙ g) − x · r³ · mean(w ⊙ g ⊙ x).
extern "C" __global__ void rms_norm_bwd(const float* x, const float* g, const float* w,
                                        float* dx, int rows, int h, float eps) {
    int row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + (size_t)row * h;
    const float* gr = g + (size_t)row * h;
    float* dr = dx + (size_t)row * h;
    float ss = 0.f, dot = 0.f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        ss += xr[j] * xr[j];
        dot += xr[j] * gr[j] * w[j];
    }
    ss = block_sum(ss);
    dot = block_sum(dot);
    float r = rsqrtf(ss / h + eps);
    float c = dot * r * r * r / h;
    for (int j = threadIdx.x; j < h; j += blockDim.x) dr[j] = r * (w[j] * gr[j]) - xr[j] * c;
}

// SwiGLU: y = silu(g) · u.
__device__ __forceinline__ float swiglu_one(float g, float u) { return g / (1.f + expf(-g)) * u; }

// Its gradients for one element: dg = d · u · σ(g)(1 + g(1 − σ(g))), du = d · g · σ(g).
__device__ __forceinline__ void swiglu_grads(float g, float u, float d, float* dg, float* du) {
    float sig = 1.f / (1.f + expf(-g));
    *dg = d * u * (sig * (1.f + g * (1.f - sig)));
    *du = d * g * sig;
}

extern "C" __global__ void swiglu_fwd(const float* g, const float* u, float* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        y[i] = swiglu_one(g[i], u[i]);
}

// Its gradients, written to dgu = [dg (n) | du (n)].
extern "C" __global__ void swiglu_bwd(const float* g, const float* u, const float* d,
                                      float* dgu, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        swiglu_grads(g[i], u[i], d[i], &dgu[i], &dgu[n + i]);
}

// The same two over float4s (n4 = n / 4; every pointer 16-byte aligned, which the host
// checks; the CPU emulation checks it too): one 16-byte load or store per array and
// thread instead of four 4-byte ones, for the biggest element-wise tensors of a layer.
extern "C" __global__ void swiglu_fwd_v4(const float4* g, const float4* u, float4* y,
                                         long long n4) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n4;
         i += (long long)gridDim.x * blockDim.x) {
#ifdef RINGTUNE_EMU
        emu_check_align(&g[i], 16, "swiglu_fwd_v4 g");
        emu_check_align(&u[i], 16, "swiglu_fwd_v4 u");
        emu_check_align(&y[i], 16, "swiglu_fwd_v4 y");
#endif
        float4 a = g[i], b = u[i];
        y[i] = make_float4(swiglu_one(a.x, b.x), swiglu_one(a.y, b.y), swiglu_one(a.z, b.z),
                           swiglu_one(a.w, b.w));
    }
}

extern "C" __global__ void swiglu_bwd_v4(const float4* g, const float4* u, const float4* d,
                                         float4* dgu, long long n4) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n4;
         i += (long long)gridDim.x * blockDim.x) {
#ifdef RINGTUNE_EMU
        emu_check_align(&dgu[i], 16, "swiglu_bwd_v4 dg");
        emu_check_align(&dgu[n4 + i], 16, "swiglu_bwd_v4 du");
#endif
        float4 a = g[i], b = u[i], c = d[i], dg, du;
        swiglu_grads(a.x, b.x, c.x, &dg.x, &du.x);
        swiglu_grads(a.y, b.y, c.y, &dg.y, &du.y);
        swiglu_grads(a.z, b.z, c.z, &dg.z, &du.z);
        swiglu_grads(a.w, b.w, c.w, &dg.w, &du.w);
        dgu[i] = dg;
        dgu[n4 + i] = du;
    }
}

// RoPE ("rotate half") on x [prefix, T, d] with tables cos, sin [T, d/2]; sign −1 rotates
// by −θ (the backward). One thread per (row, position, i < d/2) pair.
extern "C" __global__ void rope_fwd(const float* x, const float* cos, const float* sin, float* y,
                                    long long prefix, int T, int d, float sign) {
    int half = d / 2;
    long long n = prefix * T * half;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        int i = (int)(idx % half);
        long long rp = idx / half;  // row · T + position
        int p = (int)(rp % T);
        const float* xr = x + rp * d;
        float* yr = y + rp * d;
        float c = cos[(size_t)p * half + i], s = sign * sin[(size_t)p * half + i];
        float x1 = xr[i], x2 = xr[i + half];
        yr[i] = x1 * c - x2 * s;
        yr[i + half] = x2 * c + x1 * s;
    }
}

// y[i, j] += b[j] for y [m, n].
extern "C" __global__ void add_bias_rows(float* y, const float* b, long long m, int n) {
    long long total = m * n;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x)
        y[i] += b[i % n];
}

// A running log-sum-exp as (m, s) with s = Σ exp(x − m) over the values seen: merges
// (m2, s2) into (m, s). Two empty ones (m = −∞) stay empty.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    float mn = fmaxf(m, m2);
    if (mn == NEG_INF) return;
    s = s * expf(m - mn) + s2 * expf(m2 - mn);
    m = mn;
}

// lse_merge over the block (blockDim.x a multiple of 32, at most 1024); every thread gets
// the block's (m, s).
__device__ void block_lse(float& m, float& s) {
    __shared__ float pm[32], ps[32];
    __shared__ float tm, ts;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffff, m, o), s2 = __shfl_xor_sync(0xffffffff, s, o);
        lse_merge(m, s, m2, s2);
    }
    __syncthreads();
    if (lane == 0) {
        pm[warp] = m;
        ps[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
        bool have = lane < (blockDim.x >> 5);
        float wm = have ? pm[lane] : NEG_INF, ws = have ? ps[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) {
            float m2 = __shfl_xor_sync(0xffffffff, wm, o);
            float s2 = __shfl_xor_sync(0xffffffff, ws, o);
            lse_merge(wm, ws, m2, s2);
        }
        if (lane == 0) {
            tm = wm;
            ts = ws;
        }
    }
    __syncthreads();
    m = tm;
    s = ts;
}

// Token loss, per row of logits x [rows, V] (one block per row): out[2·row] = log p(target)
// = (x_t − max) − log Σ exp(x − max), as PyTorch's log_softmax; out[2·row + 1] = the
// log-sum-exp (max + log Σ). One pass over the row (an online log-sum-exp), so a row is read
// once even when it no longer sits in L2 for a second pass (151,936 logits are 594 KiB).
extern "C" __global__ void ce_row_stats(const float* x, const unsigned int* tgt, float* out,
                                        int rows, int V) {
    int row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + (size_t)row * V;
    float m = NEG_INF, s = 0.f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        float v = xr[j];
        if (v > m) {
            s = s * expf(m - v) + 1.f;
            m = v;
        } else {
            s += expf(v - m);
        }
    }
    block_lse(m, s);
    if (threadIdx.x == 0) {
        float ls = logf(s);
        out[2 * row] = (xr[tgt[row]] - m) - ls;
        out[2 * row + 1] = m + ls;
    }
}

// The logits' gradient in place: x = coef · (onehot(target) − softmax(x)), with
// lc[2·row] the row's log-sum-exp and lc[2·row + 1] its coefficient dℓ/dlogp.
extern "C" __global__ void ce_row_grad(float* x, const unsigned int* tgt, const float* lc,
                                       int rows, int V) {
    int row = blockIdx.x;
    if (row >= rows) return;
    float* xr = x + (size_t)row * V;
    float lse = lc[2 * row], c = lc[2 * row + 1];
    unsigned int t = tgt[row];
    for (int j = threadIdx.x; j < V; j += blockDim.x)
        xr[j] = c == 0.f ? 0.f : c * ((j == (int)t ? 1.f : 0.f) - expf(xr[j] - lse));
}

// ce_row_grad into a separate bf16 buffer y (x is left as it is): the gradient as the
// half-precision GEMM of the head's backward reads it, without an f32 write and a cast.
extern "C" __global__ void ce_row_grad_bf16(const float* x, __nv_bfloat16* y,
                                            const unsigned int* tgt, const float* lc, int rows,
                                            int V) {
    int row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + (size_t)row * V;
    __nv_bfloat16* yr = y + (size_t)row * V;
    float lse = lc[2 * row], c = lc[2 * row + 1];
    unsigned int t = tgt[row];
    for (int j = threadIdx.x; j < V; j += blockDim.x)
        yr[j] = __float2bfloat16(c == 0.f ? 0.f
                                          : c * ((j == (int)t ? 1.f : 0.f) - expf(xr[j] - lse)));
}

// Attention layouts. The projections give rows [B, T, heads, d]; the attention GEMMs want
// each (batch, kv group) block contiguous with the `rep = heads / G` query heads that share
// a kv head stacked along the rows: [B, G, rep·T, d]. `to_packed` = 1 moves src (projection
// layout) to dst (packed layout), 0 the reverse; on the way the pair (i, i + d/2) is
// rotated by RoPE at position t (sign +1: by θ, −1: by −θ — the backward, 0: no rotation).
extern "C" __global__ void attn_pack(const float* src, float* dst, const float* cos,
                                     const float* sin, int B, int T, int heads, int G, int d,
                                     int sign, int to_packed) {
    int half = d / 2;
    int rep = heads / G;
    long long n = (long long)B * T * heads * half;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        int i = (int)(idx % half);
        long long rest = idx / half;
        int h = (int)(rest % heads);
        rest /= heads;
        int t = (int)(rest % T);
        int b = (int)(rest / T);
        size_t s_off = (((size_t)b * T + t) * heads + h) * d;
        size_t p_off = (((size_t)b * G + h / rep) * ((size_t)rep * T) + (size_t)(h % rep) * T + t) * d;
        const float* x = src + (to_packed ? s_off : p_off);
        float* y = dst + (to_packed ? p_off : s_off);
        float x1 = x[i], x2 = x[i + half];
        if (sign != 0) {
            float c = cos[(size_t)t * half + i], s = (float)sign * sin[(size_t)t * half + i];
            y[i] = x1 * c - x2 * s;
            y[i + half] = x2 * c + x1 * s;
        } else {
            y[i] = x1;
            y[i + half] = x2;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Attention under a half-precision base: operands and probabilities in bf16 for the tensor
// cores (as PyTorch's SDPA), scores, softmax arithmetic and GEMM accumulation in f32.

// attn_pack (to the packed layout only) writing bf16.
extern "C" __global__ void attn_pack_bf16(const float* src, __nv_bfloat16* dst, const float* cos,
                                          const float* sin, int B, int T, int heads, int G,
                                          int d, int sign) {
    int half = d / 2;
    int rep = heads / G;
    long long n = (long long)B * T * heads * half;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        int i = (int)(idx % half);
        long long rest = idx / half;
        int h = (int)(rest % heads);
        rest /= heads;
        int t = (int)(rest % T);
        int b = (int)(rest / T);
        size_t s_off = (((size_t)b * T + t) * heads + h) * d;
        size_t p_off = (((size_t)b * G + h / rep) * ((size_t)rep * T) + (size_t)(h % rep) * T + t) * d;
        float x1 = src[s_off + i], x2 = src[s_off + i + half];
        float y1 = x1, y2 = x2;
        if (sign != 0) {
            float c = cos[(size_t)t * half + i], s = (float)sign * sin[(size_t)t * half + i];
            y1 = x1 * c - x2 * s;
            y2 = x2 * c + x1 * s;
        }
        dst[p_off + i] = __float2bfloat16(y1);
        dst[p_off + i + half] = __float2bfloat16(y2);
    }
}

// attn_softmax_fwd reading f32 scores `s` and writing bf16 probabilities `p`.
extern "C" __global__ void attn_softmax_fwd_bf16(const float* s, __nv_bfloat16* p, int rows,
                                                 int R, int T, int groups, int tq, int window,
                                                 const uint8_t* key_valid) {
    int row = blockIdx.x;
    if (row >= rows) return;
    int blk = row / R;
    int i = (row % R) % tq;
    int b = blk / groups;
    const float* x = s + (size_t)row * T;
    __nv_bfloat16* y = p + (size_t)row * T;
    int lo = window > 0 ? max(0, i + 1 - window) : 0;
    int hi = min(i + 1, T);
    const uint8_t* kv = key_valid ? key_valid + (size_t)b * T : nullptr;
    float m = NEG_INF;
    for (int j = lo + threadIdx.x; j < hi; j += blockDim.x)
        if (!kv || kv[j]) m = fmaxf(m, x[j]);
    m = block_max(m);
    float sum = 0.f;
    if (m != NEG_INF)
        for (int j = lo + threadIdx.x; j < hi; j += blockDim.x)
            if (!kv || kv[j]) sum += expf(x[j] - m);
    sum = block_sum(sum);
    float inv = (m == NEG_INF || sum == 0.f) ? 0.f : 1.f / sum;
    for (int j = threadIdx.x; j < T; j += blockDim.x) {
        bool ok = j >= lo && j < hi && (!kv || kv[j]) && m != NEG_INF;
        y[j] = __float2bfloat16(ok ? expf(x[j] - m) * inv : 0.f);
    }
}

// Softmax backward with bf16 probabilities: pds holds P on entry and dS on exit,
// dS = scale · P ⊙ (dP − Σ P ⊙ dP) (f32 arithmetic, dP f32).
extern "C" __global__ void attn_softmax_bwd_bf16(__nv_bfloat16* pds, const float* dp, int rows,
                                                 int T, float scale) {
    int row = blockIdx.x;
    if (row >= rows) return;
    __nv_bfloat16* pr = pds + (size_t)row * T;
    const float* gr = dp + (size_t)row * T;
    float dot = 0.f;
    for (int j = threadIdx.x; j < T; j += blockDim.x) dot += __bfloat162float(pr[j]) * gr[j];
    dot = block_sum(dot);
    for (int j = threadIdx.x; j < T; j += blockDim.x) {
        float pv = __bfloat162float(pr[j]);
        pr[j] = __float2bfloat16(scale * pv * (gr[j] - dot));
    }
}

// Warp-per-row versions of the two bf16 softmax kernels for rows of at most 32·NV keys:
// each lane keeps its NV values in registers, so a row is read once and written once, and
// the reductions are warp shuffles (no block barriers). 8 rows per 256-thread block.
template <int NV>
__device__ void softmax_fwd_warp(const float* s, __nv_bfloat16* p, int rows, int R, int T,
                                 int groups, int tq, int window, const uint8_t* key_valid) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= rows) return;  // whole warps leave together
    int blk = row / R;
    int i = (row % R) % tq;
    int b = blk / groups;
    const float* x = s + (size_t)row * T;
    __nv_bfloat16* y = p + (size_t)row * T;
    int lo = window > 0 ? max(0, i + 1 - window) : 0;
    int hi = min(i + 1, T);
    const uint8_t* kv = key_valid ? key_valid + (size_t)b * T : nullptr;
    float v[NV];
    float m = NEG_INF;
#pragma unroll
    for (int c = 0; c < NV; c++) {
        int j = c * 32 + lane;
        float val = NEG_INF;
        if (j >= lo && j < hi && (!kv || kv[j])) val = x[j];
        v[c] = val;
        m = fmaxf(m, val);
    }
    m = warp_max(m);
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < NV; c++) {
        float e = (v[c] == NEG_INF || m == NEG_INF) ? 0.f : expf(v[c] - m);
        v[c] = e;
        sum += e;
    }
    sum = warp_sum(sum);
    float inv = (m == NEG_INF || sum == 0.f) ? 0.f : 1.f / sum;
#pragma unroll
    for (int c = 0; c < NV; c++) {
        int j = c * 32 + lane;
        if (j < T) y[j] = __float2bfloat16(v[c] * inv);
    }
}

template <int NV>
__device__ void softmax_bwd_warp(__nv_bfloat16* pds, const float* dp, int rows, int T,
                                 float scale) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    __nv_bfloat16* pr = pds + (size_t)row * T;
    const float* gr = dp + (size_t)row * T;
    float pv[NV], gv[NV];
    float dot = 0.f;
#pragma unroll
    for (int c = 0; c < NV; c++) {
        int j = c * 32 + lane;
        pv[c] = j < T ? __bfloat162float(pr[j]) : 0.f;
        gv[c] = j < T ? gr[j] : 0.f;
        dot += pv[c] * gv[c];
    }
    dot = warp_sum(dot);
#pragma unroll
    for (int c = 0; c < NV; c++) {
        int j = c * 32 + lane;
        if (j < T) pr[j] = __float2bfloat16(scale * pv[c] * (gv[c] - dot));
    }
}

extern "C" __global__ void attn_softmax_fwd_bf16_w32(const float* s, __nv_bfloat16* p, int rows,
                                                     int R, int T, int groups, int tq,
                                                     int window, const uint8_t* key_valid) {
    softmax_fwd_warp<32>(s, p, rows, R, T, groups, tq, window, key_valid);
}

extern "C" __global__ void attn_softmax_fwd_bf16_w64(const float* s, __nv_bfloat16* p, int rows,
                                                     int R, int T, int groups, int tq,
                                                     int window, const uint8_t* key_valid) {
    softmax_fwd_warp<64>(s, p, rows, R, T, groups, tq, window, key_valid);
}

extern "C" __global__ void attn_softmax_bwd_bf16_w32(__nv_bfloat16* pds, const float* dp,
                                                     int rows, int T, float scale) {
    softmax_bwd_warp<32>(pds, dp, rows, T, scale);
}

extern "C" __global__ void attn_softmax_bwd_bf16_w64(__nv_bfloat16* pds, const float* dp,
                                                     int rows, int T, float scale) {
    softmax_bwd_warp<64>(pds, dp, rows, T, scale);
}

// Flash attention (head size 64), in its own file so the CPU emulation test can compile it.
#include "flash.cu"
