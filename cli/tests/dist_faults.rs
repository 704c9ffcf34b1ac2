//! Failures of the distributed runtime with real processes: a node killed with SIGKILL,
//! the coordinator killed, a node with the wrong token, a node of another run. None may
//! hang or leave a process behind.

mod dist_common;

use std::time::{Duration, Instant};

use dist_common::*;

#[test]
fn a_node_killed_mid_run_is_reported_with_its_rank_and_step() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2, 100_000, "");
    let mut train = spawn(&["train", cfg.to_str().unwrap(), "--plain"], &[]);
    train.wait_for("step 1/", 120);
    let nodes = children_of(train.child.id());
    assert_eq!(nodes.len(), 2, "two node processes: {nodes:?}");
    let killed_at = Instant::now();
    kill_9(nodes[1]);
    let (st, err) = train.wait_exit(60);
    let took = killed_at.elapsed();
    assert!(!st.success(), "the run must fail:\n{err}");
    assert!(
        took < Duration::from_secs(20),
        "reported after {took:?}:\n{err}"
    );
    let line = err
        .lines()
        .find(|l| l.contains("node failure"))
        .unwrap_or_else(|| panic!("no failure line:\n{err}"));
    // The harness saw the process end and told the coordinator, which therefore did not
    // wait for the heartbeat timeout (a killed process closes nothing over QUIC).
    assert!(line.contains("disconnected"), "{line}");
    assert!(line.contains("rank"), "{line}");
    assert!(line.contains("step"), "{line}");
    assert!(err.contains("distributed run failed"), "{err}");
    // A survivor stuck in the all-reduce says why it was stopped.
    if let Some(l) = err.lines().find(|l| l.contains("training is stuck")) {
        assert!(l.contains("was told to stop (run failed: "), "{l}");
    }
    // No orphans: the surviving node exited too.
    for pid in nodes {
        assert!(!alive(pid), "node process {pid} outlived the run:\n{err}");
    }
}

#[test]
fn nodes_exit_with_a_clear_error_when_the_coordinator_dies() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2, 100_000, "");
    let (mut coord, addr) = start_coordinator(None, cfg.to_str().unwrap(), &[]);
    let n0 = start_node(None, &addr, 0, TOKEN, &[]);
    let n1 = start_node(None, &addr, 1, TOKEN, &[]);
    coord.wait_for("step 1/", 120);
    coord.child.kill().unwrap();
    coord.child.wait().unwrap();
    for n in [n0, n1] {
        let (st, err) = n.wait_exit(30);
        assert!(
            !st.success(),
            "a node must fail when its coordinator dies:\n{err}"
        );
        assert!(
            err.contains("lost the coordinator") || err.contains("stuck"),
            "unclear error:\n{err}"
        );
        assert!(
            err.contains(&addr),
            "the error names the coordinator {addr}:\n{err}"
        );
    }
}

#[test]
fn wrong_token_and_foreign_config_are_refused_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2, 6, "");
    let other_dir = tempfile::tempdir().unwrap();
    let other = config(other_dir.path(), 2, 6, "");
    // Another run: a different learning rate changes the config hash.
    edit_config(&other, "lr = 1e-3", "lr = 2e-3");
    // The run's config is the file with an override; a node proves it has the same with
    // `--config FILE --set …`.
    let (mut coord, addr) = start_coordinator(
        None,
        cfg.to_str().unwrap(),
        &["--set", "optimizer.lr=0.004"],
    );
    let node = |slot, token: &str, extra: &[&str]| start_node(None, &addr, slot, token, extra);
    let bad = node(0, "not-the-cluster-token-at-all", &[]);
    let (st, err) = bad.wait_exit(30);
    assert!(!st.success());
    assert!(err.contains("wrong cluster token"), "{err}");
    coord.wait_for("refused", 10);

    let foreign = node(0, TOKEN, &["--config", other.to_str().unwrap()]);
    let (st, err) = foreign.wait_exit(30);
    assert!(!st.success());
    assert!(err.contains("config hash"), "{err}");
    coord.wait_for("refused", 10);

    let without_set = node(0, TOKEN, &["--config", cfg.to_str().unwrap()]);
    let (st, err) = without_set.wait_exit(30);
    assert!(!st.success());
    assert!(err.contains("config hash"), "{err}");
    coord.wait_for("refused", 10);

    let n0 = node(
        0,
        TOKEN,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            "optimizer.lr=0.004",
        ],
    );
    let n1 = node(1, TOKEN, &[]);
    let (st, err) = coord.wait_exit(120);
    assert!(st.success(), "the run did not go on:\n{err}");
    assert!(err.contains("done: 6 steps"), "{err}");
    for n in [n0, n1] {
        let (st, err) = n.wait_exit(30);
        assert!(st.success(), "{err}");
    }
}

