//! The supervised training loop: data → micro-batches → forward/backward → gradient sync →
//! AdamW, with metrics, evaluation and checkpoints.
//!
//! One global step:
//! 1. the next global batch (seeded epoch order, [`BatchSampler`]) is split into
//!    micro-batches under the token budget;
//! 2. each micro-batch's forward_backward gives the gradient of its loss *sum*; they are
//!    summed into one flat f32 buffer, followed by two scalars: Σw (the loss normaliser)
//!    and Σ −logp·w (on a GPU the gradient part of that buffer stays in device memory:
//!    see [`crate::optim`]);
//! 3. [`StepSync::all_reduce_sum`] sums that buffer over ranks (a no-op for one rank;
//!    [`StepSync::all_reduce_device`] where the sync sums device memory);
//! 4. gradients are divided by the global Σw, so the step follows the gradient of
//!    `Σ −logp·w / Σ w` over the whole global batch, however it was split;
//! 5. AdamW steps the flat parameters at the schedule's learning rate (on the host, or on
//!    the model's GPU).
//!
//! Everything a step depends on — adapter bits, AdamW moments and step, the data cursor,
//! the dropout pass counter — is in the checkpoint, so a resumed run continues bit-exactly.
//!
//! Not here: process spawning, signals, progress bars (the CLI), and the network (the
//! distributed runtime provides a [`StepSync`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use ringtune_config::{self as config, ConfigHash, RunConfig};
use ringtune_data::{
    load_jsonl, micro_batches, split_holdout, BatchSampler, DataCursor, DataReport, Datum,
    LoadOptions, OverflowPolicy, Renderer, RendererName, Tokenizer, TrainOnWhat,
};
use ringtune_model::lora::Adapters;
use ringtune_model::{
    resolve_model_dir, AdamW, AdamWConfig, Batch, DType, Device, LoraConfig, LoraModel, LossKind,
    LrSchedule, ScheduleKind,
};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{write_file_atomic, CheckpointRecord, RunDir};
use crate::error::{io_err, Error, Result};
use crate::metrics::{MetricsLog, StepMetrics};
use crate::optim::{Optimizer, StepGrads};

/// Sums the step's flat buffer over every rank. The buffer holds the adapter gradients in
/// layout order followed by Σw and Σ −logp·w. One rank: [`LocalSync`]. The distributed
/// runtime implements it over `ringtune_collectives::GradSync::all_reduce_sum` (one call
/// per step, so every rank issues the same sequence of collectives).
pub trait StepSync {
    /// Replaces `buf` by its element-wise sum over all ranks (identical on every rank).
    fn all_reduce_sum(&mut self, step: u64, buf: &mut [f32]) -> std::result::Result<(), String>;

    /// Whether this process is the only rank (the sum is the local value, and gradients kept
    /// on a GPU need not come to the host for it).
    fn is_local(&self) -> bool {
        false
    }

    /// Sums `grads` (the step's flat f32 gradient on the model's GPU) and `tail` (its host
    /// scalars) over every rank in one collective, without a host round trip, where this
    /// sync can (NCCL): `Some` with the summed gradient (and `tail` summed in place). `None`:
    /// it cannot, and the caller sums one host buffer with [`StepSync::all_reduce_sum`].
    fn all_reduce_device(
        &mut self,
        _step: u64,
        _grads: &ringtune_model::Tensor,
        _tail: &mut [f32],
    ) -> Option<std::result::Result<ringtune_model::Tensor, String>> {
        None
    }
}

/// World size 1: the local sum is the global sum.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalSync;

impl StepSync for LocalSync {
    fn all_reduce_sum(&mut self, _step: u64, _buf: &mut [f32]) -> std::result::Result<(), String> {
        Ok(())
    }

    fn is_local(&self) -> bool {
        true
    }
}

/// Written as `state.json` in every checkpoint: what is needed besides the adapter and the
/// optimizer file to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainState {
    /// Format version of this file.
    pub version: u32,
    /// Optimiser steps taken.
    pub step: u64,
    /// The semantic hash of the config that wrote it.
    pub config_hash: ConfigHash,
    /// The config's semantic entries, to name what changed when the hash differs.
    pub config: std::collections::BTreeMap<String, String>,
    /// Where the data stream stands.
    pub cursor: DataCursor,
    /// forward_backward calls made so far: the model draws dropout masks from
    /// `(seed, pass number)`, so this is the dropout RNG's state.
    pub dropout_passes: u64,
    /// Seconds of training before this checkpoint (over all resumed segments).
    pub elapsed_s: f64,
    /// FNV-1a of the adapter bits, checked after loading.
    pub params_fingerprint: u64,
    /// SHA-256 (hex) of the training data as tokenized (every example's tokens and
    /// weights, in file order; see [`data_fingerprint`]): a resume refuses other data at
    /// the same path. Absent in checkpoints written before it existed (not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_fingerprint: Option<String>,
    /// [`ringtune_model::model_fingerprint`] of the base model: a resume refuses another
    /// model at the same path. Absent in checkpoints written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_fingerprint: Option<String>,
}

/// Refuses to resume the checkpoint in `dir` on a base model other than the one it was
/// trained on (`then`: its recorded fingerprint, if any).
pub(crate) fn check_model_fingerprint(
    dir: &Path,
    model_dir: &Path,
    then: Option<&String>,
    now: &str,
) -> Result<()> {
    match then {
        Some(then) if then != now => Err(Error::Invalid(format!(
            "{}: the base model changed since this checkpoint was written ({} has \
             fingerprint {:.12}, the checkpoint's model {:.12}): resume on the model it was \
             trained on, or start a new run in another output_dir",
            dir.display(),
            model_dir.display(),
            now,
            then
        ))),
        _ => Ok(()),
    }
}

/// Valid settings that will not do what they say with this model, data and run length:
/// an eval cadence with no eval data, a warm-up that outlasts the run, examples longer than
/// the model's context. Said at start-up instead of silently ignored.
pub fn setup_warnings(
    cfg: &RunConfig,
    max_positions: usize,
    total_steps: u64,
    n_eval: usize,
) -> Vec<String> {
    let mut w = Vec::new();
    if cfg.train.eval_every > 0 && n_eval == 0 {
        w.push(format!(
            "train.eval_every = {} but there is no eval data (set data.eval or \
             data.eval_fraction): no eval will run",
            cfg.train.eval_every
        ));
    }
    let warmup = cfg.schedule.warmup_steps;
    if warmup > 0 && warmup >= total_steps {
        w.push(format!(
            "schedule.warmup_steps = {warmup} is not below the run's {total_steps} steps: the \
             learning rate never reaches optimizer.lr"
        ));
    }
    if max_positions > 0 && cfg.data.max_length > max_positions {
        w.push(format!(
            "data.max_length = {} exceeds the model's max_position_embeddings = \
             {max_positions}: longer examples train on positions the model has not seen",
            cfg.data.max_length
        ));
    }
    w
}

