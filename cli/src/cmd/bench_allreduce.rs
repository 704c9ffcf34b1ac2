//! `ringtune bench allreduce`: times the ring all-reduce between W local processes.
//!
//! The launcher makes a per-run cluster certificate and token, starts W copies of this
//! binary as hidden `allreduce-worker`s on 127.0.0.1 (the token travels in the environment,
//! never on the command line), and collects their per-iteration times. As in
//! `../shared/bench/allreduce_gloo.py`, an iteration's time is the maximum over ranks (a
//! collective ends when its slowest rank does), each iteration starts after a barrier, and
//! every result is checked exactly (rank r holds (r+1)·(i mod 7 + 1), so the sum is exact
//! in f32). busbw = algbw · 2(W−1)/W, GB = 1e9 bytes, as nccl-tests reports it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ringtune_collectives::auth::ClusterToken;
use ringtune_collectives::net::{
    self, NetConfig, TcpIoMode, Transport, DEFAULT_CHUNK_ELEMS, TCP_CHUNK_ELEMS,
};
use ringtune_collectives::tls::ClusterIdentity;
use ringtune_collectives::{Call, GradSync, Rank, WireDtype, WorldSize};

/// Environment variable that carries the cluster token to the workers.
const TOKEN_ENV: &str = "RINGTUNE_TOKEN";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Number of worker processes (ranks).
    #[arg(long, default_value_t = 2)]
    world: u32,
    /// Payload sizes in MiB, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    sizes_mib: Vec<u64>,
    /// Timed iterations per size.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Untimed iterations per size.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// One JSON object per size on stdout instead of a table.
    #[arg(long)]
    json: bool,
    /// quic, tcp-tls, or tcp-plain (no encryption; trusted networks only).
    #[arg(long, default_value = "quic")]
    transport: String,
    /// Elements per frame [default: 262144 for quic, 65536 for the TCP transports].
    #[arg(long)]
    chunk_elems: Option<usize>,
    /// Send gradients as bf16 (summed in f32).
    #[arg(long)]
    bf16: bool,
    /// TCP link driver: auto (inline unless each local rank has 3 cores), inline or threads.
    #[arg(long, default_value = "auto")]
    tcp_io: String,
    /// Per-collective timeout in seconds.
    #[arg(long, default_value_t = 120.0)]
    timeout_s: f64,
}

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    #[arg(long)]
    rank: u32,
    #[arg(long)]
    world: u32,
    /// Listen address of every rank, in rank order.
    #[arg(long, value_delimiter = ',')]
    peers: Vec<SocketAddr>,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    /// Trust roots (defaults to the certificate itself).
    #[arg(long)]
    ca: Option<PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = "1")]
    sizes_mib: Vec<u64>,
    #[arg(long, default_value_t = 10)]
    iters: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value = "quic")]
    transport: String,
    #[arg(long, default_value_t = DEFAULT_CHUNK_ELEMS)]
    chunk_elems: usize,
    #[arg(long)]
    bf16: bool,
    #[arg(long, default_value = "auto")]
    tcp_io: String,
    #[arg(long, default_value_t = 120_000)]
    timeout_ms: u64,
    #[arg(long, default_value_t = 30_000)]
    connect_timeout_ms: u64,
    /// Size in KiB instead of MiB (small, fast test payloads).
    #[arg(long)]
    sizes_in_kib: bool,
    /// Test hook: after connecting, send a bogus frame instead of running collectives
    /// (`oversized` or `malformed`), then wait.
    #[arg(long)]
    inject: Option<String>,
}

/// One size's result from one worker.
#[derive(Debug)]
struct WorkerResult {
    bytes: u64,
    times: Vec<f64>,
    /// CPU seconds this worker process (all its threads) spent inside each all-reduce.
    cpu: Vec<f64>,
    correct: bool,
}

/// CPU time of this process, all threads, in seconds.
fn process_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

