//! `ringtune node --coordinator HOST:PORT`: one rank of a distributed run. Gets the run
//! config and the ring certificate from the coordinator (after both proved the cluster
//! token), trains the steps it is given, and exits when the coordinator stops it — or
//! with an error naming the coordinator when it goes away.
//!
//! Launcher variables (Slurm, torchrun) give the coordinator's address and this
//! process's GPU slot when the flags do not.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use ringtune_config::{Device, RunConfig};
use ringtune_coordinator::wire::{ControlTrust, Fingerprint};
use ringtune_coordinator::{LaunchEnv, NodeIdentity};
use ringtune_node::distributed::{run_node, NodeExit, NodeOptions};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The coordinator's control address (default: from MASTER_ADDR/MASTER_PORT or the
    /// Slurm variables).
    #[arg(long, value_name = "HOST:PORT")]
    pub coordinator: Option<String>,
    /// File holding the cluster token (else the RINGTUNE_TOKEN environment variable).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Accept only the coordinator certificate with this SHA-256 fingerprint (the
    /// coordinator prints it at start-up: `sha256:…`; OpenSSL's colon form works too).
    /// Else RINGTUNE_COORDINATOR_FINGERPRINT, unless --coordinator-ca is given.
    #[arg(long, value_name = "SHA256", conflicts_with = "coordinator_ca")]
    pub coordinator_fingerprint: Option<Fingerprint>,
    /// Accept only a coordinator certificate issued by a CA in this PEM file for the host
    /// name in --coordinator (as `coordinator --tls-cert` presents it). Else
    /// RINGTUNE_COORDINATOR_CA, unless --coordinator-fingerprint is given.
    #[arg(long, value_name = "FILE")]
    pub coordinator_ca: Option<PathBuf>,
    /// The compute device for this node, overriding the config's: cpu, cuda[:N], or auto
    /// (this slot's GPU, see --local-rank, when built with CUDA and one is there; else cpu).
    #[arg(long, value_name = "DEVICE", value_parser = parse_device)]
    pub device: Option<Device>,
    /// Register with this config's hash: the coordinator refuses the node if the run's
    /// config differs (a node of another run).
    #[arg(long, value_name = "CONFIG")]
    pub config: Option<PathBuf>,
    /// Overrides of --config's keys, as the coordinator was given them (repeatable; TOML
    /// values), so that the hashes can match.
    #[arg(long = "set", value_name = "KEY=VALUE", requires = "config")]
    pub set: Vec<String>,
    /// This process's slot on its host (default: LOCAL_RANK / SLURM_LOCALID, else 0).
    #[arg(long, value_name = "N")]
    pub local_rank: Option<u32>,
    /// Compute threads (default, or 0: the machine's cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Seconds to keep retrying the first connection to the coordinator.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    pub connect_timeout: u64,
    /// Seconds one gradient all-reduce may take (waiting for the slowest rank included).
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub collective_timeout: u64,
}

pub(crate) fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|h| !h.is_empty() && h.len() <= 255)
        .unwrap_or_else(|| "localhost".to_string())
}

/// How long a node outlives a SIGINT/SIGTERM waiting for the coordinator's stop.
const SIGNAL_GRACE: Duration = Duration::from_secs(60);

