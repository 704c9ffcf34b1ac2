//! `ringtune train CONFIG`: one training run on this machine, with a progress bar (or plain
//! log lines when stderr is not a terminal), Ctrl-C/SIGTERM handling that saves a checkpoint
//! before exiting, and `--resume`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ringtune_config::RunConfig;
use ringtune_node::{Event, LocalSync, Outcome, StepMetrics, Trainer};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The run config (TOML; see configs/README.md).
    pub config: PathBuf,
    /// Continue from the newest complete checkpoint in the config's output_dir.
    #[arg(long)]
    pub resume: bool,
    /// Continue from the newest complete checkpoint if the output_dir has one, else start
    /// fresh (for jobs that may be requeued).
    #[arg(long, conflicts_with = "resume")]
    pub auto_resume: bool,
    /// Override `train.max_steps`.
    #[arg(long, value_name = "N")]
    pub max_steps: Option<u64>,
    /// Override `output_dir`.
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Override `model.device`: cpu, cuda[:N], or auto (the GPU of this process's slot,
    /// LOCAL_RANK / SLURM_LOCALID, when built with CUDA and one is there; else cpu).
    #[arg(long, value_name = "DEVICE", value_parser = super::node::parse_device)]
    pub device: Option<ringtune_config::Device>,
    /// Override any config key, e.g. `--set lora.rank=8` (repeatable; TOML values).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Plain log lines instead of a progress bar, even on a terminal.
    #[arg(long)]
    pub plain: bool,
    /// Failure handling when `nodes > 1`.
    #[command(flatten)]
    pub policy: super::coordinator::Policy,
}

/// Overrides from the convenience flags, then the generic `--set`s.
fn overrides(args: &Args) -> Result<Vec<String>> {
    let mut out = Vec::new();
    if let Some(n) = args.max_steps {
        out.push(format!("train.max_steps={n}"));
    }
    if let Some(d) = &args.output_dir {
        let s = d.to_str().context("--output-dir must be valid UTF-8")?;
        // A JSON string literal is a valid TOML basic string.
        out.push(format!("output_dir={}", serde_json::to_string(s)?));
    }
    if let Some(d) = args.device {
        out.push(format!("model.device=\"{d}\""));
    }
    out.extend(args.set.iter().cloned());
    Ok(out)
}

pub fn run(args: Args) -> Result<()> {
    // Before any thread exists: one thread for candle's element-wise pool, the allocator
    // tuned for large tensors, RAYON_NUM_THREADS respected (as `ringtune node` does).
    ringtune_model::init_cpu_runtime(None);
    let cfg = RunConfig::load_with_overrides(&args.config, &overrides(&args)?)?;
    let mut args = args;
    args.resume =
        super::coordinator::resolve_resume(args.resume, args.auto_resume, &cfg.output_dir)?;
    if cfg.nodes > 1 {
        return run_local_cluster(cfg, &args);
    }
    let stop = Arc::new(AtomicBool::new(false));
    // This run's until it ends: a second run into the same folder is refused.
    let _lock = ringtune_node::RunDir::lock(&cfg.output_dir)?;
    let config_path = args.config.display().to_string();
    if cfg.train.method == ringtune_config::Method::Rl {
        return run_rl(cfg, &args, &stop);
    }
    let mut trainer = Trainer::new(cfg, args.resume, Box::new(LocalSync))
        .with_context(|| format!("cannot start training from {config_path}"))?;
    stop_after_the_step_on_signals(&stop)?;
    for r in trainer.data_reports() {
        eprintln!("data: {r}");
    }
    for w in trainer.warnings() {
        eprintln!("warning: {w}");
    }
    let (n_train, n_eval) = trainer.example_counts();
    let m = trainer.model();
    eprintln!(
        "model: {} ({} layers, hidden {}, vocab {}), {} LoRA parameters; {} train / {} eval examples",
        m.model_dir().display(),
        m.config().num_hidden_layers,
        m.config().hidden_size,
        m.config().vocab_size,
        m.param_layout().numel(),
        n_train,
        n_eval,
    );
    eprintln!(
        "device: {}, {:?} base weights; AdamW on the {}",
        device_label(m.device()),
        m.dtype(),
        trainer.optimizer_placement()
    );
    if trainer.start_step() > 0 {
        eprintln!("resuming at step {}", trainer.start_step());
    }
    let run_dir = trainer.run_dir().root().to_owned();
    eprintln!("run folder: {}", run_dir.display());

    let mut progress = Progress::new(
        trainer.start_step(),
        trainer.total_steps(),
        args.plain || !std::io::stderr().is_terminal(),
    );
    let outcome = trainer.run(&stop, &mut |ev| progress.event(&ev));
    progress.finish();
    let outcome =
        outcome.with_context(|| format!("training failed (run folder {})", run_dir.display()))?;
    let last = trainer
        .run_dir()
        .latest_checkpoint()?
        .map(|r| run_dir.join(r.adapter).display().to_string())
        .unwrap_or_default();
    match outcome {
        Outcome::Finished { step } => {
            eprintln!("done: {step} steps; adapter: {last}");
        }
        Outcome::Interrupted { step } => eprintln!("{}", interrupted_line(step, &last)),
    }
    Ok(())
}

