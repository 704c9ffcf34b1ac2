//! The sans-IO ring collectives: all-reduce (reduce-scatter then all-gather) and broadcast.
//!
//! Like `quinn-proto`, this module owns no socket, no thread and no clock. A driver feeds it
//! frames from the left neighbour ([`Collective::handle_chunk`]), drains the frames it wants
//! sent to the right neighbour ([`Collective::poll_transmit`]), and passes the time in
//! ([`Collective::handle_timeout`]). The same state machines run under the in-memory
//! transport, the network transports and the simulated network of the property tests.
//!
//! # Algorithm
//! The buffer of `len` f32 is split into `W` balanced segments, and every segment into the
//! same number `K` of balanced pieces (at most `chunk_elems` each). Piece `k` of every
//! segment forms an independent ring all-reduce, so the `K` pipelines overlap: a rank
//! forwards piece 0 while piece 1 is still arriving. In reduce-scatter round `t`, rank `r`
//! sends segment `r - t` and adds what it receives into segment `r - 1 - t`; after `W - 1`
//! rounds it holds the final sum of segment `r + 1`, which the all-gather rounds pass on.
//!
//! # Why every rank ends bit-identical
//! Segment `s` is always summed in the same order, `((x_s + x_{s+1}) + x_{s+2}) + …`,
//! whatever order the frames arrive in, and its final value is computed on exactly one rank
//! (`s - 1`) and then only *copied* around the ring. With the bf16 wire format, the owner
//! rounds its final value to bf16 before the all-gather, so it holds exactly what it sends.

use std::collections::VecDeque;
use std::ops::Range;
use std::time::{Duration, Instant};

use ringtune_protocol::{
    encode_frame_prefix, ChunkHeader, OpKind, Phase, WireDtype, CHUNK_HEADER_LEN,
};

use crate::error::{Error, Result};
use crate::types::{Rank, Seq, Step, WorldSize};

#[cfg(target_endian = "big")]
compile_error!("the f32 wire format is little-endian and cast without swapping");

/// Per-communicator settings of the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingConfig {
    /// This rank.
    pub rank: Rank,
    /// Number of ranks.
    pub world: WorldSize,
    /// Largest number of elements per frame; bigger chunks mean fewer frames, smaller
    /// chunks mean more pipelining.
    pub chunk_elems: usize,
    /// Element type on the wire.
    pub wire: WireDtype,
}

impl RingConfig {
    /// Checks the settings.
    pub fn new(rank: Rank, world: WorldSize, chunk_elems: usize, wire: WireDtype) -> Result<Self> {
        if world.0 == 0 || rank.0 >= world.0 {
            return Err(Error::InvalidArgument(format!(
                "rank {rank} outside world of size {world}"
            )));
        }
        if chunk_elems == 0 || chunk_elems > (u32::MAX as usize) / 4 {
            return Err(Error::InvalidArgument(format!(
                "chunk of {chunk_elems} elements (must be 1..=2^30-1)"
            )));
        }
        Ok(Self {
            rank,
            world,
            chunk_elems,
            wire,
        })
    }

    /// The neighbour this rank receives from.
    pub fn left(&self) -> Rank {
        Rank((self.rank.0 + self.world.0 - 1) % self.world.0)
    }

    /// The neighbour this rank sends to.
    pub fn right(&self) -> Rank {
        Rank((self.rank.0 + 1) % self.world.0)
    }

    /// Largest data-frame body this configuration sends or accepts.
    pub fn max_frame_body(&self) -> usize {
        CHUNK_HEADER_LEN + self.chunk_elems * 4
    }
}

/// A frame the core wants sent: its bytes were appended to the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// Destination rank (always the right neighbour).
    pub to: Rank,
    /// The frame's header (also encoded in the bytes).
    pub header: ChunkHeader,
}

