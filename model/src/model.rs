//! The Llama-family decoder with PEFT LoRA adapters: loading, forward, forward+backward.
//!
//! One decoder serves Llama, Mistral, Qwen2 and Qwen3; [`ModelConfig`] carries their
//! differences (q/k/v biases, q/k norms, sliding windows, tied embeddings). The frozen base
//! is plain tensors; only the adapters' A and B are [`candle_core::Var`]s.
//!
//! Training splits the graph at the final hidden state: the trunk (embeddings → decoder
//! layers → final norm) runs under candle's autograd, the head (lm_head + loss) is computed
//! by hand in row chunks (see [`crate::head`]) — it never materialises more than one chunk of
//! full-vocabulary logits and writes the logits' gradient in place — and its gradient on the
//! hidden state is fed back into the trunk with one `backward()` of `Σ h ⊙ ∂L/∂h`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gemv;
use crate::grads::{Gradients, ParamLayout};
use crate::head;
use crate::kv_cache::KvCache;
use crate::lora::{fnv1a, Adapters, LoraAdapter, LoraConfig, LoraLinear, TargetModule};
use crate::loss::{Batch, LossKind, LossOutput};
use crate::ops::{self, AttnMask};
use crate::weights::{Vb, VbPath, WeightFiles};

/// Per-pass settings threaded through the layers.
struct Pass<'a> {
    adapters: Adapters,
    /// Dropout on the adapters' inputs: (p, seed for this pass).
    dropout: Option<(f64, u64)>,
    mask: &'a AttnMask,
    cos: &'a Tensor,
    sin: &'a Tensor,
    batch: usize,
    seq: usize,
}

impl Pass<'_> {
    /// A dropout mask for one adapter input `[n, width]`, or `None` (no dropout).
    fn dropout_mask(
        &self,
        prefix: &str,
        n: usize,
        width: usize,
        device: &Device,
    ) -> Result<Option<Tensor>> {
        let Some((p, seed)) = self.dropout else {
            return Ok(None);
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ fnv1a(prefix.as_bytes()));
        let keep = 1.0 / (1.0 - p) as f32;
        let m: Vec<f32> = (0..n * width)
            .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
            .collect();
        Ok(Some(Tensor::from_vec(m, (n, width), device)?))
    }

    fn linear(&self, l: &LoraLinear, x: &Tensor) -> Result<Tensor> {
        let mask = match (&l.adapter, self.adapters) {
            (Some(a), Adapters::On) => {
                let (n, w) = x.dims2()?;
                self.dropout_mask(&a.prefix, n, w, x.device())?
            }
            _ => None,
        };
        l.forward(x, self.adapters, mask.as_ref())
    }
}

fn linear(
    vb: &VbPath<'_>,
    lora: &LoraConfig,
    target: TargetModule,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    seed: u64,
) -> Result<LoraLinear> {
    let weight = vb.get(&[out_dim, in_dim], "weight")?;
    // Biases and norm weights are tiny: held in f32, the activations' dtype.
    let bias = if bias {
        Some(vb.get(&[out_dim], "bias")?.to_dtype(DType::F32)?)
    } else {
        None
    };
    let adapter = if lora.targets(target) {
        Some(LoraAdapter::init(
            format!("base_model.model.{}", vb.prefix()),
            in_dim,
            out_dim,
            lora,
            seed,
            vb.device(),
        )?)
    } else {
        None
    };
    Ok(LoraLinear {
        weight,
        bias,
        adapter,
    })
}

#[derive(Debug)]
struct Attention {
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    o_proj: LoraLinear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
    window: Option<usize>,
}