/// `train.method = "rl"` on this process: the RL loop with a log line per step (at most
/// every few seconds, and the last one).
fn run_rl(cfg: RunConfig, args: &Args, stop: &Arc<AtomicBool>) -> Result<()> {
    use ringtune_node::{RlEvent, RlOutcome, RlTrainer};
    let config_path = args.config.display().to_string();
    let r = cfg.rl.clone();
    let r_rank = cfg.lora.rank;
    let mut trainer = RlTrainer::new(cfg, args.resume, Box::new(LocalSync))
        .with_context(|| format!("cannot start RL training from {config_path}"))?;
    stop_after_the_step_on_signals(stop)?;
    if let Some(w) = trainer.renderer_warning() {
        eprintln!("warning: {w}");
    }
    let m = trainer.model();
    if let Some(w) = ringtune_node::trainer::rank_warning(r_rank, m.param_layout()) {
        eprintln!("warning: {w}");
    }
    eprintln!(
        "device: {}, {:?} base weights; AdamW on the {}",
        device_label(m.device()),
        m.dtype(),
        trainer.optimizer_placement()
    );
    eprintln!(
        "model: {} ({} layers, hidden {}, vocab {}), {} LoRA parameters; env {}: {} groups x {} \
         samples per step, max_tokens {}",
        m.model_dir().display(),
        m.config().num_hidden_layers,
        m.config().hidden_size,
        m.config().vocab_size,
        m.param_layout().numel(),
        trainer.env_name(),
        r.groups_per_step,
        r.group_size,
        r.max_tokens,
    );
    if trainer.start_step() > 0 {
        eprintln!("resuming at step {}", trainer.start_step());
    }
    let run_dir = trainer.run_dir().root().to_owned();
    eprintln!("run folder: {}", run_dir.display());
    let total = trainer.total_steps();
    let mut last_line: Option<Instant> = None;
    let outcome = trainer.run(stop, &mut |ev| match ev {
        RlEvent::Step(m) => {
            let due = last_line.is_none_or(|t| t.elapsed() >= Duration::from_secs(2));
            if due || m.step == total {
                last_line = Some(Instant::now());
                let env: Vec<String> = m
                    .env
                    .iter()
                    .map(|(k, v)| format!("{} {v:.3}", k.trim_start_matches("env/")))
                    .collect();
                eprintln!(
                    "step {}/{} | reward {:.3} | {} | dropped {:.2} | len {:.1} | loss {:.3} | \
                     sample {:.1}s train {:.1}s",
                    m.step,
                    total,
                    m.reward_mean,
                    env.join(" "),
                    m.frac_groups_dropped,
                    m.completion_len_mean,
                    m.loss,
                    m.sample_s,
                    m.train_s
                );
            }
        }
        RlEvent::Checkpoint(r) => eprintln!("checkpoint: step {} → {}", r.step, r.path),
    });
    let outcome = outcome
        .with_context(|| format!("RL training failed (run folder {})", run_dir.display()))?;
    let last = trainer
        .run_dir()
        .latest_checkpoint()?
        .map(|r| run_dir.join(r.adapter).display().to_string())
        .unwrap_or_default();
    match outcome {
        RlOutcome::Finished { step } => eprintln!("done: {step} steps; adapter: {last}"),
        RlOutcome::Interrupted { step } => eprintln!("{}", interrupted_line(step, &last)),
    }
    Ok(())
}

