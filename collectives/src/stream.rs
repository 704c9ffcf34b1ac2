//! The TCP data path, after a link is authenticated (TLS handshake + token proof, or for
//! `tcp-plain` the nonce challenge–response): no tokio, no rustls.
//!
//! Two drivers, chosen by [`TcpIo::start`]. [`InlineDriver`] (the default where cores are
//! few) does everything on the caller's thread with non-blocking sockets and `poll(2)`: it
//! seals each payload straight from the gradient buffer into the frame (plain TCP writes
//! it from there with `writev`), reads each frame into one reused buffer, opens it in place
//! and reduces straight out of it. [`StreamDriver`] (where each rank has cores to spare)
//! spreads the same work over a writer thread that seals and writes, a reader thread that
//! reads and opens, and the caller's thread, which encodes frames (one copy) and reduces.
//! What counts is the work per byte: the rustls stream path this replaced copied each byte
//! four times in user space (frame encode, rustls plaintext in, deframer in, plaintext
//! out) and hopped between tokio tasks per frame.
//!
//! # Frame protection ([`FrameKey`])
//! With TLS on, each frame `[len: u32 LE][body]` travels as `[len][AES-128-GCM(body)][tag]`
//! with the 4 length bytes as associated data, so a changed length fails the tag. The key
//! and nonce base come from the link's own TLS 1.3 session through the RFC 8446 §7.5
//! exporter (the construction DTLS-SRTP uses), so only the two authenticated ends know
//! them and no two links share a key. The nonce is the base XOR a per-frame counter (TCP
//! delivers in order, so a replayed, dropped or reordered frame fails its tag). Both ends
//! ratchet to a fresh key after every 2^34 bytes or 2^32 frames, far inside AES-GCM's
//! usage limits. One AEAD call covers a whole frame (up to the agreed chunk size) instead of
//! TLS's 16 KiB records: fewer calls, and the opened payload stays contiguous so it is
//! reduced in place.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use ring::hmac;
use ringtune_protocol::{check_frame_len, ChunkHeader, CHUNK_HEADER_LEN, FRAME_PREFIX_LEN};

use crate::error::{Error, Result};
use crate::net::TcpIoMode;
use crate::ring::{Collective, RingConfig};
use crate::types::Rank;

/// Label for exporting a link's frame-key secret from its TLS session.
pub(crate) const FRAME_KEY_LABEL: &[u8] = b"EXPORTER-ringtune-frame-key-v1";
/// Bytes of the AEAD tag appended to every sealed frame.
pub(crate) const TAG_LEN: usize = 16;
/// Ratchet after this many sealed bytes ...
const REKEY_BYTES: u64 = 1 << 34;
/// ... or this many frames, whichever comes first.
const REKEY_FRAMES: u64 = 1 << 32;
/// Frames queued for the writer (plus the one it is writing) before the core waits.
const SEND_DEPTH: usize = 4;
/// Frames read ahead of the core before the reader waits.
const RECV_DEPTH: usize = 4;

/// One direction's frame key (see the module docs). Both ends of a link build it from the
/// same exported secret and advance it frame by frame in lockstep.
pub(crate) struct FrameKey {
    secret: [u8; 32],
    key: LessSafeKey,
    iv: [u8; 12],
    frames: u64,
    bytes: u64,
}

impl FrameKey {
    pub(crate) fn new(secret: [u8; 32]) -> Self {
        let (key, iv) = Self::derive(&secret);
        Self {
            secret,
            key,
            iv,
            frames: 0,
            bytes: 0,
        }
    }

    fn derive(secret: &[u8; 32]) -> (LessSafeKey, [u8; 12]) {
        let mac = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let k = hmac::sign(&mac, b"ringtune frame key");
        let n = hmac::sign(&mac, b"ringtune frame iv");
        let key = LessSafeKey::new(
            UnboundKey::new(&AES_128_GCM, &k.as_ref()[..16]).expect("16 bytes is an AES-128 key"),
        );
        let mut iv = [0u8; 12];
        iv.copy_from_slice(&n.as_ref()[..12]);
        (key, iv)
    }

    fn next_nonce(&mut self, len: usize) -> Nonce {
        let mut n = self.iv;
        for (b, c) in n[4..].iter_mut().zip(self.frames.to_be_bytes()) {
            *b ^= c;
        }
        self.frames += 1;
        self.bytes += len as u64;
        Nonce::assume_unique_for_key(n)
    }

