//! `ringtune coordinator CONFIG --listen HOST:PORT`: schedules a distributed run. Builds
//! the data plan, waits for `nodes` node processes to register (cluster token from
//! `--token-file` or `RINGTUNE_TOKEN`), hands out ranks and ring neighbours, runs the
//! steps, shows one progress bar and writes the run's one metrics.jsonl. `ringtune train`
//! with `nodes > 1` runs the same code in-process ([`serve_run`]) next to its local node
//! processes.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ringtune_collectives::auth::ClusterToken;
use ringtune_collectives::tls::{ClusterIdentity, Fingerprint};
use ringtune_config::RunConfig;
use ringtune_coordinator::driver::{self, DriverConfig};
use ringtune_coordinator::{
    Coordinator, CoordinatorConfig, Event, Outcome, Refusal, Step, StepRecord, Timeouts, Transport,
    WorldSize,
};
use ringtune_node::distributed::{config_hash_of, data_plan, resume_point};
use ringtune_node::{MetricsLog, RunDir};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The run config (TOML); `nodes` is the number of node processes (the world size).
    pub config: PathBuf,
    /// Control-plane address to listen on, e.g. 0.0.0.0:29400.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: SocketAddr,
    /// File holding the cluster token (else the RINGTUNE_TOKEN environment variable).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Override any config key (repeatable; TOML values).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    #[command(flatten)]
    pub policy: Policy,
    /// Continue the run in the config's output_dir from its newest checkpoint (the nodes
    /// load it; the data plan goes on at the next step).
    #[arg(long)]
    pub resume: bool,
    /// Continue from the newest complete checkpoint if the output_dir has one, else start
    /// fresh: what a job that may be requeued (Slurm `--requeue`, preemption) wants.
    #[arg(long, conflicts_with = "resume")]
    pub auto_resume: bool,
    /// Plain log lines instead of a progress bar.
    #[arg(long)]
    pub plain: bool,
    /// Present this certificate (PEM, leaf first) on the control plane instead of one made
    /// for this run, so that nodes can pin it across restarts (`ringtune node
    /// --coordinator-fingerprint` or `--coordinator-ca`).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Once listening, write the control certificate's fingerprint (`sha256:…`) to this
    /// file, for a launch script to hand to the nodes' --coordinator-fingerprint.
    #[arg(long, value_name = "FILE")]
    pub fingerprint_file: Option<PathBuf>,
}

/// The coordinator's end of the control plane.
pub struct ControlPlane {
    pub listen: SocketAddr,
    pub token: ClusterToken,
    /// The certificate nodes see (and may pin).
    pub identity: ClusterIdentity,
    /// Where to write its fingerprint once listening.
    pub fingerprint_file: Option<PathBuf>,
}

/// The control certificate: `--tls-cert`/`--tls-key`, checked now (a key that does not
/// match its certificate fails here, not at the first node), else a fresh one.
pub fn control_identity(cert: Option<&Path>, key: Option<&Path>) -> Result<ClusterIdentity> {
    let (Some(cert), Some(key)) = (cert, key) else {
        return Ok(ClusterIdentity::generate()?);
    };
    let flags = format!("--tls-cert {} --tls-key {}", cert.display(), key.display());
    let id = ClusterIdentity::from_pem_files(cert, key, None).map_err(|e| {
        let hint = if e.to_string().contains("no items found") {
            format!(
                " ({} holds no unencrypted private key: ringtune reads PKCS#8, PKCS#1 or SEC1 \
                 PEM keys; decrypt an encrypted one first, e.g. `openssl pkey -in KEY -out \
                 PLAIN`)",
                key.display()
            )
        } else {
            String::new()
        };
        anyhow::anyhow!("{flags}: {e}{hint}")
    })?;
    ringtune_coordinator::wire::server_config(id.cert_chain.clone(), id.key.clone_key()).map_err(
        |e| {
            let hint = if e.to_string().contains("KeyMismatch") {
                " (the key is not the certificate's, or the certificate file does not start \
                 with the leaf: a chain goes leaf first, then its issuers)"
            } else {
                ""
            };
            anyhow::anyhow!("{flags}: not a usable certificate and key: {e}{hint}")
        },
    )?;
    // Nodes that pin a CA check the dates (a fingerprint pin does not): say so now rather
    // than through every node's failed handshake, or a restart's weeks later.
    if let Some(p) = ringtune_collectives::tls::Validity::problem_now(&id.cert_chain[0], 7) {
        eprintln!(
            "coordinator: warning: --tls-cert {} {p}: nodes that pin a CA (--coordinator-ca) \
             refuse it once it is out of date",
            cert.display()
        );
    }
    Ok(id)
}

