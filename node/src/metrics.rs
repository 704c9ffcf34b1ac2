//! `metrics.jsonl`: one JSON object per optimiser step, appended and flushed as each step
//! ends, and cut back to a checkpoint's step when a run resumes (so the resumed file reads
//! as if the run had never stopped).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checkpoint::write_file_atomic;
use crate::error::{io_err, Result};

/// One step's numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimiser steps taken, counting this one (1-based).
    pub step: u64,
    /// Epoch the step's batch came from (0-based).
    pub epoch: u64,
    /// Σ −logp·w / Σ w over the global batch.
    pub loss: f64,
    /// Learning rate used for this step.
    pub lr: f64,
    /// Global L2 norm of the normalised gradient, before clipping.
    pub grad_norm: f64,
    /// Tokens (targets) in the batch.
    pub tokens: u64,
    /// Total loss weight Σ w in the batch.
    pub weight: f64,
    /// Examples in the batch.
    pub examples: u64,
    /// Target tokens per second over this step.
    pub tokens_per_s: f64,
    /// Seconds of training so far (summed over resumed segments).
    pub elapsed_s: f64,
    /// Mean NLL per weighted token on the eval data, at the eval cadence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_nll: Option<f64>,
    /// `train.method = "dpo"`: accuracy, rewards, margin (and held-out numbers at the eval
    /// cadence), flattened into the line.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub dpo: Option<crate::dpo::DpoMetrics>,
}

/// The open `metrics.jsonl`.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Starts an empty log (a fresh run).
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(io_err(path))?;
        Ok(Self {
            path: path.to_owned(),
            file,
        })
    }

    /// Opens the log of a resumed run, keeping only lines of steps `<= step` (lines written
    /// after the checkpoint, and a torn last line, are dropped).
    pub fn resume(path: &Path, step: u64) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io_err(path)(e)),
        };
        let mut kept = String::new();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if v.get("step")
                .and_then(|s| s.as_u64())
                .is_some_and(|s| s <= step)
            {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        write_file_atomic(path, kept.as_bytes())?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io_err(path))?;
        Ok(Self {
            path: path.to_owned(),
            file,
        })
    }

    /// Appends one step's line and flushes it to the OS (not fsynced: the log is rebuilt
    /// up to the checkpoint on resume, so a lost tail costs nothing).
    pub fn append(&mut self, m: &StepMetrics) -> Result<()> {
        let mut line = serde_json::to_string(m).expect("metrics serialize");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(io_err(&self.path))
    }

    /// Reads every step line of a metrics file (for tests and tools).
    pub fn read(path: &Path) -> Result<Vec<StepMetrics>> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        text.lines()
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| crate::Error::Corrupt {
                    path: path.to_owned(),
                    line: i + 1,
                    message: e.to_string(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(step: u64) -> StepMetrics {
        StepMetrics {
            step,
            epoch: 0,
            loss: step as f64,
            lr: 1e-4,
            grad_norm: 1.0,
            tokens: 10,
            weight: 5.0,
            examples: 2,
            tokens_per_s: 1.0,
            elapsed_s: 0.5,
            eval_nll: (step == 2).then_some(3.0),
            dpo: None,
        }
    }

    #[test]
    fn resume_cuts_back_to_the_checkpoint_step() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("metrics.jsonl");
        let mut log = MetricsLog::create(&p).unwrap();
        for s in 1..=5 {
            log.append(&m(s)).unwrap();
        }
        drop(log);
        // A torn tail from a kill.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"step\":6,\"lo").unwrap();
        drop(f);
        let mut log = MetricsLog::resume(&p, 3).unwrap();
        log.append(&m(4)).unwrap();
        drop(log);
        let got = MetricsLog::read(&p).unwrap();
        assert_eq!(
            got.iter().map(|m| m.step).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(got[1].eval_nll, Some(3.0));
        assert_eq!(got[0].eval_nll, None);
    }
}
