//! Test harness for the coordinator core: a virtual clock and a tiny script
//! language, so each test is a script and the transcript it must produce.
//!
//! Script lines (one input each; `#` starts a comment):
//!
//! ```text
//! config world=2 min=1 restarts=1 save=2 hashevery=1 steps=3 transport=nccl
//!        hb=5 join=60 rejoin=10 setup=60 step=60 savet=30 stop=5      (seconds)
//! plan n=8 batch=4 epochs=1            example i has (i*7 % 10) + 1 tokens
//! connect 1 [bad]                      a connection, token verified (or rejected)
//! register 1 [host=h] [lr=0] [launch=3] [addr=10.0.0.9:7000|addr=none] [hash=other]
//! beat 1 | ack 1 | drop 1 | interrupt
//! ready 1 [gen=0]                      gen defaults to the core's current generation
//! done 1 [step=2] [gen=0] [hash=b|hash=none] [loss=2 weight=4 tokens=9]
//!                                      step defaults to the node's last order; the hash
//!                                      to `a` when that order asked for one
//! saved 1 [step=2] [gen=0]
//! fail 1 step=2 some reason text
//! nccl 1 len=128 [gen=0]
//! at 12.5                              advance the clock to 12.5 s and fire timers
//! ```
//!
//! Registration defaults: host `h<id>`, GPU slot 0, data address
//! `10.0.0.<id>:7000`, the run's config hash.

#![allow(dead_code)]

use ringtune_coordinator::*;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub const RUN_HASH: ConfigHash = ConfigHash([1; 32]);
pub const OTHER_HASH: ConfigHash = ConfigHash([2; 32]);

pub fn tokens_of(i: u64) -> u32 {
    ((i * 7) % 10 + 1) as u32
}

pub fn plan(n: u64, batch: usize, epochs: u64) -> DataPlan {
    let epochs = (0..epochs)
        .map(|e| {
            (0..n)
                .map(|i| PlannedExample {
                    index: ExampleIndex(e * 1000 + i),
                    tokens: tokens_of(i),
                })
                .collect()
        })
        .collect();
    DataPlan::new(epochs, batch, false).unwrap()
}

pub fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

pub struct Harness {
    pub core: Coordinator,
    pub t0: Instant,
    pub now: Duration,
    /// The last step order each node got.
    pub orders: BTreeMap<NodeId, StepOrder>,
    pub transcript: Vec<String>,
}

impl Harness {
    pub fn new(cfg: CoordinatorConfig, plan: DataPlan) -> Harness {
        let t0 = Instant::now();
        let core = Coordinator::new(cfg, plan, t0).unwrap();
        Harness {
            core,
            t0,
            now: Duration::ZERO,
            orders: BTreeMap::new(),
            transcript: Vec::new(),
        }
    }

    pub fn at(&self) -> Instant {
        self.t0 + self.now
    }

    /// Drains the core's outputs into the transcript (and remembers step orders).
    /// Events first (what happened), then commands (what was sent because of it).
    pub fn drain(&mut self) {
        while let Some(ev) = self.core.poll_event() {
            self.transcript.push(format!("  ev {}", render_event(&ev)));
        }
        while let Some(out) = self.core.poll_command() {
            if let Command::RunStep(o) = &out.command {
                self.orders.insert(out.to, o.clone());
            }
            self.transcript.push(format!(
                "  -> {} {}",
                out.to.0,
                render_command(&out.command)
            ));
        }
    }

