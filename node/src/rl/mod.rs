//! The RL loop (`train.method = "rl"`), as tinker-cookbook's `rl/train.py` runs it, on the
//! trainer's machinery: the same model loading, AdamW on the flat adapter buffer, LR
//! schedule, [`StepSync`] hook, run folder, atomic checkpoints and exact resume.
//!
//! One step:
//! 1. the environment gives `groups_per_step` problems (a pure function of seed and step);
//!    each is rendered as a generation prompt and repeated `group_size` times;
//! 2. the current policy (adapter on) samples every row with the step's seed, keeping the
//!    sampler's per-token logprobs; stop tokens and the renderer's stop strings end a row;
//! 3. the environment scores the decoded completions;
//! 4. advantages = reward − group mean; constant-reward groups are optionally dropped;
//!    with `kl_penalty_coef > 0` the base model (adapter off) scores the sampled tokens and
//!    the penalty is shaped into the per-token advantages ([`advantage`]);
//! 5. datums = prompt + completion tokens, weight 1, the sampler logprob and the advantage
//!    on completion tokens only; one forward/backward with the configured loss over them
//!    (micro-batched under `train.micro_batch_tokens`), summed, one AdamW step.
//!
//! Every random choice is seeded by `(seed, step)`, and the checkpoint holds the adapter,
//! AdamW state, step and pass counter, so N steps + resume + M steps gives the same adapter
//! bits as N + M steps straight through.
//!
//! Several nodes: [`RlTrainer::for_node`] + [`RlTrainer::train_shard`] train a rank's share
//! of a step's groups; the rows keep their global positions in the step's seeded stream,
//! and what needs the whole step (the all-constant rule, the KL mean, the metrics) is summed
//! over the ranks through the [`StepSync`] hook.
//!
//! Not here: signals and progress display (the CLI).

pub mod advantage;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ringtune_config::{self as config, ConfigHash, RunConfig};
use ringtune_data::env::{ArithmeticEnv, Completion, Env, ExternalEnv, Problem};
use ringtune_data::rng::mix64;
use ringtune_data::{Renderer, StopCondition, Tokenizer};
use ringtune_model::lora::Adapters;
use ringtune_model::loss::Reduction;
use ringtune_model::sample::{SamplingParams, StopReason};
use ringtune_model::{AdamW, Batch, LoraModel, LossKind, LrSchedule};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{write_file_atomic, CheckpointRecord, RunDir};
use crate::error::{io_err, Error, Result};
use crate::metrics::MetricsLog;
use crate::optim::Optimizer;
use crate::trainer::{
    adamw_of, check_model_fingerprint, check_vocab, device_of, dtype_of, lora_of,
    prepare_model_dir, renderer_of, schedule_of, starting_checkpoint, Mode, StepSync,
};

/// One RL step's numbers: a line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RlStepMetrics {
    /// Optimiser steps taken, counting this one (1-based).
    pub step: u64,
    /// Mean reward over every sample of the step (before dropping groups).
    pub reward_mean: f64,
    /// Lowest and highest reward of the step.
    pub reward_min: f64,
    /// Highest reward of the step.
    pub reward_max: f64,
    /// The environment's per-sample metrics averaged over the step (`correct`, `format`
    /// for the arithmetic env), each as `env/<name>`.
    #[serde(flatten)]
    pub env: BTreeMap<String, f64>,
    /// Groups whose rewards were all equal, as a fraction of the step's groups.
    pub frac_groups_constant: f64,
    /// Fraction of the groups left out of the batch (constant ones, when dropped).
    pub frac_groups_dropped: f64,
    /// Samples drawn.
    pub samples: u64,
    /// Tokens sampled (all samples).
    pub sampled_tokens: u64,
    /// Mean completion length in tokens.
    pub completion_len_mean: f64,
    /// Fraction of samples that ended cleanly (stop token or stop string).
    pub frac_stopped: f64,
    /// Completion tokens trained on (after dropping groups).
    pub train_tokens: u64,
    /// The loss (a sum over the trained tokens, as tinker's).
    pub loss: f64,
    /// tinker-cookbook's `kl_sample_train_v1`: mean over trained tokens of sampler logprob −
    /// learner logprob (≈ 0 on-policy; a check that sampling and training agree).
    pub kl_sample_train: f64,
    /// Mean over trained tokens of sampler logprob − base logprob: the sampled estimate of
    /// KL(policy ‖ base) (only when `rl.kl_penalty_coef > 0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl_policy_base: Option<f64>,
    /// Learning rate used for this step.
    pub lr: f64,
    /// Global L2 norm of the gradient, before clipping.
    pub grad_norm: f64,
    /// Seconds spent sampling.
    pub sample_s: f64,
    /// Seconds spent in the environment's scoring.
    pub score_s: f64,
    /// Seconds spent in the base pass (KL), forward/backward and the optimiser step.
    pub train_s: f64,
    /// Seconds of training so far (summed over resumed segments).
    pub elapsed_s: f64,
}

