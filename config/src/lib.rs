//! The TOML run config: its types, defaults, validation, command-line overrides and the
//! stable hash stored in checkpoints.
//!
//! Layout of a config file (every key optional except `data.train`; configs/README.md
//! documents each one):
//!
//! ```toml
//! output_dir = "runs/quickstart"
//! seed = 0
//! nodes = 1
//! [model]      # path (or hf:org/name), init_preset, dtype, device
//! [data]       # train, eval, eval_fraction, renderer, train_on, max_length, ...
//! [lora]       # rank, alpha, dropout, rslora, train_attn, train_mlp, train_unembed,
//!              # target_modules
//! [optimizer]  # lr, beta1, beta2, eps, weight_decay, grad_clip
//! [schedule]   # kind, warmup_steps, final_lr_fraction
//! [train]      # method, batch_size, micro_batch_tokens, epochs, max_steps, save_every, ...
//! [dpo]        # beta
//! [rl]         # env, groups_per_step, group_size, max_tokens, loss, kl_penalty_coef, ...
//! ```
//!
//! Every struct is `deny_unknown_fields`: a typo is an error naming the file, line, dotted
//! key and the allowed keys, never a silently ignored setting.
//!
//! This crate does no training and touches no model or dataset: it only reads the TOML
//! file. Relative paths are kept as written; the caller resolves them against its working
//! directory.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Everything that can go wrong reading a run config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type or not
    /// among the allowed values. `key` is the dotted path (`lora.rank`).
    #[error("{path}:{line}:{column}: {}{message}", key_prefix(key))]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        key: String,
        message: String,
    },
    /// The file parsed but a value is out of range or values contradict each other
    /// (`line`: where the key is set in the file, when it is).
    #[error("{path}{}: {key}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        line: Option<usize>,
        key: String,
        message: String,
    },
    /// A command-line override (`--set key=value`) is malformed or names an unknown key.
    #[error("override `{spec}`: {}{message}", key_prefix(key))]
    Override {
        spec: String,
        key: String,
        message: String,
    },
}

fn key_prefix(key: &str) -> String {
    if key.is_empty() || key == "." {
        String::new()
    } else {
        format!("key `{key}`: ")
    }
}

/// Result alias for this crate.
pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// A whole training run: what to train, on what, how, and where the results go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Folder for metrics.jsonl, checkpoints/ and checkpoints.jsonl.
    pub output_dir: PathBuf,
    /// Seeds data shuffling, LoRA A initialisation and dropout.
    pub seed: u64,
    /// Number of node processes (data-parallel ranks). `ringtune train` starts this many
    /// local node processes beside an in-process coordinator when it is above 1.
    pub nodes: u32,
    /// What carries the gradient all-reduce between nodes (see [`RingTransport`]).
    pub ring_transport: RingTransport,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub lora: LoraConfig,
    pub optimizer: OptimizerConfig,
    pub schedule: ScheduleConfig,
    pub train: TrainConfig,
    /// Reinforcement learning (used when the run trains with RL).
    pub rl: RlConfig,
    /// Preference training (used when `train.method = "dpo"`).
    pub dpo: DpoConfig,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            output_dir: PathBuf::from("runs/default"),
            seed: 0,
            nodes: 1,
            ring_transport: RingTransport::default(),
            model: ModelConfig::default(),
            data: DataConfig::default(),
            lora: LoraConfig::default(),
            optimizer: OptimizerConfig::default(),
            schedule: ScheduleConfig::default(),
            train: TrainConfig::default(),
            rl: RlConfig::default(),
            dpo: DpoConfig::default(),
        }
    }
}

/// The link under the nodes' gradient ring. Every link authenticates with the run's
/// certificate and the cluster token; the sums are bit-identical whichever is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RingTransport {
    /// QUIC (TLS 1.3).
    #[default]
    Quic,
    /// TCP, TLS 1.3 handshake, AES-128-GCM frames: far less CPU per byte than QUIC.
    TcpTls,
    /// TCP without encryption (the token is still proven): trusted networks only.
    TcpPlain,
}

/// The base model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// A Hugging Face model folder (config.json, *.safetensors, tokenizer.json), or
    /// `hf:org/name` for a model already in the local Hugging Face cache (no download).
    pub path: String,
    /// If set and `path` does not exist, write a random-init model of this preset there
    /// first (what `ringtune init-model --preset P --out PATH` does). For the quickstart.
    pub init_preset: Option<String>,
    /// Precision of the frozen base weights.
    pub dtype: Dtype,
    /// Where to run.
    pub device: Device,
    /// Recompute each decoder layer's activations in the backward pass instead of keeping
    /// them: activation memory of one layer instead of all, for about one more forward
    /// pass of compute. Same gradients either way, so it may change between resumes.
    pub activation_checkpointing: bool,
    /// A PEFT adapter folder to start a fresh run from instead of fresh adapters (a warm
    /// start: PEFT's `is_trainable=True` load). `[lora]` must describe it. Left out of the
    /// serialized config when unset, so earlier configs hash as before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<PathBuf>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            path: String::new(),
            adapter: None,
            init_preset: None,
            dtype: Dtype::F32,
            device: Device::Cpu,
            activation_checkpointing: false,
        }
    }
}

/// Precision of the base weights (LoRA weights, gradients and optimiser state are f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

