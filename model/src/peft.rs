//! PEFT adapter folders: `adapter_model.safetensors` + `adapter_config.json`, in exactly
//! the layout PEFT's `save_pretrained` writes, so PEFT and vLLM load what ringtune saves and
//! ringtune loads what they save.
//!
//! Keys: `base_model.model.<HF module path>.lora_A.weight` `[r, in]` and `.lora_B.weight`
//! `[out, r]`. PEFT sometimes also stores `….base_layer.weight` (e.g. for a targeted
//! lm_head); those are accepted and ignored on load.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::io;
use crate::lora::{LoraConfig, TargetModule};
use crate::model::LoraModel;

/// File name of the adapter weights.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// File name of the adapter config.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// The fields of PEFT's `adapter_config.json` that ringtune reads and writes.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// The LoRA hyper-parameters.
    pub lora: LoraConfig,
    /// `base_model_name_or_path`.
    pub base_model_name_or_path: Option<String>,
}

impl AdapterConfig {
    /// The JSON PEFT writes (the subset of fields that matter to PEFT and vLLM, with
    /// PEFT's defaults for the rest).
    pub fn to_json(&self) -> Value {
        let l = &self.lora;
        let targets: Vec<&str> = l.target_modules.iter().map(|t| t.name()).collect();
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": l.rank,
            "lora_alpha": l.alpha,
            "lora_dropout": l.dropout,
            "target_modules": targets,
            "bias": "none",
            "use_rslora": l.use_rslora,
            "use_dora": false,
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null,
            "base_model_name_or_path": self.base_model_name_or_path,
        })
    }

    /// Reads `adapter_config.json` (or the folder holding it). Settings ringtune does not
    /// implement (DoRA, biases, per-layer patterns, fan_in_fan_out) are errors naming the
    /// field rather than silently different numbers.
    pub fn read(path: &Path) -> Result<Self> {
        let path = if path.is_dir() {
            path.join(ADAPTER_CONFIG)
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        let invalid = |field: &str, reason: String| Error::InvalidField {
            path: path.clone(),
            field: field.into(),
            reason,
        };
        let missing = |field: &str| Error::MissingField {
            path: path.clone(),
            field: field.into(),
        };
        let get = |field: &str| v.get(field).filter(|x| !x.is_null());

        match get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            Some(other) => {
                return Err(invalid(
                    "peft_type",
                    format!("expected \"LORA\", got {other:?}"),
                ))
            }
            None => return Err(missing("peft_type")),
        }
        let rank = get("r")
            .ok_or_else(|| missing("r"))?
            .as_u64()
            .filter(|&r| r > 0)
            .ok_or_else(|| invalid("r", "expected an integer > 0".into()))?
            as usize;
        let alpha = match get("lora_alpha") {
            None => 8.0, // PEFT's default
            Some(a) => a
                .as_f64()
                .ok_or_else(|| invalid("lora_alpha", format!("expected a number, got {a}")))?,
        };
        let dropout = match get("lora_dropout") {
            None => 0.0,
            Some(d) => d
                .as_f64()
                .ok_or_else(|| invalid("lora_dropout", format!("expected a number, got {d}")))?,
        };
        let use_rslora = get("use_rslora").and_then(Value::as_bool).unwrap_or(false);
        for (field, bad) in [("use_dora", true), ("fan_in_fan_out", true)] {
            if get(field).and_then(Value::as_bool) == Some(bad) {
                return Err(invalid(field, format!("{field} = true is not supported")));
            }
        }
        if let Some(b) = get("bias").and_then(Value::as_str) {
            if b != "none" {
                return Err(invalid(
                    "bias",
                    format!("only \"none\" is supported, got {b:?}"),
                ));
            }
        }
        for field in ["rank_pattern", "alpha_pattern"] {
            if get(field)
                .and_then(Value::as_object)
                .is_some_and(|o| !o.is_empty())
            {
                return Err(invalid(
                    field,
                    "per-module ranks/alphas are not supported".into(),
                ));
            }
        }
        if get("layers_to_transform").is_some() {
            return Err(invalid(
                "layers_to_transform",
                "adapting only some layers is not supported".into(),
            ));
        }
        let target_modules = match get("target_modules").ok_or_else(|| missing("target_modules"))? {
            Value::Array(list) => list
                .iter()
                .map(|t| {
                    let name = t.as_str().ok_or_else(|| {
                        invalid("target_modules", format!("expected strings, got {t}"))
                    })?;
                    TargetModule::from_name(name).ok_or_else(|| {
                        invalid("target_modules", format!("unknown module {name:?}"))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            // PEFT's shorthand for every linear layer except the output layer.
            Value::String(s) if s == "all-linear" => TargetModule::ALL
                .into_iter()
                .filter(|t| *t != TargetModule::LmHead)
                .collect(),
            other => {
                return Err(invalid(
                    "target_modules",
                    format!("expected a list of module names, got {other}"),
                ))
            }
        };
        let lora = LoraConfig {
            rank,
            alpha,
            dropout,
            use_rslora,
            target_modules,
        }
        .validated()
        .map_err(|e| invalid("<lora>", e.to_string()))?;
        let base_model_name_or_path = get("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(AdapterConfig {
            lora,
            base_model_name_or_path,
        })
    }
}

/// Reads the LoRA tensors of an adapter folder (CPU, f32), keyed by PEFT key; `base_layer`
/// tensors are dropped.
pub fn read_adapter_tensors(dir: &Path) -> Result<BTreeMap<String, Tensor>> {
    let path = dir.join(ADAPTER_WEIGHTS);
    let (tensors, _) = io::read_safetensors(&path)?;
    let mut out = BTreeMap::new();
    for (k, t) in tensors {
        if k.contains(".base_layer.") {
            continue;
        }
        let t = if t.dtype() == DType::F32 {
            t
        } else {
            t.to_dtype(DType::F32)?
        };
        // A diverged run's NaN or inf would otherwise come out as NaN losses, samples
        // scored NaN, or a merged model full of NaN, each "successfully".
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidField {
                path: path.clone(),
                field: k,
                reason: format!("value {} at flat index {i} is not finite", values[i]),
            });
        }
        out.insert(k, t);
    }
    Ok(out)
}

