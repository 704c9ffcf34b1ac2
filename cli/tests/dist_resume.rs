//! `--resume` of a distributed run, with real processes: the coordinator continues from
//! the newest checkpoint, the nodes load it, and the run ends where an uninterrupted one
//! does — also when it is resumed with another world size.

mod dist_common;

use dist_common::*;
use std::path::Path;

const STEPS: u64 = 16;

fn config_saving_every_4(dir: &Path) -> std::path::PathBuf {
    let cfg = config(dir, 2, STEPS, "");
    edit_config(&cfg, "save_every = 0", "save_every = 4");
    cfg
}

fn metrics_steps(run: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            // The one-process trainer's fields, so one reader handles both kinds of run.
            for key in [
                "epoch",
                "loss",
                "lr",
                "grad_norm",
                "tokens",
                "weight",
                "elapsed_s",
            ] {
                assert!(v.get(key).is_some(), "no {key:?} in {l}");
            }
            v["step"].as_u64().unwrap()
        })
        .collect()
}

fn rel_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for ((na, va), (nb, vb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            num += (*x as f64 - *y as f64).powi(2);
            den += (*y as f64).powi(2);
        }
    }
    (num / den).sqrt()
}

#[test]
fn an_interrupted_distributed_run_resumes_to_the_uninterrupted_adapter() {
    let reference = tempfile::tempdir().unwrap();
    let cfg = config_saving_every_4(reference.path());
    let (st, err) = spawn(&["train", cfg.to_str().unwrap(), "--plain"], &[]).wait_exit(300);
    assert!(st.success(), "reference run failed:\n{err}");
    let last = format!("checkpoints/step-{STEPS}/adapter");
    let want = adapter(&reference.path().join("run").join(&last));

    let dir = tempfile::tempdir().unwrap();
    let cfg = config_saving_every_4(dir.path());
    let cfg_s = cfg.to_str().unwrap();
    let mut train = spawn(&["train", cfg_s, "--plain"], &[]);
    train.wait_for("checkpoint: step 4", 120);
    signal("INT", &[train.child.id()]);
    let (st, err) = train.wait_exit(60);
    assert!(st.success(), "{err}");
    assert!(err.contains("interrupted after step"), "{err}");
    let run = dir.path().join("run");
    let stopped_at = *metrics_steps(&run).last().unwrap();
    assert!(stopped_at < STEPS, "the run finished before the interrupt");
    // The interrupt lets the step in flight finish and rank 0 save after it: no
    // completed step is lost.
    assert!(
        err.contains(&format!(
            "interrupted after step {stopped_at}; last checkpoint: step {stopped_at}"
        )),
        "{err}"
    );
    assert!(run
        .join(format!("checkpoints/step-{stopped_at}/adapter"))
        .is_dir());

    // A fresh start into the folder is refused and changes nothing.
    let (st, err) = spawn(&["train", cfg_s, "--plain"], &[]).wait_exit(60);
    assert!(!st.success());
    assert!(err.contains("pass --resume"), "{err}");
    // So is a resume with a changed setting, naming it.
    let (st, err) = spawn(
        &[
            "train",
            cfg_s,
            "--plain",
            "--resume",
            "--set",
            "optimizer.lr=0.01",
        ],
        &[],
    )
    .wait_exit(60);
    assert!(!st.success());
    assert!(err.contains("optimizer.lr"), "{err}");

    // A copy of the interrupted folder, resumed later with one node instead of two.
    let single = dir.path().join("single");
    let st = std::process::Command::new("cp")
        .args(["-r", run.to_str().unwrap(), single.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());

    let (st, err) = spawn(&["train", cfg_s, "--plain", "--resume"], &[]).wait_exit(300);
    assert!(st.success(), "resume failed:\n{err}");
    assert!(err.contains(&format!("done: {STEPS} steps")), "{err}");
    assert_eq!(
        metrics_steps(&run),
        (1..=STEPS).collect::<Vec<_>>(),
        "metrics.jsonl should read as one uninterrupted run"
    );
    assert!(
        adapter(&run.join(&last)) == want,
        "the resumed run's final adapter differs from the uninterrupted run's"
    );

    // With W=1 the sums are ordered differently, so equal within f32 reordering — which
    // also needs the node-written checkpoint's data cursor to be right.
    let (st, err) = spawn(
        &[
            "train",
            cfg_s,
            "--plain",
            "--resume",
            "--set",
            "nodes=1",
            "--output-dir",
            single.to_str().unwrap(),
        ],
        &[],
    )
    .wait_exit(300);
    assert!(st.success(), "resume with one node failed:\n{err}");
    let d = rel_diff(&adapter(&single.join(&last)), &want);
    assert!(d < 1e-5, "W=1 resume of a W=2 run: relative difference {d}");
}
