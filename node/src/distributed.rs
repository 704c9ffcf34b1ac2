//! One rank of a distributed run: the node driver behind `ringtune node`.
//!
//! A node connects to the coordinator's control plane ([`ringtune_coordinator::wire`]),
//! proves the cluster token, and gets the run config and the per-run ring certificate in
//! the welcome. It registers (identity, config hash, a data-plane address), waits for its
//! [`Assignment`], joins the QUIC ring (`ringtune_collectives::net`), loads the model
//! through [`Trainer::for_node`], says `Ready`, and then runs each [`StepOrder`](ringtune_coordinator::StepOrder): the
//! forward/backward over its shard, one all-reduce of gradients + loss normaliser, AdamW,
//! a report with compute vs communication time (and the adapter hash when asked); rank 0
//! writes the checkpoints it is told to. `Restart` drops the ring and the trainer and
//! registers again; `Stop` is acknowledged and ends the node.
//!
//! The data: every rank loads and tokenizes the same dataset deterministically (the same
//! config, tokenizer and files), and the coordinator sends only example indices per step
//! ([`data_plan`] builds the plan it shards). That keeps step orders tiny; it assumes the
//! dataset and model folders are readable at the same paths on every host (a shared
//! filesystem on clusters), which the model weights need anyway.
//!
//! The control connection runs on its own thread (a small tokio runtime), so heartbeats go
//! out while the main thread is busy loading the model or computing a step. If the
//! coordinator goes away, or tells the node to stop while the main thread is stuck in a
//! collective with a dead peer, that thread ends the process after [`STUCK_GRACE`], so a
//! node never outlives its run; told to restart while stuck, it starts afresh instead
//! (`exec` of its own command line) and registers again.

use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use ringtune_collectives::auth::ClusterToken;
use ringtune_collectives::net::{
    self, NetConfig, ReservedPort, Transport, DEFAULT_CHUNK_ELEMS, TCP_CHUNK_ELEMS,
};
use ringtune_collectives::{Call, GradSync, WireDtype};
use ringtune_config::{RingTransport, RunConfig};
use ringtune_coordinator::wire::{self, CoordHello, NodeHello, Side, Welcome};
use ringtune_coordinator::{
    AdapterHash, Assignment, CollectiveSetup, Command, ConfigHash, DataPlan, ExampleIndex,
    Generation, NodeIdentity, NodeMsg, Peer, PlannedExample, Registration, Step, StepOrder,
    StepReport, StopReason,
};
use ringtune_data::{BatchSampler, Tokenizer};
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::rl::RlTrainer;
use crate::trainer::{load_examples, prepare_model_dir, StepSync, Trainer};

/// How long a node told to stop (or cut off from the coordinator) may stay stuck in a
/// collective before its control thread ends the process.
pub const STUCK_GRACE: Duration = Duration::from_secs(5);

/// How a node is started.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The coordinator's control address, `HOST:PORT`.
    pub coordinator: String,
    pub token: ClusterToken,
    pub identity: NodeIdentity,
    /// Overrides the config's `model.device` (one GPU per node process on clusters).
    pub device: Option<ringtune_config::Device>,
    /// Register with this config's hash instead of the welcome's (`ringtune node
    /// --config`): a node started for another run is then refused by the coordinator.
    pub own_config: Option<RunConfig>,
    /// How to check the coordinator's certificate (pinned, CA-checked, or only the
    /// token proofs).
    pub coordinator_trust: wire::ControlTrust,
    /// How long to keep retrying the first connection (the coordinator may start later).
    pub connect_timeout: Duration,
    /// Timeout of one gradient all-reduce (waiting for the slowest rank included).
    pub collective_timeout: Duration,
    /// The launcher's process count and the variable it came from (`WORLD_SIZE`,
    /// `SLURM_NTASKS`), when launched by one: checked against the run's `nodes`.
    pub launch_world: Option<(u32, &'static str)>,
}

/// How a node's run ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeExit {
    Finished,
    Interrupted,
}

/// The run's data plan, as the coordinator builds it: the same examples in the same seeded
/// order as a one-process run of this config (`BatchSampler`), with token counts for
/// balancing the shards.
pub fn data_plan(cfg: &RunConfig) -> Result<DataPlan> {
    let model_dir = prepare_model_dir(cfg)?;
    if cfg.train.method == ringtune_config::Method::Rl {
        // RL: each step's "examples" are its groups; the environment makes the problems
        // (a pure function of seed and step) on every rank. Equal weights: the ranks get
        // equal numbers of groups.
        let total = cfg.train.max_steps.ok_or_else(|| {
            Error::Invalid("train.max_steps: an RL run needs its number of steps".into())
        })?;
        let step: Vec<PlannedExample> = (0..cfg.rl.groups_per_step)
            .map(|g| PlannedExample {
                index: ExampleIndex(g as u64),
                tokens: 1,
            })
            .collect();
        let batches = (0..total).map(|_| step.clone()).collect();
        return DataPlan::from_batches(batches).map_err(|e| Error::Invalid(e.to_string()));
    }
    let tok = Tokenizer::from_dir(&model_dir)?;
    // Token counts per training example (DPO: per pair, chosen + rejected).
    let lengths: Vec<usize> = if cfg.train.method == ringtune_config::Method::Dpo {
        let d = crate::dpo::Dpo::load(cfg, &tok)?;
        (0..d.train_len()).map(|i| d.pair_tokens(i)).collect()
    } else {
        load_examples(cfg, &tok)?
            .0
            .iter()
            .map(|x| x.len())
            .collect()
    };
    let t = &cfg.train;
    let mut sampler = BatchSampler::new(lengths.len(), t.batch_size, cfg.seed)?;
    let total = match t.max_steps {
        Some(s) => s,
        None => t.epochs * sampler.batches_per_epoch() as u64,
    };
    let batches = (0..total)
        .map(|_| {
            sampler
                .next_batch()
                .indices
                .into_iter()
                .map(|i| PlannedExample {
                    index: ExampleIndex(i as u64),
                    tokens: lengths[i].min(u32::MAX as usize) as u32,
                })
                .collect()
        })
        .collect();
    DataPlan::from_batches(batches).map_err(|e| Error::Invalid(e.to_string()))
}

