//! The coordinator's sans-IO core: one run's membership, ranks and ring
//! neighbours, the step barrier, heartbeats and failure detection, the
//! failure policy, checkpoint orchestration and the clean stop.
//!
//! Like `quinn-proto`, it does no I/O and reads no clock. The driver feeds it
//! `handle_connect` / `handle_message` / `handle_disconnect` /
//! `handle_interrupt` / `handle_timeout`, each with the current time, then
//! drains [`Coordinator::poll_command`] (what to send to which node) and
//! [`Coordinator::poll_event`] (what to log, print and record), and sleeps
//! until [`Coordinator::poll_timeout`]. Every `handle_*` first fires the
//! deadlines that have passed, in time order, so the result does not depend
//! on how punctual the driver is.
//!
//! Every state but `Finished` has a deadline: gathering (join / rejoin
//! timeout), setup (setup timeout), a step (step timeout, and each node's
//! heartbeat timeout), finishing (save timeout), stopping (stop timeout).
//! So the core can wait for a node but never forever.
//!
//! Not here: the cluster token (the driver checks it and says so with
//! [`Auth`]), tokenizing and sending token batches (the driver attaches them
//! to each [`StepOrder`]'s example indices), writing metrics.jsonl or
//! checkpoints.jsonl (the driver does, from [`Event`]s).

use crate::error::{Error, Failure, HashGroup, Result, Who};
use crate::ids::{AdapterHash, ConfigHash, Generation, NodeId, Rank, Step, WorldSize};
use crate::metrics::StepRecord;
use crate::msg::{
    truncate, Assignment, CollectiveSetup, Command, NodeIdentity, NodeMsg, Outgoing, Peer, Refusal,
    Registration, StepOrder, StepReport, StopReason, MAX_HOST_BYTES, MAX_NCCL_ID_BYTES,
    MAX_REASON_BYTES,
};
use crate::plan::DataPlan;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

/// The most ranks one run may have; bounds everything sized by the world.
pub const MAX_WORLD_SIZE: u32 = 65_536;

/// The driver's verdict on a new connection's cluster token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    TokenVerified,
    TokenRejected,
}

/// How ranks all-reduce gradients; decides what [`Assignment::collective`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Transport {
    /// The ring over QUIC: every node registers a data-plane address.
    Quic,
    /// NCCL: rank 0 creates the unique id, the coordinator hands it on.
    Nccl,
}

/// How long the core waits for each thing before it calls it a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    /// A node silent (no message at all) for longer is declared dead.
    pub heartbeat: Duration,
    /// Waiting for the first `world_size` registrations.
    pub join: Duration,
    /// Waiting for nodes to register again after a restart; when it passes,
    /// the run goes on with fewer nodes if `min_nodes` allows.
    pub rejoin: Duration,
    /// From the assignment to every rank's `Ready` (the model load is in here).
    pub setup: Duration,
    /// From handing a step out to its last report, heartbeats or not.
    pub step: Duration,
    /// From a save step's barrier to rank 0's confirmation.
    pub save: Duration,
    /// From `Stop` to every node's acknowledgement.
    pub stop: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            heartbeat: Duration::from_secs(5),
            join: Duration::from_secs(600),
            rejoin: Duration::from_secs(30),
            setup: Duration::from_secs(600),
            step: Duration::from_secs(600),
            save: Duration::from_secs(300),
            stop: Duration::from_secs(10),
        }
    }
}

/// What the core needs to know about the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorConfig {
    /// Nodes must register with this hash.
    pub config_hash: ConfigHash,
    /// Ranks the run starts with, and wants back after a restart.
    pub world_size: WorldSize,
    /// The smallest world the run may go on with (after a restart, or when
    /// the join timeout passes with fewer registered). Default: `world_size`.
    pub min_nodes: WorldSize,
    /// Failures survived by restarting from the last checkpoint; 0 stops at
    /// the first failure.
    pub max_restarts: u32,
    pub transport: Transport,
    /// Save a checkpoint every this many steps. The last step is always saved.
    pub save_every: Option<u64>,
    /// Compare adapter hashes every this many steps (always on save steps).
    pub hash_every: Option<u64>,
    /// Stop after this many steps even if the data plan has more.
    pub max_steps: Option<u64>,
    pub timeouts: Timeouts,
    /// Continue a run from the checkpoint written after this step (0: a fresh run). Every
    /// rank is assigned with it, so nodes load that checkpoint and the plan goes on at the
    /// next step.
    pub resume_from: Step,
    /// Training time of the run's earlier segments, so `elapsed_s` in the metrics goes on
    /// counting across a resume.
    pub elapsed_before: Duration,
}

impl CoordinatorConfig {
    /// A config with the defaults: no shrinking, no restarts, the QUIC ring,
    /// checkpoints only at the end, default timeouts.
    pub fn new(config_hash: ConfigHash, world_size: WorldSize) -> Self {
        CoordinatorConfig {
            config_hash,
            world_size,
            min_nodes: world_size,
            max_restarts: 0,
            transport: Transport::Quic,
            save_every: None,
            hash_every: None,
            max_steps: None,
            timeouts: Timeouts::default(),
            resume_from: Step(0),
            elapsed_before: Duration::ZERO,
        }
    }

