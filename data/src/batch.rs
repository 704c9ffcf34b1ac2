//! Batching: the seeded per-epoch order and the resumable cursor over it,
//! global batches of N examples, micro-batches chosen by a token budget, and
//! sharding a global batch over ranks balanced by token count.
//!
//! Everything here is a pure function of (dataset lengths, seed, cursor), so
//! the coordinator can plan a step, checkpoint a [`DataCursor`], and a resumed
//! run replays exactly the same batches on any platform. Nothing here touches
//! tensors: micro-batches are plain `Vec`s that the model crate turns into
//! tensors.

use serde::{Deserialize, Serialize};

use crate::rng::SplitMix64;
use crate::{Datum, Error, Result};

/// Where the example stream stands: the next batch starts at
/// `epoch_order(seed, epoch)[position]`. Saved in checkpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DataCursor {
    /// 0-based epoch.
    pub epoch: u64,
    /// Examples of this epoch already handed out.
    pub position: u64,
}

/// The order in which epoch `epoch` visits examples `0..n`: a Fisher–Yates
/// shuffle driven by SplitMix64 seeded from `(seed, epoch)`. Same inputs, same
/// order, on every platform and in every process.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::for_stream(seed, epoch).shuffle(&mut order);
    order
}

/// One global batch: which examples (indices into the dataset) make up a step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalBatch {
    /// The epoch the batch was drawn from.
    pub epoch: u64,
    /// Dataset indices, in epoch order.
    pub indices: Vec<usize>,
}

/// Hands out global batches of `batch_size` examples in seeded epoch order.
///
/// An epoch has `n / batch_size` batches; the last `n % batch_size` examples
/// of each epoch's order are skipped (they are different examples each epoch,
/// so nothing is permanently left out). Batches never straddle epochs, so
/// every batch has exactly `batch_size` examples and the loss scale is the
/// same every step.
#[derive(Clone, Debug)]
pub struct BatchSampler {
    n: usize,
    batch_size: usize,
    seed: u64,
    cursor: DataCursor,
    order: Vec<usize>,
}

impl BatchSampler {
    /// A sampler at the start of epoch 0.
    pub fn new(n_examples: usize, batch_size: usize, seed: u64) -> Result<Self> {
        Self::resume(n_examples, batch_size, seed, DataCursor::default())
    }

    /// A sampler continuing from a saved cursor. Errors when the cursor does
    /// not fit (it points past the dataset, or not at a batch boundary).
    pub fn resume(
        n_examples: usize,
        batch_size: usize,
        seed: u64,
        cursor: DataCursor,
    ) -> Result<Self> {
        if batch_size == 0 {
            return Err(Error::InvalidArgument {
                what: "batch_size",
                message: "must be at least 1".into(),
            });
        }
        if n_examples < batch_size {
            return Err(Error::InvalidArgument {
                what: "batch_size",
                message: format!(
                    "batch_size {batch_size} is larger than the dataset ({n_examples} examples)"
                ),
            });
        }
        let per_epoch = (n_examples / batch_size) as u64;
        if !cursor.position.is_multiple_of(batch_size as u64)
            || cursor.position / batch_size as u64 >= per_epoch
        {
            return Err(Error::BadCursor {
                epoch: cursor.epoch,
                position: cursor.position,
                message: format!(
                    "position must be a multiple of batch_size {batch_size} below {}",
                    per_epoch * batch_size as u64
                ),
            });
        }
        Ok(Self {
            n: n_examples,
            batch_size,
            seed,
            cursor,
            order: epoch_order(n_examples, seed, cursor.epoch),
        })
    }

    /// The cursor to save: resuming from it yields the batch `next_batch`
    /// would return now.
    pub fn cursor(&self) -> DataCursor {
        self.cursor
    }

    /// Global batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        self.n / self.batch_size
    }

    /// Examples per global batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Progress in epochs as a fraction (for metrics): 1.5 = half-way
    /// through the second epoch.
    pub fn epoch_progress(&self) -> f64 {
        self.cursor.epoch as f64
            + self.cursor.position as f64 / (self.batches_per_epoch() * self.batch_size) as f64
    }

    /// The next global batch; advances the cursor (rolling into the next
    /// epoch, with a fresh order, after the last full batch).
    pub fn next_batch(&mut self) -> GlobalBatch {
        let start = self.cursor.position as usize;
        let indices = self.order[start..start + self.batch_size].to_vec();
        let batch = GlobalBatch {
            epoch: self.cursor.epoch,
            indices,
        };
        self.cursor.position += self.batch_size as u64;
        if self.cursor.position as usize + self.batch_size > self.n {
            self.cursor = DataCursor {
                epoch: self.cursor.epoch + 1,
                position: 0,
            };
            self.order = epoch_order(self.n, self.seed, self.cursor.epoch);
        }
        batch
    }
}

/// A micro-batch as plain rows, right-padded to the longest row.
///
/// For a datum `t` of length L the row is `input_ids = t[..L-1]`,
/// `target_ids = t[1..]`, `weights = w[1..]` (weights align with targets);
/// padding positions hold `pad_id` and weight 0.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MicroBatch {
    /// `[rows][seq_len]` input token ids.
    pub input_ids: Vec<Vec<u32>>,
    /// `[rows][seq_len]` target token ids (inputs shifted by one).
    pub target_ids: Vec<Vec<u32>>,
    /// `[rows][seq_len]` per-target loss weights, 0 on padding.
    pub weights: Vec<Vec<f32>>,
    /// Unpadded length of each row (so a model can mask padding if it wants;
    /// with right padding and causal attention it need not).
    pub lengths: Vec<usize>,
    /// Dataset index of each row.
    pub example_indices: Vec<usize>,
    /// Padded row length.
    pub seq_len: usize,
}

