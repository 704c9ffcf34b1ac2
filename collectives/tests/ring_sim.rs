//! The sans-IO ring core driven by a simulated network that delays, reorders and drops
//! frames under a virtual clock (no sockets, no threads), in the style of quinn-proto's
//! tests. Checks: the result is exactly the fixed-order sum and bit-identical on every rank;
//! a dead rank makes every other rank time out naming rank and sequence; a diverged rank
//! is reported with both sequence numbers.

#![allow(clippy::needless_range_loop)] // rank-indexed loops read like the algorithm

use std::time::{Duration, Instant};

use proptest::prelude::*;
use ringtune_collectives::ring::{AllReduce, Broadcast, Collective, RingConfig};
use ringtune_collectives::{Error, Rank, Seq, Step, WireDtype, WorldSize};
use ringtune_protocol::{ChunkHeader, OpKind, CHUNK_HEADER_LEN};

/// A tiny deterministic generator so a proptest seed fixes every delivery decision.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct InFlight {
    at: Instant,
    to: usize,
    bytes: Vec<u8>,
    /// A split frame's payload: the sender and the range of its buffer, read only when the
    /// frame is delivered (the latest a zero-copy driver could read it), plus what it held
    /// at send time to check that it did not change in between.
    borrowed: Option<(usize, std::ops::Range<usize>, Vec<f32>)>,
}

/// Runs one collective per rank over the simulated network. `dead` ranks never send.
/// Returns per-rank results.
fn simulate(
    cores: Vec<Box<dyn Collective>>,
    bufs: &mut [Vec<f32>],
    seed: u64,
    dead: &[usize],
    start: Instant,
) -> Vec<Result<(), Error>> {
    simulate_with(cores, bufs, seed, dead, start, false)
}

/// [`simulate`]; with `split`, frames are taken with `poll_transmit_split` and a borrowed
/// payload is read from the sender's buffer only on delivery, after checking it is what
/// the buffer held when the frame was sent.
fn simulate_with(
    mut cores: Vec<Box<dyn Collective>>,
    bufs: &mut [Vec<f32>],
    seed: u64,
    dead: &[usize],
    start: Instant,
    split: bool,
) -> Vec<Result<(), Error>> {
    let w = cores.len();
    let mut rng = Rng(seed | 1);
    let mut now = start;
    let mut net: Vec<InFlight> = Vec::new();
    let mut result: Vec<Option<Result<(), Error>>> = (0..w).map(|_| None).collect();
    loop {
        for r in 0..w {
            if result[r].is_some() || dead.contains(&r) {
                continue;
            }
            let mut out = Vec::new();
            loop {
                let (t, borrowed) = if split {
                    match cores[r].poll_transmit_split(&bufs[r], &mut out) {
                        Some((t, range)) => (t, range.map(|g| (r, g.clone(), bufs[r][g].to_vec()))),
                        None => break,
                    }
                } else {
                    match cores[r].poll_transmit(&bufs[r], &mut out) {
                        Some(t) => (t, None),
                        None => break,
                    }
                };
                let delay = Duration::from_micros(rng.below(500));
                net.push(InFlight {
                    at: now + delay,
                    to: t.to.idx(),
                    bytes: std::mem::take(&mut out),
                    borrowed,
                });
            }
            if cores[r].is_done() {
                result[r] = Some(Ok(()));
            }
        }
        let live_pending = (0..w).any(|r| result[r].is_none() && !dead.contains(&r));
        if !live_pending {
            break;
        }
        if net.is_empty() {
            // Nothing in flight: jump the clock to the earliest deadline.
            let t = (0..w)
                .filter(|&r| result[r].is_none() && !dead.contains(&r))
                .filter_map(|r| cores[r].poll_timeout())
                .min()
                .expect("a pending rank has a deadline");
            now = now.max(t);
            for r in 0..w {
                if result[r].is_none() && !dead.contains(&r) {
                    if let Err(e) = cores[r].handle_timeout(now) {
                        result[r] = Some(Err(e));
                    }
                }
            }
            continue;
        }
        // Deliver a random one among the frames due soonest (reordering across pieces,
        // rounds and phases), advancing the virtual clock.
        let earliest = net.iter().map(|m| m.at).min().unwrap();
        let window: Vec<usize> = (0..net.len())
            .filter(|&i| net[i].at <= earliest + Duration::from_micros(300))
            .collect();
        let i = window[rng.below(window.len() as u64) as usize];
        let mut m = net.swap_remove(i);
        now = now.max(m.at);
        if result[m.to].is_some() || dead.contains(&m.to) {
            continue;
        }
        if let Some((from, range, sent)) = m.borrowed.take() {
            let now_there = &bufs[from][range.clone()];
            assert!(
                now_there
                    .iter()
                    .map(|v| v.to_bits())
                    .eq(sent.iter().map(|v| v.to_bits())),
                "rank {from} changed {range:?} while a frame carrying it was in flight"
            );
            m.bytes.extend_from_slice(bytemuck::cast_slice(now_there));
        }
        let header = ChunkHeader::decode(&m.bytes[4..]).expect("core emits valid headers");
        let payload = &m.bytes[4 + CHUNK_HEADER_LEN..];
        if let Err(e) = cores[m.to].handle_chunk(&mut bufs[m.to], &header, payload) {
            result[m.to] = Some(Err(e));
        }
    }
    result.into_iter().map(|r| r.unwrap_or(Ok(()))).collect()
}