/// Where a distributed run starts: the checkpoint it continues from (`step` 0: a fresh
/// run) and the training seconds of its earlier segments.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResumePoint {
    pub step: u64,
    pub elapsed_s: f64,
}

/// The coordinator's side of `--resume`, with the one-process trainer's rules: without
/// `resume`, a folder that already holds checkpoints is refused (nothing is overwritten);
/// with it, the newest listed checkpoint is the start, and a config whose semantic hash
/// differs from the checkpoint's is refused naming every changed key — before any node
/// is started.
pub fn resume_point(cfg: &RunConfig, resume: bool) -> Result<ResumePoint> {
    let out = &cfg.output_dir;
    let (latest, holds) = match crate::RunDir::open_existing(out)? {
        Some(run) => (run.latest_checkpoint()?, run.holds_checkpoints()?),
        None => (None, false),
    };
    let rec = match (resume, latest) {
        (false, _) if holds => return Err(Error::RunExists(out.clone())),
        (false, None) => {
            return Ok(ResumePoint {
                step: 0,
                elapsed_s: 0.0,
            })
        }
        (false, Some(_)) => return Err(Error::RunExists(out.clone())),
        (true, None) => return Err(Error::NothingToResume(out.clone())),
        (true, Some(rec)) => rec,
    };
    let dir = out.join(&rec.path);
    let state = crate::trainer::read_state(&dir.join(crate::trainer::STATE_FILE))?;
    if !cfg.same_run_as(&state.config_hash, &state.config) {
        return Err(Error::ConfigChanged {
            checkpoint: dir,
            changed: ringtune_config::diff_entries(&state.config, &cfg.semantic_entries()),
        });
    }
    Ok(ResumePoint {
        step: state.step,
        elapsed_s: state.elapsed_s,
    })
}

/// The coordinator's form of a config hash.
pub fn config_hash_of(cfg: &RunConfig) -> Result<ConfigHash> {
    let h = cfg.semantic_hash();
    ConfigHash::from_hex(&h.0)
        .ok_or_else(|| Error::Invalid(format!("config hash {h} is not 64 hex digits")))
}

/// [`StepSync`] over a communicator (the QUIC ring, or NCCL); adds the time each
/// all-reduce took to `comm`.
struct CollectiveSync<S: GradSync> {
    sync: S,
    timeout: Duration,
    comm: Rc<Cell<Duration>>,
}

impl<S: GradSync> StepSync for CollectiveSync<S> {
    fn all_reduce_sum(&mut self, step: u64, buf: &mut [f32]) -> std::result::Result<(), String> {
        let t = Instant::now();
        let r = self
            .sync
            .all_reduce_sum(buf, Call::new(step, self.timeout))
            .map_err(|e| e.to_string());
        self.comm.set(self.comm.get() + t.elapsed());
        r
    }
}

/// How joining a generation's communicator ended.
#[cfg_attr(not(feature = "nccl"), allow(dead_code))]
enum Joined {
    Sync(Box<dyn StepSync>),
    /// The coordinator restarted the run (a peer failed) before the communicator was up.
    Restart,
    Stop(StopReason),
}

/// The GPU this node's NCCL communicator uses: the model's device (`auto`: the node's
/// GPU slot on its host, i.e. LOCAL_RANK / SLURM_LOCALID).
#[cfg(feature = "nccl")]
fn nccl_device(cfg: &RunConfig, local_rank: u32) -> Result<usize> {
    match cfg.model.device {
        ringtune_config::Device::Cuda(i) => Ok(i as usize),
        ringtune_config::Device::Auto => Ok(local_rank as usize),
        ringtune_config::Device::Cpu => Err(Error::Invalid(
            "the coordinator chose NCCL, but this node's device is the CPU (start it with \
             --device cuda:N, or run the coordinator with --collective quic)"
                .into(),
        )),
    }
}

/// Joins the NCCL communicator: rank 0 creates the unique id and hands it to the
/// coordinator, every other rank waits for it on the control plane.
#[cfg(feature = "nccl")]
fn join_nccl(
    ctl: &Control,
    cfg: &RunConfig,
    local_rank: u32,
    a: &Assignment,
    create_unique_id: bool,
    timeout: Duration,
    comm: Rc<Cell<Duration>>,
) -> Result<Joined> {
    use ringtune_collectives::nccl::{NcclId, NcclSync};
    let device = nccl_device(cfg, local_rank)?;
    let nccl_err = |e: ringtune_collectives::Error| Error::Sync {
        step: a.resume_from.0,
        message: format!("NCCL setup as rank {} on cuda:{device}: {e}", a.rank.0),
    };
    let id = if create_unique_id {
        let id = NcclId::new().map_err(nccl_err)?;
        ctl.send(NodeMsg::NcclUniqueId {
            generation: a.generation,
            id: id.0.to_vec(),
        })?;
        id
    } else {
        loop {
            match ctl.recv()? {
                Command::NcclUniqueId { generation, id } if generation == a.generation => {
                    let bytes: [u8; 128] = id.as_slice().try_into().map_err(|_| {
                        Error::Invalid(format!(
                            "the coordinator sent an NCCL unique id of {} bytes (NCCL's is 128)",
                            id.len()
                        ))
                    })?;
                    break NcclId(bytes);
                }
                Command::NcclUniqueId { .. } | Command::Accepted { .. } | Command::Assign(_) => {}
                Command::Restart { .. } => return Ok(Joined::Restart),
                Command::Stop(reason) => return Ok(Joined::Stop(reason)),
                other => {
                    return Err(Error::Invalid(format!(
                        "waiting for the NCCL unique id, the coordinator sent {other:?}"
                    )))
                }
            }
        }
    };
    let sync = NcclSync::new(
        device,
        ringtune_collectives::Rank(a.rank.0),
        ringtune_collectives::WorldSize(a.world_size.0),
        id,
    )
    .map_err(nccl_err)?;
    Ok(Joined::Sync(Box::new(NcclStepSync(CollectiveSync {
        sync,
        timeout,
        comm,
    }))))
}

