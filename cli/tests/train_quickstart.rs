//! The quickstart, shortened: `ringtune train configs/quickstart.toml` from the repository
//! root creates its model on first use and trains on the bundled data; then the adapter is
//! merged and evaluated.

mod train_common;

use std::process::Command;

use train_common::*;

#[test]
fn quickstart_trains_merges_and_evaluates() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("models/quickstart");
    let run = tmp.path().join("run");
    let q = |p: &std::path::Path| serde_json::to_string(p.to_str().unwrap()).unwrap();
    let out = Command::new(BIN)
        .current_dir(repo_root())
        .args([
            "train",
            "configs/quickstart.toml",
            "--max-steps",
            "4",
            "--output-dir",
            run.to_str().unwrap(),
            "--set",
            &format!("model.path={}", q(&model)),
            "--set",
            "schedule.warmup_steps=0",
        ])
        .output()
        .unwrap();
    assert_ok(&out);

    // The model was made on first use, with the tokenizer's vocabulary.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    let tok = ringtune_data::Tokenizer::from_dir(&model).unwrap();
    assert_eq!(
        cfg["vocab_size"].as_u64().unwrap() as usize,
        tok.vocab_size()
    );

    let l = losses(&run);
    assert_eq!(l.len(), 4);
    let (first, last) = (f64::from_bits(l[0].1), f64::from_bits(l[3].1));
    assert!(last < first, "loss did not fall: {first} → {last}");
    assert_eq!(eval_nlls(&run).len(), 1, "eval at the last step");
    assert_eq!(listed_steps(&run), vec![4]);

    // Merge the adapter and check the merged model scores like base + adapter.
    let adapter = run.join("checkpoints/step-4/adapter");
    let merged = tmp.path().join("merged");
    assert_ok(&ringtune(&[
        "merge",
        adapter.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]));
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(merged.join(f).is_file(), "merged folder lacks {f}");
    }
    let err = assert_fails(&ringtune(&[
        "merge",
        adapter.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]));
    assert!(err.contains("already exists"), "{err}");

    let eval_file = tmp.path().join("eval.jsonl");
    let lines: Vec<String> =
        std::fs::read_to_string(repo_root().join("datasets/quickstart_chat_eval.jsonl"))
            .unwrap()
            .lines()
            .take(40)
            .map(str::to_owned)
            .collect();
    write_lines(&eval_file, &lines);
    let nll = |args: &[&str]| -> f64 {
        let mut all = vec!["eval", "--data", eval_file.to_str().unwrap(), "--json"];
        all.extend_from_slice(args);
        let out = ringtune(&all);
        assert_ok(&out);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["nll"].as_f64().unwrap()
    };
    let base = nll(&["--model", model.to_str().unwrap()]);
    let adapted = nll(&[
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
    ]);
    let merged_nll = nll(&["--model", merged.to_str().unwrap()]);
    assert!(
        adapted < base,
        "training did not help: base {base}, adapted {adapted}"
    );
    assert!(
        (merged_nll - adapted).abs() < 1e-3 * adapted.abs().max(1.0),
        "merged {merged_nll} vs base+adapter {adapted}"
    );
}

#[test]
fn init_model_refuses_existing_folders_and_unknown_presets() {
    let tmp = tempfile::tempdir().unwrap();
    let err = assert_fails(&ringtune(&[
        "init-model",
        "--out",
        tmp.path().to_str().unwrap(),
    ]));
    assert!(err.contains("already exists"), "{err}");
    let out = tmp.path().join("m");
    let err = assert_fails(&ringtune(&[
        "init-model",
        "--preset",
        "huge",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(err.contains("`quickstart`, `tiny`, `smol`"), "{err}");
    assert!(!out.exists());
}

/// `bench train --profile` prints the stream profile of one more step (to stderr, so the
/// `--json` line stays one object): every layer's ops, once per call, in the step's phases.
#[test]
fn bench_train_profile_shows_every_op_of_a_step() {
    let o = ringtune(&[
        "bench",
        "train",
        "--preset",
        "tiny",
        "--batch",
        "1",
        "--seq",
        "16",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--json",
        "--profile",
    ]);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    assert_eq!(v["steps"], 1);
    let err = stderr(&o);
    let calls = |op: &str| -> usize {
        let line = err
            .lines()
            .find(|l| l.starts_with(&format!("| {op} |")))
            .unwrap_or_else(|| panic!("no row {op:?} in:\n{err}"));
        line.split('|').nth(2).unwrap().trim().parse().unwrap()
    };
    // The tiny preset: 4 layers, seven adapted projections each.
    assert_eq!(calls("lora-linear"), 28, "{err}");
    assert_eq!(calls("lora-linear (bwd)"), 28, "{err}");
    assert_eq!(calls("attention"), 4, "{err}");
    for phase in ["trunk forward", "head", "trunk backward", "optimizer"] {
        assert_eq!(calls(phase), 1, "{phase}: {err}");
    }
    assert!(err.contains("| outside these ops"), "{err}");
}
