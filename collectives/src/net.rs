//! The network ring: settings, link handshake, and the drivers of the QUIC and TCP
//! transports.
//!
//! Each rank keeps two links: it *connects* to its right neighbour and only ever writes
//! frames there, and it *accepts* a connection from its left neighbour and only ever reads
//! frames from it. A link is usable only after (1) TLS with the pinned cluster certificate
//! succeeded in both directions (for `tcp-plain`: a fresh nonce from each end) and (2) both
//! ends proved the cluster token over it ([`crate::auth`]) and agreed on version, world
//! size, ranks and frame size. Anything else is refused with a logged reason, and a refused
//! peer is sent no gradient data.
//!
//! QUIC links run as tokio tasks: per link a reader task turns bytes into frames (refusing,
//! before allocating, any frame longer than the agreed chunk) and a writer task turns
//! frames into bytes; the ring core ([`crate::ring`]) runs on the calling thread's
//! `block_on`, between the two. TCP links leave tokio after the handshake and run on two
//! plain threads ([`crate::stream`]), which is cheaper per byte.

use std::any::Any;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ringtune_protocol::{
    check_frame_len, decode_control, encode_control, encode_frame_prefix, ChunkHeader, Hello,
    HelloReply, WireDtype, CHUNK_HEADER_LEN, FRAME_PREFIX_LEN, MAX_CONTROL_LEN, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::auth::{self, ClusterToken, Role};
use crate::error::{Error, Result};
use crate::ring::{Collective, RingConfig};
use crate::stream::TcpIo;
use crate::sync::{Driver, Ring};
use crate::tls::ClusterIdentity;
use crate::types::{Rank, WorldSize};

/// Which byte stream carries the ring links.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// QUIC (quinn) over UDP, TLS 1.3 built in.
    #[default]
    Quic,
    /// TCP, authenticated with mutual TLS 1.3 (rustls) and the token proof; frames are then
    /// sealed with AES-128-GCM under keys exported from that TLS session
    /// ([`crate::stream`]). The kernel does segmentation, acks and retransmission, which on
    /// one host is much cheaper than QUIC's user-space stack.
    TcpTls,
    /// TCP without encryption, **for trusted networks only**: the cluster token is still
    /// proven at connect (HMAC challenge–response over fresh nonces from both ends,
    /// compared in constant time), but gradients travel in the clear and unauthenticated.
    /// Never the default.
    TcpPlain,
}

impl std::str::FromStr for Transport {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "quic" => Ok(Self::Quic),
            "tcp-tls" | "tcp" => Ok(Self::TcpTls),
            "tcp-plain" => Ok(Self::TcpPlain),
            _ => Err(Error::InvalidArgument(format!(
                "unknown transport {s:?} (quic, tcp-tls, tcp-plain)"
            ))),
        }
    }
}

/// A port held for the ring from the moment its address is chosen until the ring binds
/// it. A node hands its data-plane address to the coordinator long before it joins the
/// ring (the model loads in between); a port picked by binding and closing could be taken
/// by another process, or another node, meanwhile.
#[derive(Debug)]
pub enum ReservedPort {
    /// A bound UDP socket, for QUIC.
    Udp(std::net::UdpSocket),
    /// A listening TCP socket, for the TCP transports.
    Tcp(std::net::TcpListener),
}

impl ReservedPort {
    /// Binds a free port on `ip` of the kind `transport` listens on, and keeps it.
    pub fn bind(ip: std::net::IpAddr, transport: Transport) -> std::io::Result<Self> {
        let addr = SocketAddr::new(ip, 0);
        Ok(match transport {
            Transport::Quic => Self::Udp(std::net::UdpSocket::bind(addr)?),
            Transport::TcpTls | Transport::TcpPlain => {
                Self::Tcp(std::net::TcpListener::bind(addr)?)
            }
        })
    }

    /// The address held.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Self::Udp(s) => s.local_addr(),
            Self::Tcp(l) => l.local_addr(),
        }
    }
}

