//! A model folder's weights: `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`, memory-mapped.
//!
//! Every tensor the model takes is checked against the shape its config implies, and after
//! loading, every tensor the model did not take is reported — a missing, extra or
//! mis-shaped tensor is an error naming the tensor, the file and both shapes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Tensor};
use safetensors::Dtype;

use crate::error::{Error, Result};

/// Where one tensor lives.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    shape: Vec<usize>,
    dtype: Dtype,
}

/// The weight files of one model folder.
pub struct WeightFiles {
    paths: Vec<PathBuf>,
    files: Vec<MmapedSafetensors>,
    /// Tensors held in memory instead of files (random-init models), keyed by name.
    memory: BTreeMap<String, Tensor>,
    entries: BTreeMap<String, Entry>,
    taken: Mutex<BTreeSet<String>>,
}

impl std::fmt::Debug for WeightFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightFiles")
            .field("paths", &self.paths)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

/// Tensors some checkpoints carry that no model here uses; ignored rather than refused.
fn ignorable(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

/// The weight files of `model_dir` (the index's shards in name order, or the one file) and,
/// for shards, which file holds each tensor.
type Layout = (Vec<PathBuf>, Option<HashMap<String, String>>);

/// A fingerprint (SHA-256, hex) of the base model in `model_dir`, cheap enough for every
/// start: `config.json`, and per weight file its name, length, whole safetensors header
/// (every tensor's name, dtype, shape and offsets) and 64 evenly spaced 4 KiB samples of
/// its data. Another model, or a fine-tuned copy of the same one, changes it; an edit
/// confined to bytes between the samples does not. A resume checks it, so that an adapter
/// is never trained on further against a base model it did not start from.
pub fn model_fingerprint(model_dir: &Path) -> Result<String> {
    use sha2::Digest;
    use std::os::unix::fs::FileExt;
    const SAMPLES: u64 = 64;
    const BLOCK: u64 = 4096;
    let mut h = sha2::Sha256::new();
    h.update(b"ringtune-model-v1\0");
    let config = model_dir.join("config.json");
    let text = std::fs::read(&config).map_err(|e| Error::io(&config, e))?;
    h.update((text.len() as u64).to_le_bytes());
    h.update(&text);
    let (paths, _) = weight_layout(model_dir)?;
    for p in &paths {
        let f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
        let len = f.metadata().map_err(|e| Error::io(p, e))?.len();
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        h.update(name.unwrap_or_default().as_bytes());
        h.update([0]);
        h.update(len.to_le_bytes());
        let read = |off: u64, n: u64| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; n as usize];
            f.read_exact_at(&mut buf, off)
                .map_err(|e| Error::io(p, e))?;
            Ok(buf)
        };
        // The header: an 8-byte length, then that much JSON (bounded by the file).
        let header = if len >= 8 {
            let n = u64::from_le_bytes(read(0, 8)?.try_into().expect("8 bytes"));
            read(8, n.min(len - 8).min(100 << 20))?
        } else {
            read(0, len)?
        };
        h.update(&header);
        if len > BLOCK {
            for i in 0..SAMPLES {
                h.update(read(i * (len - BLOCK) / (SAMPLES - 1), BLOCK)?);
            }
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn weight_layout(model_dir: &Path) -> Result<Layout> {
    let index = model_dir.join("model.safetensors.index.json");
    let single = model_dir.join("model.safetensors");
    let (paths, routing): (Vec<PathBuf>, Option<HashMap<String, String>>) = if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: index.clone(),
            source,
        })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::MissingField {
                path: index.clone(),
                field: "weight_map".into(),
            })?;
        let mut routing = HashMap::new();
        let mut names = BTreeSet::new();
        for (k, f) in map {
            let f = f.as_str().ok_or_else(|| Error::InvalidField {
                path: index.clone(),
                field: format!("weight_map.{k}"),
                reason: "expected a file name".into(),
            })?;
            // A shard name must stay inside the folder.
            if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                return Err(Error::InvalidField {
                    path: index.clone(),
                    field: format!("weight_map.{k}"),
                    reason: format!("file name {f:?} is not a plain file name"),
                });
            }
            names.insert(f.to_string());
            routing.insert(k.clone(), f.to_string());
        }
        (
            names.into_iter().map(|n| model_dir.join(n)).collect(),
            Some(routing),
        )
    } else if single.is_file() {
        (vec![single], None)
    } else {
        return Err(Error::io(
            &single,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no model.safetensors or model.safetensors.index.json in the model folder",
            ),
        ));
    };
    for p in &paths {
        if !p.is_file() {
            return Err(Error::io(
                p,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "shard listed in the index is missing",
                ),
            ));
        }
    }
    Ok((paths, routing))
}

impl WeightFiles {
    /// Opens the weights of `model_dir`.
    pub fn open(model_dir: &Path) -> Result<Self> {
        let (paths, routing) = weight_layout(model_dir)?;

        let mut files = Vec::with_capacity(paths.len());
        let mut entries = BTreeMap::new();
        for (i, p) in paths.iter().enumerate() {
            // SAFETY: the file is mapped read-only; like every mmap-based loader we rely on
            // nobody truncating the checkpoint while it is being read.
            let mm = unsafe { MmapedSafetensors::new(p) }.map_err(|e| Error::Safetensors {
                path: p.clone(),
                reason: e.to_string(),
            })?;
            for (name, view) in mm.tensors() {
                if let Some(r) = &routing {
                    match r.get(&name) {
                        Some(f)
                            if p.file_name()
                                .is_some_and(|n| n.to_string_lossy() == f.as_str()) => {}
                        // Listed under another shard (or not at all): the index decides.
                        _ => continue,
                    }
                }
                entries.insert(
                    name,
                    Entry {
                        file: i,
                        shape: view.shape().to_vec(),
                        dtype: view.dtype(),
                    },
                );
            }
            files.push(mm);
        }
        if let Some(r) = &routing {
            for (name, f) in r {
                if !entries.contains_key(name) {
                    return Err(Error::MissingTensor {
                        tensor: name.clone(),
                        file: model_dir.join(f).display().to_string(),
                    });
                }
            }
        }
        Ok(WeightFiles {
            paths,
            files,
            memory: BTreeMap::new(),
            entries,
            taken: Mutex::new(BTreeSet::new()),
        })
    }

