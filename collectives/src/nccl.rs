//! NCCL (feature `nccl`): [`crate::GradSync`] for GPU ranks through cudarc's NCCL bindings.
//!
//! The caller hands in the NCCL unique id (the coordinator distributes it over the
//! authenticated control plane; we never exchange it through files). The communicator
//! runs on its own CUDA stream so collectives can overlap with compute on the default
//! stream, and every NCCL failure becomes [`Error::Nccl`] with rank, sequence and step.
//!
//! Host buffers (`&mut [f32]`) are staged through one reusable device buffer; callers with
//! gradients already on the GPU use [`NcclSync::all_reduce_sum_device`].
//!
//! Not done here: NCCL has its own timeouts only through abort. A collective that exceeds
//! `call.timeout` is detected after the fact (NCCL calls block the stream, not the host,
//! until synchronisation), and the communicator is then aborted and poisoned.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::{safe::Comm, safe::Id, ReduceOp};

use crate::error::{Error, Result};
use crate::sync::GradSync;
use crate::types::{Call, Rank, Seq, Step, WorldSize};

/// The 128-byte NCCL unique id, as handed out by rank 0 / the coordinator.
#[derive(Clone, Copy)]
pub struct NcclId(pub [u8; 128]);

impl NcclId {
    /// Creates a fresh id (on the rank that hands it out).
    pub fn new() -> Result<Self> {
        let id = Id::new().map_err(|e| Error::Nccl {
            rank: Rank(0),
            op: "get_unique_id",
            seq: Seq(0),
            step: Step(0),
            reason: format!("{e:?}"),
        })?;
        let mut out = [0u8; 128];
        for (o, i) in out.iter_mut().zip(id.internal().iter()) {
            *o = *i as u8;
        }
        Ok(Self(out))
    }

    fn to_cudarc(self) -> Id {
        let mut internal = [0 as core::ffi::c_char; 128];
        for (o, i) in internal.iter_mut().zip(self.0.iter()) {
            *o = *i as core::ffi::c_char;
        }
        Id::uninit(internal)
    }
}

/// [`GradSync`] over NCCL.
pub struct NcclSync {
    rank: Rank,
    world: WorldSize,
    stream: Arc<CudaStream>,
    comm: Comm,
    staging: Option<CudaSlice<f32>>,
    next_seq: u64,
    poisoned: Option<String>,
}