    pub fn run_line(&mut self, line: &str) {
        let mut words = line.split_whitespace();
        let verb = words.next().unwrap();
        let rest: Vec<&str> = words.collect();
        let kv: BTreeMap<&str, &str> = rest.iter().filter_map(|w| w.split_once('=')).collect();
        let node = || NodeId(rest[0].parse().expect("node id"));
        let num = |k: &str| kv.get(k).map(|v| v.parse::<u64>().expect(k));
        let now = self.at();
        let gen = |h: &Harness| {
            num("gen")
                .map(|g| Generation(g as u32))
                .unwrap_or(h.core.generation())
        };
        match verb {
            "connect" => {
                let auth = if rest.get(1) == Some(&"bad") {
                    Auth::TokenRejected
                } else {
                    Auth::TokenVerified
                };
                self.core.handle_connect(now, node(), auth);
            }
            "register" => {
                let id = node();
                let data_addr = match kv.get("addr") {
                    Some(&"none") => None,
                    Some(a) => Some(a.parse::<SocketAddr>().unwrap()),
                    None => Some(format!("10.0.0.{}:7000", id.0).parse().unwrap()),
                };
                let reg = Registration {
                    identity: NodeIdentity {
                        host: kv
                            .get("host")
                            .map(|h| h.to_string())
                            .unwrap_or(format!("h{}", id.0)),
                        local_rank: num("lr").unwrap_or(0) as u32,
                        launch_rank: num("launch").map(|l| l as u32),
                    },
                    config_hash: if kv.get("hash") == Some(&"other") {
                        OTHER_HASH
                    } else {
                        RUN_HASH
                    },
                    data_addr,
                };
                self.core.handle_message(now, id, NodeMsg::Register(reg));
            }
            "beat" => self.core.handle_message(now, node(), NodeMsg::Heartbeat),
            "ack" => self.core.handle_message(now, node(), NodeMsg::StopAck),
            "drop" => self.core.handle_disconnect(now, node()),
            // `exit HOST LOCAL_RANK`: a launcher saw that process end.
            "exit" => self.core.handle_process_exit(
                now,
                rest.first().expect("exit HOST LOCAL_RANK"),
                rest.get(1).expect("exit HOST LOCAL_RANK").parse().unwrap(),
            ),
            "interrupt" => self.core.handle_interrupt(now),
            // `node-interrupt N`: node N got a stop signal of its own.
            "node-interrupt" => self.core.handle_message(now, node(), NodeMsg::Interrupt),
            "ready" => {
                let generation = gen(self);
                self.core
                    .handle_message(now, node(), NodeMsg::Ready { generation });
            }
            "done" => {
                let id = node();
                let order = self.orders.get(&id).cloned();
                let step = num("step")
                    .map(Step)
                    .or(order.as_ref().map(|o| o.step))
                    .expect("no order to answer");
                let adapter_hash = match kv.get("hash") {
                    Some(&"none") => None,
                    Some(h) => Some(AdapterHash([h.as_bytes()[0]; 32])),
                    None if order.as_ref().is_some_and(|o| o.report_hash) => {
                        Some(AdapterHash([b'a'; 32]))
                    }
                    None => None,
                };
                let report = StepReport {
                    generation: gen(self),
                    step,
                    loss_sum: kv.get("loss").map_or(1.0, |v| v.parse().unwrap()),
                    weight_sum: kv.get("weight").map_or(1.0, |v| v.parse().unwrap()),
                    tokens: num("tokens").unwrap_or(10),
                    epoch: 0,
                    lr: 1e-4,
                    grad_norm: 1.0,
                    extra: Default::default(),
                    compute: Duration::from_millis(num("compute").unwrap_or(300)),
                    comm: Duration::from_millis(num("comm").unwrap_or(100)),
                    adapter_hash,
                    eval_nll: None,
                };
                self.core.handle_message(now, id, NodeMsg::StepDone(report));
            }
            "saved" => {
                let id = node();
                let step = num("step")
                    .map(Step)
                    .or(self.orders.get(&id).map(|o| o.step))
                    .unwrap();
                let generation = gen(self);
                self.core
                    .handle_message(now, id, NodeMsg::CheckpointSaved { generation, step });
            }
            "fail" => {
                let step = Step(num("step").unwrap());
                let reason = rest.iter().skip(2).copied().collect::<Vec<_>>().join(" ");
                let generation = gen(self);
                self.core.handle_message(
                    now,
                    node(),
                    NodeMsg::Failed {
                        generation,
                        step,
                        reason,
                    },
                );
            }
            "nccl" => {
                let id = vec![7u8; num("len").unwrap() as usize];
                let generation = gen(self);
                self.core
                    .handle_message(now, node(), NodeMsg::NcclUniqueId { generation, id });
            }
            "at" => {
                let t: f64 = rest[0].parse().unwrap();
                self.now = secs(t);
                self.core.handle_timeout(self.at());
            }
            other => panic!("unknown script verb {other:?}"),
        }
    }
}