fn inputs(w: usize, len: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    (0..w)
        .map(|_| {
            (0..len)
                .map(|_| (rng.below(2_000_001) as f32 - 1_000_000.0) / 3_000.0)
                .collect()
        })
        .collect()
}

fn cfg(r: usize, w: usize, chunk: usize, wire: WireDtype) -> RingConfig {
    RingConfig::new(Rank(r as u32), WorldSize(w as u32), chunk, wire).unwrap()
}

fn all_reduce_cores(
    w: usize,
    len: usize,
    chunk: usize,
    wire: WireDtype,
    now: Instant,
    timeout: Duration,
) -> Vec<Box<dyn Collective>> {
    (0..w)
        .map(|r| {
            Box::new(AllReduce::new(
                cfg(r, w, chunk, wire),
                OpKind::AllReduce,
                Seq(7),
                Step(3),
                len,
                now,
                timeout,
            )) as Box<dyn Collective>
        })
        .collect()
}

/// Segment `s` of the ring is summed as ((x_s + x_{s+1}) + x_{s+2}) + …; replicate that.
fn fixed_order_sum(x: &[Vec<f32>]) -> Vec<f32> {
    let (w, len) = (x.len(), x[0].len());
    (0..len)
        .map(|i| {
            let s = (0..w)
                .rev()
                .find(|&s| (len as u128 * s as u128 / w as u128) as usize <= i)
                .unwrap();
            let mut acc = x[s][i];
            for j in 1..w {
                acc += x[(s + j) % w][i];
            }
            acc
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn all_reduce_is_the_fixed_order_sum_on_every_rank(
        w in 1usize..=8, len in 0usize..400, chunk in 1usize..64, seed in any::<u64>(),
        split in any::<bool>(),
    ) {
        let x = inputs(w, len, seed);
        let mut bufs = x.clone();
        let now = Instant::now();
        let res = simulate_with(all_reduce_cores(w, len, chunk, WireDtype::F32, now, Duration::from_secs(1)), &mut bufs, seed, &[], now, split);
        for r in res { prop_assert!(r.is_ok(), "{:?}", r); }
        let want = fixed_order_sum(&x);
        for r in 0..w {
            // Bit-identical to the fixed order, hence to each other.
            prop_assert_eq!(bufs[r].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "rank {}", r);
        }
        // And close to the exact sum (reordering tolerance of f32).
        for i in 0..len {
            let exact: f64 = x.iter().map(|v| v[i] as f64).sum();
            let mag: f64 = x.iter().map(|v| (v[i] as f64).abs()).sum();
            prop_assert!((bufs[0][i] as f64 - exact).abs() <= mag * 1e-6 + 1e-6);
        }
    }

    #[test]
    fn bf16_wire_is_bit_identical_and_close(
        w in 2usize..=6, len in 1usize..300, chunk in 1usize..50, seed in any::<u64>(),
    ) {
        let x = inputs(w, len, seed);
        let mut bufs = x.clone();
        let now = Instant::now();
        let res = simulate(all_reduce_cores(w, len, chunk, WireDtype::Bf16, now, Duration::from_secs(1)), &mut bufs, seed, &[], now);
        for r in res { prop_assert!(r.is_ok(), "{:?}", r); }
        for r in 1..w {
            prop_assert_eq!(bufs[r].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), bufs[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        }
        for i in 0..len {
            let exact: f64 = x.iter().map(|v| v[i] as f64).sum();
            let mag: f64 = x.iter().map(|v| (v[i] as f64).abs()).sum();
            // bf16 keeps 8 significant bits; each of the W hops can round once.
            prop_assert!((bufs[0][i] as f64 - exact).abs() <= mag * (w as f64) * 2f64.powi(-8) + 1e-6);
        }
    }

    #[test]
    fn broadcast_copies_the_root_exactly(
        w in 1usize..=8, len in 0usize..300, chunk in 1usize..50, root in 0usize..8, seed in any::<u64>(),
        split in any::<bool>(),
    ) {
        let root = root % w;
        let x = inputs(w, len, seed);
        let mut bufs = x.clone();
        let now = Instant::now();
        let cores = (0..w).map(|r| Box::new(Broadcast::new(cfg(r, w, chunk, WireDtype::Bf16), Rank(root as u32), Seq(1), Step(0), len, now, Duration::from_secs(1)).unwrap()) as Box<dyn Collective>).collect();
        let res = simulate_with(cores, &mut bufs, seed, &[], now, split);
        for r in res { prop_assert!(r.is_ok(), "{:?}", r); }
        for r in 0..w {
            prop_assert_eq!(&bufs[r], &x[root]);
        }
    }
}

#[test]
fn a_dead_rank_makes_every_other_rank_time_out_naming_rank_and_seq() {
    let (w, len) = (4, 1000);
    let x = inputs(w, len, 5);
    let mut bufs = x.clone();
    let now = Instant::now();
    let timeout = Duration::from_secs(2);
    let res = simulate(
        all_reduce_cores(w, len, 64, WireDtype::F32, now, timeout),
        &mut bufs,
        11,
        &[2],
        now,
    );
    for (r, out) in res.iter().enumerate() {
        if r == 2 {
            continue;
        }
        match out {
            Err(Error::Timeout {
                rank,
                seq,
                step,
                waiting_for,
                ..
            }) => {
                assert_eq!((rank.idx(), *seq, *step), (r, Seq(7), Step(3)));
                assert_eq!(waiting_for.idx(), (r + w - 1) % w);
                let msg = out.as_ref().unwrap_err().to_string();
                assert!(
                    msg.contains(&format!("rank {r}"))
                        && msg.contains("seq 7")
                        && msg.contains("step 3"),
                    "{msg}"
                );
            }
            other => panic!("rank {r}: expected a timeout, got {other:?}"),
        }
    }
}

#[test]
fn a_diverged_rank_is_a_mismatch_naming_both_sequences() {
    let (w, len) = (3, 90);
    let now = Instant::now();
    let mut cores = all_reduce_cores(w, len, 16, WireDtype::F32, now, Duration::from_secs(1));
    // Rank 0 thinks this is collective 8: rank 1 (its right neighbour) must notice.
    cores[0] = Box::new(AllReduce::new(
        cfg(0, w, 16, WireDtype::F32),
        OpKind::AllReduce,
        Seq(8),
        Step(3),
        len,
        now,
        Duration::from_secs(1),
    ));
    let mut bufs = inputs(w, len, 1);
    let res = simulate(cores, &mut bufs, 3, &[], now);
    let e = res[1].as_ref().unwrap_err();
    assert!(
        matches!(
            e,
            Error::Mismatch {
                rank: Rank(1),
                seq: Seq(7),
                peer: Rank(0),
                peer_seq: Seq(8),
                ..
            }
        ),
        "{e}"
    );
    // Different buffer lengths are caught the same way.
    let mut cores = all_reduce_cores(w, len, 16, WireDtype::F32, now, Duration::from_secs(1));
    cores[2] = Box::new(AllReduce::new(
        cfg(2, w, 16, WireDtype::F32),
        OpKind::AllReduce,
        Seq(7),
        Step(3),
        len + 1,
        now,
        Duration::from_secs(1),
    ));
    let mut bufs = inputs(w, len + 1, 1);
    let res = simulate(cores, &mut bufs, 3, &[], now);
    let e = res[0].as_ref().unwrap_err();
    assert!(
        e.to_string().contains("91 elements on the peer, 90 here"),
        "{e}"
    );
}

#[test]
fn forged_frames_are_rejected_not_applied() {
    let now = Instant::now();
    let c = cfg(1, 3, 8, WireDtype::F32);
    let mut core = AllReduce::new(
        c,
        OpKind::AllReduce,
        Seq(0),
        Step(0),
        48,
        now,
        Duration::from_secs(1),
    );
    let mut buf = vec![1.0f32; 48];
    let h = ChunkHeader {
        op: OpKind::AllReduce,
        phase: ringtune_protocol::Phase::ReduceScatter,
        dtype: WireDtype::F32,
        src: 0,
        root: 0,
        seq: 0,
        step: 0,
        total_len: 48,
        round: 0,
        piece: 0,
    };
    // Wrong payload length: refused before touching the buffer.
    let e = core.handle_chunk(&mut buf, &h, &[0u8; 12]).unwrap_err();
    assert!(
        e.to_string().contains("payload of 12 bytes, expected 32"),
        "{e}"
    );
    // Round out of range.
    let e = core
        .handle_chunk(&mut buf, &ChunkHeader { round: 5, ..h }, &[0u8; 32])
        .unwrap_err();
    assert!(matches!(e, Error::Malformed { .. }), "{e}");
    // Impostor rank on the left link.
    let e = core
        .handle_chunk(&mut buf, &ChunkHeader { src: 2, ..h }, &[0u8; 32])
        .unwrap_err();
    assert!(e.to_string().contains("claims rank 2"), "{e}");
    assert!(buf.iter().all(|&v| v == 1.0));
    // A valid one is applied once; the duplicate is refused.
    core.handle_chunk(&mut buf, &h, &[0u8; 32]).unwrap();
    assert!(core
        .handle_chunk(&mut buf, &h, &[0u8; 32])
        .unwrap_err()
        .to_string()
        .contains("duplicate"));
}
