//! Every kernel of `src/cuda/kernels.cu` apart from flash attention (`flash_emu.rs`) on the
//! CPU: compiled as C++20 with `src/cuda/emu.h` and checked against a double-precision
//! reference of what its comment says it computes (`tests/kernels_emu/main.cpp`): RMSNorm,
//! SwiGLU (scalar and float4), RoPE and the bias rows; the attention softmax forward and
//! backward in f32, in bf16 and warp-per-row, with causal, sliding-window and padding masks
//! and a row that sees no key; the token loss's row statistics and gradient, f32 and bf16;
//! the attention layouts' packing. Some checks are bit for bit: the bf16 kernels against
//! their f32 twins rounded, the float4 kernels against the scalar ones, and the packing's
//! round trip, which the flash backward relies on.
//!
//! Needs a C++20 compiler (see `emu_harness`).

mod emu_harness;

/// The harness's checks (its output's ": ok" lines).
const CHECKS: usize = 37;

#[test]
fn cuda_kernels_match_the_reference_on_the_cpu() {
    emu_harness::run_harness("kernels_emu", &[], CHECKS);
}