/// The compute device: `cpu`, `cuda:N` (`cuda` is `cuda:0`), or `auto`: the GPU of the
/// process's slot on its host (LOCAL_RANK, else SLURM_LOCALID, else 0) if the binary was
/// built with CUDA and that GPU is present, else the CPU (ringtune-node's `device_of`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(u32),
    Auto,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::Auto => f.write_str("auto"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "auto" => Ok(Device::Auto),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| {
                    format!("unknown device `{s}`, expected one of `cpu`, `cuda:N`, `auto`")
                }),
        }
    }
}

impl Serialize for Device {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The dataset and how it becomes tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Training data, a JSONL file. Required.
    pub train: PathBuf,
    /// A separate evaluation JSONL file (same format). Exclusive with `eval_fraction`.
    pub eval: Option<PathBuf>,
    /// Hold out this fraction of the training examples (seeded) for evaluation.
    pub eval_fraction: f64,
    /// How chat messages become text/tokens.
    pub renderer: Renderer,
    /// Which tokens carry loss weight.
    pub train_on: TrainOn,
    /// Maximum tokens per example.
    pub max_length: usize,
    /// What to do with an example longer than `max_length`.
    pub overlong: Overlong,
    /// Skip lines that are not valid JSON or lack the required field (they are counted and
    /// reported) instead of failing with the file and line.
    pub skip_bad_lines: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            train: PathBuf::new(),
            eval: None,
            eval_fraction: 0.0,
            renderer: Renderer::Auto,
            train_on: TrainOn::AllAssistantMessages,
            max_length: 2048,
            overlong: Overlong::Truncate,
            skip_bad_lines: false,
        }
    }
}

/// Chat template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Renderer {
    /// Detect from the tokenizer's chat template (llama3 or qwen), else `role_colon`.
    Auto,
    /// Plain `User: …\n\nAssistant: …` text; works with any tokenizer.
    RoleColon,
    /// Llama 3 `<|start_header_id|>…` template.
    Llama3,
    /// Qwen ChatML `<|im_start|>…` template.
    Qwen,
}

/// Which tokens are trained on (tinker-cookbook's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainOn {
    /// Only the last assistant message.
    LastAssistantMessage,
    /// Every assistant message.
    AllAssistantMessages,
    /// Every message's content (system and user too), not the headers.
    AllMessages,
    /// Every token, headers and separators included.
    AllTokens,
}

/// Policy for examples longer than `max_length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlong {
    /// Keep the first `max_length` tokens.
    Truncate,
    /// Leave the example out (counted and reported).
    Drop,
    /// Fail, naming the file and line.
    Error,
}

/// LoRA hyper-parameters (tinker's defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Scale by alpha/√rank instead of alpha/rank.
    pub rslora: bool,
    /// q/k/v/o_proj.
    pub train_attn: bool,
    /// gate/up/down_proj.
    pub train_mlp: bool,
    /// lm_head.
    pub train_unembed: bool,
    /// PEFT's `target_modules`: the modules to adapt by name, or `"all-linear"` (the seven
    /// projections). When set it decides alone, so the `train_*` switches must keep their
    /// defaults. Left out of the serialized config when unset, so that configs (and the
    /// hashes of checkpoints) from before it existed are unchanged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_modules: Option<TargetModules>,
}

/// The module names `lora.target_modules` takes, in PEFT's spelling and canonical order.
pub const TARGET_MODULE_NAMES: [&str; 8] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "lm_head",
];

/// `lora.target_modules` as read: a list of [`TARGET_MODULE_NAMES`] or `"all-linear"`,
/// kept in canonical order without duplicates, so that the same set always hashes alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct TargetModules(Vec<String>);

impl TargetModules {
    /// The adapted modules' names, in canonical order.
    pub fn names(&self) -> &[String] {
        &self.0
    }
}

impl<'de> Deserialize<'de> for TargetModules {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let expected = "expected a list of module names (q_proj, k_proj, v_proj, o_proj, \
                        gate_proj, up_proj, down_proj, lm_head) or \"all-linear\"";
        let names: Vec<String> = match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(s) if s == "all-linear" => TARGET_MODULE_NAMES[..7]
                .iter()
                .map(|n| n.to_string())
                .collect(),
            serde_json::Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    serde_json::Value::String(s) => Ok(s),
                    other => Err(D::Error::custom(format!(
                        "{other} is not a name; {expected}"
                    ))),
                })
                .collect::<std::result::Result<_, _>>()?,
            other => return Err(D::Error::custom(format!("{other}: {expected}"))),
        };
        if let Some(bad) = names
            .iter()
            .find(|n| !TARGET_MODULE_NAMES.contains(&n.as_str()))
        {
            return Err(D::Error::custom(format!(
                "unknown module {bad:?}; {expected} (PEFT's regular-expression form is not \
                 supported)"
            )));
        }
        if names.is_empty() {
            return Err(D::Error::custom(format!(
                "an empty list adapts nothing; {expected}"
            )));
        }
        Ok(TargetModules(
            TARGET_MODULE_NAMES
                .iter()
                .filter(|k| names.iter().any(|n| n == *k))
                .map(|k| k.to_string())
                .collect(),
        ))
    }
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 32,
            alpha: 32.0,
            dropout: 0.0,
            rslora: false,
            train_attn: true,
            train_mlp: true,
            train_unembed: true,
            target_modules: None,
        }
    }
}

/// AdamW (tinker's defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip gradients to this global L2 norm; unset = no clipping.
    pub grad_clip: Option<f64>,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-12,
            weight_decay: 0.0,
            grad_clip: None,
        }
    }
}

/// Learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    pub kind: ScheduleKind,
    /// Linear warm-up from 0 over this many steps.
    pub warmup_steps: u64,
    /// For linear/cosine: the LR at the last step as a fraction of `optimizer.lr`.
    pub final_lr_fraction: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            kind: ScheduleKind::Constant,
            warmup_steps: 0,
            final_lr_fraction: 0.0,
        }
    }
}

/// Shape of the LR curve after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

/// Steps, batches and cadences.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// What the run optimises: `sft` (cross-entropy on the data's weighted tokens), `dpo`
    /// (preference pairs, see `[dpo]`), `rl` (see `[rl]`).
    pub method: Method,
    /// Examples per global (optimiser) step, summed over all nodes (DPO: pairs).
    pub batch_size: usize,
    /// Token budget of one micro-batch (padded tokens): a step's examples are split into
    /// micro-batches under this budget and their gradients accumulated, so long and short
    /// examples both fit memory. This is the gradient-accumulation knob.
    pub micro_batch_tokens: usize,
    /// Passes over the training data (ignored when `max_steps` is set).
    pub epochs: u64,
    /// Stop after this many optimiser steps (and size the LR schedule to it).
    pub max_steps: Option<u64>,
    /// Write a checkpoint every this many steps (0 = only at the end).
    pub save_every: u64,
    /// Evaluate every this many steps (0 = only at the end); needs eval data.
    pub eval_every: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            method: Method::Sft,
            batch_size: 8,
            micro_batch_tokens: 4096,
            epochs: 1,
            max_steps: None,
            save_every: 100,
            eval_every: 0,
        }
    }
}

/// The training method (`train.method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Supervised fine-tuning: cross-entropy on weighted tokens.
    #[default]
    Sft,
    /// Direct preference optimisation on `{prompt, chosen, rejected}` pairs.
    Dpo,
    /// Reinforcement learning with policy-gradient losses.
    Rl,
}

/// DPO (Rafailov et al. 2023) as tinker-cookbook runs it: the reference is the base model
/// with the adapter switched off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpoConfig {
    /// β: scale of the implicit reward β·(log π − log π_ref); tinker-cookbook's 0.1.
    pub beta: f64,
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self { beta: 0.1 }
    }
}

/// Reinforcement learning as in tinker-cookbook: per step, `groups_per_step` prompts from
/// the environment, `group_size` samples of each from the current policy, rewards,
/// advantages = reward − group mean, then one policy-gradient step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RlConfig {
    /// Where prompts and rewards come from.
    pub env: RlEnv,
    /// Prompts (groups) per step, over all nodes.
    pub groups_per_step: usize,
    /// Samples per prompt; advantages are centred within each group.
    pub group_size: usize,
    /// Most tokens per sample (a sample cut here has not stopped cleanly).
    pub max_tokens: usize,
    /// Sampling temperature (1.0: the policy itself, which the losses assume).
    pub temperature: f64,
    /// The policy-gradient loss (tinker's names).
    pub loss: RlLoss,
    /// `ppo`/`cispo`: lower bound on the ratio (default 0.8 / 0.0).
    pub clip_low: Option<f64>,
    /// `ppo`/`cispo`: upper bound on the ratio (default 1.2 / 4.0).
    pub clip_high: Option<f64>,
    /// KL penalty against the base model (adapter off), shaped into the per-token
    /// advantages as tinker-cookbook does; 0 turns it off (and skips the base pass).
    pub kl_penalty_coef: f64,
    /// Drop groups whose samples all got the same reward (they carry no signal).
    pub remove_constant_reward_groups: bool,
    /// `arithmetic`: reward = correct + format_coef · (format_ok − 1).
    pub format_coef: f64,
    /// `arithmetic`: operands are drawn from 0..=max_operand.
    pub max_operand: u64,
    /// `external`: the reward command as an argv, e.g. `["python3", "reward.py"]`.
    pub command: Vec<String>,
    /// `external`: JSONL prompts (`messages` or `prompt`, optional `id`, `answer`).
    pub prompts: Option<PathBuf>,
    /// `external`: seconds the reward command may take per step before it is killed.
    pub timeout_s: f64,
}

impl Default for RlConfig {
    fn default() -> Self {
        Self {
            env: RlEnv::Arithmetic,
            groups_per_step: 8,
            group_size: 8,
            max_tokens: 16,
            temperature: 1.0,
            loss: RlLoss::ImportanceSampling,
            clip_low: None,
            clip_high: None,
            kl_penalty_coef: 0.0,
            remove_constant_reward_groups: true,
            format_coef: 0.1,
            max_operand: 99,
            command: Vec::new(),
            prompts: None,
            timeout_s: 60.0,
        }
    }
}

/// An RL environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RlEnv {
    /// Built in, offline: "What is a + b?" with an exact-answer check.
    Arithmetic,
    /// Prompts from `rl.prompts`, rewards from `rl.command`.
    External,
}

/// A policy-gradient loss (tinker's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RlLoss {
    /// −Σ exp(logp − q) · A.
    ImportanceSampling,
    /// Clipped ratio (0.8 / 1.2).
    Ppo,
    /// Clipped-ratio coefficient on logp (0.0 / 4.0).
    Cispo,
}

