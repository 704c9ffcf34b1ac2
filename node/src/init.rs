//! Random-init model folders with a matching tokenizer, for the quickstart and for tests:
//! no model hub is needed, so a fresh machine with no network can train.
//!
//! The tokenizer is data's offline quickstart BPE (trained on the bundled chat data); the
//! model is a model preset's shape with its vocabulary set to the tokenizer's. The folder
//! is built in a temp folder beside `out` and renamed into place, so an interrupted init
//! never leaves a half-written model that a later run would try to load.

use std::fs;
use std::path::{Path, PathBuf};

use ringtune_data::quickstart::{write_quickstart_tokenizer, QuickstartTokenizerOptions};
use ringtune_data::{RendererName, Tokenizer};
use ringtune_model::{write_random_model, ModelPreset};

use crate::error::{io_err, Error, Result};

/// What [`init_model`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    /// The model folder.
    pub dir: PathBuf,
    /// The preset's name.
    pub preset: String,
    /// Vocabulary size of both the tokenizer and the embedding.
    pub vocab_size: usize,
    /// Number of base-model parameters.
    pub parameters: usize,
}

/// Preset names [`init_model`] accepts.
pub const PRESETS: [&str; 3] = ["quickstart", "tiny", "smol"];

/// Writes a random-init Hugging Face model folder of `preset` (`quickstart`, `tiny`,
/// `smol`) into `out`, which must not exist: config.json, generation_config.json,
/// model.safetensors, tokenizer.json, tokenizer_config.json. `vocab_size` is the
/// tokenizer's target size (training may stop below it; the model uses the real size).
pub fn init_model(preset: &str, out: &Path, seed: u64, vocab_size: usize) -> Result<InitReport> {
    if !PRESETS.contains(&preset) {
        return Err(Error::Invalid(format!(
            "unknown model preset `{preset}`, expected one of {}",
            PRESETS.map(|p| format!("`{p}`")).join(", ")
        )));
    }
    if out.exists() {
        return Err(Error::Invalid(format!(
            "{} already exists; init-model writes a new folder only",
            out.display()
        )));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let name = out
        .file_name()
        .map_or("model".into(), |n| n.to_string_lossy().into_owned());
    let tmp = parent.join(format!(".tmp-init-{name}-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    let result = write_into(preset, &tmp, seed, vocab_size);
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    fs::rename(&tmp, out).map_err(io_err(out))?;
    fs::File::open(&parent)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&parent))?;
    Ok(InitReport {
        dir: out.to_owned(),
        ..report
    })
}

fn write_into(preset: &str, dir: &Path, seed: u64, vocab_size: usize) -> Result<InitReport> {
    let opts = QuickstartTokenizerOptions {
        vocab_size,
        renderer: RendererName::RoleColon,
    };
    let vocab = write_quickstart_tokenizer(dir, &opts)?;
    let tok = Tokenizer::from_dir(dir)?;
    let mut cfg = ModelPreset::from_name(preset, Some(vocab))?.config();
    // The presets' own vocabularies (32000, 49152) belong to real tokenizers we do not
    // have offline; the embedding must match the tokenizer we ship instead.
    cfg.vocab_size = vocab;
    cfg.bos_token_id = tok.special_tokens().bos.as_ref().map(|t| t.id);
    cfg.eos_token_id = tok.special_tokens().eos.as_ref().map(|t| t.id);
    write_random_model(dir, &cfg, seed)?;
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let p = entry.map_err(io_err(dir))?.path();
        fs::File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&p))?;
    }
    Ok(InitReport {
        dir: dir.to_owned(),
        preset: preset.to_owned(),
        vocab_size: vocab,
        parameters: cfg.num_parameters(),
    })
}
