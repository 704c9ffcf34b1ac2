//! The cluster token and its proof.
//!
//! After TLS is established, each end of a link proves it holds the cluster token by
//! sending `HMAC-SHA256(token, label ‖ role ‖ rank ‖ world ‖ exporter)`, where `exporter`
//! is keying material exported from this very TLS session. The token never crosses the
//! wire, a proof is useless on any other connection, and the role byte stops a peer from
//! reflecting our own proof back at us. Proofs are compared in constant time. The token's
//! `Debug` is redacted and nothing here logs it.

use std::path::Path;

use ring::hmac;
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};

/// Label for TLS keying-material export (RFC 5705 / 8446 §7.5).
pub(crate) const EXPORTER_LABEL: &[u8] = b"EXPORTER-ringtune-token-proof-v1";

/// A credentials error about `source` (a variable or file), said once: `source: reason`.
fn prefixed(source: &str, e: Error) -> Error {
    match e {
        Error::Credentials(m) => Error::Credentials(format!("{source}: {m}")),
        e => e,
    }
}

/// The shared secret that proves cluster membership.
#[derive(Clone)]
pub struct ClusterToken(Vec<u8>);

impl std::fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterToken(<redacted>)")
    }
}

impl ClusterToken {
    /// A token from raw bytes (at least 16).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self> {
        let bytes = bytes.into();
        if bytes.len() < 16 {
            return Err(Error::Credentials(format!(
                "cluster token of {} bytes is too short (need at least 16)",
                bytes.len()
            )));
        }
        Ok(Self(bytes))
    }

    /// A fresh random token (32 random bytes, hex-encoded so it can live in an env var).
    pub fn generate() -> Result<Self> {
        use ring::rand::SecureRandom;
        let mut b = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut b)
            .map_err(|_| Error::Credentials("no system randomness for a cluster token".into()))?;
        Self::new(
            b.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<String>()
                .into_bytes(),
        )
    }

    /// The token in the environment variable `var` (e.g. `RINGTUNE_TOKEN`).
    pub fn from_env(var: &str) -> Result<Self> {
        let v = std::env::var(var)
            .map_err(|_| Error::Credentials(format!("environment variable {var} is not set")))?;
        Self::new(v.trim().as_bytes().to_vec()).map_err(|e| prefixed(var, e))
    }

    /// The token in a file (surrounding whitespace ignored).
    pub fn from_file(path: &Path) -> Result<Self> {
        let v = std::fs::read(path).map_err(|e| Error::Io {
            context: format!("reading cluster token file {}", path.display()),
            source: e,
        })?;
        let s = String::from_utf8_lossy(&v);
        Self::new(s.trim().as_bytes().to_vec())
            .map_err(|e| prefixed(&path.display().to_string(), e))
    }

    /// The token's bytes, for handing to a child process (never log them).
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

/// Which end of a link computes a proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Connector = 1,
    Acceptor = 2,
}

pub(crate) fn proof(
    token: &ClusterToken,
    exporter: &[u8],
    role: Role,
    rank: u32,
    world: u32,
) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, &token.0);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(b"ringtune-token-proof-v1");
    ctx.update(&[role as u8]);
    ctx.update(&rank.to_le_bytes());
    ctx.update(&world.to_le_bytes());
    ctx.update(exporter);
    ctx.sign().as_ref().to_vec()
}

pub(crate) fn verify(
    token: &ClusterToken,
    exporter: &[u8],
    role: Role,
    rank: u32,
    world: u32,
    got: &[u8],
) -> bool {
    let want = proof(token, exporter, role, rank, world);
    want.len() == got.len() && bool::from(want.ct_eq(got))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_token_role_rank_and_session() {
        let t = ClusterToken::new(b"0123456789abcdef".to_vec()).unwrap();
        let other = ClusterToken::new(b"0123456789abcdeX".to_vec()).unwrap();
        let p = proof(&t, b"session-a", Role::Connector, 1, 4);
        assert!(verify(&t, b"session-a", Role::Connector, 1, 4, &p));
        assert!(!verify(&other, b"session-a", Role::Connector, 1, 4, &p));
        assert!(!verify(&t, b"session-b", Role::Connector, 1, 4, &p));
        assert!(!verify(&t, b"session-a", Role::Acceptor, 1, 4, &p));
        assert!(!verify(&t, b"session-a", Role::Connector, 2, 4, &p));
        assert!(!verify(&t, b"session-a", Role::Connector, 1, 4, &p[..31]));
        assert_eq!(format!("{t:?}"), "ClusterToken(<redacted>)");
    }
}