impl RlConfig {
    /// Checks ranges (every RL key, whether or not the run uses RL, so a config that is
    /// switched to RL later does not surprise).
    fn validate(&self, path: &Path) -> Result<()> {
        let err = |key: &str, message: &str| {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                line: None,
                key: format!("rl.{key}"),
                message: message.to_owned(),
            })
        };
        if self.groups_per_step == 0 {
            return err("groups_per_step", "must be at least 1");
        }
        if self.group_size < 2 {
            return err(
                "group_size",
                "must be at least 2 (advantages are centred within a group)",
            );
        }
        if self.max_tokens == 0 {
            return err("max_tokens", "must be at least 1");
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return err("temperature", "must be a positive number");
        }
        for (key, v) in [("clip_low", self.clip_low), ("clip_high", self.clip_high)] {
            if let Some(v) = v {
                if self.loss == RlLoss::ImportanceSampling {
                    return err(key, "only ppo and cispo take clip thresholds");
                }
                if !(v.is_finite() && v >= 0.0) {
                    return err(key, "must be a number >= 0");
                }
            }
        }
        if let (Some(lo), Some(hi)) = (self.clip_low, self.clip_high) {
            if lo > hi {
                return err("clip_low", "must not exceed rl.clip_high");
            }
        }
        if !(self.kl_penalty_coef.is_finite() && self.kl_penalty_coef >= 0.0) {
            return err("kl_penalty_coef", "must be >= 0");
        }
        if !(self.format_coef.is_finite() && self.format_coef >= 0.0) {
            return err("format_coef", "must be >= 0");
        }
        if self.max_operand == 0 || self.max_operand > 1_000_000_000 {
            return err("max_operand", "must be in 1..=1000000000");
        }
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0) {
            return err("timeout_s", "must be a positive number of seconds");
        }
        if self.env == RlEnv::External {
            if self.command.first().is_none_or(|c| c.is_empty()) {
                return err(
                    "command",
                    "the external env needs a reward command, e.g. [\"python3\", \"reward.py\"]",
                );
            }
            if self.prompts.is_none() {
                return err("prompts", "the external env needs a JSONL prompts file");
            }
        }
        Ok(())
    }
}

/// Keys that change where results go or how often they are written, not what is
/// computed: a resumed run may change them freely.
const NON_SEMANTIC_KEYS: &[&str] = &[
    "output_dir",
    "nodes",
    "ring_transport",
    "train.save_every",
    "train.eval_every",
    "data.skip_bad_lines",
    "rl.timeout_s",
    "model.activation_checkpointing",
    // Where a process runs, not what it trains: each node of a run may use its own
    // (`ringtune node --device cuda:N`), and a run may resume on other hardware.
    "model.device",
];