/// Writes an adapter folder from named LoRA tensors and their config; each file atomically.
pub fn write_adapter(dir: &Path, cfg: &AdapterConfig, tensors: &[(String, Tensor)]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    io::write_safetensors_atomic(&dir.join(ADAPTER_WEIGHTS), tensors, Some(meta))?;
    let text = serde_json::to_string_pretty(&cfg.to_json()).map_err(|source| Error::Json {
        path: dir.join(ADAPTER_CONFIG),
        source,
    })?;
    io::write_atomic(&dir.join(ADAPTER_CONFIG), text.as_bytes())
}

impl LoraModel {
    /// The adapter config describing this model's adapters. Its `base_model_name_or_path`
    /// is the model folder as an absolute path, so that PEFT (`AutoPeftModelForCausalLM`)
    /// and `ringtune merge` find the base from any working folder.
    pub fn adapter_config(&self) -> AdapterConfig {
        let dir = std::path::absolute(self.model_dir()).unwrap_or_else(|_| self.model_dir().into());
        AdapterConfig {
            lora: self.lora_config().clone(),
            base_model_name_or_path: Some(dir.display().to_string()),
        }
    }

    /// Saves the adapters as a PEFT folder (`adapter_model.safetensors`,
    /// `adapter_config.json`), each file written atomically.
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        write_adapter(dir, &self.adapter_config(), &self.adapter_tensors())
    }

    /// Loads adapter values from a PEFT folder into this model. The folder's rank, alpha,
    /// rsLoRA and targets must equal this model's; every key must be present with its shape
    /// and no other LoRA keys may be there.
    pub fn load_adapter(&self, dir: &Path) -> Result<()> {
        let cfg = AdapterConfig::read(dir)?;
        let cfg_path = dir.join(ADAPTER_CONFIG);
        let mine = self.lora_config();
        let mismatch = |field: &str, theirs: String, ours: String| Error::InvalidField {
            path: cfg_path.clone(),
            field: field.into(),
            reason: format!("adapter has {theirs}, the model was built with {ours}"),
        };
        if cfg.lora.rank != mine.rank {
            return Err(mismatch(
                "r",
                cfg.lora.rank.to_string(),
                mine.rank.to_string(),
            ));
        }
        if cfg.lora.scale() != mine.scale() {
            return Err(mismatch(
                "lora_alpha",
                format!("scale {}", cfg.lora.scale()),
                format!("scale {}", mine.scale()),
            ));
        }
        if cfg.lora.target_modules != mine.target_modules {
            return Err(mismatch(
                "target_modules",
                format!("{:?}", cfg.lora.target_modules),
                format!("{:?}", mine.target_modules),
            ));
        }
        let tensors = read_adapter_tensors(dir)?;
        let file = dir.join(ADAPTER_WEIGHTS).display().to_string();
        let ordered = match_layout(self, tensors, &file)?;
        self.set_adapter_tensors(&ordered)
    }

    /// Loads a base model and an adapter folder onto it, taking rank, alpha and targets from
    /// the adapter's config.
    pub fn load_with_adapter(
        model_dir: &Path,
        adapter_dir: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let cfg = AdapterConfig::read(adapter_dir)?;
        let model = LoraModel::load(model_dir, &cfg.lora, device, dtype, 0)?;
        model.load_adapter(adapter_dir)?;
        Ok(model)
    }
}

/// Orders adapter tensors by the model's layout, naming any missing, extra or mis-shaped key.
fn match_layout(
    model: &LoraModel,
    mut tensors: BTreeMap<String, Tensor>,
    file: &str,
) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::with_capacity(model.param_layout().len());
    for (k, shape) in model.param_layout().entries() {
        let t = tensors.remove(k).ok_or_else(|| Error::MissingTensor {
            tensor: k.clone(),
            file: file.to_string(),
        })?;
        if t.dims() != shape.as_slice() {
            return Err(Error::ShapeMismatch {
                tensor: k.clone(),
                file: file.to_string(),
                expected: shape.clone(),
                found: t.dims().to_vec(),
            });
        }
        out.push((k.clone(), t));
    }
    if let Some(k) = tensors.keys().next() {
        return Err(Error::UnexpectedTensor {
            tensor: k.clone(),
            file: file.to_string(),
        });
    }
    Ok(out)
}