/// A LoRA rank above the smaller side of an adapted layer (`lora_A` is `[r, in]`, `lora_B`
/// `[out, r]`): that adapter's update has rank at most that side, so the rest costs memory
/// and compute for nothing (PEFT accepts it silently). Names the narrowest layer.
pub fn rank_warning(rank: usize, layout: &ringtune_model::ParamLayout) -> Option<String> {
    let mut narrowest: Option<(usize, &str)> = None;
    let mut over = 0usize;
    for (name, shape) in layout.entries() {
        let side = if name.ends_with(".lora_A.weight") {
            shape.get(1)
        } else if name.ends_with(".lora_B.weight") {
            shape.first()
        } else {
            None
        };
        let Some(&d) = side else { continue };
        if d < rank {
            over += 1;
            if narrowest.is_none_or(|(n, _)| d < n) {
                narrowest = Some((d, name));
            }
        }
    }
    let (d, name) = narrowest?;
    let module = name
        .trim_start_matches("base_model.model.")
        .trim_end_matches(".weight")
        .trim_end_matches(".lora_A")
        .trim_end_matches(".lora_B");
    Some(format!(
        "lora.rank = {rank} is above a side of {over} adapter matrices (the narrowest: {module}, \
         {d} features): their updates have rank at most that, so the extra rank only costs \
         memory and compute"
    ))
}

/// SHA-256 (hex) over the training examples as the trainer sees them — count, then each
/// example's length, token ids and weight bits — so that a changed file, tokenizer or
/// data setting changes it. Cheap next to tokenizing (one pass over the token ids).
pub(crate) fn data_fingerprint<'a>(examples: impl Iterator<Item = &'a Datum>) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"ringtune-data-v1");
    let mut n = 0u64;
    for d in examples {
        n += 1;
        h.update((d.tokens.len() as u64).to_le_bytes());
        for t in &d.tokens {
            h.update(t.to_le_bytes());
        }
        for w in &d.weights {
            h.update(w.to_bits().to_le_bytes());
        }
    }
    h.update(n.to_le_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

const STATE_VERSION: u32 = 1;
pub(crate) const STATE_FILE: &str = "state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// What the trainer reports as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// A step finished (its line is already in metrics.jsonl).
    Step(&'a StepMetrics),
    /// A checkpoint is complete and listed.
    Checkpoint(&'a CheckpointRecord),
}

/// How [`Trainer::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// All steps done; the final checkpoint is written.
    Finished {
        /// Steps taken in total.
        step: u64,
    },
    /// Stopped early by the stop flag; a checkpoint of this step is written.
    Interrupted {
        /// Steps taken in total.
        step: u64,
    },
}

/// How a trainer (SFT/DPO or RL) was started.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Mode {
    /// `ringtune train` with one node: the trainer owns the whole run folder.
    Local { resume: bool },
    /// One rank of a distributed run.
    Node { resume_from: u64, writes: bool },
}

/// A training run on this process.
pub struct Trainer {
    cfg: RunConfig,
    hash: ConfigHash,
    run: RunDir,
    model: LoraModel,
    train: Vec<Datum>,
    eval: Vec<Datum>,
    reports: Vec<DataReport>,
    sampler: BatchSampler,
    opt: Optimizer,
    schedule: LrSchedule,
    step: u64,
    start_step: u64,
    total_steps: u64,
    pad_id: u32,
    /// `None` for a rank of a distributed run: the coordinator writes the run's metrics.
    metrics: Option<MetricsLog>,
    elapsed_before: f64,
    segment_start: Instant,
    dropout_passes: u64,
    last_loss: Option<f64>,
    last_saved: Option<u64>,
    /// This rank's (Σ −logp·w, Σw) of the last step, before the all-reduce.
    last_local: (f64, f64),
    sync: Box<dyn StepSync>,
    /// `train.method = "dpo"`: the preference pairs (`train`/`eval` are then empty).
    dpo: Option<crate::dpo::Dpo>,
    /// [`data_fingerprint`] of the training data, written into every checkpoint.
    data_fp: String,
    /// [`renderer_warning`], for the start-up lines.
    renderer_warning: Option<String>,
    /// [`ringtune_model::model_fingerprint`] of the base model, likewise.
    model_fp: String,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("run", &self.run.root())
            .field("step", &self.step)
            .field("total_steps", &self.total_steps)
            .finish_non_exhaustive()
    }
}

/// Resolves `model.path`, creating the model first when it is a missing local folder and
/// `model.init_preset` is set. Returns the folder.
pub fn prepare_model_dir(cfg: &RunConfig) -> Result<PathBuf> {
    let spec = &cfg.model.path;
    if !spec.starts_with("hf:") {
        let p = Path::new(spec);
        if !p.exists() {
            if let Some(preset) = &cfg.model.init_preset {
                crate::init::init_model(preset, p, cfg.seed, DEFAULT_VOCAB)?;
            }
        }
    }
    Ok(resolve_model_dir(spec)?)
}

/// Target vocabulary of the tokenizer written for `model.init_preset`.
pub const DEFAULT_VOCAB: usize = 2048;

/// The compute device named by the config. `auto` is the GPU of this process's slot on
/// its host ([`local_gpu_index`]: LOCAL_RANK, else SLURM_LOCALID, else 0) when the binary
/// was built with CUDA and a GPU is there, else the CPU.
pub fn device_of(d: config::Device) -> Result<Device> {
    let local = local_gpu_index(|k| std::env::var(k).ok())?;
    device_for(d, local)
}

/// [`device_of`] for a process whose slot on its host is `local` (the node knows it).
pub fn device_for(d: config::Device, local: usize) -> Result<Device> {
    Ok(match resolve_device(d, local)? {
        config::Device::Cuda(i) => Device::new_cuda(i as usize).map_err(|e| {
            Error::Invalid(format!(
                "model.device = \"cuda:{i}\": cannot open the GPU: {e}"
            ))
        })?,
        _ => Device::Cpu,
    })
}

/// `d` made concrete for a process in slot `local`: `cpu` or `cuda:N`. `auto` probes the
/// GPU (a binary without CUDA, or a machine without a GPU, gives the CPU); an explicit
/// `cuda:N` in a binary built without CUDA is an error that names the cargo feature.
pub fn resolve_device(d: config::Device, local: usize) -> Result<config::Device> {
    match choose_device(d, candle_core::utils::cuda_is_available(), local)? {
        config::Device::Auto => unreachable!("choose_device never returns auto"),
        c @ config::Device::Cuda(i) if d == config::Device::Auto => {
            if Device::new_cuda(i as usize).is_ok() {
                Ok(c)
            } else if i != 0 && Device::new_cuda(0).is_ok() {
                // A GPU exists, but not this slot's: more processes than GPUs.
                Err(Error::Invalid(format!(
                    "model.device = \"auto\": this process's slot is {i} (LOCAL_RANK / \
                     SLURM_LOCALID) but there is no cuda:{i}; start one process per GPU or \
                     name the device (--device cuda:N)"
                )))
            } else {
                Ok(config::Device::Cpu)
            }
        }
        c => Ok(c),
    }
}