/// What the RL trainer reports as it goes.
#[derive(Debug)]
pub enum RlEvent<'a> {
    /// A step finished (its line is already in metrics.jsonl).
    Step(&'a RlStepMetrics),
    /// A checkpoint is complete and listed.
    Checkpoint(&'a CheckpointRecord),
}

/// How [`RlTrainer::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RlOutcome {
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

/// `state.json` of an RL checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlState {
    /// Format version of this file.
    pub version: u32,
    /// Always `"rl"`: an SFT run's state is not resumed as RL's.
    pub method: String,
    /// Optimiser steps taken.
    pub step: u64,
    /// The semantic hash of the config that wrote it.
    pub config_hash: ConfigHash,
    /// The config's semantic entries, to name what changed when the hash differs.
    pub config: BTreeMap<String, String>,
    /// The model's forward_backward pass counter (the dropout RNG's state).
    pub passes: u64,
    /// Seconds of training before this checkpoint.
    pub elapsed_s: f64,
    /// FNV-1a of the adapter bits, checked after loading.
    pub params_fingerprint: u64,
    /// The base model's fingerprint (as in SFT's `TrainState`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_fingerprint: Option<String>,
}

const STATE_VERSION: u32 = 1;
const STATE_FILE: &str = "state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// One sampled row on its way into the batch.
struct Rollout {
    /// Prompt + completion tokens.
    tokens: Vec<u32>,
    /// Prompt length.
    prompt_len: usize,
    /// Sampler logprob per completion token.
    logprobs: Vec<f32>,
    /// Advantage per completion token.
    advantages: Vec<f32>,
}

/// An RL run on this process (see the module docs).
pub struct RlTrainer {
    cfg: RunConfig,
    hash: ConfigHash,
    run: RunDir,
    model: LoraModel,
    renderer: Renderer,
    tokenizer: Tokenizer,
    stop: StopCondition,
    env: Box<dyn Env>,
    loss: LossKind,
    opt: Optimizer,
    schedule: LrSchedule,
    step: u64,
    start_step: u64,
    total_steps: u64,
    pad_id: u32,
    /// `None` on a node of a distributed run: the coordinator writes the run's metrics.
    metrics: Option<RlMetricsLog>,
    elapsed_before: f64,
    segment_start: Instant,
    last_loss: Option<f64>,
    last_saved: Option<u64>,
    sync: Box<dyn StepSync>,
    /// The base model's fingerprint, written into every checkpoint.
    model_fp: String,
}

impl std::fmt::Debug for RlTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RlTrainer")
            .field("run", &self.run.root())
            .field("env", &self.env.name())
            .field("step", &self.step)
            .field("total_steps", &self.total_steps)
            .finish_non_exhaustive()
    }
}

/// The environment named by the config.
pub fn env_of(cfg: &RunConfig) -> Result<Box<dyn Env>> {
    let r = &cfg.rl;
    Ok(match r.env {
        config::RlEnv::Arithmetic => {
            Box::new(ArithmeticEnv::new(cfg.seed, r.max_operand, r.format_coef)?)
        }
        config::RlEnv::External => {
            let prompts = r.prompts.as_ref().ok_or_else(|| {
                Error::Invalid("rl.prompts: the external env needs a prompts file".into())
            })?;
            Box::new(ExternalEnv::new(
                r.command.clone(),
                Duration::from_secs_f64(r.timeout_s),
                prompts,
                cfg.seed,
            )?)
        }
    })
}

/// The loss named by the config.
pub fn loss_of(cfg: &RunConfig) -> Result<LossKind> {
    let r = &cfg.rl;
    let name = match r.loss {
        config::RlLoss::ImportanceSampling => "importance_sampling",
        config::RlLoss::Ppo => "ppo",
        config::RlLoss::Cispo => "cispo",
    };
    Ok(LossKind::with_config(
        name,
        r.clip_low.map(|x| x as f32),
        r.clip_high.map(|x| x as f32),
    )?)
}