pub fn run(args: Args) -> Result<()> {
    if args.world == 0 {
        bail!("--world must be at least 1");
    }
    let transport: Transport = args.transport.parse()?;
    // Every worker runs on this host, so all W ranks are local.
    let tcp_io = match transport {
        Transport::Quic => "-",
        _ => match args
            .tcp_io
            .parse::<TcpIoMode>()?
            .resolve(args.world as usize)
        {
            TcpIoMode::Inline => "inline",
            _ => "threads",
        },
    };
    let chunk_elems = args.chunk_elems.unwrap_or(match transport {
        Transport::Quic => DEFAULT_CHUNK_ELEMS,
        Transport::TcpTls | Transport::TcpPlain => TCP_CHUNK_ELEMS,
    });
    let dir = std::env::temp_dir().join(format!("ringtune-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let identity = ClusterIdentity::generate()?;
    let (cert, key) = identity.write_pem(&dir)?;
    let token = ClusterToken::generate()?;
    let peers = free_ports(args.world as usize)?;
    let peer_list = peers
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let sizes = args
        .sizes_mib
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let exe = std::env::current_exe().context("locating the ringtune binary")?;

    let mut children: Vec<Child> = Vec::new();
    for r in 0..args.world {
        let mut cmd = Command::new(&exe);
        cmd.arg("allreduce-worker")
            .args(["--rank", &r.to_string(), "--world", &args.world.to_string()])
            .args(["--peers", &peer_list, "--sizes-mib", &sizes])
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .args([
                "--iters",
                &args.iters.to_string(),
                "--warmup",
                &args.warmup.to_string(),
            ])
            .args([
                "--transport",
                &args.transport,
                "--chunk-elems",
                &chunk_elems.to_string(),
                "--tcp-io",
                &args.tcp_io,
            ])
            .args([
                "--timeout-ms",
                &((args.timeout_s * 1000.0) as u64).to_string(),
            ])
            .env(
                TOKEN_ENV,
                std::str::from_utf8(token.expose()).expect("generated tokens are hex"),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if args.bf16 {
            cmd.arg("--bf16");
        }
        children.push(
            cmd.spawn()
                .with_context(|| format!("starting worker rank {r}"))?,
        );
    }
    let load_before = loadavg();
    // Read every worker's stdout on its own thread so no pipe fills up.
    let readers: Vec<_> = children
        .iter_mut()
        .map(|c| {
            let out = c.stdout.take().expect("piped stdout");
            std::thread::spawn(move || {
                BufReader::new(out)
                    .lines()
                    .map_while(|l| l.ok())
                    .collect::<Vec<String>>()
            })
        })
        .collect();
    let mut per_rank = Vec::new();
    let mut failed = Vec::new();
    for (r, (mut c, rd)) in children.into_iter().zip(readers).enumerate() {
        let status = c.wait().with_context(|| format!("waiting for rank {r}"))?;
        let lines = rd.join().expect("reader thread");
        if !status.success() {
            failed.push(format!("rank {r} exited with {status}"));
        }
        per_rank.push(parse_worker(&lines).with_context(|| format!("output of rank {r}"))?);
    }
    let _ = std::fs::remove_dir_all(&dir);
    if !failed.is_empty() {
        bail!("workers failed: {}", failed.join("; "));
    }
    let w = args.world as f64;
    if !args.json {
        println!(
            "ringtune ring all-reduce, {} over 127.0.0.1, W={}, chunk {} elems, wire {}, \
             TCP links {tcp_io}",
            match transport {
                Transport::Quic => "QUIC (TLS 1.3)",
                Transport::TcpTls => "TCP+TLS (TLS 1.3 handshake, AES-128-GCM frames)",
                Transport::TcpPlain => "plain TCP (token proof only, NO encryption)",
            },
            args.world,
            chunk_elems,
            if args.bf16 { "bf16" } else { "f32" }
        );
        println!("| W | size | median ms | min ms | max ms | algbw GB/s | busbw GB/s | CPU ms (all ranks) | correct |");
        println!("|---|------|-----------|--------|--------|------------|------------|--------------------|---------|");
    }
    for (i, &mib) in args.sizes_mib.iter().enumerate() {
        let bytes = per_rank[0][i].bytes;
        let iters = per_rank[0][i].times.len();
        // Per iteration: the slowest rank's time.
        let mut t: Vec<f64> = (0..iters)
            .map(|k| per_rank.iter().map(|p| p[i].times[k]).fold(0.0, f64::max))
            .collect();
        let correct = per_rank.iter().all(|p| p[i].correct);
        // Per iteration: CPU seconds of all ranks together (what a core-starved host pays).
        let mut cpu: Vec<f64> = (0..iters)
            .map(|k| per_rank.iter().filter_map(|p| p[i].cpu.get(k)).sum())
            .collect();
        cpu.sort_by(f64::total_cmp);
        let cpu_median = cpu.get(iters / 2).copied().unwrap_or(f64::NAN);
        t.sort_by(f64::total_cmp);
        let median = if iters == 0 {
            f64::NAN
        } else if iters % 2 == 1 {
            t[iters / 2]
        } else {
            (t[iters / 2 - 1] + t[iters / 2]) / 2.0
        };
        let algbw = bytes as f64 / median / 1e9;
        let busbw = algbw * 2.0 * (w - 1.0) / w;
        if args.json {
            let o = serde_json::json!({
                "world": args.world, "bytes": bytes, "size_mib": mib, "median_s": median,
                "min_s": t.first(), "max_s": t.last(), "algbw_gbps": algbw, "busbw_gbps": busbw,
                "iters": iters, "correct": correct, "cpu_s_all_ranks": cpu_median, "transport": args.transport, "tcp_io": tcp_io, "wire": if args.bf16 { "bf16" } else { "f32" },
                "chunk_elems": chunk_elems, "tls": transport != Transport::TcpPlain, "loadavg1_before": load_before, "loadavg1_after": loadavg(),
            });
            println!("{o}");
        } else {
            println!(
                "| {} | {mib} MiB | {:.2} | {:.2} | {:.2} | {algbw:.3} | {busbw:.3} | {:.0} | {correct} |",
                args.world,
                median * 1e3,
                t.first().unwrap_or(&f64::NAN) * 1e3,
                t.last().unwrap_or(&f64::NAN) * 1e3,
                cpu_median * 1e3
            );
        }
        if !correct {
            bail!("all-reduce result wrong at {mib} MiB");
        }
    }
    Ok(())
}

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// Ports free for both TCP and UDP on 127.0.0.1 (released just before the workers bind).
fn free_ports(n: usize) -> Result<Vec<SocketAddr>> {
    let mut keep = Vec::new();
    let mut out = Vec::new();
    while out.len() < n {
        let t = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
        let addr = t.local_addr()?;
        if let Ok(u) = std::net::UdpSocket::bind(addr) {
            out.push(addr);
            keep.push((t, u));
        }
    }
    Ok(out)
}

fn parse_worker(lines: &[String]) -> Result<Vec<WorkerResult>> {
    let mut out = Vec::new();
    for l in lines.iter().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value =
            serde_json::from_str(l).with_context(|| format!("bad worker line {l:?}"))?;
        out.push(WorkerResult {
            bytes: v["bytes"].as_u64().context("bytes")?,
            times: v["times_s"]
                .as_array()
                .context("times_s")?
                .iter()
                .filter_map(|t| t.as_f64())
                .collect(),
            cpu: v["cpu_s"]
                .as_array()
                .map(|a| a.iter().filter_map(|t| t.as_f64()).collect())
                .unwrap_or_default(),
            correct: v["correct"].as_bool().context("correct")?,
        });
    }
    Ok(out)
}

pub fn run_worker(args: WorkerArgs) -> Result<()> {
    // Refused links are logged as warnings (never with the token); show them on stderr.
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(filter)
        .try_init();
    let rank = args.rank;
    let token = ClusterToken::from_env(TOKEN_ENV)?;
    let identity = ClusterIdentity::from_pem_files(&args.cert, &args.key, args.ca.as_deref())?;
    let peers = args.peers.clone();
    let listen = *peers
        .get(rank as usize)
        .with_context(|| format!("no address for rank {rank} in --peers"))?;
    let cfg = NetConfig {
        rank: Rank(rank),
        world: WorldSize(args.world),
        listen,
        reserved: None,
        peers,
        identity,
        token,
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        chunk_elems: args.chunk_elems,
        wire: if args.bf16 {
            WireDtype::Bf16
        } else {
            WireDtype::F32
        },
        transport: args.transport.parse()?,
        tcp_io: args.tcp_io.parse()?,
    };
    let mut sync = net::connect(cfg).with_context(|| format!("rank {rank}: joining the ring"))?;
    println!("READY {rank}");
    let timeout = Duration::from_millis(args.timeout_ms);

    if let Some(kind) = &args.inject {
        let bytes = match kind.as_str() {
            // Announces a 1 GiB frame: the peer must refuse it from the 4-byte prefix alone.
            "oversized" => (1u32 << 30).to_le_bytes().to_vec(),
            // A well-sized frame whose header is garbage.
            "malformed" => {
                let mut b = 100u32.to_le_bytes().to_vec();
                b.extend_from_slice(&[0xAB; 100]);
                b
            }
            other => bail!("unknown --inject {other}"),
        };
        sync.driver_mut().inject_raw(bytes)?;
        std::thread::sleep(timeout);
        return Ok(());
    }

    let unit = if args.sizes_in_kib {
        1u64 << 10
    } else {
        1u64 << 20
    };
    let mut step = 0u64;
    for &size in &args.sizes_mib {
        let n = (size * unit / 4) as usize;
        let pattern: Vec<f32> = (0..n).map(|i| (i % 7 + 1) as f32).collect();
        let src: Vec<f32> = pattern.iter().map(|p| p * (rank + 1) as f32).collect();
        let tri = (args.world * (args.world + 1) / 2) as f32;
        let mut buf = vec![0.0f32; n];
        let mut times = Vec::with_capacity(args.iters);
        let mut cpu = Vec::with_capacity(args.iters);
        let mut correct = true;
        for it in 0..args.warmup + args.iters {
            buf.copy_from_slice(&src);
            sync.barrier(Call::new(step, timeout))
                .with_context(|| format!("rank {rank}: barrier"))?;
            let c0 = process_cpu_s();
            let t0 = Instant::now();
            sync.all_reduce_sum(&mut buf, Call::new(step, timeout))
                .with_context(|| format!("rank {rank}: all-reduce of {size} units"))?;
            let dt = t0.elapsed().as_secs_f64();
            let dc = process_cpu_s() - c0;
            step += 1;
            if args.bf16 {
                // bf16 carries 8 significant bits: check closeness, not equality.
                correct &= buf
                    .iter()
                    .zip(&pattern)
                    .all(|(b, p)| (b - p * tri).abs() <= (p * tri).abs() / 64.0);
            } else {
                correct &= buf.iter().zip(&pattern).all(|(b, p)| *b == p * tri);
            }
            if it >= args.warmup {
                times.push(dt);
                cpu.push(dc);
            }
        }
        println!(
            "{}",
            serde_json::json!({"rank": rank, "bytes": size * unit, "times_s": times, "cpu_s": cpu, "correct": correct})
        );
    }
    sync.barrier(Call::new(step, timeout))
        .context("final barrier")?;
    sync.driver_mut().close(Duration::from_secs(5));
    Ok(())
}
