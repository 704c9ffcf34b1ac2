// A CPU stand-in for the parts of CUDA that kernels.cu and flash.cu use, so that their
// kernels compile as C++20 and run on a machine without a GPU (model/tests/flash_emu.rs,
// model/tests/kernels_emu.rs). Every thread of a
// block is an OS thread; blocks run one after another, so a kernel's `static` locals
// (what `__shared__` becomes) are exactly one block's shared memory. __syncthreads and
// __syncwarp are barriers; shuffles go through a per-warp exchange array between two warp
// barriers. WMMA fragments hold the whole 16×16 tile in every lane: loads read it, mma_sync
// computes it (bf16 operands widened to f32, f32 accumulation, k in order), and a store is
// done by lane 0 only — so, as on a GPU, the other lanes see it only after a __syncwarp.
// Loads and stores abort on a pointer or leading dimension that breaks WMMA's alignment rules.
// It checks semantics (indexing, masking, tiling, synchronisation), not speed.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define NEG_INF (-INFINITY)

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 blockDim, gridDim;

using std::max;
using std::min;

struct EmuBlock {
    std::unique_ptr<std::barrier<>> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<float> exchange;  // one slot per thread, for shuffles
};
inline EmuBlock* emu_block = nullptr;

inline void __syncthreads() { emu_block->block->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
    emu_block->warps[threadIdx.x / 32]->arrive_and_wait();
}

inline float __shfl_xor_sync(unsigned, float v, int mask) {
    unsigned t = threadIdx.x, w = t / 32 * 32;
    emu_block->exchange[t] = v;
    __syncwarp();
    float r = emu_block->exchange[w + ((t % 32) ^ (unsigned)mask)];
    __syncwarp();
    return r;
}

inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

// CUDA's 16-byte vector types, for vectorised loads and copies (the harnesses build with
// -fno-strict-aliasing, as such copies reinterpret other element types).
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// Aborts on a pointer a GPU would fault on for an access of `bytes` bytes.
inline void emu_check_align(const void* p, size_t bytes, const char* what) {
    if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
        std::fprintf(stderr, "%s: %p is not %zu-byte aligned\n", what, p, bytes);
        std::abort();
    }
}

inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}

inline float atomicAdd(float* p, float v) {
    return std::atomic_ref<float>(*p).fetch_add(v);
}

#ifdef RINGTUNE_EMU_EXACT
// bf16 that keeps the whole f32: with the inputs already bf16 values, the kernels' only
// rounding (P and dS) is gone and what is left of the error is the algorithm's.
struct __nv_bfloat16 {
    float v;
};
inline __nv_bfloat16 __float2bfloat16(float f) { return {f}; }
inline float __bfloat162float(__nv_bfloat16 h) { return h.v; }
#else
struct __nv_bfloat16 {
    uint16_t bits;
};

inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) return {uint16_t(0x7fc0)};
    u += 0x7fff + ((u >> 16) & 1);  // round to nearest even
    return {uint16_t(u >> 16)};
}

inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = uint32_t(h.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
#endif

namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// What the CUDA docs require of a WMMA load or store, checked here since a GPU would not say:
// a 256-bit aligned pointer and a leading dimension that is a multiple of 16 bytes.
template <typename T>
void check_wmma_ptr(const T* p, unsigned ldm) {
    if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * sizeof(T)) % 16 != 0) {
        std::fprintf(stderr, "WMMA pointer %p (ldm %u) breaks the alignment rules\n",
                     (const void*)p, ldm);
        std::abort();
    }
}

inline float widen(float x) { return x; }
inline float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

// The whole tile, element (r, c) at x[r * 16 + c], in every lane.
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    float x[256];
};

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
    check_wmma_ptr(p, ldm);
    bool col = std::is_same_v<Layout, col_major>;
    for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++) f.x[r * 16 + c] = widen(col ? p[c * ldm + r] : p[r * ldm + c]);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ldm, layout_t l) {
    check_wmma_ptr(p, ldm);
    for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++)
            f.x[r * 16 + c] = l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t l) {
    check_wmma_ptr(p, ldm);
    if (threadIdx.x % 32 != 0) return;
    for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++)
            (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * 16 + c];
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float v) {
    for (float& e : f.x) e = v;
}

template <typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, __nv_bfloat16, LA>& a,
              const fragment<matrix_b, 16, 16, 16, __nv_bfloat16, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
    float out[256];
    for (int m = 0; m < 16; m++)
        for (int n = 0; n < 16; n++) {
            float s = c.x[m * 16 + n];
            for (int k = 0; k < 16; k++) s += a.x[m * 16 + k] * b.x[k * 16 + n];
            out[m * 16 + n] = s;
        }
    std::memcpy(d.x, out, sizeof out);
}
}  // namespace nvcuda::wmma

// Runs `kernel` over a grid: blocks in order, each block's threads concurrently. The same
// block.x OS threads run every block, with a barrier between blocks, so `static` shared
// memory is one block's at a time (and a grid costs block.x thread starts, not one per
// GPU thread).
inline void emu_launch(Dim3 grid, Dim3 block, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = block;
    unsigned n = block.x;
    EmuBlock b;
    b.block = std::make_unique<std::barrier<>>(n);
    for (unsigned w = 0; w < (n + 31) / 32; w++)
        b.warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - w * 32)));
    b.exchange.assign(n, 0.f);
    emu_block = &b;
    std::barrier<> next_block(n);
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < n; t++)
        ts.emplace_back([&, t] {
            threadIdx = {t, 0, 0};
            for (unsigned bz = 0; bz < grid.z; bz++)
                for (unsigned by = 0; by < grid.y; by++)
                    for (unsigned bx = 0; bx < grid.x; bx++) {
                        blockIdx = {bx, by, bz};
                        kernel();
                        next_block.arrive_and_wait();
                    }
        });
    for (auto& t : ts) t.join();
    emu_block = nullptr;
}
