//! Bad input through the real binary: each case fails with an error naming the file, line
//! or key (and the allowed values), and leaves no run folder (or an unchanged one) behind.

mod train_common;

use std::path::{Path, PathBuf};

use train_common::*;

struct Case {
    dir: tempfile::TempDir,
    train: PathBuf,
}

impl Case {
    fn new(lines: &[String]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let train = dir.path().join("train.jsonl");
        write_lines(&train, lines);
        Case { dir, train }
    }

    fn config(&self, extra_top: &str, extra_train: &str) -> PathBuf {
        let p = small_config(self.dir.path(), shared_model(), &self.train, extra_train);
        if !extra_top.is_empty() {
            let text = std::fs::read_to_string(&p).unwrap();
            std::fs::write(&p, format!("{extra_top}\n{text}")).unwrap();
        }
        p
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// Trains, expecting failure; asserts nothing was written; returns stderr.
    fn fails(&self, cfg: &Path, extra: &[&str]) -> String {
        let mut args = vec!["train", cfg.to_str().unwrap()];
        args.extend_from_slice(extra);
        let err = assert_fails(&ringtune(&args));
        assert!(!self.run_dir().exists(), "a run folder was created: {err}");
        err
    }
}

#[test]
fn unknown_config_key_names_file_line_key_and_allowed_keys() {
    let c = Case::new(&chat_lines(16, 1));
    let cfg = c.config("", "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("alpha = 8", "alpah = 8")).unwrap();
    let err = c.fails(&cfg, &[]);
    let line = text.lines().position(|l| l == "alpha = 8").unwrap() + 1;
    assert!(
        err.contains(&format!("run.toml:{line}:1: key `lora.alpah`")),
        "{err}"
    );
    assert!(
        err.contains("unknown field `alpah`") && err.contains("`alpha`"),
        "{err}"
    );
}

#[test]
fn bad_enum_value_lists_the_allowed_values() {
    let c = Case::new(&chat_lines(16, 1));
    let cfg = c.config("", "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("\"cosine\"", "\"cosin\"")).unwrap();
    let err = c.fails(&cfg, &[]);
    assert!(
        err.contains("schedule.kind") && err.contains("`constant`, `linear`, `cosine`"),
        "{err}"
    );
}

#[test]
fn line_that_is_not_json_names_file_and_line_and_can_be_skipped() {
    let mut lines = chat_lines(16, 1);
    lines[2] = "{\"messages\": [oops".into();
    let c = Case::new(&lines);
    let cfg = c.config("", "");
    let err = c.fails(&cfg, &[]);
    assert!(
        err.contains(&format!("{}:3: not valid JSON", c.train.display())),
        "{err}"
    );

    // With skip_bad_lines the run goes ahead and reports the skipped line.
    let out = ringtune(&[
        "train",
        cfg.to_str().unwrap(),
        "--set",
        "data.skip_bad_lines=true",
        "--max-steps",
        "1",
    ]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains("1 bad lines skipped"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains(":3:"), "{}", stderr(&out));
}

#[test]
fn line_without_messages_names_file_and_line() {
    let mut lines = chat_lines(16, 1);
    lines[1] = r#"{"conversation": []}"#.into();
    let c = Case::new(&lines);
    let err = c.fails(&c.config("", ""), &[]);
    assert!(
        err.contains(&format!("{}:2: no `messages` field", c.train.display())),
        "{err}"
    );
}

#[test]
fn example_longer_than_max_length() {
    let mut lines = chat_lines(16, 1);
    let long = "word ".repeat(200);
    lines[4] = format!(
        r#"{{"messages":[{{"role":"user","content":"{long}"}},{{"role":"assistant","content":"ok"}}]}}"#
    );
    let c = Case::new(&lines);
    let cfg = c.config("", "");
    let err = c.fails(&cfg, &["--set", "data.overlong=\"error\""]);
    assert!(err.contains(&format!("{}:5:", c.train.display())), "{err}");
    assert!(err.contains("more than max_length 64"), "{err}");
    // Dropping is counted and reported.
    let out = ringtune(&[
        "train",
        cfg.to_str().unwrap(),
        "--set",
        "data.overlong=\"drop\"",
        "--max-steps",
        "1",
    ]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains("1 dropped as longer than max_length"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn empty_dataset() {
    let c = Case::new(&[]);
    std::fs::write(&c.train, "").unwrap();
    let err = c.fails(&c.config("", ""), &[]);
    assert!(
        err.contains(&format!("{}: empty dataset", c.train.display())),
        "{err}"
    );
}

#[test]
fn model_folder_with_a_missing_shard() {
    let c = Case::new(&chat_lines(16, 1));
    // A copy of the model whose weights are split over two shards, the second missing.
    let model = c.dir.path().join("sharded");
    std::fs::create_dir(&model).unwrap();
    for e in std::fs::read_dir(shared_model()).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        if name != "model.safetensors" {
            std::fs::copy(e.path(), model.join(&name)).unwrap();
        }
    }
    std::fs::copy(
        shared_model().join("model.safetensors"),
        model.join("model-00001-of-00002.safetensors"),
    )
    .unwrap();
    let bytes = std::fs::read(shared_model().join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut map = serde_json::Map::new();
    for (i, k) in header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .enumerate()
    {
        let shard = if i % 2 == 0 { 1 } else { 2 };
        map.insert(
            k.clone(),
            format!("model-0000{shard}-of-00002.safetensors").into(),
        );
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        model.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let cfg = c.config("", "");
    let err = c.fails(
        &cfg,
        &[
            "--set",
            &format!(
                "model.path={}",
                serde_json::to_string(model.to_str().unwrap()).unwrap()
            ),
        ],
    );
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn resume_with_a_changed_config_names_the_change_and_touches_nothing() {
    let c = Case::new(&chat_lines(24, 1));
    let cfg = c.config("", "");
    let cfg_s = cfg.to_str().unwrap();
    assert_ok(&ringtune(&["train", cfg_s, "--max-steps", "4"]));
    let run = c.run_dir();
    let before = run_snapshot(&run);

    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("rank = 4", "rank = 8")).unwrap();
    let err = assert_fails(&ringtune(&["train", cfg_s, "--max-steps", "4", "--resume"]));
    assert!(err.contains("config changed"), "{err}");
    assert!(err.contains("lora.rank: 4 → 8"), "{err}");
    assert_eq!(run_snapshot(&run), before);

    // A fresh start into a folder holding a run is refused too.
    let err = assert_fails(&ringtune(&["train", cfg_s, "--max-steps", "4"]));
    assert!(err.contains("--resume"), "{err}");
    assert_eq!(run_snapshot(&run), before);

    // So is one whose checkpoints.jsonl was lost, while its step folders are still there.
    let index = std::fs::read(run.join("checkpoints.jsonl")).unwrap();
    std::fs::remove_file(run.join("checkpoints.jsonl")).unwrap();
    let adapter = std::fs::read(run.join("checkpoints/step-4/adapter/adapter_model.safetensors"));
    let err = assert_fails(&ringtune(&["train", cfg_s, "--max-steps", "4"]));
    assert!(err.contains("--resume"), "{err}");
    let after = std::fs::read(run.join("checkpoints/step-4/adapter/adapter_model.safetensors"));
    assert_eq!(adapter.unwrap(), after.unwrap());
    std::fs::write(run.join("checkpoints.jsonl"), index).unwrap();

    // A folder another run holds (its lock, here this test's) is refused, naming the pid.
    let lock = ringtune_node::RunDir::lock(&run).unwrap();
    let err = assert_fails(&ringtune(&["train", cfg_s, "--max-steps", "4", "--resume"]));
    assert!(
        err.contains(&format!(
            "in use by another ringtune run (pid {})",
            std::process::id()
        )),
        "{err}"
    );
    assert_eq!(run_snapshot(&run), before);
    drop(lock);

    // Other data at the same path (same number of lines) is refused on resume.
    std::fs::write(&cfg, &text).unwrap();
    let data = std::fs::read(&c.train).unwrap();
    write_lines(&c.train, &chat_lines(24, 2));
    let err = assert_fails(&ringtune(&["train", cfg_s, "--max-steps", "4", "--resume"]));
    assert!(err.contains("the training data changed"), "{err}");
    assert_eq!(run_snapshot(&run), before);
    std::fs::write(&c.train, data).unwrap();

    // Cadence and output settings are not part of the hash: resuming with them changed works.
    std::fs::write(&cfg, text.replace("save_every = 4", "save_every = 3")).unwrap();
    assert_ok(&ringtune(&["train", cfg_s, "--max-steps", "4", "--resume"]));
}

#[test]
fn resume_on_a_changed_base_model_is_refused_and_touches_nothing() {
    let c = Case::new(&chat_lines(24, 1));
    // A copy of the shared model that this test may change.
    let model = c.dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for e in std::fs::read_dir(shared_model()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
    }
    let cfg = c.config("", "");
    edit_file(
        &cfg,
        &format!("{:?}", shared_model().display().to_string()),
        &format!("{:?}", model.display().to_string()),
    );
    let cfg_s = cfg.to_str().unwrap();
    assert_ok(&ringtune(&["train", cfg_s, "--max-steps", "4"]));
    let run = c.run_dir();
    let before = run_snapshot(&run);

    // Another model at the same path: one weight byte differs (the file's last, which the
    // fingerprint samples).
    let weights = model.join("model.safetensors");
    let good = std::fs::read(&weights).unwrap();
    let mut bad = good.clone();
    *bad.last_mut().unwrap() ^= 0x40;
    std::fs::write(&weights, &bad).unwrap();
    let err = assert_fails(&ringtune(&["train", cfg_s, "--max-steps", "4", "--resume"]));
    assert!(err.contains("the base model changed"), "{err}");
    assert!(err.contains(&model.display().to_string()), "{err}");
    assert_eq!(run_snapshot(&run), before);

    // The model it was trained on resumes (the fingerprint is stable across runs).
    std::fs::write(&weights, &good).unwrap();
    assert_ok(&ringtune(&["train", cfg_s, "--max-steps", "4", "--resume"]));
}

/// What a refused resume must leave as it was: the run's checkpoint list and metrics.
fn run_snapshot(run: &Path) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(run.join("checkpoints.jsonl")).unwrap(),
        std::fs::read(run.join("metrics.jsonl")).unwrap(),
    )
}

/// Replaces `from` (which must be there) with `to` in the file at `path`.
fn edit_file(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} has no {from:?}", path.display());
    std::fs::write(path, text.replace(from, to)).unwrap();
}

#[test]
fn resume_without_a_checkpoint() {
    let c = Case::new(&chat_lines(16, 1));
    let err = c.fails(&c.config("", ""), &["--resume"]);
    assert!(err.contains("no complete checkpoint"), "{err}");
}

#[test]
fn out_of_range_value_names_the_key() {
    let c = Case::new(&chat_lines(16, 1));
    let err = c.fails(&c.config("nodes = 0", ""), &[]);
    // With the line that sets it (`nodes = 0` is put first in the file).
    assert!(
        err.contains("run.toml:1: nodes: must be at least 1"),
        "{err}"
    );
}
