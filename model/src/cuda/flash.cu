// Flash attention (forward and backward) for head size 64 on the tensor cores (WMMA, bf16
// operands, f32 accumulation), on the packed layouts of kernels.cu: q [BG, R, 64] with
// R = rep·tq query rows per (batch, kv head) block (row r is query position r % tq), k and v
// [BG, T, 64], all bf16. The masks are attn_softmax_fwd's: key j is visible to query i when
// j <= i, (window == 0 or i − j < window) and (key_valid == NULL or key_valid[b·T + j]),
// b = block / groups; a row that sees no key gets output 0 and zero gradients.
//
// Nothing T × T is ever stored: the forward keeps a running max and sum per row (the online
// softmax) and writes the output and each row's log-sum-exp; the backward recomputes the
// probabilities tile by tile from that log-sum-exp (FlashAttention-2's algorithm: one block
// per 32-key tile, looping over the query tiles that can see it, dK and dV accumulated in
// registers, dQ added to an f32 buffer with atomics).
//
// Included by kernels.cu. Also compiled on the CPU by model/tests/flash_emu.rs with
// model/src/cuda/emu.h (RINGTUNE_EMU), which runs every thread of a block as an OS thread,
// so the indexing, masking, tiling and synchronisation are tested without a GPU.

#ifndef RINGTUNE_EMU
#include <mma.h>
#include <cuda_bf16.h>
#endif