impl RlTrainer {
    /// Prepares an RL run: checks the run folder against `resume`, loads (or creates) the
    /// model, the tokenizer and the environment, and only then touches the run folder.
    pub fn new(cfg: RunConfig, resume: bool, sync: Box<dyn StepSync>) -> Result<Self> {
        Self::build(cfg, Mode::Local { resume }, sync)
    }

    /// One rank of a distributed RL run (`ringtune node`): no metrics.jsonl of its own (the
    /// coordinator writes the run's), trains the groups the coordinator assigns
    /// ([`RlTrainer::train_shard`]), starts from the checkpoint written after
    /// `resume_from` (0: fresh). Only the rank that `writes` cleans the run folder.
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

    fn build(cfg: RunConfig, start: Mode, sync: Box<dyn StepSync>) -> Result<Self> {
        let total_steps = cfg.train.max_steps.ok_or_else(|| {
            Error::Invalid("train.max_steps: an RL run needs its number of steps".into())
        })?;
        let hash = cfg.semantic_hash();
        let out_dir = cfg.output_dir.clone();
        let latest = starting_checkpoint(&out_dir, start)?;
        let node = matches!(start, Mode::Node { .. });
        let cleans = !matches!(start, Mode::Node { writes: false, .. });
        let resume_state = match &latest {
            Some(rec) => {
                let dir = out_dir.join(&rec.path);
                let state = read_state(&dir.join(STATE_FILE), &cfg, &hash, &dir)?;
                Some((dir, state))
            }
            None => None,
        };

        let model_dir = prepare_model_dir(&cfg)?;
        let model_fp = ringtune_model::model_fingerprint(&model_dir)?;
        if let Some((dir, state)) = &resume_state {
            check_model_fingerprint(dir, &model_dir, state.model_fingerprint.as_ref(), &model_fp)?;
        }
        let tokenizer = Tokenizer::from_dir(&model_dir)?;
        let renderer = renderer_of(cfg.data.renderer, &tokenizer)?;
        let stop = renderer.stop_condition();
        let env = env_of(&cfg)?;
        let loss = loss_of(&cfg)?;
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
            crate::trainer::warm_start(&cfg, &model)?;
        }
        check_vocab(&model_dir, &tokenizer, &model)?;
        let adam_cfg = adamw_of(&cfg);
        let schedule = schedule_of(&cfg, total_steps);

