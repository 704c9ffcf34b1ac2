//! ringtune-coordinator: schedules a data-parallel run.
//!
//! # Layout
//!
//! - [`core`]: the sans-IO state machine (membership, ranks, ring neighbours,
//!   the step barrier, heartbeats and failure detection, the failure policy,
//!   checkpoint orchestration, clean stop). No sockets, no tokio, no clock:
//!   inputs are `handle_*(now, ..)`, outputs are drained with `poll_*`, and
//!   `poll_timeout` says when to call `handle_timeout` next.
//! - [`msg`]: what nodes send ([`NodeMsg`]) and what the core sends back
//!   ([`Command`]); serde types, carried later by the wire protocol.
//! - [`plan`]: the data plan: each step's global batch split over the ranks,
//!   balanced by token count.
//! - [`metrics`]: one record per step, summed over the ranks.
//! - [`launch`]: the launcher environment (Slurm, torchrun) as a [`LaunchEnv`].
//!
//! - [`driver`]: the tokio driver that feeds the core from real connections and a
//!   real clock.
//! - [`wire`]: the control plane's wire (TLS over TCP, the mutual token proof, frames).

pub mod core;
pub mod driver;
pub mod error;
pub mod ids;
pub mod launch;
pub mod metrics;
pub mod msg;
pub mod plan;
pub mod wire;

pub use crate::core::{
    Auth, Coordinator, CoordinatorConfig, Event, Outcome, Phase, Timeouts, Transport,
};
pub use crate::error::{Error, Failure, HashGroup, Result, Who};
pub use crate::ids::{
    AdapterHash, ConfigHash, ExampleIndex, Generation, NodeId, Rank, Step, WorldSize,
};
pub use crate::launch::{expand_hostlist, first_host, CoordinatorAddr, LaunchEnv, Launcher};
pub use crate::metrics::StepRecord;
pub use crate::msg::{
    Assignment, CollectiveSetup, Command, NodeIdentity, NodeMsg, Outgoing, Peer, Refusal,
    Registration, StepOrder, StepReport, StopReason,
};
pub use crate::plan::{DataPlan, PlannedExample};