pub fn config_from(line: &str) -> CoordinatorConfig {
    let mut cfg = CoordinatorConfig::new(RUN_HASH, WorldSize(2));
    for kv in line.split_whitespace().skip(1) {
        let (k, v) = kv.split_once('=').expect("config takes key=value");
        let n = || v.parse::<u64>().expect(k);
        let d = || secs(v.parse::<f64>().expect(k));
        match k {
            "world" => {
                cfg.world_size = WorldSize(n() as u32);
                cfg.min_nodes = cfg.world_size;
            }
            "min" => cfg.min_nodes = WorldSize(n() as u32),
            "restarts" => cfg.max_restarts = n() as u32,
            "save" => cfg.save_every = Some(n()),
            "hashevery" => cfg.hash_every = Some(n()),
            "steps" => cfg.max_steps = Some(n()),
            "transport" => {
                cfg.transport = if v == "nccl" {
                    Transport::Nccl
                } else {
                    Transport::Quic
                }
            }
            "hb" => cfg.timeouts.heartbeat = d(),
            "join" => cfg.timeouts.join = d(),
            "rejoin" => cfg.timeouts.rejoin = d(),
            "setup" => cfg.timeouts.setup = d(),
            "step" => cfg.timeouts.step = d(),
            "savet" => cfg.timeouts.save = d(),
            "stop" => cfg.timeouts.stop = d(),
            other => panic!("unknown config key {other}"),
        }
    }
    cfg
}

/// Runs `script` and compares the transcript (each input line, then the
/// commands and events it caused) with `expect`. Set `UPDATE_EXPECT=1` to
/// print the actual transcript instead of failing on the first difference.
pub fn check(script: &str, expect: &str) {
    let mut cfg = CoordinatorConfig::new(RUN_HASH, WorldSize(2));
    let mut plan_line = None;
    let mut harness: Option<Harness> = None;
    for raw in script.lines() {
        let line = raw.split('#').next().unwrap().trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with("config") {
            cfg = config_from(line);
            continue;
        }
        if line.starts_with("plan") {
            plan_line = Some(line.to_string());
            continue;
        }
        let h = harness.get_or_insert_with(|| {
            let (mut n, mut batch, mut epochs) = (8, 4, 1);
            if let Some(p) = &plan_line {
                for kv in p.split_whitespace().skip(1) {
                    let (k, v) = kv.split_once('=').unwrap();
                    match k {
                        "n" => n = v.parse().unwrap(),
                        "batch" => batch = v.parse().unwrap(),
                        "epochs" => epochs = v.parse().unwrap(),
                        other => panic!("unknown plan key {other}"),
                    }
                }
            }
            Harness::new(cfg.clone(), plan(n, batch, epochs))
        });
        h.run_line(line);
        h.transcript.push(format!(
            "t={:<5} {line}",
            format!("{:.1}", h.now.as_secs_f64())
        ));
        h.drain();
    }
    let got = harness.map(|h| h.transcript.join("\n")).unwrap_or_default();
    let want: Vec<&str> = expect
        .lines()
        .map(|l| l.trim_end())
        .filter(|l| !l.trim().is_empty())
        .collect();
    let want = unindent(&want);
    if std::env::var_os("UPDATE_EXPECT").is_some() {
        // For reviewing new transcripts: print them, tagged with the test, and go on.
        let test = std::thread::current().name().unwrap_or("?").to_string();
        println!("@@@@ {test}\n{got}\n@@@@ end");
        return;
    }
    assert_eq!(
        got, want,
        "\n---- got ----\n{got}\n---- want ----\n{want}\n"
    );
}

