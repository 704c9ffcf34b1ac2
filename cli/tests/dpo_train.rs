//! `ringtune train` with `train.method = "dpo"` through the real binary: a short run of
//! configs/dpo.toml raises the training margin and the held-out preference accuracy above
//! chance (a fresh adapter is the reference itself, so every margin starts at 0 and the
//! accuracy at ½), writes the DPO fields to metrics.jsonl and a checkpoint; `kill -9` and
//! `--resume` end bit-identical to an uninterrupted run; two nodes match one process.

mod train_common;

use std::path::Path;
use std::process::Output;

use train_common::*;

fn train_dpo(dir: &Path, extra: &[&str]) -> Output {
    train_shipped("configs/dpo.toml", dir, extra)
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

/// Two node processes (the coordinator deals each step's pairs out by token count, the
/// pair losses, counts and DPO sums ride in the gradient all-reduce) end where one process
/// does: every step's loss, accuracy and margin, the held-out numbers at the end and the
/// adapter agree within 1e-5.
#[test]
fn dpo_on_two_nodes_matches_one_process() {
    let args = |nodes: &'static str| {
        [
            "--max-steps",
            "4",
            "--set",
            "schedule.warmup_steps=0",
            "--set",
            "train.eval_every=0",
            "--set",
            "lora.dropout=0.0",
            "--set",
            nodes,
            "--plain",
        ]
    };
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    assert_ok(&train_dpo(one.path(), &args("nodes=1")));
    let out = train_dpo(two.path(), &args("nodes=2"));
    assert_ok(&out);
    let read = |d: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(d.join("run/metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (a, b) = (read(one.path()), read(two.path()));
    assert_eq!(b.len(), 4, "{}", stderr(&out));
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(y["world_size"], 2);
        for key in ["loss", "dpo_accuracy", "dpo_margin", "dpo_chosen_reward"] {
            let (p, q) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!(
                (p - q).abs() <= 1e-5 * p.abs().max(1.0),
                "step {}: {key} {p} vs {q}",
                x["step"]
            );
        }
    }
    for key in ["eval_dpo_loss", "eval_dpo_accuracy"] {
        let (p, q) = (a[3][key].as_f64().unwrap(), b[3][key].as_f64().unwrap());
        assert!((p - q).abs() <= 1e-5, "{key} {p} vs {q}");
    }
    let last = "run/checkpoints/step-4/adapter";
    let d = rel_diff(
        &adapter_values(&one.path().join(last)),
        &adapter_values(&two.path().join(last)),
    );
    assert!(d < 1e-5, "adapters differ by {d}");
}

#[test]
fn sft_data_given_as_pairs_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    // A preference file given as SFT data (or the other way round) names file and line.
    let err = assert_fails(&train_dpo(
        tmp.path(),
        &["--set", "data.train=\"datasets/quickstart_chat.jsonl\""],
    ));
    assert!(err.contains("quickstart_chat.jsonl:1"), "{err}");
}

/// Arguments of a 6-step DPO run into `run` that needs no working folder.
fn resume_args(run: &Path) -> Vec<String> {
    let root = repo_root();
    let q = |p: &Path| serde_json::to_string(p.to_str().unwrap()).unwrap();
    let mut a: Vec<String> = vec![
        "train".into(),
        root.join("configs/dpo.toml").to_str().unwrap().into(),
        "--plain".into(),
        "--max-steps".into(),
        "6".into(),
        "--output-dir".into(),
        run.to_str().unwrap().into(),
    ];
    for s in [
        format!("model.path={}", q(shared_model())),
        format!(
            "data.train={}",
            q(&root.join("datasets/quickstart_pref.jsonl"))
        ),
        format!(
            "data.eval={}",
            q(&root.join("datasets/quickstart_pref_eval.jsonl"))
        ),
        "train.batch_size=8".into(),
        "train.save_every=3".into(),
        "train.eval_every=0".into(),
        "lora.dropout=0.1".into(),
    ] {
        a.push("--set".into());
        a.push(s);
    }
    a
}

#[test]
fn kill_9_then_resume_is_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let (straight, cut) = (tmp.path().join("straight"), tmp.path().join("cut"));
    let args = resume_args(&straight);
    assert_ok(&ringtune(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    let args = resume_args(&cut);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut p = spawn(&argv, &[]);
    p.wait_for("checkpoint: step 3");
    p.kill_9();
    let mut again = argv.clone();
    again.push("--resume");
    assert_ok(&ringtune(&again));
    assert_same_checkpoint(
        &straight.join("checkpoints/step-6"),
        &cut.join("checkpoints/step-6"),
    );
    let lines = |r: &Path| std::fs::read_to_string(r.join("metrics.jsonl")).unwrap();
    let strip = |t: String| -> Vec<serde_json::Value> {
        t.lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                for k in ["elapsed_s", "tokens_per_s"] {
                    v.as_object_mut().unwrap().remove(k);
                }
                v
            })
            .collect()
    };
    assert_eq!(strip(lines(&straight)), strip(lines(&cut)));
}