/// The pure part of [`resolve_device`]: what `d` asks for in a binary built with or
/// without CUDA (`cuda_built`), for the process in slot `local`. `auto` → `cuda:local`
/// when built with CUDA (whether the GPU exists is the caller's probe), else `cpu`.
pub fn choose_device(d: config::Device, cuda_built: bool, local: usize) -> Result<config::Device> {
    match d {
        config::Device::Cpu => Ok(config::Device::Cpu),
        config::Device::Cuda(i) if !cuda_built => Err(Error::Invalid(format!(
            "model.device = \"cuda:{i}\", but this ringtune was built without CUDA: build it \
             with `cargo build --release --features cuda` (`--features cuda,nccl` for NCCL \
             between GPUs), or use device = \"cpu\""
        ))),
        c @ config::Device::Cuda(_) => Ok(c),
        config::Device::Auto if cuda_built => Ok(config::Device::Cuda(local as u32)),
        config::Device::Auto => Ok(config::Device::Cpu),
    }
}

/// This process's GPU slot on its host, from the launcher's environment (`get` reads a
/// variable): LOCAL_RANK (torchrun), else SLURM_LOCALID (srun), else 0. When the launcher
/// gives each process exactly one GPU (CUDA_VISIBLE_DEVICES names one device) the slot is
/// 0 whatever the rank: that one GPU is cuda:0 inside the process.
pub fn local_gpu_index(get: impl Fn(&str) -> Option<String>) -> Result<usize> {
    let visible_one =
        get("CUDA_VISIBLE_DEVICES").is_some_and(|v| !v.trim().is_empty() && !v.contains(','));
    if visible_one {
        return Ok(0);
    }
    for var in ["LOCAL_RANK", "SLURM_LOCALID"] {
        if let Some(v) = get(var) {
            return v.trim().parse::<usize>().map_err(|_| {
                Error::Invalid(format!(
                    "{var}={v:?} is not a process slot number (a non-negative integer)"
                ))
            });
        }
    }
    Ok(0)
}

/// The base-weight dtype named by the config.
pub fn dtype_of(d: config::Dtype) -> DType {
    match d {
        config::Dtype::F32 => DType::F32,
        config::Dtype::Bf16 => DType::BF16,
        config::Dtype::F16 => DType::F16,
    }
}

/// `data.renderer = "auto"` on a tokenizer whose chat template is none that ringtune
/// knows: `auto` falls back to role_colon, which is not the model's own format (a Mistral
/// or Gemma instruct model, say), so the run would train on a format the model never saw.
/// Likewise a ChatML template without Qwen2.5's default system prompt (Qwen3's, say):
/// `qwen` follows Qwen2.5's template, which adds that prompt to a conversation without one.
pub fn renderer_warning(r: config::Renderer, tok: &Tokenizer) -> Option<String> {
    if r != config::Renderer::Auto {
        return None;
    }
    let template = tok.chat_template()?;
    match RendererName::detect(template) {
        None => Some(
            "data.renderer = \"auto\": the tokenizer's chat template is neither Llama 3's nor \
             ChatML (Qwen), so examples are rendered as role_colon (User: …\\n\\nAssistant: \
             …), not in the model's own chat format; set data.renderer to silence this, and \
             check with `ringtune render`"
                .to_string(),
        ),
        Some(RendererName::Qwen)
            if !template.contains(ringtune_data::render::QWEN_DEFAULT_SYSTEM) =>
        {
            Some(
                "data.renderer = \"auto\": the tokenizer's ChatML template is not Qwen2.5's (it \
                 has no default system prompt, as Qwen3's has not), but the qwen renderer \
                 follows Qwen2.5's and puts its default system prompt into every conversation \
                 that has none; give your conversations a system message, set data.renderer = \
                 \"qwen\" to accept it, and check with `ringtune render`"
                    .to_string(),
            )
        }
        Some(_) => None,
    }
}

/// The renderer named by the config (`auto`: from the tokenizer's chat template, else
/// role_colon).
pub fn renderer_of(r: config::Renderer, tok: &Tokenizer) -> Result<Renderer> {
    let name = match r {
        config::Renderer::RoleColon => RendererName::RoleColon,
        config::Renderer::Llama3 => RendererName::Llama3,
        config::Renderer::Qwen => RendererName::Qwen,
        config::Renderer::Auto => tok
            .chat_template()
            .and_then(RendererName::detect)
            .unwrap_or(RendererName::RoleColon),
    };
    Ok(Renderer::new(name, tok)?)
}

/// The training and eval examples and the load reports: the one way every process of a
/// run (the single trainer, each rank, the coordinator's data plan) loads the data, so
/// example indices mean the same everywhere.
pub fn load_examples(
    cfg: &RunConfig,
    tok: &Tokenizer,
) -> Result<(Vec<Datum>, Vec<Datum>, Vec<DataReport>)> {
    let renderer = renderer_of(cfg.data.renderer, tok)?;
    let opts = load_options(cfg);
    let train_set = load_jsonl(&cfg.data.train, Some(&renderer), &opts)?;
    let mut reports = vec![train_set.report.clone()];
    let (train, eval) = match &cfg.data.eval {
        Some(p) => {
            let e = load_jsonl(p, Some(&renderer), &opts)?;
            reports.push(e.report.clone());
            (train_set.examples, e.examples)
        }
        None => split_holdout(train_set.examples, cfg.data.eval_fraction, cfg.seed)?,
    };
    Ok((train, eval, reports))
}

/// Loading options for the config's data section.
pub fn load_options(cfg: &RunConfig) -> LoadOptions {
    let d = &cfg.data;
    LoadOptions {
        train_on: match d.train_on {
            config::TrainOn::LastAssistantMessage => TrainOnWhat::LastAssistantMessage,
            config::TrainOn::AllAssistantMessages => TrainOnWhat::AllAssistantMessages,
            config::TrainOn::AllMessages => TrainOnWhat::AllMessages,
            config::TrainOn::AllTokens => TrainOnWhat::AllTokens,
        },
        max_length: Some(d.max_length),
        overflow: match d.overlong {
            config::Overlong::Truncate => OverflowPolicy::Truncate,
            config::Overlong::Drop => OverflowPolicy::Drop,
            config::Overlong::Error => OverflowPolicy::Error,
        },
        skip_bad_lines: d.skip_bad_lines,
        vocab_size: None,
    }
}