fn unindent(lines: &[&str]) -> String {
    let margin = lines
        .iter()
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    lines
        .iter()
        .map(|l| &l[margin..])
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn render_command(c: &Command) -> String {
    match c {
        Command::Refused(r) => format!("refused: {r}"),
        Command::Accepted { standby, .. } => if *standby {
            "accepted (standby)"
        } else {
            "accepted"
        }
        .to_string(),
        Command::Assign(a) => {
            let coll = match &a.collective {
                CollectiveSetup::Ring { left, right } => {
                    format!(
                        "left r{}@{} right r{}@{}",
                        left.rank.0, left.addr, right.rank.0, right.addr
                    )
                }
                CollectiveSetup::Nccl { create_unique_id } => {
                    format!("nccl create_id={create_unique_id}")
                }
            };
            format!(
                "assign g{} rank {}/{} {coll} resume {} total {}",
                a.generation.0, a.rank.0, a.world_size.0, a.resume_from.0, a.total_steps.0
            )
        }
        Command::NcclUniqueId { generation, id } => {
            format!("nccl id g{} ({} bytes)", generation.0, id.len())
        }
        Command::RunStep(o) => {
            let ex: Vec<String> = o.examples.iter().map(|e| e.index.0.to_string()).collect();
            let mut s = format!(
                "run step {} g{} w{} [{}]",
                o.step.0,
                o.generation.0,
                o.world_size.0,
                ex.join(" ")
            );
            if o.save_checkpoint {
                s.push_str(" save");
            }
            if o.report_hash {
                s.push_str(" hash");
            }
            s
        }
        Command::Restart {
            generation,
            resume_from,
            reason,
        } => {
            format!(
                "restart g{} from step {}: {reason}",
                generation.0, resume_from.0
            )
        }
        Command::Save { generation, step } => {
            format!("save g{} after step {}", generation.0, step.0)
        }
        Command::Stop(r) => format!("stop: {r}"),
        Command::Disconnect { reason } => format!("disconnect: {reason}"),
    }
}

pub fn render_event(e: &Event) -> String {
    match e {
        Event::Refused { node, reason } => format!("refused {node}: {reason}"),
        Event::Registered { node, identity, standby } => format!(
            "registered {node} {}:{}{}",
            identity.host,
            identity.local_rank,
            if *standby { " (standby)" } else { "" }
        ),
        Event::Left { node, reason } => format!("left {node}: {reason}"),
        Event::HandshakeFailed { peer, reason } => format!("handshake failed {peer}: {reason}"),
        Event::CheckpointLost {
            step,
            last_checkpoint,
        } => format!("checkpoint lost {step} (last {last_checkpoint})"),
        Event::RunStarted { generation, world_size, resume_from, members } => {
            let m: Vec<String> = members.iter().map(|w| format!("{}={}", w.rank.0, w.node.0)).collect();
            format!("run started g{} world {} resume {} ranks [{}]", generation.0, world_size.0, resume_from.0, m.join(" "))
        }
        Event::StepCompleted(r) => format!(
            "step {} done g{} w{}: loss {} tokens {} examples {} wall {:.1}s compute {:.2}/{:.2}s comm {:.2}/{:.2}s",
            r.step.0,
            r.generation.0,
            r.world_size.0,
            r.loss.map_or("none".to_string(), |l| format!("{l:.3}")),
            r.tokens,
            r.examples,
            r.wall_s,
            r.compute_s_mean,
            r.compute_s_max,
            r.comm_s_mean,
            r.comm_s_max
        ),
        Event::CheckpointRecorded { step } => format!("checkpoint recorded {step}"),
        Event::NodeFailed(f) => format!("failed: {f}"),
        Event::Restarting { generation, resume_from, restart, max_restarts } => {
            format!("restarting g{} from step {} (restart {restart}/{max_restarts})", generation.0, resume_from.0)
        }
        Event::Ignored { node, reason } => format!("ignored {node}: {reason}"),
        Event::Interrupting { step } => format!("interrupting: finish {step}, save, stop"),
        Event::NodeInterrupted { node } => format!("{node} asked to stop"),
        Event::Stopping(r) => format!("stopping: {r}"),
        Event::StopTimedOut { unacked } => {
            let u: Vec<String> = unacked.iter().map(|n| n.0.to_string()).collect();
            format!("stop timed out, unacked [{}]", u.join(" "))
        }
        Event::Finished(o) => match o {
            Outcome::Completed { steps, last_checkpoint } => {
                format!("finished: completed {} steps, checkpoint {}", steps.0, last_checkpoint.0)
            }
            Outcome::Interrupted { last_completed, last_checkpoint } => {
                format!("finished: interrupted after step {}, checkpoint {}", last_completed.0, last_checkpoint.0)
            }
            Outcome::Failed(e) => format!("finished: failed: {e}"),
        },
    }
}
