//! NCCL smoke test for a one-GPU machine (feature `nccl`): joins a world-size-1
//! communicator and runs each GradSync operation once, checking the results.
//!
//!     cargo build -p ringtune-collectives --features nccl --example nccl_smoke

use std::time::{Duration, Instant};

use ringtune_collectives::nccl::{NcclId, NcclSync};
use ringtune_collectives::{Call, GradSync, Rank, WorldSize};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let id = NcclId::new()?;
    let mut s = NcclSync::new(0, Rank(0), WorldSize(1), id)?;
    let call = Call::new(1, Duration::from_secs(30));
    let n = 16 << 20; // 64 MiB of f32
    let mut v: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.5).collect();
    let want = v.clone();
    let t0 = Instant::now();
    s.all_reduce_sum(&mut v, call)?;
    let t1 = t0.elapsed();
    assert_eq!(v, want, "world-size-1 all-reduce must be the identity");
    let mut b = vec![3.0f32; 1000];
    s.broadcast(&mut b, Rank(0), call)?;
    assert!(b.iter().all(|&x| x == 3.0));
    s.barrier(call)?;
    let mut empty: Vec<f32> = Vec::new();
    s.all_reduce_sum(&mut empty, call)?;
    let bad = s.broadcast(&mut b, Rank(3), call).unwrap_err();
    println!("bad root refused: {bad}");
    let t0 = Instant::now();
    for _ in 0..10 {
        s.all_reduce_sum(&mut v, call)?;
    }
    println!(
        "NCCL world 1 OK: first 64 MiB all-reduce (incl. staging) {:?}, then {:?} each; next seq {}",
        t1,
        t0.elapsed() / 10,
        s.next_seq()
    );
    Ok(())
}