/// A progress bar on a terminal, else a log line at most every few seconds (and for every
/// eval and checkpoint).
struct Progress {
    bar: Option<ProgressBar>,
    start_step: u64,
    total: u64,
    started: Instant,
    last_line: Option<Instant>,
}

impl Progress {
    fn new(start_step: u64, total: u64, plain: bool) -> Self {
        let bar = (!plain).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{bar:30.cyan/blue} step {pos}/{len} {msg} eta {eta}")
                    .expect("valid template"),
            );
            bar.set_position(start_step);
            bar.reset_eta();
            bar.enable_steady_tick(Duration::from_millis(500));
            bar
        });
        Self {
            bar,
            start_step,
            total,
            started: Instant::now(),
            last_line: None,
        }
    }

    fn eta(&self, step: u64) -> String {
        let done = step.saturating_sub(self.start_step);
        if done == 0 {
            return "?".into();
        }
        let per = self.started.elapsed().as_secs_f64() / done as f64;
        let s = (per * self.total.saturating_sub(step) as f64).round() as u64;
        format!("{}m{:02}s", s / 60, s % 60)
    }

    fn summary(m: &StepMetrics) -> String {
        let mut s = format!(
            "loss {:.4} | lr {:.2e} | grad_norm {:.3} | {:.0} tok/s",
            m.loss, m.lr, m.grad_norm, m.tokens_per_s
        );
        if let Some(e) = m.eval_nll {
            s.push_str(&format!(" | eval_nll {e:.4}"));
        }
        s
    }

    fn event(&mut self, ev: &Event) {
        match ev {
            Event::Step(m) => {
                if let Some(bar) = &self.bar {
                    bar.set_position(m.step);
                    bar.set_message(Self::summary(m));
                    if m.eval_nll.is_some() {
                        bar.println(format!("step {} | {}", m.step, Self::summary(m)));
                    }
                    return;
                }
                let due = self
                    .last_line
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(2));
                if due || m.eval_nll.is_some() || m.step == self.total {
                    self.last_line = Some(Instant::now());
                    eprintln!(
                        "step {}/{} | {} | eta {}",
                        m.step,
                        self.total,
                        Self::summary(m),
                        self.eta(m.step)
                    );
                }
            }
            Event::Checkpoint(r) => {
                let line = format!("checkpoint: step {} → {}", r.step, r.path);
                match &self.bar {
                    Some(bar) => bar.println(line),
                    None => eprintln!("{line}"),
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Launcher variables a local node process must not inherit: it is not a Slurm/torchrun
/// task, whatever this process is.
const LAUNCHER_VARS: &[&str] = &[
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_NODELIST",
    "SLURM_JOB_NODELIST",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    // The harness pins its own coordinator's certificate.
    "RINGTUNE_COORDINATOR_FINGERPRINT",
    "RINGTUNE_COORDINATOR_CA",
    // A fresh child is not rejoining anything.
    ringtune_node::distributed::REJOIN_VAR,
];

/// `nodes = N > 1`: the local multi-process harness. The coordinator runs in this process
/// on 127.0.0.1 (a free port), and N `ringtune node` children join it with a fresh
/// per-run token (passed in their environment, never on a command line), one compute
/// thread each, pinning the coordinator's per-run certificate by its fingerprint. The children get their own process group (Ctrl-C reaches only the
/// coordinator, which stops them cleanly) and die with this process (PR_SET_PDEATHSIG;
/// they also exit when the control connection drops), so none is left behind.
fn run_local_cluster(cfg: RunConfig, args: &Args) -> Result<()> {
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command, Stdio};
    let token = ringtune_collectives::auth::ClusterToken::generate()?;
    let token_text = String::from_utf8(token.expose().to_vec()).context("token is hex")?;
    let exe = std::env::current_exe().context("locating the ringtune binary")?;
    let n = cfg.nodes;
    // The children pin the coordinator's per-run certificate.
    let control = ringtune_collectives::tls::ClusterIdentity::generate()?;
    let pin = ringtune_collectives::tls::Fingerprint::of(&control.cert_chain[0]).to_string();
    let spawn_node = move |addr: std::net::SocketAddr, i: u32| -> Result<Child> {
        let mut cmd = Command::new(&exe);
        cmd.args(["node", "--coordinator", &addr.to_string()])
            .args(["--coordinator-fingerprint", &pin])
            .args(["--local-rank", &i.to_string(), "--threads", "1"])
            .args(["--connect-timeout", "30"])
            .env("RINGTUNE_TOKEN", &token_text)
            .env("RAYON_NUM_THREADS", "1")
            .stdin(Stdio::null())
            .process_group(0);
        for v in LAUNCHER_VARS {
            cmd.env_remove(v);
        }
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        cmd.spawn()
            .with_context(|| format!("starting node {i} ({})", exe.display()))
    };
    let children: Arc<Mutex<Vec<Child>>> = Arc::new(Mutex::new(Vec::new()));
    let over = Arc::new(AtomicBool::new(false));
    // PR_SET_PDEATHSIG fires when the *thread* that started a child ends, so the thread
    // that starts replacements must outlive them: it waits for this, set once every node
    // has been reaped.
    let reaped = Arc::new(AtomicBool::new(false));
    let plain = args.plain || !std::io::stderr().is_terminal();
    let max_restarts = args.policy.max_restarts;
    let result = {
        let children = Arc::clone(&children);
        let over = Arc::clone(&over);
        let reaped = Arc::clone(&reaped);
        super::coordinator::serve_run(
            cfg,
            super::coordinator::ControlPlane {
                listen: "127.0.0.1:0".parse()?,
                token,
                identity: control,
                fingerprint_file: None,
            },
            &args.policy,
            args.resume,
            plain,
            move |addr, exits| {
                let mut c = children.lock().expect("children lock");
                for i in 0..n {
                    c.push(spawn_node(addr, i)?);
                }
                drop(c);
                // Watches the node processes. One that ends before the run does is reported
                // to the coordinator at once (a killed process closes nothing over QUIC, so
                // otherwise only the heartbeat timeout finds it) and, with a restart budget,
                // replaced in its slot, like torchelastic; the coordinator's restart takes
                // the replacement in. Bounded by the budget times the world size.
                let mut budget = u64::from(max_restarts) * u64::from(n);
                let host = super::node::host_name();
                std::thread::spawn(move || {
                    let mut done = vec![false; n as usize];
                    while !reaped.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(100));
                        let mut c = children.lock().expect("children lock");
                        for (i, child) in c.iter_mut().enumerate() {
                            if done[i] || over.load(Ordering::SeqCst) {
                                continue;
                            }
                            let Ok(Some(st)) = child.try_wait() else {
                                continue;
                            };
                            if st.success() {
                                done[i] = true;
                                continue;
                            }
                            let _ = exits.send((host.clone(), i as u32));
                            if budget == 0 {
                                eprintln!("harness: node {i} exited ({st})");
                                done[i] = true;
                                continue;
                            }
                            eprintln!("harness: node {i} exited ({st}); starting a replacement");
                            match spawn_node(addr, i as u32) {
                                Ok(new) => *child = new,
                                Err(e) => {
                                    eprintln!("harness: {e:#}");
                                    done[i] = true;
                                }
                            }
                            budget -= 1;
                        }
                    }
                });
                Ok(())
            },
        )
    };
    over.store(true, Ordering::SeqCst);
    let children = std::mem::take(&mut *children.lock().expect("children lock"));
    // Nodes exit on their own once stopped; give them a moment, then make sure. After a
    // run that ended well every node that joined has acknowledged its stop, so one still
    // running is one that had not joined yet (a Ctrl-C during start-up): a short wait.
    let grace = if result.is_ok() { 2 } else { 10 };
    let deadline = Instant::now() + Duration::from_secs(grace);
    let mut failed = Vec::new();
    for (i, mut c) in children.into_iter().enumerate() {
        let status = loop {
            match c.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    break None;
                }
            }
        };
        match status {
            Some(s) if s.success() => {}
            Some(s) => failed.push(format!("node {i} exited with {s}")),
            None => failed.push(format!(
                "node {i} did not exit within {grace}s of the run's end and was killed"
            )),
        }
    }
    reaped.store(true, Ordering::SeqCst);
    match result {
        Err(e) if !failed.is_empty() => Err(e.context(failed.join("; "))),
        Err(e) => Err(e),
        // The run ended well and its checkpoints are complete: what a node did after
        // that (a kill from outside, or never having joined) is worth a line, not a
        // failed command.
        Ok(()) if !failed.is_empty() => {
            eprintln!(
                "harness: warning: after the run ended: {} (the run's checkpoints are \
                 complete)",
                failed.join("; ")
            );
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

/// From here on, SIGINT/SIGTERM set `stop`: the trainer finishes its step, saves and
/// exits 0; a second signal exits at once, except a SIGTERM echoing a first SIGTERM (a
/// launcher's and its forwarding: see [`super::TERM_ECHO`]). Installed once the trainer is
/// built — until then (loading the model and tokenizing the data, with nothing to save) a
/// signal ends the process at once, as it would any program.
fn stop_after_the_step_on_signals(stop: &Arc<AtomicBool>) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("installing signal handler")?;
    let stop = Arc::clone(stop);
    std::thread::spawn(move || {
        let mut first: Option<(i32, Instant)> = None;
        for sig in signals.forever() {
            match first {
                None => {
                    first = Some((sig, Instant::now()));
                    stop.store(true, Ordering::SeqCst);
                }
                Some((f, at)) if super::is_term_echo(f, at, sig) => {}
                Some(_) => std::process::exit(130),
            }
        }
    });
    Ok(())
}

/// What an interrupted run says last: where it stopped, the checkpoint it can go on from
/// (`last`, empty when there is none yet), and the command that continues it — this
/// process's own command line with `--resume`, so `--set` and `--output-dir` overrides
/// (which decide the run folder) are kept.
fn interrupted_line(step: u64, last: &str) -> String {
    if last.is_empty() {
        return format!("interrupted at step {step}; no checkpoint was written yet");
    }
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--resume" || a == "--auto-resume") {
        args.push("--resume".into());
    }
    let quoted: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
    format!(
        "interrupted at step {step}; checkpoint saved ({last}); continue with: ringtune {}",
        quoted.join(" ")
    )
}

/// `a` as one POSIX shell word.
fn shell_quote(a: &str) -> String {
    let plain = !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+%".contains(c));
    if plain {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

/// `cpu` or `cuda:N`, for the start-up lines.
fn device_label(d: &ringtune_model::Device) -> String {
    match d.location() {
        ringtune_model::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        ringtune_model::DeviceLocation::Cpu => "cpu".into(),
        other => format!("{other:?}"),
    }
}