/// Everything needed to join the ring; a coordinator can fill this in per rank.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// This rank.
    pub rank: Rank,
    /// Number of ranks.
    pub world: WorldSize,
    /// Where this rank accepts its left neighbour's connection.
    pub listen: SocketAddr,
    /// The socket already bound at `listen`, if the caller holds one (see
    /// [`ReservedPort`]): the ring listens on a duplicate of it instead of binding anew,
    /// and the caller may keep it for the next ring on the same address.
    pub reserved: Option<std::sync::Arc<ReservedPort>>,
    /// Listen address of every rank, indexed by rank (only the right neighbour's is dialled).
    pub peers: Vec<SocketAddr>,
    /// TLS identity and trust roots.
    pub identity: ClusterIdentity,
    /// Cluster token.
    pub token: ClusterToken,
    /// How long to wait for both links to come up.
    pub connect_timeout: Duration,
    /// Elements per frame.
    pub chunk_elems: usize,
    /// Gradient element type on the wire.
    pub wire: WireDtype,
    /// QUIC, TCP+TLS, or (trusted networks only) plain TCP.
    pub transport: Transport,
    /// How the TCP transports drive their links (ignored by QUIC).
    pub tcp_io: TcpIoMode,
}

/// Who does a TCP link's work: the caller's thread alone, or a reader and a writer thread
/// beside it (see `stream.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TcpIoMode {
    /// `RINGTUNE_TCP_IO` (`inline` or `threads`) if set, else inline unless the host has
    /// at least 3 cores for each ring rank on it.
    #[default]
    Auto,
    /// Everything on the caller's thread, payloads sealed or written straight from the
    /// gradient buffer.
    Inline,
    /// Reader and writer threads per rank.
    Threads,
}

impl TcpIoMode {
    /// `Inline` or `Threads`: what `Auto` means for a host running `local_ranks` ring ranks.
    /// Inline unless there are 3 cores (a rank's caller, reader and writer threads) per
    /// local rank: on the quiet 2-core host inline moved more at every size and both
    /// transports (W = 2, 64 MiB, alternating runs: TCP+TLS 1.37–1.44 vs 1.18–1.19 GB/s
    /// busbw, plain 1.74–1.90 vs 1.40–1.41; README, Collectives). The threads had come out
    /// ahead only while other work loaded the machine, where three threads per rank win a
    /// larger share of the CPU.
    pub fn resolve(self, local_ranks: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        match self {
            Self::Auto => match std::env::var("RINGTUNE_TCP_IO").as_deref() {
                Ok("inline") => Self::Inline,
                Ok("threads") => Self::Threads,
                other => {
                    if let Ok(v) = other {
                        tracing::warn!(
                            "RINGTUNE_TCP_IO={v:?} is neither inline nor threads: ignored"
                        );
                    }
                    if cores < 3 * local_ranks.max(1) {
                        Self::Inline
                    } else {
                        Self::Threads
                    }
                }
            },
            other => other,
        }
    }
}

impl std::str::FromStr for TcpIoMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "inline" => Ok(Self::Inline),
            "threads" => Ok(Self::Threads),
            other => Err(Error::InvalidArgument(format!(
                "TCP I/O mode {other:?} (expected auto, inline or threads)"
            ))),
        }
    }
}

/// Default elements per frame: 1 MiB of f32.
pub const DEFAULT_CHUNK_ELEMS: usize = 1 << 18;

/// Elements per frame that suit the TCP transports: 256 KiB of f32, so a frame being
/// sealed, written, read, opened and reduced stays in the core's L2 cache (on the 2-core
/// host it used ~12 % less CPU per all-reduce than 1 MiB frames; README, all-reduce speed).
pub const TCP_CHUNK_ELEMS: usize = 1 << 16;

/// [`crate::GradSync`] over the network. It owns a small tokio runtime and blocks the
/// calling thread during a collective, so call it (and drop it) from ordinary threads, not
/// from inside another async runtime. Dropping it flushes the last frames (up to 2 s).
pub type NetSync = Ring<NetDriver>;