/// [`StepSync`] over NCCL: host buffers as [`CollectiveSync`] does, and the gradient
/// sum in GPU memory without a host round trip ([`StepSync::all_reduce_device`];
/// `RINGTUNE_NCCL_DEVICE=0` sends it through the host instead, for A/B runs).
#[cfg(feature = "nccl")]
struct NcclStepSync(CollectiveSync<ringtune_collectives::nccl::NcclSync>);

#[cfg(feature = "nccl")]
impl StepSync for NcclStepSync {
    fn all_reduce_sum(&mut self, step: u64, buf: &mut [f32]) -> std::result::Result<(), String> {
        self.0.all_reduce_sum(step, buf)
    }

    fn all_reduce_device(
        &mut self,
        step: u64,
        grads: &ringtune_model::Tensor,
        tail: &mut [f32],
    ) -> Option<std::result::Result<ringtune_model::Tensor, String>> {
        if std::env::var("RINGTUNE_NCCL_DEVICE").as_deref() == Ok("0") {
            return None;
        }
        let t = Instant::now();
        let call = Call::new(step, self.0.timeout);
        let r = nccl_device_sum(&mut self.0.sync, call, grads, tail);
        self.0.comm.set(self.0.comm.get() + t.elapsed());
        r
    }
}

/// `grads` (contiguous f32 on a GPU, else `None`) and `tail` summed over the NCCL ranks
/// as one buffer in GPU memory: the gradients copied into it on the GPU, the scalars
/// appended from the host, one all-reduce, the scalars read back.
#[cfg(feature = "nccl")]
fn nccl_device_sum(
    sync: &mut ringtune_collectives::nccl::NcclSync,
    call: Call,
    grads: &ringtune_model::Tensor,
    tail: &mut [f32],
) -> Option<std::result::Result<ringtune_model::Tensor, String>> {
    use candle_core::backend::BackendDevice;
    use candle_core::{CudaStorage, DType, Storage};
    let candle_core::Device::Cuda(dev) = grads.device() else {
        return None;
    };
    let dev = dev.clone();
    let (n, m) = (grads.elem_count(), tail.len());
    let (storage, layout) = grads.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return None;
    };
    if grads.dtype() != DType::F32 || !layout.is_contiguous() {
        return None;
    }
    let mut run = || -> std::result::Result<ringtune_model::Tensor, String> {
        let e = |what: &str, err: &dyn std::fmt::Display| format!("NCCL device sum, {what}: {err}");
        let src = cs.as_cuda_slice::<f32>().map_err(|x| e("gradient", &x))?;
        let off = layout.start_offset();
        let stream = dev.cuda_stream();
        // SAFETY: the two copies below write all n + m values before anything reads them.
        let mut buf = unsafe { dev.alloc::<f32>(n + m) }.map_err(|x| e("alloc", &x))?;
        stream
            .memcpy_dtod(&src.slice(off..off + n), &mut buf.slice_mut(0..n))
            .map_err(|x| e("copy", &x))?;
        stream
            .memcpy_htod(&*tail, &mut buf.slice_mut(n..n + m))
            .map_err(|x| e("scalars in", &x))?;
        // NCCL runs on its own stream: everything on candle's must be done first.
        dev.synchronize().map_err(|x| e("synchronize", &x))?;
        sync.all_reduce_sum_device(&mut buf, call)
            .map_err(|x| x.to_string())?;
        stream
            .memcpy_dtoh(&buf.slice(n..n + m), tail)
            .map_err(|x| e("scalars out", &x))?;
        dev.synchronize().map_err(|x| e("synchronize", &x))?;
        let summed = candle_core::Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(buf, dev.clone())),
            n + m,
            candle_core::op::BackpropOp::none(),
            false,
        );
        summed.narrow(0, 0, n).map_err(|x| e("narrow", &x))
    };
    Some(run())
}

#[cfg(not(feature = "nccl"))]
fn join_nccl(
    _: &Control,
    _: &RunConfig,
    _: u32,
    _: &Assignment,
    _: bool,
    _: Duration,
    _: Rc<Cell<Duration>>,
) -> Result<Joined> {
    Err(Error::Invalid(
        "the coordinator chose NCCL, but this ringtune was built without the `nccl` cargo \
         feature (rebuild with --features nccl, or run the coordinator with --collective quic)"
            .into(),
    ))
}

/// What this rank trains: supervised (and DPO) steps, or the RL loop.
enum Work {
    Sft(Box<Trainer>),
    Rl(Box<RlTrainer>),
}

/// A finished step, as the report needs it.
struct StepDone {
    loss_sum: f64,
    weight_sum: f64,
    tokens: u64,
    epoch: u64,
    lr: f64,
    grad_norm: f64,
    eval_nll: Option<f64>,
    extra: std::collections::BTreeMap<String, f64>,
}

