//! Batches and token losses.
//!
//! A datum is a token sequence with per-token weights: inputs = tokens[:-1],
//! targets = tokens[1:], weights aligned to the targets. Ragged rows are right-padded;
//! with a causal mask, padding after a row's real tokens can never change their numbers,
//! and padding positions carry weight 0 (their logprob is reported as 0).
//!
//! Every loss here is a sum over tokens of a function of that token's logprob, so the
//! head only needs, per token, the loss term and its derivative d loss / d logp
//! ([`LossKind::token_term`]); the gradient on the logits is then
//! `dℓ/dlogp · (onehot − softmax)`. The RL losses (importance_sampling, ppo, cispo) have this
//! shape too and slot in as more variants with their per-token inputs; DPO, whose
//! per-token derivative depends on whole-sequence sums, runs a no-grad pass first
//! ([`crate::LoraModel::logprobs`], with [`crate::Adapters::Off`] for the reference) and
//! then feeds the resulting coefficients in as a per-token linear loss.

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// Which loss [`crate::LoraModel::forward_backward`] computes. Names follow tinker's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LossKind {
    /// `cross_entropy`: Σ −logp · w.
    #[default]
    CrossEntropy,
}

impl LossKind {
    /// tinker's name of the loss.
    pub fn name(self) -> &'static str {
        match self {
            LossKind::CrossEntropy => "cross_entropy",
        }
    }

    /// Parses tinker's name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "cross_entropy" => Some(LossKind::CrossEntropy),
            _ => None,
        }
    }

    /// The loss term of one token and its derivative with respect to the token's logprob.
    #[inline]
    pub fn token_term(self, logp: f32, weight: f32) -> (f64, f32) {
        match self {
            LossKind::CrossEntropy => (-(logp as f64) * weight as f64, -weight),
        }
    }
}

/// A batch of `rows` sequences of `seq` positions, right-padded, on the host.
///
/// Row-major `[rows, seq]` vectors: position `t` of row `b` predicts `target_ids[b, t]` from
/// `input_ids[b, ..=t]`. Positions at or past `lengths[b]` are padding: weight 0, logprob 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    rows: usize,
    seq: usize,
    input_ids: Vec<u32>,
    target_ids: Vec<u32>,
    weights: Vec<f32>,
    lengths: Vec<usize>,
}

impl Batch {
    /// Builds a batch from already shifted inputs/targets/weights, each `[rows, seq]`
    /// row-major; `lengths[b]` real positions per row (the rest is padding, which must have
    /// weight 0).
    pub fn new(
        rows: usize,
        seq: usize,
        input_ids: Vec<u32>,
        target_ids: Vec<u32>,
        weights: Vec<f32>,
        lengths: Vec<usize>,
    ) -> Result<Self> {
        let n = rows
            .checked_mul(seq)
            .ok_or_else(|| Error::InvalidBatch(format!("{rows} x {seq} overflows")))?;
        for (name, len) in [
            ("input_ids", input_ids.len()),
            ("target_ids", target_ids.len()),
            ("weights", weights.len()),
        ] {
            if len != n {
                return Err(Error::InvalidBatch(format!(
                    "{name} has {len} values, expected {rows} x {seq} = {n}"
                )));
            }
        }
        if lengths.len() != rows {
            return Err(Error::InvalidBatch(format!(
                "{} lengths for {rows} rows",
                lengths.len()
            )));
        }
        for (b, &len) in lengths.iter().enumerate() {
            if len > seq {
                return Err(Error::InvalidBatch(format!(
                    "row {b}: length {len} exceeds {seq} positions"
                )));
            }
            for t in 0..seq {
                let w = weights[b * seq + t];
                if !w.is_finite() {
                    return Err(Error::InvalidBatch(format!(
                        "row {b}, position {t}: weight {w} is not finite"
                    )));
                }
                if t >= len && w != 0.0 {
                    return Err(Error::InvalidBatch(format!(
                        "row {b}, position {t}: padding (row length {len}) has weight {w}, expected 0"
                    )));
                }
            }
        }
        Ok(Batch {
            rows,
            seq,
            input_ids,
            target_ids,
            weights,
            lengths,
        })
    }

