//! [`GradSync`]: what a training rank calls to keep its gradients in step with the others,
//! and [`Ring`], its implementation over any ring transport ([`Driver`]).

use std::time::Instant;

use ringtune_protocol::OpKind;

use crate::error::{Error, Result};
use crate::ring::{AllReduce, Broadcast, Collective, RingConfig};
use crate::types::{Call, Rank, Seq, WorldSize};

/// Collective operations over the ranks of one job.
///
/// Every rank must issue the same calls in the same order with buffers of the same length:
/// calls are numbered (see [`GradSync::next_seq`]) and a rank that diverges makes the
/// collective fail on its neighbours with both sequence numbers in the error. After any
/// error the communicator is unusable ([`Error::Poisoned`]).
pub trait GradSync {
    /// This rank.
    fn rank(&self) -> Rank;
    /// Number of ranks.
    fn world_size(&self) -> WorldSize;
    /// Sequence number the next collective will carry.
    fn next_seq(&self) -> Seq;
    /// Sums `buf` over all ranks, in place; every rank ends with bit-identical contents.
    fn all_reduce_sum(&mut self, buf: &mut [f32], call: Call) -> Result<()>;
    /// Copies the root's `buf` into every rank's `buf` (exact, always f32 on the wire).
    fn broadcast(&mut self, buf: &mut [f32], root: Rank, call: Call) -> Result<()>;
    /// Returns once every rank has entered the barrier.
    fn barrier(&mut self, call: Call) -> Result<()>;

    /// Sums several buffers, packing small ones into buckets of up to `bucket_elems`
    /// elements so that each bucket is one collective (fewer, larger frames). A buffer of at
    /// least `bucket_elems` is reduced in place on its own. Each bucket gets its own sequence
    /// number and its own `call.timeout`.
    fn all_reduce_sum_fused(
        &mut self,
        bufs: &mut [&mut [f32]],
        bucket_elems: usize,
        call: Call,
    ) -> Result<()> {
        let bucket_elems = bucket_elems.max(1);
        let mut scratch: Vec<f32> = Vec::new();
        let mut group: Vec<usize> = Vec::new();
        let mut flush =
            |this: &mut Self, bufs: &mut [&mut [f32]], group: &mut Vec<usize>| -> Result<()> {
                if group.is_empty() {
                    return Ok(());
                }
                scratch.clear();
                for &i in group.iter() {
                    scratch.extend_from_slice(bufs[i]);
                }
                this.all_reduce_sum(&mut scratch, call)?;
                let mut off = 0;
                for &i in group.iter() {
                    let n = bufs[i].len();
                    bufs[i].copy_from_slice(&scratch[off..off + n]);
                    off += n;
                }
                group.clear();
                Ok(())
            };
        let mut pending = 0usize;
        for i in 0..bufs.len() {
            let n = bufs[i].len();
            if n >= bucket_elems {
                flush(self, bufs, &mut group)?;
                pending = 0;
                self.all_reduce_sum(bufs[i], call)?;
                continue;
            }
            if pending + n > bucket_elems {
                flush(self, bufs, &mut group)?;
                pending = 0;
            }
            group.push(i);
            pending += n;
        }
        flush(self, bufs, &mut group)
    }
}

/// A ring transport: moves one collective's frames between this rank and its neighbours.
pub trait Driver {
    /// The ring settings this driver was built with.
    fn config(&self) -> RingConfig;
    /// Runs `core` to completion over `data`: sends what it emits, feeds it what arrives,
    /// and enforces its deadline. A link failure is an error naming the peer.
    fn drive(&mut self, core: &mut dyn Collective, data: &mut [f32]) -> Result<()>;
}

/// [`GradSync`] over a ring [`Driver`]: numbers the collectives and poisons itself on error.
pub struct Ring<D: Driver> {
    driver: D,
    next_seq: u64,
    poisoned: Option<String>,
}

impl<D: Driver> Ring<D> {
    /// Wraps a connected driver.
    pub fn new(driver: D) -> Self {
        Self {
            driver,
            next_seq: 0,
            poisoned: None,
        }
    }

    /// The transport (for shutdown or statistics).
    pub fn driver_mut(&mut self) -> &mut D {
        &mut self.driver
    }

    fn run(&mut self, core: &mut dyn Collective, data: &mut [f32]) -> Result<()> {
        if let Some(first) = &self.poisoned {
            return Err(Error::Poisoned {
                rank: self.driver.config().rank,
                first: first.clone(),
            });
        }
        self.next_seq += 1;
        let r = self.driver.drive(core, data);
        if let Err(e) = &r {
            self.poisoned = Some(e.to_string());
        }
        r
    }
}

impl<D: Driver> GradSync for Ring<D> {
    fn rank(&self) -> Rank {
        self.driver.config().rank
    }

    fn world_size(&self) -> WorldSize {
        self.driver.config().world
    }

    fn next_seq(&self) -> Seq {
        Seq(self.next_seq)
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32], call: Call) -> Result<()> {
        let cfg = self.driver.config();
        let mut core = AllReduce::new(
            cfg,
            OpKind::AllReduce,
            self.next_seq(),
            call.step,
            buf.len(),
            Instant::now(),
            call.timeout,
        );
        self.run(&mut core, buf)
    }

    fn broadcast(&mut self, buf: &mut [f32], root: Rank, call: Call) -> Result<()> {
        let cfg = self.driver.config();
        let mut core = Broadcast::new(
            cfg,
            root,
            self.next_seq(),
            call.step,
            buf.len(),
            Instant::now(),
            call.timeout,
        )?;
        self.run(&mut core, buf)
    }

    fn barrier(&mut self, call: Call) -> Result<()> {
        let cfg = self.driver.config();
        let mut flags = vec![0.0f32; cfg.world.get()];
        flags[cfg.rank.idx()] = 1.0;
        let mut core = AllReduce::new(
            cfg,
            OpKind::Barrier,
            self.next_seq(),
            call.step,
            flags.len(),
            Instant::now(),
            call.timeout,
        );
        self.run(&mut core, &mut flags)?;
        if let Some(r) = flags.iter().position(|&f| f != 1.0) {
            return Err(Error::Malformed {
                rank: cfg.rank,
                seq: Seq(self.next_seq - 1),
                peer: cfg.left(),
                reason: format!("barrier flag of rank {r} summed to {}", flags[r]),
            });
        }
        Ok(())
    }
}
