//! Control messages: the handshake that opens every link between two ranks.
//!
//! After TLS is up, the connecting side sends [`Hello`]; the accepting side answers with
//! [`HelloReply`]. Both carry a proof of the cluster token bound to this TLS session (an HMAC
//! over the session's exported keying material, computed by the caller), so the token itself
//! never crosses the wire and a proof cannot be replayed on another connection.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Largest control message body accepted (bytes).
pub const MAX_CONTROL_LEN: usize = 4096;

/// First message on a link, from the connecting rank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`crate::PROTOCOL_VERSION`] of the sender.
    pub version: u32,
    /// Sender's rank.
    pub rank: u32,
    /// Sender's world size.
    pub world: u32,
    /// Largest data-frame body the sender will send (bytes).
    pub max_frame: u64,
    /// Proof that the sender holds the cluster token (HMAC-SHA256, 32 bytes).
    pub proof: Vec<u8>,
}

/// Answer of the accepting rank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    /// Link accepted; the accepting side proves the token too.
    Accept {
        /// Accepting rank.
        rank: u32,
        /// Its token proof.
        proof: Vec<u8>,
    },
    /// Link refused; the reason is safe to show (it never contains the token).
    Refuse {
        /// Why.
        reason: String,
    },
}

fn opts() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_limit(MAX_CONTROL_LEN as u64)
        .reject_trailing_bytes()
}

/// Encodes a control message body (without the frame prefix).
pub fn encode_control<T: Serialize>(msg: &T) -> Vec<u8> {
    use bincode::Options;
    opts()
        .serialize(msg)
        .expect("control messages are small and serialisable")
}

/// Decodes a control message body; bincode's own limit bounds any inner allocation.
pub fn decode_control<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T> {
    use bincode::Options;
    opts()
        .deserialize(body)
        .map_err(|e| Error::BadControl(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_garbage_is_an_error() {
        let h = Hello {
            version: 1,
            rank: 2,
            world: 4,
            max_frame: 1 << 20,
            proof: vec![7; 32],
        };
        assert_eq!(decode_control::<Hello>(&encode_control(&h)).unwrap(), h);
        // A vector length of 2^60 must be refused, not allocated.
        let mut evil = encode_control(&h);
        evil.truncate(evil.len() - 33);
        evil.extend_from_slice(&[0xff, 0, 0, 0, 0, 0, 0, 0, 0x10]);
        assert!(matches!(
            decode_control::<Hello>(&evil),
            Err(Error::BadControl(_))
        ));
    }
}
