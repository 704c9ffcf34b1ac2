//! Exact resume through the real binary: a run killed with SIGKILL (mid-run, or in the
//! middle of writing a checkpoint) or stopped with SIGTERM, then resumed, ends with the same
//! adapter bits, optimizer state and losses as a run that was never interrupted.

mod train_common;

use std::path::Path;
use std::sync::OnceLock;

use train_common::*;

/// The uninterrupted reference run (8 steps, checkpoints at 4 and 8), shared by the tests.
fn reference() -> &'static Path {
    static REF: OnceLock<(tempfile::TempDir, std::path::PathBuf)> = OnceLock::new();
    let (_, run) = REF.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let cfg = setup(dir.path());
        assert_ok(&ringtune(&["train", cfg.to_str().unwrap()]));
        let run = dir.path().join("run");
        (dir, run)
    });
    run
}

/// One training file for every run, so the configs (and their hashes) are identical.
fn train_file() -> &'static Path {
    static TRAIN: OnceLock<(tempfile::TempDir, std::path::PathBuf)> = OnceLock::new();
    let (_, p) = TRAIN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("train.jsonl");
        write_lines(&p, &chat_lines(48, 1));
        (dir, p)
    });
    p
}

fn setup(dir: &Path) -> std::path::PathBuf {
    small_config(dir, shared_model(), train_file(), "")
}

fn assert_matches_reference(run: &Path) {
    let reference = reference();
    assert_eq!(listed_steps(run), vec![4, 8]);
    assert_eq!(losses(run), losses(reference), "per-step losses differ");
    assert_eq!(losses(run).len(), 8);
    assert_eq!(eval_nlls(run), eval_nlls(reference));
    for step in ["step-4", "step-8"] {
        assert_same_checkpoint(
            &run.join("checkpoints").join(step),
            &reference.join("checkpoints").join(step),
        );
    }
}

#[test]
fn reference_run_learns_and_writes_the_run_folder() {
    let run = reference();
    let l = losses(run);
    assert_eq!(
        l.iter().map(|x| x.0).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    let first = f64::from_bits(l[0].1);
    let last = f64::from_bits(l[7].1);
    assert!(last < first, "loss did not fall: {first} → {last}");
    let adapter = run.join("checkpoints/step-8/adapter");
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_dropout"], 0.1);
    // Nothing temporary is left behind.
    for e in std::fs::read_dir(run.join("checkpoints")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(name.starts_with("step-"), "leftover {name}");
    }
}

#[test]
fn kill_9_mid_run_then_resume_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path());
    let cfg = cfg.to_str().unwrap();
    let mut p = spawn(&["train", cfg], &[]);
    p.wait_for("checkpoint: step 4");
    p.kill_9();
    let run = dir.path().join("run");
    assert!(listed_steps(&run).contains(&4));
    let out = ringtune(&["train", cfg, "--resume"]);
    assert_ok(&out);
    assert_matches_reference(&run);
}

#[test]
fn kill_9_inside_a_checkpoint_write_keeps_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path());
    let cfg = cfg.to_str().unwrap();
    let run = dir.path().join("run");
    // The writer stops after filling and syncing step 8's temp folder, before the rename.
    let mut p = spawn(
        &["train", cfg],
        &[("RINGTUNE_TEST_PAUSE_IN_CHECKPOINT", "8")],
    );
    p.wait_for("paused inside checkpoint write of step 8");
    p.kill_9();

    assert_eq!(listed_steps(&run), vec![4]);
    assert!(!run.join("checkpoints/step-8").exists());
    let leftovers: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert_eq!(leftovers.len(), 1, "the interrupted write's temp folder");

    // The previous checkpoint's adapter loads and evaluates.
    let data = train_file();
    let out = ringtune(&[
        "eval",
        "--model",
        shared_model().to_str().unwrap(),
        "--adapter",
        run.join("checkpoints/step-4/adapter").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]);
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["nll"].as_f64().unwrap().is_finite());

    // Resume continues from step 4, cleans the temp folder and matches the reference.
    let out = ringtune(&["train", cfg, "--resume"]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains("resuming at step 4"),
        "{}",
        stderr(&out)
    );
    assert_matches_reference(&run);
    for e in std::fs::read_dir(run.join("checkpoints")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(name.starts_with("step-"), "leftover {name}");
    }
}

#[test]
fn sigterm_saves_a_checkpoint_and_resume_finishes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path());
    let cfg = cfg.to_str().unwrap();
    let run = dir.path().join("run");
    let mut p = spawn(&["train", cfg, "--plain"], &[]);
    p.wait_for("step 1/8");
    // Twice, 20 ms apart, as `srun` forwards Slurm's: one stop request.
    p.signal("TERM");
    std::thread::sleep(std::time::Duration::from_millis(20));
    p.signal("TERM");
    let (status, err) = p.wait();
    assert!(status.success(), "exit {status:?}: {err}");
    // Stopped between steps, with a checkpoint of the step it stopped at (off the cadence).
    let line = err
        .lines()
        .find(|l| l.starts_with("interrupted at step "))
        .unwrap_or_else(|| panic!("not interrupted: {err}"));
    let step: u64 = line["interrupted at step ".len()..]
        .split(';')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..8).contains(&step), "{line}");
    // The command it suggests is this one (overrides and all) with --resume.
    assert!(
        line.ends_with(&format!(
            "continue with: ringtune train {cfg} --plain --resume"
        )),
        "{line}"
    );
    assert_eq!(*listed_steps(&run).last().unwrap(), step);
    let out = ringtune(&["train", cfg, "--resume"]);
    assert_ok(&out);
    assert_eq!(*listed_steps(&run).last().unwrap(), 8);
    assert_eq!(losses(&run), losses(reference()));
    assert_eq!(eval_nlls(&run), eval_nlls(reference()));
    assert_same_checkpoint(
        &run.join("checkpoints/step-8"),
        &reference().join("checkpoints/step-8"),
    );
}