    /// From full token rows (ragged) with weights aligned to the tokens: inputs =
    /// tokens[:-1], targets = tokens[1:], weights = weights[1:] (weights[0] is unused, as
    /// in the reference data). Rows are right-padded with `pad_id`.
    pub fn from_token_rows(tokens: &[Vec<u32>], weights: &[Vec<f32>], pad_id: u32) -> Result<Self> {
        if tokens.len() != weights.len() {
            return Err(Error::InvalidBatch(format!(
                "{} token rows but {} weight rows",
                tokens.len(),
                weights.len()
            )));
        }
        let mut seq = 0;
        for (b, (t, w)) in tokens.iter().zip(weights).enumerate() {
            if t.len() != w.len() {
                return Err(Error::InvalidBatch(format!(
                    "row {b}: {} tokens but {} weights",
                    t.len(),
                    w.len()
                )));
            }
            if t.len() < 2 {
                return Err(Error::InvalidBatch(format!(
                    "row {b}: {} tokens, need at least 2",
                    t.len()
                )));
            }
            seq = seq.max(t.len() - 1);
        }
        let rows = tokens.len();
        let mut input_ids = vec![pad_id; rows * seq];
        let mut target_ids = vec![pad_id; rows * seq];
        let mut ws = vec![0f32; rows * seq];
        let mut lengths = Vec::with_capacity(rows);
        for (b, (t, w)) in tokens.iter().zip(weights).enumerate() {
            let len = t.len() - 1;
            input_ids[b * seq..b * seq + len].copy_from_slice(&t[..len]);
            target_ids[b * seq..b * seq + len].copy_from_slice(&t[1..]);
            ws[b * seq..b * seq + len].copy_from_slice(&w[1..]);
            lengths.push(len);
        }
        Batch::new(rows, seq, input_ids, target_ids, ws, lengths)
    }

    /// From dense `[rows, T]` token ids and weights aligned to the tokens (the layout of the
    /// reference `batch.safetensors`: `input_ids`, `loss_weights`). Every row is full length.
    pub fn from_dense_tokens(
        rows: usize,
        t: usize,
        tokens: &[u32],
        weights: &[f32],
    ) -> Result<Self> {
        if tokens.len() != rows * t || weights.len() != rows * t {
            return Err(Error::InvalidBatch(format!(
                "expected {rows} x {t} tokens and weights, got {} and {}",
                tokens.len(),
                weights.len()
            )));
        }
        if t < 2 {
            return Err(Error::InvalidBatch(format!(
                "{t} tokens per row, need at least 2"
            )));
        }
        let tok: Vec<Vec<u32>> = tokens.chunks(t).map(<[u32]>::to_vec).collect();
        let w: Vec<Vec<f32>> = weights.chunks(t).map(<[f32]>::to_vec).collect();
        Batch::from_token_rows(&tok, &w, 0)
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Positions per row (the model's sequence length).
    pub fn seq(&self) -> usize {
        self.seq
    }

    /// Row-major input ids.
    pub fn input_ids(&self) -> &[u32] {
        &self.input_ids
    }

    /// Row-major target ids.
    pub fn target_ids(&self) -> &[u32] {
        &self.target_ids
    }

    /// Row-major weights (aligned to targets).
    pub fn weights(&self) -> &[f32] {
        &self.weights
    }

    /// Real (non-padding) positions per row.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// Number of real (non-padding) target positions.
    pub fn tokens(&self) -> usize {
        self.lengths.iter().sum()
    }

    /// Σ weights.
    pub fn weight_sum(&self) -> f64 {
        self.weights.iter().map(|&w| w as f64).sum()
    }

    /// The input ids as a `[rows, seq]` u32 tensor.
    pub fn input_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.input_ids,
            (self.rows, self.seq),
            device,
        )?)
    }

    /// Checks every id against the vocabulary size.
    pub(crate) fn check_vocab(&self, vocab: usize) -> Result<()> {
        for (name, ids) in [
            ("input_ids", &self.input_ids),
            ("target_ids", &self.target_ids),
        ] {
            if let Some(i) = ids.iter().position(|&id| id as usize >= vocab) {
                return Err(Error::InvalidBatch(format!(
                    "{name}[{}, {}] = {} is outside the vocabulary (size {vocab})",
                    i / self.seq.max(1),
                    i % self.seq.max(1),
                    ids[i]
                )));
            }
        }
        Ok(())
    }
}

/// What a forward(+backward) pass reports about the loss.
#[derive(Debug, Clone, PartialEq)]
pub struct LossOutput {
    /// The loss that was computed.
    pub kind: LossKind,
    /// Σ over tokens of the loss term (cross_entropy: Σ −logp · w), accumulated in f64.
    pub loss_sum: f64,
    /// Σ w.
    pub weight_sum: f64,
    /// Real (non-padding) target positions.
    pub tokens: usize,
    /// Per position, row-major `[rows, seq]`: log p(target | prefix); 0 on padding.
    pub logprobs: Vec<f32>,
}

impl LossOutput {
    /// The normalised loss Σ −logp·w / Σ w (0 when no weight).
    pub fn mean(&self) -> f64 {
        if self.weight_sum == 0.0 {
            0.0
        } else {
            self.loss_sum / self.weight_sum
        }
    }
}
