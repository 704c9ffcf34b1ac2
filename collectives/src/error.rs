//! The crate's one error type. Every variant that concerns a collective names the local
//! rank, the collective's sequence number and the caller's step, so a failure in a
//! 64-rank job says where to look.

use crate::types::{Rank, Seq, Step};

/// Errors from collectives and their transports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A collective did not complete before its deadline (a dead, stalled or partitioned peer).
    #[error("rank {rank}: {op} seq {seq} (step {step}) timed out after {after_ms} ms waiting for rank {waiting_for}: {progress}")]
    Timeout {
        /// Local rank.
        rank: Rank,
        /// Collective kind, for the message.
        op: &'static str,
        /// Collective sequence number.
        seq: Seq,
        /// Caller's step.
        step: Step,
        /// Milliseconds the collective was allowed.
        after_ms: u64,
        /// The neighbour whose data never came.
        waiting_for: Rank,
        /// What had arrived by then.
        progress: String,
    },
    /// A peer sent a frame for a different collective than the one this rank runs (diverged
    /// control flow, different buffer sizes, or a bug).
    #[error("rank {rank} (seq {seq}, step {step}) got a frame from rank {peer} for seq {peer_seq}, step {peer_step}: {what}")]
    Mismatch {
        /// Local rank.
        rank: Rank,
        /// Local collective sequence number.
        seq: Seq,
        /// Local step.
        step: Step,
        /// Sending rank.
        peer: Rank,
        /// Sequence number in the frame.
        peer_seq: Seq,
        /// Step in the frame.
        peer_step: Step,
        /// Which field disagreed.
        what: String,
    },
    /// A peer sent bytes that are not a valid frame, or a frame that is out of place.
    #[error("rank {rank} (seq {seq}): malformed frame from rank {peer}: {reason}")]
    Malformed {
        /// Local rank.
        rank: Rank,
        /// Local collective sequence number.
        seq: Seq,
        /// Sending rank.
        peer: Rank,
        /// What was wrong.
        reason: String,
    },
    /// The link to a neighbour failed or closed.
    #[error("rank {rank}: link to rank {peer} lost during seq {seq} (step {step}): {reason}")]
    PeerLost {
        /// Local rank.
        rank: Rank,
        /// Neighbour.
        peer: Rank,
        /// Collective running when it was noticed.
        seq: Seq,
        /// Its step.
        step: Step,
        /// Transport's reason.
        reason: String,
    },
    /// Setting up a link failed: connection, TLS, version, world size or cluster token.
    #[error("rank {rank}: link with {peer} not established: {reason}")]
    Link {
        /// Local rank.
        rank: Rank,
        /// The peer, as far as known (rank and/or address).
        peer: String,
        /// Why.
        reason: String,
    },
    /// Certificate, key or token material could not be loaded or used.
    #[error("TLS/credentials: {0}")]
    Credentials(String),
    /// The caller passed something inconsistent (a root outside the world, …).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An earlier collective failed; this communicator's links are in an unknown state.
    #[error("rank {rank}: communicator unusable after an earlier failure: {first}")]
    Poisoned {
        /// Local rank.
        rank: Rank,
        /// The first error.
        first: String,
    },
    /// An I/O operation outside a collective (binding a socket, reading a file).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// NCCL reported an error.
    #[error("rank {rank}: NCCL {op} seq {seq} (step {step}): {reason}")]
    Nccl {
        /// Local rank.
        rank: Rank,
        /// Operation.
        op: &'static str,
        /// Collective sequence number.
        seq: Seq,
        /// Caller's step.
        step: Step,
        /// NCCL's message.
        reason: String,
    },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
