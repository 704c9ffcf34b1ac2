//! LoRA as Hugging Face PEFT defines it: which modules get adapters, their rank and
//! scaling, PEFT's initialisation, and the adapted linear layer.
//!
//! `y = W x (+ b) + scale · B(A(dropout(x)))`, `scale = alpha / r` (rsLoRA: `alpha / √r`),
//! A `[r, in]` kaiming-uniform(a = √5), B `[out, r]` zeros. The frozen `W` is a plain
//! tensor: it never gets a gradient or optimizer state. Only A and B are [`Var`]s.
//!
//! Deliberately not here: candle-lora's `LoraLinear` (it scales the frozen output too, and
//! its key names and init differ from PEFT's).

use std::fmt;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::ops;

/// A module name PEFT can target in a Llama-family model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TargetModule {
    /// `self_attn.q_proj`
    QProj,
    /// `self_attn.k_proj`
    KProj,
    /// `self_attn.v_proj`
    VProj,
    /// `self_attn.o_proj`
    OProj,
    /// `mlp.gate_proj`
    GateProj,
    /// `mlp.up_proj`
    UpProj,
    /// `mlp.down_proj`
    DownProj,
    /// `lm_head` (tinker's `train_unembed`).
    LmHead,
}

impl TargetModule {
    /// Every target, in the order PEFT docs list them.
    pub const ALL: [TargetModule; 8] = [
        TargetModule::QProj,
        TargetModule::KProj,
        TargetModule::VProj,
        TargetModule::OProj,
        TargetModule::GateProj,
        TargetModule::UpProj,
        TargetModule::DownProj,
        TargetModule::LmHead,
    ];

    /// The module's name as PEFT's `target_modules` spells it.
    pub fn name(self) -> &'static str {
        match self {
            TargetModule::QProj => "q_proj",
            TargetModule::KProj => "k_proj",
            TargetModule::VProj => "v_proj",
            TargetModule::OProj => "o_proj",
            TargetModule::GateProj => "gate_proj",
            TargetModule::UpProj => "up_proj",
            TargetModule::DownProj => "down_proj",
            TargetModule::LmHead => "lm_head",
        }
    }

    /// Parses a `target_modules` entry.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

impl fmt::Display for TargetModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Hyper-parameters of the adapters (PEFT's `LoraConfig`, the fields that matter).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank r.
    pub rank: usize,
    /// lora_alpha.
    pub alpha: f64,
    /// Dropout probability on the adapter's input (training only).
    pub dropout: f64,
    /// rsLoRA scaling alpha/√r instead of alpha/r.
    pub use_rslora: bool,
    /// Adapted modules, sorted and deduplicated.
    pub target_modules: Vec<TargetModule>,
}

impl Default for LoraConfig {
    /// Tinker's defaults: rank 32, alpha 32, all attention, MLP and unembedding modules.
    fn default() -> Self {
        Self::from_tinker(32, true, true, true)
    }
}

impl LoraConfig {
    /// Tinker's toggles: train_attn → q/k/v/o_proj, train_mlp → gate/up/down_proj,
    /// train_unembed → lm_head. Alpha equals the rank (tinker's convention), no dropout.
    pub fn from_tinker(
        rank: usize,
        train_attn: bool,
        train_mlp: bool,
        train_unembed: bool,
    ) -> Self {
        let mut target_modules = Vec::new();
        if train_attn {
            target_modules.extend([
                TargetModule::QProj,
                TargetModule::KProj,
                TargetModule::VProj,
                TargetModule::OProj,
            ]);
        }
        if train_mlp {
            target_modules.extend([
                TargetModule::GateProj,
                TargetModule::UpProj,
                TargetModule::DownProj,
            ]);
        }
        if train_unembed {
            target_modules.push(TargetModule::LmHead);
        }
        LoraConfig {
            rank,
            alpha: rank as f64,
            dropout: 0.0,
            use_rslora: false,
            target_modules,
        }
    }

