//! The tokenizer of a model folder: `tokenizer.json` (through the tokenizers
//! crate) plus what Hugging Face keeps beside it — the special tokens and chat
//! template in `tokenizer_config.json` and the end-of-sequence ids in
//! `generation_config.json`.
//!
//! Encoding never adds special tokens on its own (no post-processor BOS):
//! renderers decide exactly which special tokens a sequence holds. Special
//! tokens written literally in the text (`<|im_end|>`) are matched as single
//! tokens, as `transformers` does by default.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Error, Result};

/// Config files larger than this are refused rather than read into memory.
const MAX_CONFIG_BYTES: u64 = 64 << 20;
/// `tokenizer.json` files larger than this are refused (the largest real ones
/// are tens of MiB).
const MAX_TOKENIZER_BYTES: u64 = 1 << 30;

/// A special token: its text and id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialToken {
    /// The token text, e.g. `<|im_end|>`.
    pub text: String,
    /// Its id in the vocabulary.
    pub id: u32,
}

/// The special tokens a model folder declares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// `bos_token` from `tokenizer_config.json`.
    pub bos: Option<SpecialToken>,
    /// `eos_token` from `tokenizer_config.json`.
    pub eos: Option<SpecialToken>,
    /// `pad_token` from `tokenizer_config.json`.
    pub pad: Option<SpecialToken>,
    /// `eos_token_id` from `generation_config.json` (an int or a list there).
    pub generation_eos_ids: Vec<u32>,
}

/// A tokenizer with its model folder's special tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
    chat_template: Option<String>,
    source: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .finish()
    }
}

fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.len() > limit {
        return Err(Error::Tokenizer {
            path: path.to_path_buf(),
            message: format!(
                "file is {} bytes, more than the {limit} accepted",
                meta.len()
            ),
        });
    }
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = read_bounded(path, MAX_CONFIG_BYTES)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::TokenizerConfig {
        path: path.to_path_buf(),
        field: "(file)".into(),
        message: format!("not valid JSON: {e}"),
    })
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`, and `dir/tokenizer_config.json` and
    /// `dir/generation_config.json` when present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(Error::Tokenizer {
                path: tok_path,
                message: "no tokenizer.json in the model folder (ringtune reads the fast-tokenizer file, not tokenizer.model)".into(),
            });
        }
        let mut tok = Self::from_file(&tok_path)?;
        let cfg_path = dir.join("tokenizer_config.json");
        if cfg_path.is_file() {
            tok.apply_tokenizer_config(&cfg_path)?;
        }
        let gen_path = dir.join("generation_config.json");
        if gen_path.is_file() {
            tok.apply_generation_config(&gen_path)?;
        }
        Ok(tok)
    }

    /// Loads a bare `tokenizer.json`, with no special-token metadata.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = read_bounded(path, MAX_TOKENIZER_BYTES)?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            message: format!("cannot parse tokenizer: {e}"),
        })?;
        Ok(Self::from_parts(
            inner,
            SpecialTokens::default(),
            None,
            path,
        ))
    }

    /// Wraps an in-memory tokenizer (tests, the quickstart builder).
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        special: SpecialTokens,
        chat_template: Option<String>,
        source: impl Into<PathBuf>,
    ) -> Self {
        Self {
            inner,
            special,
            chat_template,
            source: source.into(),
        }
    }

    /// Reads special tokens, added tokens and the chat template from a
    /// `tokenizer_config.json`.
    pub fn apply_tokenizer_config(&mut self, path: &Path) -> Result<()> {
        let cfg = read_json(path)?;
        let obj = cfg.as_object().ok_or_else(|| Error::TokenizerConfig {
            path: path.to_path_buf(),
            field: "(file)".into(),
            message: format!("expected a JSON object, found {}", json_type(&cfg)),
        })?;
        let bad = |field: &str, message: String| Error::TokenizerConfig {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };

        // Added tokens first: bos/eos may name one of them.
        if let Some(decoder) = obj.get("added_tokens_decoder") {
            let map = decoder.as_object().ok_or_else(|| {
                bad(
                    "added_tokens_decoder",
                    format!("expected an object, found {}", json_type(decoder)),
                )
            })?;
            let mut entries: Vec<(u32, String, bool)> = Vec::with_capacity(map.len());
            for (key, entry) in map {
                let field = format!("added_tokens_decoder.{key}");
                let id: u32 = key
                    .parse()
                    .map_err(|_| bad(&field, "key is not a token id".into()))?;
                let content = entry
                    .get("content")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(&field, "missing string `content`".into()))?;
                let special = entry
                    .get("special")
                    .and_then(Value::as_bool)
                    .unwrap_or(true);
                entries.push((id, content.to_string(), special));
            }
            // Ids in order, so tokens missing from tokenizer.json get appended
            // at the ids the config declares (or we notice that they cannot).
            entries.sort();
            for (id, content, special) in entries {
                let field = format!("added_tokens_decoder.{id}");
                match self.inner.token_to_id(&content) {
                    Some(have) if have == id => {}
                    Some(have) => {
                        return Err(bad(
                            &field,
                            format!("{content:?} has id {id} here but {have} in tokenizer.json"),
                        ))
                    }
                    None => {
                        let tok = tokenizers::AddedToken::from(content.clone(), special);
                        let added = if special {
                            self.inner.add_special_tokens([tok])
                        } else {
                            self.inner.add_tokens([tok])
                        };
                        added.map_err(|e| bad(&field, format!("cannot add {content:?}: {e}")))?;
                        let got = self.inner.token_to_id(&content);
                        if got != Some(id) {
                            return Err(bad(
                                &field,
                                format!(
                                    "{content:?} is not in tokenizer.json and adding it gives id {}, not {id}",
                                    got.map_or("none".to_string(), |g| g.to_string())
                                ),
                            ));
                        }
                    }
                }
            }
        }

        for (field, slot) in [("bos_token", 0), ("eos_token", 1), ("pad_token", 2)] {
            let Some(v) = obj.get(field) else { continue };
            let text = match v {
                Value::Null => continue,
                Value::String(s) => s.clone(),
                Value::Object(o) => match o.get("content") {
                    Some(Value::String(s)) => s.clone(),
                    _ => return Err(bad(field, "object without a string `content`".into())),
                },
                other => {
                    return Err(bad(
                        field,
                        format!(
                            "expected a string, an object or null, found {}",
                            json_type(other)
                        ),
                    ))
                }
            };
            // Some configs (Llama 3 base) write "" for "none".
            if text.is_empty() {
                continue;
            }
            let id = self
                .inner
                .token_to_id(&text)
                .ok_or_else(|| bad(field, format!("{text:?} is not a token of tokenizer.json")))?;
            let st = Some(SpecialToken { text, id });
            match slot {
                0 => self.special.bos = st,
                1 => self.special.eos = st,
                _ => self.special.pad = st,
            }
        }

        if let Some(t) = obj.get("chat_template") {
            self.chat_template = match t {
                Value::Null => None,
                Value::String(s) => Some(s.clone()),
                // Some models ship named templates: [{"name": "default", "template": ...}].
                Value::Array(list) => {
                    let pick = list
                        .iter()
                        .find(|e| e.get("name").and_then(Value::as_str) == Some("default"))
                        .or_else(|| list.first());
                    match pick.and_then(|e| e.get("template")).and_then(Value::as_str) {
                        Some(s) => Some(s.to_string()),
                        None => {
                            return Err(bad(
                                "chat_template",
                                "a list without a `template` string".into(),
                            ))
                        }
                    }
                }
                other => {
                    return Err(bad(
                        "chat_template",
                        format!("expected a string or a list, found {}", json_type(other)),
                    ))
                }
            };
        }
        Ok(())
    }

    /// Reads `eos_token_id` (an int or a list of ints) from a
    /// `generation_config.json`.
    pub fn apply_generation_config(&mut self, path: &Path) -> Result<()> {
        let cfg = read_json(path)?;
        let bad = |message: String| Error::TokenizerConfig {
            path: path.to_path_buf(),
            field: "eos_token_id".into(),
            message,
        };
        let vocab = self.vocab_size() as u64;
        let check = |v: &Value| -> Result<u32> {
            let id = v
                .as_u64()
                .ok_or_else(|| bad(format!("expected a token id, found {}", json_type(v))))?;
            if id >= vocab {
                return Err(bad(format!(
                    "id {id} is outside the vocabulary ({vocab} tokens)"
                )));
            }
            Ok(id as u32)
        };
        let ids = match cfg.get("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(list)) => list.iter().map(check).collect::<Result<Vec<_>>>()?,
            Some(v) => vec![check(v)?],
        };
        self.special.generation_eos_ids = ids;
        Ok(())
    }

    /// The wrapped tokenizers-crate tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Where the tokenizer was loaded from (for error messages).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The special tokens from the model folder's configs.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// The chat template (Jinja source) from `tokenizer_config.json`.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token by its exact text.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id(text)
    }

    /// Token ids that end generation: the config's `eos_token` and every
    /// `generation_config.json` `eos_token_id`, deduplicated, sorted.
    pub fn stop_token_ids(&self) -> Vec<u32> {
        let mut ids: BTreeSet<u32> = self.special.generation_eos_ids.iter().copied().collect();
        if let Some(e) = &self.special.eos {
            ids.insert(e.id);
        }
        ids.into_iter().collect()
    }

    /// A token id to pad with: `pad_token`, else `eos_token`, else 0. Padded
    /// positions carry weight 0, so the choice only has to be a valid id.
    pub fn pad_id(&self) -> u32 {
        self.special
            .pad
            .as_ref()
            .or(self.special.eos.as_ref())
            .map(|t| t.id)
            .unwrap_or(0)
    }

    /// Encodes text without adding any special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer {
                path: self.source.clone(),
                message: format!("encode failed: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text; `skip_special` drops special tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer {
                path: self.source.clone(),
                message: format!("decode failed: {e}"),
            })
    }
}
