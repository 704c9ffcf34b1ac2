//! Model shapes for benchmarks and quick starts, and a writer of random-init model folders
//! in the Hugging Face layout (config.json, generation_config.json, model.safetensors).
//!
//! Initialisation follows transformers' `_init_weights` for these models: linear and
//! embedding weights N(0, 0.02), norm weights 1. Values are seeded per tensor name, so a
//! model is the same for the same seed whatever the thread count.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde_json::json;

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::io;
use crate::lora::fnv1a;

/// A named model shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelPreset {
    /// hidden 256, intermediate 688, 4 layers, 8 heads, 4 kv heads, vocab 32000, untied.
    Tiny,
    /// SmolLM-135M's shape: hidden 576, intermediate 1536, 30 layers, 9 heads, 3 kv heads,
    /// vocab 49152, tied.
    Smol,
    /// Small and fast on 2 CPU cores: hidden 128, intermediate 352, 2 layers, 4 heads,
    /// 2 kv heads, tied, with the vocabulary of the caller's tokenizer.
    Quickstart {
        /// Vocabulary size (the tokenizer's).
        vocab_size: usize,
    },
}

impl ModelPreset {
    /// `tiny`, `smol`, or `quickstart` (which needs `vocab_size`).
    pub fn from_name(name: &str, vocab_size: Option<usize>) -> Result<Self> {
        match name {
            "tiny" => Ok(ModelPreset::Tiny),
            "smol" => Ok(ModelPreset::Smol),
            "quickstart" => match vocab_size {
                Some(v) if v > 0 => Ok(ModelPreset::Quickstart { vocab_size: v }),
                _ => Err(Error::Unsupported(
                    "preset quickstart needs a vocabulary size > 0".into(),
                )),
            },
            other => Err(Error::Unsupported(format!(
                "unknown preset {other:?} (tiny, smol, quickstart)"
            ))),
        }
    }

    /// The preset's name.
    pub fn name(&self) -> &'static str {
        match self {
            ModelPreset::Tiny => "tiny",
            ModelPreset::Smol => "smol",
            ModelPreset::Quickstart { .. } => "quickstart",
        }
    }

    /// The benchmark batch (rows, positions) of the preset.
    pub fn bench_batch(&self) -> (usize, usize) {
        match self {
            ModelPreset::Tiny => (8, 256),
            ModelPreset::Smol => (4, 256),
            ModelPreset::Quickstart { .. } => (8, 128),
        }
    }

    /// The model config.
    pub fn config(&self) -> ModelConfig {
        let (vocab, hidden, inter, layers, heads, kv, tied, eps) = match *self {
            ModelPreset::Tiny => (32000, 256, 688, 4, 8, 4, false, 1e-6),
            ModelPreset::Smol => (49152, 576, 1536, 30, 9, 3, true, 1e-5),
            ModelPreset::Quickstart { vocab_size } => (vocab_size, 128, 352, 2, 4, 2, true, 1e-5),
        };
        ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim: hidden / heads,
            rms_norm_eps: eps,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::Default,
            max_position_embeddings: 2048,
            tie_word_embeddings: tied,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            sliding_windows: vec![None; layers],
            torch_dtype: Some("float32".into()),
            bos_token_id: Some(1),
            eos_token_id: Some(2),
        }
    }
}

/// Every tensor name and shape of a model with this config, in checkpoint key order.
pub fn tensor_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, d, v) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.head_dim,
        cfg.vocab_size,
    );
    let (q, kv) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
    let mut out = vec![
        ("model.embed_tokens.weight".to_string(), vec![v, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![v, h]));
    }
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let mut push = |name: &str, shape: Vec<usize>| out.push((format!("{p}.{name}"), shape));
        push("input_layernorm.weight", vec![h]);
        push("post_attention_layernorm.weight", vec![h]);
        for (name, o, inp) in [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h)] {
            push(&format!("self_attn.{name}.weight"), vec![o, inp]);
            if cfg.qkv_bias {
                push(&format!("self_attn.{name}.bias"), vec![o]);
            }
        }
        push("self_attn.o_proj.weight", vec![h, q]);
        if cfg.o_bias {
            push("self_attn.o_proj.bias", vec![h]);
        }
        if cfg.qk_norm {
            push("self_attn.q_norm.weight", vec![d]);
            push("self_attn.k_norm.weight", vec![d]);
        }
        for (name, o, inp) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)] {
            push(&format!("mlp.{name}.weight"), vec![o, inp]);
            if cfg.mlp_bias {
                push(&format!("mlp.{name}.bias"), vec![o]);
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Writes a random-init f32 model folder for `cfg` into `dir` (created if needed):
/// config.json, generation_config.json, model.safetensors (each file atomically).
pub fn write_random_model(dir: &Path, cfg: &ModelConfig, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors = random_tensors(cfg, seed)?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    io::write_safetensors_file_atomic(&dir.join("model.safetensors"), &tensors, Some(meta))?;
    drop(tensors);
    let mut config = cfg.to_hf_json();
    config["dtype"] = json!("float32");
    config["transformers_version"] = json!("5.0.0");
    let text = serde_json::to_string_pretty(&config).expect("json");
    io::write_atomic(&dir.join("config.json"), text.as_bytes())?;
    let gen = json!({
        "_from_model_config": true,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
    });
    io::write_atomic(
        &dir.join("generation_config.json"),
        serde_json::to_string_pretty(&gen).expect("json").as_bytes(),
    )
}

/// Random f32 base weights for `cfg` (transformers' init), sorted by name.
pub fn random_tensors(cfg: &ModelConfig, seed: u64) -> Result<Vec<(String, Tensor)>> {
    let shapes = tensor_shapes(cfg);
    shapes
        .par_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                normal_vec(n, 0.02, seed ^ fnv1a(name.as_bytes()))
            };
            Ok((
                name.clone(),
                Tensor::from_vec(data, shape.as_slice(), &Device::Cpu)?,
            ))
        })
        .collect::<Result<_>>()
}

/// `n` samples of N(0, std²), Box–Muller from a seeded generator.
fn normal_vec(n: usize, std: f64, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let th = std::f64::consts::TAU * u2;
        out.push((r * th.cos()) as f32);
        out.push((r * th.sin()) as f32);
    }
    out.truncate(n);
    out
}