impl Attention {
    fn load(
        vb: &VbPath<'_>,
        cfg: &ModelConfig,
        lora: &LoraConfig,
        seed: u64,
        window: Option<usize>,
    ) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (q, kv) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
        let (q_norm, k_norm) = if cfg.qk_norm {
            (
                Some(vb.pp("q_norm").get(&[d], "weight")?.to_dtype(DType::F32)?),
                Some(vb.pp("k_norm").get(&[d], "weight")?.to_dtype(DType::F32)?),
            )
        } else {
            (None, None)
        };
        Ok(Attention {
            q_proj: linear(
                &vb.pp("q_proj"),
                lora,
                TargetModule::QProj,
                h,
                q,
                cfg.qkv_bias,
                seed,
            )?,
            k_proj: linear(
                &vb.pp("k_proj"),
                lora,
                TargetModule::KProj,
                h,
                kv,
                cfg.qkv_bias,
                seed,
            )?,
            v_proj: linear(
                &vb.pp("v_proj"),
                lora,
                TargetModule::VProj,
                h,
                kv,
                cfg.qkv_bias,
                seed,
            )?,
            o_proj: linear(
                &vb.pp("o_proj"),
                lora,
                TargetModule::OProj,
                q,
                h,
                cfg.o_bias,
                seed,
            )?,
            q_norm,
            k_norm,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: d,
            eps: cfg.rms_norm_eps,
            window,
        })
    }

    /// `x [N, hidden]` → `[N, hidden]`.
    fn forward(&self, x: &Tensor, pass: &Pass<'_>) -> Result<Tensor> {
        let q = pass.linear(&self.q_proj, x)?;
        let k = pass.linear(&self.k_proj, x)?;
        let v = pass.linear(&self.v_proj, x)?;
        let o = self.core(q, k, v, pass)?;
        pass.linear(&self.o_proj, &o)
    }

    /// Attention between the projections: q/k norms, RoPE, softmax(q·kᵀ)·v.
    /// `q [N, heads·d]`, `k`, `v [N, kv_heads·d]` → `[N, heads·d]`.
    fn core(&self, mut q: Tensor, mut k: Tensor, v: Tensor, pass: &Pass<'_>) -> Result<Tensor> {
        let (b, t, d) = (pass.batch, pass.seq, self.head_dim);
        let n = b * t;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = ops::rms_norm(&q.reshape((n * self.heads, d))?, qn, self.eps)?;
            k = ops::rms_norm(&k.reshape((n * self.kv_heads, d))?, kn, self.eps)?;
        }
        let mask = AttnMask {
            window: self.window,
            ..pass.mask.clone()
        };
        let scale = 1.0 / (d as f64).sqrt();
        // Half-precision attention GEMMs under a half-precision base (see `ops::attention_block`).
        let tf32 = self.o_proj.weight.dtype() != DType::F32;
        // One op from the projections to the output (see `ops::attention_block`).
        if let Some(o) = ops::attention_block(
            &q.reshape((n, self.heads * d))?,
            &k.reshape((n, self.kv_heads * d))?,
            &v,
            (pass.cos, pass.sin),
            (b, t, self.heads, self.kv_heads, d),
            scale,
            &mask,
            tf32,
        )? {
            return Ok(o);
        }
        let q = q
            .reshape((b, t, self.heads, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let k = k
            .reshape((b, t, self.kv_heads, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = v
            .reshape((b, t, self.kv_heads, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = ops::rope(&q, pass.cos, pass.sin)?;
        let k = ops::rope(&k, pass.cos, pass.sin)?;
        // Grouped-query attention without copying k/v: the query heads that share a kv head
        // are stacked along the rows, [B, kv, rep·T, d] · [B, kv, d, T].
        let rep = self.heads / self.kv_heads;
        let q = q.reshape((b, self.kv_heads, rep * t, d))?;
        let o = ops::attention_probs(&q, &k, scale, &mask)?.matmul(&v)?;
        Ok(o.reshape((b, self.heads, t, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n, self.heads * d))?)
    }

    /// Incremental attention: the `t = pass.seq` new positions of every row attend the
    /// cached keys plus themselves; their k and v are written into the cache at slots
    /// `len..len + t`. `x [B·t, hidden]` → `[B·t, hidden]`. RoPE positions are per row
    /// (`pass.cos`/`pass.sin` are `[B·t, d/2]`), so the same RoPE op as the full forward is
    /// applied with the batch and time folded into one axis.
    fn forward_cached(
        &self,
        x: &Tensor,
        pass: &Pass<'_>,
        mask: &Tensor,
        kv: &mut (Tensor, Tensor),
        len: usize,
    ) -> Result<Tensor> {
        let (b, t, d) = (pass.batch, pass.seq, self.head_dim);
        let n = b * t;
        let mut q = gemv::linear(&self.q_proj, x, pass.adapters)?;
        let mut k = gemv::linear(&self.k_proj, x, pass.adapters)?;
        let v = gemv::linear(&self.v_proj, x, pass.adapters)?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = ops::rms_norm(&q.reshape((n * self.heads, d))?, qn, self.eps)?;
            k = ops::rms_norm(&k.reshape((n * self.kv_heads, d))?, kn, self.eps)?;
        }
        // [n, heads, d] → [heads, n, d]: rope's table row is the (row, slot) index.
        let rope = |x: Tensor, heads: usize| -> Result<Tensor> {
            let x = x.reshape((n, heads, d))?.transpose(0, 1)?.contiguous()?;
            let x = ops::rope(&x, pass.cos, pass.sin)?;
            Ok(x.reshape((heads, b, t, d))?
                .transpose(0, 1)?
                .contiguous()?
                .detach())
        };
        let q = rope(q, self.heads)?;
        let k = rope(k, self.kv_heads)?;
        let v = v
            .reshape((b, t, self.kv_heads, d))?
            .transpose(1, 2)?
            .contiguous()?
            .detach();
        kv.0.slice_set(&k, 2, len)?;
        kv.1.slice_set(&v, 2, len)?;
        let s = len + t;
        let keys = kv.0.narrow(2, 0, s)?;
        let values = kv.1.narrow(2, 0, s)?;
        let rep = self.heads / self.kv_heads;
        let q = q.reshape((b, self.kv_heads, rep * t, d))?;
        let scores = (q.matmul(&keys.t()?)? * (1.0 / (d as f64).sqrt()))?
            .to_dtype(DType::F32)?
            .reshape((b, self.heads, t, s))?
            .broadcast_add(mask)?;
        let p = candle_nn::ops::softmax_last_dim(&scores)?
            .to_dtype(values.dtype())?
            .reshape((b, self.kv_heads, rep * t, s))?;
        let o = p.matmul(&values)?;
        let o = o
            .reshape((b, self.heads, t, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n, self.heads * d))?;
        gemv::linear(&self.o_proj, &o, pass.adapters)
    }
}

#[derive(Debug)]
struct Mlp {
    gate_proj: LoraLinear,
    up_proj: LoraLinear,
    down_proj: LoraLinear,
}

impl Mlp {
    fn load(vb: &VbPath<'_>, cfg: &ModelConfig, lora: &LoraConfig, seed: u64) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Mlp {
            gate_proj: linear(
                &vb.pp("gate_proj"),
                lora,
                TargetModule::GateProj,
                h,
                i,
                cfg.mlp_bias,
                seed,
            )?,
            up_proj: linear(
                &vb.pp("up_proj"),
                lora,
                TargetModule::UpProj,
                h,
                i,
                cfg.mlp_bias,
                seed,
            )?,
            down_proj: linear(
                &vb.pp("down_proj"),
                lora,
                TargetModule::DownProj,
                i,
                h,
                cfg.mlp_bias,
                seed,
            )?,
        })
    }

    fn forward(&self, x: &Tensor, pass: &Pass<'_>) -> Result<Tensor> {
        let g = pass.linear(&self.gate_proj, x)?;
        let u = pass.linear(&self.up_proj, x)?;
        pass.linear(&self.down_proj, &ops::swiglu(&g, &u)?)
    }

    /// [`Mlp::forward`] for the few rows of a decoding step (see [`crate::gemv`]).
    fn forward_few(&self, x: &Tensor, adapters: Adapters) -> Result<Tensor> {
        let g = gemv::linear(&self.gate_proj, x, adapters)?;
        let u = gemv::linear(&self.up_proj, x, adapters)?;
        gemv::linear(&self.down_proj, &ops::swiglu(&g, &u)?, adapters)
    }
}

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
    eps: f64,
}

