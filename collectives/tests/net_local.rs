//! The network transports in one process: every rank on its own thread, real sockets on
//! 127.0.0.1, real TLS. (Process-level tests, with kill -9, live in cli/tests.)

use std::net::SocketAddr;
use std::time::Duration;

use ringtune_collectives::auth::ClusterToken;
use ringtune_collectives::net::{connect, NetConfig, NetSync, TcpIoMode, Transport};
use ringtune_collectives::tls::ClusterIdentity;
use ringtune_collectives::{Call, Error, GradSync, Rank, WireDtype, WorldSize};

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

fn config(
    rank: u32,
    peers: &[SocketAddr],
    id: &ClusterIdentity,
    token: &ClusterToken,
    (transport, tcp_io): (Transport, TcpIoMode),
    wire: WireDtype,
) -> NetConfig {
    NetConfig {
        rank: Rank(rank),
        world: WorldSize(peers.len() as u32),
        listen: peers[rank as usize],
        reserved: None,
        peers: peers.to_vec(),
        identity: id.clone(),
        token: token.clone(),
        connect_timeout: Duration::from_secs(5),
        chunk_elems: 1000,
        wire,
        transport,
        tcp_io,
    }
}

/// Every way a TCP transport can run: both transports, both link drivers.
const TCP: [(Transport, TcpIoMode); 4] = [
    (Transport::TcpTls, TcpIoMode::Inline),
    (Transport::TcpTls, TcpIoMode::Threads),
    (Transport::TcpPlain, TcpIoMode::Inline),
    (Transport::TcpPlain, TcpIoMode::Threads),
];
const QUIC: (Transport, TcpIoMode) = (Transport::Quic, TcpIoMode::Auto);

/// Runs `body` on every rank of a fresh cluster, each on its own thread.
fn on_cluster<T: Send + 'static>(
    world: u32,
    transport: (Transport, TcpIoMode),
    body: impl Fn(NetSync) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    on_cluster_with(world, transport, WireDtype::F32, body)
}

