//! `ringtune eval`: mean negative log-likelihood (per unit of loss weight) of a dataset under
//! a base model, or the base model plus an adapter.

use std::path::PathBuf;

use anyhow::{Context, Result};
use ringtune_config::{Device, Overlong, Renderer, RunConfig, TrainOn};
use ringtune_data::{load_jsonl, Tokenizer};
use ringtune_model::lora::Adapters;
use ringtune_model::{resolve_model_dir, LoraConfig, LoraModel};
use ringtune_node::trainer::{device_of, evaluate, load_options, renderer_of};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Base model: a folder or hf:org/name.
    #[arg(long)]
    pub model: String,
    /// A PEFT adapter folder to put on the base.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// JSONL dataset (messages, text or tokens lines).
    #[arg(long)]
    pub data: PathBuf,
    /// Chat format: auto, role_colon, llama3, qwen.
    #[arg(long, default_value = "auto")]
    pub renderer: String,
    /// Tokens scored: last_assistant_message, all_assistant_messages, all_messages, all_tokens.
    #[arg(long, default_value = "all_assistant_messages")]
    pub train_on: String,
    /// Longest example in tokens (longer ones are truncated).
    #[arg(long, default_value_t = 2048)]
    pub max_length: usize,
    /// Padded tokens per forward pass.
    #[arg(long, default_value_t = 4096)]
    pub micro_batch_tokens: usize,
    /// Skip (and count) malformed lines instead of failing.
    #[arg(long)]
    pub skip_bad_lines: bool,
    /// cpu, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

fn parse_enum<T: serde::de::DeserializeOwned>(flag: &str, v: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(v.to_owned()))
        .map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
}

pub fn run(args: Args) -> Result<()> {
    let renderer: Renderer = parse_enum("renderer", &args.renderer)?;
    let train_on: TrainOn = parse_enum("train-on", &args.train_on)?;
    let device: Device = args
        .device
        .parse()
        .map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    // Reuse the trainer's mapping from config values to data options.
    let mut cfg = RunConfig::default();
    cfg.data.train_on = train_on;
    cfg.data.max_length = args.max_length;
    cfg.data.overlong = Overlong::Truncate;
    cfg.data.skip_bad_lines = args.skip_bad_lines;

    let model_dir = resolve_model_dir(&args.model)?;
    let tok = Tokenizer::from_dir(&model_dir)?;
    let renderer = renderer_of(renderer, &tok)?;
    let data = load_jsonl(&args.data, Some(&renderer), &load_options(&cfg))?;
    eprintln!("data: {}", data.report);
    let dev = device_of(device)?;
    let dtype = ringtune_model::DType::F32;
    let (model, adapters) = match &args.adapter {
        Some(a) => (
            LoraModel::load_with_adapter(&model_dir, a, &dev, dtype)
                .with_context(|| format!("loading adapter {}", a.display()))?,
            Adapters::On,
        ),
        // Adapters are built (the model type always has them) but switched off.
        None => (
            LoraModel::load(
                &model_dir,
                &LoraConfig::from_tinker(1, true, false, false),
                &dev,
                dtype,
                0,
            )?,
            Adapters::Off,
        ),
    };
    ringtune_node::trainer::check_vocab(&model_dir, &tok, &model)?;
    let (nll, weight) = evaluate(
        &model,
        &data.examples,
        args.micro_batch_tokens,
        tok.pad_id(),
        adapters,
    )?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"nll": nll, "perplexity": nll.exp(), "weight": weight,
                               "examples": data.examples.len()})
        );
    } else {
        println!(
            "nll {nll:.6} (perplexity {:.3}) over {weight:.0} weighted tokens in {} examples",
            nll.exp(),
            data.examples.len()
        );
    }
    Ok(())
}