    /// Moves to the next key once this one has done enough; both ends call it after the
    /// same frame, so they stay in step without a message.
    fn maybe_ratchet(&mut self) {
        if self.bytes >= REKEY_BYTES || self.frames >= REKEY_FRAMES {
            let mac = hmac::Key::new(hmac::HMAC_SHA256, &self.secret);
            self.secret
                .copy_from_slice(hmac::sign(&mac, b"ringtune frame ratchet").as_ref());
            *self = Self::new(self.secret);
        }
    }

    /// Seals `frame` = `[len][body]` in place and appends the tag.
    pub(crate) fn seal(&mut self, frame: &mut Vec<u8>) {
        if frame.len() < FRAME_PREFIX_LEN {
            // Only the raw-injection test hook can queue such a thing; send it as is.
            return;
        }
        let (prefix, body) = frame.split_at_mut(FRAME_PREFIX_LEN);
        let nonce = self.next_nonce(body.len());
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(&prefix[..]), body)
            .expect("frames are far below AES-GCM's per-message limit");
        frame.extend_from_slice(tag.as_ref());
        self.maybe_ratchet();
    }

    /// Seals a frame whose payload stays in the sender's buffer: `frame` holds the prefix
    /// and header in its first `head` bytes and has room for the payload and the tag after
    /// them; the header is sealed in place and the payload's ciphertext written after it in
    /// one AEAD pass, so the result is what [`FrameKey::seal`] makes of the whole frame.
    pub(crate) fn seal_split(&mut self, frame: &mut [u8], head: usize, payload: &[u8]) {
        assert!(
            head >= FRAME_PREFIX_LEN && frame.len() == head + payload.len() + TAG_LEN,
            "frame of {} bytes for a {head}-byte head and a {}-byte payload",
            frame.len(),
            payload.len()
        );
        let (prefix, rest) = frame.split_at_mut(FRAME_PREFIX_LEN);
        let (header, out) = rest.split_at_mut(head - FRAME_PREFIX_LEN);
        let nonce = self.next_nonce(header.len() + payload.len());
        self.key
            .seal_in_place_scatter(nonce, Aad::from(&prefix[..]), header, payload, out)
            .expect("frames are far below AES-GCM's per-message limit");
        self.maybe_ratchet();
    }

    /// Opens `body ‖ tag` in place; `prefix` is the frame's length prefix.
    pub(crate) fn open(
        &mut self,
        prefix: &[u8; FRAME_PREFIX_LEN],
        sealed: &mut [u8],
    ) -> std::result::Result<(), ()> {
        let nonce = self.next_nonce(sealed.len().saturating_sub(TAG_LEN));
        let r = self
            .key
            .open_in_place(nonce, Aad::from(&prefix[..]), sealed)
            .map(|_| ())
            .map_err(|_| ());
        self.maybe_ratchet();
        r
    }
}

/// What a TCP transport hands over once both links are authenticated.
pub(crate) struct StreamLinks {
    /// To the right neighbour (write only).
    pub out: TcpStream,
    /// From the left neighbour (read only).
    pub inp: TcpStream,
    /// Frame keys (sealing for `out`, opening for `inp`); `None` for `tcp-plain`.
    pub keys: Option<(FrameKey, FrameKey)>,
}

/// A frame read from the left neighbour: header, and the buffer whose
/// `[CHUNK_HEADER_LEN..len]` is the payload.
struct Inbound {
    header: ChunkHeader,
    buf: Vec<u8>,
    len: usize,
}

#[derive(Default)]
struct State {
    /// Frames read, oldest first (at most `RECV_DEPTH`).
    inbox: VecDeque<Inbound>,
    /// Why the reader stopped; reported once the inbox is drained.
    reader_failed: Option<(bool, String)>,
    /// Frames for the writer, oldest first.
    outbox: VecDeque<Vec<u8>>,
    /// The writer holds a frame.
    writing: bool,
    writer_failed: Option<String>,
    writer_done: bool,
    closing: bool,
    /// Spent buffers, reused so steady traffic causes no page faults or zeroing.
    send_pool: Vec<Vec<u8>>,
    recv_pool: Vec<Vec<u8>>,
}