namespace flash {

using namespace nvcuda;

constexpr int D = 64;        // head size
constexpr int QT = 64;       // query rows per tile (4 warps × 16)
constexpr int KT = 32;       // keys per tile
// Row strides in shared memory, padded so that the softmax loops' lanes (two per row,
// interleaved columns) fall in different banks: without the padding every row starts in
// the same bank and those loops serialise 16- to 32-fold. Multiples of 16 bytes (WMMA).
constexpr int SLD = KT + 4;  // scores / dP, f32
constexpr int PLD = KT + 8;  // probabilities / dS, bf16
constexpr int OLD = D + 4;   // the forward's output accumulator, f32
constexpr int THREADS = 128;

typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> FragA;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::col_major> FragAT;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> FragB;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> FragBT;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> FragC;

// The positions of query rows [r0, r0 + n) of a block (n >= 1): the smallest and largest.
// Rows of one head are consecutive positions; a tile that crosses into the next head gets
// the whole range (only used to skip work, so a wider range is safe).
__device__ __forceinline__ void tile_positions(int r0, int n, int tq, int* lo, int* hi) {
    int p = r0 % tq;
    if (p + n - 1 < tq) {
        *lo = p;
        *hi = p + n - 1;
    } else {
        *lo = 0;
        *hi = tq - 1;
    }
}

__device__ __forceinline__ bool visible(int i, int j, int T, int window, const uint8_t* kv) {
    return j < T && j <= i && (window == 0 || i - j < window) && (!kv || kv[j]);
}

// Copies rows [row0, row0 + rows) of a [*, 64] bf16 matrix into shared memory (ld 64),
// rows at or past `limit` as zeros: 16 bytes (8 values) per thread and step. Rows are 128
// bytes and every buffer passed here starts on a 16-byte boundary (the packed tensors at
// multiples of 64 values into their allocation, the shared tiles __align__(32)); the CPU
// emulation checks it, as a GPU would fault on a misaligned vector access.
__device__ __forceinline__ void load_rows(__nv_bfloat16* dst, const __nv_bfloat16* src, int row0,
                                          int rows, int limit) {
    // (16 / sizeof: the emulator's f32-wide "bf16" of RINGTUNE_EMU_EXACT takes 4 per step.)
    constexpr int V = 16 / sizeof(__nv_bfloat16), PER_ROW = D / V;
    for (int idx = threadIdx.x; idx < rows * PER_ROW; idx += THREADS) {
        int r = idx / PER_ROW, c = (idx % PER_ROW) * V;
        const __nv_bfloat16* from = src + (size_t)(row0 + r) * D + c;
        __nv_bfloat16* to = dst + r * D + c;
#ifdef RINGTUNE_EMU
        emu_check_align(to, 16, "load_rows destination");
        if (row0 + r < limit) emu_check_align(from, 16, "load_rows source");
#endif
        uint4 val = make_uint4(0u, 0u, 0u, 0u);  // bf16 zeros
        if (row0 + r < limit) val = *reinterpret_cast<const uint4*>(from);
        *reinterpret_cast<uint4*>(to) = val;
    }
}

// out[16 × KT] (ld SLD) = A[16 × D] (ld D) · B[KT × D]ᵀ (ld D), for one warp.
__device__ __forceinline__ void warp_abt(float* out, const __nv_bfloat16* a,
                                         const __nv_bfloat16* b) {
    for (int n = 0; n < KT / 16; n++) {
        FragC c;
        wmma::fill_fragment(c, 0.f);
        for (int kk = 0; kk < D / 16; kk++) {
            FragA fa;
            FragBT fb;
            wmma::load_matrix_sync(fa, a + kk * 16, D);
            wmma::load_matrix_sync(fb, b + n * 16 * D + kk * 16, D);
            wmma::mma_sync(c, fa, fb, c);
        }
        wmma::store_matrix_sync(out + n * 16, c, SLD, wmma::mem_row_major);
    }
}

// acc[t] += Aᵀ · B over the QT rows: A [QT × KT] (ld PLD) from column kcol, B [QT × D]
// (ld D) from columns (nb0 + t)·16 — a warp's two 16 × 16 tiles of dK or dV.
__device__ __forceinline__ void warp_atb(FragC* acc, const __nv_bfloat16* a, int kcol,
                                         const __nv_bfloat16* b, int nb0) {
    for (int t = 0; t < 2; t++) {
        for (int kk = 0; kk < QT / 16; kk++) {
            FragAT fa;
            FragB fb;
            wmma::load_matrix_sync(fa, a + kk * 16 * PLD + kcol, PLD);
            wmma::load_matrix_sync(fb, b + kk * 16 * D + (nb0 + t) * 16, D);
            wmma::mma_sync(acc[t], fa, fb, acc[t]);
        }
    }
}

// out[16 × D] (ld ldo) = A[16 × KT] (ld PLD) · B[KT × D] (ld D), added to what `out` holds
// when `accumulate`, for one warp.
__device__ __forceinline__ void warp_ab(float* out, int ldo, const __nv_bfloat16* a,
                                        const __nv_bfloat16* b, bool accumulate) {
    for (int n = 0; n < D / 16; n++) {
        FragC c;
        if (accumulate) wmma::load_matrix_sync(c, out + n * 16, ldo, wmma::mem_row_major);
        else wmma::fill_fragment(c, 0.f);
        for (int kk = 0; kk < KT / 16; kk++) {
            FragA fa;
            FragB fb;
            wmma::load_matrix_sync(fa, a + kk * 16, PLD);
            wmma::load_matrix_sync(fb, b + kk * 16 * D + n * 16, D);
            wmma::mma_sync(c, fa, fb, c);
        }
        wmma::store_matrix_sync(out + n * 16, c, ldo, wmma::mem_row_major);
    }
}

}  // namespace flash