#[test]
fn with_restarts_a_killed_node_is_replaced_and_the_run_ends_like_an_uninterrupted_one() {
    const STEPS: u64 = 24;
    let extra_steps = |dir: &std::path::Path| {
        let cfg = config(dir, 2, STEPS, "");
        edit_config(&cfg, "save_every = 0", "save_every = 4");
        cfg
    };
    let reference = tempfile::tempdir().unwrap();
    let cfg = extra_steps(reference.path());
    let (st, err) = spawn(&["train", cfg.to_str().unwrap(), "--plain"], &[]).wait_exit(300);
    assert!(st.success(), "reference run failed:\n{err}");

    let dir = tempfile::tempdir().unwrap();
    let cfg = extra_steps(dir.path());
    let mut train = spawn(
        &[
            "train",
            cfg.to_str().unwrap(),
            "--plain",
            "--heartbeat-timeout",
            "2",
            "--max-restarts",
            "2",
        ],
        &[],
    );
    // Past the first checkpoint, so the restart resumes from it.
    train.wait_for("checkpoint: step 4", 120);
    let nodes = children_of(train.child.id());
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    kill_9(nodes[0]);
    let (st, err) = train.wait_exit(240);
    assert!(st.success(), "the run did not recover:\n{err}");
    assert!(err.contains("restarting all nodes from step"), "{err}");
    assert!(err.contains(&format!("done: {STEPS} steps")), "{err}");
    let step = format!("run/checkpoints/step-{STEPS}/adapter");
    let a = adapter(&dir.path().join(&step));
    let b = adapter(&reference.path().join(&step));
    assert!(
        a == b,
        "the recovered run's final adapter differs from the uninterrupted run's"
    );
    // The steps run again after the restart replace their first lines: one line per step.
    let metrics = std::fs::read_to_string(dir.path().join("run/metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=STEPS).collect::<Vec<_>>());
}

#[test]
fn ctrl_c_stops_every_node_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2, 100_000, "");
    let mut train = spawn(&["train", cfg.to_str().unwrap(), "--plain"], &[]);
    train.wait_for("step 1/", 120);
    let nodes = children_of(train.child.id());
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    signal("INT", &[train.child.id()]);
    let (st, err) = train.wait_exit(60);
    assert!(st.success(), "an interrupt is a clean stop:\n{err}");
    assert!(err.contains("interrupted after step"), "{err}");
    for pid in nodes {
        assert!(!alive(pid), "node process {pid} outlived the run:\n{err}");
    }
}

/// Ctrl-C (here SIGTERM) while the nodes are still starting, before any has joined: the
/// command still stops cleanly and at once (it used to wait 10 s for the node that was
/// never told to stop, kill it and exit 1), and no node is left behind.
#[test]
fn an_interrupt_before_the_nodes_join_stops_cleanly_and_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2, 100_000, "");
    let mut train = spawn(&["train", cfg.to_str().unwrap(), "--plain"], &[]);
    train.wait_for("listening on", 120);
    let t0 = std::time::Instant::now();
    signal("TERM", &[train.child.id()]);
    let pid = train.child.id();
    let (st, err) = train.wait_exit(60);
    assert!(st.success(), "an interrupt is a clean stop:\n{err}");
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(6),
        "{:?}:\n{err}",
        t0.elapsed()
    );
    assert!(
        err.contains("interrupted after step 0; no checkpoint was written yet"),
        "{err}"
    );
    assert!(children_of(pid).is_empty(), "{err}");
}