        // Inputs are good: now the run folder may be touched.
        let run = RunDir::create(&out_dir)?;
        if cleans {
            run.clean_incomplete()?;
        }
        let (opt, step, elapsed_before, metrics) = match resume_state {
            Some((dir, state)) => {
                model.load_adapter(&dir.join("adapter"))?;
                let fp = model.params_fingerprint()?;
                if fp != state.params_fingerprint {
                    return Err(Error::Corrupt {
                        path: dir.join("adapter"),
                        line: 1,
                        message: format!(
                            "adapter fingerprint {fp:016x} differs from the {:016x} recorded \
                             in state.json",
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
                model.set_passes(state.passes);
                let metrics = if node {
                    None
                } else {
                    Some(RlMetricsLog::resume(&run.metrics_path(), state.step)?)
                };
                (opt, state.step, state.elapsed_s, metrics)
            }
            None => (
                AdamW::new(adam_cfg, model.param_layout().clone()),
                0,
                0.0,
                if node {
                    None
                } else {
                    Some(RlMetricsLog::create(&run.metrics_path())?)
                },
            ),
        };
        let opt = Optimizer::new(opt, &model)?;
        let pad_id = tokenizer.pad_id();
        Ok(Self {
            cfg,
            hash,
            run,
            model,
            renderer,
            tokenizer,
            stop,
            env,
            loss,
            opt,
            schedule,
            step,
            start_step: step,
            total_steps,
            pad_id,
            metrics,
            elapsed_before,
            segment_start: Instant::now(),
            last_loss: None,
            last_saved: Some(step).filter(|_| step > 0),
            sync,
            model_fp,
        })
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

    /// The adapter parameters' digest (the SHA-256 tree of `trainer::params_sha256`): equal
    /// on two ranks exactly when their adapters are bit-identical.
    pub fn adapter_sha256(&self) -> Result<[u8; 32]> {
        self.opt.params_sha256(&self.model)
    }

    /// The run folder.
    pub fn run_dir(&self) -> &RunDir {
        &self.run
    }

    /// The model.
    pub fn model(&self) -> &LoraModel {
        &self.model
    }

    /// [`crate::trainer::renderer_warning`] for this run's config and tokenizer.
    pub fn renderer_warning(&self) -> Option<String> {
        crate::trainer::renderer_warning(self.cfg.data.renderer, &self.tokenizer)
    }

    /// The environment's name.
    pub fn env_name(&self) -> &str {
        self.env.name()
    }

    /// The adapter parameters, flat in layout order.
    pub fn params_flat(&self) -> Result<Vec<f32>> {
        self.opt.params_flat(&self.model)
    }

    /// Where AdamW runs: `host`, or `device` (the model's GPU; see [`crate::optim`]).
    pub fn optimizer_placement(&self) -> &'static str {
        self.opt.placement()
    }

    /// Trains until `total_steps`, or until `stop` is set (checked between steps), writing a
    /// checkpoint at the save cadence and at the end either way.
    pub fn run(
        &mut self,
        stop: &AtomicBool,
        on_event: &mut dyn FnMut(RlEvent),
    ) -> Result<RlOutcome> {
        let save_every = self.cfg.train.save_every;
        self.segment_start = Instant::now();
        while self.step < self.total_steps {
            if stop.load(Ordering::SeqCst) {
                self.save_if_needed(on_event)?;
                return Ok(RlOutcome::Interrupted { step: self.step });
            }
            let m = self.train_step()?;
            if let Some(log) = &mut self.metrics {
                log.append(&m)?;
            }
            on_event(RlEvent::Step(&m));
            if save_every > 0
                && self.step.is_multiple_of(save_every)
                && self.step < self.total_steps
            {
                let rec = self.save()?;
                on_event(RlEvent::Checkpoint(&rec));
            }
        }
        self.save_if_needed(on_event)?;
        Ok(RlOutcome::Finished { step: self.step })
    }

    fn save_if_needed(&mut self, on_event: &mut dyn FnMut(RlEvent)) -> Result<()> {
        if self.step > 0 && self.last_saved != Some(self.step) {
            let rec = self.save()?;
            on_event(RlEvent::Checkpoint(&rec));
        }
        Ok(())
    }

    /// The completion's text for the environment, and whether it ended cleanly: the stop
    /// token is not part of the text, and a stop string is cut off with what follows it.
    fn completion_text(&self, tokens: &[u32], reason: StopReason) -> Result<(String, bool)> {
        Ok(match reason {
            StopReason::StopToken => (
                self.tokenizer
                    .decode(&tokens[..tokens.len().saturating_sub(1)], false)?,
                true,
            ),
            StopReason::StopHook => {
                let text = self.tokenizer.decode(tokens, false)?;
                let cut = self
                    .stop
                    .sequences
                    .iter()
                    .filter_map(|s| text.find(s.as_str()))
                    .min()
                    .unwrap_or(text.len());
                (text[..cut].to_owned(), true)
            }
            StopReason::MaxTokens => (self.tokenizer.decode(tokens, false)?, false),
        })
    }

    /// One step; returns its metrics.
    pub fn train_step(&mut self) -> Result<RlStepMetrics> {
        let all: Vec<usize> = (0..self.cfg.rl.groups_per_step).collect();
        self.train_groups(self.step + 1, &all)
    }

    /// One step of a distributed run over this rank's `groups` (indices into the step's
    /// `groups_per_step` problems, as the coordinator assigned them). Every rank samples
    /// its groups with the rows' global positions in the step's seeded stream, so the
    /// samples do not depend on how the groups were split; the gradient, the KL penalty's
    /// batch mean and the step's metrics are summed over the ranks.
    pub fn train_shard(&mut self, step: u64, groups: &[usize]) -> Result<RlStepMetrics> {
        if step != self.step + 1 {
            return Err(Error::Invalid(format!(
                "asked to run step {step}, but this rank is at step {} (expects {})",
                self.step,
                self.step + 1
            )));
        }
        let n = self.cfg.rl.groups_per_step;
        if let Some(&bad) = groups.iter().find(|&&g| g >= n) {
            return Err(Error::Invalid(format!(
                "step {step}: group {bad} is out of range ({n} groups per step)"
            )));
        }
        self.train_groups(step, groups)
    }

    fn train_groups(&mut self, step: u64, groups: &[usize]) -> Result<RlStepMetrics> {
        let r = self.cfg.rl.clone();
        let g = r.group_size;

        // 1. Problems and prompts (all of the step's, a pure function of seed and step; this
        //    rank's share of them).
        let all_problems: Vec<Problem> = self.env.problems(step, r.groups_per_step)?;
        let problems: Vec<Problem> = groups.iter().map(|&i| all_problems[i].clone()).collect();
        let mut prompt_tokens = Vec::with_capacity(problems.len());
        let mut prompt_texts = Vec::with_capacity(problems.len());
        for p in &problems {
            let toks = self.renderer.build_generation_prompt(&p.messages)?;
            if toks.is_empty() {
                return Err(Error::Invalid(format!(
                    "step {step}: problem {:?} renders to an empty prompt",
                    p.id
                )));
            }
            prompt_tokens.push(toks);
            prompt_texts.push(self.renderer.render_text(&p.messages, true)?);
        }

        // 2. Sampling from the current policy.
        let t_sample = Instant::now();
        let params = SamplingParams {
            max_tokens: r.max_tokens,
            temperature: r.temperature as f32,
            top_k: None,
            top_p: 1.0,
            stop_token_ids: self.stop.token_ids.clone(),
            seed: mix64(self.cfg.seed ^ mix64(step ^ 0x0052_4c5f_7361_6d70)),
        };
        let tokenizer = &self.tokenizer;
        let sequences = &self.stop.sequences;
        let mut hook = |_row: usize, toks: &[u32]| -> bool {
            if sequences.is_empty() {
                return false;
            }
            // A stop string can only have just been completed by the last token, so the
            // tail's text is enough; decoding errors just mean "not stopped".
            let tail = &toks[toks.len().saturating_sub(16)..];
            tokenizer
                .decode(tail, false)
                .is_ok_and(|t| sequences.iter().any(|s| t.contains(s.as_str())))
        };
        // Each run of consecutive groups is one batch, its rows at their global positions
        // in the step's stream (one run, from row 0, in a one-process run).
        let mut samples = Vec::with_capacity(groups.len() * g);
        let mut at = 0;
        while at < groups.len() {
            let mut end = at + 1;
            while end < groups.len() && groups[end] == groups[end - 1] + 1 {
                end += 1;
            }
            let rows: Vec<Vec<u32>> = prompt_tokens[at..end]
                .iter()
                .flat_map(|p| std::iter::repeat_n(p.clone(), g))
                .collect();
            samples.extend(self.model.sample_rows(
                &rows,
                groups[at] * g,
                &params,
                Adapters::On,
                &mut hook,
            )?);
            at = end;
        }
        let sample_s = t_sample.elapsed().as_secs_f64();

        // 3. Rewards.
        let t_score = Instant::now();
        let mut texts = Vec::with_capacity(samples.len());
        for s in &samples {
            texts.push(self.completion_text(&s.tokens, s.stop_reason)?);
        }
        let completions: Vec<Completion> = texts
            .iter()
            .enumerate()
            .map(|(i, (text, stopped))| Completion {
                problem: &problems[i / g],
                prompt_text: &prompt_texts[i / g],
                text,
                stopped: *stopped,
            })
            .collect();
        let scores = self.env.score(&completions)?;
        if scores.len() != samples.len() {
            return Err(Error::Invalid(format!(
                "step {step}: environment {} returned {} scores for {} samples",
                self.env.name(),
                scores.len(),
                samples.len()
            )));
        }
        let score_s = t_score.elapsed().as_secs_f64();
        let rewards: Vec<f64> = scores.iter().map(|s| s.reward).collect();
        if let Some(i) = rewards.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite {
                step,
                what: "reward",
                value: rewards[i],
            });
        }

        // 4. Advantages, group dropping.
        let t_train = Instant::now();
        let adv = advantage::group_advantages(&rewards, g);
        let n_groups = problems.len();
        let constant = rewards
            .chunks(g)
            .filter(|c| c.iter().all(|&x| x == c[0]))
            .count();
        let kept: Vec<usize> = if r.remove_constant_reward_groups {
            // When every group of the whole step is constant, the step's first group is
            // kept (tinker-cookbook's rule): a decision over all ranks' groups.
            let local = advantage::non_constant_groups(&rewards, g);
            let mut count = [local.len() as f32];
            self.sync
                .all_reduce_sum(step, &mut count)
                .map_err(|message| Error::Sync { step, message })?;
            if count[0] == 0.0 {
                groups.iter().position(|&gi| gi == 0).into_iter().collect()
            } else {
                local
            }
        } else {
            (0..n_groups).collect()
        };
        let mut rollouts: Vec<Rollout> = Vec::new();
        for &gi in &kept {
            for i in gi * g..(gi + 1) * g {
                let s = &samples[i];
                if s.tokens.is_empty() {
                    continue;
                }
                let p = &prompt_tokens[gi];
                let mut tokens = p.clone();
                tokens.extend_from_slice(&s.tokens);
                rollouts.push(Rollout {
                    tokens,
                    prompt_len: p.len(),
                    logprobs: s.logprobs.clone(),
                    advantages: vec![adv[i] as f32; s.tokens.len()],
                });
            }
        }

        // KL penalty against the base model.
        let kl_policy_base = if r.kl_penalty_coef > 0.0 {
            let base = self.completion_logprobs(&rollouts, Adapters::Off)?;
            let sampled: Vec<Vec<f32>> = rollouts.iter().map(|x| x.logprobs.clone()).collect();
            let mut advs: Vec<Vec<f32>> = rollouts.iter().map(|x| x.advantages.clone()).collect();
            // d̄ is the mean over the whole step's tokens: sum the ranks' shares first.
            let (d_sum, d_n) = advantage::kl_diff_sum(&sampled, &base);
            let mut sums = [d_sum as f32, d_n as f32];
            self.sync
                .all_reduce_sum(step, &mut sums)
                .map_err(|message| Error::Sync { step, message })?;
            let kl = if sums[1] > 0.0 {
                (sums[0] / sums[1]) as f64
            } else {
                0.0
            };
            advantage::apply_kl_penalty_with_mean(
                &mut advs,
                &sampled,
                &base,
                r.kl_penalty_coef,
                kl,
            );
            for (x, a) in rollouts.iter_mut().zip(advs) {
                x.advantages = a;
            }
            Some(kl)
        } else {
            None
        };

        // 5. One forward/backward over the datums, one AdamW step.
        let mut sum = self.opt.new_step(&self.model, 2);
        let mut train_tokens = 0u64;
        let mut diff_sum = 0.0f64;
        for mb in self.micro_batches(&rollouts) {
            let batch = self.batch_of(&rollouts, &mb)?;
            let (out, grads) = self.model.forward_backward(&batch, self.loss)?;
            sum.add(&grads)?;
            let tail = sum.tail_mut();
            tail[0] += out.weight_sum as f32;
            tail[1] += out.loss_sum as f32;
            let seq = batch.seq();
            for (row, &ri) in mb.iter().enumerate() {
                let x = &rollouts[ri];
                for (j, &q) in x.logprobs.iter().enumerate() {
                    let lp = out.logprobs[row * seq + x.prompt_len + j - 1];
                    diff_sum += q as f64 - lp as f64;
                }
                train_tokens += x.logprobs.len() as u64;
            }
        }
        // The step's numbers ride in the same all-reduce, so every rank (and the metrics)
        // sees the whole step's, not its own share.
        let env_names = self.env.metric_names();
        let stopped = texts.iter().filter(|(_, s)| *s).count();
        let sampled_tokens: u64 = samples.iter().map(|s| s.tokens.len() as u64).sum();
        let mut stats = vec![
            rewards.iter().sum::<f64>(),
            samples.len() as f64,
            constant as f64,
            n_groups as f64,
            kept.len() as f64,
            sampled_tokens as f64,
            stopped as f64,
            train_tokens as f64,
            diff_sum,
        ];
        for name in &env_names {
            let (sum, count) = scores
                .iter()
                .filter_map(|sc| sc.metrics.get(name))
                .fold((0.0, 0.0), |(s, c), v| (s + v, c + 1.0));
            stats.extend([sum, count]);
        }
        sum.extend_tail(stats.iter().map(|&x| x as f32));
        sum.all_reduce(self.sync.as_mut(), step)
            .map_err(|message| Error::Sync { step, message })?;
        let global: Vec<f64> = sum.tail()[2..].iter().map(|&x| x as f64).collect();
        sum.truncate_tail(2);
        let weight = sum.tail()[0] as f64;
        let loss_sum = sum.tail()[1] as f64;
        let (loss, divide) = match self.loss.reduction() {
            Reduction::Sum => (loss_sum, 1.0),
            Reduction::WeightMean => (loss_sum / weight.max(1e-30), weight),
        };
        if !loss.is_finite() {
            return Err(Error::NonFinite {
                step,
                what: "loss",
                value: loss,
            });
        }
        let scale = (divide != 1.0 && divide > 0.0).then(|| (1.0 / divide) as f32);
        let lr = self.schedule.lr_at(self.step);
        let rep = self.opt.apply(&self.model, sum, scale, lr)?;
        self.step = step;
        self.last_loss = Some(loss);
        let train_s = t_train.elapsed().as_secs_f64();

        // Metrics: the whole step's (summed over ranks above); min/max and metrics outside
        // the environment's fixed list are this rank's samples'.
        let mut env_metrics: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for sc in &scores {
            for (k, v) in &sc.metrics {
                if !env_names.contains(k) {
                    let e = env_metrics.entry(format!("env/{k}")).or_insert((0.0, 0.0));
                    e.0 += v;
                    e.1 += 1.0;
                }
            }
        }
        for (i, name) in env_names.iter().enumerate() {
            let (sum, count) = (global[9 + 2 * i], global[10 + 2 * i]);
            if count > 0.0 {
                env_metrics.insert(format!("env/{name}"), (sum, count));
            }
        }
        let [reward_sum, n_samples, n_constant, n_groups, n_kept, sampled, n_stopped, trained, d_sum] =
            [0, 1, 2, 3, 4, 5, 6, 7, 8].map(|i| global[i]);
        let ns = n_samples.max(1.0);
        let ng = n_groups.max(1.0);
        Ok(RlStepMetrics {
            step,
            reward_mean: reward_sum / ns,
            reward_min: rewards.iter().copied().fold(f64::INFINITY, f64::min),
            reward_max: rewards.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            env: env_metrics
                .into_iter()
                .map(|(k, (s, c))| (k, s / c))
                .collect(),
            frac_groups_constant: n_constant / ng,
            frac_groups_dropped: (n_groups - n_kept) / ng,
            samples: n_samples as u64,
            sampled_tokens: sampled as u64,
            completion_len_mean: sampled / ns,
            frac_stopped: n_stopped / ns,
            train_tokens: trained as u64,
            loss,
            kl_sample_train: if trained > 0.0 { d_sum / trained } else { 0.0 },
            kl_policy_base,
            lr,
            grad_norm: rep.grad_norm,
            sample_s,
            score_s,
            train_s,
            elapsed_s: self.elapsed(),
        })
    }

    /// Rollout indices packed into micro-batches, longest first, each under
    /// `train.micro_batch_tokens` padded positions (a longer rollout goes alone).
    fn micro_batches(&self, rollouts: &[Rollout]) -> Vec<Vec<usize>> {
        let budget = self.cfg.train.micro_batch_tokens;
        let mut order: Vec<usize> = (0..rollouts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(rollouts[i].tokens.len()));
        let mut out: Vec<Vec<usize>> = Vec::new();
        let mut cur: Vec<usize> = Vec::new();
        let mut width = 0;
        for i in order {
            let len = rollouts[i].tokens.len() - 1;
            let w = width.max(len);
            if !cur.is_empty() && (cur.len() + 1) * w > budget {
                out.push(std::mem::take(&mut cur));
                width = 0;
            }
            width = width.max(len);
            cur.push(i);
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    }

    /// The datums of `rows`: weight, sampler logprob and advantage on completion tokens.
    fn batch_of(&self, rollouts: &[Rollout], rows: &[usize]) -> Result<Batch> {
        let mut tokens = Vec::with_capacity(rows.len());
        let mut weights = Vec::with_capacity(rows.len());
        let mut q = Vec::with_capacity(rows.len());
        let mut a = Vec::with_capacity(rows.len());
        for &i in rows {
            let x = &rollouts[i];
            let p = x.prompt_len;
            let pad = |v: &[f32]| -> Vec<f32> {
                let mut row = vec![0f32; p];
                row.extend_from_slice(v);
                row
            };
            tokens.push(x.tokens.clone());
            weights.push(pad(&vec![1.0; x.logprobs.len()]));
            q.push(pad(&x.logprobs));
            a.push(pad(&x.advantages));
        }
        Ok(Batch::from_token_rows(&tokens, &weights, self.pad_id)?.with_rl_rows(&q, &a)?)
    }

    /// Per rollout, the logprob of each completion token under the model (adapter on or
    /// off), without gradients.
    fn completion_logprobs(
        &self,
        rollouts: &[Rollout],
        adapters: Adapters,
    ) -> Result<Vec<Vec<f32>>> {
        let mut out = vec![Vec::new(); rollouts.len()];
        for mb in self.micro_batches(rollouts) {
            let rows: Vec<Vec<u32>> = mb.iter().map(|&i| rollouts[i].tokens.clone()).collect();
            let weights: Vec<Vec<f32>> = rows.iter().map(|t| vec![0f32; t.len()]).collect();
            let batch = Batch::from_token_rows(&rows, &weights, self.pad_id)?;
            let lp = self
                .model
                .logprobs(&batch, LossKind::CrossEntropy, adapters)?
                .logprobs;
            let seq = batch.seq();
            for (row, &i) in mb.iter().enumerate() {
                let x = &rollouts[i];
                out[i] = (0..x.logprobs.len())
                    .map(|j| lp[row * seq + x.prompt_len + j - 1])
                    .collect();
            }
        }
        Ok(out)
    }

    fn elapsed(&self) -> f64 {
        self.elapsed_before + self.segment_start.elapsed().as_secs_f64()
    }

    /// Writes a checkpoint of the current step (atomically) and lists it.
    pub fn save(&mut self) -> Result<CheckpointRecord> {
        let state = RlState {
            version: STATE_VERSION,
            method: "rl".into(),
            step: self.step,
            config_hash: self.hash.clone(),
            config: self.cfg.semantic_entries(),
            passes: self.model.passes(),
            elapsed_s: self.elapsed(),
            params_fingerprint: self.model.params_fingerprint()?,
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

/// Reads an RL checkpoint's state, checking first that the config is the one that wrote it
/// (so a changed config is named before anything else) and that it is an RL checkpoint.
fn read_state(path: &Path, cfg: &RunConfig, hash: &ConfigHash, dir: &Path) -> Result<RlState> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let corrupt = |line: usize, message: String| Error::Corrupt {
        path: path.to_owned(),
        line,
        message,
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| corrupt(e.line(), e.to_string()))?;
    if let (Some(h), Some(entries)) = (v.get("config_hash"), v.get("config")) {
        let entries: BTreeMap<String, String> = serde_json::from_value(entries.clone())
            .map_err(|e| corrupt(1, format!("field `config`: {e}")))?;
        let old_hash = config::ConfigHash(h.as_str().unwrap_or_default().to_string());
        if h.as_str() != Some(hash.0.as_str()) && !cfg.same_run_as(&old_hash, &entries) {
            return Err(Error::ConfigChanged {
                checkpoint: dir.to_owned(),
                changed: config::diff_entries(&entries, &cfg.semantic_entries()),
            });
        }
    }
    if v.get("method").and_then(|m| m.as_str()) != Some("rl") {
        return Err(corrupt(
            1,
            "not an RL checkpoint (no `\"method\": \"rl\"`): resume it with the method that \
             wrote it"
                .into(),
        ));
    }
    let state: RlState = serde_json::from_value(v).map_err(|e| corrupt(1, e.to_string()))?;
    if state.version != STATE_VERSION {
        return Err(corrupt(
            1,
            format!(
                "state version {} is not the supported {STATE_VERSION}",
                state.version
            ),
        ));
    }
    Ok(state)
}

/// `metrics.jsonl` for RL lines (same file rules as [`MetricsLog`]: appended per step, cut
/// back to the checkpoint's step on resume).
#[derive(Debug)]
struct RlMetricsLog {
    path: PathBuf,
    file: File,
}

impl RlMetricsLog {
    fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(io_err(path))?;
        Ok(Self {
            path: path.to_owned(),
            file,
        })
    }

    fn resume(path: &Path, step: u64) -> Result<Self> {
        // The cut-back only reads each line's `step`, so it serves RL lines too.
        drop(MetricsLog::resume(path, step)?);
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io_err(path))?;
        Ok(Self {
            path: path.to_owned(),
            file,
        })
    }

    fn append(&mut self, m: &RlStepMetrics) -> Result<()> {
        let mut line = serde_json::to_string(m).expect("metrics serialize");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(io_err(&self.path))
    }
}

/// Reads every line of an RL run's metrics file (for tests and tools).
pub fn read_metrics(path: &Path) -> Result<Vec<RlStepMetrics>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::Corrupt {
                path: path.to_owned(),
                line: i + 1,
                message: e.to_string(),
            })
        })
        .collect()
}
