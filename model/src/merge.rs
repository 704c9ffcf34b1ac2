//! Merging an adapter into its base: `W' = W + scale · B · A`, written out as a complete
//! Hugging Face model folder (config.json, safetensors — sharded with an index when large —
//! and the tokenizer/generation files copied over).
//!
//! The merge is done in f32 and stored in the base's on-disk dtype. A tied model whose
//! lm_head was adapted gets an untied `lm_head.weight` (and `tie_word_embeddings: false`),
//! because the merged head no longer equals the embedding.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::io;
use crate::peft::{read_adapter_tensors, AdapterConfig, ADAPTER_WEIGHTS};
use crate::weights::WeightFiles;

/// Files copied from the base folder when present.
const COPIED_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// How to write the merged model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MergeOptions {
    /// Largest shard in bytes (transformers' default is 5 GB); a model above it is sharded.
    pub max_shard_bytes: u64,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            max_shard_bytes: 5_000_000_000,
        }
    }
}

/// What a merge wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeReport {
    /// Tensors that received an adapter delta.
    pub merged_tensors: usize,
    /// Safetensors files written.
    pub shards: usize,
    /// Total bytes of tensor data.
    pub total_bytes: u64,
}

/// The adapter's tensors (`module.weight` → (A, B)) against its own config, as loading it
/// onto a model checks them: some tensors at all, A `[r, ·]` and B `[·, r]` with the
/// config's r (the scale alpha/r depends on it), only target modules, and every target
/// module of every layer present.
fn check_against_config(
    deltas: &BTreeMap<String, (Tensor, Tensor)>,
    lora: &crate::LoraConfig,
    layers: usize,
    file: &str,
) -> Result<()> {
    use crate::TargetModule;
    if deltas.is_empty() {
        return Err(Error::ParamMismatch(format!(
            "{file} holds no LoRA tensors"
        )));
    }
    let key = |name: &str| format!("base_model.model.{}", name.trim_end_matches(".weight"));
    for (name, (a, b)) in deltas {
        let module = name.trim_end_matches(".weight");
        let target = module.rsplit('.').next().and_then(TargetModule::from_name);
        if !target.is_some_and(|t| lora.targets(t)) {
            return Err(Error::UnexpectedTensor {
                tensor: format!("{}.lora_A.weight", key(name)),
                file: format!(
                    "{file} (not one of the adapter config's target_modules: {})",
                    lora.target_modules
                        .iter()
                        .map(|t| t.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        let r = lora.rank;
        for (t, part, dims) in [(a, "lora_A", [r, a.dim(1)?]), (b, "lora_B", [b.dim(0)?, r])] {
            if t.dims() != dims {
                return Err(Error::ShapeMismatch {
                    tensor: format!("{}.{part}.weight", key(name)),
                    file: format!("{file} (adapter_config.json says r = {r})"),
                    expected: dims.to_vec(),
                    found: t.dims().to_vec(),
                });
            }
        }
    }
    for t in &lora.target_modules {
        let modules: Vec<String> = match t {
            TargetModule::LmHead => vec!["lm_head".into()],
            TargetModule::QProj
            | TargetModule::KProj
            | TargetModule::VProj
            | TargetModule::OProj => (0..layers)
                .map(|l| format!("model.layers.{l}.self_attn.{}", t.name()))
                .collect(),
            _ => (0..layers)
                .map(|l| format!("model.layers.{l}.mlp.{}", t.name()))
                .collect(),
        };
        for m in modules {
            if !deltas.contains_key(&format!("{m}.weight")) {
                return Err(Error::MissingTensor {
                    tensor: format!("base_model.model.{m}.lora_A.weight"),
                    file: file.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Merges the adapter in `adapter_dir` into the base in `model_dir`, writing `out_dir`.
pub fn merge(model_dir: &Path, adapter_dir: &Path, out_dir: &Path) -> Result<MergeReport> {
    merge_with(model_dir, adapter_dir, out_dir, &MergeOptions::default())
}

/// [`merge`] with options.
pub fn merge_with(
    model_dir: &Path,
    adapter_dir: &Path,
    out_dir: &Path,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    let cfg_path = model_dir.join("config.json");
    let cfg = ModelConfig::from_file(&cfg_path)?;
    let acfg = AdapterConfig::read(adapter_dir)?;
    let scale = acfg.lora.scale();
    let mut lora = read_adapter_tensors(adapter_dir)?;
    let adapter_file = adapter_dir.join(ADAPTER_WEIGHTS).display().to_string();
    let files = WeightFiles::open(model_dir)?;

    // Which base tensors get a delta: every `<prefix>.lora_A.weight` pairs with a B and a
    // `<module>.weight` in the base (lm_head of a tied model maps to the embedding).
    let mut deltas: BTreeMap<String, (Tensor, Tensor)> = BTreeMap::new();
    let keys: Vec<String> = lora.keys().cloned().collect();
    for k in keys {
        let Some(prefix) = k.strip_suffix(".lora_A.weight") else {
            if k.ends_with(".lora_B.weight") {
                continue;
            }
            return Err(Error::UnexpectedTensor {
                tensor: k,
                file: adapter_file,
            });
        };
        let module =
            prefix
                .strip_prefix("base_model.model.")
                .ok_or_else(|| Error::UnexpectedTensor {
                    tensor: k.clone(),
                    file: adapter_file.clone(),
                })?;
        let a = lora.remove(&k).expect("key listed");
        let kb = format!("{prefix}.lora_B.weight");
        let b = lora.remove(&kb).ok_or_else(|| Error::MissingTensor {
            tensor: kb.clone(),
            file: adapter_file.clone(),
        })?;
        deltas.insert(format!("{module}.weight"), (a, b));
    }
    if let Some(k) = lora.keys().next() {
        // A B without its A.
        let a = k.replace(".lora_B.", ".lora_A.");
        return Err(Error::MissingTensor {
            tensor: a,
            file: adapter_file,
        });
    }

    check_against_config(&deltas, &acfg.lora, cfg.num_hidden_layers, &adapter_file)?;

    let mut names: Vec<String> = files.names().map(str::to_string).collect();
    let untie = cfg.tie_word_embeddings && deltas.contains_key("lm_head.weight");
    if untie && !files.contains("lm_head.weight") {
        names.push("lm_head.weight".into());
        names.sort();
    }
    for target in deltas.keys() {
        if !names.contains(target) {
            return Err(Error::UnexpectedTensor {
                tensor: format!("base_model.model.{}", target.trim_end_matches(".weight")),
                file: format!("{adapter_file} (no base tensor `{target}`)"),
            });
        }
    }

    // Plan shards from the known sizes before writing anything.
    let source = |name: &str| -> String {
        if name == "lm_head.weight" && untie && !files.contains(name) {
            "model.embed_tokens.weight".to_string()
        } else {
            name.to_string()
        }
    };
    let mut sizes = Vec::with_capacity(names.len());
    for n in &names {
        let (shape, dtype) = files.info(&source(n)).expect("listed tensor");
        let bytes = match dtype.as_str() {
            "F32" => 4,
            "F16" | "BF16" => 2,
            "F64" | "I64" | "U64" => 8,
            _ => 4,
        };
        sizes.push(shape.iter().product::<usize>() as u64 * bytes);
    }
    let total_bytes: u64 = sizes.iter().sum();
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut acc = 0u64;
    for (i, &s) in sizes.iter().enumerate() {
        if acc > 0 && acc + s > opts.max_shard_bytes {
            shards.push(Vec::new());
            acc = 0;
        }
        shards.last_mut().expect("one shard").push(i);
        acc += s;
    }

    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let n_shards = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut merged = 0;
    for (si, shard) in shards.iter().enumerate() {
        let fname = if n_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", si + 1, n_shards)
        };
        let mut tensors = Vec::with_capacity(shard.len());
        for &i in shard {
            let name = &names[i];
            let src = source(name);
            let (shape, _) = files.info(&src).expect("listed tensor");
            let orig = files.take(&src, &shape, DType::F32, &Device::Cpu)?;
            let disk_dtype = disk_dtype(&files, &src)?;
            let t = match deltas.get(name) {
                Some((a, b)) => {
                    let (out_dim, in_dim) = (shape[0], shape.get(1).copied().unwrap_or(0));
                    if b.dim(0)? != out_dim || a.dim(1)? != in_dim || a.dim(0)? != b.dim(1)? {
                        return Err(Error::ShapeMismatch {
                            tensor: format!(
                                "base_model.model.{}",
                                name.trim_end_matches(".weight")
                            ),
                            file: adapter_file.clone(),
                            expected: vec![out_dim, in_dim],
                            found: vec![b.dim(0)?, a.dim(1)?],
                        });
                    }
                    merged += 1;
                    (orig + (b.matmul(a)? * scale)?)?
                }
                None => orig,
            };
            tensors.push((name.clone(), t.to_dtype(disk_dtype)?));
            weight_map.insert(name.clone(), fname.clone());
        }
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        io::write_safetensors_file_atomic(&out_dir.join(&fname), &tensors, Some(meta))?;
    }
    if n_shards > 1 {
        let index = serde_json::json!({
            "metadata": { "total_size": total_bytes },
            "weight_map": weight_map,
        });
        let text = serde_json::to_string_pretty(&index).expect("json");
        io::write_atomic(
            &out_dir.join("model.safetensors.index.json"),
            text.as_bytes(),
        )?;
    }

    // config.json: the base's own text, so fields this crate does not model survive.
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let mut v: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: cfg_path.clone(),
        source,
    })?;
    if untie {
        v["tie_word_embeddings"] = Value::Bool(false);
    }
    let text = serde_json::to_string_pretty(&v).expect("json");
    io::write_atomic(&out_dir.join("config.json"), text.as_bytes())?;
    for f in COPIED_FILES {
        let src = model_dir.join(f);
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            io::write_atomic(&out_dir.join(f), &bytes)?;
        }
    }
    Ok(MergeReport {
        merged_tensors: merged,
        shards: n_shards,
        total_bytes,
    })
}

fn disk_dtype(files: &WeightFiles, name: &str) -> Result<DType> {
    let (_, d) = files.info(name).expect("listed tensor");
    Ok(match d.as_str() {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        other => {
            return Err(Error::UnsupportedDType {
                tensor: name.to_string(),
                file: files
                    .file_of(name)
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                dtype: other.to_string(),
            })
        }
    })
}
