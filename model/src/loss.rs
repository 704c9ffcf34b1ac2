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
//! `dℓ/dlogp · (onehot − softmax)`. The policy-gradient losses (tinker's
//! `importance_sampling`, `ppo`, `cispo`) have this shape too: their per-token inputs, the
//! sampler's logprob `q` and the advantage `A`, ride on the [`Batch`]
//! ([`Batch::with_rl_inputs`]). DPO, whose per-token derivative depends on whole-sequence
//! sums, runs a no-grad pass first ([`crate::LoraModel::logprobs`], with
//! [`crate::Adapters::Off`] for the reference) and then feeds the resulting coefficients in
//! as a per-token [`LossKind::Linear`] loss.
//!
//! # Normalisation
//! `forward_backward` always returns the gradient of the loss *sum*. What the step divides
//! it by is [`LossKind::reduction`]: `cross_entropy` is a mean per unit weight (the
//! trainer divides by the global Σw); the policy-gradient losses are plain sums, as tinker
//! computes them (its docs: "loss: sum"), so the advantages and the learning rate set the
//! step's scale; DPO is a mean over pairs (its trainer divides by the global pair count).
//!
//! # Weights in the policy-gradient losses
//! tinker's RL datums carry no weights: prompt tokens get advantage 0. Here every datum
//! has weights, and each token's term is multiplied by its weight, so weight 1 on every
//! target gives tinker's numbers exactly, and weight 0 masks a token (prompt, padding).

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// Which loss [`crate::LoraModel::forward_backward`] computes. Names follow tinker's.
///
/// With `r = exp(logp − q)` (the ratio of the learner's probability to the sampler's), `A`
/// the advantage and `w` the weight of a token, the per-token loss terms are in
/// [`LossKind::token_term`]; each loss is their sum over tokens.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub enum LossKind {
    /// `cross_entropy`: Σ −logp · w.
    #[default]
    CrossEntropy,
    /// `importance_sampling`: Σ −w · r · A (REINFORCE with an importance weight for the
    /// sampler/learner mismatch).
    ImportanceSampling,
    /// `ppo`: Σ −w · min(r · A, clip(r, clip_low, clip_high) · A), token-wise.
    Ppo {
        /// tinker's `clip_low_threshold` (a bound on the ratio, not an epsilon); 0.8.
        clip_low: f32,
        /// tinker's `clip_high_threshold`; 1.2.
        clip_high: f32,
    },
    /// `cispo`: Σ −w · sg(clip(r, clip_low, clip_high)) · logp · A (the clipped ratio is a
    /// constant coefficient: the gradient always flows through logp).
    Cispo {
        /// tinker's `clip_low_threshold`; 0.0.
        clip_low: f32,
        /// tinker's `clip_high_threshold`; 4.0.
        clip_high: f32,
    },
    /// Σ −w · A · logp: a loss linear in the logprobs with a given coefficient per token (the
    /// on-policy policy gradient; DPO feeds its per-sequence derivatives in through it).
    /// Not one of tinker's names.
    Linear,
}

/// What a step divides the summed gradient by (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// Divide by the global Σw: the mean loss per unit weight.
    WeightMean,
    /// Do not divide: the loss is the sum, as tinker's policy-gradient losses.
    Sum,
}

/// Clip thresholds of tinker's `ppo` by default.
pub const PPO_CLIP: (f32, f32) = (0.8, 1.2);
/// Clip thresholds of tinker's `cispo` by default.
pub const CISPO_CLIP: (f32, f32) = (0.0, 4.0);

impl LossKind {
    /// `ppo` with tinker's default thresholds (0.8, 1.2).
    pub const PPO: LossKind = LossKind::Ppo {
        clip_low: PPO_CLIP.0,
        clip_high: PPO_CLIP.1,
    };
    /// `cispo` with tinker's default thresholds (0.0, 4.0).
    pub const CISPO: LossKind = LossKind::Cispo {
        clip_low: CISPO_CLIP.0,
        clip_high: CISPO_CLIP.1,
    };

