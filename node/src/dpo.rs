//! DPO inside the [`crate::Trainer`] (`train.method = "dpo"`): the pairs, the reference
//! cache, and one step's gradient and numbers; the trainer does the rest (batches, the
//! [`crate::StepSync`] all-reduce, AdamW, checkpoints, metrics.jsonl, eval cadence).
//!
//! One step over a batch of pairs (each pair is two sequences, chosen and rejected, split
//! into micro-batches under `train.micro_batch_tokens` like SFT examples):
//! 1. a no-grad pass with the adapter on gives each sequence's summed reply logprob π;
//!    the reference r (adapter off) is computed the first time a pair is used and kept —
//!    the base never changes, so that is the same number as recomputing it every batch;
//! 2. each pair's [`DpoPair`] gives its loss and ∂loss/∂π;
//! 3. a forward/backward with the `linear` loss and advantage −∂loss/∂π on every reply
//!    token gives the gradient of Σ_pairs loss.
//!
//! The step's flat buffer is the gradient, then the pair count (the normaliser: the
//! trainer divides by the global count, so the loss is the mean over pairs), Σ loss,
//! and [`EXTRA`] more sums (accuracy, chosen reward, rejected reward), all summed over ranks
//! by the same one all-reduce.
//!
//! With `lora.dropout > 0` the no-grad pass runs without dropout and the gradient pass with
//! it, so ∂loss/∂π is taken at the dropout-free policy.

use ringtune_config::RunConfig;
use ringtune_data::{
    load_preference_jsonl, micro_batches, split_pairs, DataReport, Datum, MicroBatch,
    PreferencePair, Tokenizer,
};
use ringtune_model::{Adapters, Batch, DpoPair, LoraModel, LossKind};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::optim::StepGrads;
use crate::trainer::{load_options, renderer_of};

/// Sums after the pair count and Σ loss in a DPO step's buffer: Σ accuracy, Σ chosen
/// reward, Σ rejected reward.
pub const EXTRA: usize = 3;

/// Scalars after the gradients in a DPO step's buffer: pairs, Σ loss, then the [`EXTRA`].
pub(crate) const TAIL: usize = 2 + EXTRA;

/// DPO's numbers in a metrics.jsonl line (flattened into it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DpoMetrics {
    /// Share of the step's pairs whose chosen reward beats the rejected (ties count ½).
    pub dpo_accuracy: f64,
    /// Mean β·(π_c − r_c).
    pub dpo_chosen_reward: f64,
    /// Mean β·(π_r − r_r).
    pub dpo_rejected_reward: f64,
    /// Mean chosen − rejected reward.
    pub dpo_margin: f64,
    /// Mean DPO loss on the held-out pairs, at the eval cadence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_dpo_loss: Option<f64>,
    /// Preference accuracy on the held-out pairs, at the eval cadence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_dpo_accuracy: Option<f64>,
}

/// Means over a set of pairs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoEval {
    /// Mean DPO loss.
    pub loss: f64,
    /// Preference accuracy (ties count ½).
    pub accuracy: f64,
    /// Mean reward margin.
    pub margin: f64,
    /// Pairs evaluated.
    pub pairs: usize,
}

/// The pairs of a DPO run and their cached reference sums.
#[derive(Debug)]
pub struct Dpo {
    beta: f64,
    train: Vec<PreferencePair>,
    eval: Vec<PreferencePair>,
    reports: Vec<DataReport>,
    /// (r_c, r_r) per pair, once computed.
    ref_train: Vec<Option<(f64, f64)>>,
    ref_eval: Vec<Option<(f64, f64)>>,
}

/// A [`MicroBatch`] as the model's [`Batch`].
fn to_batch(mb: &MicroBatch) -> Result<Batch> {
    Ok(Batch::new(
        mb.rows(),
        mb.seq_len,
        mb.input_ids.concat(),
        mb.target_ids.concat(),
        mb.weights.concat(),
        mb.lengths.clone(),
    )?)
}

/// Per-sequence (π, r) of `seqs`, in micro-batches; r only for the rows where `need_ref`.
struct Sums {
    policy: Vec<f64>,
    reference: Vec<Option<f64>>,
}