/// Writes `bytes` to `path` through a temporary file beside it and a rename, so a reader
/// polling for the file never sees half of it.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Failure handling, shared with `ringtune train`.
#[derive(clap::Args, Debug, Clone)]
pub struct Policy {
    /// A node silent for this many seconds is declared dead.
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0)]
    pub heartbeat_timeout: f64,
    /// Restart every node from the last checkpoint up to this many times after a failure
    /// (0: stop with an error naming the node and step).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_restarts: u32,
    /// Go on with as few as this many nodes after a restart (default: all of them).
    #[arg(long, value_name = "N")]
    pub min_nodes: Option<u32>,
    /// Compare every rank's adapter hash every this many steps (always at checkpoints).
    #[arg(long, value_name = "STEPS", default_value_t = 1)]
    pub hash_every: u64,
    /// How ranks sum gradients: `quic` (a ring between the node processes, any machines) or
    /// `nccl` (GPU ranks; the nodes need a build with the `nccl` feature and a CUDA device).
    #[arg(long, value_name = "quic|nccl", default_value = "quic", value_parser = ["quic", "nccl"])]
    pub collective: String,
}

/// `--resume`, or `--auto-resume`: resume when `out` holds a complete checkpoint (and say
/// which way it went).
pub fn resolve_resume(resume: bool, auto: bool, out: &Path) -> Result<bool> {
    if !auto {
        return Ok(resume);
    }
    let has = ringtune_node::RunDir::has_checkpoint(out)?;
    eprintln!(
        "--auto-resume: {}",
        if has {
            format!("{} holds a checkpoint; resuming from it", out.display())
        } else {
            format!("no checkpoint in {} yet; starting fresh", out.display())
        }
    );
    Ok(has)
}

/// The cluster token: `--token-file`, else `RINGTUNE_TOKEN`.
pub fn token_from(file: Option<&PathBuf>) -> Result<ClusterToken> {
    Ok(match file {
        Some(f) => ClusterToken::from_file(f)?,
        None if std::env::var_os("RINGTUNE_TOKEN").is_none() => anyhow::bail!(
            "no cluster token: pass --token-file FILE or set RINGTUNE_TOKEN (the same on every node)"
        ),
        None => ClusterToken::from_env("RINGTUNE_TOKEN")?,
    })
}

pub fn run(args: Args) -> Result<()> {
    let cfg = RunConfig::load_with_overrides(&args.config, &args.set)?;
    let resume = resolve_resume(args.resume, args.auto_resume, &cfg.output_dir)?;
    let token = token_from(args.token_file.as_ref())?;
    let identity = control_identity(args.tls_cert.as_deref(), args.tls_key.as_deref())?;
    if let Some(f) = &args.fingerprint_file {
        prepare_fingerprint_file(f)?;
    }
    serve_run(
        cfg,
        ControlPlane {
            listen: args.listen,
            token,
            identity,
            fingerprint_file: args.fingerprint_file,
        },
        &args.policy,
        resume,
        args.plain || !std::io::stderr().is_terminal(),
        |_, _| Ok(()),
    )
}