impl Work {
    /// Runs `step` over this rank's `shard` (example indices, or RL group indices).
    fn step(
        &mut self,
        cfg: &RunConfig,
        rank0: bool,
        step: u64,
        last: bool,
        shard: &[usize],
    ) -> Result<StepDone> {
        match self {
            Work::Sft(t) => {
                let m = t.train_shard(step, shard)?;
                // Every rank holds the same adapter, so rank 0 alone evaluates, at the
                // one-process trainer's cadence (eval_every, and the last step).
                let e = cfg.train.eval_every;
                let due = rank0
                    && t.example_counts().1 > 0
                    && (last || (e > 0 && step.is_multiple_of(e)));
                let mut extra = std::collections::BTreeMap::new();
                let mut eval_nll = None;
                if cfg.train.method == ringtune_config::Method::Dpo {
                    // DPO's numbers are summed in the all-reduce (the same on every rank);
                    // rank 0 reports them, with its held-out loss and accuracy when due.
                    if rank0 {
                        if let Some(dm) = &m.dpo {
                            if let Ok(serde_json::Value::Object(o)) = serde_json::to_value(dm) {
                                for (k, v) in o {
                                    if let Some(x) = v.as_f64() {
                                        extra.insert(k, x);
                                    }
                                }
                            }
                        }
                        if due {
                            if let Some(e) = t.dpo_eval()? {
                                extra.insert("eval_dpo_loss".into(), e.loss);
                                extra.insert("eval_dpo_accuracy".into(), e.accuracy);
                            }
                        }
                    }
                } else if due {
                    eval_nll = Some(t.eval()?);
                }
                let (loss_sum, weight_sum) = t.last_local_sums();
                Ok(StepDone {
                    loss_sum,
                    weight_sum,
                    tokens: m.tokens,
                    epoch: m.epoch,
                    lr: m.lr,
                    grad_norm: m.grad_norm,
                    eval_nll,
                    extra,
                })
            }
            Work::Rl(t) => {
                let m = t.train_shard(step, shard)?;
                // The RL numbers are already the whole step's (summed in the all-reduce):
                // rank 0 reports them, the others report nothing, so the coordinator's sums
                // are the step's. The RL loss is a sum, not a mean: weight 1.
                if !rank0 {
                    return Ok(StepDone {
                        loss_sum: 0.0,
                        weight_sum: 0.0,
                        tokens: 0,
                        epoch: 0,
                        lr: m.lr,
                        grad_norm: m.grad_norm,
                        eval_nll: None,
                        extra: Default::default(),
                    });
                }
                let mut extra: std::collections::BTreeMap<String, f64> = [
                    ("reward_mean", m.reward_mean),
                    ("frac_groups_constant", m.frac_groups_constant),
                    ("frac_groups_dropped", m.frac_groups_dropped),
                    ("samples", m.samples as f64),
                    ("sampled_tokens", m.sampled_tokens as f64),
                    ("completion_len_mean", m.completion_len_mean),
                    ("frac_stopped", m.frac_stopped),
                    ("kl_sample_train", m.kl_sample_train),
                    ("sample_s", m.sample_s),
                    ("score_s", m.score_s),
                    ("train_s", m.train_s),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
                if let Some(kl) = m.kl_policy_base {
                    extra.insert("kl_policy_base".into(), kl);
                }
                extra.extend(m.env.iter().map(|(k, v)| (k.clone(), *v)));
                Ok(StepDone {
                    loss_sum: m.loss,
                    weight_sum: 1.0,
                    tokens: m.train_tokens,
                    epoch: 0,
                    lr: m.lr,
                    grad_norm: m.grad_norm,
                    eval_nll: None,
                    extra,
                })
            }
        }
    }

    /// [`Trainer::check_planned`]; RL's "examples" are groups the environment makes.
    fn check_planned(&self, step: u64, planned: &[(usize, usize)]) -> Result<()> {
        match self {
            Work::Sft(t) => t.check_planned(step, planned),
            Work::Rl(_) => Ok(()),
        }
    }

    fn adapter_sha256(&self) -> Result<[u8; 32]> {
        match self {
            Work::Sft(t) => t.adapter_sha256(),
            Work::Rl(t) => t.adapter_sha256(),
        }
    }

    fn save(&mut self) -> Result<()> {
        match self {
            Work::Sft(t) => t.save().map(drop),
            Work::Rl(t) => t.save().map(drop),
        }
    }
}

/// Rank 0 writes the checkpoint after `step` and confirms it. A failed write (a full disk)
/// is reported as this rank's failure at `step`, before the error ends the process, so the
/// run's error names the cause rather than a peer's lost link.
fn save_and_confirm(
    ctl: &Control,
    trainer: &mut Work,
    generation: Generation,
    step: Step,
) -> Result<()> {
    if let Err(e) = trainer.save() {
        let _ = ctl.send(NodeMsg::Failed {
            generation,
            step,
            reason: format!("writing the checkpoint after {step}: {e}"),
        });
        return Err(e);
    }
    ctl.send(NodeMsg::CheckpointSaved { generation, step })
}

/// Tells the coordinator why this node cannot take part (so the run's error names the
/// cause, not just a lost connection), then hands the error back.
fn setup_failed(ctl: &Control, a: &Assignment, e: Error) -> Error {
    let _ = ctl.send(NodeMsg::Failed {
        generation: a.generation,
        step: ringtune_coordinator::Step(a.resume_from.0 + 1),
        reason: e.to_string(),
    });
    e
}

/// Joins the ring (QUIC, or TCP per `ring_transport`) with this generation's neighbours.
fn join_ring(
    opts: &NodeOptions,
    transport: RingTransport,
    a: &Assignment,
    (left, right): (Peer, Peer),
    (data_addr, reserved): (SocketAddr, Arc<ReservedPort>),
    ring_identity: &ringtune_collectives::tls::ClusterIdentity,
    comm: Rc<Cell<Duration>>,
) -> Result<Joined> {
    let world = a.world_size.0 as usize;
    let mut peers = vec![data_addr; world];
    peers[left.rank.0 as usize % world] = left.addr;
    peers[right.rank.0 as usize % world] = right.addr;
    let ring = net::connect(NetConfig {
        rank: ringtune_collectives::Rank(a.rank.0),
        world: ringtune_collectives::WorldSize(a.world_size.0),
        listen: data_addr,
        reserved: Some(reserved),
        peers,
        identity: ring_identity.clone(),
        token: opts.token.clone(),
        connect_timeout: Duration::from_secs(120),
        chunk_elems: match transport {
            RingTransport::Quic => DEFAULT_CHUNK_ELEMS,
            _ => TCP_CHUNK_ELEMS,
        },
        wire: WireDtype::F32,
        transport: match transport {
            RingTransport::Quic => Transport::Quic,
            RingTransport::TcpTls => Transport::TcpTls,
            RingTransport::TcpPlain => Transport::TcpPlain,
        },
        tcp_io: Default::default(),
    })
    .map_err(|e| Error::Sync {
        step: a.resume_from.0,
        message: format!("joining the ring as rank {} of {world}: {e}", a.rank.0),
    })?;
    Ok(Joined::Sync(Box::new(CollectiveSync {
        sync: ring,
        timeout: opts.collective_timeout,
        comm,
    })))
}

enum Incoming {
    Cmd(Command),
    Lost(String),
}

/// The control connection, served by its own thread.
struct Control {
    addr: String,
    cmds: std_mpsc::Receiver<Incoming>,
    out: Option<mpsc::UnboundedSender<NodeMsg>>,
    /// Commands the main thread has taken; a watchdog started for the n-th command
    /// stands down once this reaches n.
    handled: Arc<AtomicU64>,
    done: std_mpsc::Receiver<()>,
}

impl Control {
    fn send(&self, msg: NodeMsg) -> Result<()> {
        let lost = || self.lost("the control connection is closed");
        self.out
            .as_ref()
            .ok_or_else(lost)?
            .send(msg)
            .map_err(|_| lost())
    }

