//! The data plan: which examples make up each step's global batch, and how
//! that batch is split over the ranks.
//!
//! The epoch orders come in already shuffled (seeded shuffling belongs to
//! `data/`); the plan only cuts them into global batches and shards each batch
//! by token count, so ranks finish their forward/backward at about the same
//! time. Everything is a pure function of the inputs: a restart, or a smaller
//! world after one, gets the same global batch for a step (only the split
//! changes), which is what keeps the optimiser trajectory the same.

use crate::error::{Error, Result};
use crate::ids::{ExampleIndex, Step, WorldSize};
use serde::{Deserialize, Serialize};

/// One example in an epoch order, with the token count that shards are
/// balanced by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedExample {
    pub index: ExampleIndex,
    pub tokens: u32,
}

/// Global batches for the whole run, epoch after epoch. A batch never spans
/// two epochs; an epoch's last, short batch is kept unless `drop_last`.
#[derive(Debug, Clone)]
pub struct DataPlan {
    global_batch: usize,
    /// Every epoch's order, concatenated.
    order: Vec<PlannedExample>,
    /// `order[start..end]` for each step, step 1 first.
    batches: Vec<(usize, usize)>,
}

impl DataPlan {
    /// Cuts the epoch orders into global batches of `global_batch` examples.
    pub fn new(
        epochs: Vec<Vec<PlannedExample>>,
        global_batch: usize,
        drop_last: bool,
    ) -> Result<DataPlan> {
        let invalid = |reason: String| Error::InvalidPlan { reason };
        if global_batch == 0 {
            return Err(invalid(
                "the global batch size must be at least 1".to_string(),
            ));
        }
        if epochs.is_empty() {
            return Err(invalid("no epochs".to_string()));
        }
        let mut order = Vec::new();
        let mut batches = Vec::new();
        for (e, epoch) in epochs.into_iter().enumerate() {
            if epoch.is_empty() {
                return Err(invalid(format!("epoch {e} has no examples")));
            }
            let start = order.len();
            let end = start + epoch.len();
            order.extend(epoch);
            let mut s = start;
            while s < end {
                let stop = (s + global_batch).min(end);
                if stop - s == global_batch || !drop_last {
                    batches.push((s, stop));
                }
                s = stop;
            }
        }
        if batches.is_empty() {
            return Err(invalid(format!(
                "no full global batch of {global_batch}: every epoch is shorter and drop_last is set"
            )));
        }
        Ok(DataPlan {
            global_batch,
            order,
            batches,
        })
    }

    /// A plan from ready-made global batches, one per step (what
    /// `ringtune_data`'s resumable `BatchSampler` hands out). The global
    /// batch size is the largest batch's.
    pub fn from_batches(batches: Vec<Vec<PlannedExample>>) -> Result<DataPlan> {
        if batches.is_empty() {
            return Err(Error::InvalidPlan {
                reason: "no batches".to_string(),
            });
        }
        let mut order = Vec::new();
        let mut ranges = Vec::with_capacity(batches.len());
        for (i, batch) in batches.into_iter().enumerate() {
            if batch.is_empty() {
                return Err(Error::InvalidPlan {
                    reason: format!("the batch of step {} is empty", i + 1),
                });
            }
            let start = order.len();
            order.extend(batch);
            ranges.push((start, order.len()));
        }
        let global_batch = ranges.iter().map(|(s, e)| e - s).max().unwrap_or(0);
        Ok(DataPlan {
            global_batch,
            order,
            batches: ranges,
        })
    }

    /// The number of optimiser steps in the plan.
    pub fn total_steps(&self) -> u64 {
        self.batches.len() as u64
    }

    /// The configured global batch size (an epoch's last batch may be shorter).
    pub fn global_batch(&self) -> usize {
        self.global_batch
    }

    /// The examples of `step`'s global batch, in epoch order.
    pub fn batch(&self, step: Step) -> Result<&[PlannedExample]> {
        let out_of_range = || Error::StepOutOfRange {
            step,
            total: self.total_steps(),
        };
        let i = step.0.checked_sub(1).ok_or_else(out_of_range)?;
        let &(s, e) = self
            .batches
            .get(usize::try_from(i).map_err(|_| out_of_range())?)
            .ok_or_else(out_of_range)?;
        Ok(&self.order[s..e])
    }