/// `lora.target_modules`, as PEFT users write it: only those layers get adapters, the
/// adapter says so, and the base model's path in it is absolute.
#[test]
fn target_modules_choose_the_adapted_layers() {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.jsonl");
    write_lines(&train, &chat_lines(24, 9));
    let cfg = small_config(dir.path(), shared_model(), &train, "");
    assert_ok(&ringtune(&[
        "train",
        cfg.to_str().unwrap(),
        "--max-steps",
        "2",
        "--set",
        r#"lora.target_modules=["v_proj", "q_proj"]"#,
    ]));
    let adapter = dir.path().join("run/checkpoints/step-2/adapter");
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    let base = cfg["base_model_name_or_path"].as_str().unwrap();
    assert!(std::path::Path::new(base).is_absolute(), "{base}");
    let bytes = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names = st.names();
    assert!(!names.is_empty());
    for n in &names {
        assert!(n.contains(".q_proj.") || n.contains(".v_proj."), "{n}");
    }
    assert!(names.iter().any(|n| n.contains(".v_proj.")));
}

/// `model.adapter`: a fresh run starts from an adapter (here another run's), not from fresh
/// adapters; one that does not fit `[lora]` is refused naming the keys, before the run
/// folder exists; DPO refuses it (its reference would be the base, not the adapter).
#[test]
fn a_run_can_start_from_an_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.jsonl");
    write_lines(&train, &chat_lines(24, 4));
    let first = small_config(dir.path(), shared_model(), &train, "");
    assert_ok(&ringtune(&[
        "train",
        first.to_str().unwrap(),
        "--max-steps",
        "2",
    ]));
    let start = dir.path().join("run/checkpoints/step-2/adapter");
    let before = adapter_values(&start);
    let go = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            first.to_str().unwrap(),
            "--max-steps",
            "1",
            "--output-dir",
            out,
            "--set",
        ];
        let spec = format!("model.adapter={:?}", start.to_str().unwrap());
        args.push(&spec);
        args.extend_from_slice(extra);
        ringtune(&args)
    };
    // A learning rate too small to move an f32: the step-1 adapter is the one it started
    // from (fresh adapters would have B = 0).
    let warm = dir.path().join("warm");
    assert_ok(&go(
        warm.to_str().unwrap(),
        &["--set", "optimizer.lr=1e-30"],
    ));
    let after = adapter_values(&warm.join("checkpoints/step-1/adapter"));
    let d = rel_diff(&before, &after);
    assert!(d <= 1e-6, "moved by {d} from the adapter it started from");
    // Another rank: named, with the keys to set; nothing written.
    let other = dir.path().join("other");
    let err = assert_fails(&go(other.to_str().unwrap(), &["--set", "lora.rank=8"]));
    assert!(
        err.contains("model.adapter = ")
            && err.contains("field `r`: adapter has 4")
            && err.contains("lora.rank"),
        "{err}"
    );
    assert!(!other.exists());
    // DPO: refused at the config, pointing at merge.
    let err = assert_fails(&go(
        dir.path().join("dpo").to_str().unwrap(),
        &["--set", "train.method=dpo"],
    ));
    assert!(
        err.contains("model.adapter") && err.contains("ringtune merge"),
        "{err}"
    );
}

/// `--auto-resume`, what a requeued job runs: the same command starts fresh into an empty
/// folder and continues from the checkpoint once there is one (a plain second start is
/// refused, and a plain `--resume` on an empty folder too).
#[test]
fn auto_resume_starts_fresh_then_continues() {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.jsonl");
    write_lines(&train, &chat_lines(24, 6));
    let cfg = small_config(dir.path(), shared_model(), &train, "");
    let cfg = cfg.to_str().unwrap();
    let err = assert_fails(&ringtune(&["train", cfg, "--resume"]));
    assert!(err.contains("no complete checkpoint"), "{err}");
    let o = ringtune(&["train", cfg, "--auto-resume", "--max-steps", "4"]);
    assert_ok(&o);
    assert!(stderr(&o).contains("starting fresh"), "{}", stderr(&o));
    let err = assert_fails(&ringtune(&["train", cfg, "--max-steps", "4"]));
    assert!(err.contains("--resume"), "{err}");
    let o = ringtune(&["train", cfg, "--auto-resume", "--max-steps", "4"]);
    assert_ok(&o);
    assert!(stderr(&o).contains("resuming from it"), "{}", stderr(&o));
    // One line per step, still.
    let steps: Vec<u64> = losses(&dir.path().join("run"))
        .iter()
        .map(|l| l.0)
        .collect();
    assert_eq!(steps, (1..=4).collect::<Vec<_>>());
}
