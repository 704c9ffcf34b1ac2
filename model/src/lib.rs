//! ringtune-model: Llama-family models on candle with PEFT-exact LoRA adapters — loading,
//! forward, forward+backward of the token losses, AdamW, LR schedules, PEFT adapter I/O,
//! merging, and random-init model folders.
//!
//! **This crate knows nothing of ranks, sockets or tokio.** The distributed runtime sees a
//! model through [`LoraModel::forward_backward`] (gradients as one [`Gradients`] set in a
//! fixed, sorted-by-PEFT-key order with a cheap flat form), [`AdamW::step_flat`] on the flat
//! parameter buffer, and the adapter/optimizer-state files.
//!
//! # Layout
//! - [`config`]: `config.json` → [`ModelConfig`] (Llama 2/3.x, Mistral, Qwen2, Qwen3).
//! - [`hub`]: model folder from a path or `hf:ORG/NAME[@REV]` in the HF cache.
//! - [`weights`]: memory-mapped safetensors (single or sharded), checked tensor by tensor.
//! - [`lora`]: [`LoraConfig`], PEFT's init, the adapted linear layer.
//! - [`model`]: the decoder, [`LoraModel`].
//! - `ops`: custom candle ops (frozen linear, RMSNorm, RoPE, masked softmax) whose backward
//!   gives only the gradients LoRA needs.
//! - `head`: lm_head + loss, chunked, forward and backward by hand.
//! - [`loss`]: [`Batch`], [`LossKind`] (cross_entropy, policy-gradient losses), [`LossOutput`].
//! - [`grads`]: [`ParamLayout`], [`Gradients`].
//! - [`optim`], [`schedule`]: [`AdamW`], [`LrSchedule`].
//! - [`peft`], [`merge`]: adapter folders, merging into a full model.
//! - [`preset`]: benchmark shapes, [`write_random_model`].
//! - [`prof`]: the stream profile of a real step, op by op.
//! - [`kv_cache`], [`sample`]: incremental decoding, [`LoraModel::sample`],
//!   [`LoraModel::prompt_logprobs`].

pub mod config;
#[cfg(feature = "cuda")]
mod cuda;
mod error;
mod gemv;
pub mod grads;
mod head;
pub mod hub;
pub mod io;
pub mod kv_cache;
pub mod lora;
pub mod loss;
pub mod merge;
pub mod model;
mod ops;
pub mod optim;
pub mod peft;
pub mod preset;
pub mod prof;
pub mod sample;
pub mod schedule;
pub mod weights;

pub use config::{Architecture, ModelConfig, RopeScaling};
pub use error::{Error, Result};
pub use grads::{Gradients, ParamLayout};
pub use hub::{resolve_model_dir, ModelSpec};
pub use kv_cache::KvCache;
pub use lora::{Adapters, LoraConfig, TargetModule};
pub use loss::{Batch, DpoPair, LossKind, LossOutput, Reduction};
pub use merge::{merge, merge_with, MergeOptions, MergeReport};
pub use model::LoraModel;
pub use ops::{set_flash_attention, set_force_generic};
pub use optim::{AdamW, AdamWConfig, DeviceAdamW, StepReport};
pub use peft::AdapterConfig;
pub use preset::{write_random_model, ModelPreset};
pub use sample::{Sample, SamplingParams, StopReason};
pub use schedule::{lr_at, LrSchedule, ScheduleKind};
pub use weights::model_fingerprint;

/// Tunes the C allocator for training: keeps freed memory in the process instead of
/// returning it to the OS after every step. Each step allocates and frees hundreds of
/// megabytes of activations; with glibc's defaults those come back as fresh pages every
/// time, and the page faults cost ~25% of a CPU step. Peak memory is unchanged (it is
/// the peak either way). Process-wide, so only binaries call it, once, at start-up; a no-op
/// where the C library is not glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; both values are valid options.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Sets up a process for CPU training; call once at the start of `main`, before any other
/// thread exists (it sets environment variables that thread pools read when they start).
///
/// - `threads`: compute threads for matmuls and ringtune's kernels (rayon's global pool);
///   `None` keeps rayon's default (or an existing `RAYON_NUM_THREADS`).
/// - candle's own element-wise ops get one thread unless `CANDLE_NUM_THREADS` is set: their
///   pool spin-waits, which on a loaded 2-core machine costs more than it gains, and the hot
///   element-wise work runs in ringtune's rayon kernels anyway.
/// - [`tune_allocator`].
pub fn init_cpu_runtime(threads: Option<usize>) {
    if let Some(n) = threads.filter(|&n| n > 0) {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    tune_allocator();
}

/// Re-exported so callers name devices and dtypes without depending on candle directly.
pub use candle_core::{DType, Device, DeviceLocation, Tensor};
