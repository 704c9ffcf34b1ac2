//! Where a trainer's AdamW runs, and the step's gradient sum it consumes.
//!
//! On the CPU everything stays as the trainers always did it: each micro-batch's gradients
//! are flattened into one host buffer followed by the step's scalars, the buffer is
//! all-reduced, and [`AdamW::step_flat`] updates a host copy of the parameters that is then
//! written into the model.
//!
//! With the model on a GPU that round trip cost 42 ms per step on qwen05b (H200): the
//! gradients came to the host, AdamW ran there over 17.6M values, and the parameters went
//! back. `Optimizer::Device` keeps the AdamW state on the model's device
//! ([`DeviceAdamW`]):
//! - one process (`ringtune train` with `nodes = 1`): the gradient sum never leaves the
//!   device; only the scalars (Σw, Σ loss, …) are host values;
//! - a rank of a distributed run over the QUIC/TCP ring: the sum goes to the host once for
//!   the ring (as before), its norm is taken there with [`AdamW::grad_norm`], and only the
//!   element-wise update runs on the device. Given the host's norm the device update is the
//!   host's bit for bit (single IEEE f32 operations in the same order), so ranks agree
//!   whatever device each one has, and the coordinator's adapter-hash check still holds;
//! - a rank of an NCCL run: the sum (with the scalars appended) is all-reduced in GPU
//!   memory ([`StepSync::all_reduce_device`]) and never reaches the host; every rank then
//!   holds the same bits and takes the same device norm.
//!
//! `RINGTUNE_DEVICE_ADAMW=0` keeps AdamW on the host on a GPU (for A/B runs);
//! `RINGTUNE_DEVICE_ADAMW=1` uses the device path even on the CPU (which is how the tests
//! exercise it here).

use std::path::Path;

use ringtune_model::{AdamW, DeviceAdamW, Gradients, LoraModel, StepReport, Tensor};

use crate::error::Result;
use crate::trainer::StepSync;

/// The environment switch (see the module docs).
pub const DEVICE_ADAMW_ENV: &str = "RINGTUNE_DEVICE_ADAMW";

/// A trainer's AdamW: on the host over a flat copy of the parameters, or on the model's
/// device.
#[derive(Debug)]
pub(crate) enum Optimizer {
    /// State and a parameter copy in host memory.
    Host {
        /// The state.
        opt: AdamW,
        /// The adapter parameters, flat in layout order (the model holds the same values).
        params: Vec<f32>,
    },
    /// State on the model's device; the model's tensors are the parameters.
    Device(DeviceAdamW),
}

impl Optimizer {
    /// `opt` (fresh or loaded from a checkpoint) placed for `model`: on its device when the
    /// model is on a GPU, unless [`DEVICE_ADAMW_ENV`] says otherwise.
    pub(crate) fn new(opt: AdamW, model: &LoraModel) -> Result<Self> {
        let on_device = match std::env::var(DEVICE_ADAMW_ENV).ok().as_deref() {
            Some("1") => true,
            Some("0") => false,
            Some(other) => {
                return Err(crate::Error::Invalid(format!(
                    "{DEVICE_ADAMW_ENV}={other:?}: expected 0 (AdamW on the host) or 1 (on \
                     the model's device)"
                )))
            }
            None => !model.device().is_cpu(),
        };
        if on_device {
            Ok(Optimizer::Device(DeviceAdamW::from_host(
                &opt,
                model.device(),
            )?))
        } else {
            let params = model.params_flat()?;
            Ok(Optimizer::Host { opt, params })
        }
    }

    /// An empty gradient sum for one step, with `tail` scalars after the gradients.
    pub(crate) fn new_step(&self, model: &LoraModel, tail: usize) -> StepGrads {
        let n = model.param_layout().numel();
        match self {
            Optimizer::Host { .. } => StepGrads {
                n,
                dev: None,
                device: model.device().clone(),
                buf: vec![0.0; n + tail],
                tail_at: n,
            },
            Optimizer::Device(_) => StepGrads {
                n,
                dev: None,
                device: model.device().clone(),
                buf: vec![0.0; tail],
                tail_at: 0,
            },
        }
    }

    /// Multiplies the summed gradients by `scale` (when given) and takes one AdamW step at
    /// learning rate `lr`, writing the new parameters into `model`.
    pub(crate) fn apply(
        &mut self,
        model: &LoraModel,
        mut g: StepGrads,
        scale: Option<f32>,
        lr: f64,
    ) -> Result<StepReport> {
        let n = g.n;
        if g.tail_at == n {
            let grads = &mut g.buf[..n];
            if let Some(s) = scale {
                grads.iter_mut().for_each(|x| *x *= s);
            }
            return Ok(match self {
                Optimizer::Host { opt, params } => {
                    let rep = opt.step_flat(params, grads, lr)?;
                    model.set_params_flat(params)?;
                    rep
                }
                Optimizer::Device(opt) => {
                    let norm = AdamW::grad_norm(grads);
                    let t = Tensor::from_slice(grads, n, model.device())
                        .map_err(ringtune_model::Error::from)?;
                    opt.step_flat_tensor(model, t, Some(norm), lr)?
                }
            });
        }
        let Optimizer::Device(opt) = self else {
            unreachable!("a gradient sum kept on the device belongs to a device optimizer")
        };
        let dev = model.device();
        let mut t = match g.dev.take() {
            Some(t) => t,
            None => Tensor::zeros(n, ringtune_model::DType::F32, dev)
                .map_err(ringtune_model::Error::from)?,
        };
        if let Some(s) = scale {
            t = t
                .broadcast_mul(&Tensor::new(s, dev).map_err(ringtune_model::Error::from)?)
                .map_err(ringtune_model::Error::from)?;
        }
        Ok(opt.step_flat_tensor(model, t, None, lr)?)
    }

