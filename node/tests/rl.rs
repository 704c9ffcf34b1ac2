//! The RL loop end to end on the quickstart's tiny random-init model: metrics lines with
//! the reward fields, on-policy sanity (the sampler's and learner's logprobs agree, KL to
//! the base is 0 before the first step), exact resume, the external reward command, and
//! (with RINGTUNE_SLOW_TESTS=1) that the shipped config's reward improves.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::OnceLock;

use ringtune_config::RunConfig;
use ringtune_node::rl::read_metrics;
use ringtune_node::{LocalSync, RlOutcome, RlTrainer};

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

/// A small RL config in `dir` (output `dir/run`), with `extra` TOML lines under `[rl]`.
fn config(dir: &Path, steps: u64, extra: &str) -> RunConfig {
    let text = format!(
        "output_dir = {:?}\n[model]\npath = {:?}\n\
         [lora]\nrank = 4\n[optimizer]\nlr = 1e-2\n[train]\nmethod = \"rl\"\nmax_steps = {steps}\nsave_every = 0\n\
         [rl]\ngroups_per_step = 2\ngroup_size = 4\nmax_tokens = 4\n{extra}\n",
        dir.join("run").display().to_string(),
        model().display().to_string(),
    );
    let p = dir.join("rl.toml");
    std::fs::write(&p, text).unwrap();
    RunConfig::load(&p).unwrap_or_else(|e| panic!("{e}"))
}

fn run(cfg: RunConfig, resume: bool) -> RlTrainer {
    let mut t = RlTrainer::new(cfg, resume, Box::new(LocalSync)).unwrap();
    let out = t.run(&AtomicBool::new(false), &mut |_| {}).unwrap();
    assert!(matches!(out, RlOutcome::Finished { .. }));
    t
}

#[test]
fn steps_write_reward_metrics_and_a_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let t = run(config(d.path(), 2, "format_coef = 0.5"), false);
    let m = read_metrics(&d.path().join("run/metrics.jsonl")).unwrap();
    assert_eq!(m.iter().map(|m| m.step).collect::<Vec<_>>(), vec![1, 2]);
    for m in &m {
        assert_eq!(m.samples, 8);
        assert!(m.sampled_tokens >= 8 && m.sampled_tokens <= 32, "{m:?}");
        // Rewards of the arithmetic env with format_coef 0.5 lie in {-0.5, 0, 0.5, 1}.
        assert!(m.reward_min >= -0.5 && m.reward_max <= 1.0, "{m:?}");
        assert!(m.env.contains_key("env/correct") && m.env.contains_key("env/format"));
        assert!((0.0..=1.0).contains(&m.frac_groups_dropped));
        assert!(m.loss.is_finite() && m.grad_norm.is_finite());
        assert!(m.sample_s > 0.0 && m.train_s > 0.0);
    }
    // The learner sees the samples as the sampler drew them (temperature 1): the sampled
    // tokens' logprobs agree up to float rounding between the KV-cache and full passes.
    assert!(m[0].kl_sample_train.abs() < 1e-3, "{:?}", m[0]);
    let raw = std::fs::read_to_string(d.path().join("run/metrics.jsonl")).unwrap();
    for key in [
        "\"reward_mean\"",
        "\"env/format\"",
        "\"frac_groups_dropped\"",
        "\"sampled_tokens\"",
        "\"sample_s\"",
    ] {
        assert!(raw.contains(key), "{key} missing from {raw}");
    }
    let ck = t.run_dir().latest_checkpoint().unwrap().unwrap();
    assert_eq!(ck.step, 2);
    assert!(d
        .path()
        .join("run")
        .join(&ck.adapter)
        .join("adapter_model.safetensors")
        .exists());
}

