//! ringtune-protocol: the bytes that cross a socket between ringtune processes.
//!
//! # Layout
//! - [`frame`]: length-prefixed framing. Every frame is `u32 length (LE) | body`; the length
//!   is checked against a hard limit *before* any buffer is allocated for the body, so a peer
//!   cannot make us allocate by lying about a size.
//! - [`chunk`]: the fixed-layout header of a collective data frame (collective sequence,
//!   step, phase, round, piece, …). It is hand-encoded rather than bincode because it sits on
//!   the hot path of every gradient chunk and must have a fixed, checkable size.
//! - [`control`]: bincode-encoded control messages (the version/authentication handshake),
//!   decoded with a size limit.
//!
//! This crate does no I/O: it turns bytes into typed values and back, and says exactly why
//! a byte string is refused. Reading and writing sockets is the callers' business.

pub mod chunk;
pub mod control;
pub mod frame;

pub use chunk::{ChunkHeader, OpKind, Phase, WireDtype, CHUNK_HEADER_LEN};
pub use control::{decode_control, encode_control, Hello, HelloReply, MAX_CONTROL_LEN};
pub use frame::{check_frame_len, encode_frame_prefix, FrameDecoder, FRAME_PREFIX_LEN};

/// Version of the wire protocol; both ends of a link must speak the same one.
pub const PROTOCOL_VERSION: u32 = 1;

/// Everything that can be wrong with bytes received from a peer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A frame announced a body longer than the limit for its context; nothing was allocated.
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes (not read)")]
    FrameTooLarge {
        /// Announced body length.
        len: u64,
        /// Largest body length accepted here.
        limit: u64,
    },
    /// A frame body was shorter than the fixed header it must start with.
    #[error("frame of {len} bytes is shorter than its {need}-byte header")]
    FrameTooShort {
        /// Body length received.
        len: usize,
        /// Bytes the header needs.
        need: usize,
    },
    /// The first bytes of a frame body did not match the expected magic number.
    #[error("bad frame magic {found:#010x} (expected {expected:#010x}): not a ringtune frame")]
    BadMagic {
        /// Magic found.
        found: u32,
        /// Magic expected.
        expected: u32,
    },
    /// A header field held a value outside its domain.
    #[error("bad value {value} in frame field `{field}`")]
    BadField {
        /// Name of the field.
        field: &'static str,
        /// Raw value found.
        value: u64,
    },
    /// A control message could not be decoded.
    #[error("malformed control message: {0}")]
    BadControl(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