/// Joins the ring: binds, connects to the right neighbour, accepts the left one, and
/// authenticates both. Blocks until both links are up or `connect_timeout` passes.
pub fn connect(cfg: NetConfig) -> Result<NetSync> {
    let ring = RingConfig::new(cfg.rank, cfg.world, cfg.chunk_elems, cfg.wire)?;
    if cfg.peers.len() != cfg.world.get() {
        return Err(Error::InvalidArgument(format!(
            "{} peer addresses for a world of {}",
            cfg.peers.len(),
            cfg.world
        )));
    }
    // Two workers let a link's encryption and the other link's decryption run in parallel;
    // RINGTUNE_NET_THREADS overrides it (measured in the README's benchmark notes).
    let threads = std::env::var("RINGTUNE_NET_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2usize)
        .max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("ringtune-net")
        .enable_all()
        .build()
        .map_err(|source| Error::Io {
            context: "starting the network runtime".into(),
            source,
        })?;
    let (events_tx, events) = mpsc::channel(8);
    let pool = Pool::default();
    let mut driver = NetDriver {
        cfg: ring,
        rt,
        tx: None,
        events,
        pool: pool.clone(),
        writer: None,
        reader: None,
        keep: Vec::new(),
        stream: None,
    };
    if cfg.world.0 == 1 {
        return Ok(Ring::new(driver));
    }
    if cfg.transport != Transport::Quic {
        let links = driver.rt.block_on(crate::tcp::establish(&cfg, &ring))?;
        // Ranks on this host: the distinct addresses with this rank's IP (a caller that
        // knows only its neighbours fills the other slots with its own address).
        let ip = cfg.peers[cfg.rank.idx()].ip();
        let local = cfg
            .peers
            .iter()
            .filter(|p| p.ip() == ip)
            .collect::<std::collections::HashSet<_>>()
            .len();
        driver.stream = Some(TcpIo::start(ring, links, cfg.tcp_io, local)?);
        return Ok(Ring::new(driver));
    }
    let est = driver.rt.block_on(crate::quic::establish(&cfg, &ring))?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
    let right = ring.right();
    let left = ring.left();
    let ev = events_tx.clone();
    driver.writer = Some(
        driver
            .rt
            .spawn(writer_task(est.sink, rx, ev, right, pool.clone())),
    );
    driver.reader = Some(driver.rt.spawn(reader_task(
        est.source,
        ring.max_frame_body(),
        events_tx,
        left,
        pool,
    )));
    driver.tx = Some(tx);
    driver.keep = est.keep;
    Ok(Ring::new(driver))
}

/// Frame buffers passed back and forth between the core and the link tasks, so that a
/// steady stream of 1 MiB frames reuses the same memory instead of paying for fresh pages
/// (page faults and zeroing were a quarter of the CPU time before this pool).
#[derive(Clone, Default)]
struct Pool(std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl Pool {
    const MAX: usize = 64;

    /// An empty buffer (for appending a frame to).
    fn get(&self) -> Vec<u8> {
        let mut v = self.get_dirty();
        v.clear();
        v
    }

    /// A buffer with stale contents, to be overwritten: resizing it to the same frame size
    /// again costs no memset.
    fn get_dirty(&self) -> Vec<u8> {
        self.0
            .lock()
            .map(|mut p| p.pop())
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn put(&self, v: Vec<u8>) {
        if let Ok(mut p) = self.0.lock() {
            if p.len() < Self::MAX {
                p.push(v);
            }
        }
    }
}

/// What a transport hands the driver once both links are authenticated.
pub(crate) struct Established {
    pub sink: Sink,
    pub source: Box<dyn AsyncRead + Send + Unpin>,
    /// Connections and endpoints that must outlive the streams.
    pub keep: Vec<Box<dyn Any + Send>>,
}

/// The write half of the QUIC link to the right neighbour.
pub(crate) enum Sink {
    Quic(quinn::SendStream),
}

impl Sink {
    async fn send(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Quic(s) => s.write_all(b).await.map_err(std::io::Error::other),
        }
    }

    /// Ends the stream and waits until the peer has everything we sent.
    async fn close(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Quic(s) => {
                s.finish().map_err(std::io::Error::other)?;
                s.stopped().await.map_err(std::io::Error::other)?;
                Ok(())
            }
        }
    }
}

enum Event {
    Frame(ChunkHeader, Vec<u8>),
    Failed {
        peer: Rank,
        malformed: bool,
        reason: String,
    },
}

async fn writer_task(
    mut sink: Sink,
    mut rx: mpsc::Receiver<Vec<u8>>,
    events: mpsc::Sender<Event>,
    peer: Rank,
    pool: Pool,
) {
    while let Some(b) = rx.recv().await {
        let r = sink.send(&b).await;
        pool.put(b);
        if let Err(e) = r {
            let _ = events
                .send(Event::Failed {
                    peer,
                    malformed: false,
                    reason: format!("write failed: {e}"),
                })
                .await;
            return;
        }
    }
    let _ = sink.close().await;
}

async fn reader_task(
    mut src: Box<dyn AsyncRead + Send + Unpin>,
    limit: usize,
    events: mpsc::Sender<Event>,
    peer: Rank,
    pool: Pool,
) {
    let fail = |malformed, reason: String| Event::Failed {
        peer,
        malformed,
        reason,
    };
    loop {
        let mut prefix = [0u8; FRAME_PREFIX_LEN];
        if let Err(e) = src.read_exact(&mut prefix).await {
            let reason = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "connection closed by peer".to_string()
            } else {
                format!("read failed: {e}")
            };
            let _ = events.send(fail(false, reason)).await;
            return;
        }
        // The limit is checked before anything is allocated for the body.
        let len = match check_frame_len(prefix, limit) {
            Ok(len) if len >= CHUNK_HEADER_LEN => len,
            Ok(len) => {
                let _ = events
                    .send(fail(
                        true,
                        format!("frame of {len} bytes is shorter than a chunk header"),
                    ))
                    .await;
                return;
            }
            Err(e) => {
                let _ = events.send(fail(true, e.to_string())).await;
                return;
            }
        };
        let mut head = [0u8; CHUNK_HEADER_LEN];
        let mut payload = pool.get_dirty();
        let r = async {
            src.read_exact(&mut head).await?;
            let header = ChunkHeader::decode(&head)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            // Only now, with the length bounded and the header valid, take the memory.
            payload.resize(len - CHUNK_HEADER_LEN, 0);
            src.read_exact(&mut payload).await?;
            Ok::<_, std::io::Error>(header)
        }
        .await;
        match r {
            Ok(h) => {
                if events.send(Event::Frame(h, payload)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let malformed = e.kind() == std::io::ErrorKind::InvalidData;
                let _ = events
                    .send(fail(malformed, format!("reading frame: {e}")))
                    .await;
                return;
            }
        }
    }
}

/// The network driver of one rank (see the module docs).
pub struct NetDriver {
    cfg: RingConfig,
    rt: tokio::runtime::Runtime,
    tx: Option<mpsc::Sender<Vec<u8>>>,
    events: mpsc::Receiver<Event>,
    pool: Pool,
    writer: Option<tokio::task::JoinHandle<()>>,
    reader: Option<tokio::task::JoinHandle<()>>,
    keep: Vec<Box<dyn Any + Send>>,
    /// The TCP transports' threaded links (then the tokio fields above are unused).
    stream: Option<TcpIo>,
}

impl NetDriver {
    /// Flushes what was sent and closes the links, waiting at most `grace` for the right
    /// neighbour to acknowledge our last frames. Called on drop with a short grace.
    pub fn close(&mut self, grace: Duration) {
        if let Some(s) = &mut self.stream {
            s.close(grace);
        }
        self.tx = None;
        if let Some(w) = self.writer.take() {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(grace, w).await });
        }
        if let Some(r) = self.reader.take() {
            r.abort();
        }
        for k in self.keep.drain(..) {
            let k = match k.downcast::<quinn::Connection>() {
                Ok(c) => {
                    if std::env::var_os("RINGTUNE_QUIC_STATS").is_some() {
                        eprintln!("rank {} QUIC stats: {:?}", self.cfg.rank, c.stats());
                    }
                    continue;
                }
                Err(k) => k,
            };
            if let Ok(ep) = k.downcast::<quinn::Endpoint>() {
                ep.close(0u32.into(), b"done");
            }
        }
    }
}