    /// Where the update runs, for logs: `host` or `device`.
    pub(crate) fn placement(&self) -> &'static str {
        match self {
            Optimizer::Host { .. } => "host",
            Optimizer::Device(_) => "device",
        }
    }

    /// Writes the state (the same file either way).
    pub(crate) fn save(&self, path: &Path) -> Result<()> {
        match self {
            Optimizer::Host { opt, .. } => opt.save(path)?,
            Optimizer::Device(opt) => opt.save(path)?,
        }
        Ok(())
    }

    /// The adapter parameters, flat in layout order (read from the device when they live
    /// there).
    pub(crate) fn params_flat(&self, model: &LoraModel) -> Result<Vec<f32>> {
        match self {
            Optimizer::Host { params, .. } => Ok(params.clone()),
            Optimizer::Device(_) => Ok(model.params_flat()?),
        }
    }

    /// The adapter parameters' digest (`trainer::params_sha256`).
    pub(crate) fn params_sha256(&self, model: &LoraModel) -> Result<[u8; 32]> {
        Ok(match self {
            Optimizer::Host { params, .. } => crate::trainer::params_sha256(params),
            Optimizer::Device(_) => crate::trainer::params_sha256(&model.params_flat()?),
        })
    }
}

/// One step's gradient sum (over micro-batches, then over ranks) and its scalar tail.
#[derive(Debug)]
pub(crate) struct StepGrads {
    /// Gradient values (the layout's numel).
    n: usize,
    /// The sum while it stays on the model's device (`None`: nothing added yet).
    dev: Option<Tensor>,
    /// The model's device.
    device: ringtune_model::Device,
    /// The sum's host values when it is on the host (`tail_at == n`), then the tail.
    buf: Vec<f32>,
    /// Where the tail starts in `buf`: `n` with the gradients on the host, else 0.
    tail_at: usize,
}

impl StepGrads {
    /// Adds one micro-batch's gradients.
    pub(crate) fn add(&mut self, g: &Gradients) -> Result<()> {
        if self.tail_at == self.n {
            let flat = g.to_flat()?;
            for (a, x) in self.buf[..self.n].iter_mut().zip(&flat) {
                *a += x;
            }
            return Ok(());
        }
        let t = g.flat_tensor()?;
        self.dev = Some(match self.dev.take() {
            None => t,
            Some(acc) => (acc + t).map_err(ringtune_model::Error::from)?,
        });
        Ok(())
    }

    /// The scalars after the gradients (summed over ranks after [`StepGrads::all_reduce`]).
    pub(crate) fn tail(&self) -> &[f32] {
        &self.buf[self.tail_at..]
    }

    /// The scalars, to fill in.
    pub(crate) fn tail_mut(&mut self) -> &mut [f32] {
        &mut self.buf[self.tail_at..]
    }

    /// Appends scalars to the tail.
    pub(crate) fn extend_tail(&mut self, xs: impl IntoIterator<Item = f32>) {
        self.buf.extend(xs);
    }

    /// Keeps the first `len` scalars of the tail.
    pub(crate) fn truncate_tail(&mut self, len: usize) {
        self.buf.truncate(self.tail_at + len);
    }

    /// Sums gradients and tail over every rank with one all-reduce of one host buffer
    /// (gradients in layout order, then the tail). When `sync` is this process alone, a sum
    /// kept on the device stays there and only the tail goes through `sync`; when `sync`
    /// can sum device memory (NCCL), it stays there too, and the update then takes the norm
    /// on the device — the same bits on every rank, which all hold the same sum.
    pub(crate) fn all_reduce(
        &mut self,
        sync: &mut dyn StepSync,
        step: u64,
    ) -> std::result::Result<(), String> {
        if self.tail_at == 0 && self.n > 0 && !sync.is_local() {
            // A rank with no micro-batches this step sums zeros the same way as the others,
            // so that every rank takes the same path (and the same norm) to the same bits.
            let t = match self.dev.take() {
                Some(t) => t,
                None => Tensor::zeros(self.n, ringtune_model::DType::F32, &self.device)
                    .map_err(|e| e.to_string())?,
            };
            if let Some(summed) = sync.all_reduce_device(step, &t, &mut self.buf) {
                self.dev = Some(summed?);
                return Ok(());
            }
            self.dev = Some(t);
            let mut buf = match self.dev.take() {
                Some(t) => t.to_vec1::<f32>().map_err(|e| e.to_string())?,
                None => vec![0.0; self.n],
            };
            buf.extend_from_slice(&self.buf);
            self.buf = buf;
            self.tail_at = self.n;
        }
        sync.all_reduce_sum(step, &mut self.buf)
    }
}
