//! Shared helpers of the `train_*` integration tests: they run the real `ringtune` binary as
//! a separate process (so it can be killed with SIGKILL) on real files in temp folders.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_ringtune");

/// The repository root (the quickstart config's relative paths start here).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// A quickstart-preset model shared by the tests of one test binary.
pub fn shared_model() -> &'static Path {
    static MODEL: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, p) = MODEL.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model");
        let out = ringtune(&[
            "init-model",
            "--preset",
            "quickstart",
            "--out",
            p.to_str().unwrap(),
        ]);
        assert_ok(&out);
        (dir, p)
    });
    p
}

/// Runs the binary to completion.
pub fn ringtune(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run ringtune")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn assert_ok(o: &Output) {
    assert!(o.status.success(), "ringtune failed: {}", stderr(o));
}

/// Asserts failure and returns stderr.
pub fn assert_fails(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "ringtune should have failed: {}",
        stderr(o)
    );
    stderr(o)
}

/// `n` small arithmetic conversations as JSONL lines.
pub fn chat_lines(n: usize, seed: u64) -> Vec<String> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) % 90 + 10
    };
    (0..n)
        .map(|_| {
            let (a, b) = (next(), next());
            format!(
                r#"{{"messages":[{{"role":"user","content":"What is {a} + {b}?"}},{{"role":"assistant","content":"{a} + {b} = {}."}}]}}"#,
                a + b
            )
        })
        .collect()
}

pub fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

/// A small, fast run config: the shared model, rank 4 with dropout (so the dropout RNG
/// state is part of what resume must restore), 4 examples per step.
pub fn small_config(dir: &Path, model: &Path, train: &Path, extra: &str) -> PathBuf {
    let text = format!(
        r#"output_dir = {out:?}
seed = 3

[model]
path = {model:?}

[data]
train = {train:?}
eval_fraction = 0.1
max_length = 64

[lora]
rank = 4
alpha = 8
dropout = 0.1

[optimizer]
lr = 1e-3
grad_clip = 1.0

[schedule]
kind = "cosine"
warmup_steps = 2

[train]
batch_size = 4
micro_batch_tokens = 40
max_steps = 8
save_every = 4
eval_every = 4
{extra}
"#,
        out = dir.join("run").display().to_string(),
        model = model.display().to_string(),
        train = train.display().to_string(),
    );
    let p = dir.join("run.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// A training process whose stderr is read line by line on a thread.
pub struct Running {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Running {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn ringtune");
    let err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Running {
        child,
        lines: rx,
        seen: Vec::new(),
    }
}

impl Running {
    /// Waits (at most a minute) for a stderr line containing `needle`.
    pub fn wait_for(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.seen.push(line);
                    if hit {
                        return;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    panic!(
                        "no line with {needle:?}; stderr so far:\n{}",
                        self.seen.join("\n")
                    );
                }
            }
        }
    }

    /// SIGKILL, and reap.
    pub fn kill_9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends a signal by name (`TERM`, `INT`) with kill(1).
    pub fn signal(&self, name: &str) {
        let st = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    pub fn wait(mut self) -> (std::process::ExitStatus, String) {
        let st = self.child.wait().unwrap();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(l);
        }
        (st, self.seen.join("\n"))
    }
}

/// (step, loss bits) of every line of a metrics.jsonl.
pub fn losses(run: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap().to_bits(),
            )
        })
        .collect()
}

/// eval_nll bits by step.
pub fn eval_nlls(run: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["eval_nll"]
                .as_f64()
                .map(|e| (v["step"].as_u64().unwrap(), e.to_bits()))
        })
        .collect()
}

/// Steps listed in checkpoints.jsonl.
pub fn listed_steps(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("checkpoints.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// Asserts two checkpoint folders hold byte-identical adapter, optimizer and data state.
pub fn assert_same_checkpoint(a: &Path, b: &Path) {
    for f in [
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "optimizer.safetensors",
    ] {
        let (x, y) = (
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
        );
        assert!(
            x == y,
            "{f} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
    let state = |p: &Path| {
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p.join("state.json")).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("elapsed_s");
        v
    };
    assert_eq!(state(a), state(b));
}

/// Every f32 of a PEFT adapter folder, tensors in name order.
pub fn adapter_values(dir: &Path) -> Vec<f32> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(|n| n.to_string()).collect();
    names.sort();
    names
        .iter()
        .flat_map(|n| {
            st.tensor(n)
                .unwrap()
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// ‖a − b‖ / ‖a‖ over two flat parameter vectors.
pub fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*x as f64).powi(2);
    }
    (num / den).sqrt()
}

/// `ringtune train CONFIG` (a path from the repository root, e.g. `configs/rl.toml`) run from
/// the repository root into `dir/run`, on the shared test model, with extra arguments.
pub fn train_shipped(config: &str, dir: &Path, extra: &[&str]) -> Output {
    let q = |p: &Path| serde_json::to_string(p.to_str().unwrap()).unwrap();
    let mut args = vec![
        "train".to_owned(),
        config.to_owned(),
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
