//! The header of a collective data frame.
//!
//! A data frame body is `ChunkHeader (48 bytes) | payload`, where the payload is the chunk's
//! elements in the header's [`WireDtype`], little-endian. The header names everything a
//! receiver needs to check that the chunk belongs to the collective it is running: which
//! collective (sequence number and training step), which algorithm phase, which round and
//! which piece of the buffer, and the total buffer length the sender believes in.

use crate::{Error, Result};

/// Encoded size of [`ChunkHeader`].
pub const CHUNK_HEADER_LEN: usize = 48;

const MAGIC: u32 = u32::from_le_bytes(*b"RTCK");

/// Which collective a frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum OpKind {
    /// Sum all-reduce.
    AllReduce = 1,
    /// Broadcast from a root rank.
    Broadcast = 2,
    /// Barrier (an all-reduce of one flag per rank).
    Barrier = 3,
}

/// Phase of the algorithm inside a collective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Phase {
    /// Ring reduce-scatter: the payload is a partial sum to add into the local buffer.
    ReduceScatter = 1,
    /// Ring all-gather: the payload is a final value to copy into the local buffer.
    AllGather = 2,
    /// Pipelined broadcast along the ring.
    Broadcast = 3,
}

/// Element type of a payload on the wire. Sums are always computed in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum WireDtype {
    /// 4 bytes per element, exact.
    #[default]
    F32 = 1,
    /// 2 bytes per element (bfloat16, round to nearest even): half the bytes, ~3 significant
    /// digits.
    Bf16 = 2,
}

impl WireDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            WireDtype::F32 => 4,
            WireDtype::Bf16 => 2,
        }
    }
}

/// Header of one chunk of one collective.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Collective kind.
    pub op: OpKind,
    /// Phase inside the collective.
    pub phase: Phase,
    /// Payload element type.
    pub dtype: WireDtype,
    /// Rank that sent the frame.
    pub src: u32,
    /// Root rank for a broadcast, 0 otherwise.
    pub root: u32,
    /// Collective sequence number: the n-th collective issued on this communicator.
    pub seq: u64,
    /// Training step the caller attached to the collective.
    pub step: u64,
    /// Total number of f32 elements in the collective's buffer, as the sender sees it.
    pub total_len: u64,
    /// Round of the ring phase (0-based).
    pub round: u32,
    /// Piece index inside the segment sent this round.
    pub piece: u32,
}

impl ChunkHeader {
    /// Encodes to the fixed 48-byte layout.
    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut b = [0u8; CHUNK_HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = self.op as u8;
        b[5] = self.phase as u8;
        b[6] = self.dtype as u8;
        b[8..12].copy_from_slice(&self.src.to_le_bytes());
        b[12..16].copy_from_slice(&self.root.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.step.to_le_bytes());
        b[32..40].copy_from_slice(&self.total_len.to_le_bytes());
        b[40..44].copy_from_slice(&self.round.to_le_bytes());
        b[44..48].copy_from_slice(&self.piece.to_le_bytes());
        b
    }

    /// Decodes the first 48 bytes of `body`; every enum field is validated.
    pub fn decode(body: &[u8]) -> Result<Self> {
        if body.len() < CHUNK_HEADER_LEN {
            return Err(Error::FrameTooShort {
                len: body.len(),
                need: CHUNK_HEADER_LEN,
            });
        }
        let u32_at = |i: usize| u32::from_le_bytes(body[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().unwrap());
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(Error::BadMagic {
                found: magic,
                expected: MAGIC,
            });
        }
        let op = match body[4] {
            1 => OpKind::AllReduce,
            2 => OpKind::Broadcast,
            3 => OpKind::Barrier,
            v => {
                return Err(Error::BadField {
                    field: "op",
                    value: v.into(),
                })
            }
        };
        let phase = match body[5] {
            1 => Phase::ReduceScatter,
            2 => Phase::AllGather,
            3 => Phase::Broadcast,
            v => {
                return Err(Error::BadField {
                    field: "phase",
                    value: v.into(),
                })
            }
        };
        let dtype = match body[6] {
            1 => WireDtype::F32,
            2 => WireDtype::Bf16,
            v => {
                return Err(Error::BadField {
                    field: "dtype",
                    value: v.into(),
                })
            }
        };
        if body[7] != 0 {
            return Err(Error::BadField {
                field: "reserved",
                value: body[7].into(),
            });
        }
        Ok(Self {
            op,
            phase,
            dtype,
            src: u32_at(8),
            root: u32_at(12),
            seq: u64_at(16),
            step: u64_at(24),
            total_len: u64_at(32),
            round: u32_at(40),
            piece: u32_at(44),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ChunkHeader {
        ChunkHeader {
            op: OpKind::AllReduce,
            phase: Phase::AllGather,
            dtype: WireDtype::Bf16,
            src: 3,
            root: 0,
            seq: 1 << 40,
            step: 77,
            total_len: 12345,
            round: 2,
            piece: 9,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = sample();
        assert_eq!(ChunkHeader::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn corrupt_headers_are_named() {
        let mut b = sample().encode();
        b[0] ^= 1;
        assert!(matches!(
            ChunkHeader::decode(&b),
            Err(Error::BadMagic { .. })
        ));
        let mut b = sample().encode();
        b[5] = 9;
        assert_eq!(
            ChunkHeader::decode(&b),
            Err(Error::BadField {
                field: "phase",
                value: 9
            })
        );
        assert_eq!(
            ChunkHeader::decode(&b[..10]),
            Err(Error::FrameTooShort {
                len: 10,
                need: CHUNK_HEADER_LEN
            })
        );
    }
}