    fn recv(&self) -> Result<Command> {
        match self.cmds.recv() {
            Ok(Incoming::Cmd(c)) => {
                self.handled.fetch_add(1, Ordering::SeqCst);
                Ok(c)
            }
            Ok(Incoming::Lost(why)) => Err(self.lost(&why)),
            Err(_) => Err(self.lost("the control connection is closed")),
        }
    }

    fn lost(&self, why: &str) -> Error {
        Error::Invalid(format!(
            "lost the coordinator at {}: {why} (the run is over, the coordinator died, or it \
             dropped this node: one silent past the heartbeat timeout is declared dead)",
            self.addr
        ))
    }

    /// Stops sending and waits (briefly) for what was sent to go out.
    fn close(mut self) {
        self.handled.store(u64::MAX, Ordering::SeqCst);
        self.out = None;
        let _ = self.done.recv_timeout(Duration::from_secs(2));
    }
}

fn connect_control(opts: &NodeOptions) -> Result<(Control, Welcome, IpAddr)> {
    let addr = opts.coordinator.clone();
    let token = opts.token.clone();
    let connect_timeout = opts.connect_timeout;
    let trust = opts.coordinator_trust.clone();
    let (init_tx, init_rx) = std_mpsc::channel::<std::result::Result<(Welcome, IpAddr), String>>();
    let (cmd_tx, cmd_rx) = std_mpsc::channel::<Incoming>();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<NodeMsg>();
    let (done_tx, done_rx) = std_mpsc::channel::<()>();
    let handled = Arc::new(AtomicU64::new(0));
    let handled2 = Arc::clone(&handled);
    let hb_tx = out_tx.clone();
    let addr2 = addr.clone();
    std::thread::Builder::new()
        .name("ringtune-control".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = init_tx.send(Err(format!("starting the control runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let start = Instant::now();
                // The address facing the coordinator (the ring listens on the same IP).
                let (coord, local_ip) = match resolve_control(&addr2) {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = init_tx.send(Err(e));
                        return;
                    }
                };
                let rejected = wire::Rejections::default();
                let endpoint = match wire::client_endpoint(
                    SocketAddr::new(local_ip, 0),
                    &trust,
                    Arc::clone(&rejected),
                ) {
                    Ok(ep) => ep,
                    Err(e) => {
                        let _ = init_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                // A UDP "connect" to a port nobody serves yet fails only by timing out, so
                // each try is short and the whole wait is `connect_timeout`.
                if let Err(e) = trust.check_address(&addr2) {
                    let _ = init_tx.send(Err(e));
                    return;
                }
                let server_name = trust.server_name(&addr2);
                let conn = loop {
                    let attempt = async {
                        endpoint
                            .connect(coord, server_name)
                            .map_err(|e| e.to_string())?
                            .await
                            .map_err(|e| e.to_string())
                    };
                    let result = tokio::time::timeout(Duration::from_secs(2), attempt).await;
                    // A certificate that fails the pin fails every try the same way.
                    let why = rejected.lock().unwrap_or_else(|p| p.into_inner()).take();
                    if let Some(why) = why {
                        let _ = init_tx.send(Err(format!(
                            "refusing the coordinator at {addr2}: {why}"
                        )));
                        return;
                    }
                    match result {
                        Ok(Ok(c)) => break c,
                        Ok(Err(e)) if start.elapsed() >= connect_timeout => {
                            let _ = init_tx.send(Err(format!(
                                "cannot connect to the coordinator at {addr2} (tried for {connect_timeout:?}): {e}"
                            )));
                            return;
                        }
                        Err(_) if start.elapsed() >= connect_timeout => {
                            let _ = init_tx.send(Err(format!(
                                "cannot connect to the coordinator at {addr2} (tried for {connect_timeout:?}): no answer"
                            )));
                            return;
                        }
                        _ => tokio::time::sleep(Duration::from_millis(250)).await,
                    }
                };
                let handshake = async {
                    let exporter = wire::exporter(&conn).map_err(|e| e.to_string())?;
                    let (mut wr, mut rd) = conn
                        .open_bi()
                        .await
                        .map_err(|e| format!("opening the control stream to {addr2}: {e}"))?;
                    let hello = NodeHello {
                        version: wire::CONTROL_VERSION,
                        proof: wire::proof(&token, Side::Node, &exporter),
                    };
                    wire::write_msg(&mut wr, &hello)
                        .await
                        .map_err(|e| format!("sending the hello to {addr2}: {e}"))?;
                    let answer: CoordHello = wire::read_msg(&mut rd)
                        .await
                        .map_err(|e| format!("reading the coordinator's answer from {addr2}: {e}"))?;
                    match answer {
                        CoordHello::Refused(r) => {
                            Err(format!("the coordinator at {addr2} refused this node: {r}"))
                        }
                        CoordHello::Welcome(w) => {
                            if !wire::verify(&token, Side::Coordinator, &exporter, &w.proof) {
                                return Err(format!(
                                    "{addr2} failed the cluster-token proof: not this run's \
                                     coordinator, or a different RINGTUNE_TOKEN"
                                ));
                            }
                            Ok((wr, rd, w))
                        }
                    }
                };
                let (mut wr, mut rd, welcome) =
                    match tokio::time::timeout(Duration::from_secs(30), handshake).await {
                        Ok(Ok(x)) => x,
                        Ok(Err(e)) => {
                            let _ = init_tx.send(Err(e));
                            return;
                        }
                        Err(_) => {
                            let _ = init_tx.send(Err(format!(
                                "the coordinator at {addr2} did not complete the handshake in 30 s"
                            )));
                            return;
                        }
                    };
                let _ = init_tx.send(Ok((welcome, local_ip)));
                let writer = async move {
                    while let Some(msg) = out_rx.recv().await {
                        if wire::write_msg(&mut wr, &msg).await.is_err() {
                            break;
                        }
                    }
                    // Let the coordinator have the last message (the StopAck) before closing.
                    let _ = wr.finish();
                    let _ = tokio::time::timeout(Duration::from_millis(300), wr.stopped()).await;
                };
                let reader = async move {
                    let mut heartbeat: Option<tokio::task::JoinHandle<()>> = None;
                    let mut received = 0u64;
                    loop {
                        match wire::read_msg::<_, Command>(&mut rd).await {
                            Ok(cmd) => {
                                if let Command::Accepted { heartbeat_every, .. } = &cmd {
                                    if heartbeat.is_none() {
                                        let every = (*heartbeat_every).max(Duration::from_millis(50));
                                        let hb = hb_tx.clone();
                                        heartbeat = Some(tokio::spawn(async move {
                                            let mut t = tokio::time::interval(every);
                                            let mut told = false;
                                            loop {
                                                t.tick().await;
                                                // A stop signal of this process's own
                                                // goes to the coordinator once, with the
                                                // next heartbeat.
                                                let ask = !told && stop_requested();
                                                if ask {
                                                    told = true;
                                                    if hb.send(NodeMsg::Interrupt).is_err() {
                                                        break;
                                                    }
                                                }
                                                if hb.send(NodeMsg::Heartbeat).is_err() {
                                                    break;
                                                }
                                            }
                                        }));
                                    }
                                }
                                let what = match &cmd {
                                    Command::Stop(reason) => {
                                        Some(format!("was told to stop ({reason})"))
                                    }
                                    Command::Disconnect { .. } => {
                                        Some("was told to stop".to_string())
                                    }
                                    Command::Restart { .. } => Some(RESTART.to_string()),
                                    _ => None,
                                };
                                received += 1;
                                if cmd_tx.send(Incoming::Cmd(cmd)).is_err() {
                                    break;
                                }
                                if let Some(what) = what {
                                    watchdog(Arc::clone(&handled2), received, what);
                                }
                            }
                            Err(e) => {
                                let _ = cmd_tx.send(Incoming::Lost(e.to_string()));
                                watchdog(
                                    Arc::clone(&handled2),
                                    received + 1,
                                    "lost the coordinator".to_string(),
                                );
                                break;
                            }
                        }
                    }
                    if let Some(h) = heartbeat {
                        h.abort();
                    }
                    drop(hb_tx);
                };
                // The writer ends when the main thread drops its sender (after StopAck);
                // the reader when the coordinator closes. Either ends the connection.
                tokio::select! {
                    _ = writer => {}
                    _ = reader => {}
                }
                conn.close(0u32.into(), b"node done");
                let _ = tokio::time::timeout(Duration::from_millis(300), endpoint.wait_idle()).await;
                let _ = done_tx.send(());
            });
        })
        .map_err(|e| Error::Invalid(format!("starting the control thread: {e}")))?;
    let (welcome, ip) = init_rx
        .recv()
        .map_err(|_| Error::Invalid(format!("the control thread for {addr} died")))?
        .map_err(Error::Invalid)?;
    Ok((
        Control {
            addr,
            cmds: cmd_rx,
            out: Some(out_tx),
            handled,
            done: done_rx,
        },
        welcome,
        ip,
    ))
}

/// The coordinator's address (`HOST:PORT`, first resolved address) and this host's IP on
/// the route to it (a connected UDP socket learns it without sending anything).
fn resolve_control(addr: &str) -> std::result::Result<(SocketAddr, IpAddr), String> {
    use std::net::ToSocketAddrs;
    let coord = addr
        .to_socket_addrs()
        .map_err(|e| format!("resolving the coordinator address {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("the coordinator address {addr} resolves to nothing"))?;
    let any: SocketAddr = if coord.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let probe = std::net::UdpSocket::bind(any)
        .and_then(|s| s.connect(coord).map(|()| s))
        .and_then(|s| s.local_addr())
        .map_err(|e| format!("finding the local address that reaches {coord}: {e}"))?;
    Ok((coord, probe.ip()))
}

/// Ends the process if the main thread has not taken the `nth` command (a stop, a restart,
/// or the news that the coordinator is gone) within [`STUCK_GRACE`]: it is stuck in a
/// collective with a peer that will never answer. (A launcher that restarts failed
/// processes — the local harness does — then starts a fresh node, as torchelastic does.)
///
/// A node stuck when told to *restart* starts afresh instead: it replaces its own process
/// image with a new run of the same command (same pid, so a launcher such as `srun` sees
/// nothing end), which registers again and joins the restarted run. Without it, a run
/// started by hand or by a launcher that does not restart processes could never survive a
/// lost node, however many restarts it allows.
fn watchdog(handled: Arc<AtomicU64>, nth: u64, what: String) {
    std::thread::spawn(move || {
        std::thread::sleep(STUCK_GRACE);
        if handled.load(Ordering::SeqCst) >= nth {
            return;
        }
        if what == RESTART {
            eprintln!(
                "ringtune node: {what}, but training is stuck (a peer is gone); starting afresh \
                 after {STUCK_GRACE:?}"
            );
            let e = restart_process();
            eprintln!("ringtune node: cannot start afresh ({e}); exiting");
        } else {
            eprintln!(
                "ringtune node: {what}, but training is stuck (a peer is gone); exiting after {STUCK_GRACE:?}"
            );
        }
        std::process::exit(3);
    });
}

const RESTART: &str = "was told to restart";

/// `exec`s this process's own command line (returns only on failure). Every descriptor
/// is close-on-exec in Rust, so the new image starts with no socket of the old one.
fn restart_process() -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return e,
    };
    std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(REJOIN_VAR, "1")
        .exec()
}

static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// This process got a stop signal of its own (`ringtune node` calls this on the first
/// SIGINT/SIGTERM): the control connection asks the coordinator to stop the run after the
/// step in flight ([`NodeMsg::Interrupt`]), as on the coordinator's own Ctrl-C, instead of
/// this node vanishing mid-step. A launcher that signals every process at once (scancel)
/// makes every node ask; the coordinator takes the first.
pub fn request_stop() {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

fn stop_requested() -> bool {
    STOP_REQUESTED.load(Ordering::SeqCst)
}

/// Set in a node that restarted itself ([`restart_process`]): it is rejoining a run whose
/// coordinator waits [`REJOIN_CONNECT`]-ish for it, so it does not keep dialing for its
/// whole first-connect timeout when that coordinator is gone.
pub const REJOIN_VAR: &str = "RINGTUNE_REJOIN";

/// How long a rejoining node tries to reach the coordinator (its rejoin window is 30 s).
pub const REJOIN_CONNECT: Duration = Duration::from_secs(45);

/// A free port on `ip` for the ring (UDP for the QUIC endpoint, TCP for the TCP links),
/// kept bound until the ring listens on it (see [`ReservedPort`]), so that nothing takes it
/// between the registration that names it and the ring's start.
fn pick_data_addr(ip: IpAddr, transport: RingTransport) -> Result<(SocketAddr, Arc<ReservedPort>)> {
    let (proto, t) = match transport {
        RingTransport::Quic => ("UDP", Transport::Quic),
        RingTransport::TcpTls => ("TCP", Transport::TcpTls),
        RingTransport::TcpPlain => ("TCP", Transport::TcpPlain),
    };
    ReservedPort::bind(ip, t)
        .and_then(|r| Ok((r.local_addr()?, Arc::new(r))))
        .map_err(|e| Error::Invalid(format!("no free {proto} port on {ip} for the ring: {e}")))
}

/// Runs this node until the coordinator stops it. Errors name the coordinator, the step or
/// the ring peer involved.
pub fn run_node(opts: NodeOptions) -> Result<NodeExit> {
    // A refusal that clears up by itself — typically a replacement process whose dead
    // predecessor on the same GPU slot the coordinator has not yet declared dead (a killed
    // process closes nothing over QUIC; the heartbeat timeout finds it) — is retried.
    let retry_until = Instant::now() + opts.connect_timeout.max(Duration::from_secs(30));
    loop {
        match run_node_once(&opts) {
            Err(Error::Refused {
                retryable: true,
                reason,
                ..
            }) if Instant::now() < retry_until => {
                eprintln!("ringtune node: refused for now ({reason}); trying again in 1 s");
                std::thread::sleep(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

fn run_node_once(opts: &NodeOptions) -> Result<NodeExit> {
    let (ctl, welcome, local_ip) = connect_control(opts)?;
    let mut cfg: RunConfig = serde_json::from_str(&welcome.run_config_json)
        .map_err(|e| Error::Invalid(format!("the run config from {}: {e}", opts.coordinator)))?;
    // A launcher that started another number of processes than the run has ranks: the
    // extra ones would sit idle as standbys (GPUs and all), or the run would wait for
    // nodes that never come. Said now, by every node.
    if let Some((world, var)) = opts.launch_world {
        if world != cfg.nodes {
            ctl.close();
            return Err(Error::Invalid(format!(
                "{var}={world}, but the run's config has nodes = {}: the launcher started \
                 {world} node process(es) for a run of {} rank(s); set nodes = {world} in \
                 the config, or launch {} task(s)",
                cfg.nodes, cfg.nodes, cfg.nodes
            )));
        }
    }
    // `--device` is where this node runs, not part of the run (`model.device` is not in
    // the config hash), so every GPU of a host can join with its own.
    if let Some(d) = opts.device {
        cfg.model.device = d;
    }
    let config_hash = config_hash_of(opts.own_config.as_ref().unwrap_or(&cfg))?;
    let ring_identity = welcome
        .ring_identity()
        .map_err(|e| Error::Invalid(e.to_string()))?;
    let result = serve(&ctl, opts, &cfg, config_hash, ring_identity, local_ip);
    ctl.close();
    result
}

fn stop_result(reason: StopReason) -> Result<NodeExit> {
    match reason {
        StopReason::Finished => Ok(NodeExit::Finished),
        StopReason::Interrupted => Ok(NodeExit::Interrupted),
        StopReason::Failed(e) => Err(Error::Invalid(format!(
            "the coordinator stopped the run: {e}"
        ))),
    }
}

fn serve(
    ctl: &Control,
    opts: &NodeOptions,
    cfg: &RunConfig,
    config_hash: ConfigHash,
    ring_identity: ringtune_collectives::tls::ClusterIdentity,
    local_ip: IpAddr,
) -> Result<NodeExit> {
    'generation: loop {
        let (data_addr, reserved) = pick_data_addr(local_ip, cfg.ring_transport)?;
        ctl.send(NodeMsg::Register(Registration {
            identity: opts.identity.clone(),
            config_hash,
            data_addr: Some(data_addr),
        }))?;
        let a: Assignment = loop {
            match ctl.recv()? {
                Command::Accepted { .. } | Command::NcclUniqueId { .. } => {}
                Command::Assign(a) => break a,
                Command::Refused(r) => {
                    return Err(Error::Refused {
                        coordinator: opts.coordinator.clone(),
                        reason: r.to_string(),
                        retryable: r.is_retryable(),
                    })
                }
                Command::Stop(reason) => {
                    ctl.send(NodeMsg::StopAck)?;
                    return stop_result(reason);
                }
                Command::Disconnect { reason } => {
                    return Err(Error::Invalid(format!(
                        "the coordinator dropped this node: {reason}"
                    )))
                }
                Command::Restart { .. } => continue 'generation,
                Command::RunStep(StepOrder { step, .. }) | Command::Save { step, .. } => {
                    return Err(Error::Invalid(format!(
                        "the coordinator sent an order for step {step} before an assignment"
                    )))
                }
            }
        };
        let comm = Rc::new(Cell::new(Duration::ZERO));
        let joined = match a.collective {
            CollectiveSetup::Ring { left, right } => join_ring(
                opts,
                cfg.ring_transport,
                &a,
                (left, right),
                (data_addr, Arc::clone(&reserved)),
                &ring_identity,
                Rc::clone(&comm),
            ),
            CollectiveSetup::Nccl { create_unique_id } => join_nccl(
                ctl,
                cfg,
                opts.identity.local_rank,
                &a,
                create_unique_id,
                opts.collective_timeout,
                Rc::clone(&comm),
            ),
        };
        let sync = match joined.map_err(|e| setup_failed(ctl, &a, e))? {
            Joined::Sync(sync) => sync,
            Joined::Restart => continue 'generation,
            Joined::Stop(reason) => {
                ctl.send(NodeMsg::StopAck)?;
                return stop_result(reason);
            }
        };
        let rank0 = a.rank.0 == 0;
        let work = if cfg.train.method == ringtune_config::Method::Rl {
            RlTrainer::for_node(cfg.clone(), a.resume_from.0, rank0, sync)
                .map(|t| Work::Rl(Box::new(t)))
        } else {
            Trainer::for_node(cfg.clone(), a.resume_from.0, rank0, sync)
                .map(|t| Work::Sft(Box::new(t)))
        };
        let mut trainer = work.map_err(|e| setup_failed(ctl, &a, e))?;
        if let (Work::Sft(t), true, 0) = (&trainer, rank0, a.generation.0) {
            for w in t.warnings() {
                eprintln!("ringtune node: warning: {w}");
            }
        }
        ctl.send(NodeMsg::Ready {
            generation: a.generation,
        })?;
        // The last step this node completed in this generation.
        let mut done: Option<Step> = None;
        loop {
            match ctl.recv()? {
                Command::RunStep(o) => {
                    let started = Instant::now();
                    comm.set(Duration::ZERO);
                    let shard: Vec<usize> = o.examples.iter().map(|e| e.index.0 as usize).collect();
                    let last = o.step == a.total_steps;
                    let planned: Vec<(usize, usize)> = o
                        .examples
                        .iter()
                        .map(|e| (e.index.0 as usize, e.tokens as usize))
                        .collect();
                    let ran = trainer
                        .check_planned(o.step.0, &planned)
                        .and_then(|()| trainer.step(cfg, rank0, o.step.0, last, &shard));
                    match ran {
                        Ok(d) => {
                            let total = started.elapsed();
                            let comm_t = comm.get();
                            let adapter_hash = if o.report_hash {
                                Some(AdapterHash(trainer.adapter_sha256()?))
                            } else {
                                None
                            };
                            ctl.send(NodeMsg::StepDone(StepReport {
                                generation: o.generation,
                                step: o.step,
                                loss_sum: d.loss_sum,
                                weight_sum: d.weight_sum,
                                tokens: d.tokens,
                                epoch: d.epoch,
                                lr: d.lr,
                                grad_norm: d.grad_norm,
                                compute: total.saturating_sub(comm_t),
                                comm: comm_t,
                                extra: d.extra,
                                adapter_hash,
                                eval_nll: d.eval_nll,
                            }))?;
                            done = Some(o.step);
                            if o.save_checkpoint {
                                save_and_confirm(ctl, &mut trainer, o.generation, o.step)?;
                            }
                        }
                        Err(e) => {
                            ctl.send(NodeMsg::Failed {
                                generation: o.generation,
                                step: o.step,
                                reason: e.to_string(),
                            })?;
                        }
                    }
                }
                Command::Save { generation, step } => {
                    if done != Some(step) {
                        let reason = format!(
                            "asked to save after step {step}, but the last step done here is {}",
                            done.map_or("none".to_string(), |s| s.to_string())
                        );
                        ctl.send(NodeMsg::Failed {
                            generation,
                            step,
                            reason: reason.clone(),
                        })?;
                        return Err(Error::Invalid(reason));
                    }
                    save_and_confirm(ctl, &mut trainer, generation, step)?;
                }
                Command::Restart { .. } => {
                    drop(trainer);
                    continue 'generation;
                }
                Command::Stop(reason) => {
                    ctl.send(NodeMsg::StopAck)?;
                    return stop_result(reason);
                }
                Command::Disconnect { reason } => {
                    return Err(Error::Invalid(format!(
                        "the coordinator dropped this node: {reason}"
                    )))
                }
                Command::Accepted { .. } | Command::NcclUniqueId { .. } | Command::Assign(_) => {}
                Command::Refused(r) => {
                    return Err(Error::Invalid(format!(
                        "the coordinator refused this node: {r}"
                    )))
                }
            }
        }
    }
}
