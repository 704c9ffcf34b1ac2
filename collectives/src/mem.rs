//! In-memory ring transport: one thread per rank, channels as links.
//!
//! For tests and single-process simulations. Frames go through the same byte encoding as
//! on the network, so this also exercises the wire format. Dropping a rank's communicator
//! closes its links, which its neighbours see as a lost peer — the in-memory analogue of a
//! killed process.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::Instant;

use ringtune_protocol::{
    check_frame_len, ChunkHeader, WireDtype, CHUNK_HEADER_LEN, FRAME_PREFIX_LEN,
};

use crate::error::{Error, Result};
use crate::ring::{Collective, RingConfig};
use crate::sync::{Driver, Ring};
use crate::types::{Rank, WorldSize};

/// [`crate::GradSync`] over in-memory links.
pub type MemSync = Ring<MemDriver>;

/// The in-memory link pair of one rank.
pub struct MemDriver {
    cfg: RingConfig,
    to_right: Sender<Vec<u8>>,
    from_left: Receiver<Vec<u8>>,
}

/// Builds `world` connected communicators; hand one to each thread.
pub fn mem_cluster(world: u32, chunk_elems: usize, wire: WireDtype) -> Result<Vec<MemSync>> {
    let w = world as usize;
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..w).map(|_| mpsc::channel::<Vec<u8>>()).unzip();
    let mut out = Vec::with_capacity(w);
    for (r, from_left) in rxs.into_iter().enumerate() {
        let cfg = RingConfig::new(Rank(r as u32), WorldSize(world), chunk_elems, wire)?;
        // Channel r carries frames into rank r, so rank r sends on channel r + 1.
        let to_right = txs[(r + 1) % w].clone();
        out.push(Ring::new(MemDriver {
            cfg,
            to_right,
            from_left,
        }));
    }
    Ok(out)
}

/// Splits a whole frame (prefix included) into header and payload, enforcing `limit`.
pub(crate) fn parse_frame(
    frame: &[u8],
    limit: usize,
) -> std::result::Result<(ChunkHeader, &[u8]), String> {
    let prefix: [u8; FRAME_PREFIX_LEN] = frame
        .get(..FRAME_PREFIX_LEN)
        .ok_or("frame shorter than its length prefix")?
        .try_into()
        .unwrap();
    let len = check_frame_len(prefix, limit).map_err(|e| e.to_string())?;
    let body = &frame[FRAME_PREFIX_LEN..];
    if body.len() != len {
        return Err(format!(
            "frame announces {len} bytes but carries {}",
            body.len()
        ));
    }
    let header = ChunkHeader::decode(body).map_err(|e| e.to_string())?;
    Ok((header, &body[CHUNK_HEADER_LEN..]))
}

impl Driver for MemDriver {
    fn config(&self) -> RingConfig {
        self.cfg
    }

    fn drive(&mut self, core: &mut dyn Collective, data: &mut [f32]) -> Result<()> {
        let (rank, seq, step) = core.ids();
        let lost = |peer: Rank, reason: &str| Error::PeerLost {
            rank,
            peer,
            seq,
            step,
            reason: reason.into(),
        };
        loop {
            let mut out = Vec::new();
            while core.poll_transmit(data, &mut out).is_some() {
                self.to_right
                    .send(std::mem::take(&mut out))
                    .map_err(|_| lost(self.cfg.right(), "channel closed"))?;
            }
            let Some(deadline) = core.poll_timeout() else {
                return Ok(());
            };
            let wait = deadline.saturating_duration_since(Instant::now());
            match self.from_left.recv_timeout(wait) {
                Ok(frame) => {
                    let (h, payload) =
                        parse_frame(&frame, self.cfg.max_frame_body()).map_err(|reason| {
                            Error::Malformed {
                                rank,
                                seq,
                                peer: self.cfg.left(),
                                reason,
                            }
                        })?;
                    core.handle_chunk(data, &h, payload)?;
                }
                Err(RecvTimeoutError::Timeout) => core.handle_timeout(Instant::now())?,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(lost(self.cfg.left(), "channel closed"))
                }
            }
        }
    }
}
