//! The flash-attention CUDA kernels (`src/cuda/flash.cu`) on the CPU: compiled as C++20
//! with `src/cuda/emu.h` (every thread of a block an OS thread, WMMA tiles computed in
//! full) and run against a double-precision reference of the masked attention — forward
//! output, log-sum-exp, and dQ/dK/dV — for causal, GQA, sliding-window and padded cases
//! with partial tiles (`tests/flash_emu/main.cpp`). This checks the kernels' indexing,
//! masks, tiling and barriers without a GPU; speed, and the real tensor cores, are the GPU
//! check's (`deploy/gpu/check.sh`).
//!
//! Needs a C++20 compiler (see `emu_harness`).

mod emu_harness;

/// 8 cases, each with the backward's query loop in one block per key tile and in 3.
const CASES: usize = 16;

#[test]
fn flash_attention_kernels_match_the_reference_on_the_cpu() {
    // As the GPU computes: bf16 probabilities and dS, bounds 5e-3 normwise, 2e-2 per row.
    emu_harness::run_harness("flash_emu", &[], CASES);
}

#[test]
fn flash_attention_kernels_are_exact_without_bf16_rounding() {
    // bf16 as a full f32 (the inputs are bf16 values already): what is left is the
    // algorithm's own error — f32 rounding, bounds 1e-5 normwise and 1e-3 per row — so a
    // dropped or doubled (query, key) term anywhere is far outside them.
    emu_harness::run_harness("flash_emu", &["-DRINGTUNE_EMU_EXACT"], CASES);
}