impl MicroBatch {
    /// Rows in the micro-batch.
    pub fn rows(&self) -> usize {
        self.input_ids.len()
    }

    /// `rows × seq_len`: what the budget bounds.
    pub fn padded_tokens(&self) -> usize {
        self.rows() * self.seq_len
    }

    /// Real (unpadded) input positions.
    pub fn real_tokens(&self) -> usize {
        self.lengths.iter().sum()
    }

    /// Sum of all target weights.
    pub fn weight_sum(&self) -> f64 {
        self.weights.iter().flatten().map(|&w| w as f64).sum()
    }
}

/// Groups items with the given row lengths into micro-batches whose padded
/// size `rows × longest` stays within `token_budget`. An item longer than the
/// budget goes alone. Returns positions into `lengths`.
///
/// Longest first, then greedy: sorting by length keeps rows of similar length
/// together so little is spent on padding, and the first row of each group is
/// its longest, so the padded size is known as rows are added. Ties break by
/// position, so the plan is deterministic.
pub fn plan_micro_batches(lengths: &[usize], token_budget: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut longest = 0usize;
    for pos in order {
        if current.is_empty() {
            longest = lengths[pos];
            current.push(pos);
            continue;
        }
        if (current.len() + 1) * longest <= token_budget {
            current.push(pos);
        } else {
            groups.push(std::mem::take(&mut current));
            longest = lengths[pos];
            current.push(pos);
        }
    }
    if !current.is_empty() {
        groups.push(current);
    }
    groups
}

/// Builds the micro-batches for the examples `indices` of `data` (a global
/// batch, or one rank's shard of it) under `token_budget` padded input tokens
/// per micro-batch. Padding uses `pad_id` with weight 0.
pub fn micro_batches(
    data: &[Datum],
    indices: &[usize],
    token_budget: usize,
    pad_id: u32,
) -> Result<Vec<MicroBatch>> {
    if token_budget == 0 {
        return Err(Error::InvalidArgument {
            what: "token_budget",
            message: "must be at least 1".into(),
        });
    }
    let mut lengths = Vec::with_capacity(indices.len());
    for &i in indices {
        let d = data.get(i).ok_or_else(|| Error::InvalidArgument {
            what: "batch index",
            message: format!("index {i} is outside the dataset ({} examples)", data.len()),
        })?;
        if d.tokens.len() < 2 || d.weights.len() != d.tokens.len() {
            return Err(Error::InvalidArgument {
                what: "datum",
                message: format!(
                    "example {i} has {} tokens and {} weights; needs at least 2 tokens and one weight per token",
                    d.tokens.len(),
                    d.weights.len()
                ),
            });
        }
        lengths.push(d.tokens.len() - 1);
    }
    let plan = plan_micro_batches(&lengths, token_budget);
    Ok(plan
        .into_iter()
        .map(|group| {
            let seq_len = group.iter().map(|&p| lengths[p]).max().unwrap_or(0);
            let mut mb = MicroBatch {
                input_ids: Vec::with_capacity(group.len()),
                target_ids: Vec::with_capacity(group.len()),
                weights: Vec::with_capacity(group.len()),
                lengths: Vec::with_capacity(group.len()),
                example_indices: Vec::with_capacity(group.len()),
                seq_len,
            };
            for p in group {
                let d = &data[indices[p]];
                let len = lengths[p];
                let mut inp = d.tokens[..len].to_vec();
                let mut tgt = d.tokens[1..].to_vec();
                let mut w = d.weights[1..].to_vec();
                inp.resize(seq_len, pad_id);
                tgt.resize(seq_len, pad_id);
                w.resize(seq_len, 0.0);
                mb.input_ids.push(inp);
                mb.target_ids.push(tgt);
                mb.weights.push(w);
                mb.lengths.push(len);
                mb.example_indices.push(indices[p]);
            }
            mb
        })
        .collect())
}

/// Splits items with token counts `lengths` over `world_size` ranks so each
/// rank's total is close to the others' (longest-processing-time greedy: the
/// longest item goes to the currently lightest rank). Deterministic: ties
/// break by position and then by rank. Each shard lists positions into
/// `lengths` in ascending order; a shard may be empty when there are fewer
/// items than ranks.
pub fn shard_by_tokens(lengths: &[usize], world_size: usize) -> Result<Vec<Vec<usize>>> {
    if world_size == 0 {
        return Err(Error::InvalidArgument {
            what: "world_size",
            message: "must be at least 1".into(),
        });
    }
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let mut load = vec![(0usize, 0usize); world_size]; // (tokens, items)
    let mut shards = vec![Vec::new(); world_size];
    for pos in order {
        let rank = (0..world_size)
            .min_by_key(|&r| (load[r].0, load[r].1, r))
            .expect("world_size >= 1");
        load[rank].0 += lengths[pos];
        load[rank].1 += 1;
        shards[rank].push(pos);
    }
    for s in &mut shards {
        s.sort_unstable();
    }
    Ok(shards)
}