#[test]
fn kl_to_the_base_starts_at_zero_and_is_reported() {
    let d = tempfile::tempdir().unwrap();
    run(config(d.path(), 2, "kl_penalty_coef = 0.1"), false);
    let m = read_metrics(&d.path().join("run/metrics.jsonl")).unwrap();
    // Before the first update the adapter's B is zero: policy = base.
    let kl0 = m[0].kl_policy_base.expect("kl reported");
    assert!(kl0.abs() < 1e-3, "{kl0}");
    assert!(m[1].kl_policy_base.is_some());
}

#[test]
fn resume_continues_bit_exactly() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let straight = run(config(a.path(), 3, ""), false);
    // 2 steps, then a new process-like trainer resumes for the third.
    let cfg2 = config(b.path(), 3, "");
    let mut first = RlTrainer::new(cfg2.clone(), false, Box::new(LocalSync)).unwrap();
    let stop = AtomicBool::new(false);
    let out = first
        .run(&stop, &mut |ev| {
            if let ringtune_node::RlEvent::Step(m) = ev {
                if m.step == 2 {
                    stop.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
        })
        .unwrap();
    assert_eq!(out, RlOutcome::Interrupted { step: 2 });
    drop(first);
    let resumed = run(cfg2, true);
    assert_eq!(resumed.step(), 3);
    assert!(
        straight.params_flat().unwrap() == resumed.params_flat().unwrap(),
        "resumed adapter differs from the straight run's"
    );
    let (ma, mb) = (
        read_metrics(&a.path().join("run/metrics.jsonl")).unwrap(),
        read_metrics(&b.path().join("run/metrics.jsonl")).unwrap(),
    );
    assert_eq!(mb.len(), 3);
    assert_eq!(ma[2].reward_mean, mb[2].reward_mean);
    assert_eq!(ma[2].loss, mb[2].loss);
}

#[test]
fn losses_ppo_and_cispo_run() {
    for loss in ["ppo", "cispo"] {
        let d = tempfile::tempdir().unwrap();
        run(config(d.path(), 1, &format!("loss = {loss:?}")), false);
        let m = read_metrics(&d.path().join("run/metrics.jsonl")).unwrap();
        assert!(m[0].loss.is_finite(), "{loss}: {:?}", m[0]);
    }
}

#[test]
fn external_env_scores_through_a_script_and_its_errors_stop_the_run() {
    let d = tempfile::tempdir().unwrap();
    let prompts = d.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"Say a number.\"}\n{\"prompt\": \"Say a word.\"}\n",
    )
    .unwrap();
    // Reward = completion length in characters (awk reads the JSON's completion crudely:
    // the rewards only have to be numbers that vary).
    let script = r#"awk '{ n = index($0, "\"completion\":"); print (n % 7) + length($0) % 3 }'"#;
    let extra = format!(
        "env = \"external\"\nprompts = {:?}\ncommand = [\"sh\", \"-c\", {:?}]\ntimeout_s = 20",
        prompts.display().to_string(),
        script
    );
    run(config(d.path(), 1, &extra), false);
    let m = read_metrics(&d.path().join("run/metrics.jsonl")).unwrap();
    assert_eq!(m[0].samples, 8);

    // A command that prints too few lines fails the step with its name and the count.
    let e = tempfile::tempdir().unwrap();
    let extra = format!(
        "env = \"external\"\nprompts = {:?}\ncommand = [\"sh\", \"-c\", \"cat >/dev/null; echo 1\"]",
        prompts.display().to_string()
    );
    let mut t = RlTrainer::new(config(e.path(), 1, &extra), false, Box::new(LocalSync)).unwrap();
    let err = t.train_step().unwrap_err().to_string();
    assert!(
        err.contains("external command `sh -c") && err.contains("1 reward lines for 8"),
        "{err}"
    );
}

#[test]
fn the_sft_trainer_refuses_an_rl_config_with_a_reason() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), 1, "");
    let e = ringtune_node::Trainer::new(cfg, false, Box::new(LocalSync))
        .unwrap_err()
        .to_string();
    assert!(e.contains("RlTrainer"), "{e}");
    assert!(
        !d.path().join("run").exists(),
        "a refused start wrote the run folder"
    );
}