/// [`on_cluster`] with gradients sent as `wire`.
fn on_cluster_with<T: Send + 'static>(
    world: u32,
    transport: (Transport, TcpIoMode),
    wire: WireDtype,
    body: impl Fn(NetSync) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let peers = free_ports(world as usize);
    let id = ClusterIdentity::generate().unwrap();
    let token = ClusterToken::generate().unwrap();
    let handles: Vec<_> = (0..world)
        .map(|r| {
            let cfg = config(r, &peers, &id, &token, transport, wire);
            let body = body.clone();
            std::thread::spawn(move || {
                body(connect(cfg).unwrap_or_else(|e| panic!("rank {r}: {e}")))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn check_collectives(transport: (Transport, TcpIoMode), world: u32) {
    check_collectives_with(transport, world, WireDtype::F32)
}

/// Every value below is a small integer, exact in bf16 too, so the checks are exact on
/// either wire.
fn check_collectives_with(transport: (Transport, TcpIoMode), world: u32, wire: WireDtype) {
    let results = on_cluster_with(world, transport, wire, move |mut s: NetSync| {
        let r = s.rank().0 as f32;
        let call = Call::new(1, Duration::from_secs(10));
        // Uneven length, several chunks per segment.
        let mut a: Vec<f32> = (0..7_001).map(|i| (i % 13) as f32 * (r + 1.0)).collect();
        s.all_reduce_sum(&mut a, call).unwrap();
        let mut empty: Vec<f32> = Vec::new();
        s.all_reduce_sum(&mut empty, call).unwrap();
        let mut b = vec![r; 2_500];
        s.broadcast(&mut b, Rank(2 % s.world_size().0), call)
            .unwrap();
        s.barrier(call).unwrap();
        let mut x = vec![1.0f32; 10];
        let mut y = vec![r; 3_000];
        let mut z = vec![2.0f32; 5];
        s.all_reduce_sum_fused(&mut [&mut x, &mut y, &mut z], 64, call)
            .unwrap();
        (a, b, x, y, z, s.next_seq().0)
    });
    let tri = (world * (world + 1) / 2) as f32;
    for (a, b, x, y, z, seq) in results {
        assert!(a
            .iter()
            .enumerate()
            .all(|(i, &v)| v == (i % 13) as f32 * tri));
        assert!(b.iter().all(|&v| v == 2.0 % world as f32));
        assert!(
            x.iter().all(|&v| v == world as f32)
                && y.iter().all(|&v| v == tri - world as f32)
                && z.iter().all(|&v| v == 2.0 * world as f32)
        );
        // 2 all-reduces (the empty one counts too) + broadcast + barrier + 3 fused
        // collectives: [x], then y (over the bucket size) alone, then [z].
        assert_eq!(seq, 7);
    }
}

#[test]
fn tcp_collectives_are_correct() {
    for t in TCP {
        check_collectives(t, 3);
        check_collectives(t, 2);
    }
}

/// The bf16 wire encodes every payload into the frame (nothing is sent from the buffer in
/// place): both drivers, both TCP transports.
#[test]
fn tcp_collectives_are_correct_on_a_bf16_wire() {
    for t in TCP {
        check_collectives_with(t, 3, WireDtype::Bf16);
    }
}

#[test]
fn quic_collectives_are_correct() {
    check_collectives(QUIC, 3);
}

#[test]
fn a_peer_that_leaves_fails_its_neighbours_and_poisons_the_communicator() {
    for t in TCP {
        a_peer_leaves(t);
    }
}

fn a_peer_leaves(transport: (Transport, TcpIoMode)) {
    let results = on_cluster(3, transport, |mut s: NetSync| {
        let call = Call::new(4, Duration::from_secs(3));
        if s.rank() == Rank(1) {
            return None; // drops its links: a process that died between collectives
        }
        let mut v = vec![1.0f32; 50_000];
        let t0 = std::time::Instant::now();
        let e = s.all_reduce_sum(&mut v, call).unwrap_err();
        let again = s.barrier(call).unwrap_err();
        Some((e, t0.elapsed(), again))
    });
    for (r, res) in results.into_iter().enumerate() {
        let Some((e, took, again)) = res else {
            continue;
        };
        assert!(took < Duration::from_secs(5), "rank {r} took {took:?}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("rank {r}")) && msg.contains("seq 0") && msg.contains("step 4"),
            "{msg}"
        );
        assert!(matches!(again, Error::Poisoned { .. }), "{again}");
    }
}

#[test]
fn a_wrong_token_or_a_foreign_certificate_is_refused() {
    let peers = free_ports(2);
    let id = ClusterIdentity::generate().unwrap();
    let token = ClusterToken::generate().unwrap();
    for (bad_id, bad_token) in [
        (id.clone(), ClusterToken::generate().unwrap()),
        (ClusterIdentity::generate().unwrap(), token.clone()),
    ] {
        // tcp-plain has no certificates, so only the token case applies to it.
        let plain = (bad_id.cert_chain == id.cert_chain).then_some(Transport::TcpPlain);
        for transport in [Transport::TcpTls, Transport::Quic]
            .into_iter()
            .chain(plain)
            .map(|t| (t, TcpIoMode::Auto))
        {
            let peers = free_ports(2);
            let mut good = config(0, &peers, &id, &token, transport, WireDtype::F32);
            let mut bad = config(1, &peers, &bad_id, &bad_token, transport, WireDtype::F32);
            good.connect_timeout = Duration::from_secs(1);
            bad.connect_timeout = Duration::from_secs(1);
            let h = std::thread::spawn(move || connect(bad).map(|_| ()));
            let g = connect(good).map(|_| ());
            let b = h.join().unwrap();
            let (g, b) = (g.unwrap_err().to_string(), b.unwrap_err().to_string());
            assert!(g.contains("rank 0: link with"), "{g}");
            assert!(b.contains("rank 1: link with"), "{b}");
        }
    }
    let _ = peers;
}

/// A rank can have received every frame of a collective while its own last frames still
/// wait for room in the link's queue; meanwhile its left neighbour may already be sending
/// the next collective. Those frames must wait, not be read early (they once were, and
/// surfaced as "got a frame for seq N+1" under scheduling pressure). Many small pieces and
/// back-to-back collectives make that window common.
#[test]
fn back_to_back_collectives_with_full_send_queues() {
    for t in TCP {
        back_to_back(t);
    }
}

fn back_to_back(transport: (Transport, TcpIoMode)) {
    let results = on_cluster(4, transport, |mut s: NetSync| {
        let r = s.rank().0 as f32 + 1.0;
        for step in 0..40u64 {
            let call = Call::new(step, Duration::from_secs(20));
            let mut v: Vec<f32> = (0..60_000).map(|i| (i % 5) as f32 * r).collect();
            s.all_reduce_sum(&mut v, call).map_err(|e| e.to_string())?;
            if !v
                .iter()
                .enumerate()
                .all(|(i, &x)| x == (i % 5) as f32 * 10.0)
            {
                return Err(format!("wrong sum at step {step}"));
            }
            if step % 4 == 0 {
                s.barrier(call).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    });
    for (r, res) in results.into_iter().enumerate() {
        assert!(res.is_ok(), "rank {r}: {res:?}");
    }
}

/// A neighbour that is connected but stops reading: the sender's socket fills up in the
/// middle of a frame (for plain TCP, one written straight from the gradient buffer), the
/// collective times out with rank and sequence, and the communicator is poisoned; nothing
/// hangs or panics when the half-sent frame is dropped with it.
#[test]
fn a_neighbour_that_stops_reading_times_out_a_sender_stuck_mid_frame() {
    for transport in [TCP[0], TCP[2]] {
        let results = on_cluster(2, transport, |mut s: NetSync| {
            if s.rank() == Rank(1) {
                // Alive and connected, but never reads; leave after the other rank gave up.
                std::thread::sleep(Duration::from_secs(3));
                return None;
            }
            let mut v = vec![1.0f32; 32 << 20];
            let t0 = std::time::Instant::now();
            let e = s
                .all_reduce_sum(&mut v, Call::new(9, Duration::from_secs(1)))
                .unwrap_err();
            let again = s.barrier(Call::new(9, Duration::from_secs(1))).unwrap_err();
            Some((e, t0.elapsed(), again))
        });
        let (e, took, again) = results[0].as_ref().unwrap();
        let msg = e.to_string();
        assert!(
            *took < Duration::from_secs(3),
            "{transport:?} took {took:?}"
        );
        assert!(
            msg.contains("rank 0") && msg.contains("seq 0") && msg.contains("timed out"),
            "{transport:?}: {msg}"
        );
        assert!(matches!(again, Error::Poisoned { .. }), "{again}");
    }
}

/// A reserved port (`ReservedPort`, what a node holds from its registration until its ring
/// starts) keeps the address from every other socket, and the ring listens on it: the
/// reserving socket's duplicate, no second bind. Then a second ring (the next generation)
/// on the same reserved ports works too.
#[test]
fn rings_listen_on_ports_reserved_ahead() {
    use ringtune_collectives::net::ReservedPort;
    use std::sync::Arc;
    for transport in [QUIC, TCP[0], TCP[2]] {
        let reserved: Vec<Arc<ReservedPort>> = (0..3)
            .map(|_| {
                Arc::new(ReservedPort::bind("127.0.0.1".parse().unwrap(), transport.0).unwrap())
            })
            .collect();
        let peers: Vec<SocketAddr> = reserved.iter().map(|r| r.local_addr().unwrap()).collect();
        // Nothing else can take them meanwhile.
        for p in &peers {
            let taken = match transport.0 {
                Transport::Quic => std::net::UdpSocket::bind(p).is_err(),
                _ => std::net::TcpListener::bind(p).is_err(),
            };
            assert!(taken, "{transport:?}: {p} was free while reserved");
        }
        let id = ClusterIdentity::generate().unwrap();
        let token = ClusterToken::generate().unwrap();
        for generation in 0..2 {
            let handles: Vec<_> = (0..3u32)
                .map(|r| {
                    let mut cfg = config(r, &peers, &id, &token, transport, WireDtype::F32);
                    cfg.reserved = Some(Arc::clone(&reserved[r as usize]));
                    std::thread::spawn(move || {
                        let mut s = connect(cfg).unwrap_or_else(|e| panic!("rank {r}: {e}"));
                        let mut v = vec![r as f32 + 1.0; 1_001];
                        s.all_reduce_sum(&mut v, Call::new(1, Duration::from_secs(10)))
                            .unwrap();
                        v
                    })
                })
                .collect();
            for h in handles {
                let v = h.join().unwrap();
                assert!(
                    v.iter().all(|&x| x == 6.0),
                    "{transport:?} generation {generation}"
                );
            }
        }
    }
}
