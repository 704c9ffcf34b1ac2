//! The coordinator's messages: [`NodeMsg`] in (from a node), [`Command`] out
//! (to one node, as an [`Outgoing`]).
//!
//! These are plain serde types so that the wire protocol can carry them
//! as they are; nothing here knows about framing, sockets or the cluster
//! token (the driver checks the token before a connection reaches the core).
//! Every message that belongs to one incarnation of the ring carries its
//! [`Generation`], so a late message from before a restart is recognised.

use crate::error::Error;
use crate::ids::{AdapterHash, ConfigHash, Generation, NodeId, Rank, Step, WorldSize};
use crate::plan::PlannedExample;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// Who a node says it is. Used to order ranks (launcher rank, then host and
/// GPU slot, so ranks on one host are neighbours in the ring) and to refuse
/// a second process claiming the same slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIdentity {
    /// The host name the node runs on (at most 255 bytes).
    pub host: String,
    /// The GPU slot on that host (`LOCAL_RANK` / `SLURM_LOCALID`).
    pub local_rank: u32,
    /// The launcher's global rank, when launched by one (`RANK` / `SLURM_PROCID`).
    pub launch_rank: Option<u32>,
}

/// A node's request to join the run. Sent once per generation: at first, and
/// again after every [`Command::Restart`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub identity: NodeIdentity,
    /// The hash of the config the node was started with; must equal the run's.
    pub config_hash: ConfigHash,
    /// Where the node accepts its ring neighbour's data-plane connection
    /// (required with the QUIC transport; unused with NCCL).
    pub data_addr: Option<SocketAddr>,
}

/// What a node reports when it finished a step (forward/backward over its
/// shard, the all-reduce, the optimiser step).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    pub generation: Generation,
    pub step: Step,
    /// Σ per-token loss × weight over this rank's shard.
    pub loss_sum: f64,
    /// Σ weights over this rank's shard (the loss normaliser's share).
    pub weight_sum: f64,
    /// Tokens this rank processed.
    pub tokens: u64,
    /// The epoch the step's global batch came from (0-based).
    pub epoch: u64,
    /// The learning rate of this step's optimiser update.
    pub lr: f64,
    /// Global L2 norm of the normalised gradient before clipping (after the all-reduce,
    /// so every rank reports the same value).
    pub grad_norm: f64,
    /// Time in forward/backward and the optimiser.
    pub compute: Duration,
    /// Time in the gradient all-reduce (waiting on the ring included).
    pub comm: Duration,
    /// The adapter's hash after this step, when the step order asked for it.
    pub adapter_hash: Option<AdapterHash>,
    /// Mean NLL on the eval data after this step, from the rank that evaluated (rank 0, at
    /// the config's eval cadence).
    pub eval_nll: Option<f64>,
    /// Method-specific numbers that are already global (summed through the all-reduce, so
    /// every rank has the same): RL rewards, DPO accuracies. The record takes rank 0's.
    pub extra: std::collections::BTreeMap<String, f64>,
}

/// A message from a node to the coordinator. Any message counts as a sign of
/// life; [`NodeMsg::Heartbeat`] exists for the times a node has nothing else to say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum NodeMsg {
    Register(Registration),
    Heartbeat,
    /// Model loaded and data plane connected for this generation.
    Ready {
        generation: Generation,
    },
    /// From rank 0 with the NCCL transport: the unique id it created, for the
    /// coordinator to hand to the other ranks. Opaque, at most
    /// [`MAX_NCCL_ID_BYTES`] bytes.
    NcclUniqueId {
        generation: Generation,
        id: Vec<u8>,
    },
    StepDone(StepReport),
    /// From rank 0: the checkpoint after `step` is written (atomically).
    CheckpointSaved {
        generation: Generation,
        step: Step,
    },
    /// The node could not complete `step` (its error, e.g. a collective timeout naming a peer).
    Failed {
        generation: Generation,
        step: Step,
        reason: String,
    },
    /// The node has stopped after a [`Command::Stop`].
    StopAck,
    /// The node got a SIGINT/SIGTERM of its own (a preemption, an eviction, a Ctrl-C on
    /// its terminal): the run stops as on the coordinator's own interrupt, after the step
    /// in flight and a checkpoint of it, rather than losing that node mid-step.
    Interrupt,
}

/// The most bytes an NCCL unique id may have (NCCL's own is 128).
pub const MAX_NCCL_ID_BYTES: usize = 1024;
/// The longest host name a node may claim.
pub const MAX_HOST_BYTES: usize = 255;
/// Node-provided error text is cut to this many bytes before it is kept.
pub const MAX_REASON_BYTES: usize = 1024;

/// One ring neighbour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub rank: Rank,
    pub addr: SocketAddr,
}

/// How a rank joins the gradient all-reduce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CollectiveSetup {
    /// The QUIC ring: send to `right` (rank + 1), receive from `left` (rank − 1).
    /// With one rank both are the node itself.
    Ring { left: Peer, right: Peer },
    /// NCCL: rank 0 creates the unique id and sends it in
    /// [`NodeMsg::NcclUniqueId`]; the others get it in [`Command::NcclUniqueId`].
    Nccl { create_unique_id: bool },
}