    /// Checks the ranges; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, reason: String| {
            Err(Error::InvalidConfig {
                field: field.to_string(),
                reason,
            })
        };
        if self.world_size.0 == 0 || self.world_size.0 > MAX_WORLD_SIZE {
            return bad(
                "world_size",
                format!("{} is not in 1..={MAX_WORLD_SIZE}", self.world_size.0),
            );
        }
        if self.min_nodes.0 == 0 || self.min_nodes > self.world_size {
            return bad(
                "min_nodes",
                format!(
                    "{} is not in 1..=world_size ({})",
                    self.min_nodes.0, self.world_size.0
                ),
            );
        }
        for (field, v) in [
            ("save_every", self.save_every),
            ("hash_every", self.hash_every),
            ("max_steps", self.max_steps),
        ] {
            if v == Some(0) {
                return bad(field, "must be at least 1 when set".to_string());
            }
        }
        let t = &self.timeouts;
        for (field, d) in [
            ("timeouts.heartbeat", t.heartbeat),
            ("timeouts.join", t.join),
            ("timeouts.rejoin", t.rejoin),
            ("timeouts.setup", t.setup),
            ("timeouts.step", t.step),
            ("timeouts.save", t.save),
            ("timeouts.stop", t.stop),
        ] {
            // Zero would make a deadline that is already due when it is set.
            if d.is_zero() {
                return bad(field, "must be longer than zero".to_string());
            }
        }
        Ok(())
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    Completed {
        steps: Step,
        last_checkpoint: Step,
    },
    Interrupted {
        last_completed: Step,
        last_checkpoint: Step,
    },
    Failed(Error),
}

/// What happened, for the driver to log, show and record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// A connection or registration was turned away; the run goes on.
    Refused { node: NodeId, reason: Refusal },
    /// A node registered (`standby`: it waits for the next restart).
    Registered {
        node: NodeId,
        identity: NodeIdentity,
        standby: bool,
    },
    /// A node that was not in the ring went away (or silent).
    Left { node: NodeId, reason: String },
    /// A connection failed its TLS handshake, before any hello (the driver's; the core
    /// never hears of it): typically a node whose certificate pin does not match.
    HandshakeFailed { peer: String, reason: String },
    /// Ranks assigned; setup (model load, ring connect) begins.
    RunStarted {
        generation: Generation,
        world_size: WorldSize,
        resume_from: Step,
        members: Vec<Who>,
    },
    /// Every rank reported the step.
    StepCompleted(StepRecord),
    /// Rank 0 confirmed the checkpoint after `step` and every rank's hash agreed:
    /// the new resume point (a line of checkpoints.jsonl).
    CheckpointRecorded { step: Step },
    /// A failure, before the policy's decision (a `Restarting` or `Stopping` follows).
    NodeFailed(Failure),
    /// Follows a `NodeFailed` that came after `step` completed but before rank 0 confirmed
    /// its checkpoint: that checkpoint does not count; `last_checkpoint` is the resume point.
    CheckpointLost { step: Step, last_checkpoint: Step },
    /// The policy restarts every node from `resume_from`.
    Restarting {
        generation: Generation,
        resume_from: Step,
        restart: u32,
        max_restarts: u32,
    },
    /// A message that did not fit the state; dropped, with the reason.
    Ignored { node: NodeId, reason: String },
    /// The user interrupted the run: `step` (in flight) finishes, rank 0 saves a
    /// checkpoint after it, then the run stops. A second interrupt stops at once.
    Interrupting { step: Step },
    /// A node got a stop signal of its own and asked the run to stop (it does, as on
    /// the user's interrupt). `node` names it as the failure messages do.
    NodeInterrupted { node: String },
    /// `Stop` was sent to every node.
    Stopping(StopReason),
    /// These nodes never acknowledged the stop; the driver should close them.
    StopTimedOut { unacked: Vec<NodeId> },
    /// The run is over; nothing more will happen.
    Finished(Outcome),
}

/// Where the run is, for display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Gathering,
    Setup,
    Running(Step),
    Finishing,
    Stopping,
    Finished,
}

struct Conn {
    last_heard: Instant,
    /// `None` until the node registers for the current generation.
    reg: Option<Registered>,
    /// `Some` while the node is in the ring of the current generation.
    rank: Option<Rank>,
}

struct Registered {
    registration: Registration,
    /// Arrival order, the last tie-breaker for rank order.
    arrival: u64,
}

struct PendingSave {
    confirmed: bool,
    /// Set when the step's barrier completes: from then rank 0 has `save` to confirm.
    deadline: Option<Instant>,
}

enum State {
    Gathering {
        since: Instant,
        deadline: Instant,
    },
    Setup {
        since: Instant,
        deadline: Instant,
        ready: BTreeSet<Rank>,
        nccl_id_sent: bool,
    },
    Running {
        step: Step,
        started: Instant,
        deadline: Instant,
        reports: BTreeMap<Rank, StepReport>,
    },
    /// All steps done; waiting for rank 0's last checkpoint confirmations.
    Finishing {
        deadline: Instant,
    },
    Stopping {
        deadline: Instant,
        waiting: BTreeSet<NodeId>,
        outcome: Outcome,
    },
    Finished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Deadline {
    Phase,
    Save(Step),
    Silent(NodeId),
}

/// The coordinator's state machine for one run. See the module docs.
pub struct Coordinator {
    cfg: CoordinatorConfig,
    plan: DataPlan,
    total_steps: Step,
    conns: BTreeMap<NodeId, Conn>,
    arrivals: u64,
    generation: Generation,
    restarts_used: u32,
    /// rank → node for the current generation (empty while gathering).
    ring: Vec<NodeId>,
    last_completed: Step,
    last_checkpoint: Step,
    /// Σ wall time of completed steps (the earlier segments' included).
    elapsed: Duration,
    pending_saves: BTreeMap<Step, PendingSave>,
    /// The user interrupted a running step: save after it, then stop.
    interrupting: bool,
    /// The interrupt in progress came from a node ([`NodeMsg::Interrupt`]): the user's own
    /// first interrupt then joins it rather than stopping at once.
    interrupt_from_node: bool,
    state: State,
    outcome: Option<Outcome>,
    commands: VecDeque<Outgoing>,
    events: VecDeque<Event>,
}

impl Coordinator {
    /// A coordinator waiting for its first registrations (join timeout from `now`).
    pub fn new(cfg: CoordinatorConfig, plan: DataPlan, now: Instant) -> Result<Coordinator> {
        cfg.validate()?;
        let total = plan.total_steps().min(cfg.max_steps.unwrap_or(u64::MAX));
        if cfg.resume_from.0 > total {
            return Err(Error::InvalidConfig {
                field: "resume_from".to_string(),
                reason: format!(
                    "step {} is past the run's last step ({total})",
                    cfg.resume_from.0
                ),
            });
        }
        let deadline = now + cfg.timeouts.join;
        let (resume_from, elapsed) = (cfg.resume_from, cfg.elapsed_before);
        Ok(Coordinator {
            cfg,
            plan,
            total_steps: Step(total),
            conns: BTreeMap::new(),
            arrivals: 0,
            generation: Generation(0),
            restarts_used: 0,
            ring: Vec::new(),
            last_completed: resume_from,
            last_checkpoint: resume_from,
            elapsed,
            pending_saves: BTreeMap::new(),
            interrupting: false,
            interrupt_from_node: false,
            state: State::Gathering {
                since: now,
                deadline,
            },
            outcome: None,
            commands: VecDeque::new(),
            events: VecDeque::new(),
        })
    }