impl DecoderLayer {
    fn load(
        vb: &VbPath<'_>,
        cfg: &ModelConfig,
        lora: &LoraConfig,
        seed: u64,
        window: Option<usize>,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(DecoderLayer {
            input_layernorm: vb
                .pp("input_layernorm")
                .get(&[h], "weight")?
                .to_dtype(DType::F32)?,
            self_attn: Attention::load(&vb.pp("self_attn"), cfg, lora, seed, window)?,
            post_attention_layernorm: vb
                .pp("post_attention_layernorm")
                .get(&[h], "weight")?
                .to_dtype(DType::F32)?,
            mlp: Mlp::load(&vb.pp("mlp"), cfg, lora, seed)?,
            eps: cfg.rms_norm_eps,
        })
    }

    fn forward(&self, x: &Tensor, pass: &Pass<'_>) -> Result<Tensor> {
        let h = ops::rms_norm(x, &self.input_layernorm, self.eps)?;
        let x = (x + self.self_attn.forward(&h, pass)?)?;
        let h = ops::rms_norm(&x, &self.post_attention_layernorm, self.eps)?;
        Ok((&x + self.mlp.forward(&h, pass)?)?)
    }

    /// [`DecoderLayer::forward`] through the kv cache (see [`Attention::forward_cached`]).
    fn forward_cached(
        &self,
        x: &Tensor,
        pass: &Pass<'_>,
        mask: &Tensor,
        kv: &mut (Tensor, Tensor),
        len: usize,
    ) -> Result<Tensor> {
        let h = ops::rms_norm(x, &self.input_layernorm, self.eps)?;
        let x = (x + self.self_attn.forward_cached(&h, pass, mask, kv, len)?)?;
        let h = ops::rms_norm(&x, &self.post_attention_layernorm, self.eps)?;
        // Detached: sampling never differentiates, so no layer keeps the one before alive.
        Ok((&x + self.mlp.forward_few(&h, pass.adapters)?)?.detach())
    }

    fn linears(&self) -> [&LoraLinear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }
}

/// A base model with LoRA adapters on it.
#[derive(Debug)]
pub struct LoraModel {
    cfg: ModelConfig,
    lora: LoraConfig,
    model_dir: PathBuf,
    device: Device,
    dtype: DType,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: LoraLinear,
    inv_freq: Vec<f32>,
    layout: ParamLayout,
    /// `(key, var)` in layout order.
    params: Vec<(String, Var)>,
    seed: u64,
    /// Counts forward_backward calls, so every pass draws fresh dropout masks.
    passes: AtomicU64,
    /// Recompute each decoder layer in the backward pass (see
    /// [`LoraModel::set_activation_checkpointing`]).
    checkpointing: AtomicBool,
}

/// Drops the gradient candle computes for the constant factor `seed` of a `Σ y ⊙ seed`
/// surrogate: it is `y` times the incoming gradient, a tensor that still references `y`
/// and so keeps `y`'s whole forward graph alive for as long as the store lives (with
/// activation checkpointing, every recomputed layer's activations at once).
fn forget_seed(store: &mut GradStore, seed: &Tensor) {
    store.remove(seed);
}

/// What a checkpointed forward keeps for the backward: each decoder layer's input, the
/// last layer's output (as the variable the final norm was applied to), and the pass's
/// RoPE tables and mask.
struct Checkpoints {
    inputs: Vec<Tensor>,
    last: Var,
    cos: Tensor,
    sin: Tensor,
    mask: AttnMask,
    batch: usize,
    seq: usize,
}

impl LoraModel {
    /// Loads the base model in `model_dir` (config.json + safetensors) in `dtype` on `device`
    /// and puts freshly initialised adapters (PEFT's init, seeded by `seed`) on it.
    pub fn load(
        model_dir: &Path,
        lora: &LoraConfig,
        device: &Device,
        dtype: DType,
        seed: u64,
    ) -> Result<Self> {
        let cfg = ModelConfig::from_file(model_dir.join("config.json"))?;
        Self::load_with_config(model_dir, cfg, lora, device, dtype, seed)
    }

    /// Like [`LoraModel::load`] with an already parsed config.
    pub fn load_with_config(
        model_dir: &Path,
        cfg: ModelConfig,
        lora: &LoraConfig,
        device: &Device,
        dtype: DType,
        seed: u64,
    ) -> Result<Self> {
        if device.is_cpu() && dtype != DType::F32 {
            return Err(Error::Unsupported(format!(
                "compute dtype {dtype:?} on the CPU: candle's CPU matmul widens half-precision \
                 operands to f32 and rounds back, slower and less exact than f32 (use f32)"
            )));
        }
        check_dtype(dtype)?;
        let files = WeightFiles::open(model_dir)?;
        Self::build(&files, model_dir, cfg, lora, device, dtype, seed)
    }

    /// A model on the given base tensors (HF names, any float dtype), converted to `dtype`
    /// on `device`, with freshly initialised adapters: what the mixed-precision tests and
    /// the GPU check use to run one set of weights in two compute dtypes without a file.
    pub fn from_tensors(
        tensors: Vec<(String, Tensor)>,
        cfg: &ModelConfig,
        lora: &LoraConfig,
        device: &Device,
        dtype: DType,
        lora_seed: u64,
    ) -> Result<Self> {
        check_dtype(dtype)?;
        let files = WeightFiles::from_tensors(tensors)?;
        Self::build(
            &files,
            Path::new("<memory>"),
            cfg.clone(),
            lora,
            device,
            dtype,
            lora_seed,
        )
    }

