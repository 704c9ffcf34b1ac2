//! The crate's one error type. Every variant names what was wrong and where (file, field,
//! tensor, both shapes), because everything this crate reads — config files, checkpoints,
//! adapters, batches — comes from outside and is untrusted.

use std::path::PathBuf;

/// Everything that can go wrong in `ringtune-model`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// A JSON file (config.json, adapter_config.json, an index) is not valid JSON.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error (it carries line and column).
        #[source]
        source: serde_json::Error,
    },

    /// A required field is absent from a JSON config.
    #[error("{path}: missing field `{field}`")]
    MissingField {
        /// The file.
        path: PathBuf,
        /// The field's name (dotted for nested fields).
        field: String,
    },

    /// A field is present but its value is wrong or unsupported.
    #[error("{path}: field `{field}`: {reason}")]
    InvalidField {
        /// The file.
        path: PathBuf,
        /// The field's name (dotted for nested fields).
        field: String,
        /// What is wrong with it.
        reason: String,
    },

    /// config.json names an architecture this crate does not implement.
    #[error(
        "{path}: unknown architecture {found:?} (supported: LlamaForCausalLM, \
         MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)"
    )]
    UnknownArchitecture {
        /// The config file.
        path: PathBuf,
        /// The `architectures` value found.
        found: String,
    },

    /// A safetensors file could not be parsed.
    #[error("{path}: invalid safetensors file: {reason}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },

    /// The model (or adapter) expects a tensor that none of the files holds.
    #[error("missing tensor `{tensor}` (looked in {file})")]
    MissingTensor {
        /// The tensor's key.
        tensor: String,
        /// The file (or files) searched.
        file: String,
    },

    /// A file holds a tensor the model does not use; refusing it catches checkpoints of the
    /// wrong architecture or a config that does not match the weights.
    #[error("unexpected tensor `{tensor}` in {file}")]
    UnexpectedTensor {
        /// The tensor's key.
        tensor: String,
        /// The file that holds it.
        file: String,
    },

    /// A tensor's shape differs from the one the config implies.
    #[error("tensor `{tensor}` in {file} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The tensor's key.
        tensor: String,
        /// The file that holds it.
        file: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },

    /// A tensor is stored in a dtype this crate does not load (only f32, bf16, f16).
    #[error("tensor `{tensor}` in {file} has unsupported dtype {dtype}")]
    UnsupportedDType {
        /// The tensor's key.
        tensor: String,
        /// The file that holds it.
        file: String,
        /// The dtype found.
        dtype: String,
    },

    /// A model spec (`hf:ORG/NAME[@REV]` or a path) could not be resolved to a folder.
    #[error("model `{spec}`: {reason}")]
    ModelNotFound {
        /// The spec as given.
        spec: String,
        /// Why it could not be resolved (which path was tried).
        reason: String,
    },

    /// A batch handed to the model is malformed (shapes, token ids, weights).
    #[error("invalid batch: {0}")]
    InvalidBatch(String),

    /// A LoRA configuration is invalid (rank 0, unknown target module, bad dropout).
    #[error("invalid LoRA config: {0}")]
    InvalidLoraConfig(String),

    /// A flat buffer, gradient set or optimizer state does not match the model's parameters.
    #[error("parameter mismatch: {0}")]
    ParamMismatch(String),

    /// Something this crate does not implement (e.g. a rope type, a dtype on a device).
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// Downloading from the Hugging Face Hub failed (feature `hub`).
    #[error("download of `{spec}` failed: {reason}")]
    Download {
        /// The spec being downloaded.
        spec: String,
        /// The client's message.
        reason: String,
    },

    /// An error from candle (a kernel, a shape check inside an op).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
