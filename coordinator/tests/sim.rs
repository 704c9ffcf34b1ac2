//! The coordinator core against a simulated cluster: honest nodes that answer
//! every command after a random delay, processes killed (silently, or with a
//! closed connection) and replaced, and a user interrupt, all on a virtual
//! clock. Proptest draws the cluster and the faults and checks that the core
//! never panics, never waits forever, detects every death within the
//! heartbeat timeout, takes the policy's decision, and completes every step
//! when it says it completed.

mod util;

use proptest::prelude::*;
use ringtune_coordinator::*;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use util::{plan, secs, RUN_HASH};

#[derive(Debug, Clone)]
struct Kill {
    /// Which process slot dies (modulo the world size).
    slot: u32,
    at: f64,
    /// The connection closes (kill -9 on a live socket) or just goes quiet (a hang, a cut cable).
    disconnect: bool,
    /// A replacement for the slot starts this long after the death.
    respawn_after: Option<f64>,
}

#[derive(Debug, Clone)]
struct Scenario {
    world: u32,
    min_nodes: u32,
    max_restarts: u32,
    save_every: Option<u64>,
    kills: Vec<Kill>,
    interrupt_at: Option<f64>,
    seed: u64,
}

#[derive(Debug, Clone)]
enum Action {
    /// A node process starts and connects.
    Spawn {
        slot: u32,
    },
    /// A message from a node arrives at the coordinator.
    Deliver {
        node: NodeId,
        msg: NodeMsg,
    },
    /// A node's heartbeat timer.
    Beat {
        node: NodeId,
    },
    Kill {
        kill: usize,
    },
    Interrupt,
}

struct Proc {
    slot: u32,
    alive: bool,
}

struct Sim {
    core: Coordinator,
    t0: Instant,
    now: Duration,
    queue: BTreeMap<(Duration, u64), Action>,
    seq: u64,
    rng: u64,
    procs: BTreeMap<NodeId, Proc>,
    next_id: u64,
    hb: Duration,
    /// Kill time of each node killed so far.
    killed: BTreeMap<NodeId, Duration>,
    events: Vec<(Duration, Event)>,
}

impl Sim {
    fn new(s: &Scenario) -> Sim {
        let mut cfg = CoordinatorConfig::new(RUN_HASH, WorldSize(s.world));
        cfg.min_nodes = WorldSize(s.min_nodes);
        cfg.max_restarts = s.max_restarts;
        cfg.save_every = s.save_every;
        cfg.timeouts = Timeouts {
            heartbeat: secs(3.0),
            join: secs(20.0),
            rejoin: secs(5.0),
            setup: secs(30.0),
            step: secs(30.0),
            save: secs(10.0),
            stop: secs(5.0),
        };
        let t0 = Instant::now();
        let core = Coordinator::new(cfg.clone(), plan(24, 4, 2), t0).unwrap();
        let mut sim = Sim {
            core,
            t0,
            now: Duration::ZERO,
            queue: BTreeMap::new(),
            seq: 0,
            rng: s.seed | 1,
            procs: BTreeMap::new(),
            next_id: 1,
            hb: cfg.timeouts.heartbeat,
            killed: BTreeMap::new(),
            events: Vec::new(),
        };
        for slot in 0..s.world {
            let d = sim.delay(0.0, 1.0);
            sim.at(d, Action::Spawn { slot });
        }
        for (i, k) in s.kills.iter().enumerate() {
            sim.at(secs(k.at), Action::Kill { kill: i });
        }
        if let Some(t) = s.interrupt_at {
            sim.at(secs(t), Action::Interrupt);
        }
        sim
    }

    fn delay(&mut self, lo: f64, hi: f64) -> Duration {
        // xorshift: deterministic per scenario seed.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        secs(lo + (hi - lo) * (self.rng % 10_000) as f64 / 10_000.0)
    }

    fn at(&mut self, when: Duration, action: Action) {
        self.seq += 1;
        self.queue.insert((when, self.seq), action);
    }

