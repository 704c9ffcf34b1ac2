//! `ringtune train` with `train.method = "rl"` through the real binary: configs/rl.toml runs
//! a few steps offline and writes metrics.jsonl with the reward fields and a checkpoint; a
//! failing reward command stops the run naming the command; and (RINGTUNE_SLOW_TESTS=1)
//! the shipped config's mean reward improves over the run.

mod train_common;

use std::path::Path;
use std::process::Output;

use train_common::*;

/// `ringtune train configs/rl.toml` from the repository root into `dir`, with the model
/// folder under `dir` and extra `--set`s.
fn train_rl(dir: &Path, extra: &[&str]) -> Output {
    train_shipped("configs/rl.toml", dir, extra)
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn rl_config_runs_and_writes_reward_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let out = train_rl(
        tmp.path(),
        &[
            "--max-steps",
            "3",
            "--set",
            "rl.groups_per_step=4",
            "--set",
            "rl.group_size=4",
        ],
    );
    assert_ok(&out);
    let err = stderr(&out);
    assert!(
        err.contains("env arithmetic") && err.contains("reward"),
        "{err}"
    );
    let m = metrics(tmp.path());
    assert_eq!(m.len(), 3);
    for (i, line) in m.iter().enumerate() {
        assert_eq!(line["step"], i as u64 + 1);
        for key in [
            "reward_mean",
            "env/correct",
            "env/format",
            "frac_groups_dropped",
            "sampled_tokens",
            "kl_sample_train",
            "loss",
            "sample_s",
            "train_s",
        ] {
            assert!(line[key].is_number(), "{key} missing in {line}");
        }
        assert_eq!(line["samples"], 16);
        let r = line["reward_mean"].as_f64().unwrap();
        assert!((-0.5..=1.0).contains(&r), "{line}");
    }
    let index = std::fs::read_to_string(tmp.path().join("run/checkpoints.jsonl")).unwrap();
    assert!(index.contains("\"step\":3"), "{index}");
    assert!(tmp
        .path()
        .join("run/checkpoints/step-3/adapter/adapter_model.safetensors")
        .exists());
    // A second start into the same folder is refused; --resume of a finished run is a no-op.
    let again = assert_fails(&train_rl(
        tmp.path(),
        &[
            "--max-steps",
            "3",
            "--set",
            "rl.groups_per_step=4",
            "--set",
            "rl.group_size=4",
        ],
    ));
    assert!(again.contains("--resume"), "{again}");
    let resumed = train_rl(
        tmp.path(),
        &[
            "--resume",
            "--max-steps",
            "3",
            "--set",
            "rl.groups_per_step=4",
            "--set",
            "rl.group_size=4",
        ],
    );
    assert_ok(&resumed);
    assert!(
        stderr(&resumed).contains("done: 3 steps"),
        "{}",
        stderr(&resumed)
    );
    assert_eq!(
        metrics(tmp.path()),
        m,
        "a finished run's metrics changed on --resume"
    );
    // A changed semantic key is named on resume.
    let changed = assert_fails(&train_rl(
        tmp.path(),
        &[
            "--resume",
            "--max-steps",
            "3",
            "--set",
            "rl.groups_per_step=5",
            "--set",
            "rl.group_size=4",
        ],
    ));
    assert!(changed.contains("rl.groups_per_step: 4 → 5"), "{changed}");
}

#[test]
fn a_failing_reward_command_stops_the_run_and_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"Name a colour.\"}\n").unwrap();
    let q = |s: &str| serde_json::to_string(s).unwrap();
    let out = train_rl(
        tmp.path(),
        &[
            "--max-steps",
            "2",
            "--set",
            "rl.env=\"external\"",
            "--set",
            &format!("rl.prompts={}", q(prompts.to_str().unwrap())),
            "--set",
            "rl.command=[\"sh\", \"-c\", \"cat >/dev/null; echo 1; echo not-a-number\"]",
            "--set",
            "rl.groups_per_step=1",
            "--set",
            "rl.group_size=2",
        ],
    );
    let err = assert_fails(&out);
    assert!(
        err.contains("external command `sh -c") && err.contains("output line 2: not a number"),
        "{err}"
    );
}

