//! Newtypes for the numbers and hashes that cross the coordinator's API, so a
//! rank is never passed where a step or a connection id was meant.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A control-plane connection, numbered by the driver. A node process that
/// reconnects gets a new one; the identity it claims is in its registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u64);

/// A node's place in the ring for one generation of the run (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Rank(pub u32);

/// The number of ranks taking part in one generation of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorldSize(pub u32);

/// An optimiser step, counted from 1. `Step(0)` means "no step done yet": the
/// initial adapter, and the resume point when no checkpoint has been recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Step(pub u64);

/// Counts restarts: every message that belongs to one incarnation of the ring
/// carries it, so a late message from before a restart is recognised as stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Generation(pub u32);

/// An example's position in the rendered, tokenized dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ExampleIndex(pub u64);

/// Hash of the run config: a node started with another config (another run) is
/// refused before it can join.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ConfigHash(pub [u8; 32]);

/// Hash of a rank's adapter (and optimiser state) after a step; every rank's
/// must agree, since every rank takes the same AdamW step.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AdapterHash(pub [u8; 32]);

impl ConfigHash {
    /// Parses the 64 hex digits the config crate prints (`RunConfig::semantic_hash`).
    pub fn from_hex(hex: &str) -> Option<ConfigHash> {
        let hex = hex.as_bytes();
        if hex.len() != 64 {
            return None;
        }
        let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let mut out = [0u8; 32];
        for (i, pair) in hex.chunks(2).enumerate() {
            out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Some(ConfigHash(out))
    }
}

impl Step {
    /// The step after this one.
    pub fn next(self) -> Step {
        Step(self.0.saturating_add(1))
    }
}

impl WorldSize {
    /// As a `usize`, for indexing.
    pub fn get(self) -> usize {
        self.0 as usize
    }
}

impl Rank {
    /// As a `usize`, for indexing.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

fn hex(bytes: &[u8], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    // `{:.N}` prints the first N hex digits: logs and errors want a short,
    // recognisable prefix, not 64 characters.
    let limit = f.precision().unwrap_or(bytes.len() * 2);
    let mut written = 0;
    for b in bytes {
        for digit in [b >> 4, b & 0xf] {
            if written == limit {
                return Ok(());
            }
            write!(f, "{digit:x}")?;
            written += 1;
        }
    }
    Ok(())
}

macro_rules! hash_fmt {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                hex(&self.0, f)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($t), "({:.12})"), self)
            }
        }
    };
}
hash_fmt!(ConfigHash);
hash_fmt!(AdapterHash);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node#{}", self.0)
    }
}
impl fmt::Display for Rank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rank {}", self.0)
    }
}
impl fmt::Display for WorldSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "step {}", self.0)
    }
}
impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "generation {}", self.0)
    }
}
impl fmt::Display for ExampleIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "example {}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_print_as_hex_with_optional_prefix_length() {
        let mut h = [0u8; 32];
        h[0] = 0xab;
        h[1] = 0x0c;
        let h = AdapterHash(h);
        assert_eq!(format!("{h:.5}"), "ab0c0");
        assert_eq!(format!("{h}").len(), 64);
        assert_eq!(format!("{h:?}"), "AdapterHash(ab0c00000000)");
        let c = ConfigHash(h.0);
        assert_eq!(ConfigHash::from_hex(&c.to_string()), Some(c));
        assert_eq!(ConfigHash::from_hex(&c.to_string().to_uppercase()), Some(c));
        assert_eq!(ConfigHash::from_hex("ab"), None);
        assert_eq!(ConfigHash::from_hex(&"g".repeat(64)), None);
    }
}
