//! A frame that announces more bytes than the agreed chunk size is refused from its 4-byte
//! length prefix, before anything is allocated for it. A counting allocator proves the
//! second part: its own binary, so no other test's allocations interfere.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ringtune_collectives::auth::ClusterToken;
use ringtune_collectives::net::{connect, NetConfig, TcpIoMode, Transport};
use ringtune_collectives::tls::ClusterIdentity;
use ringtune_collectives::{Call, Error, GradSync, Rank, WireDtype, WorldSize};

struct Counting;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LARGEST.fetch_max(n, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn run(transport: Transport, tcp_io: TcpIoMode, frame: Vec<u8>, expect: &str) {
    let mut peers: Vec<SocketAddr> = Vec::new();
    let mut keep = Vec::new();
    while peers.len() < 2 {
        let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = t.local_addr().unwrap();
        if let Ok(u) = std::net::UdpSocket::bind(a) {
            peers.push(a);
            keep.push((t, u));
        }
    }
    drop(keep);
    let id = ClusterIdentity::generate().unwrap();
    let token = ClusterToken::generate().unwrap();
    let cfg = |r: u32| NetConfig {
        rank: Rank(r),
        world: WorldSize(2),
        listen: peers[r as usize],
        reserved: None,
        peers: peers.clone(),
        identity: id.clone(),
        token: token.clone(),
        connect_timeout: Duration::from_secs(5),
        chunk_elems: 1024,
        wire: WireDtype::F32,
        transport,
        tcp_io,
    };
    let c0 = cfg(0);
    let rogue = std::thread::spawn(move || {
        let mut s = connect(c0).unwrap();
        s.driver_mut().inject_raw(frame).unwrap();
        std::thread::sleep(Duration::from_millis(800));
    });
    let mut s = connect(cfg(1)).unwrap();
    let before = LARGEST.load(Ordering::Relaxed);
    let mut v = vec![1.0f32; 4096];
    let e = s
        .all_reduce_sum(&mut v, Call::new(0, Duration::from_secs(10)))
        .unwrap_err();
    assert!(matches!(e, Error::Malformed { peer: Rank(0), .. }), "{e}");
    assert!(e.to_string().contains(expect), "{e}");
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest < 512 << 20,
        "something allocated {largest} bytes (was {before} before)"
    );
    rogue.join().unwrap();
}

#[test]
fn oversized_and_malformed_frames_are_refused_without_allocating() {
    let tcp = [Transport::TcpTls, Transport::TcpPlain];
    let runs = tcp
        .iter()
        .flat_map(|&t| [(t, TcpIoMode::Inline), (t, TcpIoMode::Threads)])
        .chain([(Transport::Quic, TcpIoMode::Auto)]);
    for (transport, io) in runs {
        // A 1 GiB announcement on a link agreed at 4 KiB chunks.
        run(
            transport,
            io,
            (1u32 << 30).to_le_bytes().to_vec(),
            "exceeds the limit",
        );
        let mut garbage = 100u32.to_le_bytes().to_vec();
        garbage.extend_from_slice(&[0xAB; 100]);
        run(transport, io, garbage, "bad frame magic");
    }
}