impl RunConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with_overrides(path, &[])
    }

    /// Reads a config file and applies `key=value` overrides (dotted keys, TOML values;
    /// a bare word is taken as a string), then validates.
    pub fn load_with_overrides(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg = Self::parse(&text, path)?;
        for spec in overrides {
            cfg = cfg.with_override(spec)?;
        }
        cfg.validate(path).map_err(|e| match e {
            // A value that came from --set is blamed on the override, not on the file.
            ConfigError::Invalid { key, message, .. }
                if let Some(spec) = overrides.iter().rev().find(|s| {
                    s.split_once('=').is_some_and(|(k, _)| {
                        let k = k.trim();
                        key == k || key.starts_with(&format!("{k}."))
                    })
                }) =>
            {
                ConfigError::Override {
                    spec: spec.clone(),
                    key,
                    message,
                }
            }
            ConfigError::Invalid {
                path, key, message, ..
            } => ConfigError::Invalid {
                line: key_line(&text, &key),
                path,
                key,
                message,
            },
            e => e,
        })?;
        Ok(cfg)
    }

    /// Parses TOML text (`path` is only used in messages). Does not validate.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let de = toml::de::Deserializer::parse(text).map_err(|e| toml_error(e, text, path, ""))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            toml_error(e.into_inner(), text, path, &key)
        })
    }

    /// Returns this config with one `key=value` override applied.
    pub fn with_override(&self, spec: &str) -> Result<Self> {
        let bad = |key: &str, message: String| ConfigError::Override {
            spec: spec.to_owned(),
            key: key.to_owned(),
            message,
        };
        let (key, raw) = spec
            .split_once('=')
            .ok_or_else(|| bad("", "expected KEY=VALUE".into()))?;
        let key = key.trim();
        let raw = raw.trim();
        // A TOML value if it parses as one, else the raw text as a string, so
        // `model.path=runs/m` works without quoting.
        let value: serde_json::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
            Ok(mut t) => {
                let v = t.remove("v").expect("key v was just written");
                // JSON has no NaN or inf (they would become null, "invalid type: null").
                if matches!(v, toml::Value::Float(f) if !f.is_finite()) {
                    return Err(bad(key, format!("{raw} is not a finite number")));
                }
                serde_json::to_value(v).map_err(|e| bad(key, e.to_string()))?
            }
            Err(_) => serde_json::Value::String(raw.to_owned()),
        };
        let mut tree = serde_json::to_value(self).expect("config serializes to JSON");
        let mut node = &mut tree;
        let parts: Vec<&str> = key.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let obj = node
                .as_object_mut()
                .ok_or_else(|| bad(key, format!("`{}` is not a table", parts[..i].join("."))))?;
            if i + 1 == parts.len() {
                // Unknown keys are inserted and then rejected by deny_unknown_fields
                // below, which lists the allowed ones.
                obj.insert((*part).to_owned(), value.clone());
                break;
            }
            node = obj
                .entry((*part).to_owned())
                .or_insert_with(|| serde_json::Value::Object(Default::default()));
        }
        serde_path_to_error::deserialize(tree).map_err(|e| {
            let path = e.path().to_string();
            bad(&path, e.into_inner().to_string())
        })
    }

    /// Checks ranges and consistency; `path` names the file in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |key: &str, message: &str| {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                line: None,
                key: key.to_owned(),
                message: message.to_owned(),
            })
        };
        let finite_pos = |x: f64| x.is_finite() && x > 0.0;
        if self.nodes == 0 {
            return err("nodes", "must be at least 1");
        }
        if self.output_dir.as_os_str().is_empty() {
            return err("output_dir", "must name a folder (it is empty)");
        }
        if self.model.path.trim().is_empty() {
            return err("model.path", "is required: a model folder or hf:org/name");
        }
        if let Some(repo) = self.model.path.strip_prefix("hf:") {
            if repo.split('/').count() != 2 || repo.split('/').any(|p| p.is_empty()) {
                return err("model.path", "an hf: path must be hf:org/name");
            }
        }
        // RL makes its own prompts (the environment); every other method reads data.
        if self.data.train.as_os_str().is_empty() && self.train.method != Method::Rl {
            return err("data.train", "is required: a JSONL training file");
        }
        if !(0.0..1.0).contains(&self.data.eval_fraction) {
            return err("data.eval_fraction", "must be in [0, 1)");
        }
        if self.data.eval.is_some() && self.data.eval_fraction > 0.0 {
            return err(
                "data.eval_fraction",
                "set either data.eval (a file) or data.eval_fraction (a held-out split), not both",
            );
        }
        if self.data.max_length < 2 {
            return err(
                "data.max_length",
                "must be at least 2 (one input and one target)",
            );
        }
        if self.lora.rank == 0 {
            return err("lora.rank", "must be at least 1");
        }
        if !finite_pos(self.lora.alpha) {
            return err("lora.alpha", "must be a positive number");
        }
        if !(0.0..1.0).contains(&self.lora.dropout) {
            return err("lora.dropout", "must be in [0, 1)");
        }
        if self.model.adapter.is_some() && self.train.method == Method::Dpo {
            return err(
                "model.adapter",
                "a DPO run's reference policy is the base model with the adapter off, so \
                 starting from an adapter would compare against the base, not against it: \
                 merge it first (`ringtune merge ADAPTER --out DIR`) and set model.path = \
                 DIR",
            );
        }
        if self.lora.target_modules.is_some()
            && !(self.lora.train_attn && self.lora.train_mlp && self.lora.train_unembed)
        {
            return err(
                "lora.target_modules",
                "set either target_modules or the train_attn/train_mlp/train_unembed \
                 switches, not both (target_modules names every adapted module)",
            );
        }
        if !(self.lora.train_attn || self.lora.train_mlp || self.lora.train_unembed) {
            return err(
                "lora.train_attn",
                "at least one of train_attn, train_mlp, train_unembed must be true",
            );
        }
        if !finite_pos(self.optimizer.lr) {
            return err("optimizer.lr", "must be a positive number");
        }
        if !(0.0..1.0).contains(&self.optimizer.beta1) {
            return err("optimizer.beta1", "must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&self.optimizer.beta2) {
            return err("optimizer.beta2", "must be in [0, 1)");
        }
        if !finite_pos(self.optimizer.eps) {
            return err("optimizer.eps", "must be a positive number");
        }
        if !(self.optimizer.weight_decay.is_finite() && self.optimizer.weight_decay >= 0.0) {
            return err("optimizer.weight_decay", "must be >= 0");
        }
        if let Some(c) = self.optimizer.grad_clip {
            if !finite_pos(c) {
                return err(
                    "optimizer.grad_clip",
                    "must be a positive number (or unset)",
                );
            }
        }
        if !(0.0..=1.0).contains(&self.schedule.final_lr_fraction) {
            return err("schedule.final_lr_fraction", "must be in [0, 1]");
        }
        if self.train.batch_size == 0 {
            return err("train.batch_size", "must be at least 1");
        }
        if self.train.micro_batch_tokens == 0 {
            return err("train.micro_batch_tokens", "must be at least 1");
        }
        if self.train.max_steps == Some(0) {
            return err(
                "train.max_steps",
                "must be at least 1 (or unset to use epochs)",
            );
        }
        if self.train.max_steps.is_none() && self.train.epochs == 0 {
            return err(
                "train.epochs",
                "must be at least 1 (or set train.max_steps)",
            );
        }
        self.rl.validate(path)?;
        if self.train.method == Method::Rl && self.train.max_steps.is_none() {
            return err(
                "train.max_steps",
                "train.method = \"rl\" needs the number of steps",
            );
        }
        if !finite_pos(self.dpo.beta) {
            return err("dpo.beta", "must be a positive number");
        }
        Ok(())
    }

    /// The semantic content as flat dotted keys → canonical JSON values: everything that
    /// changes what is computed (not where it is written or how often).
    pub fn semantic_entries(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        flatten(
            "",
            &serde_json::to_value(self).expect("config serializes"),
            &mut out,
        );
        for k in NON_SEMANTIC_KEYS {
            out.remove(*k);
        }
        out
    }

    /// Whether a checkpoint written under `old_hash` with the semantic entries `old` (as
    /// its state file records them) belongs to this config: the same hash, or entries that
    /// differ only in keys that have become non-semantic since (a checkpoint from before
    /// `model.device` was one still resumes). Differences are [`diff_entries`].
    pub fn same_run_as(&self, old_hash: &ConfigHash, old: &BTreeMap<String, String>) -> bool {
        if *old_hash == self.semantic_hash() {
            return true;
        }
        let mut old = old.clone();
        for k in NON_SEMANTIC_KEYS {
            old.remove(*k);
        }
        old == self.semantic_entries()
    }

    /// A stable hash (hex SHA-256) of [`Self::semantic_entries`]: field order in the file,
    /// comments and non-semantic keys do not change it.
    pub fn semantic_hash(&self) -> ConfigHash {
        let mut h = Sha256::new();
        for (k, v) in self.semantic_entries() {
            h.update(k.as_bytes());
            h.update([0]);
            h.update(v.as_bytes());
            h.update([0]);
        }
        ConfigHash(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }
}

