//! One metrics record per step: the ranks' reports summed in rank order (so
//! the floating-point sums are the same on every run), plus the step's wall
//! time as the core measured it from the `now` values it was given.

use crate::ids::{Generation, Step, WorldSize};
use crate::msg::StepReport;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A line of `metrics.jsonl` (newtypes serialise as bare numbers). The fields the
/// one-process trainer writes come first under the same names (`step`, `epoch`, `loss`,
/// `lr`, `grad_norm`, `tokens`, `weight`, `examples`, `tokens_per_s`, `elapsed_s`,
/// `eval_nll`), so one reader handles both; the rest say how the ranks spent the step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: Step,
    /// The epoch the step's global batch came from (0-based).
    pub epoch: u64,
    /// Σ loss_sum / Σ weight; `None` when the batch carried no weight.
    pub loss: Option<f64>,
    /// The step's learning rate (rank 0's; every rank uses the same).
    pub lr: f64,
    /// Global gradient norm before clipping (rank 0's; equal on every rank).
    pub grad_norm: f64,
    pub tokens: u64,
    /// Σ loss weight over the global batch.
    #[serde(rename = "weight")]
    pub weight_sum: f64,
    pub examples: u64,
    /// `None` when no time passed (a virtual clock in tests).
    pub tokens_per_s: Option<f64>,
    /// Σ wall time of the run's steps so far, earlier segments of a resumed run included.
    pub elapsed_s: f64,
    /// Steps re-run after a restart appear again with a higher generation.
    pub generation: Generation,
    pub world_size: WorldSize,
    pub loss_sum: f64,
    /// From handing the step out to the last rank's report.
    pub wall_s: f64,
    /// Mean and slowest rank's forward/backward + optimiser time.
    pub compute_s_mean: f64,
    pub compute_s_max: f64,
    /// Mean and slowest rank's all-reduce time.
    pub comm_s_mean: f64,
    pub comm_s_max: f64,
    /// The eval NLL after this step, when a rank evaluated (the lowest rank's).
    pub eval_nll: Option<f64>,
    /// Method-specific global numbers (RL rewards, DPO accuracies), as rank 0 reported
    /// them. (Not `#[serde(flatten)]`: the record must survive bincode; the CLI lifts these
    /// to top-level keys of the metrics.jsonl line.)
    pub extra: std::collections::BTreeMap<String, f64>,
}

impl StepRecord {
    /// Sums `reports` (one per rank, in rank order) into one record.
    pub fn aggregate(
        generation: Generation,
        step: Step,
        examples: u64,
        wall: Duration,
        reports: &[&StepReport],
    ) -> StepRecord {
        let first = reports.first();
        let mut r = StepRecord {
            step,
            epoch: first.map_or(0, |f| f.epoch),
            loss: None,
            lr: first.map_or(0.0, |f| f.lr),
            grad_norm: first.map_or(0.0, |f| f.grad_norm),
            tokens: 0,
            weight_sum: 0.0,
            examples,
            tokens_per_s: None,
            elapsed_s: wall.as_secs_f64(),
            generation,
            world_size: WorldSize(reports.len() as u32),
            loss_sum: 0.0,
            wall_s: wall.as_secs_f64(),
            compute_s_mean: 0.0,
            compute_s_max: 0.0,
            comm_s_mean: 0.0,
            comm_s_max: 0.0,
            eval_nll: None,
            extra: first.map(|f| f.extra.clone()).unwrap_or_default(),
        };
        for rep in reports {
            r.loss_sum += rep.loss_sum;
            r.weight_sum += rep.weight_sum;
            r.tokens = r.tokens.saturating_add(rep.tokens);
            let (compute, comm) = (rep.compute.as_secs_f64(), rep.comm.as_secs_f64());
            r.compute_s_mean += compute;
            r.comm_s_mean += comm;
            r.compute_s_max = r.compute_s_max.max(compute);
            r.comm_s_max = r.comm_s_max.max(comm);
            r.eval_nll = r.eval_nll.or(rep.eval_nll);
        }
        if !reports.is_empty() {
            r.compute_s_mean /= reports.len() as f64;
            r.comm_s_mean /= reports.len() as f64;
        }
        if r.weight_sum != 0.0 {
            r.loss = Some(r.loss_sum / r.weight_sum);
        }
        if r.wall_s > 0.0 {
            r.tokens_per_s = Some(r.tokens as f64 / r.wall_s);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(
        loss_sum: f64,
        weight_sum: f64,
        tokens: u64,
        compute_ms: u64,
        comm_ms: u64,
    ) -> StepReport {
        StepReport {
            generation: Generation(0),
            step: Step(3),
            loss_sum,
            weight_sum,
            tokens,
            epoch: 0,
            lr: 1e-4,
            grad_norm: 0.5,
            compute: Duration::from_millis(compute_ms),
            comm: Duration::from_millis(comm_ms),
            adapter_hash: None,
            eval_nll: None,
            extra: [("reward_mean".to_string(), 0.25)].into_iter().collect(),
        }
    }

    #[test]
    fn sums_over_ranks() {
        let (a, b) = (
            report(6.0, 4.0, 100, 300, 100),
            report(2.0, 4.0, 60, 500, 50),
        );
        let r = StepRecord::aggregate(
            Generation(1),
            Step(3),
            5,
            Duration::from_millis(800),
            &[&a, &b],
        );
        assert_eq!(r.loss, Some(1.0));
        assert_eq!(
            (r.loss_sum, r.weight_sum, r.tokens, r.examples),
            (8.0, 8.0, 160, 5)
        );
        assert_eq!(r.tokens_per_s, Some(200.0));
        assert!((r.compute_s_mean - 0.4).abs() < 1e-12 && (r.compute_s_max - 0.5).abs() < 1e-12);
        assert!((r.comm_s_mean - 0.075).abs() < 1e-12 && (r.comm_s_max - 0.1).abs() < 1e-12);
        let json = serde_json::to_string(&r).unwrap();
        // The one-process trainer's names and order first, so one reader parses both.
        assert!(
            json.starts_with(
                "{\"step\":3,\"epoch\":0,\"loss\":1.0,\"lr\":0.0001,\"grad_norm\":0.5,\
                 \"tokens\":160,\"weight\":8.0,\"examples\":5,\"tokens_per_s\":200.0,"
            ),
            "{json}"
        );
        assert!(json.contains("\"world_size\":2"), "{json}");
        assert_eq!(r.extra.get("reward_mean"), Some(&0.25));
    }

    #[test]
    fn zero_weight_and_zero_time_give_none_not_nan() {
        let a = report(0.0, 0.0, 0, 0, 0);
        let r = StepRecord::aggregate(Generation(0), Step(1), 0, Duration::ZERO, &[&a]);
        assert_eq!((r.loss, r.tokens_per_s), (None, None));
    }
}