    /// A model with random base weights (transformers' init, see [`crate::preset`]) built
    /// in memory, with no file: what benchmarks train on.
    pub fn random(
        cfg: &ModelConfig,
        lora: &LoraConfig,
        device: &Device,
        base_seed: u64,
        lora_seed: u64,
    ) -> Result<Self> {
        let files = WeightFiles::from_tensors(crate::preset::random_tensors(cfg, base_seed)?)?;
        Self::build(
            &files,
            Path::new("<random>"),
            cfg.clone(),
            lora,
            device,
            DType::F32,
            lora_seed,
        )
    }

    fn build(
        files: &WeightFiles,
        model_dir: &Path,
        cfg: ModelConfig,
        lora: &LoraConfig,
        device: &Device,
        dtype: DType,
        seed: u64,
    ) -> Result<Self> {
        let lora = lora.clone().validated()?;
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = device {
            crate::cuda::keep_pool(d)?;
        }
        let root = Vb {
            files,
            dtype,
            device,
        }
        .root();
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed_tokens = root.pp("model.embed_tokens").get(&[v, h], "weight")?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let window = cfg.sliding_windows.get(i).copied().flatten();
            layers.push(DecoderLayer::load(
                &root.pp("model.layers").pp(i),
                &cfg,
                &lora,
                seed,
                window,
            )?);
        }
        let norm = root
            .pp("model.norm")
            .get(&[h], "weight")?
            .to_dtype(DType::F32)?;
        let lm_head = if cfg.tie_word_embeddings {
            // Some tied checkpoints also store lm_head.weight; the tie decides.
            files.skip("lm_head.weight");
            let adapter = if lora.targets(TargetModule::LmHead) {
                Some(LoraAdapter::init(
                    "base_model.model.lm_head".into(),
                    h,
                    v,
                    &lora,
                    seed,
                    device,
                )?)
            } else {
                None
            };
            LoraLinear {
                weight: embed_tokens.clone(),
                bias: None,
                adapter,
            }
        } else {
            linear(
                &root.pp("lm_head"),
                &lora,
                TargetModule::LmHead,
                h,
                v,
                false,
                seed,
            )?
        };
        files.check_all_taken()?;