    /// Builds a config from PEFT-style module names (errors name an unknown module).
    pub fn from_names<S: AsRef<str>>(rank: usize, alpha: f64, names: &[S]) -> Result<Self> {
        let target_modules = names
            .iter()
            .map(|n| {
                TargetModule::from_name(n.as_ref()).ok_or_else(|| {
                    Error::InvalidLoraConfig(format!(
                        "unknown target module {:?} (known: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj lm_head)",
                        n.as_ref()
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let cfg = LoraConfig {
            rank,
            alpha,
            dropout: 0.0,
            use_rslora: false,
            target_modules,
        };
        cfg.validated()
    }

    /// Checks the values and normalises the target list (sorted, no duplicates).
    pub fn validated(mut self) -> Result<Self> {
        if self.rank == 0 {
            return Err(Error::InvalidLoraConfig("rank must be > 0".into()));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::InvalidLoraConfig(format!(
                "alpha must be > 0, got {}",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::InvalidLoraConfig(format!(
                "dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if self.target_modules.is_empty() {
            return Err(Error::InvalidLoraConfig("no target modules".into()));
        }
        self.target_modules.sort();
        self.target_modules.dedup();
        Ok(self)
    }

    /// The factor on B·A: alpha/r, or alpha/√r with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// Whether `module` gets an adapter.
    pub fn targets(&self, module: TargetModule) -> bool {
        self.target_modules.contains(&module)
    }
}

/// One adapter pair on a linear layer.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// PEFT key prefix, e.g. `base_model.model.model.layers.0.self_attn.q_proj`.
    pub prefix: String,
    /// A `[r, in]`, f32.
    pub a: Var,
    /// B `[out, r]`, f32.
    pub b: Var,
    /// alpha/r (or alpha/√r).
    pub scale: f64,
}

impl LoraAdapter {
    /// PEFT's init: A kaiming-uniform(a = √5) i.e. U(−1/√in, 1/√in), B zeros. `seed` and
    /// the prefix together pick A's values, so every rank that uses the same seed builds the
    /// same adapters without communicating.
    pub fn init(
        prefix: String,
        in_dim: usize,
        out_dim: usize,
        cfg: &LoraConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ fnv1a(prefix.as_bytes()));
        let bound = 1.0 / (in_dim as f64).sqrt();
        let a: Vec<f32> = (0..cfg.rank * in_dim)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.rank, in_dim), device)?)?;
        let b = Var::from_tensor(&Tensor::zeros((out_dim, cfg.rank), DType::F32, device)?)?;
        Ok(LoraAdapter {
            prefix,
            a,
            b,
            scale: cfg.scale(),
        })
    }

    /// `base_model.model.<module>.lora_A.weight`
    pub fn key_a(&self) -> String {
        format!("{}.lora_A.weight", self.prefix)
    }

    /// `base_model.model.<module>.lora_B.weight`
    pub fn key_b(&self) -> String {
        format!("{}.lora_B.weight", self.prefix)
    }
}

/// 64-bit FNV-1a: a stable, dependency-free hash for deriving per-module seeds.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A linear layer with a frozen weight (`[out, in]`, HF layout), an optional frozen bias and
/// an optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
    pub(crate) adapter: Option<LoraAdapter>,
}

/// Whether the adapters take part in a forward pass. `Off` gives the frozen base model
/// (the DPO reference policy, or a check that B = 0 changes nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adapters {
    /// Base + adapters.
    On,
    /// Base only.
    Off,
}

impl LoraLinear {
    /// `x [.., in] → [.., out]`. `dropout_mask`, when given, multiplies the adapter's input
    /// (already scaled by 1/(1−p)).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        adapters: Adapters,
        dropout_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        if let (Some(ad), Adapters::On, None) = (&self.adapter, adapters, dropout_mask) {
            let fused = ops::lora_linear_fused(
                x,
                &self.weight,
                self.bias.as_ref(),
                ad.a.as_tensor(),
                ad.b.as_tensor(),
                ad.scale,
            )?;
            if let Some(y) = fused {
                return Ok(y);
            }
        }
        // A half-precision base under f32 activations: the GEMM reads both in the base
        // dtype and returns f32 (mixed precision, see `ops`).
        let mut y = if x.dtype() == DType::F32 && self.weight.dtype() != DType::F32 {
            ops::half_linear(x, &self.weight)?
        } else {
            ops::frozen_linear(x, &self.weight)?
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.to_dtype(y.dtype())?)?;
        }
        if let (Some(ad), Adapters::On) = (&self.adapter, adapters) {
            let xin = match dropout_mask {
                Some(m) => x.broadcast_mul(m)?,
                None => x.clone(),
            };
            let xin = if xin.dtype() == DType::F32 {
                xin
            } else {
                xin.to_dtype(DType::F32)?
            };
            let a_t = ad.a.as_tensor().t()?;
            let b_t = ad.b.as_tensor().t()?;
            let delta = xin.broadcast_matmul(&a_t)?.broadcast_matmul(&b_t)?;
            let delta = (delta * ad.scale)?;
            let delta = if delta.dtype() == y.dtype() {
                delta
            } else {
                delta.to_dtype(y.dtype())?
            };
            y = (y + delta)?;
        }
        Ok(y)
    }
}
