//! ringtune-data: everything between files on disk and token batches.
//!
//! # Layout
//! - [`tokenizer`]: `tokenizer.json` via the tokenizers crate, plus the special
//!   tokens and chat template from `tokenizer_config.json` /
//!   `generation_config.json`.
//! - [`render`]: chat renderers (`role_colon`, `llama3`, `qwen`) that turn
//!   messages into tokens + per-token weights, byte-identical to the models'
//!   own chat templates; what to train on ([`TrainOnWhat`]).
//! - [`dataset`]: JSONL files (`messages`, `text`, pre-tokenized `tokens`) into
//!   [`Datum`]s, with `max_length` handling, bad-line skipping, held-out splits.
//! - [`batch`]: seeded epoch order, the resumable [`DataCursor`], global
//!   batches, token-budget micro-batches, token-balanced sharding over ranks.
//! - [`preference`]: DPO preference pairs (`prompt`/`messages`, `chosen`, `rejected`)
//!   rendered into two weighted sequences each.
//! - [`env`]: RL environments ([`env::Env`]): the offline arithmetic task with an
//!   exact-answer check and tinker's format reward, and an external reward command.
//! - [`rng`]: SplitMix64, the explicit PRNG behind every seeded choice.
//! - [`quickstart`]: the bundled dataset's generator and the offline
//!   tokenizer builder for the tiny quickstart model.
//!
//! This crate does no tensor work and knows nothing of ranks beyond a world
//! size to shard over: micro-batches are plain `Vec`s.

pub mod batch;
pub mod dataset;
pub mod env;
mod error;
pub mod preference;
pub mod quickstart;
pub mod render;
pub mod rng;
pub mod tokenizer;

pub use batch::{
    epoch_order, micro_batches, plan_micro_batches, shard_by_tokens, BatchSampler, DataCursor,
    GlobalBatch, MicroBatch,
};
pub use dataset::{load_jsonl, split_holdout, DataReport, Dataset, LoadOptions, OverflowPolicy};
pub use error::{Error, LineProblem, Result};
pub use preference::{load_preference_jsonl, split_pairs, PreferencePair, PreferenceSet};
pub use render::{Message, Renderer, RendererName, Role, StopCondition, TrainOnWhat};
pub use rng::SplitMix64;
pub use tokenizer::{SpecialToken, SpecialTokens, Tokenizer};

use serde::{Deserialize, Serialize};

/// One training example: a token sequence with a weight per token.
///
/// `weights[i]` is the loss weight for predicting `tokens[i]` from the tokens
/// before it, so the trainer uses inputs = `tokens[..n-1]`, targets =
/// `tokens[1..]`, weights = `weights[1..]`; `weights[0]` is never used.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Datum {
    /// Token ids.
    pub tokens: Vec<u32>,
    /// One weight per token (same length as `tokens`).
    pub weights: Vec<f32>,
}

impl Datum {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// True when there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Sum of the weights that count as targets (`weights[1..]`).
    pub fn target_weight(&self) -> f64 {
        self.weights.iter().skip(1).map(|&w| w as f64).sum()
    }

    /// Keeps the first `max_len` tokens and their weights.
    pub fn truncate(&mut self, max_len: usize) {
        self.tokens.truncate(max_len);
        self.weights.truncate(max_len);
    }
}