/// Runs the coordinator for `cfg` to the end. `started(addr)` is called once the control
/// address is bound (the local harness starts its node processes there).
/// Where a launcher that starts the node processes (the local harness) reports one that
/// ended: its `(host, local_rank)`. Dropping it says no more will come.
pub type ProcessExits = tokio::sync::mpsc::UnboundedSender<(String, u32)>;

pub fn serve_run(
    cfg: RunConfig,
    control: ControlPlane,
    policy: &Policy,
    resume: bool,
    plain: bool,
    started: impl FnOnce(SocketAddr, ProcessExits) -> Result<()>,
) -> Result<()> {
    // The folder is this run's until it ends (a second run into it is refused); then
    // refuse a folder that holds another run, or a changed config, before any work.
    let _lock = RunDir::lock(&cfg.output_dir)?;
    let start = resume_point(&cfg, resume)?;
    let plan = data_plan(&cfg).context("building the data plan")?;
    let world = cfg.nodes;
    let run = RunDir::create(&cfg.output_dir)?;
    let metrics_path = run.metrics_path();
    let mut metrics = if start.step > 0 {
        // Lines after the checkpoint are dropped: the resumed run writes them again.
        drop(MetricsLog::resume(&metrics_path, start.step)?);
        std::fs::OpenOptions::new().append(true).open(&metrics_path)
    } else {
        std::fs::File::create(&metrics_path)
    }
    .with_context(|| format!("opening {}", metrics_path.display()))?;

    let mut ccfg = CoordinatorConfig::new(config_hash_of(&cfg)?, WorldSize(world));
    ccfg.min_nodes = WorldSize(policy.min_nodes.unwrap_or(world));
    ccfg.max_restarts = policy.max_restarts;
    ccfg.save_every = Some(cfg.train.save_every).filter(|&s| s > 0);
    ccfg.hash_every = Some(policy.hash_every).filter(|&s| s > 0);
    ccfg.max_steps = cfg.train.max_steps;
    ccfg.transport = match policy.collective.as_str() {
        "nccl" => Transport::Nccl,
        _ => Transport::Quic,
    };
    ccfg.resume_from = Step(start.step);
    ccfg.elapsed_before = Duration::from_secs_f64(start.elapsed_s.max(0.0));
    if !(policy.heartbeat_timeout > 0.0 && policy.heartbeat_timeout.is_finite()) {
        bail!("--heartbeat-timeout must be a positive number of seconds");
    }
    ccfg.timeouts = Timeouts {
        heartbeat: Duration::from_secs_f64(policy.heartbeat_timeout),
        ..Timeouts::default()
    };
    let now = std::time::Instant::now();
    let core = Coordinator::new(ccfg, plan, now)?;
    let total = core.total_steps().0;
    let ring = ClusterIdentity::generate()?;
    let ControlPlane {
        listen,
        token,
        identity: control,
        fingerprint_file,
    } = control;
    let fingerprint = Fingerprint::of(&control.cert_chain[0]);
    let run_config_json = serde_json::to_string(&cfg)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the coordinator's runtime")?;
    let out_dir = cfg.output_dir.clone();
    let fingerprint_path = fingerprint_file.clone();
    let result = rt.block_on(async move {
        // Signals are caught from before the first line that says the coordinator is up,
        // so a Ctrl-C at any point after it is a clean stop (the task below reads them).
        use tokio::signal::unix::{signal, SignalKind};
        let mut sigint = signal(SignalKind::interrupt()).context("installing signal handler")?;
        let mut sigterm = signal(SignalKind::terminate()).context("installing signal handler")?;
        let listener = driver::bind(listen)?;
        let addr = listener.local_addr().context("reading the bound control address")?;
        eprintln!(
            "coordinator: listening on {addr}, waiting for {world} node(s); {total} steps; run folder {}",
            out_dir.display()
        );
        if let Some(f) = &fingerprint_file {
            write_atomically(f, format!("{fingerprint}\n").as_bytes())
                .with_context(|| format!("--fingerprint-file {}", f.display()))?;
        }
        eprintln!("coordinator: control certificate {fingerprint} (nodes pin it with --coordinator-fingerprint)");
        let (exits_tx, exits_rx) = tokio::sync::mpsc::unbounded_channel();
        started(addr, exits_tx)?;
        let (int_tx, int_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let (a, b) = (&mut sigint, &mut sigterm);
            let first = tokio::select! { _ = a.recv() => libc::SIGINT, _ = b.recv() => libc::SIGTERM };
            let first_at = std::time::Instant::now();
            let _ = int_tx.send(true);
            // A second signal ends the process at once, unless it is a launcher's echo
            // of the first (see `TERM_ECHO`).
            loop {
                let next = tokio::select! { _ = a.recv() => libc::SIGINT, _ = b.recv() => libc::SIGTERM };
                if super::is_term_echo(first, first_at, next) {
                    eprintln!(
                        "coordinator: another SIGTERM within {}s of the first: the same stop \
                         (a launcher's signal and its forwarding)",
                        super::TERM_ECHO.as_secs()
                    );
                    continue;
                }
                std::process::exit(130);
            }
        });
        let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel();
        let serve = tokio::spawn(driver::serve(
            core,
            listener,
            DriverConfig {
                token,
                control,
                ring,
                run_config_json,
            },
            ev_tx,
            int_rx,
            exits_rx,
        ));
        let mut progress = Progress::new(total, plain);
        while let Some(ev) = ev_rx.recv().await {
            match &ev {
                Event::StepCompleted(rec) => {
                    let line = metrics_line(rec)?;
                    writeln!(metrics, "{line}")
                        .with_context(|| format!("writing {}", metrics_path.display()))?;
                }
                // The steps after the checkpoint run again: drop their lines, as --resume
                // does, so metrics.jsonl still reads as one run.
                Event::Restarting { resume_from, .. } => {
                    drop(metrics);
                    drop(MetricsLog::resume(&metrics_path, resume_from.0)?);
                    metrics = std::fs::OpenOptions::new()
                        .append(true)
                        .open(&metrics_path)
                        .with_context(|| format!("opening {}", metrics_path.display()))?;
                }
                _ => {}
            }
            progress.event(&ev);
        }
        progress.finish();
        let outcome = serve.await.context("the coordinator task panicked")??;
        match outcome {
            Outcome::Completed { steps, last_checkpoint } => {
                eprintln!(
                    "done: {} steps; adapter: {}",
                    steps.0,
                    run_adapter(&out_dir, last_checkpoint.0)
                );
                Ok(())
            }
            Outcome::Interrupted { last_completed, last_checkpoint } => {
                if last_checkpoint.0 > 0 {
                    eprintln!(
                        "interrupted after step {}; last checkpoint: step {} (the same \
                         command with --resume continues from it)",
                        last_completed.0, last_checkpoint.0
                    );
                } else {
                    eprintln!(
                        "interrupted after step {}; no checkpoint was written yet",
                        last_completed.0
                    );
                }
                Ok(())
            }
            Outcome::Failed(e) => bail!("distributed run failed: {e}"),
        }
    });
    // The fingerprint names this coordinator only while it runs.
    if let Some(f) = fingerprint_path {
        let _ = std::fs::remove_file(f);
    }
    result
}

