//! DPO in the trainer: the step does not depend on how its pairs are split into
//! micro-batches, the all-reduced pair count is the normaliser (two identical ranks give
//! the one-rank loss and metrics), and held-out evaluation starts at chance.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ringtune_config::RunConfig;
use ringtune_node::{LocalSync, StepSync, Trainer};

fn model() -> &'static Path {
    static M: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, p) = M.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m");
        ringtune_node::init_model("quickstart", &p, 0, 2048).unwrap();
        (d, p)
    });
    p
}

fn pairs(n: usize, offset: usize) -> String {
    (offset..offset + n)
        .map(|i| {
            // Lengths vary so micro-batching has something to pack.
            let q = "x".repeat(1 + (i * 7) % 23);
            format!(
                "{{\"prompt\": \"Echo {q}\", \"chosen\": \"{q} {i}\", \"rejected\": \"I don't know{}\"}}\n",
                "!".repeat(i % 5)
            )
        })
        .collect()
}

fn config(dir: &Path, micro_batch_tokens: usize) -> RunConfig {
    let (train, eval) = (dir.join("train.jsonl"), dir.join("eval.jsonl"));
    std::fs::write(&train, pairs(24, 0)).unwrap();
    std::fs::write(&eval, pairs(6, 100)).unwrap();
    let text = format!(
        "output_dir = {:?}\n[model]\npath = {:?}\n[data]\ntrain = {:?}\neval = {:?}\n\
         [lora]\nrank = 4\n[optimizer]\nlr = 1e-2\n[train]\nmethod = \"dpo\"\nbatch_size = 8\n\
         micro_batch_tokens = {micro_batch_tokens}\nmax_steps = 3\n[dpo]\nbeta = 0.5\n",
        dir.join("run").display().to_string(),
        model().display().to_string(),
        train.display().to_string(),
        eval.display().to_string(),
    );
    let p = dir.join("run.toml");
    std::fs::write(&p, text).unwrap();
    RunConfig::load(&p).unwrap()
}

/// Pretends to be two ranks holding identical data: the all-reduce doubles the buffer.
struct TwinSync;

impl StepSync for TwinSync {
    fn all_reduce_sum(&mut self, _step: u64, buf: &mut [f32]) -> Result<(), String> {
        buf.iter_mut().for_each(|x| *x *= 2.0);
        Ok(())
    }
}

#[test]
fn micro_batching_does_not_change_a_dpo_step() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut one = Trainer::new(config(a.path(), 100_000), false, Box::new(LocalSync)).unwrap();
    let mut many = Trainer::new(config(b.path(), 24), false, Box::new(LocalSync)).unwrap();
    assert_eq!(one.example_counts(), (24, 6));
    for step in 0..3 {
        let (x, y) = (one.train_step().unwrap(), many.train_step().unwrap());
        assert_eq!(
            (x.tokens, x.weight, x.examples),
            (y.tokens, y.weight, y.examples)
        );
        assert_eq!(x.weight, 8.0, "the normaliser is the pair count");
        assert!((x.loss - y.loss).abs() < 1e-5, "{} vs {}", x.loss, y.loss);
        let (dx, dy) = (x.dpo.unwrap(), y.dpo.unwrap());
        assert!((dx.dpo_margin - dy.dpo_margin).abs() < 1e-4);
        assert_eq!(dx.dpo_accuracy, dy.dpo_accuracy);
        if step == 0 {
            assert!((x.loss - 2f64.ln()).abs() < 1e-6 && dx.dpo_margin == 0.0);
        } else {
            assert!(dx.dpo_margin != 0.0 && x.loss < 2f64.ln() + 0.05);
        }
    }
    let (p, q) = (
        one.model().params_flat().unwrap(),
        many.model().params_flat().unwrap(),
    );
    let max = p
        .iter()
        .zip(&q)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-5, "params differ by {max}");
}

#[test]
fn the_all_reduced_pair_count_normalises() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut solo = Trainer::new(config(a.path(), 4096), false, Box::new(LocalSync)).unwrap();
    let mut twin = Trainer::new(config(b.path(), 4096), false, Box::new(TwinSync)).unwrap();
    for _ in 0..2 {
        let (x, y) = (solo.train_step().unwrap(), twin.train_step().unwrap());
        assert_eq!(y.weight, 2.0 * x.weight);
        assert!((x.loss - y.loss).abs() < 1e-6, "{} vs {}", x.loss, y.loss);
        let (dx, dy) = (x.dpo.unwrap(), y.dpo.unwrap());
        assert!((dx.dpo_chosen_reward - dy.dpo_chosen_reward).abs() < 1e-6);
        assert_eq!(dx.dpo_accuracy, dy.dpo_accuracy);
        assert_eq!(twin.last_local_sums().1, 8.0);
    }
}

#[test]
fn held_out_pairs_start_at_chance_and_sft_eval_is_refused() {
    let a = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(config(a.path(), 4096), false, Box::new(LocalSync)).unwrap();
    let e = t.dpo_eval().unwrap().unwrap();
    assert_eq!((e.pairs, e.accuracy, e.margin), (6, 0.5, 0.0));
    assert!((e.loss - 2f64.ln()).abs() < 1e-12);
    assert!(t.eval().is_err());
    t.train_step().unwrap();
    t.train_step().unwrap();
    let e = t.dpo_eval().unwrap().unwrap();
    assert!(e.margin != 0.0);
}