/// The LoRA config from the run config.
pub fn lora_of(cfg: &RunConfig) -> LoraConfig {
    let l = &cfg.lora;
    let mut lc = LoraConfig::from_tinker(l.rank, l.train_attn, l.train_mlp, l.train_unembed);
    if let Some(t) = &l.target_modules {
        // Names checked by the config; in canonical order, as `validated` keeps them.
        lc.target_modules = t
            .names()
            .iter()
            .filter_map(|n| ringtune_model::TargetModule::from_name(n))
            .collect();
        lc.target_modules.sort();
    }
    lc.alpha = l.alpha;
    lc.dropout = l.dropout;
    lc.use_rslora = l.rslora;
    lc
}

/// `model.adapter`: a fresh run starts from that PEFT adapter instead of fresh adapters.
/// The model was built from `[lora]`, so a mismatch (rank, alpha, targets) is named with
/// the keys to set.
pub fn warm_start(cfg: &RunConfig, model: &LoraModel) -> Result<()> {
    let Some(dir) = &cfg.model.adapter else {
        return Ok(());
    };
    model.load_adapter(dir).map_err(|e| {
        Error::Invalid(format!(
            "model.adapter = {}: {e} (set lora.rank, lora.alpha and lora.target_modules to \
             the adapter's)",
            dir.display()
        ))
    })
}

/// Mean NLL per unit weight of `data` under `model` (adapters on or off), in micro-batches
/// of `token_budget` padded tokens. Returns (nll, Σw).
pub fn evaluate(
    model: &LoraModel,
    data: &[Datum],
    token_budget: usize,
    pad_id: u32,
    adapters: Adapters,
) -> Result<(f64, f64)> {
    let indices: Vec<usize> = (0..data.len()).collect();
    let mut loss = 0.0;
    let mut weight = 0.0;
    for mb in micro_batches(data, &indices, token_budget, pad_id)? {
        let b = to_batch(&mb)?;
        let out = model.logprobs(&b, LossKind::CrossEntropy, adapters)?;
        loss += out.loss_sum;
        weight += out.weight_sum;
    }
    Ok((
        if weight > 0.0 {
            loss / weight
        } else {
            f64::NAN
        },
        weight,
    ))
}

fn to_batch(mb: &ringtune_data::MicroBatch) -> Result<Batch> {
    Ok(Batch::new(
        mb.rows(),
        mb.seq_len,
        mb.input_ids.concat(),
        mb.target_ids.concat(),
        mb.weights.concat(),
        mb.lengths.clone(),
    )?)
}

impl Trainer {
    /// Prepares a run: loads (or creates) the model, the tokenizer and the data, and — only
    /// once every input checked out — the run folder. With `resume`, continues from the
    /// newest complete checkpoint in `cfg.output_dir`.
    pub fn new(cfg: RunConfig, resume: bool, sync: Box<dyn StepSync>) -> Result<Self> {
        if cfg.nodes != 1 {
            return Err(Error::Invalid(format!(
                "nodes = {}: a multi-node run is started by `ringtune train` (the local \
                 harness) or `ringtune coordinator` + `ringtune node`, not by Trainer::new",
                cfg.nodes
            )));
        }
        Self::build(cfg, Mode::Local { resume }, sync)
    }

    /// A trainer for one rank of a distributed run (see `crate::distributed`): no
    /// metrics.jsonl (the coordinator writes the run's), no data sampler of its own (the
    /// coordinator says which examples each step uses, via [`Trainer::train_shard`]), and
    /// it starts from the checkpoint written after `resume_from` (0: fresh). Only the rank
    /// that `writes` cleans up interrupted checkpoint writes.
    pub fn for_node(
        cfg: RunConfig,
        resume_from: u64,
        writes: bool,
        sync: Box<dyn StepSync>,
    ) -> Result<Self> {
        Self::build(
            cfg,
            Mode::Node {
                resume_from,
                writes,
            },
            sync,
        )
    }