    /// Splits `step`'s global batch over `world` ranks, balanced by token count.
    /// (The same rule, tie-breaks included, as `ringtune_data::batch::shard_by_tokens`.)
    ///
    /// Greedy longest-first: examples in decreasing token order go to the rank
    /// with the fewest tokens so far (ties: fewer examples, then lower rank).
    /// So the most-loaded rank exceeds the least-loaded by at most one
    /// example's tokens. Each shard keeps epoch order. Ranks may get an empty
    /// shard when the batch has fewer examples than ranks; they still take
    /// part in the all-reduce with a zero gradient.
    pub fn shard(&self, step: Step, world: WorldSize) -> Result<Vec<Vec<PlannedExample>>> {
        if world.0 == 0 {
            return Err(Error::InvalidPlan {
                reason: "cannot shard over a world of 0 ranks".to_string(),
            });
        }
        let batch = self.batch(step)?;
        let mut by_size: Vec<usize> = (0..batch.len()).collect();
        by_size.sort_by_key(|&i| (std::cmp::Reverse(batch[i].tokens), i));
        let w = world.get();
        let mut load = vec![(0u64, 0usize); w];
        let mut owner = vec![0usize; batch.len()];
        for i in by_size {
            let r = (0..w).min_by_key(|&r| (load[r], r)).unwrap_or(0);
            load[r].0 += u64::from(batch[i].tokens);
            load[r].1 += 1;
            owner[i] = r;
        }
        let mut shards = vec![Vec::new(); w];
        for (i, ex) in batch.iter().enumerate() {
            shards[owner[i]].push(*ex);
        }
        Ok(shards)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn epoch(tokens: &[u32], first_index: u64) -> Vec<PlannedExample> {
        tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| PlannedExample {
                index: ExampleIndex(first_index + i as u64),
                tokens: t,
            })
            .collect()
    }

    /// One epoch with token counts `tokens` (example i has index i), batch
    /// size `batch`, sharded over `world` ranks; renders every step as
    /// `step: [index:tokens ...] | [...]`.
    fn check(tokens: &[u32], batch: usize, world: u32, expect: &str) {
        let plan = DataPlan::new(vec![epoch(tokens, 0)], batch, false).unwrap();
        let mut lines = Vec::new();
        for s in 1..=plan.total_steps() {
            let shards = plan.shard(Step(s), WorldSize(world)).unwrap();
            let rendered: Vec<String> = shards
                .iter()
                .map(|sh| {
                    let items: Vec<String> = sh
                        .iter()
                        .map(|e| format!("{}:{}", e.index.0, e.tokens))
                        .collect();
                    format!("[{}]", items.join(" "))
                })
                .collect();
            lines.push(format!("{s}: {}", rendered.join(" | ")));
        }
        assert_eq!(
            lines.join("\n"),
            expect.trim(),
            "tokens {tokens:?} batch {batch} world {world}"
        );
    }

    #[test]
    fn shards_balance_tokens() {
        check(&[10, 10, 10, 10], 4, 2, "1: [0:10 2:10] | [1:10 3:10]");
        // The long example sits alone; the short ones fill the other rank.
        check(
            &[100, 10, 20, 30, 40],
            5,
            2,
            "1: [0:100] | [1:10 2:20 3:30 4:40]",
        );
        check(
            &[5, 1, 1, 1, 1, 1, 5],
            7,
            2,
            "1: [0:5 1:1 3:1 5:1] | [2:1 4:1 6:5]",
        );
        // Two steps and a short last batch.
        check(
            &[3, 1, 4, 1, 5],
            2,
            2,
            "1: [0:3] | [1:1]\n2: [2:4] | [3:1]\n3: [4:5] | []",
        );
        check(&[3, 1, 4], 3, 1, "1: [0:3 1:1 2:4]");
        // More ranks than examples: empty shards, still one per rank.
        check(&[7, 8], 2, 4, "1: [1:8] | [0:7] | [] | []");
    }

