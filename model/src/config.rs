//! The model's shape, read from a Hugging Face `config.json`.
//!
//! Owns: parsing and validating `config.json` for the Llama family (Llama 2/3.x, Mistral,
//! Qwen2/2.5, Qwen3), both the transformers-5 spelling (`rope_parameters`, `dtype`) and the
//! older one (`rope_theta`, `rope_scaling`, `torch_dtype`), and writing a config back out
//! (random-init models, merged models). It does not load weights.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};

/// The model families this crate implements. They share one decoder; the differences are
/// biases, norms on q/k and sliding windows, all captured as fields of [`ModelConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM` (Llama 2, Llama 3.x, SmolLM, TinyLlama…).
    Llama,
    /// `MistralForCausalLM`.
    Mistral,
    /// `Qwen2ForCausalLM` (Qwen2, Qwen2.5): biases on q/k/v.
    Qwen2,
    /// `Qwen3ForCausalLM`: RMSNorm on each head of q and k.
    Qwen3,
}

impl Architecture {
    /// The `architectures` entry of config.json.
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// The `model_type` entry of config.json.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        }
    }

    fn from_hf_name(name: &str) -> Option<Self> {
        Some(match name {
            "LlamaForCausalLM" => Architecture::Llama,
            "MistralForCausalLM" => Architecture::Mistral,
            "Qwen2ForCausalLM" => Architecture::Qwen2,
            "Qwen3ForCausalLM" => Architecture::Qwen3,
            _ => return None,
        })
    }
}

/// How rotary position frequencies are adjusted (`rope_type`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// `linear`: every frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// `factor`.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_max_position_embeddings: usize,
    },
}

/// The shape and numerics of a decoder, as config.json describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The family.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding and of lm_head).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE frequency adjustment.
    pub rope_scaling: RopeScaling,
    /// Longest sequence the model was built for (also the RoPE table length).
    pub max_position_embeddings: usize,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections have biases (Qwen2 always; Llama/Qwen3 `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj has a bias (Llama/Qwen3 `attention_bias`).
    pub o_bias: bool,
    /// gate/up/down projections have biases (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// RMSNorm on every head of q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Per layer: attention window (a token sees itself and the `w - 1` before it), or
    /// `None` for full causal attention.
    pub sliding_windows: Vec<Option<usize>>,
    /// The dtype the checkpoint was saved in (`dtype` / `torch_dtype`), if given.
    pub torch_dtype: Option<String>,
    /// `bos_token_id`, if given (written back into generated configs).
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` (first one if a list), if given.
    pub eos_token_id: Option<u32>,
}

/// Reads typed fields from a JSON object, naming the file and field on error.
struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn get(&self, field: &str) -> Option<&'a Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn invalid(&self, field: &str, reason: impl Into<String>) -> Error {
        Error::InvalidField {
            path: self.path.to_path_buf(),
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    fn missing(&self, field: &str) -> Error {
        Error::MissingField {
            path: self.path.to_path_buf(),
            field: field.to_string(),
        }
    }

    fn usize_opt(&self, field: &str) -> Result<Option<usize>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    self.invalid(field, format!("expected a non-negative integer, got {v}"))
                }),
        }
    }

    fn usize(&self, field: &str) -> Result<usize> {
        self.usize_opt(field)?.ok_or_else(|| self.missing(field))
    }

    fn positive(&self, field: &str) -> Result<usize> {
        let n = self.usize(field)?;
        if n == 0 {
            return Err(self.invalid(field, "must be > 0"));
        }
        Ok(n)
    }

    fn f64_opt(&self, field: &str) -> Result<Option<f64>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| self.invalid(field, format!("expected a finite number, got {v}"))),
        }
    }

    fn bool_opt(&self, field: &str) -> Result<Option<bool>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.invalid(field, format!("expected true or false, got {v}"))),
        }
    }

    fn str_opt(&self, field: &str) -> Result<Option<&'a str>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.invalid(field, format!("expected a string, got {v}"))),
        }
    }

    fn token_id(&self, field: &str) -> Result<Option<u32>> {
        let v = match self.get(field) {
            None => return Ok(None),
            Some(Value::Array(a)) => match a.first() {
                Some(v) => v,
                None => return Ok(None),
            },
            Some(v) => v,
        };
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| self.invalid(field, format!("expected a token id, got {v}")))
    }
}

