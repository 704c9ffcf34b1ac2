//! The in-memory transport: a whole cluster of threads in one process.

use std::time::Duration;

use ringtune_collectives::mem::{mem_cluster, MemSync};
use ringtune_collectives::{Call, Error, GradSync, Rank, WireDtype};

fn run<T: Send + 'static>(
    world: u32,
    f: impl Fn(MemSync) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let hs: Vec<_> = mem_cluster(world, 37, WireDtype::F32)
        .unwrap()
        .into_iter()
        .map(|s| {
            let f = f.clone();
            std::thread::spawn(move || f(s))
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn every_world_size_sums_exactly_and_identically() {
    for world in 1..=5u32 {
        let out = run(world, |mut s| {
            let r = s.rank().0 as f32;
            let call = Call::new(0, Duration::from_secs(5));
            let mut v: Vec<f32> = (0..1003).map(|i| 0.1 * i as f32 + r * 0.37).collect();
            s.all_reduce_sum(&mut v, call).unwrap();
            let mut b = vec![r; 91];
            s.broadcast(&mut b, Rank(s.world_size().0 - 1), call)
                .unwrap();
            s.barrier(call).unwrap();
            (v, b)
        });
        for (v, b) in &out {
            assert_eq!(
                v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                out[0].0.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            assert!(b.iter().all(|&x| x == (world - 1) as f32));
        }
        for (i, &x) in out[0].0.iter().enumerate() {
            let want: f64 = (0..world)
                .map(|r| (0.1 * i as f32 + r as f32 * 0.37) as f64)
                .sum();
            assert!(
                (x as f64 - want).abs() < 1e-3,
                "world {world} i {i}: {x} vs {want}"
            );
        }
    }
}

#[test]
fn a_stalled_rank_times_out_the_others() {
    let out = run(3, |mut s| {
        if s.rank() == Rank(0) {
            // Alive (links open) but never joins: a stalled peer, not a dead one.
            std::thread::sleep(Duration::from_millis(1500));
            return None;
        }
        let t0 = std::time::Instant::now();
        let mut v = vec![1.0f32; 100];
        let e = s
            .all_reduce_sum(&mut v, Call::new(9, Duration::from_millis(300)))
            .unwrap_err();
        Some((e, t0.elapsed()))
    });
    for (r, o) in out.into_iter().enumerate().skip(1) {
        let (e, took) = o.unwrap();
        assert!(took < Duration::from_millis(1200), "rank {r}: {took:?}");
        assert!(
            matches!(e, Error::Timeout { .. } | Error::PeerLost { .. }),
            "rank {r}: {e}"
        );
        assert!(
            e.to_string().contains("seq 0") && e.to_string().contains("step 9"),
            "{e}"
        );
    }
}

#[test]
fn many_pieces_many_rounds_stay_exact() {
    // Pipelines of 64 pieces per segment over 4 ranks, repeated: the shape of the 256 MiB
    // benchmark, scaled down.
    let hs: Vec<_> = mem_cluster(4, 64, WireDtype::F32)
        .unwrap()
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                let r = s.rank().0 as f32 + 1.0;
                let n = 4 * 64 * 64 + 3;
                for step in 0..20u64 {
                    let call = Call::new(step, Duration::from_secs(10));
                    s.barrier(call).unwrap();
                    let mut v: Vec<f32> = (0..n).map(|i| (i % 7 + 1) as f32 * r).collect();
                    s.all_reduce_sum(&mut v, call).unwrap();
                    assert!(v
                        .iter()
                        .enumerate()
                        .all(|(i, &x)| x == (i % 7 + 1) as f32 * 10.0));
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
}
