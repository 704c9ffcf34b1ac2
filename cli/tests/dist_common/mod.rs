//! Helpers for the distributed-runtime tests: real `ringtune` processes on 127.0.0.1.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_ringtune");
pub const TOKEN: &str = "dist-test-token-0123456789abcdef";

/// A quickstart-preset model with a small vocabulary, shared by one test binary.
pub fn shared_model() -> &'static Path {
    static MODEL: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, p) = MODEL.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model");
        let out = Command::new(BIN)
            .args([
                "init-model",
                "--preset",
                "quickstart",
                "--vocab-size",
                "512",
            ])
            .args(["--out", p.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (dir, p)
    });
    p
}

/// `n` small arithmetic conversations as a JSONL file.
pub fn train_file(dir: &Path, n: usize) -> PathBuf {
    let mut x: u64 = 0x9E3779B97F4A7C15;
    let mut next = move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) % 90 + 10
    };
    let lines: Vec<String> = (0..n)
        .map(|_| {
            let (a, b) = (next(), next());
            format!(
                r#"{{"messages":[{{"role":"user","content":"What is {a} + {b}?"}},{{"role":"assistant","content":"{a} + {b} = {}."}}]}}"#,
                a + b
            )
        })
        .collect();
    let p = dir.join("train.jsonl");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

/// A small config: no dropout (ranks draw dropout masks per pass, so a W=2 run would
/// not match a W=1 run with it), `nodes` node processes, `steps` steps of 8 examples.
pub fn config(dir: &Path, nodes: u32, steps: u64, extra: &str) -> PathBuf {
    let train = train_file(dir, 96);
    let text = format!(
        r#"output_dir = {out:?}
seed = 5
nodes = {nodes}

[model]
path = {model:?}

[data]
train = {train:?}
eval_fraction = 0.0
max_length = 64

[lora]
rank = 4
alpha = 8
dropout = 0.0

[optimizer]
lr = 1e-3

[schedule]
kind = "constant"

[train]
batch_size = 8
micro_batch_tokens = 128
max_steps = {steps}
save_every = 0
eval_every = 0
{extra}
"#,
        out = dir.join("run").display().to_string(),
        model = shared_model().display().to_string(),
        train = train.display().to_string(),
    );
    let p = dir.join("run.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// Replaces `from` with `to` in the config file at `path`; `from` must be there (a
/// replacement that matched nothing would silently test the unchanged config).
pub fn edit_config(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} has no {from:?}", path.display());
    std::fs::write(path, text.replace(from, to)).unwrap();
}

/// A running process whose stderr lines are collected.
pub struct Running {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Running {
    spawn_in(None, args, env)
}

/// `ringtune coordinator CONFIG` on a free port on 127.0.0.1 (with [`TOKEN`] and `extra`
/// arguments), in `cwd` if given; returns it once it listens, with its address.
pub fn start_coordinator(cwd: Option<&Path>, config: &str, extra: &[&str]) -> (Running, String) {
    let mut args = vec!["coordinator", config, "--listen", "127.0.0.1:0", "--plain"];
    args.extend_from_slice(extra);
    let mut coord = spawn_in(cwd, &args, &[("RINGTUNE_TOKEN", TOKEN)]);
    let line = coord.wait_for("listening on", 60);
    let addr = line
        .split("listening on ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .expect("the coordinator prints its address")
        .to_string();
    (coord, addr)
}

/// `ringtune node` for slot `slot` joining `addr` with `token`, one compute thread, `extra`
/// arguments, in `cwd` if given.
pub fn start_node(
    cwd: Option<&Path>,
    addr: &str,
    slot: u32,
    token: &str,
    extra: &[&str],
) -> Running {
    let slot = slot.to_string();
    let mut args = vec![
        "node",
        "--coordinator",
        addr,
        "--local-rank",
        &slot,
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    spawn_in(
        cwd,
        &args,
        &[("RINGTUNE_TOKEN", token), ("RAYON_NUM_THREADS", "1")],
    )
}

/// [`spawn`] in the working folder `cwd` (relative paths in a config resolve from it).
pub fn spawn_in(cwd: Option<&Path>, args: &[&str], env: &[(&str, &str)]) -> Running {
    let mut cmd = Command::new(BIN);
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    cmd.env_remove("RINGTUNE_TOKEN");
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
    /// Waits (at most `secs`) for a stderr line containing `needle`; returns it.
    pub fn wait_for(&mut self, needle: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    panic!(
                        "no line with {needle:?} in {secs} s; stderr so far:\n{}",
                        self.seen.join("\n")
                    );
                }
            }
        }
    }

    /// Waits at most `secs` for the exit; kills and panics past it.
    pub fn wait_exit(mut self, secs: u64) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let st = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(l);
                }
                panic!(
                    "did not exit within {secs} s; stderr:\n{}",
                    self.seen.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(l);
        }
        (st, self.seen.join("\n"))
    }
}

/// Child processes of `pid` (from /proc).
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // The fields after the ")" that closes the command name: state, ppid, ...
        let Some(rest) = stat.rsplit(')').next() else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.get(1).and_then(|x| x.parse::<u32>().ok()) == Some(pid) {
            out.push(p);
        }
    }
    out
}

/// Whether `pid` is a live (not zombie) process.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            state != Some("Z") && state != Some("X")
        }
        Err(_) => false,
    }
}

/// `kill -SIG PID…` (`sig` as `kill` takes it: `9`, `TERM`, `INT`); asserts it was sent.
pub fn signal(sig: &str, pids: &[u32]) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .args(pids.iter().map(u32::to_string))
        .status()
        .unwrap();
    assert!(st.success(), "kill -{sig} {pids:?}");
}

pub fn kill_9(pid: u32) {
    signal("9", &[pid]);
}

/// From a coordinator's stderr after an interrupt: the step it stopped after, asserting
/// that a checkpoint of exactly that step is recorded and on disk under `dir/run`.
pub fn interrupted_with_checkpoint(err: &str, dir: &Path) -> u64 {
    let line = err
        .lines()
        .find(|l| l.contains("interrupted after step"))
        .unwrap_or_else(|| panic!("not interrupted: {err}"));
    let step: u64 = line
        .split("interrupted after step ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        line.contains(&format!("last checkpoint: step {step}")),
        "{line}"
    );
    assert!(
        dir.join(format!("run/checkpoints/step-{step}/adapter"))
            .is_dir(),
        "{err}"
    );
    step
}

/// Every f32 of the adapter at `dir` (PEFT safetensors), by tensor name.
pub fn adapter(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}
