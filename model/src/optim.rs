//! AdamW on the flat adapter buffer, matching `torch.optim.AdamW` (single-tensor CPU path)
//! operation by operation, so that two steps agree with PyTorch to float rounding.
//!
//! Working on one flat f32 buffer in [`ParamLayout`] order is what makes every rank's step
//! identical: same inputs, same order of operations, same bits. The state (m, v, step)
//! exports as named tensors `<key>.exp_avg` / `<key>.exp_avg_sq` plus the step count, so a
//! checkpoint resumes bit-exactly.

use std::path::Path;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::grads::ParamLayout;

/// AdamW hyper-parameters. Defaults are tinker's.
/// Values per parallel chunk of the update (fixed, so results never depend on threads).
const CHUNK: usize = 1 << 16;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate used when a step is not given one (schedules pass their own).
    pub lr: f64,
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε, added to √v̂.
    pub eps: f64,
    /// Decoupled weight decay (param ← param · (1 − lr · wd)).
    pub weight_decay: f64,
    /// Clip the gradients to this global L2 norm before the update, if set.
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-12,
            weight_decay: 0.0,
            max_grad_norm: None,
        }
    }
}

/// What one optimizer step saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
    /// Whether the gradients were scaled down by clipping.
    pub clipped: bool,
    /// The step number just taken (1-based, as PyTorch counts).
    pub step: u64,
}

/// The per-step scalars of the update, computed in f64 (Python floats) and rounded to f32
/// where PyTorch passes them into an f32 kernel; shared by [`AdamW`] and [`DeviceAdamW`].
struct Scalars {
    decay: f32,
    w1: f32,
    b2: f32,
    w2: f32,
    bc2_sqrt: f32,
    eps: f32,
    neg_step_size: f32,
}

impl Scalars {
    /// For step number `step` (1-based, already incremented) at learning rate `lr`.
    fn new(c: &AdamWConfig, step: u64, lr: f64) -> Self {
        let step = step as i32;
        let bias_correction1 = 1.0 - c.beta1.powi(step);
        let bias_correction2 = 1.0 - c.beta2.powi(step);
        let step_size = lr / bias_correction1;
        Scalars {
            decay: (1.0 - lr * c.weight_decay) as f32,
            w1: (1.0 - c.beta1) as f32,
            b2: c.beta2 as f32,
            w2: (1.0 - c.beta2) as f32,
            bc2_sqrt: bias_correction2.sqrt() as f32,
            eps: c.eps as f32,
            neg_step_size: (-step_size) as f32,
        }
    }
}

/// AdamW with its state.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    cfg: AdamWConfig,
    layout: ParamLayout,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
    step: u64,
}

