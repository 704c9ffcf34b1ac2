//! The trainer's step semantics: the loss and update do not depend on how a global batch
//! is split into micro-batches, and the gradient sync hook sees one buffer per step whose
//! global Σw normalises the gradients.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

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

fn config(dir: &Path, micro_batch_tokens: usize) -> RunConfig {
    let train = dir.join("train.jsonl");
    let lines: Vec<String> = (0..24)
        .map(|i| {
            // Lengths vary so micro-batching has something to pack.
            let q = "x".repeat(1 + (i * 7) % 23);
            format!(r#"{{"messages":[{{"role":"user","content":"Echo {q}"}},{{"role":"assistant","content":"{q} {i}"}}]}}"#)
        })
        .collect();
    std::fs::write(&train, lines.join("\n")).unwrap();
    let text = format!(
        "output_dir = {:?}\n[model]\npath = {:?}\n[data]\ntrain = {:?}\n[lora]\nrank = 4\n\
         [optimizer]\nlr = 1e-3\n[train]\nbatch_size = 8\nmicro_batch_tokens = {micro_batch_tokens}\nmax_steps = 2\n",
        dir.join("run").display().to_string(),
        model().display().to_string(),
        train.display().to_string(),
    );
    let p = dir.join("run.toml");
    std::fs::write(&p, text).unwrap();
    RunConfig::load(&p).unwrap()
}

#[test]
fn micro_batching_does_not_change_the_step() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut one = Trainer::new(config(a.path(), 100_000), false, Box::new(LocalSync)).unwrap();
    let mut many = Trainer::new(config(b.path(), 16), false, Box::new(LocalSync)).unwrap();
    for _ in 0..2 {
        let (x, y) = (one.train_step().unwrap(), many.train_step().unwrap());
        assert_eq!((x.tokens, x.weight), (y.tokens, y.weight));
        assert!(
            (x.loss - y.loss).abs() < 1e-5 * x.loss,
            "{} vs {}",
            x.loss,
            y.loss
        );
        assert!((x.grad_norm - y.grad_norm).abs() < 1e-4 * x.grad_norm);
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

/// Pretends to be two ranks holding identical data: the all-reduce doubles the buffer.
struct TwinSync(Arc<Mutex<Vec<(u64, usize)>>>);

impl StepSync for TwinSync {
    fn all_reduce_sum(&mut self, step: u64, buf: &mut [f32]) -> Result<(), String> {
        self.0.lock().unwrap().push((step, buf.len()));
        buf.iter_mut().for_each(|x| *x *= 2.0);
        Ok(())
    }
}

#[test]
fn gradients_are_normalised_by_the_global_weight() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let calls = Arc::new(Mutex::new(Vec::new()));
    let mut single = Trainer::new(config(a.path(), 64), false, Box::new(LocalSync)).unwrap();
    let mut twins = Trainer::new(
        config(b.path(), 64),
        false,
        Box::new(TwinSync(calls.clone())),
    )
    .unwrap();
    for _ in 0..2 {
        let (x, y) = (single.train_step().unwrap(), twins.train_step().unwrap());
        assert_eq!(y.weight, 2.0 * x.weight);
        assert_eq!(x.loss, y.loss);
    }
    // Doubling and halving are exact in binary floating point: the same bits.
    assert_eq!(
        single.model().params_flat().unwrap(),
        twins.model().params_flat().unwrap()
    );
    // One call per step, with the gradients plus Σw and the loss sum.
    let n = single.model().param_layout().numel();
    assert_eq!(*calls.lock().unwrap(), vec![(1, n + 2), (2, n + 2)]);
}

#[test]
fn a_failing_sync_names_the_step() {
    struct Broken;
    impl StepSync for Broken {
        fn all_reduce_sum(&mut self, _: u64, _: &mut [f32]) -> Result<(), String> {
            Err("peer 1 closed the connection".into())
        }
    }
    let d = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(config(d.path(), 64), false, Box::new(Broken)).unwrap();
    let e = t.train_step().unwrap_err().to_string();
    assert_eq!(e, "gradient sync at step 1: peer 1 closed the connection");
}