struct Shared {
    st: Mutex<State>,
    /// The caller's thread waits here for frames, writer room, failures.
    main: Condvar,
    reader: Condvar,
    writer: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking link thread must not wedge the ring: the state stays consistent
        // (every field is updated in one step), so take it over.
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The threaded links of one rank.
pub(crate) struct StreamDriver {
    cfg: RingConfig,
    shared: Arc<Shared>,
    out: TcpStream,
    inp: TcpStream,
    writer: Option<JoinHandle<()>>,
    reader: Option<JoinHandle<()>>,
}

impl StreamDriver {
    pub(crate) fn start(cfg: RingConfig, links: StreamLinks) -> Result<Self> {
        let shared = Arc::new(Shared {
            st: Mutex::new(State::default()),
            main: Condvar::new(),
            reader: Condvar::new(),
            writer: Condvar::new(),
        });
        let (seal, open) = match links.keys {
            Some((s, o)) => (Some(s), Some(o)),
            None => (None, None),
        };
        let io = |e| Error::Io {
            context: "starting ring link threads".into(),
            source: e,
        };
        let w_sock = links.out.try_clone().map_err(io)?;
        let r_sock = links.inp.try_clone().map_err(io)?;
        let sh = shared.clone();
        let writer = std::thread::Builder::new()
            .name(format!("ringtune-tx{}", cfg.rank))
            .spawn(move || writer_loop(w_sock, seal, &sh))
            .map_err(io)?;
        let sh = shared.clone();
        let limit = cfg.max_frame_body();
        let reader = std::thread::Builder::new()
            .name(format!("ringtune-rx{}", cfg.rank))
            .spawn(move || reader_loop(r_sock, open, limit, &sh))
            .map_err(io)?;
        Ok(Self {
            cfg,
            shared,
            out: links.out,
            inp: links.inp,
            writer: Some(writer),
            reader: Some(reader),
        })
    }

    /// Queues raw bytes for the right neighbour (the test hook behind `inject_raw`).
    pub(crate) fn inject(&mut self, bytes: Vec<u8>) -> Result<()> {
        let mut st = self.shared.lock();
        if st.closing || st.writer_failed.is_some() {
            return Err(Error::InvalidArgument("links closed".into()));
        }
        st.outbox.push_back(bytes);
        self.shared.writer.notify_one();
        Ok(())
    }