impl NcclSync {
    /// Joins the NCCL communicator on GPU `device` (blocks until all ranks joined).
    pub fn new(device: usize, rank: Rank, world: WorldSize, id: NcclId) -> Result<Self> {
        let err = |op: &'static str, e: String| Error::Nccl {
            rank,
            op,
            seq: Seq(0),
            step: Step(0),
            reason: e,
        };
        let ctx = CudaContext::new(device).map_err(|e| err("cuda_context", format!("{e:?}")))?;
        // cudarc's Comm::from_rank does not make the context current (see shared/gpu notes).
        ctx.bind_to_thread()
            .map_err(|e| err("bind_to_thread", format!("{e:?}")))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| err("new_stream", format!("{e:?}")))?;
        let comm = Comm::from_rank(stream.clone(), rank.idx(), world.get(), id.to_cudarc())
            .map_err(|e| err("comm_init_rank", format!("{e:?}")))?;
        Ok(Self {
            rank,
            world,
            stream,
            comm,
            staging: None,
            next_seq: 0,
            poisoned: None,
        })
    }

    fn begin(&mut self) -> Result<Seq> {
        if let Some(first) = &self.poisoned {
            return Err(Error::Poisoned {
                rank: self.rank,
                first: first.clone(),
            });
        }
        let s = Seq(self.next_seq);
        self.next_seq += 1;
        Ok(s)
    }

    fn fail(&mut self, op: &'static str, seq: Seq, call: Call, reason: String) -> Error {
        let e = Error::Nccl {
            rank: self.rank,
            op,
            seq,
            step: call.step,
            reason,
        };
        self.poisoned = Some(e.to_string());
        e
    }

    fn check_time(&mut self, op: &'static str, seq: Seq, call: Call, t0: Instant) -> Result<()> {
        if t0.elapsed() > call.timeout {
            return Err(self.fail(
                op,
                seq,
                call,
                format!(
                    "took {:?}, over the {:?} timeout",
                    t0.elapsed(),
                    call.timeout
                ),
            ));
        }
        Ok(())
    }

    /// Sums a device buffer in place on the communicator's stream and waits for it.
    pub fn all_reduce_sum_device(&mut self, buf: &mut CudaSlice<f32>, call: Call) -> Result<()> {
        let seq = self.begin()?;
        let t0 = Instant::now();
        if let Err(e) = self.comm.all_reduce_in_place(buf, &ReduceOp::Sum) {
            return Err(self.fail("all_reduce", seq, call, format!("{e:?}")));
        }
        if let Err(e) = self.stream.synchronize() {
            return Err(self.fail("all_reduce", seq, call, format!("{e:?}")));
        }
        self.check_time("all_reduce", seq, call, t0)
    }

    fn staged(&mut self, host: &[f32], seq: Seq, call: Call) -> Result<CudaSlice<f32>> {
        let mut dev = match self.staging.take() {
            Some(d) if d.len() == host.len() => d,
            _ => match self.stream.alloc_zeros::<f32>(host.len().max(1)) {
                Ok(d) => d,
                Err(e) => return Err(self.fail("alloc", seq, call, format!("{e:?}"))),
            },
        };
        if !host.is_empty() {
            if let Err(e) = self.stream.memcpy_htod(host, &mut dev) {
                return Err(self.fail("memcpy_htod", seq, call, format!("{e:?}")));
            }
        }
        Ok(dev)
    }

    fn unstage(
        &mut self,
        dev: CudaSlice<f32>,
        host: &mut [f32],
        seq: Seq,
        call: Call,
    ) -> Result<()> {
        if !host.is_empty() {
            if let Err(e) = self.stream.memcpy_dtoh(&dev, host) {
                return Err(self.fail("memcpy_dtoh", seq, call, format!("{e:?}")));
            }
        }
        self.staging = Some(dev);
        Ok(())
    }
}

impl GradSync for NcclSync {
    fn rank(&self) -> Rank {
        self.rank
    }

    fn world_size(&self) -> WorldSize {
        self.world
    }

    fn next_seq(&self) -> Seq {
        Seq(self.next_seq)
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32], call: Call) -> Result<()> {
        let seq = self.begin()?;
        if buf.is_empty() {
            return Ok(());
        }
        let t0 = Instant::now();
        let mut dev = self.staged(buf, seq, call)?;
        if let Err(e) = self.comm.all_reduce_in_place(&mut dev, &ReduceOp::Sum) {
            return Err(self.fail("all_reduce", seq, call, format!("{e:?}")));
        }
        self.unstage(dev, buf, seq, call)?;
        self.check_time("all_reduce", seq, call, t0)
    }

    fn broadcast(&mut self, buf: &mut [f32], root: Rank, call: Call) -> Result<()> {
        if root.0 >= self.world.0 {
            return Err(Error::InvalidArgument(format!(
                "broadcast root {root} outside world of size {}",
                self.world
            )));
        }
        let seq = self.begin()?;
        if buf.is_empty() {
            return Ok(());
        }
        let t0 = Instant::now();
        let mut dev = self.staged(buf, seq, call)?;
        if let Err(e) = self.comm.broadcast_in_place(&mut dev, root.idx() as i32) {
            return Err(self.fail("broadcast", seq, call, format!("{e:?}")));
        }
        self.unstage(dev, buf, seq, call)?;
        self.check_time("broadcast", seq, call, t0)
    }

    fn barrier(&mut self, call: Call) -> Result<()> {
        let mut one = [1.0f32];
        self.all_reduce_sum(&mut one, call)?;
        if one[0] != self.world.0 as f32 {
            let seq = Seq(self.next_seq - 1);
            return Err(self.fail(
                "barrier",
                seq,
                call,
                format!("barrier counted {} ranks, expected {}", one[0], self.world),
            ));
        }
        Ok(())
    }
}