impl ModelConfig {
    /// Reads `config.json` (or a folder holding one).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let mut path = path.as_ref().to_path_buf();
        if path.is_dir() {
            path = path.join("config.json");
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_json_str(&text, &path)
    }

    /// Parses the text of a config.json; `path` is only used to name errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let obj = value.as_object().ok_or_else(|| Error::InvalidField {
            path: path.to_path_buf(),
            field: "<root>".into(),
            reason: "expected a JSON object".into(),
        })?;
        let f = Fields { path, obj };

        let architecture = match f.get("architectures") {
            None => return Err(f.missing("architectures")),
            Some(Value::Array(list)) => {
                let name = list
                    .first()
                    .and_then(Value::as_str)
                    .ok_or_else(|| f.invalid("architectures", "expected a list of strings"))?;
                Architecture::from_hf_name(name).ok_or_else(|| Error::UnknownArchitecture {
                    path: path.to_path_buf(),
                    found: name.to_string(),
                })?
            }
            Some(v) => return Err(f.invalid("architectures", format!("expected a list, got {v}"))),
        };

        if let Some(act) = f.str_opt("hidden_act")? {
            if act != "silu" {
                return Err(f.invalid(
                    "hidden_act",
                    format!("only \"silu\" is supported, got {act:?}"),
                ));
            }
        }

        let hidden_size = f.positive("hidden_size")?;
        let num_attention_heads = f.positive("num_attention_heads")?;
        let num_key_value_heads = f
            .usize_opt("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(f.invalid(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        let head_dim = match f.usize_opt("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(f.invalid(
                        "hidden_size",
                        format!("{hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(f.invalid("head_dim", format!("must be even and > 0, got {head_dim}")));
        }
        let num_hidden_layers = f.positive("num_hidden_layers")?;

        let (rope_theta, rope_scaling) = parse_rope(&f)?;
        let attention_bias = f.bool_opt("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            Architecture::Mistral => (false, false),
            Architecture::Llama | Architecture::Qwen3 => (attention_bias, attention_bias),
        };
        let mlp_bias = match architecture {
            Architecture::Llama => f.bool_opt("mlp_bias")?.unwrap_or(false),
            _ => false,
        };

        let sliding_windows = parse_windows(&f, architecture, num_hidden_layers)?;
        let rms_norm_eps = f.f64_opt("rms_norm_eps")?.unwrap_or(1e-6);
        if rms_norm_eps < 0.0 {
            return Err(f.invalid("rms_norm_eps", "must be >= 0"));
        }
        let torch_dtype = match f.str_opt("dtype")? {
            Some(s) => Some(s.to_string()),
            None => f.str_opt("torch_dtype")?.map(str::to_string),
        };

        Ok(ModelConfig {
            architecture,
            vocab_size: f.positive("vocab_size")?,
            hidden_size,
            intermediate_size: f.positive("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: f
                .usize_opt("max_position_embeddings")?
                .unwrap_or(2048)
                .max(1),
            // The transformers classes of these four families default to untied.
            tie_word_embeddings: f.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm: architecture == Architecture::Qwen3,
            sliding_windows,
            torch_dtype,
            bos_token_id: f.token_id("bos_token_id")?,
            eos_token_id: f.token_id("eos_token_id")?,
        })
    }

    /// Query heads per key/value head.
    pub fn gqa_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Number of parameters of the base model.
    pub fn num_parameters(&self) -> usize {
        let (h, i, d) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (q, kv) = (self.num_attention_heads * d, self.num_key_value_heads * d);
        let mut layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h;
        if self.qkv_bias {
            layer += q + 2 * kv;
        }
        if self.o_bias {
            layer += h;
        }
        if self.mlp_bias {
            layer += 2 * i + h;
        }
        if self.qk_norm {
            layer += 2 * d;
        }
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_hidden_layers * layer + h + head
    }

    /// The config as a transformers-5 style config.json object (what `save_pretrained`
    /// writes, minus fields that do not affect the model).
    pub fn to_hf_json(&self) -> Value {
        let mut rope = Map::new();
        rope.insert("rope_theta".into(), json!(self.rope_theta));
        match self.rope_scaling {
            RopeScaling::Default => {
                rope.insert("rope_type".into(), json!("default"));
            }
            RopeScaling::Linear { factor } => {
                rope.insert("rope_type".into(), json!("linear"));
                rope.insert("factor".into(), json!(factor));
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                rope.insert("rope_type".into(), json!("llama3"));
                rope.insert("factor".into(), json!(factor));
                rope.insert("low_freq_factor".into(), json!(low_freq_factor));
                rope.insert("high_freq_factor".into(), json!(high_freq_factor));
                rope.insert(
                    "original_max_position_embeddings".into(),
                    json!(original_max_position_embeddings),
                );
            }
        }
        let mut v = json!({
            "architectures": [self.architecture.hf_name()],
            "model_type": self.architecture.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": Value::Object(rope),
            "initializer_range": 0.02,
            "use_cache": true,
            "dtype": self.torch_dtype.clone().unwrap_or_else(|| "float32".into()),
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        });
        let obj = v.as_object_mut().expect("json! object");
        match self.architecture {
            Architecture::Llama => {
                obj.insert("attention_bias".into(), json!(self.qkv_bias));
                obj.insert("mlp_bias".into(), json!(self.mlp_bias));
            }
            Architecture::Qwen3 => {
                obj.insert("attention_bias".into(), json!(self.qkv_bias));
            }
            Architecture::Mistral | Architecture::Qwen2 => {}
        }
        let windows: Vec<usize> = self.sliding_windows.iter().flatten().copied().collect();
        if let Some(&w) = windows.first() {
            obj.insert("sliding_window".into(), json!(w));
            let types: Vec<&str> = self
                .sliding_windows
                .iter()
                .map(|w| {
                    if w.is_some() {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    }
                })
                .collect();
            obj.insert("layer_types".into(), json!(types));
            if matches!(self.architecture, Architecture::Qwen2 | Architecture::Qwen3) {
                obj.insert("use_sliding_window".into(), json!(true));
            }
        } else if matches!(self.architecture, Architecture::Mistral) {
            obj.insert("sliding_window".into(), Value::Null);
        }
        v
    }

    /// The RoPE inverse frequencies (length `head_dim / 2`), computed in f32 as
    /// transformers does, including the `rope_type` adjustment.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base = self.rope_theta as f32;
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0f32 / base.powf((2 * i) as f32 / d as f32))
            .collect();
        match self.rope_scaling {
            RopeScaling::Default => inv,
            RopeScaling::Linear { factor } => inv.into_iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                // transformers' `_compute_llama3_parameters`, in f32 like its tensors.
                let factor = factor as f32;
                let (lo, hi) = (low_freq_factor as f32, high_freq_factor as f32);
                let old_ctx = original_max_position_embeddings as f32;
                let low_freq_wavelen = old_ctx / lo;
                let high_freq_wavelen = old_ctx / hi;
                inv.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            f
                        };
                        let smooth = (old_ctx / wavelen - lo) / (hi - lo);
                        let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
                        let is_medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                        if is_medium {
                            smoothed
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        }
    }
}