impl NetDriver {
    /// Test hook: queues raw bytes on the link to the right neighbour, bypassing the ring
    /// core, to check that peers refuse malformed and oversized frames. Not for real use.
    #[doc(hidden)]
    pub fn inject_raw(&mut self, bytes: Vec<u8>) -> Result<()> {
        if let Some(s) = &mut self.stream {
            return s.inject(bytes);
        }
        let tx = self
            .tx
            .clone()
            .ok_or_else(|| Error::InvalidArgument("links closed".into()))?;
        self.rt
            .block_on(tx.send(bytes))
            .map_err(|_| Error::InvalidArgument("writer stopped".into()))
    }
}

impl Drop for NetDriver {
    fn drop(&mut self) {
        self.close(Duration::from_secs(2));
    }
}

impl Driver for NetDriver {
    fn config(&self) -> RingConfig {
        self.cfg
    }

    fn drive(&mut self, core: &mut dyn Collective, data: &mut [f32]) -> Result<()> {
        if core.is_done() {
            return Ok(());
        }
        if let Some(s) = &mut self.stream {
            return s.drive(core, data);
        }
        let (rank, seq, step) = core.ids();
        let cfg = self.cfg;
        let Some(tx) = self.tx.clone() else {
            return Err(Error::PeerLost {
                rank,
                peer: cfg.right(),
                seq,
                step,
                reason: "links closed".into(),
            });
        };
        let events = &mut self.events;
        let pool = &self.pool;
        let failed = |peer: Rank, malformed: bool, reason: String| {
            if malformed {
                Error::Malformed {
                    rank,
                    seq,
                    peer,
                    reason,
                }
            } else {
                Error::PeerLost {
                    rank,
                    peer,
                    seq,
                    step,
                    reason,
                }
            }
        };
        self.rt.block_on(async move {
            loop {
                while core.has_transmit() {
                    match tx.try_reserve() {
                        Ok(permit) => {
                            let mut out = pool.get();
                            core.poll_transmit(data, &mut out);
                            permit.send(out);
                        }
                        Err(mpsc::error::TrySendError::Full(())) => break,
                        Err(mpsc::error::TrySendError::Closed(())) => {
                            return Err(failed(cfg.right(), false, "writer stopped".into()));
                        }
                    }
                }
                let Some(deadline) = core.poll_timeout() else {
                    return Ok(());
                };
                tokio::select! {
                    biased;
                    // Only while this collective still expects frames: see `wants_frames`.
                    ev = events.recv(), if core.wants_frames() => match ev {
                        Some(Event::Frame(h, payload)) => {
                            let r = core.handle_chunk(data, &h, &payload);
                            pool.put(payload);
                            r?
                        }
                        Some(Event::Failed { peer, malformed, reason }) => return Err(failed(peer, malformed, reason)),
                        None => return Err(failed(cfg.left(), false, "reader stopped".into())),
                    },
                    permit = tx.reserve(), if core.has_transmit() => match permit {
                        Ok(permit) => {
                            let mut out = pool.get();
                            core.poll_transmit(data, &mut out);
                            permit.send(out);
                        }
                        Err(_) => return Err(failed(cfg.right(), false, "writer stopped".into())),
                    },
                    _ = tokio::time::sleep_until(deadline.into()) => core.handle_timeout(Instant::now())?,
                }
            }
        })
    }
}