impl AdamW {
    /// Fresh state (zeros, step 0) for parameters laid out as `layout`.
    pub fn new(cfg: AdamWConfig, layout: ParamLayout) -> Self {
        let n = layout.numel();
        AdamW {
            cfg,
            layout,
            exp_avg: vec![0.0; n],
            exp_avg_sq: vec![0.0; n],
            step: 0,
        }
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// The parameter layout the state follows.
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// First moments, flat.
    pub fn exp_avg(&self) -> &[f32] {
        &self.exp_avg
    }

    /// Second moments, flat.
    pub fn exp_avg_sq(&self) -> &[f32] {
        &self.exp_avg_sq
    }

    /// The L2 norm of a flat gradient as [`AdamW::step_flat`] computes it: squares in f64,
    /// summed in fixed chunks in order, so the same bits whatever the thread count.
    pub fn grad_norm(grads: &[f32]) -> f64 {
        grads
            .par_chunks(CHUNK)
            .map(|c| c.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>())
            .collect::<Vec<f64>>()
            .iter()
            .sum::<f64>()
            .sqrt()
    }

    /// One update of `params` with `grads` (both flat, layout order) at learning rate `lr`.
    /// `grads` is clipped in place when `max_grad_norm` is set.
    pub fn step_flat(
        &mut self,
        params: &mut [f32],
        grads: &mut [f32],
        lr: f64,
    ) -> Result<StepReport> {
        let n = self.exp_avg.len();
        if params.len() != n || grads.len() != n {
            return Err(Error::ParamMismatch(format!(
                "AdamW state has {n} values, got {} parameters and {} gradients",
                params.len(),
                grads.len()
            )));
        }
        if !lr.is_finite() || lr < 0.0 {
            return Err(Error::ParamMismatch(format!(
                "learning rate {lr} is not a finite value >= 0"
            )));
        }
        let grad_norm = Self::grad_norm(grads);
        if !grad_norm.is_finite() {
            return Err(Error::ParamMismatch(format!(
                "gradient norm is {grad_norm} at step {}: refusing to update",
                self.step + 1
            )));
        }
        let mut clipped = false;
        if let Some(max) = self.cfg.max_grad_norm {
            // torch.nn.utils.clip_grad_norm_: coef = max / (norm + 1e-6), only if < 1.
            let coef = max / (grad_norm + 1e-6);
            if coef < 1.0 {
                let c = coef as f32;
                grads
                    .par_chunks_mut(CHUNK)
                    .for_each(|ch| ch.iter_mut().for_each(|g| *g *= c));
                clipped = true;
            }
        }

        self.step += 1;
        let Scalars {
            decay,
            w1,
            b2,
            w2,
            bc2_sqrt,
            eps,
            neg_step_size,
        } = Scalars::new(&self.cfg, self.step, lr);
        let wd = self.cfg.weight_decay != 0.0;
        // Element-wise, so chunks in parallel give the same values as one loop.
        params
            .par_chunks_mut(CHUNK)
            .zip(grads.par_chunks(CHUNK))
            .zip(self.exp_avg.par_chunks_mut(CHUNK))
            .zip(self.exp_avg_sq.par_chunks_mut(CHUNK))
            .for_each(|(((ps, gs), ms), vs)| {
                for i in 0..ps.len() {
                    let g = gs[i];
                    let mut p = ps[i];
                    if wd {
                        p *= decay;
                    }
                    // exp_avg.lerp_(grad, 1 - beta1): weight < 0.5 → self + w * (end - self).
                    let m = ms[i] + w1 * (g - ms[i]);
                    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2).
                    let v = vs[i] * b2;
                    let v = v + w2 * g * g;
                    // denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                    let denom = v.sqrt() / bc2_sqrt + eps;
                    // param.addcdiv_(exp_avg, denom, value=-step_size)
                    p += neg_step_size * m / denom;
                    ms[i] = m;
                    vs[i] = v;
                    ps[i] = p;
                }
            });
        Ok(StepReport {
            grad_norm,
            clipped,
            step: self.step,
        })
    }

    /// One update of a model's adapters with `grads` (convenience around
    /// [`AdamW::step_flat`]: flatten, step, write back).
    pub fn step_model(
        &mut self,
        model: &crate::LoraModel,
        grads: &crate::Gradients,
        lr: f64,
    ) -> Result<StepReport> {
        if grads.layout() != &self.layout || model.param_layout() != &self.layout {
            return Err(Error::ParamMismatch(
                "gradients, model and optimizer state have different layouts".into(),
            ));
        }
        let mut params = model.params_flat()?;
        let mut g = grads.to_flat()?;
        let report = self.step_flat(&mut params, &mut g, lr)?;
        model.set_params_flat(&params)?;
        Ok(report)
    }

    /// The state as named tensors: `<key>.exp_avg`, `<key>.exp_avg_sq` for every parameter
    /// key, sorted by name.
    pub fn state_tensors(&self, device: &Device) -> Result<Vec<(String, Tensor)>> {
        let m = self.layout.unflatten(&self.exp_avg, device)?;
        let v = self.layout.unflatten(&self.exp_avg_sq, device)?;
        let mut out = Vec::with_capacity(2 * m.len());
        for ((k, tm), (_, tv)) in m.into_iter().zip(v) {
            out.push((format!("{k}.exp_avg"), tm));
            out.push((format!("{k}.exp_avg_sq"), tv));
        }
        Ok(out)
    }