/// What a node brings of its own: `--device` is where it runs, not part of the run (a GPU
/// node passes `cuda:N`; here `cpu` against the run's `auto`, which used to be refused as
/// "another config"); and a launcher that started another number of processes than the
/// run has ranks is named by every node at once.
#[test]
fn a_nodes_device_is_its_own_and_a_launchers_world_size_must_match() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2, 2, "");
    // The run says `auto`; the nodes below say `cpu` for themselves.
    let (coord, addr) = start_coordinator(
        None,
        cfg.to_str().unwrap(),
        &["--set", "model.device=\"auto\""],
    );
    // torchrun's variables for a 3-process launch of this 2-rank run.
    let port = addr.rsplit_once(':').unwrap().1.to_string();
    let torchrun = |rank: &str| {
        spawn_in(
            None,
            &["node", "--threads", "1", "--connect-timeout", "30"],
            &[
                ("RINGTUNE_TOKEN", TOKEN),
                ("RANK", rank),
                ("WORLD_SIZE", "3"),
                ("LOCAL_RANK", rank),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", &port),
            ],
        )
    };
    let t0 = std::time::Instant::now();
    let (st, err) = torchrun("0").wait_exit(60);
    assert!(!st.success(), "{err}");
    assert!(
        err.contains("WORLD_SIZE=3, but the run's config has nodes = 2"),
        "{err}"
    );
    assert!(t0.elapsed() < std::time::Duration::from_secs(20), "{err}");
    // Nodes with their own --device join and train.
    let n0 = start_node(None, &addr, 0, TOKEN, &["--device", "cpu"]);
    let n1 = start_node(None, &addr, 1, TOKEN, &["--device", "cpu"]);
    let (st, err) = coord.wait_exit(120);
    assert!(st.success() && err.contains("done: 2 steps"), "{err}");
    for n in [n0, n1] {
        let (st, err) = n.wait_exit(30);
        assert!(st.success(), "{err}");
    }
}

/// A node that gets a stop signal of its own (a preemption, say), while the coordinator
/// does not: it asks the coordinator, which stops the whole run as on Ctrl-C — after the
/// step in flight, with a checkpoint of it — instead of the node vanishing mid-step and the
/// run failing back to an older checkpoint. The coordinator's own SIGTERM right after is
/// the same request, not a second one.
#[test]
fn a_node_signalled_alone_stops_the_run_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2, 100_000, "");
    let (mut coord, addr) = start_coordinator(None, cfg.to_str().unwrap(), &[]);
    let nodes: Vec<Running> = (0..2)
        .map(|slot| start_node(None, &addr, slot, TOKEN, &[]))
        .collect();
    coord.wait_for("step 1/", 120);
    signal("TERM", &[nodes[1].child.id()]);
    coord.wait_for("got a stop signal of its own", 30);
    signal("TERM", &[coord.child.id()]);
    let (st, err) = coord.wait_exit(120);
    assert!(st.success(), "{err}");
    interrupted_with_checkpoint(&err, dir.path());
    for n in nodes {
        let (st, err) = n.wait_exit(60);
        assert!(st.success(), "{err}");
    }
}

/// A CPU build asked for NCCL: every node says why it cannot join, and the run's error
/// carries that reason instead of a bare lost connection.
#[cfg(not(feature = "nccl"))]
#[test]
fn nccl_on_a_build_without_it_fails_naming_the_feature() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2, 4, "");
    let (st, err) = spawn(
        &[
            "train",
            cfg.to_str().unwrap(),
            "--plain",
            "--collective",
            "nccl",
        ],
        &[],
    )
    .wait_exit(120);
    assert!(!st.success(), "{err}");
    assert!(
        err.contains("node failure: rank") && err.contains("without the `nccl` cargo feature"),
        "{err}"
    );
}