        let mut params = Vec::new();
        let all = layers
            .iter()
            .flat_map(|l| l.linears())
            .chain(std::iter::once(&lm_head));
        for l in all {
            if let Some(a) = &l.adapter {
                params.push((a.key_a(), a.a.clone()));
                params.push((a.key_b(), a.b.clone()));
            }
        }
        params.sort_by(|x, y| x.0.cmp(&y.0));
        let layout = ParamLayout::new(
            params
                .iter()
                .map(|(k, v)| (k.clone(), v.dims().to_vec()))
                .collect(),
        )?;
        let inv_freq = cfg.rope_inv_freq();
        Ok(LoraModel {
            cfg,
            lora,
            model_dir: model_dir.to_path_buf(),
            device: device.clone(),
            dtype,
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            layout,
            params,
            seed,
            passes: AtomicU64::new(0),
            checkpointing: AtomicBool::new(false),
        })
    }

    /// Activation checkpointing: [`LoraModel::forward_backward`] keeps only each decoder
    /// layer's input in the forward pass and recomputes the layer's activations, one layer
    /// at a time, in the backward. The gradients are the same (the recomputation runs the
    /// same kernels on the same inputs); activation memory drops from every layer's
    /// intermediates to one layer's plus a `[tokens, hidden]` tensor per layer, for about
    /// one more forward pass of compute. Off by default.
    pub fn set_activation_checkpointing(&self, on: bool) {
        self.checkpointing.store(on, Ordering::Relaxed);
    }

    /// Whether activation checkpointing is on (see
    /// [`LoraModel::set_activation_checkpointing`]).
    pub fn activation_checkpointing(&self) -> bool {
        self.checkpointing.load(Ordering::Relaxed)
    }

    /// The base model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The adapters' config.
    pub fn lora_config(&self) -> &LoraConfig {
        &self.lora
    }

    /// The folder the base model was loaded from.
    pub fn model_dir(&self) -> &Path {
        &self.model_dir
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype of the base.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The adapter parameters' keys and shapes, sorted by PEFT key.
    pub fn param_layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// The adapter tensors (current values) in layout order.
    pub fn adapter_tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect()
    }

    /// The adapter parameters as one flat f32 buffer in layout order.
    pub fn params_flat(&self) -> Result<Vec<f32>> {
        self.layout.flatten(&self.adapter_tensors())
    }

    /// Overwrites the adapter parameters from a flat buffer in layout order.
    pub fn set_params_flat(&self, flat: &[f32]) -> Result<()> {
        let tensors = self.layout.unflatten(flat, &self.device)?;
        for ((_, var), (_, t)) in self.params.iter().zip(tensors) {
            var.set(&t)?;
        }
        Ok(())
    }

    /// Overwrites the adapter parameters from one flat f32 tensor in layout order (on any
    /// device; copied into the parameters, no host round trip when it is on the model's).
    pub fn set_params_flat_tensor(&self, flat: &Tensor) -> Result<()> {
        if flat.elem_count() != self.layout.numel() {
            return Err(Error::ParamMismatch(format!(
                "flat tensor has {} values, the layout needs {}",
                flat.elem_count(),
                self.layout.numel()
            )));
        }
        let flat = flat
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_device(&self.device)?;
        let mut off = 0;
        for ((_, var), (_, shape)) in self.params.iter().zip(self.layout.entries()) {
            let n: usize = shape.iter().product();
            var.set(&flat.narrow(0, off, n)?.reshape(shape.as_slice())?)?;
            off += n;
        }
        Ok(())
    }

    /// Overwrites the adapter parameters from named tensors that follow the layout.
    pub fn set_adapter_tensors(&self, tensors: &[(String, Tensor)]) -> Result<()> {
        self.layout.check(tensors)?;
        for ((_, var), (_, t)) in self.params.iter().zip(tensors) {
            let t = t.to_dtype(DType::F32)?.to_device(&self.device)?;
            var.set(&t)?;
        }
        Ok(())
    }

    /// Training passes ([`LoraModel::forward_backward`] calls) so far. Each pass numbers its
    /// dropout masks, so a checkpoint stores this and a resumed run restores it with
    /// [`LoraModel::set_passes`] to draw exactly the masks an uninterrupted run would.
    pub fn passes(&self) -> u64 {
        self.passes.load(Ordering::Relaxed)
    }

    /// Sets the pass counter (see [`LoraModel::passes`]).
    pub fn set_passes(&self, passes: u64) {
        self.passes.store(passes, Ordering::Relaxed);
    }

    /// A 64-bit fingerprint of the adapter bits (FNV-1a over the flat buffer): equal on
    /// every rank after every step, or something diverged.
    pub fn params_fingerprint(&self) -> Result<u64> {
        let flat = self.params_flat()?;
        let mut bytes = Vec::with_capacity(flat.len() * 4);
        for v in flat {
            bytes.extend_from_slice(&v.to_bits().to_le_bytes());
        }
        Ok(fnv1a(&bytes))
    }

    /// RoPE tables `[t, d/2]` in f32, as transformers computes them (positions 0..t).
    fn rope_tables(&self, t: usize) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in 0..t {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (t, half), &self.device)?,
            Tensor::from_vec(sin, (t, half), &self.device)?,
        ))
    }

    fn check_ids(&self, ids: &Tensor) -> Result<(usize, usize)> {
        let (b, t) = ids.dims2().map_err(|_| {
            Error::InvalidBatch(format!(
                "input_ids must be [B, T], got shape {:?}",
                ids.dims()
            ))
        })?;
        if ids.dtype() != DType::U32 {
            return Err(Error::InvalidBatch(format!(
                "input_ids must be u32, got {:?}",
                ids.dtype()
            )));
        }
        let v = self.cfg.vocab_size as u32;
        let max = ids.flatten_all()?.to_vec1::<u32>()?.into_iter().max();
        if let Some(m) = max.filter(|&m| m >= v) {
            return Err(Error::InvalidBatch(format!(
                "token id {m} is outside the vocabulary (size {v})"
            )));
        }
        Ok((b, t))
    }

    /// The trunk's start for `ids [B, T]`: the embeddings `[B·T, hidden]` in f32 (the residual
    /// stream is f32 whatever the base dtype, see `ops`) and the RoPE tables for `T`.
    fn embed(&self, ids: &Tensor) -> Result<(Tensor, (Tensor, Tensor))> {
        let (_, t) = ids.dims2()?;
        let x = self
            .embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .to_dtype(DType::F32)?;
        Ok((x, self.rope_tables(t)?))
    }

    /// The trunk: embeddings, decoder layers, final norm. Returns `[B·T, hidden]`.
    fn trunk(
        &self,
        ids: &Tensor,
        key_valid: Option<Arc<Vec<u8>>>,
        adapters: Adapters,
        dropout: Option<(f64, u64)>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let (mut x, (cos, sin)) = self.embed(ids)?;
        let mask = AttnMask {
            t,
            window: None,
            key_valid,
        };
        let pass = Pass {
            adapters,
            dropout,
            mask: &mask,
            cos: &cos,
            sin: &sin,
            batch: b,
            seq: t,
        };
        for layer in &self.layers {
            x = layer.forward(&x, &pass)?;
        }
        ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)
    }

    /// [`LoraModel::trunk`] for activation checkpointing: the layers run one by one with
    /// their graphs dropped as soon as each output exists; only the layer inputs are kept.
    /// The returned `[B·T, hidden]` is the final norm applied to a variable holding the
    /// last layer's output, so the backward can start there.
    fn trunk_checkpointed(
        &self,
        ids: &Tensor,
        dropout: Option<(f64, u64)>,
    ) -> Result<(Tensor, Checkpoints)> {
        let (b, t) = ids.dims2()?;
        let (mut x, (cos, sin)) = self.embed(ids)?;
        let mask = AttnMask {
            t,
            window: None,
            key_valid: None,
        };
        let mut inputs = Vec::with_capacity(self.layers.len());
        {
            let pass = Pass {
                adapters: Adapters::On,
                dropout,
                mask: &mask,
                cos: &cos,
                sin: &sin,
                batch: b,
                seq: t,
            };
            for layer in &self.layers {
                let y = layer.forward(&x, &pass)?.detach();
                inputs.push(std::mem::replace(&mut x, y));
            }
        }
        let last = Var::from_tensor(&x)?;
        let h = ops::rms_norm(last.as_tensor(), &self.norm, self.cfg.rms_norm_eps)?;
        Ok((
            h,
            Checkpoints {
                inputs,
                last,
                cos,
                sin,
                mask,
                batch: b,
                seq: t,
            },
        ))
    }

    /// The backward of [`LoraModel::trunk_checkpointed`] for the gradient `grad_h` of its
    /// output: through the final norm, then layer by layer from the last, each layer's
    /// forward recomputed from its saved input. One gradient store per stage, holding that
    /// stage's adapter gradients.
    fn backward_checkpointed(
        &self,
        c: Checkpoints,
        h: &Tensor,
        grad_h: &Tensor,
        dropout: Option<(f64, u64)>,
    ) -> Result<Vec<GradStore>> {
        let pass = Pass {
            adapters: Adapters::On,
            dropout,
            mask: &c.mask,
            cos: &c.cos,
            sin: &c.sin,
            batch: c.batch,
            seq: c.seq,
        };
        let mut stores = Vec::with_capacity(self.layers.len() + 1);
        let mut store = (h * grad_h)?.sum_all()?.backward()?;
        forget_seed(&mut store, grad_h);
        let mut g = store.remove(c.last.as_tensor());
        stores.push(store);
        // Each input is dropped once its layer is done.
        for (i, (layer, x)) in self.layers.iter().zip(c.inputs).enumerate().rev() {
            // No gradient reaches this layer's output: nothing before it gets one either.
            let Some(gy) = g.take() else { break };
            // The embeddings are frozen: the first layer's input needs no gradient (as in
            // the plain trunk, where it is not a variable).
            let var = if i > 0 {
                Some(Var::from_tensor(&x)?)
            } else {
                None
            };
            let y = layer.forward(var.as_ref().map_or(&x, |v| v.as_tensor()), &pass)?;
            let mut store = (&y * &gy)?.sum_all()?.backward()?;
            forget_seed(&mut store, &gy);
            g = var.and_then(|v| store.remove(v.as_tensor()));
            stores.push(store);
        }
        Ok(stores)
    }

    /// Logits `[B, T, vocab]` for `input_ids [B, T]` (u32) with the adapters on.
    /// `attention_mask [B, T]` (any dtype, nonzero = real token) hides padding keys.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_with(input_ids, attention_mask, Adapters::On)
    }

    /// [`LoraModel::forward`] with the adapters on or off.
    pub fn forward_with(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        adapters: Adapters,
    ) -> Result<Tensor> {
        let (b, t) = self.check_ids(input_ids)?;
        let key_valid = match attention_mask {
            None => None,
            Some(m) => {
                if m.dims() != [b, t] {
                    return Err(Error::InvalidBatch(format!(
                        "attention_mask has shape {:?}, input_ids {:?}",
                        m.dims(),
                        [b, t]
                    )));
                }
                let v = m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                Some(Arc::new(
                    v.into_iter()
                        .map(|x| u8::from(x != 0.0))
                        .collect::<Vec<u8>>(),
                ))
            }
        };
        let h = self.trunk(input_ids, key_valid, adapters, None)?.detach();
        let logits = self.lm_head.forward(&h, adapters, None)?;
        Ok(logits.reshape((b, t, self.cfg.vocab_size))?)
    }

    /// Per-token logprobs of a batch's targets and the loss, without gradients (the DPO
    /// reference pass uses [`Adapters::Off`]).
    pub fn logprobs(
        &self,
        batch: &Batch,
        kind: LossKind,
        adapters: Adapters,
    ) -> Result<LossOutput> {
        batch.check_vocab(self.cfg.vocab_size)?;
        if batch.rows() == 0 || batch.seq() == 0 {
            return Ok(empty_output(kind, batch));
        }
        let ids = batch.input_tensor(&self.device)?;
        let h = self.trunk(&ids, None, adapters, None)?.detach();
        let out = head::run(&h, &self.lm_head, batch, kind, adapters, false)?;
        Ok(out.loss)
    }

    /// tinker's forward_backward: the loss over a batch and the gradient of the loss *sum*
    /// with respect to every adapter tensor (divide by the global weight sum for the mean).
    /// Right padding (and weight 0 on it) keeps padding out of every real token's numbers.
    pub fn forward_backward(
        &self,
        batch: &Batch,
        kind: LossKind,
    ) -> Result<(LossOutput, Gradients)> {
        batch.check_vocab(self.cfg.vocab_size)?;
        if batch.rows() == 0 || batch.seq() == 0 {
            let zeros = self
                .layout
                .entries()
                .iter()
                .map(|(k, s)| {
                    Ok((
                        k.clone(),
                        Tensor::zeros(s.as_slice(), DType::F32, &self.device)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            return Ok((
                empty_output(kind, batch),
                Gradients::new(self.layout.clone(), zeros)?,
            ));
        }
        let pass_no = self.passes.fetch_add(1, Ordering::Relaxed);
        let dropout = (self.lora.dropout > 0.0).then(|| {
            (
                self.lora.dropout,
                self.seed ^ pass_no.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            )
        });
        let ids = batch.input_tensor(&self.device)?;
        let prof = std::env::var_os("RINGTUNE_PROFILE").is_some();
        let sync = || -> Result<()> {
            if prof {
                self.device.synchronize()?;
            }
            Ok(())
        };
        let t0 = std::time::Instant::now();
        let phase = |name| crate::prof::span(name, crate::prof::Kind::Phase, &self.device);
        let fwd_span = phase("trunk forward");
        let (h, checkpoints) = if self.activation_checkpointing() {
            let (h, c) = self.trunk_checkpointed(&ids, dropout)?;
            (h, Some(c))
        } else {
            (self.trunk(&ids, None, Adapters::On, dropout)?, None)
        };
        drop(fwd_span);
        sync()?;
        let t1 = std::time::Instant::now();
        let hd = h.detach();
        let head_span = phase("head");
        let out = head::run(&hd, &self.lm_head, batch, kind, Adapters::On, true)?;
        drop(head_span);
        sync()?;
        let t2 = std::time::Instant::now();
        let bwd_span = phase("trunk backward");
        let grad_h = out
            .grad_h
            .ok_or_else(|| Error::Unsupported("head returned no gradient".into()))?;

        let grad_h = grad_h.to_dtype(h.dtype())?;
        let stores = match (h.track_op(), checkpoints) {
            (false, _) => Vec::new(),
            (true, Some(c)) => self.backward_checkpointed(c, &h, &grad_h, dropout)?,
            // d/dh Σ h ⊙ G = G: one backward carries the head's gradient through the trunk.
            (true, None) => {
                let mut store = (&h * &grad_h)?.sum_all()?.backward()?;
                forget_seed(&mut store, &grad_h);
                vec![store]
            }
        };
        drop(bwd_span);
        if prof {
            sync()?;
            let t3 = std::time::Instant::now();
            eprintln!(
                "profile: trunk fwd {:.3}s head {:.3}s trunk bwd {:.3}s",
                (t1 - t0).as_secs_f64(),
                (t2 - t1).as_secs_f64(),
                (t3 - t2).as_secs_f64()
            );
        }
        let mut tensors = Vec::with_capacity(self.params.len());
        for (key, var) in &self.params {
            let g = match (&out.lm_head_grads, key) {
                (Some((ga, _)), k)
                    if k.starts_with("base_model.model.lm_head.")
                        && k.ends_with("lora_A.weight") =>
                {
                    ga.clone()
                }
                (Some((_, gb)), k)
                    if k.starts_with("base_model.model.lm_head.")
                        && k.ends_with("lora_B.weight") =>
                {
                    gb.clone()
                }
                _ => match stores.iter().find_map(|s| s.get(var.as_tensor())) {
                    Some(g) => g.to_dtype(DType::F32)?,
                    // Not on the path to the loss (e.g. a layer after every weighted token):
                    // its gradient is exactly zero.
                    None => var.as_tensor().zeros_like()?,
                },
            };
            tensors.push((key.clone(), g));
        }
        Ok((out.loss, Gradients::new(self.layout.clone(), tensors)?))
    }
}

/// One op's time in [`LoraModel::profile_ops`]: milliseconds for its forward and for its
/// backward (the gradient of its inputs and adapters), and how often a step runs it.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct OpTime {
    pub name: String,
    pub per_step: usize,
    pub fwd_ms: f64,
    pub bwd_ms: f64,
}

/// [`LoraModel::profile_ops`] as a markdown table: each op's forward and backward, and its
/// share of a step (ms × how often a step runs it), with their sum last.
#[doc(hidden)]
pub fn ops_table(ops: &[OpTime]) -> String {
    let mut out =
        String::from("| op | fwd ms | bwd ms | per step | ms per step |\n|---|---|---|---|---|\n");
    let mut sum = 0.0;
    for o in ops {
        let per = (o.fwd_ms + o.bwd_ms) * o.per_step as f64;
        sum += per;
        out += &format!(
            "| {} | {:.3} | {:.3} | {} | {:.1} |\n",
            o.name, o.fwd_ms, o.bwd_ms, o.per_step, per
        );
    }
    out + &format!("| sum of the ops x per step | | | | {sum:.1} |\n")
}

/// Op-by-op profiling (for `gpu_check --ops` and `bench train --ops`; not a stable API).
impl LoraModel {
    /// Times each op of the first decoder layer on its own, at `batch`'s shape, with the
    /// device synchronised around every forward and backward (median of `reps`), plus a
    /// whole layer, the head and a whole step. Inputs are random; only the times matter.
    #[doc(hidden)]
    pub fn profile_ops(&self, batch: &Batch, kind: LossKind, reps: usize) -> Result<Vec<OpTime>> {
        let (b, t) = (batch.rows(), batch.seq());
        let n = b * t;
        let dev = &self.device;
        let layer = &self.layers[0];
        let (attn, mlp) = (&layer.self_attn, &layer.mlp);
        let (cos, sin) = self.rope_tables(t)?;
        let mask = AttnMask {
            t,
            window: None,
            key_valid: None,
        };
        let pass = Pass {
            adapters: Adapters::On,
            dropout: None,
            mask: &mask,
            cos: &cos,
            sin: &sin,
            batch: b,
            seq: t,
        };
        let var = |width: usize| -> Result<Var> {
            Ok(Var::from_tensor(&Tensor::randn(
                0f32,
                1f32,
                (n, width),
                dev,
            )?)?)
        };
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let time =
            |name: &str, per_step: usize, f: &dyn Fn() -> Result<Tensor>| -> Result<OpTime> {
                let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
                for rep in 0..=reps {
                    dev.synchronize()?;
                    let t0 = std::time::Instant::now();
                    let y = f()?;
                    dev.synchronize()?;
                    let t1 = std::time::Instant::now();
                    let gy = Tensor::randn(0f32, 1f32, y.shape(), dev)?.to_dtype(y.dtype())?;
                    // The surrogate Σ y ⊙ gy is built outside the timed region (its reduction
                    // is not part of the op); its backward hands the op exactly gy.
                    let surrogate = (&y * &gy)?.sum_all()?;
                    dev.synchronize()?;
                    let t2 = std::time::Instant::now();
                    let grads = surrogate.backward()?;
                    dev.synchronize()?;
                    let t3 = std::time::Instant::now();
                    drop(grads);
                    if rep > 0 {
                        fwd.push((t1 - t0).as_secs_f64() * 1e3);
                        bwd.push((t3 - t2).as_secs_f64() * 1e3);
                    }
                }
                Ok(OpTime {
                    name: name.to_string(),
                    per_step,
                    fwd_ms: median(fwd),
                    bwd_ms: median(bwd),
                })
            };
        let cfg = &self.cfg;
        let layers = self.layers.len();
        let (hd, q_w, kv_w) = (
            cfg.hidden_size,
            attn.heads * attn.head_dim,
            attn.kv_heads * attn.head_dim,
        );
        let x = var(hd)?;
        let x2 = var(hd)?;
        let xq = var(q_w)?;
        let (xk, xv) = (var(kv_w)?, var(kv_w)?);
        let xi = var(cfg.intermediate_size)?;
        let xu = var(cfg.intermediate_size)?;
        let mut out = vec![
            time("rms_norm", 2 * layers + 1, &|| {
                ops::rms_norm(x.as_tensor(), &layer.input_layernorm, layer.eps)
            })?,
            time("q_proj", layers, &|| {
                pass.linear(&attn.q_proj, x.as_tensor())
            })?,
            time("k_proj", layers, &|| {
                pass.linear(&attn.k_proj, x.as_tensor())
            })?,
            time("v_proj", layers, &|| {
                pass.linear(&attn.v_proj, x.as_tensor())
            })?,
            time("attention core", layers, &|| {
                attn.core(
                    xq.as_tensor().clone(),
                    xk.as_tensor().clone(),
                    xv.as_tensor().clone(),
                    &pass,
                )
            })?,
            time("o_proj", layers, &|| {
                pass.linear(&attn.o_proj, xq.as_tensor())
            })?,
            time("gate_proj", layers, &|| {
                pass.linear(&mlp.gate_proj, x.as_tensor())
            })?,
            time("up_proj", layers, &|| {
                pass.linear(&mlp.up_proj, x.as_tensor())
            })?,
            time("swiglu", layers, &|| {
                ops::swiglu(xi.as_tensor(), xu.as_tensor())
            })?,
            time("down_proj", layers, &|| {
                pass.linear(&mlp.down_proj, xi.as_tensor())
            })?,
            time("residual add", 2 * layers, &|| {
                Ok((x.as_tensor() + x2.as_tensor())?)
            })?,
            time("decoder layer (whole)", 0, &|| {
                layer.forward(x.as_tensor(), &pass)
            })?,
        ];
        // Timed as one forward: the head computes its own gradient in its forward, and a
        // whole step is forward_backward.
        let whole = |name: &str, per_step: usize, f: &dyn Fn() -> Result<()>| -> Result<OpTime> {
            let mut ms = Vec::new();
            for rep in 0..=reps {
                dev.synchronize()?;
                let t0 = std::time::Instant::now();
                f()?;
                dev.synchronize()?;
                if rep > 0 {
                    ms.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            Ok(OpTime {
                name: name.to_string(),
                per_step,
                fwd_ms: median(ms),
                bwd_ms: 0.0,
            })
        };
        out.push(whole("head (loss + its gradient)", 1, &|| {
            head::run(
                &x.as_tensor().detach(),
                &self.lm_head,
                batch,
                kind,
                Adapters::On,
                true,
            )
            .map(drop)
        })?);
        out.push(whole("forward_backward (whole step)", 0, &|| {
            self.forward_backward(batch, kind).map(drop)
        })?);
        Ok(out)
    }
}

/// Incremental decoding (see [`crate::kv_cache`] and [`crate::sample`]).
impl LoraModel {
    /// An empty kv cache for rows whose real tokens start at slot `start[b]` (left
    /// padding), with room for `capacity` slots (it grows when a call needs more).
    pub fn new_kv_cache(&self, start: Vec<usize>, capacity: usize) -> Result<KvCache> {
        KvCache::new(
            self.cfg.num_hidden_layers,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
            start,
            capacity,
            // Keys and values are activations: f32 whatever the base dtype.
            DType::F32,
            &self.device,
        )
    }

    /// Runs `input_ids [B, t]` (u32) as the next `t` slots of every row of `cache`,
    /// writing their keys and values into it, and returns the logits `[B, t, vocab]` —
    /// or, with `last_only`, `[B, 1, vocab]` of the last slot (the lm_head is skipped
    /// elsewhere). No autograd graph is kept.
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        cache: &mut KvCache,
        adapters: Adapters,
        last_only: bool,
    ) -> Result<Tensor> {
        let (b, t) = self.check_ids(input_ids)?;
        cache.ensure_room(b, t)?;
        let mut x = self
            .embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .to_dtype(DType::F32)?;
        let (cos, sin) =
            crate::kv_cache::rope_tables_at(&self.inv_freq, &cache.positions(t), &self.device)?;
        let dummy = AttnMask {
            t,
            window: None,
            key_valid: None,
        };
        let pass = Pass {
            adapters,
            dropout: None,
            mask: &dummy,
            cos: &cos,
            sin: &sin,
            batch: b,
            seq: t,
        };
        // One additive mask per distinct window (Mistral/Qwen layers may differ).
        let mut masks: Vec<(Option<usize>, Tensor)> = Vec::new();
        let len = cache.len;
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let w = layer.self_attn.window;
            let mask = match masks.iter().find(|(mw, _)| *mw == w) {
                Some((_, m)) => m.clone(),
                None => {
                    let m = crate::kv_cache::mask(&cache.start, len, t, w, &self.device)?;
                    masks.push((w, m.clone()));
                    m
                }
            };
            x = layer.forward_cached(&x, &pass, &mask, kv, len)?;
        }
        cache.len += t;
        let x = if last_only {
            x.reshape((b, t, self.cfg.hidden_size))?
                .narrow(1, t - 1, 1)?
                .reshape((b, self.cfg.hidden_size))?
        } else {
            x
        };
        let h = ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)?;
        let logits = gemv::linear(&self.lm_head, &h, adapters)?.detach();
        Ok(logits.reshape((b, if last_only { 1 } else { t }, self.cfg.vocab_size))?)
    }
}

/// The compute dtypes a base may be held in. [`LoraModel::from_tensors`] takes bf16/f16 on
/// the CPU too: there candle widens half-precision matmul operands to f32 and rounds the
/// product back, as a GPU's half-precision GEMM with f32 accumulation does, so the CPU can
/// check the mixed-precision numerics the GPU will run.
fn check_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::BF16 | DType::F16 => Ok(()),
        d => Err(Error::Unsupported(format!(
            "compute dtype {d:?} (f32, bf16 or f16)"
        ))),
    }
}

fn empty_output(kind: LossKind, batch: &Batch) -> LossOutput {
    LossOutput {
        kind,
        loss_sum: 0.0,
        weight_sum: 0.0,
        tokens: 0,
        logprobs: vec![0.0; batch.rows() * batch.seq()],
    }
}