    /// Lets the writer flush for up to `grace`, then shuts both sockets and joins the threads.
    pub(crate) fn close(&mut self, grace: Duration) {
        if self.writer.is_none() && self.reader.is_none() {
            return;
        }
        let end = Instant::now() + grace;
        {
            let mut st = self.shared.lock();
            st.closing = true;
            self.shared.writer.notify_all();
            self.shared.reader.notify_all();
            while !st.writer_done {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                st = self
                    .shared
                    .main
                    .wait_timeout(st, end - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        // Unblocks a writer stuck on a peer that stopped reading, and the reader.
        let _ = self.out.shutdown(Shutdown::Both);
        let _ = self.inp.shutdown(Shutdown::Both);
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }

    pub(crate) fn drive(&mut self, core: &mut dyn Collective, data: &mut [f32]) -> Result<()> {
        let (rank, seq, step) = core.ids();
        let cfg = self.cfg;
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
        let sh = &*self.shared;
        let mut st = sh.lock();
        if st.closing {
            return Err(failed(cfg.right(), false, "links closed".into()));
        }
        loop {
            if let Some(reason) = &st.writer_failed {
                return Err(failed(cfg.right(), false, reason.clone()));
            }
            // Fill the writer's queue. The frame is encoded without the lock held, so the
            // link threads never wait on a 1 MiB copy.
            while core.has_transmit() && st.outbox.len() + usize::from(st.writing) < SEND_DEPTH {
                let mut out = st.send_pool.pop().unwrap_or_default();
                drop(st);
                out.clear();
                core.poll_transmit(data, &mut out);
                st = sh.lock();
                st.outbox.push_back(out);
                sh.writer.notify_one();
            }
            // Only while this collective still expects frames: see `wants_frames`.
            if core.wants_frames() {
                if let Some(f) = st.inbox.pop_front() {
                    sh.reader.notify_one();
                    drop(st);
                    let r = core.handle_chunk(data, &f.header, &f.buf[CHUNK_HEADER_LEN..f.len]);
                    st = sh.lock();
                    st.recv_pool.push(f.buf);
                    r?;
                    continue;
                }
                if let Some((malformed, reason)) = &st.reader_failed {
                    return Err(failed(cfg.left(), *malformed, reason.clone()));
                }
            }
            let Some(deadline) = core.poll_timeout() else {
                return Ok(());
            };
            let now = Instant::now();
            if now >= deadline {
                drop(st);
                core.handle_timeout(now)?;
                st = sh.lock();
                continue;
            }
            st = sh
                .main
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Drop for StreamDriver {
    fn drop(&mut self) {
        self.close(Duration::from_secs(2));
    }
}

fn writer_loop(mut sock: TcpStream, mut seal: Option<FrameKey>, sh: &Shared) {
    let mut st = sh.lock();
    loop {
        let Some(mut buf) = st.outbox.pop_front() else {
            if st.closing {
                break;
            }
            st = sh.writer.wait(st).unwrap_or_else(|p| p.into_inner());
            continue;
        };
        st.writing = true;
        drop(st);
        if let Some(k) = &mut seal {
            k.seal(&mut buf);
        }
        let r = sock.write_all(&buf);
        st = sh.lock();
        st.writing = false;
        if st.send_pool.len() < 2 * SEND_DEPTH {
            st.send_pool.push(buf);
        }
        sh.main.notify_one();
        if let Err(e) = r {
            st.writer_failed = Some(format!("write failed: {e}"));
            st.writer_done = true;
            sh.main.notify_all();
            return;
        }
    }
    drop(st);
    let _ = sock.flush();
    let _ = sock.shutdown(Shutdown::Write);
    sh.lock().writer_done = true;
    sh.main.notify_all();
}

fn reader_loop(mut sock: TcpStream, mut open: Option<FrameKey>, limit: usize, sh: &Shared) {
    let tag = if open.is_some() { TAG_LEN } else { 0 };
    let stop = |malformed: bool, reason: String| {
        let mut st = sh.lock();
        st.reader_failed = Some((malformed, reason));
        sh.main.notify_all();
    };
    loop {
        let mut prefix = [0u8; FRAME_PREFIX_LEN];
        if let Err(e) = sock.read_exact(&mut prefix) {
            let reason = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "connection closed by peer".to_string()
            } else {
                format!("read failed: {e}")
            };
            return stop(false, reason);
        }
        // The limit is checked before anything is allocated for the body.
        let len = match check_frame_len(prefix, limit) {
            Ok(len) if len >= CHUNK_HEADER_LEN => len,
            Ok(len) => {
                return stop(
                    true,
                    format!("frame of {len} bytes is shorter than a chunk header"),
                )
            }
            Err(e) => return stop(true, e.to_string()),
        };
        let mut buf = sh.lock().recv_pool.pop().unwrap_or_default();
        // A reused buffer of the same size is resized without touching its bytes.
        buf.resize(len + tag, 0);
        if let Err(e) = sock.read_exact(&mut buf) {
            return stop(false, format!("reading frame: {e}"));
        }
        if let Some(k) = &mut open {
            if k.open(&prefix, &mut buf).is_err() {
                return stop(
                    true,
                    "frame failed authentication (AES-GCM tag): altered, replayed or reordered"
                        .into(),
                );
            }
        }
        let header = match ChunkHeader::decode(&buf[..CHUNK_HEADER_LEN]) {
            Ok(h) => h,
            Err(e) => return stop(true, format!("reading frame: {e}")),
        };
        let mut st = sh.lock();
        while st.inbox.len() >= RECV_DEPTH && !st.closing {
            st = sh.reader.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if st.closing {
            return;
        }
        st.inbox.push_back(Inbound { header, buf, len });
        sh.main.notify_one();
    }
}

/// How the TCP links are driven once authenticated.
pub(crate) enum TcpIo {
    /// Everything on the caller's thread: non-blocking sockets and `poll(2)`.
    Inline(Box<InlineDriver>),
    /// A reader and a writer thread per rank ([`StreamDriver`]).
    Threads(StreamDriver),
}

impl TcpIo {
    /// `mode` picks the driver (see [`TcpIoMode::resolve`]; `local_ranks` is how many ring
    /// ranks this host runs, as far as the peer addresses tell).
    pub(crate) fn start(
        cfg: RingConfig,
        links: StreamLinks,
        mode: TcpIoMode,
        local_ranks: usize,
    ) -> Result<Self> {
        if mode.resolve(local_ranks) == TcpIoMode::Inline {
            Ok(Self::Inline(Box::new(InlineDriver::start(cfg, links)?)))
        } else {
            Ok(Self::Threads(StreamDriver::start(cfg, links)?))
        }
    }

    pub(crate) fn drive(&mut self, core: &mut dyn Collective, data: &mut [f32]) -> Result<()> {
        match self {
            Self::Inline(d) => d.drive(core, data),
            Self::Threads(d) => d.drive(core, data),
        }
    }

    pub(crate) fn inject(&mut self, bytes: Vec<u8>) -> Result<()> {
        match self {
            Self::Inline(d) => d.inject(bytes),
            Self::Threads(d) => d.inject(bytes),
        }
    }

    pub(crate) fn close(&mut self, grace: Duration) {
        match self {
            Self::Inline(d) => d.close(grace),
            Self::Threads(d) => d.close(grace),
        }
    }
}

/// What one non-blocking read step produced.
enum ReadStep {
    /// Nothing available now.
    Idle,
    /// Some bytes of the current frame.
    Partial,
    /// A whole frame: its header; the payload is `rx[CHUNK_HEADER_LEN..len]`.
    Frame(ChunkHeader, usize),
}

/// The single-threaded TCP links: the caller's thread encodes, seals and writes its frames
/// and reads, opens and reduces its neighbour's, waiting in `poll(2)` only when neither
/// socket can move. No handoffs, no locks, one buffer per direction.
pub(crate) struct InlineDriver {
    cfg: RingConfig,
    out: TcpStream,
    inp: TcpStream,
    seal: Option<FrameKey>,
    open: Option<FrameKey>,
    /// Where the core writes the next frame's prefix and header (or whole frame).
    head: Vec<u8>,
    /// The frame being written: its first `tx_len` bytes of `tx` (sealed), then, for a
    /// plain frame whose payload stays in the caller's buffer, the bytes of that range of
    /// f32s; `tx_off` bytes of the two together are out.
    tx: Vec<u8>,
    tx_len: usize,
    tx_borrow: Option<Range<usize>>,
    tx_off: usize,
    /// The frame being read: its prefix, then its body (+ tag).
    prefix: [u8; FRAME_PREFIX_LEN],
    prefix_got: usize,
    rx: Vec<u8>,
    rx_got: usize,
    closed: bool,
    /// Where the time went (`RINGTUNE_NET_PROFILE=1` with `RINGTUNE_TCP_IO=inline` prints it
    /// on close).
    prof: Option<Profile>,
}

/// Seconds spent per activity on the caller's thread, for the README's speed notes.
#[derive(Debug, Default)]
struct Profile {
    encode: f64,
    seal: f64,
    write: f64,
    read: f64,
    open: f64,
    reduce: f64,
    wait: f64,
    frames_out: u64,
    frames_in: u64,
    bytes_out: u64,
}

fn lap(t: &mut Instant) -> f64 {
    let now = Instant::now();
    let d = (now - *t).as_secs_f64();
    *t = now;
    d
}

impl InlineDriver {
    fn start(cfg: RingConfig, links: StreamLinks) -> Result<Self> {
        let nb = |s: &TcpStream| {
            s.set_nonblocking(true).map_err(|source| Error::Io {
                context: "making ring sockets non-blocking".into(),
                source,
            })
        };
        nb(&links.out)?;
        nb(&links.inp)?;
        let (seal, open) = match links.keys {
            Some((s, o)) => (Some(s), Some(o)),
            None => (None, None),
        };
        Ok(Self {
            cfg,
            out: links.out,
            inp: links.inp,
            seal,
            open,
            head: Vec::new(),
            tx: Vec::new(),
            tx_len: 0,
            tx_borrow: None,
            tx_off: 0,
            prefix: [0; FRAME_PREFIX_LEN],
            prefix_got: 0,
            rx: Vec::new(),
            rx_got: 0,
            closed: false,
            prof: std::env::var_os("RINGTUNE_NET_PROFILE").map(|_| Profile::default()),
        })
    }

    fn tx_pending(&self) -> bool {
        self.tx_off < self.tx_len + self.tx_borrow.as_ref().map_or(0, |r| r.len() * 4)
    }

    /// Makes the next frame from the core's output in `head`: seals it (with a payload
    /// still in `data`, reading it straight from there into `tx`), or for plain TCP keeps
    /// such a payload where it is, to be written from `data` (see
    /// [`Collective::poll_transmit_split`] for why it does not change meanwhile).
    fn stage(&mut self, data: &[f32], payload: Option<Range<usize>>) {
        self.tx_off = 0;
        self.tx_borrow = None;
        match (&mut self.seal, payload) {
            (Some(k), Some(r)) => {
                let payload: &[u8] = bytemuck::cast_slice(&data[r]);
                let h = self.head.len();
                let total = h + payload.len() + TAG_LEN;
                if self.tx.len() < total {
                    self.tx.resize(total, 0);
                }
                self.tx[..h].copy_from_slice(&self.head);
                k.seal_split(&mut self.tx[..total], h, payload);
                self.tx_len = total;
            }
            (seal, payload) => {
                if let Some(k) = seal {
                    k.seal(&mut self.head);
                }
                std::mem::swap(&mut self.tx, &mut self.head);
                self.tx_len = self.tx.len();
                self.tx_borrow = payload;
            }
        }
    }

    /// Copies the unsent rest of a payload still in `data` into `tx`, so that the frame
    /// can be finished (by `close`) after `data` is gone.
    fn own_pending(&mut self, data: &[f32]) {
        if let Some(r) = self.tx_borrow.take() {
            self.tx.truncate(self.tx_len);
            self.tx.extend_from_slice(bytemuck::cast_slice(&data[r]));
            self.tx_len = self.tx.len();
        }
    }

    /// Writes as much of the pending frame as the socket takes. `Ok(true)` if anything
    /// moved. `data` is the collective's buffer (only read for a payload left there).
    fn write_some(&mut self, data: &[f32]) -> std::io::Result<bool> {
        let mut moved = false;
        let payload: &[u8] = match &self.tx_borrow {
            Some(r) => bytemuck::cast_slice(&data[r.clone()]),
            None => &[],
        };
        while self.tx_off < self.tx_len + payload.len() {
            let r = if self.tx_off < self.tx_len {
                let parts = [
                    std::io::IoSlice::new(&self.tx[self.tx_off..self.tx_len]),
                    std::io::IoSlice::new(payload),
                ];
                self.out.write_vectored(&parts)
            } else {
                self.out.write(&payload[self.tx_off - self.tx_len..])
            };
            match r {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_off += n;
                    moved = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(moved)
    }

    /// One read toward the current frame. Never reads past it: the bytes after a
    /// collective's last frame belong to the next collective.
    fn read_step(&mut self) -> std::result::Result<ReadStep, (bool, String)> {
        let tag = if self.open.is_some() { TAG_LEN } else { 0 };
        let (buf, got) = if self.prefix_got < FRAME_PREFIX_LEN {
            (&mut self.prefix[self.prefix_got..], true)
        } else {
            (&mut self.rx[self.rx_got..], false)
        };
        let n = match self.inp.read(buf) {
            Ok(0) => {
                let mid = self.prefix_got > 0;
                return Err((
                    false,
                    if mid {
                        "connection closed by peer in the middle of a frame".into()
                    } else {
                        "connection closed by peer".into()
                    },
                ));
            }
            Ok(n) => n,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::Interrupted =>
            {
                return Ok(ReadStep::Idle)
            }
            Err(e) => return Err((false, format!("read failed: {e}"))),
        };
        if got {
            self.prefix_got += n;
            if self.prefix_got == FRAME_PREFIX_LEN {
                // The limit is checked before anything is allocated for the body.
                let len = match check_frame_len(self.prefix, self.cfg.max_frame_body()) {
                    Ok(len) if len >= CHUNK_HEADER_LEN => len,
                    Ok(len) => {
                        return Err((
                            true,
                            format!("frame of {len} bytes is shorter than a chunk header"),
                        ))
                    }
                    Err(e) => return Err((true, e.to_string())),
                };
                // Same size as the last frame (the common case): no zeroing.
                self.rx.resize(len + tag, 0);
                self.rx_got = 0;
            }
            return Ok(ReadStep::Partial);
        }
        self.rx_got += n;
        if self.rx_got < self.rx.len() {
            return Ok(ReadStep::Partial);
        }
        self.prefix_got = 0;
        if let Some(k) = &mut self.open {
            let t = Instant::now();
            let r = k.open(&self.prefix, &mut self.rx);
            if let Some(p) = &mut self.prof {
                // Counted under `open`, and taken back out of `read` by the caller's lap.
                let d = t.elapsed().as_secs_f64();
                p.open += d;
                p.read -= d;
            }
            if r.is_err() {
                return Err((
                    true,
                    "frame failed authentication (AES-GCM tag): altered, replayed or reordered"
                        .into(),
                ));
            }
        }
        let len = self.rx.len() - tag;
        match ChunkHeader::decode(&self.rx[..CHUNK_HEADER_LEN]) {
            Ok(h) => Ok(ReadStep::Frame(h, len)),
            Err(e) => Err((true, format!("reading frame: {e}"))),
        }
    }

    /// Waits until a socket we care about is ready or `deadline` passes.
    fn wait(&self, want_read: bool, deadline: Instant) {
        use std::os::fd::AsRawFd;
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        let ms = (deadline - now).as_millis().clamp(1, i32::MAX as u128) as i32;
        let mut fds = [
            libc::pollfd {
                fd: if self.tx_pending() {
                    self.out.as_raw_fd()
                } else {
                    -1
                },
                events: libc::POLLOUT,
                revents: 0,
            },
            libc::pollfd {
                fd: if want_read { self.inp.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        unsafe {
            libc::poll(fds.as_mut_ptr(), 2, ms);
        }
    }

    fn drive(&mut self, core: &mut dyn Collective, data: &mut [f32]) -> Result<()> {
        let r = self.drive_frames(core, data);
        // Only an error leaves a frame half out; it must not point into `data` afterwards.
        self.own_pending(data);
        r
    }

    fn drive_frames(&mut self, core: &mut dyn Collective, data: &mut [f32]) -> Result<()> {
        let (rank, seq, step) = core.ids();
        let cfg = self.cfg;
        let lost = |peer: Rank, reason: String| Error::PeerLost {
            rank,
            peer,
            seq,
            step,
            reason,
        };
        if self.closed {
            return Err(lost(cfg.right(), "links closed".into()));
        }
        let Some(deadline) = core.poll_timeout() else {
            return Ok(());
        };
        loop {
            let mut moved = false;
            // Send: finish the frame on the wire, then encode the next straight from `data`.
            loop {
                if !self.tx_pending() {
                    if !core.has_transmit() {
                        break;
                    }
                    let mut t = Instant::now();
                    self.head.clear();
                    let Some((_, payload)) = core.poll_transmit_split(data, &mut self.head) else {
                        break;
                    };
                    let enc = lap(&mut t);
                    self.stage(data, payload);
                    if let Some(p) = &mut self.prof {
                        p.encode += enc;
                        p.seal += lap(&mut t);
                        p.frames_out += 1;
                        p.bytes_out += (self.tx_len
                            + self.tx_borrow.as_ref().map_or(0, |r| r.len() * 4))
                            as u64;
                    }
                }
                let mut t = Instant::now();
                let w = self.write_some(data);
                if let Some(p) = &mut self.prof {
                    p.write += lap(&mut t);
                }
                match w {
                    Ok(true) => moved = true,
                    Ok(false) => break,
                    Err(e) => return Err(lost(cfg.right(), format!("write failed: {e}"))),
                }
            }
            // Receive: reduce each frame straight out of the receive buffer.
            while core.wants_frames() {
                let mut t = Instant::now();
                let r = self.read_step();
                if let Some(p) = &mut self.prof {
                    p.read += lap(&mut t);
                }
                match r {
                    Ok(ReadStep::Idle) => break,
                    Ok(ReadStep::Partial) => moved = true,
                    Ok(ReadStep::Frame(h, len)) => {
                        moved = true;
                        let r = core.handle_chunk(data, &h, &self.rx[CHUNK_HEADER_LEN..len]);
                        if let Some(p) = &mut self.prof {
                            p.reduce += lap(&mut t);
                            p.frames_in += 1;
                        }
                        r?;
                    }
                    Err((true, reason)) => {
                        return Err(Error::Malformed {
                            rank,
                            seq,
                            peer: cfg.left(),
                            reason,
                        })
                    }
                    Err((false, reason)) => return Err(lost(cfg.left(), reason)),
                }
            }
            if core.is_done() && !self.tx_pending() {
                return Ok(());
            }
            if moved {
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                core.handle_timeout(now)?;
                // Everything arrived but our last frame is still not taken.
                return Err(lost(
                    cfg.right(),
                    "could not hand over the last frame before the deadline".into(),
                ));
            }
            let mut t = Instant::now();
            self.wait(core.wants_frames(), deadline);
            if let Some(p) = &mut self.prof {
                p.wait += lap(&mut t);
            }
        }
    }

    /// Pushes out the pending frame, waiting at most until `end`.
    fn flush(&mut self, end: Instant) -> std::io::Result<()> {
        debug_assert!(
            self.tx_borrow.is_none(),
            "flush with a payload left in a buffer"
        );
        while self.tx_pending() {
            if !self.write_some(&[])? {
                if Instant::now() >= end {
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
                self.wait(false, end);
            }
        }
        Ok(())
    }

    fn inject(&mut self, mut bytes: Vec<u8>) -> Result<()> {
        let end = Instant::now() + Duration::from_secs(5);
        let io = |source| Error::Io {
            context: "injecting a raw frame".into(),
            source,
        };
        self.flush(end).map_err(io)?;
        if let Some(k) = &mut self.seal {
            k.seal(&mut bytes);
        }
        self.tx_len = bytes.len();
        self.tx = bytes;
        self.tx_off = 0;
        self.flush(end).map_err(io)
    }

    fn close(&mut self, grace: Duration) {
        if self.closed {
            return;
        }
        self.closed = true;
        if let Some(p) = &self.prof {
            eprintln!("rank {} TCP link profile (s): {p:?}", self.cfg.rank);
        }
        let _ = self.flush(Instant::now() + grace);
        let _ = self.out.shutdown(Shutdown::Write);
        let _ = self.inp.shutdown(Shutdown::Both);
    }
}

impl Drop for InlineDriver {
    fn drop(&mut self) {
        self.close(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringtune_protocol::encode_frame_prefix;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = encode_frame_prefix(body.len()).to_vec();
        f.extend_from_slice(body);
        f
    }

    fn open(k: &mut FrameKey, sealed: &[u8]) -> std::result::Result<Vec<u8>, ()> {
        let prefix: [u8; 4] = sealed[..4].try_into().unwrap();
        let mut rest = sealed[4..].to_vec();
        k.open(&prefix, &mut rest)?;
        rest.truncate(rest.len() - TAG_LEN);
        Ok(rest)
    }

    #[test]
    fn sealed_frames_open_in_order_and_nowhere_else() {
        let (mut tx, mut rx) = (FrameKey::new([5; 32]), FrameKey::new([5; 32]));
        let mut a = frame(b"first frame body");
        let mut b = frame(b"second frame");
        tx.seal(&mut a);
        tx.seal(&mut b);
        assert_eq!(a.len(), 4 + 16 + TAG_LEN);
        assert_ne!(&a[4..20], b"first frame body", "body must be encrypted");
        assert_eq!(open(&mut rx, &a).unwrap(), b"first frame body");
        assert_eq!(open(&mut rx, &b).unwrap(), b"second frame");
        // Replaying a frame fails: the counter moved on.
        assert!(open(&mut rx, &a).is_err());
        // Reordering fails.
        let (mut tx, mut rx) = (FrameKey::new([5; 32]), FrameKey::new([5; 32]));
        let (mut a, mut b) = (frame(b"one"), frame(b"two"));
        tx.seal(&mut a);
        tx.seal(&mut b);
        assert!(open(&mut rx, &b).is_err());
        // Another secret, a flipped bit, or a changed length prefix fails.
        let mut c = frame(b"payload");
        FrameKey::new([5; 32]).seal(&mut c);
        assert!(open(&mut FrameKey::new([6; 32]), &c).is_err());
        let mut flipped = c.clone();
        flipped[6] ^= 1;
        assert!(open(&mut FrameKey::new([5; 32]), &flipped).is_err());
        let mut relabelled = c.clone();
        relabelled[0] ^= 1;
        assert!(open(&mut FrameKey::new([5; 32]), &relabelled).is_err());
        assert_eq!(open(&mut FrameKey::new([5; 32]), &c).unwrap(), b"payload");
    }

    #[test]
    fn a_frame_sealed_from_a_separate_payload_is_the_same_frame() {
        let body: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        // Header lengths around AES blocks, the payload starting mid-block.
        for head in [4, 5, 20, 36] {
            let (mut whole_k, mut split_k) = (FrameKey::new([3; 32]), FrameKey::new([3; 32]));
            for _ in 0..2 {
                let mut whole = frame(&body[..head - 4 + 300]);
                whole_k.seal(&mut whole);
                let mut split = vec![0xEE; head + 300 + TAG_LEN];
                split[..head].copy_from_slice(&whole[..head]);
                // The head as it was before sealing: prefix, then the clear header bytes.
                split[4..head].copy_from_slice(&body[..head - 4]);
                split_k.seal_split(&mut split, head, &body[head - 4..head - 4 + 300]);
                assert_eq!(split, whole, "head {head}");
            }
            let mut rx = FrameKey::new([3; 32]);
            let mut f = frame(&body[..head - 4 + 300]);
            whole_k.seal(&mut f);
            rx.frames = 2;
            assert_eq!(open(&mut rx, &f).unwrap(), &body[..head - 4 + 300]);
        }
    }

    #[test]
    fn both_ends_ratchet_together() {
        let (mut tx, mut rx) = (FrameKey::new([9; 32]), FrameKey::new([9; 32]));
        // Pretend a lot has been sent already, so the next frame crosses the byte limit.
        tx.bytes = REKEY_BYTES - 1;
        rx.bytes = REKEY_BYTES - 1;
        let first_key = tx.secret;
        let mut a = frame(b"crosses the limit");
        tx.seal(&mut a);
        assert_ne!(tx.secret, first_key, "the sender ratcheted");
        assert_eq!(open(&mut rx, &a).unwrap(), b"crosses the limit");
        assert_eq!(rx.secret, tx.secret, "the receiver ratcheted in step");
        let mut b = frame(b"under the new key");
        tx.seal(&mut b);
        assert_eq!(open(&mut rx, &b).unwrap(), b"under the new key");
        // A receiver still on the old key cannot read it.
        let mut stale = FrameKey::new(first_key);
        stale.frames = 1;
        assert!(open(&mut stale, &b).is_err());
    }
}