// ---------------------------------------------------------------------------------------
// Link handshake (shared by both transports).

async fn write_control<S: AsyncWrite + Unpin, T: serde::Serialize>(
    s: &mut S,
    msg: &T,
) -> std::io::Result<()> {
    let body = encode_control(msg);
    s.write_all(&encode_frame_prefix(body.len())).await?;
    s.write_all(&body).await?;
    s.flush().await
}

async fn read_control_body<S: AsyncRead + Unpin>(
    s: &mut S,
) -> std::result::Result<Vec<u8>, String> {
    let mut prefix = [0u8; FRAME_PREFIX_LEN];
    s.read_exact(&mut prefix)
        .await
        .map_err(|e| format!("reading handshake: {e}"))?;
    let len = check_frame_len(prefix, MAX_CONTROL_LEN).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)
        .await
        .map_err(|e| format!("reading handshake: {e}"))?;
    Ok(body)
}

/// Connecting side: we are `ring.rank`, the peer must be `ring.right()`.
pub(crate) async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    exporter: &[u8],
    ring: &RingConfig,
    token: &ClusterToken,
) -> std::result::Result<(), String> {
    let hello = Hello {
        version: PROTOCOL_VERSION,
        rank: ring.rank.0,
        world: ring.world.0,
        max_frame: ring.max_frame_body() as u64,
        proof: auth::proof(token, exporter, Role::Connector, ring.rank.0, ring.world.0),
    };
    write_control(s, &hello)
        .await
        .map_err(|e| format!("sending hello: {e}"))?;
    let body = read_control_body(s).await?;
    match decode_control::<HelloReply>(&body).map_err(|e| e.to_string())? {
        HelloReply::Refuse { reason } => Err(format!("refused by the peer: {reason}")),
        HelloReply::Accept { rank, proof } => {
            let right = ring.right();
            if rank != right.0 {
                return Err(format!(
                    "peer says it is rank {rank}, expected rank {right}"
                ));
            }
            if !auth::verify(token, exporter, Role::Acceptor, rank, ring.world.0, &proof) {
                return Err(format!(
                    "rank {rank} failed the cluster token proof; no data sent to it"
                ));
            }
            Ok(())
        }
    }
}