fn parse_rope(f: &Fields<'_>) -> Result<(f64, RopeScaling)> {
    // transformers 5 folds everything into `rope_parameters`; older files have a top-level
    // `rope_theta` and an optional `rope_scaling` dict whose kind is `rope_type` or `type`.
    let (params, prefix) = match f.get("rope_parameters") {
        Some(Value::Object(p)) => (Some(p), "rope_parameters"),
        Some(v) => return Err(f.invalid("rope_parameters", format!("expected an object, got {v}"))),
        None => match f.get("rope_scaling") {
            Some(Value::Object(p)) => (Some(p), "rope_scaling"),
            Some(v) => {
                return Err(f.invalid("rope_scaling", format!("expected an object, got {v}")))
            }
            None => (None, "rope_scaling"),
        },
    };
    let sub = params.map(|obj| Fields { path: f.path, obj });
    let theta = match sub
        .as_ref()
        .map(|s| s.f64_opt("rope_theta"))
        .transpose()?
        .flatten()
    {
        Some(t) => t,
        None => f.f64_opt("rope_theta")?.unwrap_or(10000.0),
    };
    if theta <= 0.0 {
        return Err(f.invalid("rope_theta", "must be > 0"));
    }
    let Some(sub) = sub else {
        return Ok((theta, RopeScaling::Default));
    };
    let kind = match sub.str_opt("rope_type")? {
        Some(k) => k,
        None => sub.str_opt("type")?.unwrap_or("default"),
    };
    let nested = |field: &str| format!("{prefix}.{field}");
    let num = |field: &str| -> Result<f64> {
        sub.f64_opt(field)
            .map_err(|_| f.invalid(&nested(field), "expected a number"))?
            .ok_or_else(|| f.missing(&nested(field)))
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "llama3" => {
            let lo = num("low_freq_factor")?;
            let hi = num("high_freq_factor")?;
            if hi <= lo {
                return Err(f.invalid(&nested("high_freq_factor"), "must exceed low_freq_factor"));
            }
            RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: lo,
                high_freq_factor: hi,
                original_max_position_embeddings: sub
                    .usize_opt("original_max_position_embeddings")?
                    .ok_or_else(|| f.missing(&nested("original_max_position_embeddings")))?,
            }
        }
        other => {
            return Err(f.invalid(
                &nested("rope_type"),
                format!("unsupported rope_type {other:?} (supported: default, linear, llama3)"),
            ))
        }
    };
    Ok((theta, scaling))
}