    /// Weights held in memory (e.g. a random init), checked like files; errors name the
    /// file as `<memory>`.
    pub fn from_tensors(tensors: Vec<(String, Tensor)>) -> Result<Self> {
        let mut entries = BTreeMap::new();
        let mut memory = BTreeMap::new();
        for (name, t) in tensors {
            let dtype = match t.dtype() {
                DType::F32 => Dtype::F32,
                DType::BF16 => Dtype::BF16,
                DType::F16 => Dtype::F16,
                d => {
                    return Err(Error::UnsupportedDType {
                        tensor: name,
                        file: "<memory>".into(),
                        dtype: format!("{d:?}"),
                    })
                }
            };
            entries.insert(
                name.clone(),
                Entry {
                    file: 0,
                    shape: t.dims().to_vec(),
                    dtype,
                },
            );
            memory.insert(name, t);
        }
        Ok(WeightFiles {
            paths: vec![PathBuf::from("<memory>")],
            files: Vec::new(),
            memory,
            entries,
            taken: Mutex::new(BTreeSet::new()),
        })
    }

    /// The files' description for error messages.
    fn all_files(&self) -> String {
        self.paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Names of every tensor.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The on-disk shape and dtype name of a tensor.
    pub fn info(&self, name: &str) -> Option<(Vec<usize>, String)> {
        self.entries
            .get(name)
            .map(|e| (e.shape.clone(), format!("{:?}", e.dtype)))
    }

    /// The file holding a tensor.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.entries.get(name).map(|e| self.paths[e.file].as_path())
    }

    /// Loads `name`, checking its shape, converted to `dtype` on `device`.
    pub fn take(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let e = self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            tensor: name.to_string(),
            file: self.all_files(),
        })?;
        let file = self.paths[e.file].display().to_string();
        if e.shape != shape {
            return Err(Error::ShapeMismatch {
                tensor: name.to_string(),
                file,
                expected: shape.to_vec(),
                found: e.shape.clone(),
            });
        }
        if !matches!(e.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
            return Err(Error::UnsupportedDType {
                tensor: name.to_string(),
                file,
                dtype: format!("{:?}", e.dtype),
            });
        }
        if let Some(t) = self.memory.get(name) {
            let t = t.to_device(device)?;
            let t = if t.dtype() == dtype {
                t
            } else {
                t.to_dtype(dtype)?
            };
            self.taken
                .lock()
                .expect("taken set poisoned")
                .insert(name.to_string());
            return Ok(t);
        }
        let view = self.files[e.file]
            .get(name)
            .map_err(|err| Error::Safetensors {
                path: self.paths[e.file].clone(),
                reason: err.to_string(),
            })?;
        let t = view.load(device).map_err(|err| Error::Safetensors {
            path: self.paths[e.file].clone(),
            reason: format!("tensor `{name}`: {err}"),
        })?;
        let t = if t.dtype() == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        };
        self.taken
            .lock()
            .expect("taken set poisoned")
            .insert(name.to_string());
        Ok(t)
    }

    /// Marks a tensor as deliberately unused (e.g. a stored `lm_head.weight` of a tied model).
    pub fn skip(&self, name: &str) {
        self.taken
            .lock()
            .expect("taken set poisoned")
            .insert(name.to_string());
    }

    /// Errors on the first tensor that was neither taken nor skipped.
    pub fn check_all_taken(&self) -> Result<()> {
        let taken = self.taken.lock().expect("taken set poisoned");
        for (name, e) in &self.entries {
            if !taken.contains(name) && !ignorable(name) {
                return Err(Error::UnexpectedTensor {
                    tensor: name.clone(),
                    file: self.paths[e.file].display().to_string(),
                });
            }
        }
        Ok(())
    }
}

/// A prefix into [`WeightFiles`], like candle's `VarBuilder::pp`, so the model code reads
/// like the checkpoint's key names.
#[derive(Clone, Copy)]
pub struct Vb<'a> {
    pub(crate) files: &'a WeightFiles,
    pub(crate) dtype: DType,
    pub(crate) device: &'a Device,
}

/// A [`Vb`] with a key prefix.
#[derive(Clone)]
pub struct VbPath<'a> {
    vb: Vb<'a>,
    prefix: String,
}

impl<'a> Vb<'a> {
    /// The root (no prefix).
    pub fn root(self) -> VbPath<'a> {
        VbPath {
            vb: self,
            prefix: String::new(),
        }
    }
}

impl<'a> VbPath<'a> {
    /// Descends into `name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> VbPath<'a> {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        VbPath {
            vb: self.vb,
            prefix,
        }
    }

    /// The full key of `name` under this prefix.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The prefix itself (the HF module path).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Loads `name` with the given shape in the compute dtype.
    pub fn get(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        self.vb
            .files
            .take(&self.key(name), shape, self.vb.dtype, self.vb.device)
    }

    /// Whether `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.vb.files.contains(&self.key(name))
    }

    /// The files.
    pub fn files(&self) -> &'a WeightFiles {
        self.vb.files
    }

    /// The device.
    pub fn device(&self) -> &'a Device {
        self.vb.device
    }
}