    /// tinker's name of the loss (`linear` is ringtune's own).
    pub fn name(self) -> &'static str {
        match self {
            LossKind::CrossEntropy => "cross_entropy",
            LossKind::ImportanceSampling => "importance_sampling",
            LossKind::Ppo { .. } => "ppo",
            LossKind::Cispo { .. } => "cispo",
            LossKind::Linear => "linear",
        }
    }

    /// Parses tinker's name; `ppo` and `cispo` get tinker's default thresholds.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "cross_entropy" => Some(LossKind::CrossEntropy),
            "importance_sampling" => Some(LossKind::ImportanceSampling),
            "ppo" => Some(LossKind::PPO),
            "cispo" => Some(LossKind::CISPO),
            "linear" => Some(LossKind::Linear),
            _ => None,
        }
    }

    /// Parses tinker's name with its `loss_fn_config` thresholds (`clip_low_threshold`,
    /// `clip_high_threshold`); `None` keeps the loss's default. Thresholds are refused for
    /// losses that take none, and must be finite with low ≤ high.
    pub fn with_config(
        name: &str,
        clip_low_threshold: Option<f32>,
        clip_high_threshold: Option<f32>,
    ) -> Result<Self> {
        let kind = Self::from_name(name)
            .ok_or_else(|| Error::InvalidBatch(format!("unknown loss {name:?}")))?;
        let (lo, hi) = match kind {
            LossKind::Ppo { .. } => PPO_CLIP,
            LossKind::Cispo { .. } => CISPO_CLIP,
            _ => {
                if clip_low_threshold.is_some() || clip_high_threshold.is_some() {
                    return Err(Error::InvalidBatch(format!(
                        "loss {name:?} takes no clip thresholds"
                    )));
                }
                return Ok(kind);
            }
        };
        let lo = clip_low_threshold.unwrap_or(lo);
        let hi = clip_high_threshold.unwrap_or(hi);
        if !lo.is_finite() || !hi.is_finite() || lo > hi {
            return Err(Error::InvalidBatch(format!(
                "{name}: clip_low_threshold {lo} and clip_high_threshold {hi} must be finite \
                 with low <= high"
            )));
        }
        Ok(match kind {
            LossKind::Ppo { .. } => LossKind::Ppo {
                clip_low: lo,
                clip_high: hi,
            },
            _ => LossKind::Cispo {
                clip_low: lo,
                clip_high: hi,
            },
        })
    }

    /// Whether the loss reads the sampler's logprobs (`q`) and advantages (`A`).
    pub fn needs_sampler_logprobs(self) -> bool {
        matches!(
            self,
            LossKind::ImportanceSampling | LossKind::Ppo { .. } | LossKind::Cispo { .. }
        )
    }

    /// Whether the loss reads per-token advantages.
    pub fn needs_advantages(self) -> bool {
        !matches!(self, LossKind::CrossEntropy)
    }

    /// What a step divides the summed gradient by.
    pub fn reduction(self) -> Reduction {
        match self {
            LossKind::CrossEntropy => Reduction::WeightMean,
            _ => Reduction::Sum,
        }
    }

    /// The loss term of one token and its derivative with respect to the token's logprob
    /// `logp`, given its weight `w`, the sampler's logprob `q` and the advantage `a` (the
    /// last two are ignored by losses that do not read them). Computed in f64.
    ///
    /// `ppo`'s derivative follows PyTorch's autograd of `−min(r·A, clamp(r, lo, hi)·A)`:
    /// where the clipped branch is strictly smaller it is a constant (derivative 0);
    /// otherwise (inside the range, on its boundary, or where clipping would not lower the
    /// objective) it is `−w·r·A`.
    #[inline]
    pub fn token_term(self, logp: f32, w: f32, q: f32, a: f32) -> (f64, f32) {
        let (lp, w, q, a) = (logp as f64, w as f64, q as f64, a as f64);
        let (term, d) = match self {
            LossKind::CrossEntropy => (-lp * w, -w),
            LossKind::Linear => (-w * a * lp, -w * a),
            LossKind::ImportanceSampling => {
                let r = (lp - q).exp();
                (-w * r * a, -w * r * a)
            }
            LossKind::Ppo {
                clip_low,
                clip_high,
            } => {
                let r = (lp - q).exp();
                let rc = r.clamp(clip_low as f64, clip_high as f64);
                let (un, cl) = (r * a, rc * a);
                if cl < un {
                    (-w * cl, 0.0)
                } else {
                    (-w * un, -w * r * a)
                }
            }
            LossKind::Cispo {
                clip_low,
                clip_high,
            } => {
                let rc = (lp - q).exp().clamp(clip_low as f64, clip_high as f64);
                (-w * rc * lp * a, -w * rc * a)
            }
        };
        (term, d as f32)
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
    /// The policy-gradient losses' per-token inputs, `[rows, seq]` like the weights.
    rl: Option<RlInputs>,
}