    // ----- inputs -------------------------------------------------------------------------

    /// A new control-plane connection whose token the driver has checked.
    pub fn handle_connect(&mut self, now: Instant, node: NodeId, auth: Auth) {
        self.expire(now);
        if self.conns.contains_key(&node) {
            self.ignore(
                node,
                "connect for a connection id already in use".to_string(),
            );
            return;
        }
        let refusal = match auth {
            Auth::TokenRejected => Some(Refusal::BadToken),
            Auth::TokenVerified
                if matches!(self.state, State::Stopping { .. } | State::Finished) =>
            {
                Some(Refusal::Stopping)
            }
            Auth::TokenVerified => None,
        };
        match refusal {
            Some(reason) => self.refuse(node, reason),
            None => {
                self.conns.insert(
                    node,
                    Conn {
                        last_heard: now,
                        reg: None,
                        rank: None,
                    },
                );
            }
        }
    }

    /// A message from a node.
    pub fn handle_message(&mut self, now: Instant, from: NodeId, msg: NodeMsg) {
        self.expire(now);
        let Some(conn) = self.conns.get_mut(&from) else {
            self.ignore(
                from,
                "message from a connection that is not admitted".to_string(),
            );
            return;
        };
        conn.last_heard = now;
        if matches!(self.state, State::Finished) {
            self.ignore(from, "the run is over".to_string());
            return;
        }
        match msg {
            NodeMsg::Heartbeat => {}
            NodeMsg::Register(reg) => self.on_register(now, from, reg),
            NodeMsg::Ready { generation } => self.on_ready(now, from, generation),
            NodeMsg::NcclUniqueId { generation, id } => self.on_nccl_id(now, from, generation, id),
            NodeMsg::StepDone(report) => self.on_step_done(now, from, report),
            NodeMsg::CheckpointSaved { generation, step } => {
                self.on_checkpoint_saved(now, from, generation, step)
            }
            NodeMsg::Failed {
                generation,
                step,
                reason,
            } => {
                if let Some(rank) = self.member_rank(from, generation, "failure report") {
                    let who = self.who(from, rank);
                    let mut reason = truncate(reason, MAX_REASON_BYTES);
                    // The step named is the coordinator's; a node that
                    // names another one is out of step, which is worth saying.
                    let current = self.current_step();
                    if step != current {
                        reason.push_str(&format!(" (the node said {step})"));
                    }
                    self.on_failure(
                        now,
                        Failure::Reported {
                            who,
                            step: current,
                            reason,
                        },
                    );
                }
            }
            NodeMsg::Interrupt => self.on_node_interrupt(now, from),
            NodeMsg::StopAck => {
                if let State::Stopping { waiting, .. } = &mut self.state {
                    waiting.remove(&from);
                    self.finish_if_all_acked();
                } else {
                    self.ignore(
                        from,
                        "stop acknowledgement, but no stop was sent".to_string(),
                    );
                }
            }
        }
    }

    /// The driver saw a connection close.
    pub fn handle_disconnect(&mut self, now: Instant, node: NodeId) {
        self.expire(now);
        if let Some(conn) = self.conns.remove(&node) {
            self.lost(now, node, conn, None);
        }
    }

    /// The launcher saw the process of the node registered as `host:local_rank` end: the
    /// same as its connection closing, known at once (a killed process closes nothing over
    /// QUIC, so otherwise the heartbeat timeout finds it). Nothing if no such node is
    /// connected (it had already gone, or never registered).
    pub fn handle_process_exit(&mut self, now: Instant, host: &str, local_rank: u32) {
        let found = self.conns.iter().find_map(|(id, c)| {
            let i = &c.reg.as_ref()?.registration.identity;
            (i.host == host && i.local_rank == local_rank).then_some(*id)
        });
        if let Some(id) = found {
            self.handle_disconnect(now, id);
        }
    }

    /// The user asked to stop (Ctrl-C). A second interrupt while stopping
    /// stops waiting for acknowledgements.
    pub fn handle_interrupt(&mut self, now: Instant) {
        self.expire(now);
        match &mut self.state {
            State::Finished => {}
            State::Stopping {
                waiting, outcome, ..
            } => {
                let unacked: Vec<NodeId> = std::mem::take(waiting).into_iter().collect();
                let outcome = outcome.clone();
                self.events.push_back(Event::StopTimedOut { unacked });
                self.finish(outcome);
            }
            State::Running { step, .. } if !self.interrupting => {
                // Finish the step in flight, save after it (complete_step), then stop.
                let step = *step;
                self.interrupting = true;
                self.events.push_back(Event::Interrupting { step });
            }
            // A node asked first: this is the same request, not a second one.
            State::Running { .. } if self.interrupt_from_node => {
                self.interrupt_from_node = false;
            }
            _ => self.stop_interrupted(now),
        }
    }