fn sums(model: &LoraModel, seqs: &[Datum], need_ref: &[bool], mbs: &[MicroBatch]) -> Result<Sums> {
    let mut policy = vec![0f64; seqs.len()];
    let mut reference = vec![None; seqs.len()];
    for mb in mbs {
        let b = to_batch(mb)?;
        let out = model.logprobs(&b, LossKind::CrossEntropy, Adapters::On)?;
        for (row, s) in b.weighted_row_sums(&out.logprobs)?.into_iter().enumerate() {
            policy[mb.example_indices[row]] = s;
        }
        if mb.example_indices.iter().any(|&i| need_ref[i]) {
            let out = model.logprobs(&b, LossKind::CrossEntropy, Adapters::Off)?;
            for (row, s) in b.weighted_row_sums(&out.logprobs)?.into_iter().enumerate() {
                reference[mb.example_indices[row]] = Some(s);
            }
        }
    }
    Ok(Sums { policy, reference })
}

/// Chosen and rejected of each pair, interleaved: sequence 2k is pair k's chosen side.
fn sequences(pairs: &[PreferencePair], indices: &[usize]) -> Vec<Datum> {
    indices
        .iter()
        .flat_map(|&i| [pairs[i].chosen.clone(), pairs[i].rejected.clone()])
        .collect()
}

/// The pairs' DPO numbers; fills `cache` with reference sums it had not seen.
fn score(
    model: &LoraModel,
    beta: f64,
    pairs: &[PreferencePair],
    cache: &mut [Option<(f64, f64)>],
    indices: &[usize],
    token_budget: usize,
    pad_id: u32,
) -> Result<(Vec<Datum>, Vec<MicroBatch>, Vec<DpoPair>)> {
    let seqs = sequences(pairs, indices);
    let all: Vec<usize> = (0..seqs.len()).collect();
    let mbs = micro_batches(&seqs, &all, token_budget, pad_id)?;
    let need_ref: Vec<bool> = (0..seqs.len())
        .map(|s| cache[indices[s / 2]].is_none())
        .collect();
    let got = sums(model, &seqs, &need_ref, &mbs)?;
    let mut out = Vec::with_capacity(indices.len());
    for (k, &i) in indices.iter().enumerate() {
        if cache[i].is_none() {
            let (c, r) = (got.reference[2 * k], got.reference[2 * k + 1]);
            cache[i] = Some((
                c.expect("reference computed for every uncached row"),
                r.expect("reference computed for every uncached row"),
            ));
        }
        let (rc, rr) = cache[i].expect("filled above");
        out.push(DpoPair::new(
            beta,
            got.policy[2 * k],
            got.policy[2 * k + 1],
            rc,
            rr,
        ));
    }
    Ok((seqs, mbs, out))
}

/// The training and held-out pairs of a DPO config and the load reports: the one way
/// [`Dpo::load`] (and `ringtune render`) read them.
pub fn load_pairs(
    cfg: &RunConfig,
    tok: &Tokenizer,
) -> Result<(Vec<PreferencePair>, Vec<PreferencePair>, Vec<DataReport>)> {
    let renderer = renderer_of(cfg.data.renderer, tok)?;
    let opts = load_options(cfg);
    let train_set = load_preference_jsonl(&cfg.data.train, &renderer, &opts)?;
    let mut reports = vec![train_set.report.clone()];
    let (train, eval) = match &cfg.data.eval {
        Some(p) => {
            let e = load_preference_jsonl(p, &renderer, &opts)?;
            reports.push(e.report.clone());
            (train_set.pairs, e.pairs)
        }
        None => split_pairs(train_set.pairs, cfg.data.eval_fraction, cfg.seed)?,
    };
    Ok((train, eval, reports))
}

impl Dpo {
    /// Loads the preference pairs named by `data.train` / `data.eval` (or a
    /// `data.eval_fraction` split), rendered with the config's renderer.
    pub fn load(cfg: &RunConfig, tok: &Tokenizer) -> Result<Self> {
        let (train, eval, reports) = load_pairs(cfg, tok)?;
        Ok(Self {
            beta: cfg.dpo.beta,
            ref_train: vec![None; train.len()],
            ref_eval: vec![None; eval.len()],
            train,
            eval,
            reports,
        })
    }

    /// Training pairs.
    pub fn train_len(&self) -> usize {
        self.train.len()
    }