// Forward: o [BG, R, 64] f32 and lse [BG·R] f32 (log Σ exp(scale · q·k) over the visible
// keys; +inf for a row that sees none). Grid (ceil(R / 64), BG), 128 threads.
extern "C" __global__ void flash_fwd_d64(const __nv_bfloat16* q, const __nv_bfloat16* k,
                                         const __nv_bfloat16* v, float* o, float* lse, int R,
                                         int T, int groups, int tq, int window,
                                         const uint8_t* key_valid, float scale) {
    using namespace flash;
    __shared__ __align__(32) __nv_bfloat16 Qs[QT * D];
    __shared__ __align__(32) __nv_bfloat16 Ks[KT * D];
    __shared__ __align__(32) __nv_bfloat16 Vs[KT * D];
    __shared__ __align__(32) float Ss[QT * SLD];
    __shared__ __align__(32) __nv_bfloat16 Ps[QT * PLD];
    __shared__ __align__(32) float Os[QT * OLD];
    __shared__ float Ms[QT];
    __shared__ float Ls[QT];

    const int blk = blockIdx.y;
    const int r0 = blockIdx.x * QT;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const __nv_bfloat16* qb = q + (size_t)blk * R * D;
    const __nv_bfloat16* kb = k + (size_t)blk * T * D;
    const __nv_bfloat16* vb = v + (size_t)blk * T * D;
    const uint8_t* kv = key_valid ? key_valid + (size_t)(blk / groups) * T : nullptr;

    load_rows(Qs, qb, r0, QT, R);
    for (int idx = threadIdx.x; idx < QT * OLD; idx += THREADS) Os[idx] = 0.f;
    if (threadIdx.x < QT) {
        Ms[threadIdx.x] = NEG_INF;
        Ls[threadIdx.x] = 0.f;
    }
    int plo, phi;
    tile_positions(r0, min(QT, R - r0), tq, &plo, &phi);
    const int khi = min(T, phi + 1);
    const int klo = window > 0 ? max(0, plo + 1 - window) : 0;
    __syncthreads();

    // This lane's row of the warp's 16, and which of the row's columns (every other one,
    // from `half`) it handles.
    const int row = warp * 16 + lane / 2, half = lane % 2;
    const int rg = r0 + row;
    const int pos = rg < R ? rg % tq : -1;

    for (int j0 = klo; j0 < khi; j0 += KT) {
        __syncthreads();  // the previous tile's K and V are no longer read
        load_rows(Ks, kb, j0, KT, T);
        load_rows(Vs, vb, j0, KT, T);
        __syncthreads();
        // S = Q·Kᵀ for the warp's 16 rows.
        warp_abt(Ss + warp * 16 * SLD, Qs + warp * 16 * D, Ks);
        __syncwarp();
        // Online softmax: two lanes per row, every other column each.
        float* srow = Ss + row * SLD;
        float mx = NEG_INF;
        for (int c = half; c < KT; c += 2) {
            int j = j0 + c;
            float s = (pos >= 0 && visible(pos, j, T, window, kv)) ? srow[c] * scale : NEG_INF;
            srow[c] = s;
            mx = fmaxf(mx, s);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        const float m_old = Ms[row];
        const float m_new = fmaxf(m_old, mx);
        const float alpha = m_new == NEG_INF ? 1.f : expf(m_old - m_new);
        float sum = 0.f;
        __nv_bfloat16* prow = Ps + row * PLD;
        for (int c = half; c < KT; c += 2) {
            float p = srow[c] == NEG_INF ? 0.f : expf(srow[c] - m_new);
            prow[c] = __float2bfloat16(p);
            sum += p;
        }
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        float* orow = Os + row * OLD;
        // Once a row's maximum has settled, alpha is exactly 1: skip the shared-memory pass.
        if (alpha != 1.f)
            for (int c = half; c < D; c += 2) orow[c] *= alpha;
        __syncwarp();  // both lanes of a row have read Ms[row]
        if (half == 0) {
            Ms[row] = m_new;
            Ls[row] = Ls[row] * alpha + sum;
        }
        __syncwarp();
        // O += P·V for the warp's 16 rows.
        warp_ab(Os + warp * 16 * OLD, OLD, Ps + warp * 16 * PLD, Vs, true);
        __syncwarp();
    }
    __syncwarp();
    if (rg < R) {
        const float l = Ls[row];
        const float inv = l > 0.f ? 1.f / l : 0.f;
        float* out = o + ((size_t)blk * R + rg) * D;
        const float* orow = Os + row * OLD;
        for (int c = half; c < D; c += 2) out[c] = orow[c] * inv;
        if (half == 0) lse[(size_t)blk * R + rg] = l > 0.f ? Ms[row] + logf(l) : INFINITY;
    }
}

// delta[row] = Σ_c dO[row, c] · O[row, c] (the softmax backward's row term), one warp per
// row, 8 rows per 256-thread block.
extern "C" __global__ void flash_bwd_delta_d64(const __nv_bfloat16* dout, const float* o,
                                               float* delta, int rows) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const __nv_bfloat16* g = dout + (size_t)row * flash::D;
    const float* x = o + (size_t)row * flash::D;
    float s = __bfloat162float(g[lane]) * x[lane] + __bfloat162float(g[lane + 32]) * x[lane + 32];
    for (int m = 16; m > 0; m >>= 1) s += __shfl_xor_sync(0xffffffff, s, m);
    if (lane == 0) delta[row] = s;
}