/// `--fingerprint-file`: checked before the slow start-up, and any earlier fingerprint in it
/// removed, so that a launcher waiting for the file never reads a stale one. Refuses to
/// replace anything but a regular file that holds a fingerprint (or nothing).
pub fn prepare_fingerprint_file(path: &Path) -> Result<()> {
    let flag = || format!("--fingerprint-file {}", path.display());
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_file() => {
            bail!(
                "{}: exists and is not a regular file; refusing to replace it",
                flag()
            )
        }
        Ok(_) => {
            let text = std::fs::read(path).with_context(flag)?;
            let text = String::from_utf8_lossy(&text);
            if !text.trim().is_empty() && text.trim().parse::<Fingerprint>().is_err() {
                bail!(
                    "{}: exists and does not hold a certificate fingerprint; refusing to \
                     replace it",
                    flag()
                );
            }
            std::fs::remove_file(path).with_context(flag)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(flag),
    }
    // The folder must take the file (written through a temporary file beside it).
    let tmp = tmp_path(path);
    std::fs::write(&tmp, b"")
        .with_context(|| format!("{}: cannot write {}", flag(), tmp.display()))?;
    let _ = std::fs::remove_file(&tmp);
    Ok(())
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    PathBuf::from(tmp)
}

/// One metrics.jsonl line: the record with its method-specific numbers (`extra`) as
/// top-level keys, as the one-process trainers write them.
fn metrics_line(rec: &StepRecord) -> Result<String> {
    let mut rec = rec.clone();
    let extra = std::mem::take(&mut rec.extra);
    let mut line = serde_json::to_string(&rec)?;
    // `…,"extra":{}}` → `…` + `,"key":value` per entry + `}` (field order kept).
    let tail = ",\"extra\":{}}";
    anyhow::ensure!(
        line.ends_with(tail),
        "unexpected metrics record layout: {line}"
    );
    line.truncate(line.len() - tail.len());
    // Like the one-process trainers, a step without an eval has no `eval_nll` key.
    if rec.eval_nll.is_none() {
        line = line.replacen(",\"eval_nll\":null", "", 1);
    }
    for (k, v) in extra {
        if !v.is_finite() {
            continue;
        }
        line.push(',');
        line.push_str(&serde_json::to_string(&k)?);
        line.push(':');
        line.push_str(&serde_json::to_string(&v)?);
    }
    line.push('}');
    Ok(line)
}

