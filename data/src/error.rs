//! The crate's one error type. Every variant that comes from a file names the
//! file; every variant about one dataset line names the file and the line.

use std::path::PathBuf;

/// Result alias for ringtune-data.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in ringtune-data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened, read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },

    /// `tokenizer.json` could not be loaded or a tokenizer operation failed.
    #[error("{}: {message}", path.display())]
    Tokenizer {
        /// The tokenizer file (or the folder it was expected in).
        path: PathBuf,
        /// What the tokenizers crate said.
        message: String,
    },

    /// A model-folder config (`tokenizer_config.json`, `generation_config.json`)
    /// is not JSON or has a field with the wrong shape or an unknown token.
    #[error("{}: field `{field}`: {message}", path.display())]
    TokenizerConfig {
        /// The config file.
        path: PathBuf,
        /// The field that is wrong.
        field: String,
        /// What is wrong with it.
        message: String,
    },

    /// A renderer needs a special token that the tokenizer does not have as a
    /// single token.
    #[error("renderer `{renderer}` needs the special token {token:?}, {problem}")]
    MissingSpecialToken {
        /// The renderer's name.
        renderer: &'static str,
        /// The token text, e.g. `<|im_end|>`.
        token: String,
        /// Why it is unusable (absent, or encodes to several tokens).
        problem: String,
    },

    /// A conversation cannot be rendered (empty, unsupported role or field).
    #[error("cannot render conversation: {0}")]
    Render(String),

    /// One line of a dataset file is bad.
    #[error("{}:{line}: {problem}", path.display())]
    Line {
        /// The dataset file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the line.
        problem: LineProblem,
    },

    /// A dataset file produced no usable examples.
    #[error("{}: empty dataset: {detail}", path.display())]
    EmptyDataset {
        /// The dataset file.
        path: PathBuf,
        /// Why: no lines, or how many were skipped/dropped and for what.
        detail: String,
    },

    /// A batching, splitting or generation parameter is out of range.
    #[error("invalid {what}: {message}")]
    InvalidArgument {
        /// The parameter, e.g. `batch_size`.
        what: &'static str,
        /// Why it is invalid.
        message: String,
    },

    /// An RL environment failed: its reward command misbehaved (wrong count, not a
    /// number, non-zero exit, timeout) or a problem is malformed. `env` names the
    /// environment (for an external one, its command line).
    #[error("RL environment {env}: {message}")]
    Env {
        /// The environment, e.g. ``external command `python3 reward.py` ``.
        env: String,
        /// What went wrong, with the output line where there is one.
        message: String,
    },

    /// A saved data cursor does not fit the dataset it is resumed on.
    #[error("cannot resume data cursor (epoch {epoch}, position {position}): {message}")]
    BadCursor {
        /// The saved epoch.
        epoch: u64,
        /// The saved position within the epoch.
        position: u64,
        /// Why it does not fit.
        message: String,
    },
}

/// What is wrong with one dataset line (wrapped in [`Error::Line`]).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LineProblem {
    /// The line is not valid JSON (or not UTF-8).
    #[error("not valid JSON: {0}")]
    NotJson(String),
    /// The line is JSON but not an object.
    #[error("expected a JSON object, found {0}")]
    NotAnObject(&'static str),
    /// The line has none of the fields that say what kind of example it is.
    #[error("no `messages` field (a line needs one of `messages`, `text` or `tokens`)")]
    NoExampleField,
    /// A required field is absent.
    #[error("missing field `{0}`")]
    MissingField(String),
    /// A field has the wrong JSON type.
    #[error("field `{field}`: expected {expected}, found {found}")]
    WrongType {
        /// The field, with its path (e.g. `messages[2].content`).
        field: String,
        /// The expected type.
        expected: &'static str,
        /// The JSON type found.
        found: &'static str,
    },
    /// A field has a value of the right type but an unusable value.
    #[error("field `{field}`: {message}")]
    BadValue {
        /// The field, with its path.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The example is longer than `max_length` and the policy is `error`.
    #[error("example has {len} tokens, more than max_length {max}")]
    TooLong {
        /// Tokens in the example.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The line is longer than the reader accepts.
    #[error("line is longer than {0} bytes")]
    LineTooLong(usize),
    /// Rendering or tokenizing the line failed.
    #[error("{0}")]
    Render(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
