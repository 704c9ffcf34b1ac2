//! The crate's one error type: every variant names the file, line, step or key involved.

use std::path::{Path, PathBuf};

/// Everything that can go wrong running training on a node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder could not be read, written, synced or renamed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A run-folder file (checkpoints.jsonl, metrics.jsonl, state.json) is malformed.
    #[error("{path}:{line}: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// 1-based line (1 for whole-file formats).
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The coordinator refused this node's registration; `retryable` refusals (a dead
    /// predecessor on the same GPU slot not yet declared dead, a full run) clear up by
    /// themselves, so the node tries again for a while.
    #[error("the coordinator at {coordinator} refused this node: {reason}")]
    Refused {
        /// The coordinator's address.
        coordinator: String,
        /// The refusal, as the coordinator gave it.
        reason: String,
        /// Whether trying again later can succeed.
        retryable: bool,
    },
    /// The run config is invalid for training (beyond what the config crate checks).
    #[error("{0}")]
    Invalid(String),
    /// The config file could not be read or is invalid.
    #[error(transparent)]
    Config(#[from] ringtune_config::ConfigError),
    /// The model, adapter, optimiser or loss failed (the message names file and tensor).
    #[error(transparent)]
    Model(#[from] ringtune_model::Error),
    /// The dataset or tokenizer failed (the message names file and line).
    #[error(transparent)]
    Data(#[from] ringtune_data::Error),
    /// A tensor operation failed outside the model crate (moving gradients, reading values).
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The gradient all-reduce failed.
    #[error("gradient sync at step {step}: {message}")]
    Sync {
        /// The step being synced.
        step: u64,
        /// The transport's message.
        message: String,
    },
    /// `--resume` with a config whose semantic content differs from the checkpoint's.
    #[error(
        "cannot resume {checkpoint}: the config changed since it was written ({}); \
         restore those values or train into a new output_dir",
        changed.join("; ")
    )]
    ConfigChanged {
        /// The checkpoint folder.
        checkpoint: PathBuf,
        /// `key: old → new` per change.
        changed: Vec<String>,
    },
    /// `--resume` but the run folder has no complete checkpoint.
    #[error("cannot resume: {0} has no complete checkpoint (checkpoints.jsonl lists none)")]
    NothingToResume(PathBuf),
    /// A fresh start into a folder that already holds a run's checkpoints.
    #[error(
        "{0} already holds checkpoints of a run: pass --resume to continue it, or choose a \
         new output_dir"
    )]
    RunExists(PathBuf),
    /// A loss or gradient became NaN or infinite.
    #[error("step {step}: {what} is not finite ({value})")]
    NonFinite {
        /// The step.
        step: u64,
        /// What was not finite.
        what: &'static str,
        /// Its value.
        value: f64,
    },
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `map_err` helper: wraps an io::Error with the path it concerns.
pub(crate) fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}