fn run_adapter(out: &std::path::Path, step: u64) -> String {
    out.join("checkpoints")
        .join(format!("step-{step}"))
        .join("adapter")
        .display()
        .to_string()
}

/// One progress bar (or log lines) for the whole run.
struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    last_line: Option<std::time::Instant>,
    /// Failed TLS handshakes so far, by the host they came from.
    failed_handshakes: std::collections::HashMap<String, u64>,
    /// Refusals so far, by reason.
    refusals: std::collections::HashMap<String, u64>,
}

impl Progress {
    fn new(total: u64, plain: bool) -> Self {
        let bar = (!plain).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{bar:30.cyan/blue} step {pos}/{len} {msg} eta {eta}")
                    .expect("valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(500));
            bar
        });
        Self {
            bar,
            total,
            last_line: None,
            failed_handshakes: Default::default(),
            refusals: Default::default(),
        }
    }

    fn say(&self, line: String) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn summary(r: &StepRecord) -> String {
        format!(
            "loss {} | {} tok/s | W={} | compute {:.3}s comm {:.3}s",
            r.loss
                .map(|l| format!("{l:.4}"))
                .unwrap_or_else(|| "-".into()),
            r.tokens_per_s
                .map(|t| format!("{t:.0}"))
                .unwrap_or_else(|| "-".into()),
            r.world_size.0,
            r.compute_s_max,
            r.comm_s_max,
        ) + &r
            .eval_nll
            .map(|e| format!(" | eval_nll {e:.4}"))
            .unwrap_or_default()
    }

    fn event(&mut self, ev: &Event) {
        match ev {
            Event::StepCompleted(r) => {
                if let Some(bar) = &self.bar {
                    bar.set_position(r.step.0);
                    bar.set_message(Self::summary(r));
                    if r.eval_nll.is_some() {
                        bar.println(format!("step {} | {}", r.step.0, Self::summary(r)));
                    }
                    return;
                }
                let due = self
                    .last_line
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(2));
                if due || r.step.0 == self.total || r.eval_nll.is_some() {
                    self.last_line = Some(std::time::Instant::now());
                    eprintln!("step {}/{} | {}", r.step.0, self.total, Self::summary(r));
                }
            }
            Event::Refused { node, reason } => {
                let extra = matches!(reason, Refusal::BadToken)
                    .then_some(" (check RINGTUNE_TOKEN)")
                    .unwrap_or("");
                let reason = format!("{reason}{extra}");
                if let Some(line) =
                    refusal_line(&mut self.refusals, &node.to_string(), &reason)
                {
                    self.say(line)
                }
            }
            Event::Registered { node, identity, standby } => self.say(format!(
                "coordinator: {node} registered from {}:{}{}",
                identity.host,
                identity.local_rank,
                if *standby { " (standby)" } else { "" }
            )),
            Event::RunStarted { generation, world_size, resume_from, .. } => self.say(format!(
                "coordinator: generation {} with {} rank(s), from step {}",
                generation.0, world_size.0, resume_from.0
            )),
            Event::CheckpointRecorded { step } => {
                self.say(format!("checkpoint: step {} (every rank's adapter hash agreed)", step.0))
            }
            Event::NodeFailed(f) => self.say(format!("coordinator: node failure: {f}")),
            Event::Restarting { resume_from, restart, max_restarts, .. } => self.say(format!(
                "coordinator: restarting all nodes from step {} (restart {restart} of {max_restarts})",
                resume_from.0
            )),
            Event::Left { node, reason } => self.say(format!("coordinator: {node} left: {reason}")),
            Event::CheckpointLost {
                step,
                last_checkpoint,
            } => self.say(format!(
                "coordinator: rank 0 had not confirmed the checkpoint of step {} (it was writing \
                 it); the last checkpoint is step {}",
                step.0, last_checkpoint.0
            )),
            Event::HandshakeFailed { peer, reason } => {
                if let Some(line) = failed_handshake_line(&mut self.failed_handshakes, peer, reason)
                {
                    self.say(line)
                }
            }
            Event::NodeInterrupted { node } => self.say(format!(
                "coordinator: {node} got a stop signal of its own (a preemption?); stopping the \
                 run as on Ctrl-C"
            )),
            Event::Interrupting { step } => self.say(format!(
                "coordinator: interrupted: finishing step {}, then saving a checkpoint after it \
                 (interrupt again to stop at once)",
                step.0
            )),
            Event::Stopping(reason) => self.say(format!("coordinator: stopping: {reason}")),
            Event::StopTimedOut { unacked } => self.say(format!(
                "coordinator: {} node(s) did not acknowledge the stop",
                unacked.len()
            )),
            Event::Ignored { .. } | Event::Finished(_) => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Counts one more occurrence of `key` in `seen`; returns the count when it is one to log:
/// each of the first three, then the 10th, 100th, … (a node retrying in a loop, or a
/// scanner, does not flood the log).
fn sparse(seen: &mut std::collections::HashMap<String, u64>, key: &str) -> Option<u64> {
    let n = seen.entry(key.to_string()).or_default();
    *n += 1;
    let n = *n;
    let mut m = n;
    while m >= 10 && m.is_multiple_of(10) {
        m /= 10;
    }
    (n <= 3 || m == 1).then_some(n)
}

/// The log line for a refused node, counted in `seen` by reason: a node that retries the
/// same refused registration every second (a duplicate GPU slot, say) is logged sparsely.
fn refusal_line(
    seen: &mut std::collections::HashMap<String, u64>,
    node: &str,
    reason: &str,
) -> Option<String> {
    let n = sparse(seen, reason)?;
    let count = match n {
        1 => String::new(),
        3 => " [the 3rd time; from now on only the 10th, 100th, … are logged]".to_string(),
        n => format!(" [the {n}th time]"),
    };
    Some(format!("coordinator: refused {node}: {reason}{count}"))
}

/// The log line for a failed TLS handshake, counted in `seen` by host: every one of the
/// first three from a host, then the 10th, 100th, …, so that a scanner or a node retrying
/// in a loop does not flood the log.
fn failed_handshake_line(
    seen: &mut std::collections::HashMap<String, u64>,
    peer: &str,
    reason: &str,
) -> Option<String> {
    let host = peer
        .parse::<SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| peer.to_string());
    let count = sparse(seen, &host)?;
    let count = match count {
        1 => String::new(),
        3 => format!(" [the 3rd from {host}; from now on only the 10th, 100th, … are logged]"),
        n => format!(" [failure {n} from {host}]"),
    };
    Some(format!(
        "coordinator: a connection from {peer} failed its TLS handshake ({reason}): a node \
         whose --coordinator-fingerprint or --coordinator-ca does not match this \
         coordinator's certificate, or not a ringtune node{count}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_refusals_are_logged_sparsely() {
        let mut seen = Default::default();
        let dup = "another node already registered as h1:0";
        let logged: Vec<String> = (1..=120)
            .filter_map(|i| refusal_line(&mut seen, &format!("node#{i}"), dup))
            .collect();
        assert_eq!(logged.len(), 5, "{logged:?}");
        assert_eq!(logged[0], format!("coordinator: refused node#1: {dup}"));
        assert!(
            logged[2].ends_with("[the 3rd time; from now on only the 10th, 100th, … are logged]")
        );
        assert!(
            logged[4].starts_with("coordinator: refused node#100: "),
            "{logged:?}"
        );
        // Another reason is counted on its own.
        assert!(refusal_line(&mut seen, "node#121", "wrong cluster token").is_some());
    }

    #[test]
    fn failed_handshakes_are_logged_sparsely_per_host() {
        let mut seen = Default::default();
        let logged: Vec<u64> = (1..=1000u64)
            .filter(|i| {
                failed_handshake_line(&mut seen, &format!("10.0.0.7:{}", 40000 + i), "bad")
                    .is_some()
            })
            .collect();
        assert_eq!(logged, [1, 2, 3, 10, 100, 1000]);
        // Another host starts its own count; the lines say which failure it is.
        let first = failed_handshake_line(&mut seen, "[::1]:5", "bad").unwrap();
        assert!(first.ends_with("or not a ringtune node"), "{first}");
        let tenth = (1..=10)
            .filter_map(|_| failed_handshake_line(&mut seen, "10.0.0.8:1", "x"))
            .last()
            .unwrap();
        assert!(tenth.contains("[failure 10 from 10.0.0.8]"), "{tenth}");
    }

    #[test]
    fn metrics_lines_lift_the_extra_numbers_to_top_level_keys() {
        let json = r#"{"step":3,"epoch":0,"loss":1.0,"lr":0.0001,"grad_norm":0.5,"tokens":10,
            "weight":8.0,"examples":5,"tokens_per_s":200.0,"elapsed_s":1.0,"generation":0,
            "world_size":2,"loss_sum":8.0,"wall_s":0.05,"compute_s_mean":0.1,"compute_s_max":0.1,
            "comm_s_mean":0.0,"comm_s_max":0.0,"eval_nll":null,
            "extra":{"reward_mean":0.25,"env/correct":0.5}}"#;
        let rec: StepRecord = serde_json::from_str(json).unwrap();
        let line = metrics_line(&rec).unwrap();
        assert!(
            line.starts_with(r#"{"step":3,"epoch":0,"loss":1.0,"#),
            "{line}"
        );
        assert!(
            line.ends_with(r#","env/correct":0.5,"reward_mean":0.25}"#),
            "{line}"
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(v.get("extra").is_none());
        // No eval this step: no `eval_nll` key (as the one-process trainers write it).
        assert!(v.get("eval_nll").is_none(), "{line}");
        let mut with_eval = rec.clone();
        with_eval.eval_nll = Some(1.5);
        let v: serde_json::Value =
            serde_json::from_str(&metrics_line(&with_eval).unwrap()).unwrap();
        assert_eq!(v["eval_nll"], 1.5);
    }
}