fn parse_windows(f: &Fields<'_>, arch: Architecture, layers: usize) -> Result<Vec<Option<usize>>> {
    let window = f.usize_opt("sliding_window")?;
    let windows = match arch {
        Architecture::Llama => vec![None; layers],
        Architecture::Mistral => vec![window; layers],
        Architecture::Qwen2 | Architecture::Qwen3 => {
            let use_sw = f.bool_opt("use_sliding_window")?.unwrap_or(false);
            let window = if use_sw { window } else { None };
            match (window, f.get("layer_types")) {
                (None, _) => vec![None; layers],
                (Some(w), Some(Value::Array(types))) => {
                    if types.len() != layers {
                        return Err(f.invalid(
                            "layer_types",
                            format!("has {} entries for {layers} layers", types.len()),
                        ));
                    }
                    types
                        .iter()
                        .map(|t| match t.as_str() {
                            Some("sliding_attention") => Ok(Some(w)),
                            Some("full_attention") => Ok(None),
                            _ => Err(f.invalid("layer_types", format!("unknown layer type {t}"))),
                        })
                        .collect::<Result<_>>()?
                }
                (Some(w), _) => {
                    let first = f.usize_opt("max_window_layers")?.unwrap_or(layers);
                    (0..layers).map(|i| (i >= first).then_some(w)).collect()
                }
            }
        }
    };
    if windows.contains(&Some(0)) {
        return Err(f.invalid("sliding_window", "must be > 0"));
    }
    Ok(windows)
}