/// Accepting side: the peer must be `ring.left()`. On refusal the peer is told why (never
/// the token) and the caller logs it.
pub(crate) async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    exporter: &[u8],
    ring: &RingConfig,
    token: &ClusterToken,
) -> std::result::Result<(), String> {
    let body = read_control_body(s).await?;
    let hello: Hello = decode_control(&body).map_err(|e| e.to_string())?;
    let left = ring.left();
    let refusal = if hello.version != PROTOCOL_VERSION {
        Some(format!(
            "protocol version {} (this rank speaks {PROTOCOL_VERSION})",
            hello.version
        ))
    } else if hello.world != ring.world.0 {
        Some(format!(
            "world size {} (this rank has {})",
            hello.world, ring.world
        ))
    } else if hello.rank != left.0 {
        Some(format!(
            "connection from rank {} (rank {} expects its left neighbour, rank {left})",
            hello.rank, ring.rank
        ))
    } else if !auth::verify(
        token,
        exporter,
        Role::Connector,
        hello.rank,
        hello.world,
        &hello.proof,
    ) {
        Some("bad cluster token proof".to_string())
    } else if hello.max_frame != ring.max_frame_body() as u64 {
        Some(format!(
            "chunk frames of {} bytes (this rank uses {})",
            hello.max_frame,
            ring.max_frame_body()
        ))
    } else {
        None
    };
    if let Some(reason) = refusal {
        let _ = write_control(
            s,
            &HelloReply::Refuse {
                reason: reason.clone(),
            },
        )
        .await;
        return Err(reason);
    }
    let reply = HelloReply::Accept {
        rank: ring.rank.0,
        proof: auth::proof(token, exporter, Role::Acceptor, ring.rank.0, ring.world.0),
    };
    write_control(s, &reply)
        .await
        .map_err(|e| format!("sending reply: {e}"))
}

/// Formats a link error.
pub(crate) fn link_err(
    ring: &RingConfig,
    peer: impl std::fmt::Display,
    reason: impl Into<String>,
) -> Error {
    Error::Link {
        rank: ring.rank,
        peer: peer.to_string(),
        reason: reason.into(),
    }
}
