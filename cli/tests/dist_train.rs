//! The distributed runtime end to end: `ringtune train` with `nodes = 2` (the coordinator
//! in-process, two `ringtune node` children, gradients summed over a real QUIC ring on
//! 127.0.0.1, then over TCP + TLS) against the one-process trainer with the same global
//! batch.

mod dist_common;

use dist_common::*;

/// ‖a − b‖ / ‖b‖ over every adapter tensor.
fn relative_difference(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f64 {
    assert_eq!(
        a.iter().map(|t| &t.0).collect::<Vec<_>>(),
        b.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    let (mut diff, mut norm) = (0f64, 0f64);
    for ((_, x), (_, y)) in a.iter().zip(b) {
        assert_eq!(x.len(), y.len());
        for (p, q) in x.iter().zip(y) {
            diff += (*p as f64 - *q as f64).powi(2);
            norm += (*q as f64).powi(2);
        }
    }
    (diff / norm).sqrt()
}

fn losses(run: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn two_nodes_match_one_process_and_every_rank_agrees_after_every_step() {
    const STEPS: u64 = 20;
    let one = tempfile::tempdir().unwrap();
    let cfg1 = config(one.path(), 1, STEPS, "");
    let (st, err) = spawn(&["train", cfg1.to_str().unwrap(), "--plain"], &[]).wait_exit(300);
    assert!(st.success(), "W=1 run failed:\n{err}");

    let two = tempfile::tempdir().unwrap();
    let cfg2 = config(two.path(), 2, STEPS, "");
    // --hash-every 1 (the default, spelled out): the coordinator compares every rank's
    // adapter SHA-256 after every step and fails the run, naming the ranks, on a mismatch.
    let (st, err) = spawn(
        &[
            "train",
            cfg2.to_str().unwrap(),
            "--plain",
            "--hash-every",
            "1",
        ],
        &[],
    )
    .wait_exit(300);
    assert!(st.success(), "W=2 run failed:\n{err}");
    assert!(err.contains("generation 0 with 2 rank(s)"), "{err}");
    assert!(err.contains("every rank's adapter hash agreed"), "{err}");

    let run1 = one.path().join("run");
    let run2 = two.path().join("run");
    let l1 = losses(&run1);
    let l2 = losses(&run2);
    assert_eq!(l1.len(), STEPS as usize);
    assert_eq!(
        l2.len(),
        STEPS as usize,
        "one metrics line per step from the coordinator"
    );
    for (i, (a, b)) in l1.iter().zip(&l2).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs(),
            "step {}: loss {a} (W=1) vs {b} (W=2)",
            i + 1
        );
    }
    let step = format!("checkpoints/step-{STEPS}/adapter");
    let a1 = adapter(&run1.join(&step));
    let a2 = adapter(&run2.join(&step));
    let rel = relative_difference(&a2, &a1);
    eprintln!("relative adapter difference W=2 vs W=1 after {STEPS} steps: {rel:.3e}");
    assert!(rel <= 1e-5, "adapters differ by {rel:.3e} relative");
    // The runs trained something (the adapter B matrices start at zero).
    assert!(a1
        .iter()
        .any(|(n, v)| n.contains("lora_B") && v.iter().any(|x| *x != 0.0)));

    // The same two-node run over TCP + TLS instead of QUIC, and with AdamW on the nodes'
    // device path (what a GPU rank runs; here on the CPU). The ring sums in the same fixed
    // order whatever carries it, and a rank's device AdamW takes the host norm and the
    // host's operation order: the adapter must be the QUIC run's bit for bit.
    let tcp = tempfile::tempdir().unwrap();
    let cfg3 = config(tcp.path(), 2, STEPS, "");
    let (st, err) = spawn(
        &[
            "train",
            cfg3.to_str().unwrap(),
            "--plain",
            "--set",
            "ring_transport=tcp-tls",
        ],
        &[("RINGTUNE_DEVICE_ADAMW", "1")],
    )
    .wait_exit(300);
    assert!(st.success(), "W=2 tcp-tls run failed:\n{err}");
    assert!(err.contains("every rank's adapter hash agreed"), "{err}");
    let run3 = tcp.path().join("run");
    assert_eq!(losses(&run3), l2, "tcp-tls losses differ from QUIC's");
    let bits = |a: &[(String, Vec<f32>)]| -> Vec<(String, Vec<u32>)> {
        a.iter()
            .map(|(n, v)| (n.clone(), v.iter().map(|x| x.to_bits()).collect()))
            .collect()
    };
    let a3 = adapter(&run3.join(&step));
    assert!(
        bits(&a3) == bits(&a2),
        "the tcp-tls adapter is not the QUIC run's bit for bit"
    );
}