/// The path of `config.json` inside a model folder.
pub fn config_path(model_dir: &Path) -> PathBuf {
    model_dir.join("config.json")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preset::ModelPreset;

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_json_str(&v.to_string(), Path::new("config.json"))
    }

    fn base(arch: &str) -> Value {
        json!({
            "architectures": [arch], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        })
    }

    #[test]
    fn older_spelling_with_llama3_rope_scaling() {
        let mut v = base("LlamaForCausalLM");
        v["rope_theta"] = json!(500000.0);
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        v["torch_dtype"] = json!("bfloat16");
        let c = parse(v).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"));
        assert_eq!(c.head_dim, 16);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        // High frequencies (short wavelengths) are kept, low ones divided by the factor.
        let plain = ModelConfig {
            rope_scaling: RopeScaling::Default,
            ..c.clone()
        }
        .rope_inv_freq();
        let scaled = c.rope_inv_freq();
        assert_eq!(scaled[0], plain[0]);
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() <= 1e-6 * plain[last]);
    }

    #[test]
    fn rope_type_may_be_spelled_type() {
        let mut v = base("MistralForCausalLM");
        v["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
        v["sliding_window"] = json!(16);
        let c = parse(v).unwrap();
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        assert_eq!(c.sliding_windows, vec![Some(16), Some(16)]);
        assert!(!c.qkv_bias);
    }

    #[test]
    fn qwen_flags() {
        let mut v = base("Qwen2ForCausalLM");
        v["use_sliding_window"] = json!(true);
        v["sliding_window"] = json!(32);
        v["max_window_layers"] = json!(1);
        let c = parse(v).unwrap();
        assert!(c.qkv_bias && !c.o_bias && !c.qk_norm);
        assert_eq!(c.sliding_windows, vec![None, Some(32)]);
        let mut v = base("Qwen3ForCausalLM");
        v["head_dim"] = json!(32);
        v["sliding_window"] = json!(32); // ignored without use_sliding_window
        let c = parse(v).unwrap();
        assert!(c.qk_norm && !c.qkv_bias);
        assert_eq!(c.head_dim, 32);
        assert_eq!(c.sliding_windows, vec![None, None]);
    }

    #[test]
    fn errors_name_the_field() {
        let mut v = base("LlamaForCausalLM");
        v.as_object_mut().unwrap().remove("architectures");
        assert!(
            matches!(parse(v), Err(Error::MissingField { field, .. }) if field == "architectures")
        );
        let mut v = base("LlamaForCausalLM");
        v["vocab_size"] = json!("many");
        assert!(
            matches!(parse(v), Err(Error::InvalidField { field, .. }) if field == "vocab_size")
        );
        let mut v = base("LlamaForCausalLM");
        v["hidden_act"] = json!("gelu");
        assert!(
            matches!(parse(v), Err(Error::InvalidField { field, .. }) if field == "hidden_act")
        );
        let mut v = base("LlamaForCausalLM");
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0});
        let e = parse(v).unwrap_err();
        assert!(
            matches!(&e, Error::MissingField { field, .. } if field == "rope_scaling.low_freq_factor"),
            "{e}"
        );
        assert!(
            matches!(parse(base("BertModel")), Err(Error::UnknownArchitecture { found, .. }) if found == "BertModel")
        );
    }

    #[test]
    fn written_configs_read_back_the_same() {
        let mut qwen = ModelPreset::Tiny.config();
        qwen.architecture = Architecture::Qwen3;
        qwen.qk_norm = true;
        qwen.sliding_windows = vec![None, None, Some(8), Some(8)];
        let mut llama3 = ModelPreset::Smol.config();
        llama3.rope_scaling = RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        for c in [
            ModelPreset::Tiny.config(),
            ModelPreset::Smol.config(),
            ModelPreset::Quickstart { vocab_size: 1711 }.config(),
            qwen,
            llama3,
        ] {
            let back = parse(c.to_hf_json()).unwrap();
            assert_eq!(back, c);
        }
    }
}