    /// Replaces the state with named tensors as [`AdamW::state_tensors`] writes them and the
    /// step count. Every key must be present with its shape; extra keys are an error.
    pub fn load_state_tensors(&mut self, tensors: &[(String, Tensor)], step: u64) -> Result<()> {
        let mut by_name: std::collections::HashMap<&str, &Tensor> =
            tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        let mut m = Vec::with_capacity(self.layout.len());
        let mut v = Vec::with_capacity(self.layout.len());
        for (k, shape) in self.layout.entries() {
            for (suffix, dst) in [("exp_avg", &mut m), ("exp_avg_sq", &mut v)] {
                let name = format!("{k}.{suffix}");
                let t = by_name.remove(name.as_str()).ok_or_else(|| {
                    Error::ParamMismatch(format!("optimizer state lacks `{name}`"))
                })?;
                if t.dims() != shape.as_slice() {
                    return Err(Error::ParamMismatch(format!(
                        "optimizer state `{name}` has shape {:?}, expected {shape:?}",
                        t.dims()
                    )));
                }
                dst.push((k.clone(), t.clone()));
            }
        }
        if let Some(extra) = by_name.keys().min() {
            return Err(Error::ParamMismatch(format!(
                "optimizer state has unexpected tensor `{extra}`"
            )));
        }
        self.exp_avg = self.layout.flatten(&m)?;
        self.exp_avg_sq = self.layout.flatten(&v)?;
        self.step = step;
        Ok(())
    }

    /// Writes the state to a safetensors file (atomically) with the step in its metadata.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors = self.state_tensors(&Device::Cpu)?;
        let mut meta = std::collections::HashMap::new();
        meta.insert("step".to_string(), self.step.to_string());
        crate::io::write_safetensors_atomic(path, &tensors, Some(meta))
    }

    /// Reads a state written by [`AdamW::save`] into fresh optimizer state for `layout`.
    pub fn load(path: &Path, cfg: AdamWConfig, layout: ParamLayout) -> Result<Self> {
        let (tensors, meta) = crate::io::read_safetensors(path)?;
        let step = meta
            .get("step")
            .ok_or_else(|| Error::MissingField {
                path: path.to_path_buf(),
                field: "__metadata__.step".into(),
            })?
            .parse::<u64>()
            .map_err(|e| Error::InvalidField {
                path: path.to_path_buf(),
                field: "__metadata__.step".into(),
                reason: e.to_string(),
            })?;
        let mut opt = AdamW::new(cfg, layout);
        opt.load_state_tensors(&tensors, step)?;
        Ok(opt)
    }
}

/// [`AdamW`] with its state on the model's device, for GPU training: the gradients are
/// concatenated there, the update runs as a handful of element-wise kernels and the
/// parameters are written back in place — no host round trip (on an H200 the host path
/// cost ~45 ms per step for 17.6M adapter values). Same arithmetic as [`AdamW::step_flat`]
/// (f32, the same operation order): with the host's gradient norm passed in
/// ([`DeviceAdamW::step_flat_tensor`]) the same bits, otherwise the norm is summed in f32 on
/// the device. [`DeviceAdamW::to_host`] gives the state back for checkpoints.
#[derive(Debug)]
pub struct DeviceAdamW {
    cfg: AdamWConfig,
    layout: ParamLayout,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: u64,
}

impl DeviceAdamW {
    /// The state of `host` moved to `device`.
    pub fn from_host(host: &AdamW, device: &Device) -> Result<Self> {
        let n = host.exp_avg.len();
        Ok(DeviceAdamW {
            cfg: host.cfg,
            layout: host.layout.clone(),
            exp_avg: Tensor::from_slice(&host.exp_avg, n, device)?,
            exp_avg_sq: Tensor::from_slice(&host.exp_avg_sq, n, device)?,
            step: host.step,
        })
    }

    /// The state copied back to the host (for checkpoints).
    pub fn to_host(&self) -> Result<AdamW> {
        Ok(AdamW {
            cfg: self.cfg,
            layout: self.layout.clone(),
            exp_avg: self.exp_avg.to_vec1()?,
            exp_avg_sq: self.exp_avg_sq.to_vec1()?,
            step: self.step,
        })
    }

    /// Steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Writes the state as [`AdamW::save`] does (the same file, loadable by either).
    pub fn save(&self, path: &Path) -> Result<()> {
        self.to_host()?.save(path)
    }