    /// A node got a stop signal of its own ([`NodeMsg::Interrupt`]): the run stops as on
    /// the user's first interrupt. Once stopping (another node's, or the user's, request
    /// came first) it changes nothing: a launcher signals every node at once.
    fn on_node_interrupt(&mut self, now: Instant, from: NodeId) {
        let node = match self.conns.get(&from).and_then(|c| c.rank) {
            Some(rank) => self.who(from, rank).to_string(),
            None => from.to_string(),
        };
        match &self.state {
            State::Finished | State::Stopping { .. } => {}
            _ if self.interrupting => {}
            State::Running { step, .. } => {
                let step = *step;
                self.interrupting = true;
                self.interrupt_from_node = true;
                self.events.push_back(Event::NodeInterrupted { node });
                self.events.push_back(Event::Interrupting { step });
            }
            _ => {
                self.events.push_back(Event::NodeInterrupted { node });
                self.stop_interrupted(now);
            }
        }
    }

    fn stop_interrupted(&mut self, now: Instant) {
        let outcome = Outcome::Interrupted {
            last_completed: self.last_completed,
            last_checkpoint: self.last_checkpoint,
        };
        self.stop(now, StopReason::Interrupted, outcome);
    }

    /// After an interrupt, with `step` just completed: rank 0 saves a checkpoint after it
    /// (unless one is already pending for it), and the run stops once it is recorded.
    fn save_then_stop(&mut self, now: Instant, step: Step) {
        let deadline = now + self.cfg.timeouts.save;
        if step > self.last_checkpoint && !self.pending_saves.contains_key(&step) {
            self.pending_saves.insert(
                step,
                PendingSave {
                    confirmed: false,
                    deadline: Some(deadline),
                },
            );
            self.commands.push_back(Outgoing {
                to: self.ring[0],
                command: Command::Save {
                    generation: self.generation,
                    step,
                },
            });
        }
        if self.pending_saves.is_empty() {
            self.stop_interrupted(now);
        } else {
            self.state = State::Finishing { deadline };
        }
    }

    /// Time has passed: fire every deadline up to `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.expire(now);
    }

    // ----- outputs ------------------------------------------------------------------------

    /// The next command to send.
    pub fn poll_command(&mut self) -> Option<Outgoing> {
        self.commands.pop_front()
    }

