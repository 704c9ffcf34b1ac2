//! ringtune-node: the training loop as a library, so the single-process `ringtune train`
//! and the later distributed runtime run the same code.
//!
//! # Layout
//! - [`trainer`]: [`Trainer`] — data, micro-batches, forward/backward, the [`StepSync`]
//!   hook, AdamW, evaluation, checkpoints, exact resume.
//! - [`checkpoint`]: the run folder, atomic checkpoint writes, `checkpoints.jsonl`.
//! - [`metrics`]: `metrics.jsonl`, one line per step.
//! - [`optim`]: where AdamW runs (host, or the model's GPU) and the step's gradient sum.
//! - [`dpo`]: DPO in the trainer (`train.method = "dpo"`): preference pairs, the cached
//!   reference (adapter off), the per-step gradient through the `linear` loss.
//! - [`distributed`]: one rank of a distributed run (`ringtune node`): the control
//!   connection, the QUIC ring, step orders, reports.
//! - [`rl`]: the RL loop ([`RlTrainer`]): sample groups from the policy, score them with
//!   an environment, group-centred advantages (+ KL penalty), one policy-gradient step.
//! - [`init`]: random-init model folders with a matching tokenizer (quickstart, tests).
//! - [`error`]: the crate's error type.
//!
//! Deliberately not here: signals, progress display, process management (the CLI).

pub mod checkpoint;
pub mod distributed;
pub mod dpo;
pub mod error;
pub mod init;
pub mod metrics;
pub mod optim;
pub mod rl;
pub mod trainer;

pub use checkpoint::{CheckpointRecord, RunDir, RunLock};
pub use error::{Error, Result};
pub use init::{init_model, InitReport};
pub use metrics::{MetricsLog, StepMetrics};
pub use rl::{RlEvent, RlOutcome, RlStepMetrics, RlTrainer};
pub use trainer::{Event, LocalSync, Outcome, StepSync, TrainState, Trainer};
