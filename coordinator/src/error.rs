//! The crate's one error type, and [`Failure`]: what went wrong with a node.
//!
//! Errors are serde-serialisable because a run's final error travels to every
//! node (and into the run folder) as part of the stop message.

use crate::ids::{AdapterHash, Generation, NodeId, Rank, Step};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the coordinator core, the data plan and the
/// launcher-environment parsing.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
pub enum Error {
    /// A coordinator setting is out of range (e.g. `min_nodes` above the world size).
    #[error("coordinator setting `{field}`: {reason}")]
    InvalidConfig { field: String, reason: String },
    /// The data plan cannot be built from the epochs it was given.
    #[error("data plan: {reason}")]
    InvalidPlan { reason: String },
    /// A step outside the data plan was asked for.
    #[error("{step} is outside the data plan, which has steps 1..={total}")]
    StepOutOfRange { step: Step, total: u64 },
    /// A launcher variable (SLURM_*, RANK, MASTER_ADDR, ...) is set but malformed.
    #[error("launcher variable {var}={value:?}: {reason}")]
    LaunchVar {
        var: String,
        value: String,
        reason: String,
    },
    /// A launcher variable that the detected launcher always sets is missing.
    #[error("launcher variable {var} is not set, but {because}")]
    LaunchVarMissing { var: String, because: String },
    /// A Slurm host list (`gpu[01-04,07]`) does not parse.
    #[error("host list {list:?}: {reason}")]
    Hostlist { list: String, reason: String },
    /// A node failed and the failure policy stopped the run (restarts disabled
    /// or used up).
    #[error("{failure}; {}", restarts_note(*.restarts_used, *.max_restarts))]
    NodeFailure {
        failure: Failure,
        restarts_used: u32,
        max_restarts: u32,
    },
    /// The ranks' adapters are no longer bit-identical: the run cannot go on,
    /// and restarting would hide a bug, so it stops.
    #[error("adapter hashes disagree after {step}: {}", HashGroups(.groups))]
    AdapterHashMismatch { step: Step, groups: Vec<HashGroup> },
    /// Fewer nodes than `min_nodes` registered before the gathering deadline.
    #[error(
        "only {registered} node(s) registered within {:.1}s for {generation}; the run needs at least {needed}",
        .waited.as_secs_f64()
    )]
    TooFewNodes {
        registered: u32,
        needed: u32,
        waited: Duration,
        generation: Generation,
    },
    /// An invariant of the core broke; reported instead of panicking.
    #[error("coordinator internal error: {0}")]
    Internal(String),
    /// The control plane's network failed (binding, TLS, a connection); `context` says what
    /// was being done and with which address.
    #[error("{context}: {message}")]
    Net { context: String, message: String },
    /// A peer on the control plane broke the protocol (bad frame, wrong token proof,
    /// unexpected message); `peer` names its address.
    #[error("control plane, {peer}: {reason}")]
    Wire { peer: String, reason: String },
}

/// The ranks that reported one adapter hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashGroup {
    pub hash: AdapterHash,
    pub ranks: Vec<Rank>,
}

struct HashGroups<'a>(&'a [HashGroup]);

impl fmt::Display for HashGroups<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, g) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{} {:.12}", RankList(&g.ranks), g.hash)?;
        }
        Ok(())
    }
}

/// Prints `ranks [0, 2]` / `rank 1`.
pub(crate) struct RankList<'a>(pub &'a [Rank]);

impl fmt::Display for RankList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let [one] = self.0 {
            return write!(f, "{one}");
        }
        write!(f, "ranks [")?;
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{}", r.0)?;
        }
        write!(f, "]")
    }
}

fn restarts_note(used: u32, max: u32) -> String {
    if max == 0 {
        "restarts are disabled (max_restarts = 0)".to_string()
    } else {
        format!("all {used} of max_restarts = {max} restarts used")
    }
}

/// A member of the ring, named the way an operator finds it: rank, host and
/// GPU slot, and the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Who {
    pub rank: Rank,
    pub node: NodeId,
    pub host: String,
    pub local_rank: u32,
}

impl fmt::Display for Who {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}:{}, {})",
            self.rank, self.host, self.local_rank, self.node
        )
    }
}

/// What went wrong with a node (or with the ring as a whole) while a run was
/// set up or stepping. Each failure goes through the failure policy: stop, or
/// restart from the last checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Failure {
    /// No message (not even a heartbeat) for longer than the heartbeat timeout.
    Silent {
        who: Who,
        step: Step,
        silent_for: Duration,
    },
    /// The driver saw the node's connection close.
    Disconnected { who: Who, step: Step },
    /// The node reported that it could not run the step (its own error text).
    Reported {
        who: Who,
        step: Step,
        reason: String,
    },
    /// The node sent something that a correct node never sends at this point
    /// (a report for a step not yet handed out, a missing adapter hash, ...).
    Protocol {
        who: Who,
        step: Step,
        reason: String,
    },
    /// Every node kept heart-beating but some never finished the step.
    StepTimeout {
        step: Step,
        missing: Vec<Rank>,
        waited: Duration,
    },
    /// Some nodes never reported ready (model loaded, ring connected).
    SetupTimeout {
        missing: Vec<Rank>,
        waited: Duration,
    },
    /// Rank 0 never confirmed the checkpoint it was told to write.
    SaveTimeout { step: Step, waited: Duration },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Silent {
                who,
                step,
                silent_for,
            } => write!(
                f,
                "{who} went silent for {:.1}s during {step}; declared dead",
                silent_for.as_secs_f64()
            ),
            Failure::Disconnected { who, step } => write!(f, "{who} disconnected during {step}"),
            Failure::Reported { who, step, reason } => write!(f, "{who} failed {step}: {reason}"),
            Failure::Protocol { who, step, reason } => {
                write!(f, "{who} broke the protocol during {step}: {reason}")
            }
            Failure::StepTimeout {
                step,
                missing,
                waited,
            } => write!(
                f,
                "{step} timed out after {:.1}s waiting for {}",
                waited.as_secs_f64(),
                RankList(missing)
            ),
            Failure::SetupTimeout { missing, waited } => write!(
                f,
                "setup timed out after {:.1}s waiting for {} to report ready",
                waited.as_secs_f64(),
                RankList(missing)
            ),
            Failure::SaveTimeout { step, waited } => write!(
                f,
                "rank 0 did not confirm the checkpoint of {step} within {:.1}s",
                waited.as_secs_f64()
            ),
        }
    }
}

impl Failure {
    /// The step the failure happened in, for the restart decision and logs.
    pub fn step(&self) -> Option<Step> {
        match self {
            Failure::Silent { step, .. }
            | Failure::Disconnected { step, .. }
            | Failure::Reported { step, .. }
            | Failure::Protocol { step, .. }
            | Failure::StepTimeout { step, .. }
            | Failure::SaveTimeout { step, .. } => Some(*step),
            Failure::SetupTimeout { .. } => None,
        }
    }
}