    #[test]
    fn batches_do_not_span_epochs_and_drop_last_drops() {
        let epochs = vec![epoch(&[1, 1, 1], 0), epoch(&[1, 1, 1], 100)];
        let keep = DataPlan::new(epochs.clone(), 2, false).unwrap();
        let idx = |p: &DataPlan, s| {
            p.batch(Step(s))
                .unwrap()
                .iter()
                .map(|e| e.index.0)
                .collect::<Vec<_>>()
        };
        assert_eq!(keep.total_steps(), 4);
        assert_eq!(idx(&keep, 2), vec![2]);
        assert_eq!(idx(&keep, 3), vec![100, 101]);
        let drop = DataPlan::new(epochs, 2, true).unwrap();
        assert_eq!(drop.total_steps(), 2);
        assert_eq!(idx(&drop, 2), vec![100, 101]);
    }

    #[test]
    fn plan_from_batches() {
        let plan = DataPlan::from_batches(vec![epoch(&[4, 4, 1], 10), epoch(&[2, 2], 20)]).unwrap();
        assert_eq!((plan.total_steps(), plan.global_batch()), (2, 3));
        let shards = plan.shard(Step(1), WorldSize(2)).unwrap();
        let idx = |sh: &Vec<PlannedExample>| sh.iter().map(|e| e.index.0).collect::<Vec<_>>();
        assert_eq!((idx(&shards[0]), idx(&shards[1])), (vec![10, 12], vec![11]));
        assert_eq!(
            DataPlan::from_batches(vec![]).unwrap_err().to_string(),
            "data plan: no batches"
        );
        assert_eq!(
            DataPlan::from_batches(vec![epoch(&[1], 0), vec![]])
                .unwrap_err()
                .to_string(),
            "data plan: the batch of step 2 is empty"
        );
    }

    #[test]
    fn plan_errors() {
        let err = |epochs, batch, drop| DataPlan::new(epochs, batch, drop).unwrap_err().to_string();
        assert_eq!(
            err(vec![epoch(&[1], 0)], 0, false),
            "data plan: the global batch size must be at least 1"
        );
        assert_eq!(err(vec![], 1, false), "data plan: no epochs");
        assert_eq!(
            err(vec![epoch(&[1], 0), vec![]], 1, false),
            "data plan: epoch 1 has no examples"
        );
        assert_eq!(
            err(vec![epoch(&[1, 2], 0)], 3, true),
            "data plan: no full global batch of 3: every epoch is shorter and drop_last is set"
        );
        let plan = DataPlan::new(vec![epoch(&[1, 2], 0)], 1, false).unwrap();
        for s in [0, 3, u64::MAX] {
            assert_eq!(
                plan.shard(Step(s), WorldSize(1)).unwrap_err(),
                Error::StepOutOfRange {
                    step: Step(s),
                    total: 2
                }
            );
        }
        assert!(plan.shard(Step(1), WorldSize(0)).is_err());
    }

    proptest! {
        /// Every shard set is a partition of the batch, keeps epoch order,
        /// and is balanced within one example's tokens.
        #[test]
        fn shards_partition_and_balance(
            tokens in prop::collection::vec(0u32..5000, 1..200),
            batch in 1usize..64,
            world in 1u32..17,
        ) {
            let plan = DataPlan::new(vec![epoch(&tokens, 0)], batch, false).unwrap();
            for s in 1..=plan.total_steps() {
                let step = Step(s);
                let shards = plan.shard(step, WorldSize(world)).unwrap();
                prop_assert_eq!(shards.len(), world as usize);
                let mut all: Vec<u64> = shards.iter().flatten().map(|e| e.index.0).collect();
                for sh in &shards {
                    prop_assert!(sh.windows(2).all(|w| w[0].index < w[1].index));
                }
                all.sort_unstable();
                let want: Vec<u64> = plan.batch(step).unwrap().iter().map(|e| e.index.0).collect();
                prop_assert_eq!(&all, &want);
                let loads: Vec<u64> = shards.iter().map(|sh| sh.iter().map(|e| u64::from(e.tokens)).sum()).collect();
                let biggest = plan.batch(step).unwrap().iter().map(|e| u64::from(e.tokens)).max().unwrap();
                let (lo, hi) = (*loads.iter().min().unwrap(), *loads.iter().max().unwrap());
                prop_assert!(hi - lo <= biggest, "loads {:?}", loads);
                prop_assert_eq!(&shards, &plan.shard(step, WorldSize(world)).unwrap());
            }
        }
    }
}