    fn build(cfg: RunConfig, mode: Mode, sync: Box<dyn StepSync>) -> Result<Self> {
        if cfg.train.method == config::Method::Rl {
            // RL samples its own data each step; its loop is crate::rl::RlTrainer.
            return Err(Error::Invalid(
                "train.method = \"rl\" runs with RlTrainer (`ringtune train` picks it), not \
                 Trainer"
                    .into(),
            ));
        }
        let hash = cfg.semantic_hash();
        let out_dir = cfg.output_dir.clone();
        // Refuse early, before any expensive work, when the folder's state contradicts the flag.
        let latest = starting_checkpoint(&out_dir, mode)?;
        let node_mode = matches!(mode, Mode::Node { .. });
        let cleans = !matches!(mode, Mode::Node { writes: false, .. });
        let resume_state = match &latest {
            Some(rec) => {
                let dir = out_dir.join(&rec.path);
                let state = read_state(&dir.join(STATE_FILE))?;
                if !cfg.same_run_as(&state.config_hash, &state.config) {
                    return Err(Error::ConfigChanged {
                        checkpoint: dir,
                        changed: config::diff_entries(&state.config, &cfg.semantic_entries()),
                    });
                }
                Some((dir, state))
            }
            None => None,
        };

        let model_dir = prepare_model_dir(&cfg)?;
        let tok = Tokenizer::from_dir(&model_dir)?;
        let renderer_warning = renderer_warning(cfg.data.renderer, &tok);
        let (train, eval, reports, dpo) = match cfg.train.method {
            config::Method::Dpo => {
                let d = crate::dpo::Dpo::load(&cfg, &tok)?;
                (Vec::new(), Vec::new(), d.reports().to_vec(), Some(d))
            }
            _ => {
                let (t, e, r) = load_examples(&cfg, &tok)?;
                (t, e, r, None)
            }
        };
        let n_train = dpo.as_ref().map_or(train.len(), crate::dpo::Dpo::train_len);
        let data_fp = match &dpo {
            Some(d) => data_fingerprint(d.train_sequences()),
            None => data_fingerprint(train.iter()),
        };
        if let Some((dir, state)) = &resume_state {
            if let Some(then) = state.data_fingerprint.as_ref().filter(|f| **f != data_fp) {
                return Err(Error::Invalid(format!(
                    "{}: the training data changed since this checkpoint was written ({} \
                     tokenizes to fingerprint {:.12}, the checkpoint's data to {:.12}): resume \
                     with the data it was trained on, or start a new run in another output_dir",
                    dir.display(),
                    cfg.data.train.display(),
                    data_fp,
                    then
                )));
            }
        }
        let model_fp = ringtune_model::model_fingerprint(&model_dir)?;
        if let Some((dir, state)) = &resume_state {
            check_model_fingerprint(dir, &model_dir, state.model_fingerprint.as_ref(), &model_fp)?;
        }
        let pad_id = tok.pad_id();

        let device = device_of(cfg.model.device)?;
        let model = LoraModel::load(
            &model_dir,
            &lora_of(&cfg),
            &device,
            dtype_of(cfg.model.dtype),
            cfg.seed,
        )?;
        model.set_activation_checkpointing(cfg.model.activation_checkpointing);
        // Before the run folder is touched, so a bad adapter leaves nothing behind.
        if resume_state.is_none() {
            warm_start(&cfg, &model)?;
        }
        check_vocab(&model_dir, &tok, &model)?;

        let t = &cfg.train;
        let mut sampler = BatchSampler::new(n_train, t.batch_size, cfg.seed)?;
        let total_steps = match t.max_steps {
            Some(s) => s,
            None => t.epochs * sampler.batches_per_epoch() as u64,
        };
        let adam_cfg = adamw_of(&cfg);
        let schedule = schedule_of(&cfg, total_steps);

        // Inputs are good: now the run folder may be touched.
        let run = RunDir::create(&out_dir)?;
        let (opt, step, elapsed_before, dropout_passes, metrics) = match resume_state {
            Some((dir, state)) => {
                if cleans {
                    run.clean_incomplete()?;
                }
                model.load_adapter(&dir.join("adapter"))?;
                let fp = model.params_fingerprint()?;
                if fp != state.params_fingerprint {
                    return Err(Error::Corrupt {
                        path: dir.join("adapter"),
                        line: 1,
                        message: format!(
                            "adapter fingerprint {fp:016x} differs from the {:016x} recorded in state.json",
                            state.params_fingerprint
                        ),
                    });
                }
                let opt = AdamW::load(
                    &dir.join(OPTIMIZER_FILE),
                    adam_cfg,
                    model.param_layout().clone(),
                )?;
                if opt.step_count() != state.step {
                    return Err(Error::Corrupt {
                        path: dir.join(OPTIMIZER_FILE),
                        line: 1,
                        message: format!(
                            "optimizer step {} differs from state.json's step {}",
                            opt.step_count(),
                            state.step
                        ),
                    });
                }
                sampler = BatchSampler::resume(n_train, t.batch_size, cfg.seed, state.cursor)?;
                // Dropout masks come from (seed, pass number): restoring the counter makes
                // the next pass draw what an uninterrupted run would have drawn.
                model.set_passes(state.dropout_passes);
                let metrics = if node_mode {
                    None
                } else {
                    Some(MetricsLog::resume(&run.metrics_path(), state.step)?)
                };
                (
                    opt,
                    state.step,
                    state.elapsed_s,
                    state.dropout_passes,
                    metrics,
                )
            }
            None => {
                // A fresh run: nothing from an earlier attempt that never checkpointed.
                if cleans {
                    run.clean_incomplete()?;
                }
                let metrics = if node_mode {
                    None
                } else {
                    Some(MetricsLog::create(&run.metrics_path())?)
                };
                (
                    AdamW::new(adam_cfg, model.param_layout().clone()),
                    0,
                    0.0,
                    0,
                    metrics,
                )
            }
        };
        let opt = Optimizer::new(opt, &model)?;
        Ok(Self {
            cfg,
            hash,
            run,
            model,
            train,
            eval,
            reports,
            sampler,
            opt,
            schedule,
            step,
            start_step: step,
            total_steps,
            pad_id,
            metrics,
            elapsed_before,
            segment_start: Instant::now(),
            dropout_passes,
            last_loss: None,
            last_saved: Some(step).filter(|_| step > 0),
            last_local: (0.0, 0.0),
            dpo,
            data_fp,
            renderer_warning,
            model_fp,
            sync,
        })
    }

    /// What loading each data file did (train first, then a separate eval file).
    pub fn data_reports(&self) -> &[DataReport] {
        &self.reports
    }

    /// Settings that are valid but will not do what they say here (see [`setup_warnings`]),
    /// for the start-up lines.
    pub fn warnings(&self) -> Vec<String> {
        let mut w: Vec<String> = self.renderer_warning.iter().cloned().collect();
        w.extend(setup_warnings(
            &self.cfg,
            self.model.config().max_position_embeddings,
            self.total_steps,
            self.example_counts().1,
        ));
        w.extend(rank_warning(self.cfg.lora.rank, self.model.param_layout()));
        w
    }

    /// Examples used for training and for evaluation.
    pub fn example_counts(&self) -> (usize, usize) {
        match &self.dpo {
            Some(d) => (d.train_len(), d.eval_len()),
            None => (self.train.len(), self.eval.len()),
        }
    }

    /// Steps taken so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The step this process started at (0, or the resumed checkpoint's).
    pub fn start_step(&self) -> u64 {
        self.start_step
    }

    /// Steps the run will take in total.
    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// The run folder.
    pub fn run_dir(&self) -> &RunDir {
        &self.run
    }

    /// The model.
    pub fn model(&self) -> &LoraModel {
        &self.model
    }

    /// Trains until `total_steps`, or until `stop` is set (checked between steps), writing a
    /// checkpoint at the save cadence and at the end either way.
    pub fn run(&mut self, stop: &AtomicBool, on_event: &mut dyn FnMut(Event)) -> Result<Outcome> {
        let t = self.cfg.train.clone();
        self.segment_start = Instant::now();
        while self.step < self.total_steps {
            if stop.load(Ordering::SeqCst) {
                self.save_if_needed(on_event)?;
                return Ok(Outcome::Interrupted { step: self.step });
            }
            let mut m = self.train_step()?;
            let last = self.step == self.total_steps;
            let eval_due = self.example_counts().1 > 0
                && (last || (t.eval_every > 0 && self.step.is_multiple_of(t.eval_every)));
            if eval_due && self.dpo.is_some() {
                self.dpo_eval_into(&mut m)?;
            } else if eval_due {
                m.eval_nll = Some(self.eval()?);
            }
            if let Some(log) = &mut self.metrics {
                log.append(&m)?;
            }
            on_event(Event::Step(&m));
            if t.save_every > 0 && self.step.is_multiple_of(t.save_every) && !last {
                let rec = self.save()?;
                on_event(Event::Checkpoint(&rec));
            }
        }
        self.save_if_needed(on_event)?;
        Ok(Outcome::Finished { step: self.step })
    }

    fn save_if_needed(&mut self, on_event: &mut dyn FnMut(Event)) -> Result<()> {
        if self.step > 0 && self.last_saved != Some(self.step) {
            let rec = self.save()?;
            on_event(Event::Checkpoint(&rec));
        }
        Ok(())
    }