    /// The training pairs' sequences in file order (chosen, then rejected, per pair).
    pub fn train_sequences(&self) -> impl Iterator<Item = &ringtune_data::Datum> {
        self.train.iter().flat_map(|p| [&p.chosen, &p.rejected])
    }

    /// Tokens of training pair `i` (chosen + rejected), for balancing a distributed step.
    pub fn pair_tokens(&self, i: usize) -> usize {
        let p = &self.train[i];
        p.chosen.len() + p.rejected.len()
    }

    /// Held-out pairs.
    pub fn eval_len(&self) -> usize {
        self.eval.len()
    }

    /// What loading each file did (`examples` counts pairs).
    pub fn reports(&self) -> &[DataReport] {
        &self.reports
    }

    /// The step's local part over training pairs `indices`, added to `sum` (the gradient of
    /// Σ loss; its tail gets pairs, Σ loss and the [`EXTRA`] sums); returns the target
    /// tokens that carried gradient. Each pair costs a no-grad pass (plus the reference
    /// pass the first time) and a forward/backward of both sides.
    pub(crate) fn accumulate(
        &mut self,
        model: &LoraModel,
        indices: &[usize],
        token_budget: usize,
        pad_id: u32,
        sum: &mut StepGrads,
    ) -> Result<u64> {
        if indices.is_empty() {
            return Ok(0);
        }
        let (seqs, mbs, pairs) = score(
            model,
            self.beta,
            &self.train,
            &mut self.ref_train,
            indices,
            token_budget,
            pad_id,
        )?;
        // −∂loss/∂π per sequence: the `linear` loss's advantage on its reply tokens.
        let adv: Vec<f32> = (0..seqs.len())
            .map(|s| {
                let d = pairs[s / 2].d_chosen;
                (if s % 2 == 0 { -d } else { d }) as f32
            })
            .collect();
        let mut tokens = 0u64;
        for mb in &mbs {
            let b = to_batch(mb)?;
            let a: Vec<f32> = mb
                .example_indices
                .iter()
                .flat_map(|&s| std::iter::repeat_n(adv[s], mb.seq_len))
                .collect();
            let b = b.with_advantages(a)?;
            let (out, grads) = model.forward_backward(&b, LossKind::Linear)?;
            sum.add(&grads)?;
            tokens += out.tokens as u64;
        }
        let tail = sum.tail_mut();
        tail[0] = pairs.len() as f32;
        tail[1] = pairs.iter().map(|p| p.loss).sum::<f64>() as f32;
        tail[2] = pairs.iter().map(DpoPair::accuracy).sum::<f64>() as f32;
        tail[3] = pairs.iter().map(|p| p.chosen_reward).sum::<f64>() as f32;
        tail[4] = pairs.iter().map(|p| p.rejected_reward).sum::<f64>() as f32;
        Ok(tokens)
    }

    /// The metrics from a step's all-reduced tail (`pairs`, Σ loss, then the [`EXTRA`]
    /// sums).
    pub fn metrics(tail: &[f32]) -> DpoMetrics {
        let pairs = (tail[0] as f64).max(1.0);
        let (c, r) = (tail[3] as f64 / pairs, tail[4] as f64 / pairs);
        DpoMetrics {
            dpo_accuracy: tail[2] as f64 / pairs,
            dpo_chosen_reward: c,
            dpo_rejected_reward: r,
            dpo_margin: c - r,
            eval_dpo_loss: None,
            eval_dpo_accuracy: None,
        }
    }

    /// Loss, accuracy and margin of the current adapter on the held-out pairs (`None`
    /// when there are none).
    pub fn evaluate(
        &mut self,
        model: &LoraModel,
        token_budget: usize,
        pad_id: u32,
    ) -> Result<Option<DpoEval>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let indices: Vec<usize> = (0..self.eval.len()).collect();
        let (_, _, pairs) = score(
            model,
            self.beta,
            &self.eval,
            &mut self.ref_eval,
            &indices,
            token_budget,
            pad_id,
        )?;
        let n = pairs.len() as f64;
        let mean = |f: fn(&DpoPair) -> f64| pairs.iter().map(f).sum::<f64>() / n;
        Ok(Some(DpoEval {
            loss: mean(|p| p.loss),
            accuracy: mean(DpoPair::accuracy),
            margin: mean(DpoPair::margin),
            pairs: pairs.len(),
        }))
    }
}