/// SIGINT/SIGTERM: a launcher (`scancel`, Ctrl-C on `srun`) signals every task at once,
/// the coordinator included, which then lets the step in flight finish and has rank 0
/// save after it. So the first signal does not end a node: it keeps serving the
/// coordinator until told to stop, for at most [`SIGNAL_GRACE`]. A second signal ends it
/// at once, except a SIGTERM that echoes a first one (`scancel` and `srun`'s forwarding:
/// see [`super::TERM_ECHO`]).
fn outlive_first_signal() -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("installing signal handler")?;
    std::thread::spawn(move || {
        let mut first: Option<(i32, std::time::Instant)> = None;
        for sig in signals.forever() {
            if let Some((f, at)) = first {
                if super::is_term_echo(f, at, sig) {
                    eprintln!(
                        "ringtune node: another SIGTERM within {}s of the first: the same stop",
                        super::TERM_ECHO.as_secs()
                    );
                    continue;
                }
                std::process::exit(128 + sig);
            }
            first = Some((sig, std::time::Instant::now()));
            ringtune_node::distributed::request_stop();
            eprintln!(
                "ringtune node: got signal {sig}; asking the coordinator to stop the run after \
                 the step in flight (it saves a checkpoint first) and carrying on until it does, \
                 at most {}s; a second signal exits at once",
                SIGNAL_GRACE.as_secs()
            );
            std::thread::spawn(move || {
                std::thread::sleep(SIGNAL_GRACE);
                eprintln!(
                    "ringtune node: not stopped within {}s of the signal; exiting",
                    SIGNAL_GRACE.as_secs()
                );
                std::process::exit(128 + sig);
            });
        }
    });
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    ringtune_model::init_cpu_runtime(args.threads);
    outlive_first_signal()?;
    let launch = LaunchEnv::from_process_env()?;
    let coordinator = match (&args.coordinator, &launch) {
        (Some(c), _) => c.clone(),
        (None, Some(l)) => l.coordinator_addr.to_string(),
        (None, None) if std::env::var_os("MASTER_ADDR").is_some() => anyhow::bail!(
            "no coordinator address: MASTER_ADDR is set, but it is read only under torchrun \
             (RANK and WORLD_SIZE set, with MASTER_PORT) or Slurm (SLURM_PROCID set); pass \
             --coordinator HOST:PORT"
        ),
        (None, None) => anyhow::bail!(
            "no coordinator address: pass --coordinator HOST:PORT (or run under Slurm/torchrun)"
        ),
    };
    let token = super::coordinator::token_from(args.token_file.as_ref())?;
    let coordinator_trust = coordinator_trust(&args)?;
    let own_config = args
        .config
        .as_ref()
        .map(|p| RunConfig::load_with_overrides(p, &args.set))
        .transpose()?;
    let identity = NodeIdentity {
        host: host_name(),
        local_rank: args
            .local_rank
            .or(launch.as_ref().map(|l| l.local_rank))
            .unwrap_or(0),
        launch_rank: launch.as_ref().map(|l| l.rank),
    };
    // `auto` is made concrete here, with this node's slot, so the model and NCCL agree on
    // the GPU even when the slot came from --local-rank rather than the environment.
    let device = match args.device {
        Some(Device::Auto) => Some(
            ringtune_node::trainer::resolve_device(Device::Auto, identity.local_rank as usize)
                .context("--device auto")?,
        ),
        d => d,
    };
    let exit = run_node(NodeOptions {
        coordinator: coordinator.clone(),
        token,
        identity,
        device,
        own_config,
        coordinator_trust,
        connect_timeout: connect_timeout(args.connect_timeout),
        collective_timeout: Duration::from_secs(args.collective_timeout),
        launch_world: launch.as_ref().map(|l| {
            let var = match l.launcher {
                ringtune_coordinator::launch::Launcher::Torchrun => "WORLD_SIZE",
                ringtune_coordinator::launch::Launcher::Slurm => "SLURM_NTASKS",
            };
            (l.world_size, var)
        }),
    })
    .with_context(|| {
        let from = match (&args.coordinator, &launch) {
            (None, Some(l)) => match l.launcher {
                ringtune_coordinator::launch::Launcher::Torchrun => {
                    ", from MASTER_ADDR and MASTER_PORT"
                }
                ringtune_coordinator::launch::Launcher::Slurm => {
                    ", the first host of SLURM_NODELIST (pass --coordinator to name another)"
                }
            },
            _ => "",
        };
        format!("node (coordinator {coordinator}{from})")
    })?;
    match exit {
        NodeExit::Finished | NodeExit::Interrupted => Ok(()),
    }
}

/// `--connect-timeout`, capped at [`ringtune_node::distributed::REJOIN_CONNECT`] in a node
/// that restarted itself to rejoin (a coordinator that died meanwhile is not waited for
/// the full first-connect time).
fn connect_timeout(secs: u64) -> Duration {
    let t = Duration::from_secs(secs);
    if std::env::var_os(ringtune_node::distributed::REJOIN_VAR).is_some() {
        let t = t.min(ringtune_node::distributed::REJOIN_CONNECT);
        eprintln!(
            "ringtune node: rejoining after a restart: trying the coordinator for at most {}s",
            t.as_secs()
        );
        return t;
    }
    t
}

/// How this node checks the coordinator's certificate: a flag, else the environment (an
/// empty variable counts as unset; a flag overrides either variable).
fn coordinator_trust(args: &Args) -> Result<ControlTrust> {
    const FP_VAR: &str = "RINGTUNE_COORDINATOR_FINGERPRINT";
    const CA_VAR: &str = "RINGTUNE_COORDINATOR_CA";
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let trust = match (&args.coordinator_fingerprint, &args.coordinator_ca) {
        (Some(f), _) => ControlTrust::Fingerprint(*f),
        (None, Some(ca)) => ControlTrust::ca_file(ca).context("--coordinator-ca")?,
        (None, None) => match (var(FP_VAR), var(CA_VAR)) {
            (Some(_), Some(_)) => anyhow::bail!(
                "both {FP_VAR} and {CA_VAR} are set: a node pins the coordinator's \
                 certificate one way (unset one, or pass --coordinator-fingerprint or \
                 --coordinator-ca, which overrides both)"
            ),
            (Some(f), None) => {
                let f = f.to_string_lossy();
                ControlTrust::Fingerprint(f.parse().map_err(|e| anyhow::anyhow!("{FP_VAR}: {e}"))?)
            }
            (None, Some(ca)) => ControlTrust::ca_file(std::path::Path::new(&ca)).context(CA_VAR)?,
            (None, None) => ControlTrust::TokenOnly,
        },
    };
    // (A CA pin's host is checked where the node dials, before its first try.)
    match &trust {
        ControlTrust::TokenOnly => eprintln!(
            "ringtune node: not pinning the coordinator's certificate: the cluster token alone \
             authenticates it (pass --coordinator-fingerprint from its start-up line, or \
             --coordinator-ca)"
        ),
        ControlTrust::Ca { roots, file } => {
            for root in roots {
                if let Some(p) = ringtune_collectives::tls::Validity::problem_now(root, 0) {
                    eprintln!(
                        "ringtune node: warning: a CA certificate in {file} {p}: the coordinator's \
                         certificate will not verify against it"
                    );
                }
            }
        }
        ControlTrust::Fingerprint(_) => {}
    }
    Ok(trust)
}

/// `--device` values: `cpu`, `cuda`, `cuda:N`, `auto` (as `model.device` in a config).
pub(crate) fn parse_device(s: &str) -> std::result::Result<Device, String> {
    s.parse()
}