/// One collective's state machine.
pub trait Collective {
    /// Feeds a frame received from the left neighbour; `data` is the collective's buffer.
    fn handle_chunk(
        &mut self,
        data: &mut [f32],
        header: &ChunkHeader,
        payload: &[u8],
    ) -> Result<()>;
    /// Appends the next frame to send (length prefix, header, payload) to `out`.
    fn poll_transmit(&mut self, data: &[f32], out: &mut Vec<u8>) -> Option<Transmit>;
    /// Like [`Collective::poll_transmit`], but where the payload's wire bytes are exactly
    /// the bytes of a range of `data` (f32 on the wire, little-endian host), appends only
    /// the prefix and header and returns that range, so a driver can write or seal the
    /// payload straight from the buffer instead of copying it into the frame first.
    ///
    /// The range stays unchanged until the right neighbour has the whole frame: every
    /// frame that could later change it (the same piece one round on, or its final value in
    /// the all-gather) is caused by this one having arrived.
    fn poll_transmit_split(
        &mut self,
        data: &[f32],
        head: &mut Vec<u8>,
    ) -> Option<(Transmit, Option<Range<usize>>)> {
        self.poll_transmit(data, head).map(|t| (t, None))
    }
    /// Whether [`Collective::poll_transmit`] has something.
    fn has_transmit(&self) -> bool;
    /// When [`Collective::handle_timeout`] should next be called.
    fn poll_timeout(&self) -> Option<Instant>;
    /// Fails the collective if its deadline has passed.
    fn handle_timeout(&mut self, now: Instant) -> Result<()>;
    /// All frames received and all frames handed out.
    fn is_done(&self) -> bool;
    /// Whether frames are still expected. Once every frame has arrived a driver must stop
    /// reading the link: the next frames there belong to the next collective (the left
    /// neighbour may be done already while this rank still flushes its own sends).
    fn wants_frames(&self) -> bool;
    /// Context for errors raised by drivers (link failures).
    fn ids(&self) -> (Rank, Seq, Step);
}

/// Start of part `i` of `n` balanced parts of `len`.
fn split(len: usize, n: usize, i: usize) -> usize {
    ((len as u128 * i as u128) / n as u128) as usize
}

/// How a buffer is cut into segments and pieces.
#[derive(Debug, Clone, Copy)]
struct Layout {
    len: usize,
    world: usize,
    pieces: usize,
}

impl Layout {
    fn new(len: usize, world: usize, chunk: usize) -> Self {
        let max_seg = len.div_ceil(world);
        Self {
            len,
            world,
            pieces: max_seg.div_ceil(chunk).max(1),
        }
    }

    fn piece(&self, segment: usize, piece: usize) -> Range<usize> {
        let s0 = split(self.len, self.world, segment);
        let s1 = split(self.len, self.world, segment + 1);
        let n = s1 - s0;
        s0 + split(n, self.pieces, piece)..s0 + split(n, self.pieces, piece + 1)
    }
}

/// What every collective shares: identity, deadline, header checks.
#[derive(Debug)]
struct Ctx {
    cfg: RingConfig,
    op: OpKind,
    seq: Seq,
    step: Step,
    len: usize,
    root: u32,
    deadline: Instant,
    timeout: Duration,
}

impl Ctx {
    /// Appends a frame carrying `data[range]` to `out`, or with `split` (and where the wire
    /// bytes are the buffer's own bytes) only its prefix and header, returning the range
    /// (see [`Collective::poll_transmit_split`]).
    fn emit(
        &self,
        header: ChunkHeader,
        range: Range<usize>,
        data: &[f32],
        out: &mut Vec<u8>,
        split: bool,
    ) -> (Transmit, Option<Range<usize>>) {
        let wire = self.cfg.wire;
        start_frame(out, &header, range.len() * wire.size());
        let t = Transmit {
            to: self.cfg.right(),
            header,
        };
        if split && wire == WireDtype::F32 && cfg!(target_endian = "little") {
            return (t, Some(range));
        }
        encode_payload(wire, &data[range], out);
        (t, None)
    }

    fn header(&self, phase: Phase, round: u32, piece: u32) -> ChunkHeader {
        ChunkHeader {
            op: self.op,
            phase,
            dtype: self.cfg.wire,
            src: self.cfg.rank.0,
            root: self.root,
            seq: self.seq.0,
            step: self.step.0,
            total_len: self.len as u64,
            round,
            piece,
        }
    }