/// A node that reads another copy of the dataset (here: the same lines shuffled, through a
/// relative `data.train` and another working folder) fails at its first step naming the
/// example and the file, instead of training on other examples while every adapter hash
/// agrees.
#[test]
fn a_node_with_other_data_fails_its_first_step_naming_the_example() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2, 4, "");
    let train = dir.path().join("train.jsonl").display().to_string();
    edit_config(&cfg, &format!("{train:?}"), "\"train.jsonl\"");
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let mut lines: Vec<String> = std::fs::read_to_string(&train)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    lines.reverse();
    std::fs::write(other.join("train.jsonl"), lines.join("\n") + "\n").unwrap();

    let (coord, addr) = start_coordinator(Some(dir.path()), "run.toml", &[]);
    let (n0, n1) = (
        start_node(Some(dir.path()), &addr, 0, TOKEN, &[]),
        start_node(Some(&other), &addr, 1, TOKEN, &[]),
    );
    let (st, err) = coord.wait_exit(120);
    assert!(!st.success(), "the run must fail:\n{err}");
    assert!(
        err.contains("in the coordinator's data plan") && err.contains("train.jsonl"),
        "unclear error:\n{err}"
    );
    assert!(err.contains("failed step 1"), "{err}");
    for n in [n0, n1] {
        let _ = n.wait_exit(30);
    }
}

/// Nodes started by hand (no launcher to replace processes): after a node is killed, the
/// survivors — stuck in the all-reduce with the dead peer when told to restart — start
/// afresh in their own process, register again, and the run finishes on the smaller ring
/// (`--min-nodes 2`) from the last checkpoint.
#[test]
fn hand_started_nodes_survive_a_dead_peer_with_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 3, 16, "");
    edit_config(&cfg, "save_every = 0", "save_every = 4");
    let (mut coord, addr) = start_coordinator(
        None,
        cfg.to_str().unwrap(),
        &[
            "--max-restarts",
            "1",
            "--min-nodes",
            "2",
            "--heartbeat-timeout",
            "2",
        ],
    );
    let mut nodes: Vec<Running> = (0..3)
        .map(|slot| start_node(None, &addr, slot, TOKEN, &[]))
        .collect();
    coord.wait_for("checkpoint: step 4", 120);
    kill_9(nodes[2].child.id());
    let (st, err) = coord.wait_exit(180);
    assert!(st.success(), "the run did not recover:\n{err}");
    assert!(err.contains("restarting all nodes from step"), "{err}");
    assert!(err.contains("with 2 rank(s)"), "{err}");
    assert!(
        dir.path().join("run/checkpoints/step-16/adapter").is_dir(),
        "{err}"
    );
    let _ = nodes.pop();
    for n in nodes {
        let (st, err) = n.wait_exit(30);
        assert!(st.success(), "a surviving node failed:\n{err}");
        assert!(err.contains("starting afresh"), "{err}");
        // The fresh image knows it is rejoining: it will not dial a gone coordinator for
        // its whole --connect-timeout.
        assert!(
            err.contains("rejoining after a restart: trying the coordinator for at most 45s"),
            "{err}"
        );
    }
}

/// What `scancel` does: SIGTERM to every task at once, the coordinator and the nodes
/// started by hand — and, on Slurm, once more a few milliseconds later (the batch script
/// and `srun` forward the signal they got). The nodes outlive that stop request, the
/// second SIGTERM counts as the same one, the step in flight finishes, rank 0 saves after
/// it, and everything exits 0 with that checkpoint recorded. (The echo used to be taken as
/// "stop at once", which lost the checkpoint.)
#[test]
fn sigterm_to_every_process_saves_after_the_step_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2, 100_000, "");
    let (mut coord, addr) = start_coordinator(None, cfg.to_str().unwrap(), &[]);
    let nodes: Vec<Running> = (0..2)
        .map(|slot| start_node(None, &addr, slot, TOKEN, &[]))
        .collect();
    coord.wait_for("step 1/", 120);
    std::thread::sleep(Duration::from_millis(500));
    let mut pids: Vec<u32> = nodes.iter().map(|n| n.child.id()).collect();
    pids.push(coord.child.id());
    for _ in 0..2 {
        signal("TERM", &pids);
        std::thread::sleep(Duration::from_millis(20));
    }
    let (st, err) = coord.wait_exit(120);
    assert!(st.success(), "{err}");
    assert!(
        err.contains("another SIGTERM within 2s of the first"),
        "{err}"
    );
    interrupted_with_checkpoint(&err, dir.path());
    for n in nodes {
        let (st, err) = n.wait_exit(60);
        assert!(st.success(), "{err}");
        assert!(
            err.contains("asking the coordinator to stop the run after the step in flight"),
            "{err}"
        );
    }
}