    /// One update of the model's adapters with `grads · grad_scale` at learning rate `lr`.
    pub fn step_model(
        &mut self,
        model: &crate::LoraModel,
        grads: &crate::Gradients,
        grad_scale: f64,
        lr: f64,
    ) -> Result<StepReport> {
        if grads.layout() != &self.layout {
            return Err(Error::ParamMismatch(
                "gradients, model and optimizer state have different layouts".into(),
            ));
        }
        let mut g = grads.flat_tensor()?;
        if grad_scale != 1.0 {
            g = g.broadcast_mul(&Tensor::new(grad_scale as f32, g.device())?)?;
        }
        self.step_flat_tensor(model, g, None, lr)
    }

    /// One update of the model's adapters with the flat f32 gradient `g` (layout order, on
    /// any device; moved to the state's) at learning rate `lr`. `grad_norm`, when given, is
    /// used as the gradient's L2 norm instead of summing it on the device: pass the value
    /// [`AdamW::grad_norm`] computes from the same gradient on the host, and the update
    /// takes the same bits as [`AdamW::step_flat`] (each element-wise operation is one
    /// IEEE-rounded f32 operation in the same order on either side).
    pub fn step_flat_tensor(
        &mut self,
        model: &crate::LoraModel,
        g: Tensor,
        grad_norm: Option<f64>,
        lr: f64,
    ) -> Result<StepReport> {
        if model.param_layout() != &self.layout || g.elem_count() != self.layout.numel() {
            return Err(Error::ParamMismatch(format!(
                "gradients ({} values), model and optimizer state ({} values) have different layouts",
                g.elem_count(),
                self.layout.numel()
            )));
        }
        if !lr.is_finite() || lr < 0.0 {
            return Err(Error::ParamMismatch(format!(
                "learning rate {lr} is not a finite value >= 0"
            )));
        }
        let dev = self.exp_avg.device().clone();
        let flat = |ts: Vec<Tensor>| -> Result<Tensor> {
            let parts = ts
                .iter()
                .map(|t| {
                    Ok(t.to_device(&dev)?
                        .to_dtype(candle_core::DType::F32)?
                        .flatten_all()?)
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::cat(&parts, 0)?)
        };
        let mut g = g
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_device(&dev)?;
        let grad_norm = match grad_norm {
            Some(n) => n,
            None => g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?
                .sqrt(),
        };
        if !grad_norm.is_finite() {
            return Err(Error::ParamMismatch(format!(
                "gradient norm is {grad_norm} at step {}: refusing to update",
                self.step + 1
            )));
        }
        let mut clipped = false;
        if let Some(max) = self.cfg.max_grad_norm {
            let coef = max / (grad_norm + 1e-6);
            if coef < 1.0 {
                g = g.broadcast_mul(&Tensor::new(coef as f32, &dev)?)?;
                clipped = true;
            }
        }
        self.step += 1;
        let Scalars {
            decay,
            w1,
            b2,
            w2,
            bc2_sqrt,
            eps,
            neg_step_size,
        } = Scalars::new(&self.cfg, self.step, lr);
        let scalar = |x: f32| Tensor::new(x, &dev);
        // m + w1·(g − m); v·b2 + (w2·g)·g; √v / bc2 + eps; p·decay + (−step·m) / denom.
        let m = (&self.exp_avg + (&g - &self.exp_avg)?.broadcast_mul(&scalar(w1)?)?)?;
        let v = (self.exp_avg_sq.broadcast_mul(&scalar(b2)?)?
            + (g.broadcast_mul(&scalar(w2)?)? * &g)?)?;
        let denom = v
            .sqrt()?
            .broadcast_div(&scalar(bc2_sqrt)?)?
            .broadcast_add(&scalar(eps)?)?;
        let mut p = flat(
            model
                .adapter_tensors()
                .into_iter()
                .map(|(_, t)| t)
                .collect(),
        )?;
        if self.cfg.weight_decay != 0.0 {
            p = p.broadcast_mul(&scalar(decay)?)?;
        }
        let p = (p + (m.broadcast_mul(&scalar(neg_step_size)?)? / &denom)?)?;
        model.set_params_flat_tensor(&p)?;
        self.exp_avg = m;
        self.exp_avg_sq = v;
        Ok(StepReport {
            grad_norm,
            clipped,
            step: self.step,
        })
    }
}