    /// One global step; returns its metrics (without eval).
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        let batch = self.sampler.next_batch();
        self.step_on(&batch.indices, batch.epoch)
    }

    /// One step of a distributed run over this rank's `shard` of step `step`'s global batch
    /// (indices into the training examples, as the coordinator planned them; an empty shard
    /// is fine: the rank still joins the all-reduce). `step` must be the next step.
    /// The returned metrics are this rank's (tokens, examples) except loss, weight and
    /// grad_norm, which are global after the all-reduce.
    pub fn train_shard(&mut self, step: u64, shard: &[usize]) -> Result<StepMetrics> {
        if step != self.step + 1 {
            return Err(Error::Invalid(format!(
                "asked to run step {step}, but this rank is at step {} (expects {})",
                self.step,
                self.step + 1
            )));
        }
        let n_train = self.example_counts().0;
        if let Some(&bad) = shard.iter().find(|&&i| i >= n_train) {
            return Err(Error::Invalid(format!(
                "step {step}: example index {bad} is out of range ({n_train} training examples)"
            )));
        }
        // The coordinator planned this step with the same seeded sampler; advancing ours
        // keeps the checkpoint's data cursor (and the epoch in the metrics) true, so a
        // distributed checkpoint resumes right with any world size, and a shard that is not
        // part of our global batch means the plans diverged (other data, other config).
        let global = self.sampler.next_batch();
        if let Some(&stray) = shard.iter().find(|&&i| !global.indices.contains(&i)) {
            return Err(Error::Invalid(format!(
                "step {step}: example {stray} is not in this node's global batch for the step \
                 (the coordinator's data plan differs from this node's: same dataset files?)"
            )));
        }
        self.step_on(shard, global.epoch)
    }

    /// Checks a step's shard against the coordinator's plan: each example's token count
    /// here (DPO: the pair's) must be the one the coordinator planned with. A node reading
    /// another copy of the data — shuffled, stale, another tokenizer — would otherwise train
    /// on other examples without a word (the adapter hashes still agree: every rank applies
    /// the same summed gradient).
    pub fn check_planned(&self, step: u64, planned: &[(usize, usize)]) -> Result<()> {
        for &(i, want) in planned {
            let here = match &self.dpo {
                Some(d) => (i < d.train_len()).then(|| d.pair_tokens(i)),
                None => self.train.get(i).map(|x| x.len()),
            };
            if let Some(here) = here.filter(|&h| h.min(u32::MAX as usize) != want) {
                return Err(Error::Invalid(format!(
                    "step {step}: training example {i} has {here} tokens on this node but {want} \
                     in the coordinator's data plan: every node must read the same dataset \
                     ({}) with the same tokenizer and data settings",
                    self.cfg.data.train.display()
                )));
            }
        }
        Ok(())
    }

    /// The adapter parameters' digest ([`params_sha256`]'s SHA-256 tree over their bits):
    /// equal on two ranks exactly when their adapters are bit-identical.
    pub fn adapter_sha256(&self) -> Result<[u8; 32]> {
        self.opt.params_sha256(&self.model)
    }

    /// This rank's own (Σ −logp·w, Σw) in the last step, before the all-reduce summed them.
    pub fn last_local_sums(&self) -> (f64, f64) {
        self.last_local
    }

    /// The adapter parameters, flat in layout order.
    pub fn params_flat(&self) -> Result<Vec<f32>> {
        self.opt.params_flat(&self.model)
    }

    /// Where AdamW runs: `host`, or `device` (the model's GPU; see [`crate::optim`]).
    pub fn optimizer_placement(&self) -> &'static str {
        self.opt.placement()
    }

    fn step_on(&mut self, indices: &[usize], epoch: u64) -> Result<StepMetrics> {
        let started = Instant::now();
        // DPO: the same buffer shape with the pair count as the normaliser, Σ pair loss, and
        // its own sums after them (see crate::dpo).
        let (grads, tokens) = match self.dpo.as_mut() {
            Some(d) => {
                let budget = self.cfg.train.micro_batch_tokens;
                let mut g = self.opt.new_step(&self.model, crate::dpo::TAIL);
                let tokens = d.accumulate(&self.model, indices, budget, self.pad_id, &mut g)?;
                self.dropout_passes = self.model.passes();
                (g, tokens)
            }
            None => self.sft_accumulate(indices)?,
        };
        self.finish_step(grads, tokens, indices.len(), epoch, started)
    }

    /// SFT's local part of a step: Σ of the micro-batches' cross-entropy gradients, then
    /// Σw and Σ −logp·w; and the target tokens.
    fn sft_accumulate(&mut self, indices: &[usize]) -> Result<(StepGrads, u64)> {
        let mbs = micro_batches(
            &self.train,
            indices,
            self.cfg.train.micro_batch_tokens,
            self.pad_id,
        )?;
        // Gradients, then Σw and Σ −logp·w: one buffer, one all-reduce.
        let mut sum = self.opt.new_step(&self.model, 2);
        let mut tokens = 0u64;
        for mb in &mbs {
            let b = to_batch(mb)?;
            let (out, grads) = self.model.forward_backward(&b, LossKind::CrossEntropy)?;
            self.dropout_passes += 1;
            sum.add(&grads)?;
            let tail = sum.tail_mut();
            tail[0] += out.weight_sum as f32;
            tail[1] += out.loss_sum as f32;
            tokens += out.tokens as u64;
        }
        Ok((sum, tokens))
    }

    /// The rest of a step, whatever the method: all-reduce the buffer, divide the
    /// gradient by the global normaliser (`buf[n]`: Σw, or DPO's pair count), AdamW.
    fn finish_step(
        &mut self,
        mut grads: StepGrads,
        tokens: u64,
        examples: usize,
        epoch: u64,
        started: Instant,
    ) -> Result<StepMetrics> {
        let tail = grads.tail();
        self.last_local = (tail[1] as f64, tail[0] as f64);
        grads
            .all_reduce(self.sync.as_mut(), self.step + 1)
            .map_err(|message| Error::Sync {
                step: self.step + 1,
                message,
            })?;
        let tail = grads.tail();
        let weight = tail[0] as f64;
        let loss = tail[1] as f64 / weight;
        if weight <= 0.0 || !loss.is_finite() {
            return Err(Error::NonFinite {
                step: self.step + 1,
                what: "loss",
                value: loss,
            });
        }
        let dpo = self.dpo.is_some().then(|| crate::dpo::Dpo::metrics(tail));
        let inv = (1.0 / weight) as f32;
        let lr = self.schedule.lr_at(self.step);
        let rep = self.opt.apply(&self.model, grads, Some(inv), lr)?;
        self.step += 1;
        self.last_loss = Some(loss);
        let dt = started.elapsed().as_secs_f64();
        Ok(StepMetrics {
            step: self.step,
            epoch,
            loss,
            lr,
            grad_norm: rep.grad_norm,
            tokens,
            weight,
            examples: examples as u64,
            tokens_per_s: if dt > 0.0 { tokens as f64 / dt } else { 0.0 },
            elapsed_s: self.elapsed(),
            eval_nll: None,
            dpo,
        })
    }

    /// DPO's held-out loss and preference accuracy into `m` (and `eval_nll` stays unset:
    /// DPO data has no SFT targets).
    fn dpo_eval_into(&mut self, m: &mut StepMetrics) -> Result<()> {
        let budget = self.cfg.train.micro_batch_tokens;
        if let (Some(d), Some(dm)) = (self.dpo.as_mut(), m.dpo.as_mut()) {
            if let Some(e) = d.evaluate(&self.model, budget, self.pad_id)? {
                dm.eval_dpo_loss = Some(e.loss);
                dm.eval_dpo_accuracy = Some(e.accuracy);
            }
        }
        Ok(())
    }

    /// DPO only: loss, preference accuracy and margin of the current adapter on the
    /// held-out pairs (`None` for other methods or without held-out pairs).
    pub fn dpo_eval(&mut self) -> Result<Option<crate::dpo::DpoEval>> {
        let budget = self.cfg.train.micro_batch_tokens;
        match self.dpo.as_mut() {
            Some(d) => d.evaluate(&self.model, budget, self.pad_id),
            None => Ok(None),
        }
    }

    fn elapsed(&self) -> f64 {
        self.elapsed_before + self.segment_start.elapsed().as_secs_f64()
    }

    /// Mean NLL on the eval data with the current adapters (SFT; a DPO run has no SFT
    /// targets: see [`Trainer::dpo_eval`]).
    pub fn eval(&self) -> Result<f64> {
        if self.dpo.is_some() {
            return Err(Error::Invalid(
                "a DPO run's held-out numbers come from Trainer::dpo_eval, not eval".into(),
            ));
        }
        Ok(evaluate(
            &self.model,
            &self.eval,
            self.cfg.train.micro_batch_tokens,
            self.pad_id,
            Adapters::On,
        )?
        .0)
    }

    /// Writes a checkpoint of the current step (atomically) and lists it.
    pub fn save(&mut self) -> Result<CheckpointRecord> {
        let state = TrainState {
            version: STATE_VERSION,
            step: self.step,
            config_hash: self.hash.clone(),
            config: self.cfg.semantic_entries(),
            cursor: self.sampler.cursor(),
            dropout_passes: self.dropout_passes,
            elapsed_s: self.elapsed(),
            params_fingerprint: self.model.params_fingerprint()?,
            data_fingerprint: Some(self.data_fp.clone()),
            model_fingerprint: Some(self.model_fp.clone()),
        };
        let model = &self.model;
        let opt = &self.opt;
        let rec = self
            .run
            .write_checkpoint(self.step, self.last_loss, |dir| {
                model.save_adapter(&dir.join("adapter"))?;
                opt.save(&dir.join(OPTIMIZER_FILE))?;
                let text = serde_json::to_string_pretty(&state).expect("state serializes");
                write_file_atomic(&dir.join(STATE_FILE), text.as_bytes())
            })?;
        self.last_saved = Some(self.step);
        Ok(rec)
    }
}