/// Per target position: the sampler's logprob (`q`) and the advantage (`A`).
#[derive(Debug, Clone, PartialEq)]
struct RlInputs {
    sampler_logprobs: Vec<f32>,
    advantages: Vec<f32>,
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
            rl: None,
        })
    }

    /// Attaches the policy-gradient inputs, each row-major `[rows, seq]` and aligned to the
    /// targets (tinker's `loss_fn_inputs` `logprobs` and `advantages`): the sampler's logprob
    /// of each target token and its advantage. Values must be finite; padding positions are
    /// ignored. Only the losses that read them ([`LossKind::needs_advantages`]) use them.
    pub fn with_rl_inputs(
        mut self,
        sampler_logprobs: Vec<f32>,
        advantages: Vec<f32>,
    ) -> Result<Self> {
        let n = self.rows * self.seq;
        for (name, v) in [
            ("sampler_logprobs", &sampler_logprobs),
            ("advantages", &advantages),
        ] {
            if v.len() != n {
                return Err(Error::InvalidBatch(format!(
                    "{name} has {} values, expected {} x {} = {n}",
                    v.len(),
                    self.rows,
                    self.seq
                )));
            }
            for (b, &len) in self.lengths.iter().enumerate() {
                for t in 0..len {
                    let x = v[b * self.seq + t];
                    if !x.is_finite() {
                        return Err(Error::InvalidBatch(format!(
                            "{name}[{b}, {t}] = {x} is not finite"
                        )));
                    }
                }
            }
        }
        self.rl = Some(RlInputs {
            sampler_logprobs,
            advantages,
        });
        Ok(self)
    }

    /// [`Batch::with_rl_inputs`] from ragged rows aligned to the *tokens*, as
    /// [`Batch::from_token_rows`] takes the weights: row `b` has one value per token of
    /// sequence `b`, and value 0 (which no token predicts) is unused. So one sequence's
    /// tokens, weights, sampler logprobs and advantages are built the same way.
    pub fn with_rl_rows(
        self,
        sampler_logprobs: &[Vec<f32>],
        advantages: &[Vec<f32>],
    ) -> Result<Self> {
        let seq = self.seq;
        let mut dense = [vec![0f32; self.rows * seq], vec![0f32; self.rows * seq]];
        for (k, (name, rows)) in [
            ("sampler_logprobs", sampler_logprobs),
            ("advantages", advantages),
        ]
        .into_iter()
        .enumerate()
        {
            if rows.len() != self.rows {
                return Err(Error::InvalidBatch(format!(
                    "{} {name} rows for {} sequences",
                    rows.len(),
                    self.rows
                )));
            }
            for (b, r) in rows.iter().enumerate() {
                let len = self.lengths[b];
                if r.len() != len + 1 {
                    return Err(Error::InvalidBatch(format!(
                        "row {b}: {} {name} for {} tokens",
                        r.len(),
                        len + 1
                    )));
                }
                dense[k][b * seq..b * seq + len].copy_from_slice(&r[1..]);
            }
        }
        let [q, a] = dense;
        self.with_rl_inputs(q, a)
    }

    /// Attaches per-token advantages only (sampler logprobs 0), for [`LossKind::Linear`],
    /// which reads no sampler logprobs: row-major `[rows, seq]`, aligned to the targets.
    pub fn with_advantages(self, advantages: Vec<f32>) -> Result<Self> {
        let q = vec![0f32; advantages.len()];
        self.with_rl_inputs(q, advantages)
    }

    /// Σ over each row's real positions of `weight · logprobs` (`logprobs` row-major
    /// `[rows, seq]`, e.g. [`LossOutput::logprobs`]), in f64: a sequence's logprob of its
    /// weighted tokens (DPO's π and r).
    pub fn weighted_row_sums(&self, logprobs: &[f32]) -> Result<Vec<f64>> {
        if logprobs.len() != self.rows * self.seq {
            return Err(Error::InvalidBatch(format!(
                "{} logprobs for a {} x {} batch",
                logprobs.len(),
                self.rows,
                self.seq
            )));
        }
        Ok((0..self.rows)
            .map(|b| {
                let at = b * self.seq;
                (at..at + self.lengths[b])
                    .map(|i| self.weights[i] as f64 * logprobs[i] as f64)
                    .sum()
            })
            .collect())
    }

    /// The sampler's logprobs, row-major `[rows, seq]`, when attached.
    pub fn sampler_logprobs(&self) -> Option<&[f32]> {
        self.rl.as_ref().map(|r| r.sampler_logprobs.as_slice())
    }

    /// The advantages, row-major `[rows, seq]`, when attached.
    pub fn advantages(&self) -> Option<&[f32]> {
        self.rl.as_ref().map(|r| r.advantages.as_slice())
    }

    /// Checks that the batch carries what `kind` reads.
    pub(crate) fn check_loss_inputs(&self, kind: LossKind) -> Result<()> {
        if kind.needs_advantages() && self.rl.is_none() {
            let what = if kind.needs_sampler_logprobs() {
                "per-token sampler logprobs and advantages"
            } else {
                "per-token advantages"
            };
            return Err(Error::InvalidBatch(format!(
                "loss {} needs {what} (Batch::with_rl_inputs)",
                kind.name()
            )));
        }
        Ok(())
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

/// One preference pair's DPO numbers (Rafailov et al. 2023), from the summed reply
/// logprobs of the policy (π) and the reference (r) on the chosen (c) and rejected side.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoPair {
    /// −log σ(β·((π_c − r_c) − (π_r − r_r))).
    pub loss: f64,
    /// ∂loss/∂π_c (= −β·σ(−z)); ∂loss/∂π_r is its negative.
    pub d_chosen: f64,
    /// The chosen side's implicit reward β·(π_c − r_c).
    pub chosen_reward: f64,
    /// The rejected side's implicit reward β·(π_r − r_r).
    pub rejected_reward: f64,
}

