//! Length-prefixed framing: `u32 little-endian body length | body`.
//!
//! [`check_frame_len`] is the one place the size limit is enforced; [`FrameDecoder`] is a
//! sans-IO incremental decoder for byte streams (feed bytes, pop frames) that uses it before
//! it reserves room for a body.

use crate::{Error, Result};

/// Bytes in the length prefix.
pub const FRAME_PREFIX_LEN: usize = 4;

/// Parses a length prefix and refuses a body longer than `limit` bytes.
///
/// Callers allocate the body only after this returns `Ok`.
pub fn check_frame_len(prefix: [u8; FRAME_PREFIX_LEN], limit: usize) -> Result<usize> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > limit {
        return Err(Error::FrameTooLarge {
            len: len as u64,
            limit: limit as u64,
        });
    }
    Ok(len)
}

/// Encodes the length prefix for a body of `len` bytes.
///
/// # Panics
/// If `len` does not fit in a `u32`: our own frames are bounded far below that, so this
/// is a programming error, not a peer's.
pub fn encode_frame_prefix(len: usize) -> [u8; FRAME_PREFIX_LEN] {
    u32::try_from(len)
        .expect("frame body longer than u32::MAX")
        .to_le_bytes()
}

/// Incremental decoder: push received bytes, pop complete frame bodies.
///
/// It holds at most one partial frame plus whatever was pushed beyond it; a prefix over the
/// limit is an error the moment its four bytes are seen, before anything is reserved.
#[derive(Debug)]
pub struct FrameDecoder {
    limit: usize,
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder that refuses bodies longer than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            buf: Vec::new(),
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Pops the next complete frame body, `Ok(None)` if more bytes are needed.
    pub fn poll_frame(&mut self) -> Result<Option<Vec<u8>>> {
        if self.buf.len() < FRAME_PREFIX_LEN {
            return Ok(None);
        }
        let prefix: [u8; FRAME_PREFIX_LEN] = self.buf[..FRAME_PREFIX_LEN].try_into().unwrap();
        let len = check_frame_len(prefix, self.limit)?;
        if self.buf.len() < FRAME_PREFIX_LEN + len {
            return Ok(None);
        }
        let body = self.buf[FRAME_PREFIX_LEN..FRAME_PREFIX_LEN + len].to_vec();
        self.buf.drain(..FRAME_PREFIX_LEN + len);
        Ok(Some(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn oversized_prefix_is_refused_before_the_body_arrives() {
        let mut d = FrameDecoder::new(16);
        d.push(&encode_frame_prefix(17));
        assert_eq!(
            d.poll_frame(),
            Err(Error::FrameTooLarge { len: 17, limit: 16 })
        );
        // A lying prefix of u32::MAX must not reserve 4 GiB.
        let mut d = FrameDecoder::new(1 << 20);
        d.push(&u32::MAX.to_le_bytes());
        assert!(matches!(d.poll_frame(), Err(Error::FrameTooLarge { .. })));
        assert!(d.buf.capacity() < 1 << 20);
    }

    proptest! {
        #[test]
        fn frames_round_trip_through_any_split(
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8),
            split in 1usize..17,
        ) {
            let mut wire = Vec::new();
            for b in &bodies {
                wire.extend_from_slice(&encode_frame_prefix(b.len()));
                wire.extend_from_slice(b);
            }
            let mut d = FrameDecoder::new(64);
            let mut got = Vec::new();
            for piece in wire.chunks(split) {
                d.push(piece);
                while let Some(f) = d.poll_frame().unwrap() {
                    got.push(f);
                }
            }
            prop_assert_eq!(got, bodies);
        }
    }
}