/// Two node processes sample their share of the groups each (the rows at their global
/// positions in the step's seeded stream), score them with their own copy of the reward
/// command, and sum gradients, the KL penalty's mean and the metrics over the QUIC ring:
/// they end where one process does (and the coordinator checks every step that both
/// ranks hold the same adapter bits).
#[test]
fn rl_on_two_nodes_matches_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"Name a colour.\"}\n{\"prompt\": \"Count to three.\"}\n",
    )
    .unwrap();
    let q = |s: &str| serde_json::to_string(s).unwrap();
    let prompts_key = format!("rl.prompts={}", q(prompts.to_str().unwrap()));
    // A reward that varies within every group: the length of the JSON line (which holds
    // the completion) modulo 5.
    let args = |nodes: &'static str| -> Vec<String> {
        [
            "--max-steps",
            "3",
            "--set",
            "rl.env=\"external\"",
            "--set",
            &prompts_key,
            "--set",
            "rl.command=[\"awk\", \"{ print length($0) % 5 }\"]",
            "--set",
            "rl.groups_per_step=4",
            "--set",
            "rl.group_size=4",
            "--set",
            "rl.kl_penalty_coef=0.1",
            "--set",
            nodes,
            "--plain",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let one = tempfile::tempdir().unwrap();
    let a1 = args("nodes=1");
    assert_ok(&train_rl(
        one.path(),
        &a1.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    let two = tempfile::tempdir().unwrap();
    let a2 = args("nodes=2");
    let out = train_rl(
        two.path(),
        &a2.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_ok(&out);
    let (a, b) = (metrics(one.path()), metrics(two.path()));
    assert_eq!(b.len(), 3, "{}", stderr(&out));
    let mut trained_on_both = false;
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(y["world_size"], 2);
        for key in [
            "reward_mean",
            "samples",
            "frac_groups_dropped",
            "kl_policy_base",
            "loss",
        ] {
            let (p, q) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!(
                (p - q).abs() <= 1e-5 * p.abs().max(1.0),
                "step {}: {key} {p} vs {q}",
                x["step"]
            );
        }
        trained_on_both |= y["frac_groups_dropped"].as_f64().unwrap() < 0.5;
    }
    assert!(
        trained_on_both,
        "no step trained on both ranks' groups: {b:?}"
    );
    let last = "run/checkpoints/step-3/adapter";
    let (p, q) = (
        adapter_values(&one.path().join(last)),
        adapter_values(&two.path().join(last)),
    );
    let rel = rel_diff(&p, &q);
    assert!(rel < 1e-5, "W=2 vs W=1 adapters differ by {rel} (relative)");
}

/// The shipped config as it is (RINGTUNE_SLOW_TESTS=1; about two minutes on 2 cores):
/// the mean reward of the last ten steps clearly exceeds the first ten's.
#[test]
fn rl_config_improves_the_reward() {
    if std::env::var_os("RINGTUNE_SLOW_TESTS").is_none() {
        eprintln!("skipped: set RINGTUNE_SLOW_TESTS=1");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    assert_ok(&train_rl(tmp.path(), &[]));
    let m = metrics(tmp.path());
    let rewards: Vec<f64> = m
        .iter()
        .map(|l| l["reward_mean"].as_f64().unwrap())
        .collect();
    let n = rewards.len();
    let first = rewards[..10].iter().sum::<f64>() / 10.0;
    let last = rewards[n - 10..].iter().sum::<f64>() / 10.0;
    eprintln!("reward: first 10 steps {first:.3}, last 10 steps {last:.3}");
    assert!(
        last > first + 0.2,
        "first {first:.3}, last {last:.3}: {rewards:?}"
    );
}