    /// The next event to log or record.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When to call [`Coordinator::handle_timeout`] next; `None` only once the run is over.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_deadline().map(|(at, _)| at)
    }

    /// How the run ended, once it has.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    pub fn phase(&self) -> Phase {
        match &self.state {
            State::Gathering { .. } => Phase::Gathering,
            State::Setup { .. } => Phase::Setup,
            State::Running { step, .. } => Phase::Running(*step),
            State::Finishing { .. } => Phase::Finishing,
            State::Stopping { .. } => Phase::Stopping,
            State::Finished => Phase::Finished,
        }
    }

    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// The step the run resumes from after a restart.
    pub fn last_checkpoint(&self) -> Step {
        self.last_checkpoint
    }

    /// Whether the core still counts `node` as an admitted connection (the
    /// driver can close any other it still holds).
    pub fn is_connected(&self, node: NodeId) -> bool {
        self.conns.contains_key(&node)
    }

    /// The last step of the run.
    pub fn total_steps(&self) -> Step {
        self.total_steps
    }

    // ----- deadlines ----------------------------------------------------------------------

    fn next_deadline(&self) -> Option<(Instant, Deadline)> {
        let phase = match &self.state {
            State::Finished => return None,
            State::Gathering { deadline, .. }
            | State::Setup { deadline, .. }
            | State::Running { deadline, .. }
            | State::Finishing { deadline }
            | State::Stopping { deadline, .. } => (*deadline, Deadline::Phase),
        };
        let saves = self
            .pending_saves
            .iter()
            .filter_map(|(s, p)| p.deadline.map(|d| (d, Deadline::Save(*s))));
        let silent = self.conns.iter().map(|(id, c)| {
            (
                c.last_heard + self.cfg.timeouts.heartbeat,
                Deadline::Silent(*id),
            )
        });
        std::iter::once(phase).chain(saves).chain(silent).min()
    }

    fn expire(&mut self, now: Instant) {
        // Each firing removes or moves its deadline past `now` (timeouts are
        // non-zero), so this loop ends.
        while let Some((at, which)) = self.next_deadline() {
            if at > now {
                break;
            }
            self.fire(now, which);
        }
    }

    fn fire(&mut self, now: Instant, which: Deadline) {
        match which {
            Deadline::Silent(node) => {
                let Some(conn) = self.conns.remove(&node) else {
                    return;
                };
                let silent_for = now.saturating_duration_since(conn.last_heard);
                self.lost(now, node, conn, Some(silent_for));
            }
            Deadline::Save(step) => {
                let waited = self.cfg.timeouts.save;
                self.on_failure(now, Failure::SaveTimeout { step, waited });
            }
            Deadline::Phase => match &self.state {
                State::Gathering { since, .. } => {
                    let registered = self.registered().len() as u32;
                    if registered >= self.cfg.min_nodes.0 {
                        self.start_generation(now);
                    } else {
                        let err = Error::TooFewNodes {
                            registered,
                            needed: self.cfg.min_nodes.0,
                            waited: now.saturating_duration_since(*since),
                            generation: self.generation,
                        };
                        self.stop(now, StopReason::Failed(err.clone()), Outcome::Failed(err));
                    }
                }
                State::Setup { since, ready, .. } => {
                    let missing = (0..self.ring.len() as u32)
                        .map(Rank)
                        .filter(|r| !ready.contains(r))
                        .collect();
                    let waited = now.saturating_duration_since(*since);
                    self.on_failure(now, Failure::SetupTimeout { missing, waited });
                }
                State::Running {
                    step,
                    started,
                    reports,
                    ..
                } => {
                    let missing = (0..self.ring.len() as u32)
                        .map(Rank)
                        .filter(|r| !reports.contains_key(r))
                        .collect();
                    let failure = Failure::StepTimeout {
                        step: *step,
                        missing,
                        waited: now.saturating_duration_since(*started),
                    };
                    self.on_failure(now, failure);
                }
                State::Finishing { .. } => {
                    // Only reached if a pending save had no deadline of its own.
                    let step = self
                        .pending_saves
                        .keys()
                        .next()
                        .copied()
                        .unwrap_or(self.last_completed);
                    self.on_failure(
                        now,
                        Failure::SaveTimeout {
                            step,
                            waited: self.cfg.timeouts.save,
                        },
                    );
                }
                State::Stopping {
                    waiting, outcome, ..
                } => {
                    let unacked = waiting.iter().copied().collect();
                    let outcome = outcome.clone();
                    self.events.push_back(Event::StopTimedOut { unacked });
                    self.finish(outcome);
                }
                State::Finished => {}
            },
        }
    }

    // ----- membership ---------------------------------------------------------------------

    fn refuse(&mut self, node: NodeId, reason: Refusal) {
        self.conns.remove(&node);
        if let State::Stopping { waiting, .. } = &mut self.state {
            // A refused connection is closed: nothing to wait for.
            waiting.remove(&node);
        }
        self.commands.push_back(Outgoing {
            to: node,
            command: Command::Refused(reason.clone()),
        });
        self.events.push_back(Event::Refused { node, reason });
        self.finish_if_all_acked();
    }

    fn ignore(&mut self, node: NodeId, reason: String) {
        self.events.push_back(Event::Ignored { node, reason });
    }

    /// Registered nodes of the current generation, in rank order: launcher
    /// rank first (absent last), then host and GPU slot, then arrival.
    fn registered(&self) -> Vec<NodeId> {
        let mut regs: Vec<(&Registered, NodeId)> = self
            .conns
            .iter()
            .filter_map(|(id, c)| c.reg.as_ref().map(|r| (r, *id)))
            .collect();
        regs.sort_by(|(a, _), (b, _)| {
            let key = |r: &Registered| {
                let i = &r.registration.identity;
                (
                    i.launch_rank.is_none(),
                    i.launch_rank,
                    i.host.clone(),
                    i.local_rank,
                    r.arrival,
                )
            };
            key(a).cmp(&key(b))
        });
        regs.into_iter().map(|(_, id)| id).collect()
    }

    fn check_registration(&self, from: NodeId, reg: &Registration) -> Option<Refusal> {
        let host = &reg.identity.host;
        if host.is_empty() || host.len() > MAX_HOST_BYTES {
            let reason = format!(
                "host name of {} bytes (must be 1..={MAX_HOST_BYTES})",
                host.len()
            );
            return Some(Refusal::BadIdentity { reason });
        }
        if reg.config_hash != self.cfg.config_hash {
            return Some(Refusal::ConfigMismatch {
                run: self.cfg.config_hash,
                node: reg.config_hash,
            });
        }
        if self.cfg.transport == Transport::Quic {
            let Some(addr) = reg.data_addr else {
                return Some(Refusal::NoDataAddr);
            };
            if addr.ip().is_unspecified() || addr.port() == 0 {
                let reason =
                    "a peer cannot connect to an unspecified address or port 0".to_string();
                return Some(Refusal::BadDataAddr { addr, reason });
            }
        }
        for (id, c) in &self.conns {
            let Some(other) = c.reg.as_ref().map(|r| &r.registration) else {
                continue;
            };
            if *id == from {
                continue;
            }
            if other.identity.host == *host && other.identity.local_rank == reg.identity.local_rank
            {
                return Some(Refusal::DuplicateIdentity {
                    host: host.clone(),
                    local_rank: reg.identity.local_rank,
                    other: *id,
                });
            }
            if let (Some(a), Some(b)) = (reg.data_addr, other.data_addr) {
                if a == b && self.cfg.transport == Transport::Quic {
                    return Some(Refusal::DuplicateDataAddr {
                        addr: a,
                        other: *id,
                    });
                }
            }
        }
        None
    }

    fn on_register(&mut self, now: Instant, from: NodeId, registration: Registration) {
        if self.conns.get(&from).is_some_and(|c| c.reg.is_some()) {
            self.ignore(from, format!("already registered for {}", self.generation));
            return;
        }
        if matches!(self.state, State::Stopping { .. }) {
            self.refuse(from, Refusal::Stopping);
            return;
        }
        if let Some(reason) = self.check_registration(from, &registration) {
            self.refuse(from, reason);
            return;
        }
        let gathering = matches!(self.state, State::Gathering { .. });
        if !gathering {
            // A run in progress keeps at most one standby per rank.
            let standbys = self
                .conns
                .values()
                .filter(|c| c.reg.is_some() && c.rank.is_none())
                .count();
            if standbys >= self.cfg.world_size.get() {
                self.refuse(
                    from,
                    Refusal::Full {
                        capacity: 2 * self.cfg.world_size.0,
                    },
                );
                return;
            }
        }
        let identity = registration.identity.clone();
        let arrival = self.arrivals;
        self.arrivals += 1;
        if let Some(conn) = self.conns.get_mut(&from) {
            conn.reg = Some(Registered {
                registration,
                arrival,
            });
        }
        self.commands.push_back(Outgoing {
            to: from,
            command: Command::Accepted {
                standby: !gathering,
                heartbeat_every: self.cfg.timeouts.heartbeat / 4,
            },
        });
        self.events.push_back(Event::Registered {
            node: from,
            identity,
            standby: !gathering,
        });
        if gathering && self.registered().len() >= self.cfg.world_size.get() {
            self.start_generation(now);
        }
    }

    /// A connection is gone (closed, or silent for `silent_for`).
    fn lost(&mut self, now: Instant, node: NodeId, conn: Conn, silent_for: Option<Duration>) {
        if let Some(silent_for) = silent_for {
            let reason = format!("silent for {:.1}s; declared dead", silent_for.as_secs_f64());
            self.commands.push_back(Outgoing {
                to: node,
                command: Command::Disconnect { reason },
            });
        }
        if let State::Stopping { waiting, .. } = &mut self.state {
            waiting.remove(&node);
            self.finish_if_all_acked();
            return;
        }
        match conn.rank {
            Some(rank) if self.ring_active() => {
                let who = who_of(node, rank, &conn);
                let step = self.current_step();
                let failure = match silent_for {
                    Some(silent_for) => Failure::Silent {
                        who,
                        step,
                        silent_for,
                    },
                    None => Failure::Disconnected { who, step },
                };
                self.on_failure(now, failure);
            }
            _ => {
                let reason = match silent_for {
                    Some(d) => format!("silent for {:.1}s", d.as_secs_f64()),
                    None => "disconnected".to_string(),
                };
                self.events.push_back(Event::Left { node, reason });
            }
        }
    }

    fn ring_active(&self) -> bool {
        matches!(
            self.state,
            State::Setup { .. } | State::Running { .. } | State::Finishing { .. }
        )
    }

    fn current_step(&self) -> Step {
        match &self.state {
            State::Running { step, .. } => *step,
            State::Setup { .. } => self.last_checkpoint.next(),
            _ => self.last_completed,
        }
    }

    fn who(&self, node: NodeId, rank: Rank) -> Who {
        match self.conns.get(&node) {
            Some(conn) => who_of(node, rank, conn),
            None => Who {
                rank,
                node,
                host: "?".to_string(),
                local_rank: 0,
            },
        }
    }

    /// The sender's rank if it is in the ring of `generation`, the current one;
    /// otherwise records why the message is ignored.
    fn member_rank(&mut self, from: NodeId, generation: Generation, what: &str) -> Option<Rank> {
        let rank = self.conns.get(&from).and_then(|c| c.rank);
        let reason = if generation != self.generation {
            format!(
                "{what} for {generation}, but the run is at {} (stale)",
                self.generation
            )
        } else if rank.is_none() || !self.ring_active() {
            format!("{what} from a node that is not in the ring")
        } else {
            return rank;
        };
        self.ignore(from, reason);
        None
    }

    // ----- the ring -----------------------------------------------------------------------

    fn start_generation(&mut self, now: Instant) {
        let mut members = self.registered();
        members.truncate(self.cfg.world_size.get());
        let world = WorldSize(members.len() as u32);
        for (r, id) in members.iter().enumerate() {
            if let Some(c) = self.conns.get_mut(id) {
                c.rank = Some(Rank(r as u32));
            }
        }
        self.ring = members;
        let addr_of = |s: &Self, r: usize| {
            let id = s.ring[r % s.ring.len()];
            s.conns
                .get(&id)
                .and_then(|c| c.reg.as_ref())
                .and_then(|r| r.registration.data_addr)
        };
        let w = self.ring.len();
        for r in 0..w {
            let collective = match self.cfg.transport {
                Transport::Nccl => CollectiveSetup::Nccl {
                    create_unique_id: r == 0,
                },
                Transport::Quic => {
                    let (left, right) = ((r + w - 1) % w, (r + 1) % w);
                    match (addr_of(self, left), addr_of(self, right)) {
                        (Some(l), Some(rr)) => CollectiveSetup::Ring {
                            left: Peer {
                                rank: Rank(left as u32),
                                addr: l,
                            },
                            right: Peer {
                                rank: Rank(right as u32),
                                addr: rr,
                            },
                        },
                        _ => {
                            // Registration refuses QUIC nodes without an address.
                            let err = Error::Internal(format!(
                                "rank {r}'s ring neighbour has no data address"
                            ));
                            self.stop(now, StopReason::Failed(err.clone()), Outcome::Failed(err));
                            return;
                        }
                    }
                }
            };
            let assignment = Assignment {
                generation: self.generation,
                rank: Rank(r as u32),
                world_size: world,
                collective,
                resume_from: self.last_checkpoint,
                total_steps: self.total_steps,
            };
            self.commands.push_back(Outgoing {
                to: self.ring[r],
                command: Command::Assign(assignment),
            });
        }
        let members = self
            .ring
            .iter()
            .enumerate()
            .map(|(r, id)| self.who(*id, Rank(r as u32)))
            .collect();
        self.events.push_back(Event::RunStarted {
            generation: self.generation,
            world_size: world,
            resume_from: self.last_checkpoint,
            members,
        });
        self.state = State::Setup {
            since: now,
            deadline: now + self.cfg.timeouts.setup,
            ready: BTreeSet::new(),
            nccl_id_sent: false,
        };
    }

    fn on_ready(&mut self, now: Instant, from: NodeId, generation: Generation) {
        let Some(rank) = self.member_rank(from, generation, "ready") else {
            return;
        };
        let State::Setup { ready, .. } = &mut self.state else {
            self.ignore(from, "ready, but the ring is past setup".to_string());
            return;
        };
        if !ready.insert(rank) {
            self.ignore(from, format!("ready twice from {rank}"));
            return;
        }
        if ready.len() == self.ring.len() {
            self.begin_step(now, self.last_checkpoint.next());
        }
    }

    fn on_nccl_id(&mut self, now: Instant, from: NodeId, generation: Generation, id: Vec<u8>) {
        let Some(rank) = self.member_rank(from, generation, "NCCL unique id") else {
            return;
        };
        let expected = self.cfg.transport == Transport::Nccl && rank == Rank(0);
        let State::Setup { nccl_id_sent, .. } = &mut self.state else {
            self.ignore(from, "NCCL unique id outside setup".to_string());
            return;
        };
        if !expected || *nccl_id_sent {
            let why = if *nccl_id_sent {
                "a second"
            } else {
                "an unexpected"
            };
            self.ignore(from, format!("{why} NCCL unique id from {rank}"));
            return;
        }
        if id.is_empty() || id.len() > MAX_NCCL_ID_BYTES {
            let who = self.who(from, rank);
            let reason = format!(
                "NCCL unique id of {} bytes (must be 1..={MAX_NCCL_ID_BYTES})",
                id.len()
            );
            self.on_failure(
                now,
                Failure::Protocol {
                    who,
                    step: self.current_step(),
                    reason,
                },
            );
            return;
        }
        *nccl_id_sent = true;
        for to in self.ring.iter().skip(1) {
            let command = Command::NcclUniqueId {
                generation,
                id: id.clone(),
            };
            self.commands.push_back(Outgoing { to: *to, command });
        }
    }

    fn is_save_step(&self, step: Step) -> bool {
        step == self.total_steps || every(self.cfg.save_every, step)
    }

    fn begin_step(&mut self, now: Instant, step: Step) {
        if step > self.total_steps {
            if self.pending_saves.is_empty() {
                self.complete_run(now);
            } else {
                self.state = State::Finishing {
                    deadline: now + self.cfg.timeouts.save,
                };
            }
            return;
        }
        let world = WorldSize(self.ring.len() as u32);
        let shards = match self.plan.shard(step, world) {
            Ok(s) => s,
            Err(e) => {
                let err = Error::Internal(format!("sharding {step}: {e}"));
                self.stop(now, StopReason::Failed(err.clone()), Outcome::Failed(err));
                return;
            }
        };
        let save = self.is_save_step(step);
        let report_hash = save || every(self.cfg.hash_every, step);
        if save {
            self.pending_saves.insert(
                step,
                PendingSave {
                    confirmed: false,
                    deadline: None,
                },
            );
        }
        for (r, examples) in shards.into_iter().enumerate() {
            let order = StepOrder {
                generation: self.generation,
                step,
                world_size: world,
                examples,
                save_checkpoint: save && r == 0,
                report_hash,
            };
            self.commands.push_back(Outgoing {
                to: self.ring[r],
                command: Command::RunStep(order),
            });
        }
        self.state = State::Running {
            step,
            started: now,
            deadline: now + self.cfg.timeouts.step,
            reports: BTreeMap::new(),
        };
    }

    fn on_step_done(&mut self, now: Instant, from: NodeId, report: StepReport) {
        let Some(rank) = self.member_rank(from, report.generation, "step report") else {
            return;
        };
        let State::Running { step, reports, .. } = &mut self.state else {
            self.ignore(
                from,
                format!("report for {}, but no step is in flight", report.step),
            );
            return;
        };
        let step = *step;
        if report.step < step {
            self.ignore(
                from,
                format!("report for {}, which is already complete", report.step),
            );
            return;
        }
        if report.step > step {
            let who = self.who(from, rank);
            let reason = format!("reported {} while {step} is in flight", report.step);
            self.on_failure(now, Failure::Protocol { who, step, reason });
            return;
        }
        if reports.contains_key(&rank) {
            self.ignore(from, format!("second report for {step} from {rank}"));
            return;
        }
        reports.insert(rank, report);
        if reports.len() == self.ring.len() {
            self.complete_step(now);
        }
    }

    fn complete_step(&mut self, now: Instant) {
        // The state stays `Running` until this step's outcome is decided, so a
        // failure found below still sees the ring as active.
        let State::Running {
            step,
            started,
            reports,
            ..
        } = &mut self.state
        else {
            return;
        };
        let (step, started, reports) = (*step, *started, std::mem::take(reports));
        let wants_hash = self.is_save_step(step) || every(self.cfg.hash_every, step);
        if wants_hash {
            let mut groups: BTreeMap<AdapterHash, Vec<Rank>> = BTreeMap::new();
            for (rank, rep) in &reports {
                match rep.adapter_hash {
                    Some(h) => groups.entry(h).or_default().push(*rank),
                    None => {
                        let who = self.who(self.ring[rank.index()], *rank);
                        let reason =
                            "no adapter hash, though the step order asked for one".to_string();
                        self.on_failure(now, Failure::Protocol { who, step, reason });
                        return;
                    }
                }
            }
            if groups.len() > 1 {
                let mut groups: Vec<HashGroup> = groups
                    .into_iter()
                    .map(|(hash, ranks)| HashGroup { hash, ranks })
                    .collect();
                groups.sort_by_key(|g| g.ranks[0]);
                let err = Error::AdapterHashMismatch { step, groups };
                self.stop(now, StopReason::Failed(err.clone()), Outcome::Failed(err));
                return;
            }
        }
        let examples = self.plan.batch(step).map(|b| b.len() as u64).unwrap_or(0);
        let ordered: Vec<&StepReport> = reports.values().collect();
        let wall = now.saturating_duration_since(started);
        self.elapsed += wall;
        let mut record = StepRecord::aggregate(self.generation, step, examples, wall, &ordered);
        record.elapsed_s = self.elapsed.as_secs_f64();
        self.events.push_back(Event::StepCompleted(record));
        self.last_completed = step;
        if let Some(p) = self.pending_saves.get_mut(&step) {
            if p.confirmed {
                self.record_checkpoint(step);
            } else {
                p.deadline = Some(now + self.cfg.timeouts.save);
            }
        }
        if self.interrupting && step < self.total_steps {
            self.save_then_stop(now, step);
            return;
        }
        self.begin_step(now, step.next());
    }

    fn on_checkpoint_saved(
        &mut self,
        now: Instant,
        from: NodeId,
        generation: Generation,
        step: Step,
    ) {
        let Some(rank) = self.member_rank(from, generation, "checkpoint confirmation") else {
            return;
        };
        if rank != Rank(0) {
            self.ignore(
                from,
                format!("checkpoint confirmation from {rank}; only rank 0 writes checkpoints"),
            );
            return;
        }
        let barrier_passed = step <= self.last_completed;
        let Some(p) = self.pending_saves.get_mut(&step) else {
            self.ignore(
                from,
                format!("checkpoint confirmation for {step}, which no save was pending for"),
            );
            return;
        };
        if p.confirmed {
            self.ignore(from, format!("second checkpoint confirmation for {step}"));
            return;
        }
        p.confirmed = true;
        if barrier_passed {
            self.record_checkpoint(step);
            if matches!(self.state, State::Finishing { .. }) && self.pending_saves.is_empty() {
                self.complete_run(now);
            }
        }
    }

    fn record_checkpoint(&mut self, step: Step) {
        self.pending_saves.remove(&step);
        self.last_checkpoint = self.last_checkpoint.max(step);
        self.events.push_back(Event::CheckpointRecorded { step });
    }

    fn complete_run(&mut self, now: Instant) {
        if self.interrupting && self.last_completed < self.total_steps {
            self.stop_interrupted(now);
            return;
        }
        let outcome = Outcome::Completed {
            steps: self.last_completed,
            last_checkpoint: self.last_checkpoint,
        };
        self.stop(now, StopReason::Finished, outcome);
    }

    // ----- failures and the end ------------------------------------------------------------

    fn on_failure(&mut self, now: Instant, failure: Failure) {
        if !self.ring_active() {
            return;
        }
        self.events.push_back(Event::NodeFailed(failure.clone()));
        // A checkpoint rank 0 was told to write after a completed step, but never confirmed:
        // the failure came while it was writing it (the other ranks were already in the next
        // step, which the failure names). It does not count; say so.
        let unconfirmed = self
            .pending_saves
            .iter()
            .filter(|(s, p)| !p.confirmed && **s <= self.last_completed)
            .map(|(s, _)| *s)
            .max()
            .filter(|_| !matches!(failure, Failure::SaveTimeout { .. }));
        if let Some(step) = unconfirmed {
            self.events.push_back(Event::CheckpointLost {
                step,
                last_checkpoint: self.last_checkpoint,
            });
        }
        if self.interrupting {
            // The run was stopping anyway: no restart; the last recorded checkpoint stands.
            self.stop_interrupted(now);
        } else if self.restarts_used < self.cfg.max_restarts {
            self.restart(now, failure);
        } else {
            let err = Error::NodeFailure {
                failure,
                restarts_used: self.restarts_used,
                max_restarts: self.cfg.max_restarts,
            };
            self.stop(now, StopReason::Failed(err.clone()), Outcome::Failed(err));
        }
    }

    /// Every member drops its ring and registers again; the run resumes from
    /// the last recorded checkpoint with whoever is back by the rejoin
    /// deadline (standbys included).
    fn restart(&mut self, now: Instant, failure: Failure) {
        self.restarts_used += 1;
        self.generation = Generation(self.generation.0 + 1);
        self.pending_saves.clear();
        self.last_completed = self.last_checkpoint;
        self.ring.clear();
        let reason = failure.to_string();
        for (id, conn) in self.conns.iter_mut() {
            if conn.rank.take().is_some() {
                conn.reg = None;
                let command = Command::Restart {
                    generation: self.generation,
                    resume_from: self.last_checkpoint,
                    reason: reason.clone(),
                };
                self.commands.push_back(Outgoing { to: *id, command });
            }
        }
        self.events.push_back(Event::Restarting {
            generation: self.generation,
            resume_from: self.last_checkpoint,
            restart: self.restarts_used,
            max_restarts: self.cfg.max_restarts,
        });
        self.state = State::Gathering {
            since: now,
            deadline: now + self.cfg.timeouts.rejoin,
        };
        if self.registered().len() >= self.cfg.world_size.get() {
            self.start_generation(now);
        }
    }

    fn stop(&mut self, now: Instant, reason: StopReason, outcome: Outcome) {
        self.pending_saves.clear();
        self.ring.clear();
        for conn in self.conns.values_mut() {
            conn.rank = None;
        }
        self.events.push_back(Event::Stopping(reason.clone()));
        let waiting: BTreeSet<NodeId> = self.conns.keys().copied().collect();
        for id in &waiting {
            self.commands.push_back(Outgoing {
                to: *id,
                command: Command::Stop(reason.clone()),
            });
        }
        self.state = State::Stopping {
            deadline: now + self.cfg.timeouts.stop,
            waiting,
            outcome,
        };
        self.finish_if_all_acked();
    }

    fn finish_if_all_acked(&mut self) {
        if let State::Stopping {
            waiting, outcome, ..
        } = &self.state
        {
            if waiting.is_empty() {
                let outcome = outcome.clone();
                self.finish(outcome);
            }
        }
    }

    fn finish(&mut self, outcome: Outcome) {
        self.state = State::Finished;
        self.outcome = Some(outcome.clone());
        self.events.push_back(Event::Finished(outcome));
    }
}

/// Whether `step` is one of every `k`th steps (never when `k` is unset).
fn every(k: Option<u64>, step: Step) -> bool {
    k.is_some_and(|k| k != 0 && step.0 % k == 0)
}

fn who_of(node: NodeId, rank: Rank, conn: &Conn) -> Who {
    let (host, local_rank) = match &conn.reg {
        Some(r) => (
            r.registration.identity.host.clone(),
            r.registration.identity.local_rank,
        ),
        None => ("?".to_string(), 0),
    };
    Who {
        rank,
        node,
        host,
        local_rank,
    }
}
