//! ringtune-collectives: keeps every rank's gradients identical.
//!
//! # Layout
//! - [`GradSync`] ([`sync`]): the interface the training node calls — all-reduce (sum) of a
//!   flat f32 buffer or of several buffers fused into buckets, broadcast from a rank,
//!   barrier. Every call carries a step and a timeout; the communicator numbers its
//!   collectives (`Seq`) and every frame carries both, so a diverged or dead peer fails the
//!   collective loudly with ranks and sequence numbers instead of hanging.
//! - [`ring`]: the sans-IO ring state machines (reduce-scatter + all-gather, broadcast).
//!   No sockets, no threads, no clock.
//! - [`mem`]: an in-memory transport (threads and channels) for tests and single-process
//!   simulations.
//! - [`net`]: the network ring (QUIC, TCP+TLS, and plain TCP for trusted networks): one
//!   authenticated, ordered byte stream to the right neighbour and one from the left, a
//!   reader and a writer per link, the ring core in between. `stream` is the TCP data
//!   path: a thread per direction, one AES-128-GCM seal per frame under keys exported from
//!   the link's TLS session.
//! - [`tls`] and [`auth`]: the cluster certificate (generated per run or loaded from PEM)
//!   that both ends pin, and the cluster-token proof exchanged after the TLS handshake.
//! - `nccl` (feature `nccl`): NCCL through cudarc for GPU ranks.

pub mod auth;
pub mod error;
pub mod mem;
pub mod net;
mod quic;
pub mod ring;
mod stream;
pub mod sync;
mod tcp;
pub mod tls;
pub mod types;

#[cfg(feature = "nccl")]
pub mod nccl;

pub use error::{Error, Result};
pub use ringtune_protocol::WireDtype;
pub use sync::GradSync;
pub use types::{Call, Rank, Seq, Step, WorldSize};