    fn send(&mut self, node: NodeId, after: Duration, msg: NodeMsg) {
        self.at(self.now + after, Action::Deliver { node, msg });
    }

    fn register(&mut self, node: NodeId) {
        let slot = self.procs[&node].slot;
        let reg = Registration {
            identity: NodeIdentity {
                host: format!("h{slot}"),
                local_rank: 0,
                launch_rank: None,
            },
            config_hash: RUN_HASH,
            data_addr: Some(format!("10.0.0.{}:7000", slot + 1).parse().unwrap()),
        };
        let d = self.delay(0.01, 0.3);
        self.send(node, d, NodeMsg::Register(reg));
    }

    /// An honest node's answer to a command.
    fn node_handles(&mut self, node: NodeId, command: Command) {
        if !self.procs.get(&node).is_some_and(|p| p.alive) {
            return;
        }
        match command {
            Command::Accepted {
                heartbeat_every, ..
            } => {
                assert_eq!(heartbeat_every, self.hb / 4);
            }
            Command::NcclUniqueId { .. } => {}
            Command::Refused(r) => {
                self.exit(node);
                if r.is_retryable() {
                    // What a node driver does: reconnect a little later.
                    let slot = self.procs[&node].slot;
                    self.at(self.now + secs(1.0), Action::Spawn { slot });
                }
            }
            Command::Disconnect { .. } => self.exit(node),
            Command::Assign(a) => {
                let d = self.delay(0.1, 2.0);
                self.send(
                    node,
                    d,
                    NodeMsg::Ready {
                        generation: a.generation,
                    },
                );
            }
            Command::RunStep(o) => {
                let compute = self.delay(0.05, 0.5);
                let comm = self.delay(0.01, 0.2);
                let adapter_hash = o.report_hash.then_some(AdapterHash([o.step.0 as u8; 32]));
                let report = StepReport {
                    generation: o.generation,
                    step: o.step,
                    loss_sum: o.examples.len() as f64,
                    weight_sum: o.examples.iter().map(|e| e.tokens as f64).sum(),
                    tokens: o.examples.iter().map(|e| u64::from(e.tokens)).sum(),
                    epoch: 0,
                    lr: 1e-4,
                    grad_norm: 1.0,
                    extra: Default::default(),
                    compute,
                    comm,
                    adapter_hash,
                    eval_nll: None,
                };
                self.send(node, compute + comm, NodeMsg::StepDone(report));
                if o.save_checkpoint {
                    let d = compute + comm + self.delay(0.01, 1.0);
                    self.send(
                        node,
                        d,
                        NodeMsg::CheckpointSaved {
                            generation: o.generation,
                            step: o.step,
                        },
                    );
                }
            }
            Command::Save { generation, step } => {
                let d = self.delay(0.01, 1.0);
                self.send(node, d, NodeMsg::CheckpointSaved { generation, step });
            }
            Command::Restart { .. } => self.register(node),
            Command::Stop(_) => {
                let d = self.delay(0.01, 0.5);
                self.send(node, d, NodeMsg::StopAck);
            }
        }
    }

    fn exit(&mut self, node: NodeId) {
        if let Some(p) = self.procs.get_mut(&node) {
            p.alive = false;
        }
    }

    fn drain(&mut self) {
        while let Some(ev) = self.core.poll_event() {
            roundtrip(&ev);
            self.events.push((self.now, ev));
        }
        while let Some(out) = self.core.poll_command() {
            roundtrip(&out);
            let stop = matches!(out.command, Command::Stop(_));
            self.node_handles(out.to, out.command);
            if stop {
                // A node exits once it has acknowledged: no more heartbeats.
                let id = out.to;
                let d = self.delay(0.6, 0.7);
                self.at(
                    self.now + d,
                    Action::Kill {
                        kill: usize::MAX - id.0 as usize,
                    },
                );
            }
        }
    }