    fn mismatch(&self, h: &ChunkHeader, what: String) -> Error {
        Error::Mismatch {
            rank: self.cfg.rank,
            seq: self.seq,
            step: self.step,
            peer: Rank(h.src),
            peer_seq: Seq(h.seq),
            peer_step: Step(h.step),
            what,
        }
    }

    fn malformed(&self, h: &ChunkHeader, reason: String) -> Error {
        Error::Malformed {
            rank: self.cfg.rank,
            seq: self.seq,
            peer: Rank(h.src),
            reason,
        }
    }

    /// Checks that a frame belongs to this collective, from the left neighbour.
    fn check(&self, h: &ChunkHeader) -> Result<()> {
        let left = self.cfg.left();
        if h.src != left.0 {
            return Err(self.malformed(
                h,
                format!("frame claims rank {} on the link from rank {left}", h.src),
            ));
        }
        if h.seq != self.seq.0 {
            return Err(self.mismatch(h, "collective sequence numbers differ".into()));
        }
        if h.op != self.op {
            return Err(self.mismatch(h, format!("peer runs {:?}, this rank {:?}", h.op, self.op)));
        }
        if h.step != self.step.0 {
            return Err(self.mismatch(h, "steps differ".into()));
        }
        if h.total_len != self.len as u64 {
            return Err(self.mismatch(
                h,
                format!(
                    "buffer of {} elements on the peer, {} here",
                    h.total_len, self.len
                ),
            ));
        }
        if h.dtype != self.cfg.wire {
            return Err(self.mismatch(
                h,
                format!(
                    "wire dtype {:?} on the peer, {:?} here",
                    h.dtype, self.cfg.wire
                ),
            ));
        }
        if h.root != self.root {
            return Err(self.mismatch(
                h,
                format!("root rank {} on the peer, {} here", h.root, self.root),
            ));
        }
        Ok(())
    }

    fn check_len(&self, h: &ChunkHeader, payload: &[u8], range: &Range<usize>) -> Result<()> {
        let want = range.len() * self.cfg.wire.size();
        if payload.len() != want {
            return Err(self.malformed(
                h,
                format!("payload of {} bytes, expected {want}", payload.len()),
            ));
        }
        Ok(())
    }

    fn timeout_error(&self, op: &'static str, waiting_for: Rank, progress: String) -> Error {
        Error::Timeout {
            rank: self.cfg.rank,
            op,
            seq: self.seq,
            step: self.step,
            after_ms: self.timeout.as_millis() as u64,
            waiting_for,
            progress,
        }
    }
}

fn encode_payload(wire: WireDtype, src: &[f32], out: &mut Vec<u8>) {
    match wire {
        WireDtype::F32 => out.extend_from_slice(bytemuck::cast_slice(src)),
        WireDtype::Bf16 => {
            let start = out.len();
            out.resize(start + src.len() * 2, 0);
            for (o, &x) in out[start..].chunks_exact_mut(2).zip(src) {
                o.copy_from_slice(&to_bf16_bits(x).to_le_bytes());
            }
        }
    }
}

/// f32 → bf16 bits, round to nearest even; branch-free so the loop vectorises (the
/// `half` crate's per-element conversion made the bf16 wire slower than f32). Bit-exact
/// with the `half` crate's `from_f32` for every non-NaN input; NaN stays a quiet NaN.
#[inline]
fn to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        ((b >> 16) as u16) | 0x0040
    } else {
        rounded
    }
}