/// Refuses a tokenizer with more tokens than the model has embeddings (its ids would index
/// past them): `train`, `eval` and `sample` check it before the first batch.
pub fn check_vocab(model_dir: &Path, tok: &Tokenizer, model: &LoraModel) -> Result<()> {
    if tok.vocab_size() > model.config().vocab_size {
        return Err(Error::Invalid(format!(
            "{}: the tokenizer has {} tokens but the model's vocab_size is {}",
            model_dir.display(),
            tok.vocab_size(),
            model.config().vocab_size
        )));
    }
    Ok(())
}

/// AdamW's settings from `[optimizer]`.
pub(crate) fn adamw_of(cfg: &RunConfig) -> AdamWConfig {
    let o = &cfg.optimizer;
    AdamWConfig {
        lr: o.lr,
        beta1: o.beta1,
        beta2: o.beta2,
        eps: o.eps,
        weight_decay: o.weight_decay,
        max_grad_norm: o.grad_clip,
    }
}

/// The LR schedule of `[schedule]` over a run of `total_steps`.
pub(crate) fn schedule_of(cfg: &RunConfig, total_steps: u64) -> LrSchedule {
    let (o, s) = (&cfg.optimizer, &cfg.schedule);
    LrSchedule {
        kind: match s.kind {
            config::ScheduleKind::Constant => ScheduleKind::Constant,
            config::ScheduleKind::Linear => ScheduleKind::Linear,
            config::ScheduleKind::Cosine => ScheduleKind::Cosine,
        },
        peak_lr: o.lr,
        min_lr: o.lr * s.final_lr_fraction,
        warmup_steps: s.warmup_steps,
        total_steps,
    }
}

/// The checkpoint a run starts from, checked against how it was started before any
/// expensive work: a fresh local start into a folder with checkpoints is refused (nothing is
/// overwritten), `--resume` needs one, and a node resumes exactly the coordinator's step.
pub(crate) fn starting_checkpoint(out_dir: &Path, mode: Mode) -> Result<Option<CheckpointRecord>> {
    let existing = RunDir::open_existing(out_dir)?;
    Ok(match mode {
        Mode::Local { resume } => {
            let (latest, holds) = match &existing {
                Some(run) => (run.latest_checkpoint()?, run.holds_checkpoints()?),
                None => (None, false),
            };
            match (resume, latest) {
                (false, _) if holds => return Err(Error::RunExists(out_dir.to_owned())),
                (true, None) => return Err(Error::NothingToResume(out_dir.to_owned())),
                (_, l) => l,
            }
        }
        Mode::Node { resume_from: 0, .. } => None,
        Mode::Node { resume_from, .. } => {
            let listed = match &existing {
                Some(run) => run.complete_checkpoints()?,
                None => Vec::new(),
            };
            Some(
                listed
                    .into_iter()
                    .find(|r| r.step == resume_from)
                    .ok_or_else(|| {
                        Error::Invalid(format!(
                            "the coordinator asked to resume from step {resume_from}, but {} \
                             lists no complete checkpoint of that step",
                            out_dir.join("checkpoints.jsonl").display()
                        ))
                    })?,
            )
        }
    })
}

/// Floats per leaf of [`params_sha256`]'s tree: 4 MiB of bits.
const HASH_LEAF: usize = 1 << 20;

