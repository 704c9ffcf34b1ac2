//! ringtune-node: the training loop as a library, so the single-process `ringtune train`
//! and the later distributed runtime run the same code.
//!
//! # Layout
//! - [`checkpoint`]: the run folder, atomic checkpoint writes, `checkpoints.jsonl`.
//! - [`metrics`]: `metrics.jsonl`, one line per step.
//! - [`error`]: the crate's error type.

pub mod checkpoint;
pub mod error;
pub mod metrics;

pub use checkpoint::{CheckpointRecord, RunDir};
pub use error::{Error, Result};
pub use metrics::{MetricsLog, StepMetrics};