#[inline]
fn from_bf16_bits(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `dst = received + dst`. (IEEE addition of two operands is commutative, so `+=` gives
/// the same bits; what matters for bit-identity is the fixed association across hops.)
fn add_payload(wire: WireDtype, dst: &mut [f32], payload: &[u8]) {
    match wire {
        WireDtype::F32 => {
            for (d, c) in dst.iter_mut().zip(payload.chunks_exact(4)) {
                *d += f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        WireDtype::Bf16 => {
            for (d, c) in dst.iter_mut().zip(payload.chunks_exact(2)) {
                *d += from_bf16_bits(u16::from_le_bytes([c[0], c[1]]));
            }
        }
    }
}

fn copy_payload(wire: WireDtype, dst: &mut [f32], payload: &[u8]) {
    match wire {
        WireDtype::F32 => bytemuck::cast_slice_mut::<f32, u8>(dst).copy_from_slice(payload),
        WireDtype::Bf16 => {
            for (d, c) in dst.iter_mut().zip(payload.chunks_exact(2)) {
                *d = from_bf16_bits(u16::from_le_bytes([c[0], c[1]]));
            }
        }
    }
}

fn start_frame(out: &mut Vec<u8>, header: &ChunkHeader, payload_bytes: usize) {
    out.reserve(4 + CHUNK_HEADER_LEN + payload_bytes);
    out.extend_from_slice(&encode_frame_prefix(CHUNK_HEADER_LEN + payload_bytes));
    out.extend_from_slice(&header.encode());
}

/// Ring all-reduce (sum) of one buffer; also the barrier (an all-reduce of one flag per rank).
#[derive(Debug)]
pub struct AllReduce {
    ctx: Ctx,
    layout: Layout,
    rs_got: Vec<bool>,
    ag_got: Vec<bool>,
    rs_n: usize,
    ag_n: usize,
    queue: VecDeque<(Phase, u32, u32)>,
}

impl AllReduce {
    /// Starts an all-reduce of a buffer of `len` elements. `op` is [`OpKind::AllReduce`] or
    /// [`OpKind::Barrier`] (only used to detect ranks that disagree on what they are doing).
    pub fn new(
        cfg: RingConfig,
        op: OpKind,
        seq: Seq,
        step: Step,
        len: usize,
        now: Instant,
        timeout: Duration,
    ) -> Self {
        let w = cfg.world.get();
        let layout = Layout::new(len, w, cfg.chunk_elems);
        let rounds = w - 1;
        let active = len > 0 && w > 1;
        let per_phase = if active { rounds * layout.pieces } else { 0 };
        let mut queue = VecDeque::new();
        if active {
            queue.extend((0..layout.pieces as u32).map(|k| (Phase::ReduceScatter, 0, k)));
        }
        Self {
            ctx: Ctx {
                cfg,
                op,
                seq,
                step,
                len,
                root: 0,
                deadline: now + timeout,
                timeout,
            },
            layout,
            rs_got: vec![false; per_phase],
            ag_got: vec![false; per_phase],
            rs_n: 0,
            ag_n: 0,
            queue,
        }
    }

    fn seg(&self, offset: i64) -> usize {
        let w = self.layout.world as i64;
        (self.ctx.cfg.rank.0 as i64 + offset).rem_euclid(w) as usize
    }

    /// The next queued frame's header and the range of the buffer it carries.
    fn next_frame(&mut self) -> Option<(ChunkHeader, Range<usize>)> {
        let (phase, round, piece) = self.queue.pop_front()?;
        let seg = match phase {
            Phase::ReduceScatter => self.seg(-(round as i64)),
            _ => self.seg(1 - round as i64),
        };
        let range = self.layout.piece(seg, piece as usize);
        Some((self.ctx.header(phase, round, piece), range))
    }
}

impl Collective for AllReduce {
    fn handle_chunk(&mut self, data: &mut [f32], h: &ChunkHeader, payload: &[u8]) -> Result<()> {
        self.ctx.check(h)?;
        let rounds = self.layout.world - 1;
        let (round, piece) = (h.round as usize, h.piece as usize);
        if round >= rounds || piece >= self.layout.pieces {
            return Err(self.ctx.malformed(
                h,
                format!(
                    "round {round} piece {piece} outside {rounds} rounds x {} pieces",
                    self.layout.pieces
                ),
            ));
        }
        let slot = round * self.layout.pieces + piece;
        let wire = self.ctx.cfg.wire;
        match h.phase {
            Phase::ReduceScatter => {
                if self.rs_got[slot] {
                    return Err(self.ctx.malformed(
                        h,
                        format!("duplicate reduce-scatter round {round} piece {piece}"),
                    ));
                }
                let range = self.layout.piece(self.seg(-1 - round as i64), piece);
                self.ctx.check_len(h, payload, &range)?;
                add_payload(wire, &mut data[range.clone()], payload);
                self.rs_got[slot] = true;
                self.rs_n += 1;
                if round + 1 < rounds {
                    self.queue
                        .push_back((Phase::ReduceScatter, h.round + 1, h.piece));
                } else {
                    // This rank now owns the final sum of this piece. Round it to what the
                    // wire carries so every rank ends with the same bits.
                    if wire == WireDtype::Bf16 {
                        for x in &mut data[range] {
                            *x = from_bf16_bits(to_bf16_bits(*x));
                        }
                    }
                    self.queue.push_back((Phase::AllGather, 0, h.piece));
                }
            }
            Phase::AllGather => {
                if self.ag_got[slot] {
                    return Err(self.ctx.malformed(
                        h,
                        format!("duplicate all-gather round {round} piece {piece}"),
                    ));
                }
                let range = self.layout.piece(self.seg(-(round as i64)), piece);
                self.ctx.check_len(h, payload, &range)?;
                copy_payload(wire, &mut data[range], payload);
                self.ag_got[slot] = true;
                self.ag_n += 1;
                if round + 1 < rounds {
                    self.queue
                        .push_back((Phase::AllGather, h.round + 1, h.piece));
                }
            }
            Phase::Broadcast => {
                return Err(self
                    .ctx
                    .mismatch(h, "broadcast frame during an all-reduce".into()))
            }
        }
        Ok(())
    }

    fn poll_transmit(&mut self, data: &[f32], out: &mut Vec<u8>) -> Option<Transmit> {
        let (header, range) = self.next_frame()?;
        Some(self.ctx.emit(header, range, data, out, false).0)
    }

    fn poll_transmit_split(
        &mut self,
        data: &[f32],
        head: &mut Vec<u8>,
    ) -> Option<(Transmit, Option<Range<usize>>)> {
        let (header, range) = self.next_frame()?;
        Some(self.ctx.emit(header, range, data, head, true))
    }

    fn has_transmit(&self) -> bool {
        !self.queue.is_empty()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        (!self.is_done()).then_some(self.ctx.deadline)
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<()> {
        if self.is_done() || now < self.ctx.deadline {
            return Ok(());
        }
        let n = self.rs_got.len();
        let name = if self.ctx.op == OpKind::Barrier {
            "barrier"
        } else {
            "all-reduce"
        };
        Err(self.ctx.timeout_error(
            name,
            self.ctx.cfg.left(),
            format!(
                "received {}/{n} reduce-scatter and {}/{n} all-gather chunks",
                self.rs_n, self.ag_n
            ),
        ))
    }

    fn is_done(&self) -> bool {
        self.queue.is_empty() && !self.wants_frames()
    }

    fn wants_frames(&self) -> bool {
        self.rs_n < self.rs_got.len() || self.ag_n < self.ag_got.len()
    }

    fn ids(&self) -> (Rank, Seq, Step) {
        (self.ctx.cfg.rank, self.ctx.seq, self.ctx.step)
    }
}

/// Pipelined broadcast along the ring from a root rank.
#[derive(Debug)]
pub struct Broadcast {
    ctx: Ctx,
    pieces: usize,
    got: Vec<bool>,
    n: usize,
    forward: bool,
    queue: VecDeque<u32>,
}

impl Broadcast {
    /// Starts a broadcast of `len` elements from `root`.
    /// Broadcasts always travel as f32: they carry parameters, which must arrive exact.
    pub fn new(
        mut cfg: RingConfig,
        root: Rank,
        seq: Seq,
        step: Step,
        len: usize,
        now: Instant,
        timeout: Duration,
    ) -> Result<Self> {
        cfg.wire = WireDtype::F32;
        if root.0 >= cfg.world.0 {
            return Err(Error::InvalidArgument(format!(
                "broadcast root {root} outside world of size {}",
                cfg.world
            )));
        }
        let w = cfg.world.0;
        let pieces = if w > 1 {
            len.div_ceil(cfg.chunk_elems)
        } else {
            0
        };
        let is_root = cfg.rank == root;
        // The rank just left of the root is the last one: it does not send back to the root.
        let forward = w > 1 && (cfg.rank.0 + 1) % w != root.0;
        let queue = if is_root {
            (0..pieces as u32).collect()
        } else {
            VecDeque::new()
        };
        Ok(Self {
            ctx: Ctx {
                cfg,
                op: OpKind::Broadcast,
                seq,
                step,
                len,
                root: root.0,
                deadline: now + timeout,
                timeout,
            },
            pieces,
            got: vec![is_root; pieces],
            n: if is_root { pieces } else { 0 },
            forward,
            queue,
        })
    }

    fn range(&self, piece: usize) -> Range<usize> {
        split(self.ctx.len, self.pieces, piece)..split(self.ctx.len, self.pieces, piece + 1)
    }

    /// The next queued piece's header and its range of the buffer.
    fn next_frame(&mut self) -> Option<(ChunkHeader, Range<usize>)> {
        let piece = self.queue.pop_front()?;
        let header = self.ctx.header(Phase::Broadcast, 0, piece);
        Some((header, self.range(piece as usize)))
    }
}

impl Collective for Broadcast {
    fn handle_chunk(&mut self, data: &mut [f32], h: &ChunkHeader, payload: &[u8]) -> Result<()> {
        self.ctx.check(h)?;
        if h.phase != Phase::Broadcast {
            return Err(self
                .ctx
                .mismatch(h, format!("{:?} frame during a broadcast", h.phase)));
        }
        let piece = h.piece as usize;
        if h.round != 0 || piece >= self.pieces || self.got[piece] {
            return Err(self.ctx.malformed(
                h,
                format!(
                    "unexpected or duplicate broadcast piece {piece} (round {})",
                    h.round
                ),
            ));
        }
        let range = self.range(piece);
        self.ctx.check_len(h, payload, &range)?;
        copy_payload(self.ctx.cfg.wire, &mut data[range], payload);
        self.got[piece] = true;
        self.n += 1;
        if self.forward {
            self.queue.push_back(h.piece);
        }
        Ok(())
    }

    fn poll_transmit(&mut self, data: &[f32], out: &mut Vec<u8>) -> Option<Transmit> {
        let (header, range) = self.next_frame()?;
        Some(self.ctx.emit(header, range, data, out, false).0)
    }

    fn poll_transmit_split(
        &mut self,
        data: &[f32],
        head: &mut Vec<u8>,
    ) -> Option<(Transmit, Option<Range<usize>>)> {
        let (header, range) = self.next_frame()?;
        Some(self.ctx.emit(header, range, data, head, true))
    }

    fn has_transmit(&self) -> bool {
        !self.queue.is_empty()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        (!self.is_done()).then_some(self.ctx.deadline)
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<()> {
        if self.is_done() || now < self.ctx.deadline {
            return Ok(());
        }
        Err(self.ctx.timeout_error(
            "broadcast",
            self.ctx.cfg.left(),
            format!(
                "received {}/{} chunks from root {}",
                self.n, self.pieces, self.ctx.root
            ),
        ))
    }

    fn is_done(&self) -> bool {
        self.queue.is_empty() && !self.wants_frames()
    }

    fn wants_frames(&self) -> bool {
        self.n < self.pieces
    }

    fn ids(&self) -> (Rank, Seq, Step) {
        (self.ctx.cfg.rank, self.ctx.seq, self.ctx.step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn bf16_conversion_matches_the_half_crate() {
        let mut x = 0x1234_5678u32;
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-45,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        let randoms = (0..200_000).map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            f32::from_bits(x)
        });
        for v in specials.into_iter().chain(randoms) {
            if v.is_nan() {
                assert!(from_bf16_bits(to_bf16_bits(v)).is_nan());
            } else {
                assert_eq!(to_bf16_bits(v), bf16::from_f32(v).to_bits(), "{v:e}");
            }
        }
    }
}