/// Hex SHA-256 of a config's semantic content (see [`RunConfig::semantic_hash`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConfigHash(pub String);

impl fmt::Display for ConfigHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Human-readable differences between two sets of semantic entries (as stored in a
/// checkpoint and as in the current config): `key: old → new`, sorted by key.
pub fn diff_entries(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) -> Vec<String> {
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let (a, b) = (old.get(k), new.get(k));
            (a != b).then(|| {
                let show = |v: Option<&String>| v.map_or("(absent)".to_owned(), |s| s.clone());
                format!("{k}: {} → {}", show(a), show(b))
            })
        })
        .collect()
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_owned(), other.to_string());
        }
    }
}

fn toml_error(e: toml::de::Error, text: &str, path: &Path, key: &str) -> ConfigError {
    let (line, column) = match e.span() {
        Some(span) => line_col(text, span.start),
        None => (1, 1),
    };
    ConfigError::Parse {
        path: path.to_owned(),
        line,
        column,
        key: key.to_owned(),
        message: e.message().trim().to_owned(),
    }
}

/// The 1-based line that sets the dotted `key` (`train.batch_size`: `batch_size = …` under
/// `[train]`; a top-level key before any table), if the text has one. A plain scan, for
/// messages: inline tables and dotted keys written out are not found.
fn key_line(text: &str, key: &str) -> Option<usize> {
    let (table, name) = key.rsplit_once('.').unwrap_or(("", key));
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(h) = t.strip_prefix('[').and_then(|h| h.split(']').next()) {
            current = h.trim().to_string();
            continue;
        }
        let Some((k, _)) = t.split_once('=') else {
            continue;
        };
        if current == table && k.trim().trim_matches('"') == name {
            return Some(i + 1);
        }
    }
    None
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[model]\npath = \"m\"\n[data]\ntrain = \"t.jsonl\"\n";

    fn parse(text: &str) -> Result<RunConfig> {
        let cfg = RunConfig::parse(text, Path::new("run.toml"))?;
        cfg.validate(Path::new("run.toml"))?;
        Ok(cfg)
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_tinkers() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.lora.rank, 32);
        assert_eq!(c.lora.alpha, 32.0);
        assert!(c.lora.train_attn && c.lora.train_mlp && c.lora.train_unembed);
        assert_eq!(c.optimizer.lr, 1e-4);
        assert_eq!((c.optimizer.beta1, c.optimizer.beta2), (0.9, 0.95));
        assert_eq!(c.optimizer.eps, 1e-12);
        assert_eq!(c.optimizer.weight_decay, 0.0);
        assert_eq!(c.optimizer.grad_clip, None);
        assert_eq!(c.nodes, 1);
        assert_eq!(c.model.device, Device::Cpu);
    }

    #[test]
    fn method_and_dpo_section() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.train.method, Method::Sft);
        assert_eq!(c.dpo.beta, 0.1);
        let c = parse(&format!(
            "{MIN}[train]\nmethod = \"dpo\"\n[dpo]\nbeta = 0.5\n"
        ))
        .unwrap();
        assert_eq!((c.train.method, c.dpo.beta), (Method::Dpo, 0.5));
        let e = err(&format!("{MIN}[dpo]\nbeta = 0.0\n"));
        assert!(e.contains("dpo.beta"), "{e}");
        let c = parse(&format!("nodes = 2\n{MIN}[train]\nmethod = \"dpo\"\n")).unwrap();
        assert_eq!((c.nodes, c.train.method), (2, Method::Dpo));
        let e = err(&format!("{MIN}[train]\nmethod = \"ddpo\"\n"));
        assert!(e.contains("`sft`, `dpo`, `rl`"), "{e}");
    }

    #[test]
    fn unknown_key_names_file_line_key_and_allowed() {
        let e = err(&format!("{MIN}[lora]\nrank = 8\nrnak = 4\n"));
        assert!(e.starts_with("run.toml:7:1: key `lora.rnak`"), "{e}");
        assert!(e.contains("unknown field `rnak`"), "{e}");
        assert!(e.contains("`rank`") && e.contains("`train_unembed`"), "{e}");
    }

    #[test]
    fn unknown_top_level_key() {
        let e = err(&format!("seeed = 3\n{MIN}"));
        assert!(e.starts_with("run.toml:1:1"), "{e}");
        assert!(e.contains("unknown field `seeed`"), "{e}");
    }

    #[test]
    fn bad_enum_value_lists_allowed() {
        let e = err(&format!("{MIN}[schedule]\nkind = \"cosin\"\n"));
        assert!(e.contains("run.toml:6:"), "{e}");
        assert!(e.contains("key `schedule.kind`"), "{e}");
        assert!(e.contains("`constant`, `linear`, `cosine`"), "{e}");
        let e = err("[model]\npath = \"m\"\ndevice = \"gpu\"\n[data]\ntrain = \"t\"\n");
        assert!(e.contains("model.device") && e.contains("`cuda:N`"), "{e}");
    }

    #[test]
    fn wrong_type_names_key() {
        let e = err(&format!("{MIN}[train]\nbatch_size = \"eight\"\n"));
        assert!(
            e.contains("run.toml:6:") && e.contains("train.batch_size"),
            "{e}"
        );
    }

    #[test]
    fn validation_names_key() {
        assert!(err("[data]\ntrain = \"t\"\n").contains("model.path"));
        assert!(err("[model]\npath = \"m\"\n").contains("data.train"));
        let e = err(&format!("{MIN}[lora]\nrank = 0\n"));
        assert_eq!(e, "run.toml: lora.rank: must be at least 1");
        let e = err(&format!("{MIN}eval = \"e\"\neval_fraction = 0.1\n"));
        assert!(e.contains("data.eval_fraction"), "{e}");
        assert!(err(&format!("{MIN}[optimizer]\nlr = -1.0\n")).contains("optimizer.lr"));
        assert!(err("[model]\npath = \"hf:x\"\n[data]\ntrain = \"t\"\n").contains("hf:org/name"));
        let e = err(&format!("output_dir = \"\"\n{MIN}"));
        assert_eq!(e, "run.toml: output_dir: must name a folder (it is empty)");
    }

    #[test]
    fn rl_section_defaults_and_validation() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.rl.loss, RlLoss::ImportanceSampling);
        assert_eq!((c.rl.groups_per_step, c.rl.group_size), (8, 8));
        assert!(c.rl.remove_constant_reward_groups);
        let c = parse(&format!("{MIN}[rl]\nloss = \"cispo\"\nclip_high = 5.0\n")).unwrap();
        assert_eq!((c.rl.loss, c.rl.clip_high), (RlLoss::Cispo, Some(5.0)));
        for (extra, key) in [
            ("group_size = 1", "rl.group_size"),
            ("clip_low = 0.5", "rl.clip_low"),
            (
                "loss = \"ppo\"\nclip_low = 2.0\nclip_high = 1.0",
                "rl.clip_low",
            ),
            ("kl_penalty_coef = -1.0", "rl.kl_penalty_coef"),
            ("env = \"external\"", "rl.command"),
            ("env = \"external\"\ncommand = [\"sh\"]", "rl.prompts"),
            ("timeout_s = 0.0", "rl.timeout_s"),
        ] {
            let e = err(&format!("{MIN}[rl]\n{extra}\n"));
            assert!(e.contains(key), "{extra}: {e}");
        }
        let e = err(&format!("{MIN}[rl]\nloss = \"reinforce\"\n"));
        assert!(e.contains("rl.loss") && e.contains("`cispo`"), "{e}");
        // RL needs no data file but a step count; it runs on any number of nodes.
        let rl = "[model]\npath = \"m\"\n[train]\nmethod = \"rl\"\n";
        assert!(err(rl).contains("train.max_steps"));
        let c = parse(&format!("{rl}max_steps = 3\n")).unwrap();
        assert_eq!(c.train.method, Method::Rl);
        let c = parse(&format!("nodes = 2\n{rl}max_steps = 3\n")).unwrap();
        assert_eq!(c.nodes, 2);
        // The command's timeout does not change what is computed.
        let a = parse(MIN).unwrap();
        let b = parse(&format!("{MIN}[rl]\ntimeout_s = 5.0\n")).unwrap();
        assert_eq!(a.semantic_hash(), b.semantic_hash());
    }

    #[test]
    fn devices_parse() {
        for (s, d) in [
            ("cpu", Device::Cpu),
            ("cuda:3", Device::Cuda(3)),
            ("auto", Device::Auto),
        ] {
            let c = parse(&format!(
                "[model]\npath = \"m\"\ndevice = \"{s}\"\n[data]\ntrain = \"t\"\n"
            ))
            .unwrap();
            assert_eq!(c.model.device, d);
            assert_eq!(c.model.device.to_string(), s);
        }
    }

    #[test]
    fn hash_ignores_order_comments_and_cadence_but_not_semantics() {
        let a = parse(MIN).unwrap();
        let b = parse(
            "# c\n[data]\ntrain = \"t.jsonl\"\n[model]\npath = \"m\"\n[train]\nsave_every = 3\n",
        )
        .unwrap();
        assert_eq!(a.semantic_hash(), b.semantic_hash());
        let c = parse(&format!("{MIN}[lora]\nrank = 16\n")).unwrap();
        assert_ne!(a.semantic_hash(), c.semantic_hash());
        let d = diff_entries(&a.semantic_entries(), &c.semantic_entries());
        assert_eq!(d, vec!["lora.rank: 32 → 16".to_owned()]);
        // A float that differs in the last bit changes the hash.
        let e = parse(&format!("{MIN}[optimizer]\nlr = 1.0000000000000002e-4\n")).unwrap();
        assert_ne!(a.semantic_hash(), e.semantic_hash());
        assert_eq!(a.semantic_hash().0.len(), 64);
    }

    #[test]
    fn the_device_is_not_part_of_a_run_and_old_checkpoints_still_match() {
        let a = parse(MIN).unwrap();
        let b = a.with_override("model.device=\"cuda:1\"").unwrap();
        assert_eq!(a.semantic_hash(), b.semantic_hash());
        // A checkpoint from before model.device was non-semantic recorded it.
        let mut old = a.semantic_entries();
        old.insert("model.device".into(), "\"cpu\"".into());
        let old_hash = ConfigHash("0".repeat(64));
        assert!(b.same_run_as(&old_hash, &old));
        // Any semantic difference still counts.
        let c = a.with_override("lora.rank=8").unwrap();
        assert!(!c.same_run_as(&old_hash, &old));
        assert!(c.same_run_as(&c.semantic_hash(), &BTreeMap::new()));
    }

    #[test]
    fn target_modules_as_peft_names_them() {
        let a = parse(MIN).unwrap();
        // Unset: no entry, so the hashes of configs (and checkpoints) from before the key
        // existed do not move.
        assert!(!a.semantic_entries().contains_key("lora.target_modules"));
        let list = |t: &str| {
            let c = parse(&format!("{MIN}[lora]\ntarget_modules = {t}\n")).unwrap();
            let names = c.lora.target_modules.clone().unwrap().names().to_vec();
            (names, c.semantic_hash())
        };
        // Canonical order without duplicates: the same set hashes alike.
        let (n1, h1) = list(r#"["v_proj", "q_proj", "v_proj"]"#);
        let (n2, h2) = list(r#"["q_proj", "v_proj"]"#);
        assert_eq!(n1, ["q_proj", "v_proj"]);
        assert_eq!((n1, h1), (n2, h2));
        let (all, h) = list(r#""all-linear""#);
        assert_eq!(all.len(), 7);
        assert!(!all.contains(&"lm_head".to_string()));
        assert_ne!(h, a.semantic_hash());
        // Unknown names, other strings, wrong types and an empty list: the line and key.
        for bad in [r#"["q_proj", "qkv"]"#, r#""all""#, "3", "[1]", "[]"] {
            let e = err(&format!("{MIN}[lora]\ntarget_modules = {bad}\n"));
            assert!(
                e.contains("run.toml:6:") && e.contains("lora.target_modules"),
                "{bad}: {e}"
            );
        }
        let e = err(&format!("{MIN}[lora]\ntarget_modules = [\"qkv\"]\n"));
        assert!(e.contains("unknown module \"qkv\""), "{e}");
        // With a train_* switch changed too: which one decides is ambiguous, so refused.
        let e = err(&format!(
            "{MIN}[lora]\ntarget_modules = [\"q_proj\"]\ntrain_mlp = false\n"
        ));
        assert!(e.contains("set either target_modules or the train_"), "{e}");
        // Through --set, as a bare word or a TOML list.
        let b = a.with_override("lora.target_modules=all-linear").unwrap();
        assert_eq!(b.lora.target_modules.unwrap().names().len(), 7);
        let b = a
            .with_override(r#"lora.target_modules=["down_proj"]"#)
            .unwrap();
        assert_eq!(b.lora.target_modules.unwrap().names(), ["down_proj"]);
    }

    #[test]
    fn overrides() {
        let a = parse(MIN).unwrap();
        let b = a.with_override("train.max_steps=7").unwrap();
        assert_eq!(b.train.max_steps, Some(7));
        let b = b.with_override("model.path=runs/x").unwrap();
        assert_eq!(b.model.path, "runs/x");
        let b = b.with_override("schedule.kind=\"cosine\"").unwrap();
        assert_eq!(b.schedule.kind, ScheduleKind::Cosine);
        let b = b.with_override("optimizer.grad_clip=1.0").unwrap();
        assert_eq!(b.optimizer.grad_clip, Some(1.0));
        let e = a.with_override("lora.rnak=3").unwrap_err().to_string();
        assert!(
            e.contains("unknown field `rnak`") && e.contains("`rank`"),
            "{e}"
        );
        let e = a
            .with_override("train.batch_size=x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.batch_size"), "{e}");
        assert!(a.with_override("novalue").is_err());
        let e = a.with_override("optimizer.lr=nan").unwrap_err().to_string();
        assert!(e.contains("nan is not a finite number"), "{e}");
        // A value out of range that came from --set is blamed on the --set, not the file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, MIN).unwrap();
        let e = RunConfig::load_with_overrides(&path, &["train.batch_size=0".into()])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "override `train.batch_size=0`: key `train.batch_size`: must be at least 1"
        );
        std::fs::write(&path, format!("{MIN}[train]\nbatch_size = 0\n")).unwrap();
        let e = RunConfig::load_with_overrides(&path, &["seed=3".into()])
            .unwrap_err()
            .to_string();
        // Named with the line that sets it.
        assert_eq!(
            e,
            format!("{}:6: train.batch_size: must be at least 1", path.display())
        );
    }

    #[test]
    fn load_reads_file_and_reports_missing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, MIN).unwrap();
        let c = RunConfig::load_with_overrides(&p, &["seed=5".into()]).unwrap();
        assert_eq!(c.seed, 5);
        let e = RunConfig::load(&dir.path().join("nope.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.toml"), "{e}");
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