/// A node's place in one generation of the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub generation: Generation,
    pub rank: Rank,
    pub world_size: WorldSize,
    pub collective: CollectiveSetup,
    /// Load the checkpoint written after this step (`Step(0)`: start fresh).
    pub resume_from: Step,
    /// The last step of the run.
    pub total_steps: Step,
}

/// Run one step over this shard of the global batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepOrder {
    pub generation: Generation,
    pub step: Step,
    pub world_size: WorldSize,
    /// This rank's shard, in epoch order (the driver attaches the tokens).
    pub examples: Vec<PlannedExample>,
    /// Rank 0 only: write a checkpoint after this step, then send
    /// [`NodeMsg::CheckpointSaved`].
    pub save_checkpoint: bool,
    /// Put the adapter hash after this step into the report.
    pub report_hash: bool,
}

/// Why the run stops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StopReason {
    /// Every step is done and the final checkpoint recorded.
    Finished,
    /// The user interrupted the run (Ctrl-C).
    Interrupted,
    /// The run failed; every node exits with this error.
    Failed(Error),
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::Finished => write!(f, "training finished"),
            StopReason::Interrupted => write!(f, "interrupted by the user"),
            StopReason::Failed(e) => write!(f, "run failed: {e}"),
        }
    }
}

/// Why a connection or registration was turned away. The run goes on without
/// that node; the driver closes the connection after sending the refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The cluster token did not match.
    BadToken,
    /// The node was started with another config: another run's node.
    ConfigMismatch { run: ConfigHash, node: ConfigHash },
    /// Another live node already claims this host and GPU slot.
    DuplicateIdentity {
        host: String,
        local_rank: u32,
        other: NodeId,
    },
    /// The host name is empty or too long.
    BadIdentity { reason: String },
    /// The QUIC transport needs a data-plane address and none was given.
    NoDataAddr,
    /// The data-plane address cannot be connected to by a peer.
    BadDataAddr { addr: SocketAddr, reason: String },
    /// Another live node already listens on this data-plane address.
    DuplicateDataAddr { addr: SocketAddr, other: NodeId },
    /// The run has all the nodes it can hold (world size plus as many standbys).
    Full { capacity: u32 },
    /// The run is stopping.
    Stopping,
}

impl Refusal {
    /// Whether the node should try again later: these refusals clear up by
    /// themselves (a dead predecessor on the same GPU slot or address is
    /// declared dead within the heartbeat timeout; a standby place frees up).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Refusal::DuplicateIdentity { .. }
                | Refusal::DuplicateDataAddr { .. }
                | Refusal::Full { .. }
        )
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::BadToken => write!(f, "wrong cluster token"),
            Refusal::ConfigMismatch { run, node } => write!(
                f,
                "config hash {node:.12} differs from this run's {run:.12} (a node started with another config)"
            ),
            Refusal::DuplicateIdentity { host, local_rank, other } => {
                write!(
                    f,
                    "{host}:{local_rank} is already registered by {other} (each node on a host \
                     needs its own slot: --local-rank N or LOCAL_RANK; or the node it replaces \
                     is not yet declared dead)"
                )
            }
            Refusal::BadIdentity { reason } => write!(f, "bad identity: {reason}"),
            Refusal::NoDataAddr => write!(f, "no data-plane address (the QUIC ring needs one)"),
            Refusal::BadDataAddr { addr, reason } => write!(f, "data-plane address {addr}: {reason}"),
            Refusal::DuplicateDataAddr { addr, other } => {
                write!(f, "data-plane address {addr} is already used by {other}")
            }
            Refusal::Full { capacity } => write!(f, "the run is full ({capacity} nodes including standbys)"),
            Refusal::Stopping => write!(f, "the run is stopping"),
        }
    }
}

/// A command from the coordinator to one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Not admitted; the driver closes the connection after sending this.
    Refused(Refusal),
    /// Registered. `standby`: the run is already going; the node waits to be
    /// used at the next restart. `heartbeat_every`: how often the node must
    /// send something (a quarter of the coordinator's heartbeat timeout).
    Accepted {
        standby: bool,
        heartbeat_every: Duration,
    },
    Assign(Assignment),
    /// The NCCL unique id from rank 0, for this generation.
    NcclUniqueId {
        generation: Generation,
        id: Vec<u8>,
    },
    RunStep(StepOrder),
    /// Drop the ring, register again, and expect to resume from `resume_from`.
    Restart {
        generation: Generation,
        resume_from: Step,
        reason: String,
    },
    /// Write a checkpoint of the state after `step` (the last completed step) and confirm
    /// it with [`NodeMsg::CheckpointSaved`]: sent to rank 0 when the user interrupts a run,
    /// so that a stop loses no completed step.
    Save {
        generation: Generation,
        step: Step,
    },
    /// Stop and answer [`NodeMsg::StopAck`].
    Stop(StopReason),
    /// The node is out of the run (declared dead, or a restart went on
    /// without it); the driver closes the connection after sending this.
    Disconnect {
        reason: String,
    },
}

/// A command and the node it goes to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outgoing {
    pub to: NodeId,
    pub command: Command,
}

/// Cuts untrusted text to `max` bytes at a character boundary.
pub(crate) fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}
