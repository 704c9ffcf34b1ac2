//! Ring all-reduce between real `ringtune` processes on 127.0.0.1 (QUIC and TCP+TLS):
//! correctness for W = 2, 3, 4; kill -9 mid-collective; wrong token; untrusted certificate;
//! oversized and malformed frames.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ringtune_collectives::tls::ClusterIdentity;

const BIN: &str = env!("CARGO_BIN_EXE_ringtune");
const TOKEN: &str = "test-token-0123456789abcdef";

fn free_ports(n: usize) -> Vec<SocketAddr> {
    let mut keep = Vec::new();
    let mut out = Vec::new();
    while out.len() < n {
        let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = t.local_addr().unwrap();
        if let Ok(u) = std::net::UdpSocket::bind(a) {
            out.push(a);
            keep.push((t, u));
        }
    }
    out
}

fn identity(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    ClusterIdentity::generate().unwrap().write_pem(&d).unwrap()
}

struct Worker {
    child: Child,
}

#[allow(clippy::too_many_arguments)]
fn worker(
    rank: usize,
    peers: &[SocketAddr],
    cert: &(PathBuf, PathBuf),
    token: &str,
    transport: &str,
    extra: &[&str],
) -> Worker {
    let peer_list = peers
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let child = Command::new(BIN)
        .arg("allreduce-worker")
        .args([
            "--rank",
            &rank.to_string(),
            "--world",
            &peers.len().to_string(),
            "--peers",
            &peer_list,
        ])
        .arg("--cert")
        .arg(&cert.0)
        .arg("--key")
        .arg(&cert.1)
        .args([
            "--transport",
            transport,
            "--connect-timeout-ms",
            "2500",
            "--chunk-elems",
            "65536",
        ])
        .args(extra)
        .env("RINGTUNE_TOKEN", token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Worker { child }
}

/// Waits for exit (bounded) and returns (success, stdout, stderr, seconds).
fn finish(mut w: Worker, limit: Duration) -> (bool, String, String, f64) {
    let t0 = Instant::now();
    loop {
        if let Some(st) = w.child.try_wait().unwrap() {
            let mut out = String::new();
            let mut err = String::new();
            w.child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            w.child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (st.success(), out, err, t0.elapsed().as_secs_f64());
        }
        if t0.elapsed() > limit {
            let _ = w.child.kill();
            panic!("worker still running after {limit:?}: a hang");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn bench_json(world: u32, transport: &str) -> Vec<serde_json::Value> {
    let out = Command::new(BIN)
        .args([
            "bench",
            "allreduce",
            "--world",
            &world.to_string(),
            "--sizes-mib",
            "1,3",
            "--iters",
            "2",
            "--warmup",
            "0",
        ])
        .args([
            "--json",
            "--transport",
            transport,
            "--chunk-elems",
            "65536",
            "--timeout-s",
            "20",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn processes_sum_correctly_for_w_2_3_4() {
    for (world, transport) in [(2, "quic"), (3, "quic"), (4, "quic"), (3, "tcp-tls")] {
        let rows = bench_json(world, transport);
        assert_eq!(rows.len(), 2);
        for r in rows {
            // The workers check every element exactly; `correct` is their verdict.
            assert_eq!(r["correct"], true, "{r}");
            assert_eq!(r["world"], world);
            assert!(r["busbw_gbps"].as_f64().unwrap() > 0.0);
        }
    }
}

fn kill_mid_collective(transport: &str) {
    let dir = tempfile::tempdir().unwrap();
    let cert = identity(dir.path(), "c");
    let peers = free_ports(3);
    let extra = [
        "--sizes-mib",
        "8",
        "--iters",
        "100000",
        "--warmup",
        "0",
        "--timeout-ms",
        "3000",
    ];
    let mut ws: Vec<Worker> = (0..3)
        .map(|r| worker(r, &peers, &cert, TOKEN, transport, &extra))
        .collect();
    for w in &mut ws {
        let mut line = String::new();
        BufReader::new(w.child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("READY"), "{line}");
    }
    std::thread::sleep(Duration::from_millis(400)); // collectives are running now
    let mut victim = ws.remove(1);
    victim.child.kill().unwrap(); // SIGKILL
    victim.child.wait().unwrap();
    for (r, w) in [0usize, 2].into_iter().zip(ws) {
        let (ok, _, err, secs) = finish(w, Duration::from_secs(15));
        assert!(!ok, "rank {r} should fail");
        assert!(
            secs < 6.0,
            "rank {r} took {secs:.1}s to notice (timeout 3s)"
        );
        assert!(
            err.contains(&format!("rank {r}")) && err.contains("seq"),
            "rank {r}: {err}"
        );
    }
}

#[test]
fn a_killed_process_fails_the_others_within_the_timeout_quic() {
    kill_mid_collective("quic");
}

#[test]
fn a_killed_process_fails_the_others_within_the_timeout_tcp() {
    kill_mid_collective("tcp-tls");
}

#[test]
fn wrong_token_and_untrusted_certificate_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cert = identity(dir.path(), "good");
    let foreign = identity(dir.path(), "foreign");
    let extra = [
        "--sizes-in-kib",
        "--sizes-mib",
        "4",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--timeout-ms",
        "3000",
    ];
    for transport in ["quic", "tcp-tls"] {
        // Rank 1 holds the wrong token.
        let peers = free_ports(2);
        let w0 = worker(0, &peers, &cert, TOKEN, transport, &extra);
        let w1 = worker(
            1,
            &peers,
            &cert,
            "wrong-token-0123456789",
            transport,
            &extra,
        );
        let (ok0, out0, err0, _) = finish(w0, Duration::from_secs(20));
        let (ok1, out1, err1, _) = finish(w1, Duration::from_secs(20));
        assert!(!ok0 && !ok1, "{transport}: both must fail");
        assert!(
            !out0.contains("READY") && !out1.contains("READY"),
            "{transport}: no link may come up"
        );
        assert!(
            err0.contains("refused ring link") && err0.contains("bad cluster token proof"),
            "{transport}: {err0}"
        );
        assert!(err1.contains("refused by the peer"), "{transport}: {err1}");
        for e in [&err0, &err1] {
            assert!(
                !e.contains(TOKEN) && !e.contains("wrong-token-0123456789"),
                "token leaked: {e}"
            );
        }
        // Rank 1 presents a certificate the cluster does not trust (right token).
        let peers = free_ports(2);
        let w0 = worker(0, &peers, &cert, TOKEN, transport, &extra);
        let w1 = worker(1, &peers, &foreign, TOKEN, transport, &extra);
        let (ok0, out0, err0, _) = finish(w0, Duration::from_secs(20));
        let (ok1, out1, err1, _) = finish(w1, Duration::from_secs(20));
        assert!(
            !ok0 && !ok1 && !out0.contains("READY") && !out1.contains("READY"),
            "{transport}: {err0}\n{err1}"
        );
        assert!(
            err0.contains("TLS handshake failed") || err1.contains("TLS handshake failed"),
            "{transport}: {err0}\n{err1}"
        );
        assert!(
            err0.to_lowercase().contains("certificate")
                || err1.to_lowercase().contains("certificate"),
            "{transport}: {err0}\n{err1}"
        );
    }
}

#[test]
fn oversized_and_malformed_frames_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let cert = identity(dir.path(), "c");
    for (inject, expect) in [
        ("oversized", "exceeds the limit"),
        ("malformed", "bad frame magic"),
    ] {
        let peers = free_ports(2);
        let base = [
            "--sizes-in-kib",
            "--sizes-mib",
            "64",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--timeout-ms",
            "3000",
        ];
        let mut rogue_args = base.to_vec();
        rogue_args.extend(["--inject", inject]);
        let rogue = worker(0, &peers, &cert, TOKEN, "quic", &rogue_args);
        let victim = worker(1, &peers, &cert, TOKEN, "quic", &base);
        let (ok, _, err, secs) = finish(victim, Duration::from_secs(20));
        let _ = finish(rogue, Duration::from_secs(20));
        assert!(!ok, "{inject}: victim must fail");
        assert!(
            err.contains(expect) && err.contains("rank 1") && err.contains("from rank 0"),
            "{inject}: {err}"
        );
        assert!(secs < 3.0, "{inject}: rejected only after {secs:.1}s");
    }
}