    /// Runs until the core finishes; returns how many loop turns it took.
    fn run(&mut self, scenario: &Scenario) -> Result<usize, TestCaseError> {
        for turn in 0..200_000 {
            let timer = self.core.poll_timeout();
            if self.core.outcome().is_some() {
                prop_assert!(timer.is_none());
                return Ok(turn);
            }
            // Every state but the end has a deadline: the core never waits forever.
            let timer =
                timer.ok_or_else(|| TestCaseError::fail("no deadline while the run is going"))?;
            prop_assert!(timer > self.t0 + self.now, "deadline not in the future");
            let timer = timer - self.t0;
            let next = self.queue.keys().next().copied();
            match next {
                Some((t, seq)) if t <= timer => {
                    let action = self.queue.remove(&(t, seq)).unwrap();
                    self.now = self.now.max(t);
                    self.apply(action, scenario);
                }
                _ => {
                    self.now = timer;
                    self.core.handle_timeout(self.t0 + self.now);
                }
            }
            self.drain();
            // A killed node is out within one heartbeat timeout of its death.
            for (node, died) in &self.killed {
                if self.now > *died + self.hb {
                    prop_assert!(
                        !self.core.is_connected(*node),
                        "{node} still connected at {:?}",
                        self.now
                    );
                }
            }
            prop_assert!(self.now < secs(100_000.0), "virtual time ran away");
        }
        Err(TestCaseError::fail("the core never finished"))
    }

    fn apply(&mut self, action: Action, s: &Scenario) {
        let now = self.t0 + self.now;
        match action {
            Action::Spawn { slot } => {
                let node = NodeId(self.next_id);
                self.next_id += 1;
                self.procs.insert(node, Proc { slot, alive: true });
                self.core.handle_connect(now, node, Auth::TokenVerified);
                self.register(node);
                self.at(self.now + secs(1.0), Action::Beat { node });
            }
            Action::Deliver { node, msg } => {
                if self.procs.get(&node).is_some_and(|p| p.alive) {
                    self.core.handle_message(now, node, msg);
                }
            }
            Action::Beat { node } => {
                if self.procs.get(&node).is_some_and(|p| p.alive) {
                    self.core.handle_message(now, node, NodeMsg::Heartbeat);
                    self.at(self.now + secs(1.0), Action::Beat { node });
                }
            }
            Action::Kill { kill } if kill > s.kills.len() => {
                // A node that acknowledged its stop exits and closes its connection.
                let node = NodeId((usize::MAX - kill) as u64);
                if self.procs.get(&node).is_some_and(|p| p.alive) {
                    self.exit(node);
                    self.core.handle_disconnect(now, node);
                }
            }
            Action::Kill { kill } => {
                let k = s.kills[kill].clone();
                let slot = k.slot % s.world;
                let victim = self
                    .procs
                    .iter()
                    .find(|(_, p)| p.alive && p.slot == slot)
                    .map(|(id, _)| *id);
                let Some(node) = victim else { return };
                self.exit(node);
                self.killed.insert(node, self.now);
                if k.disconnect {
                    self.core.handle_disconnect(now, node);
                }
                if let Some(after) = k.respawn_after {
                    self.at(self.now + secs(after), Action::Spawn { slot });
                }
            }
            Action::Interrupt => self.core.handle_interrupt(now),
        }
    }
}

/// Everything the core emits must survive serde: exactly through bincode
/// (what the wire protocol frames), and as JSON (what the run folder
/// records; serde_json's default float parsing may move the last digit).
fn roundtrip<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(
    v: &T,
) {
    let bytes = bincode::serialize(v).unwrap();
    let back: T = bincode::deserialize(&bytes).unwrap();
    assert_eq!(&back, v, "bincode round trip");
    let json = serde_json::to_string(v).unwrap();
    let _: T =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("JSON round trip of {json}: {e}"));
}

fn transcript(sim: &Sim) -> Vec<String> {
    sim.events
        .iter()
        .map(|(t, e)| format!("{:.3} {}", t.as_secs_f64(), util::render_event(e)))
        .collect()
}