impl DpoPair {
    /// Computes the pair's loss, derivative and rewards in f64 (stable for any margin).
    pub fn new(
        beta: f64,
        pi_chosen: f64,
        pi_rejected: f64,
        ref_chosen: f64,
        ref_rejected: f64,
    ) -> Self {
        let chosen_reward = beta * (pi_chosen - ref_chosen);
        let rejected_reward = beta * (pi_rejected - ref_rejected);
        let z = chosen_reward - rejected_reward;
        // softplus(−z) = −log σ(z), without overflow either way.
        let loss = if z > 0.0 {
            (-z).exp().ln_1p()
        } else {
            -z + z.exp().ln_1p()
        };
        // σ(−z) = 1 / (1 + e^z)
        let s = if z > 0.0 {
            let e = (-z).exp();
            e / (1.0 + e)
        } else {
            1.0 / (1.0 + z.exp())
        };
        DpoPair {
            loss,
            d_chosen: -beta * s,
            chosen_reward,
            rejected_reward,
        }
    }

    /// The reward margin (chosen − rejected).
    pub fn margin(&self) -> f64 {
        self.chosen_reward - self.rejected_reward
    }

    /// 1 when the chosen side's reward is higher, 0 when lower, ½ on a tie (so a policy
    /// equal to the reference, where every margin is 0, scores chance, 0.5).
    pub fn accuracy(&self) -> f64 {
        match self.margin() {
            m if m > 0.0 => 1.0,
            m if m < 0.0 => 0.0,
            _ => 0.5,
        }
    }
}
