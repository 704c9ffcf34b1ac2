//! `ringtune train` with `train.method = "dpo"` through the real binary: a short run of
//! configs/dpo.toml raises the training margin and the held-out preference accuracy above
//! chance (a fresh adapter is the reference itself, so every margin starts at 0 and the
//! accuracy at ½), writes the DPO fields to metrics.jsonl and a checkpoint; nodes > 1 is
//! refused naming the reason.

mod train_common;

use std::path::Path;
use std::process::{Command, Output};

use train_common::*;

fn train_dpo(dir: &Path, extra: &[&str]) -> Output {
    let q = |p: &Path| serde_json::to_string(p.to_str().unwrap()).unwrap();
    let mut args = vec![
        "train".to_owned(),
        "configs/dpo.toml".to_owned(),
        "--output-dir".to_owned(),
        dir.join("run").to_str().unwrap().to_owned(),
        "--set".to_owned(),
        format!("model.path={}", q(shared_model())),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Command::new(BIN)
        .current_dir(repo_root())
        .args(&args)
        .output()
        .unwrap()
}

#[test]
fn a_short_dpo_run_raises_margin_and_held_out_accuracy() {
    let tmp = tempfile::tempdir().unwrap();
    let out = train_dpo(
        tmp.path(),
        &[
            "--max-steps",
            "10",
            "--set",
            "schedule.warmup_steps=0",
            "--set",
            "train.eval_every=0",
        ],
    );
    assert_ok(&out);
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(tmp.path().join("run/metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(lines.len(), 10);
    let f = |m: &serde_json::Value, k: &str| m[k].as_f64().unwrap_or_else(|| panic!("{k} in {m}"));
    // Step 1 runs at the reference: loss log 2, margin 0, every pair a tie.
    assert!(
        (f(&lines[0], "loss") - 2f64.ln()).abs() < 1e-4,
        "{}",
        lines[0]
    );
    assert_eq!(f(&lines[0], "dpo_margin"), 0.0);
    assert_eq!(f(&lines[0], "dpo_accuracy"), 0.5);
    assert_eq!(f(&lines[0], "examples"), 32.0);
    let last = &lines[9];
    let late_margin: f64 = lines[7..].iter().map(|m| f(m, "dpo_margin")).sum::<f64>() / 3.0;
    assert!(
        late_margin > 0.1,
        "training margin did not rise: {late_margin}"
    );
    let acc = f(last, "eval_dpo_accuracy");
    assert!(
        acc > 0.6,
        "held-out preference accuracy {acc} (chance: 0.5)"
    );
    assert!(f(last, "eval_dpo_loss") < 2f64.ln());
    assert!(lines[..9]
        .iter()
        .all(|m| m.get("eval_dpo_accuracy").is_none()));
    assert_eq!(listed_steps(&tmp.path().join("run")), vec![10]);
    eprintln!("held-out accuracy after 10 steps: {acc}, late margin {late_margin}");
}

#[test]
fn dpo_refuses_several_nodes_naming_why() {
    let tmp = tempfile::tempdir().unwrap();
    let err = assert_fails(&train_dpo(tmp.path(), &["--set", "nodes=2"]));
    assert!(err.contains("nodes") && err.contains("dpo"), "{err}");
    // A preference file given as SFT data (or the other way round) names file and line.
    let err = assert_fails(&train_dpo(
        tmp.path(),
        &["--set", "data.train=\"datasets/quickstart_chat.jsonl\""],
    ));
    assert!(err.contains("quickstart_chat.jsonl:1"), "{err}");
}