fn check_scenario(s: &Scenario) -> Result<(), TestCaseError> {
    let mut sim = Sim::new(s);
    sim.run(s)?;
    let total = sim.core.total_steps();
    let outcome = sim.core.outcome().cloned().unwrap();
    let restarts = sim
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::Restarting { .. }))
        .count();
    prop_assert!(restarts <= s.max_restarts as usize);
    let mut completed = BTreeSet::new();
    for (_, e) in &sim.events {
        if let Event::StepCompleted(r) = e {
            // The global batch stays the same whatever the world size.
            prop_assert_eq!(r.examples, 4);
            prop_assert!(r.world_size.0 >= s.min_nodes && r.world_size.0 <= s.world);
            completed.insert(r.step.0);
        }
    }
    match &outcome {
        Outcome::Completed {
            steps,
            last_checkpoint,
        } => {
            prop_assert_eq!(*steps, total);
            prop_assert_eq!(*last_checkpoint, total);
            prop_assert_eq!(completed, (1..=total.0).collect::<BTreeSet<_>>());
        }
        Outcome::Failed(e) => {
            // Honest nodes on time never fail a run: only a kill can.
            prop_assert!(!s.kills.is_empty(), "failed without a fault: {}", e);
            if let Error::NodeFailure { restarts_used, .. } = e {
                prop_assert_eq!(*restarts_used, s.max_restarts);
            }
        }
        Outcome::Interrupted { .. } => prop_assert!(s.interrupt_at.is_some()),
    }
    // Liveness: a fault the policy can absorb never fails the run. Every
    // kill is replaced quickly (the replacement retries until its dead
    // predecessor is declared dead) and there are restarts for each.
    let absorbable = s
        .kills
        .iter()
        .all(|k| k.respawn_after.is_some_and(|a| a <= 1.0))
        && s.kills.len() <= s.max_restarts as usize;
    if absorbable && s.interrupt_at.is_none() {
        prop_assert!(
            matches!(outcome, Outcome::Completed { .. }),
            "{:?}\n{}",
            outcome,
            transcript(&sim).join("\n")
        );
    }
    // Same scenario, same transcript: nothing depends on hash order or wall time.
    let mut again = Sim::new(s);
    again.run(s)?;
    prop_assert_eq!(transcript(&sim), transcript(&again));
    Ok(())
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (1u32..=4)
        .prop_flat_map(|world| {
            let respawn = prop_oneof![
                Just(None),
                (0.0f64..1.0).prop_map(Some),
                (0.0f64..8.0).prop_map(Some)
            ];
            let kill = (0..world, 0.0f64..15.0, any::<bool>(), respawn).prop_map(
                |(slot, at, disconnect, respawn_after)| Kill {
                    slot,
                    at,
                    disconnect,
                    respawn_after,
                },
            );
            (
                Just(world),
                1..=world,
                0u32..3,
                prop::option::of(1u64..5),
                prop::collection::vec(kill, 0..4),
                prop::option::of(0.0f64..20.0),
                any::<u64>(),
            )
        })
        .prop_map(
            |(world, min_nodes, max_restarts, save_every, kills, interrupt_at, seed)| Scenario {
                world,
                min_nodes,
                max_restarts,
                save_every,
                kills,
                interrupt_at,
                seed,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn random_clusters_and_faults_always_end_with_the_right_decision(s in scenario()) {
        check_scenario(&s)?;
    }
}

#[test]
fn fault_free_runs_complete() {
    for world in 1..=4 {
        for seed in 1..20 {
            let s = Scenario {
                world,
                min_nodes: world,
                max_restarts: 0,
                save_every: Some(3),
                kills: vec![],
                interrupt_at: None,
                seed,
            };
            check_scenario(&s).unwrap();
        }
    }
}

/// kill -9 of a node mid-run with one restart allowed and a replacement: the
/// run completes, resumed from the last checkpoint, with the world size unchanged.
#[test]
fn killed_node_is_replaced_and_the_run_completes_from_the_checkpoint() {
    let s = Scenario {
        world: 2,
        min_nodes: 2,
        max_restarts: 1,
        save_every: Some(2),
        kills: vec![Kill {
            slot: 1,
            at: 4.0,
            disconnect: false,
            respawn_after: Some(0.5),
        }],
        interrupt_at: None,
        seed: 7,
    };
    let mut sim = Sim::new(&s);
    sim.run(&s).unwrap();
    assert!(
        matches!(sim.core.outcome(), Some(Outcome::Completed { .. })),
        "{:?}",
        sim.core.outcome()
    );
    let died = sim.killed.values().next().copied().unwrap();
    let detected = sim
        .events
        .iter()
        .find(|(_, e)| matches!(e, Event::NodeFailed(Failure::Silent { .. })))
        .map(|(t, _)| *t)
        .expect("the death was detected");
    assert!(
        detected > died && detected <= died + secs(3.0),
        "died {died:?}, detected {detected:?}"
    );
    let (resume, last_ckpt_before) = sim
        .events
        .iter()
        .find_map(|(_, e)| match e {
            Event::Restarting { resume_from, .. } => Some(*resume_from),
            _ => None,
        })
        .map(|r| {
            let before: Vec<Step> = sim
                .events
                .iter()
                .take_while(|(_, e)| !matches!(e, Event::Restarting { .. }))
                .filter_map(|(_, e)| {
                    if let Event::CheckpointRecorded { step } = e {
                        Some(*step)
                    } else {
                        None
                    }
                })
                .collect();
            (r, before.last().copied().unwrap_or(Step(0)))
        })
        .unwrap();
    assert_eq!(resume, last_ckpt_before);
    assert!(
        resume.0 >= 2,
        "a checkpoint existed before the kill at 4 s: resumed from {resume:?}"
    );
    let worlds: BTreeSet<u32> = sim
        .events
        .iter()
        .filter_map(|(_, e)| {
            if let Event::StepCompleted(r) = e {
                Some(r.world_size.0)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(worlds, BTreeSet::from([2]));
}

proptest! {
    /// Ranks depend on who registered, not on the order they arrived in:
    /// launcher rank first (absent last), then host, then GPU slot.
    #[test]
    fn ranks_do_not_depend_on_arrival_order(
        order in Just((0..6usize).collect::<Vec<_>>()).prop_shuffle(),
        launch in prop::collection::vec(prop::option::of(0u32..100), 6),
    ) {
        let identities: Vec<NodeIdentity> = (0..6)
            .map(|i| NodeIdentity {
                host: ["b", "a", "c"][i % 3].to_string(),
                local_rank: (i / 3) as u32,
                launch_rank: launch[i],
            })
            .collect();
        let t0 = Instant::now();
        let cfg = CoordinatorConfig::new(RUN_HASH, WorldSize(6));
        let mut core = Coordinator::new(cfg, plan(12, 6, 1), t0).unwrap();
        for &i in &order {
            let node = NodeId(i as u64);
            core.handle_connect(t0, node, Auth::TokenVerified);
            let reg = Registration {
                identity: identities[i].clone(),
                config_hash: RUN_HASH,
                data_addr: Some(format!("10.0.0.{}:7000", i + 1).parse().unwrap()),
            };
            core.handle_message(t0, node, NodeMsg::Register(reg));
        }
        let mut rank_of = BTreeMap::new();
        while let Some(out) = core.poll_command() {
            if let Command::Assign(a) = out.command {
                rank_of.insert(out.to.0 as usize, a.rank.0);
            }
        }
        let mut expected: Vec<usize> = (0..6).collect();
        expected.sort_by_key(|&i| {
            let id = &identities[i];
            // Equal launcher ranks fall back to host and slot, which are distinct here.
            (id.launch_rank.is_none(), id.launch_rank, id.host.clone(), id.local_rank)
        });
        for (rank, i) in expected.iter().enumerate() {
            prop_assert_eq!(rank_of.get(i).copied(), Some(rank as u32));
        }
    }
}