/// A SHA-256 tree over flat adapter parameters' bits (little-endian f32, layout order):
/// SHA-256 of each 4 MiB leaf, in parallel, then SHA-256 of a domain tag, the float count
/// and the leaves' digests in order. Equal on two ranks exactly when their adapters are
/// bit-identical (up to SHA-256 collisions), and independent of the thread count. The
/// serial SHA-256 this replaced took 69 ms over qwen05b's 17.6 M adapter floats at r = 32
/// on a 2-core Xeon (about a third of a GPU step, paid after every step at
/// `--hash-every 1`); this takes 31–38 ms there.
pub(crate) fn params_sha256(params: &[f32]) -> [u8; 32] {
    use rayon::prelude::*;
    use sha2::{Digest, Sha256};
    let leaves: Vec<[u8; 32]> = params
        .par_chunks(HASH_LEAF)
        .map(|leaf| {
            let mut h = Sha256::new();
            update_le(&mut h, leaf);
            h.finalize().into()
        })
        .collect();
    let mut h = Sha256::new();
    h.update(b"ringtune adapter sha256 tree v1\0");
    h.update((params.len() as u64).to_le_bytes());
    for d in &leaves {
        h.update(d);
    }
    h.finalize().into()
}

/// Feeds `xs`' little-endian bits to `h` without a copy where the target is little-endian.
fn update_le(h: &mut sha2::Sha256, xs: &[f32]) {
    use sha2::Digest;
    #[cfg(target_endian = "little")]
    {
        // SAFETY: f32 has no padding and any byte is a valid u8; the slice covers exactly
        // the floats' bytes, which on a little-endian target are their LE encodings.
        let bytes = unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<u8>(), 4 * xs.len()) };
        h.update(bytes);
    }
    #[cfg(not(target_endian = "little"))]
    for chunk in xs.chunks(4096) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
        h.update(&bytes);
    }
}

pub(crate) fn read_state(path: &Path) -> Result<TrainState> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| Error::Corrupt {
        path: path.to_owned(),
        line: e.line(),
        message: e.to_string(),
    })?;
    if state.version != STATE_VERSION {
        return Err(Error::Corrupt {
            path: path.to_owned(),
            line: 1,
            message: format!(
                "state version {} is not the supported {STATE_VERSION}",
                state.version
            ),
        });
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::{params_sha256, rank_warning, setup_warnings, HASH_LEAF};
    use ringtune_config::RunConfig;
    use sha2::{Digest, Sha256};
    use std::path::Path;

    #[test]
    fn setup_warnings_name_what_will_not_happen() {
        let cfg = |extra: &str| {
            let text =
                format!("[model]\npath = \"m\"\n[data]\ntrain = \"t\"\nmax_length = 4096\n{extra}");
            RunConfig::parse(&text, Path::new("run.toml")).unwrap()
        };
        let quiet = cfg("[train]\neval_every = 0\n");
        assert!(setup_warnings(&quiet, 4096, 10, 0).is_empty());
        let w = setup_warnings(
            &cfg("[train]\neval_every = 5\n[schedule]\nwarmup_steps = 10\n"),
            2048,
            10,
            0,
        );
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].contains("train.eval_every = 5") && w[0].contains("no eval data"));
        assert!(w[1].contains("warmup_steps = 10") && w[1].contains("10 steps"));
        assert!(w[2].contains("max_position_embeddings = 2048"));
        // With eval data, a warm-up shorter than the run and a long enough context: none.
        let ok = cfg("[train]\neval_every = 5\n[schedule]\nwarmup_steps = 9\n");
        assert!(setup_warnings(&ok, 4096, 10, 3).is_empty());
    }

    #[test]
    fn a_rank_above_a_layers_side_is_named() {
        let layout = |r: usize| {
            ringtune_model::ParamLayout::new(vec![
                (
                    "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight".into(),
                    vec![r, 64],
                ),
                (
                    "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight".into(),
                    vec![16, r],
                ),
                (
                    "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight".into(),
                    vec![r, 64],
                ),
                (
                    "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight".into(),
                    vec![128, r],
                ),
            ])
            .unwrap()
        };
        assert_eq!(rank_warning(16, &layout(16)), None);
        let w = rank_warning(32, &layout(32)).unwrap();
        assert!(w.contains("lora.rank = 32"), "{w}");
        assert!(w.contains("1 adapter matrices"), "{w}");
        assert!(
            w.contains("model.layers.0.self_attn.k_proj, 16 features"),
            "{w}"
        );
        let w = rank_warning(100, &layout(100)).unwrap();
        assert!(w.contains("3 adapter matrices"), "{w}");
        assert!(w.contains("k_proj, 16 features"), "{w}");
    }

    /// The tree written out serially, one float at a time.
    fn reference(params: &[f32]) -> [u8; 32] {
        let mut top = Sha256::new();
        top.update(b"ringtune adapter sha256 tree v1\0");
        top.update((params.len() as u64).to_le_bytes());
        for leaf in params.chunks(HASH_LEAF) {
            let mut h = Sha256::new();
            for x in leaf {
                h.update(x.to_le_bytes());
            }
            top.update(h.finalize());
        }
        top.finalize().into()
    }

    fn params(n: usize) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37).sin()).collect()
    }

    #[test]
    fn the_tree_matches_its_serial_definition_at_leaf_edges() {
        for n in [0, 1, 5, HASH_LEAF - 1, HASH_LEAF, 2 * HASH_LEAF + 3] {
            assert_eq!(params_sha256(&params(n)), reference(&params(n)), "n = {n}");
        }
    }

    #[test]
    fn any_changed_bit_or_order_or_length_changes_the_digest() {
        let base = params(2 * HASH_LEAF + 3);
        let d = params_sha256(&base);
        for i in [0, HASH_LEAF - 1, HASH_LEAF, 2 * HASH_LEAF + 2] {
            let mut p = base.clone();
            p[i] = f32::from_bits(p[i].to_bits() ^ 1);
            assert_ne!(params_sha256(&p), d, "flipped the low bit of float {i}");
        }
        // -0.0 and 0.0 compare equal as floats but not as bits.
        let mut z = vec![0f32; 8];
        let dz = params_sha256(&z);
        z[3] = -0.0;
        assert_ne!(params_sha256(&z), dz);
        // Two whole leaves swapped: every leaf digest is still there, in another order.
        let mut swapped = base[HASH_LEAF..2 * HASH_LEAF].to_vec();
        swapped.extend_from_slice(&base[..HASH_LEAF]);
        swapped.extend_from_slice(&base[2 * HASH_LEAF..]);
        assert_ne!(params_sha256(&swapped), d);
        // One float more, past a leaf boundary.
        let mut longer = base[..HASH_LEAF].to_vec();
        let short = params_sha256(&longer);
        longer.push(0.0);
        assert_ne!(params_sha256(&longer), short);
    }

    #[test]
    fn the_digest_does_not_depend_on_the_thread_count() {
        let p = params(3 * HASH_LEAF + 11);
        let on = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| params_sha256(&p))
        };
        assert_eq!(on(1), on(4));
    }
}