// Backward: dq [BG, R, 64], dk and dv [BG, T, 64], all f32 and accumulated with atomics
// (zero them first). Grid (ceil(T / 32), BG, splits), 128 threads: block z of a key tile
// takes every splits-th query tile, so the first key tiles — which every later query sees,
// and which would otherwise each loop over all R / 64 query tiles in one block — spread
// over several blocks. `lse` and `delta` are the forward's and flash_bwd_delta_d64's.
extern "C" __global__ void flash_bwd_d64(const __nv_bfloat16* q, const __nv_bfloat16* k,
                                         const __nv_bfloat16* v, const __nv_bfloat16* dout,
                                         const float* lse, const float* delta, float* dq,
                                         float* dk, float* dv, int R, int T, int groups, int tq,
                                         int window, const uint8_t* key_valid, float scale) {
    using namespace flash;
    // [S, then dP (QT·SLD f32) | dO (QT·D bf16)] are together the dQ staging area (QT·D
    // f32) once both are dead, and at the end the dK and dV staging area (2·KT·D f32).
    __shared__ __align__(32) unsigned char raw[QT * SLD * 4 + QT * D * 2];
    __shared__ __align__(32) __nv_bfloat16 Qs[QT * D];
    __shared__ __align__(32) __nv_bfloat16 Ks[KT * D];
    __shared__ __align__(32) __nv_bfloat16 Vs[KT * D];
    __shared__ __align__(32) __nv_bfloat16 Ps[QT * PLD];
    __shared__ float Lse[QT];
    __shared__ float Dl[QT];
    float* Ss = (float*)raw;
    __nv_bfloat16* dOs = (__nv_bfloat16*)(raw + QT * SLD * 4);
    float* stage = (float*)raw;

    const int blk = blockIdx.y;
    const int j0 = blockIdx.x * KT;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const __nv_bfloat16* qb = q + (size_t)blk * R * D;
    const __nv_bfloat16* gb = dout + (size_t)blk * R * D;
    const uint8_t* kv = key_valid ? key_valid + (size_t)(blk / groups) * T : nullptr;

    load_rows(Ks, k + (size_t)blk * T * D, j0, KT, T);
    load_rows(Vs, v + (size_t)blk * T * D, j0, KT, T);

    // This warp's share of dK and dV: key rows kbk·16.., head columns (nb0 + t)·16...
    const int kbk = warp / 2, nb0 = (warp % 2) * 2;
    FragC dk_acc[2], dv_acc[2];
    for (int t = 0; t < 2; t++) {
        wmma::fill_fragment(dk_acc[t], 0.f);
        wmma::fill_fragment(dv_acc[t], 0.f);
    }
    const int row = warp * 16 + lane / 2, half = lane % 2;
    const int jhi = min(T, j0 + KT) - 1;  // this tile's last key

    for (int i0 = blockIdx.z * QT; i0 < R; i0 += QT * gridDim.z) {
        int plo, phi;
        tile_positions(i0, min(QT, R - i0), tq, &plo, &phi);
        if (phi < j0) continue;                              // causal: no row sees a key here
        if (window > 0 && plo - (window - 1) > jhi) continue;  // all keys left the window
        __syncthreads();  // the previous tile's shared buffers are no longer read
        load_rows(Qs, qb, i0, QT, R);
        load_rows(dOs, gb, i0, QT, R);
        if (threadIdx.x < QT) {
            int r = i0 + threadIdx.x;
            Lse[threadIdx.x] = r < R ? lse[(size_t)blk * R + r] : INFINITY;
            Dl[threadIdx.x] = r < R ? delta[(size_t)blk * R + r] : 0.f;
        }
        __syncthreads();
        // S = Q·Kᵀ (warp's 16 rows), then P = exp(scale·S − lse) on the visible keys.
        warp_abt(Ss + warp * 16 * SLD, Qs + warp * 16 * D, Ks);
        __syncwarp();
        const int rg = i0 + row;
        const int pos = rg < R ? rg % tq : -1;
        {
            const float* srow = Ss + row * SLD;
            __nv_bfloat16* prow = Ps + row * PLD;
            const float l = Lse[row];
            for (int c = half; c < KT; c += 2) {
                int j = j0 + c;
                bool ok = pos >= 0 && l != INFINITY && visible(pos, j, T, window, kv);
                prow[c] = __float2bfloat16(ok ? expf(srow[c] * scale - l) : 0.f);
            }
        }
        __syncthreads();  // all of P is written
        // dV += Pᵀ·dO (this warp's two tiles).
        warp_atb(dv_acc, Ps, kbk * 16, dOs, nb0);
        // dP = dO·Vᵀ (warp's 16 rows), into S's place.
        warp_abt(Ss + warp * 16 * SLD, dOs + warp * 16 * D, Vs);
        __syncthreads();  // every warp is done reading P for dV
        // dS = scale · P ⊙ (dP − delta), in P's place.
        {
            const float* dprow = Ss + row * SLD;
            __nv_bfloat16* prow = Ps + row * PLD;
            const float dl = Dl[row];
            for (int c = half; c < KT; c += 2) {
                float p = __bfloat162float(prow[c]);
                prow[c] = __float2bfloat16(scale * p * (dprow[c] - dl));
            }
        }
        __syncthreads();  // all of dS is written; S/dP and dO are dead from here on
        // dK += dSᵀ·Q (this warp's two tiles).
        warp_atb(dk_acc, Ps, kbk * 16, Qs, nb0);
        // dQ (warp's 16 rows) = dS·K, staged in shared memory, then added to dq.
        warp_ab(stage + warp * 16 * D, D, Ps + warp * 16 * PLD, Ks, false);
        __syncwarp();
        for (int idx = lane; idx < 16 * D; idx += 32) {
            int r = i0 + warp * 16 + idx / D;
            if (r < R) atomicAdd(dq + ((size_t)blk * R + r) * D + idx % D, stage[warp * 16 * D + idx]);
        }
    }
    __syncthreads();  // the staging area is free
    float* sk = stage;
    float* sv = stage + KT * D;
    for (int t = 0; t < 2; t++) {
        wmma::store_matrix_sync(sk + kbk * 16 * D + (nb0 + t) * 16, dk_acc[t], D, wmma::mem_row_major);
        wmma::store_matrix_sync(sv + kbk * 16 * D + (nb0 + t) * 16, dv_acc[t], D, wmma::mem_row_major);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < KT * D; idx += THREADS) {
        int j = j0 + idx / D;
        if (j < T) {
            atomicAdd(dk + ((size_t)blk * T + j) * D + idx % D, sk[idx]);
            atomicAdd(dv + ((size_t)blk * T + j) * D + idx % D, sv[idx]);
        }
    }
}
