//! `ringtune sample`: completions from a base model or base + adapter, for one prompt or a
//! JSONL of chats rendered by the model's chat format; and `ringtune bench sample`, the
//! decode-speed benchmark on a random-init preset model.
//!
//! Stop strings live here, not in the model crate (which has no tokenizer): the sampling
//! loop's stop hook decodes each row's completion and ends the row once a stop string
//! appears; the printed text is cut just before it (the tokens keep everything sampled,
//! as tinker's do).

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ringtune_config::Renderer as RendererChoice;
use ringtune_data::{Message, Renderer, Role, Tokenizer};
use ringtune_model::{
    resolve_model_dir, Adapters, DType, Device, LoraConfig, LoraModel, ModelPreset, Sample,
    SamplingParams,
};
use ringtune_node::trainer::{device_of, renderer_of};
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Base model: a folder or hf:org/name.
    #[arg(long)]
    pub model: String,
    /// A PEFT adapter folder to put on the base.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// With --adapter: sample from the base alone (the adapter switched off).
    #[arg(long)]
    pub no_adapter: bool,
    /// One user message to answer.
    #[arg(long, conflicts_with = "input", required_unless_present = "input")]
    pub prompt: Option<String>,
    /// JSONL of chats, one `{"messages": [...]}` per line; a trailing assistant message is
    /// dropped (the model writes that turn).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Chat format: auto, role_colon, llama3, qwen.
    #[arg(long, default_value = "auto")]
    pub renderer: String,
    /// Softmax temperature; 0 is greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling threshold (1 keeps all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Most tokens per completion.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Extra stop strings (repeatable), on top of the chat format's stop tokens/strings.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Seed: the same seed and inputs give the same samples.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Completions per prompt.
    #[arg(long, default_value_t = 1)]
    pub num_samples: usize,
    /// Rows per sampling batch (does not change the samples).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Also print the logprob of every prompt token given its prefix.
    #[arg(long)]
    pub prompt_logprobs: bool,
    /// cpu, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute threads (default, or 0: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// One JSON object per sample per line instead of text.
    #[arg(long)]
    pub json: bool,
}

fn parse_renderer(v: &str) -> Result<RendererChoice> {
    serde_json::from_value(serde_json::Value::String(v.to_owned()))
        .map_err(|e| anyhow::anyhow!("--renderer: {e}"))
}

/// The chats of `--input`, each without a trailing assistant turn. Errors name the line.
fn read_chats(path: &PathBuf) -> Result<Vec<Vec<Message>>> {
    #[derive(serde::Deserialize)]
    struct Line {
        messages: Vec<Message>,
    }
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut chats = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("{}: line {}", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let mut l: Line = serde_json::from_str(&line).with_context(|| {
            format!(
                "{}: line {}: expected {{\"messages\": [{{\"role\", \"content\"}}, ...]}}",
                path.display(),
                i + 1
            )
        })?;
        if l.messages.last().is_some_and(|m| m.role == Role::Assistant) {
            l.messages.pop();
        }
        if l.messages.is_empty() {
            bail!("{}: line {}: no messages to answer", path.display(), i + 1);
        }
        chats.push(l.messages);
    }
    if chats.is_empty() {
        bail!("{}: no chats", path.display());
    }
    Ok(chats)
}

/// The completion's text: special tokens skipped, cut before the first stop string.
/// Returns the text and whether a stop string was found.
fn completion_text(tok: &Tokenizer, tokens: &[u32], stops: &[String]) -> Result<(String, bool)> {
    let text = tok.decode(tokens, true)?;
    let cut = stops.iter().filter_map(|s| text.find(s.as_str())).min();
    Ok(match cut {
        Some(i) => (text[..i].to_owned(), true),
        None => (text, false),
    })
}

pub fn run(args: Args) -> Result<()> {
    ringtune_model::init_cpu_runtime(args.threads);
    if args.num_samples == 0 || args.batch_size == 0 {
        bail!("--num-samples and --batch-size must be at least 1");
    }
    if args.stop.iter().any(String::is_empty) {
        bail!("--stop: an empty stop string would end every completion at once");
    }
    let device: ringtune_config::Device = args
        .device
        .parse()
        .map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let model_dir = resolve_model_dir(&args.model)?;
    let tok = Tokenizer::from_dir(&model_dir)
        .with_context(|| format!("loading the tokenizer of {}", model_dir.display()))?;
    let renderer: Renderer = renderer_of(parse_renderer(&args.renderer)?, &tok)?;
    let chats = match (&args.prompt, &args.input) {
        (Some(p), None) => vec![vec![Message::new(Role::User, p.clone())]],
        (None, Some(path)) => read_chats(path)?,
        _ => bail!("give exactly one of --prompt and --input"),
    };
    let prompts = chats
        .iter()
        .enumerate()
        .map(|(i, c)| {
            renderer
                .build_generation_prompt(c)
                .with_context(|| format!("rendering chat {i}"))
        })
        .collect::<Result<Vec<_>>>()?;

    let dev = device_of(device)?;
    let (model, adapters) = match &args.adapter {
        Some(a) => (
            LoraModel::load_with_adapter(&model_dir, a, &dev, DType::F32)
                .with_context(|| format!("loading adapter {}", a.display()))?,
            if args.no_adapter {
                Adapters::Off
            } else {
                Adapters::On
            },
        ),
        // The model type always carries adapters; without one they stay off.
        None => (
            LoraModel::load(
                &model_dir,
                &LoraConfig::from_tinker(1, true, false, false),
                &dev,
                DType::F32,
                0,
            )
            .with_context(|| format!("loading model {}", model_dir.display()))?,
            Adapters::Off,
        ),
    };
    ringtune_node::trainer::check_vocab(&model_dir, &tok, &model)?;

    let stop_cond = renderer.stop_condition();
    let mut stops = stop_cond.sequences.clone();
    stops.extend(args.stop.iter().cloned());
    let params = SamplingParams {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        stop_token_ids: stop_cond.token_ids.clone(),
        seed: args.seed,
    };
    params.validate()?;

    let prompt_lps = if args.prompt_logprobs {
        Some(model.prompt_logprobs(&prompts, adapters)?)
    } else {
        None
    };

    // Rows: every prompt `num_samples` times, prompt-major.
    let rows: Vec<(usize, usize)> = (0..prompts.len())
        .flat_map(|p| (0..args.num_samples).map(move |s| (p, s)))
        .collect();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let t0 = Instant::now();
    let mut generated = 0usize;
    for (c, chunk) in rows.chunks(args.batch_size).enumerate() {
        let batch: Vec<Vec<u32>> = chunk.iter().map(|&(p, _)| prompts[p].clone()).collect();
        let mut decode_err = None;
        let mut hook = |_: usize, toks: &[u32]| {
            if stops.is_empty() {
                return false;
            }
            match completion_text(&tok, toks, &stops) {
                Ok((_, hit)) => hit,
                Err(e) => {
                    decode_err.get_or_insert(e);
                    true
                }
            }
        };
        let samples: Vec<Sample> =
            model.sample_rows(&batch, c * args.batch_size, &params, adapters, &mut hook)?;
        if let Some(e) = decode_err {
            return Err(e.context("decoding a completion"));
        }
        for (&(p, s), sample) in chunk.iter().zip(&samples) {
            generated += sample.tokens.len();
            let (text, _) = completion_text(&tok, &sample.tokens, &stops)?;
            if args.json {
                let mut line = json!({
                    "prompt_index": p,
                    "sample_index": s,
                    "text": text,
                    "tokens": sample.tokens,
                    "logprobs": sample.logprobs,
                    "stop_reason": sample.stop_reason.as_str(),
                    "prompt_tokens": prompts[p].len(),
                });
                if let Some(lps) = &prompt_lps {
                    line["prompt_logprobs"] = json!(lps[p]);
                }
                writeln!(out, "{line}")?;
            } else {
                writeln!(
                    out,
                    "--- prompt {p} sample {s} ({} tokens, {}, mean logprob {:.3})",
                    sample.tokens.len(),
                    sample.stop_reason.as_str(),
                    mean(&sample.logprobs)
                )?;
                if let (Some(lps), 0) = (&prompt_lps, s) {
                    let known: Vec<f32> = lps[p].iter().flatten().copied().collect();
                    writeln!(
                        out,
                        "prompt logprobs: {} tokens, sum {:.3}",
                        lps[p].len(),
                        known.iter().sum::<f32>()
                    )?;
                }
                writeln!(out, "{text}")?;
            }
        }
        out.flush()?;
    }
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "sampled {} completions, {generated} tokens in {secs:.2}s ({:.1} tokens/s)",
        rows.len(),
        generated as f64 / secs.max(1e-9)
    );
    Ok(())
}

fn mean(v: &[f32]) -> f32 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f32>() / v.len() as f32
    }
}

/// `ringtune bench sample`: decode speed on a random-init model of a preset shape.
///
/// Workload: `batch` rows of random prompt tokens (`prompt_len` each), LoRA r=32 on every
/// projection and the lm_head (B random, so the adapter math is real), temperature 1, no
/// stop tokens, so every row generates exactly `max_tokens`. Reports prefill time and
/// decode tokens/s (generated tokens after the first, over the time after the prefill),
/// medians over the timed repeats.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Model shape: tiny, smol, or quickstart.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Compute threads.
    #[arg(long, default_value_t = 2, value_parser = super::bench_threads)]
    threads: usize,
    /// Rows sampled together.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Prompt tokens per row.
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// Tokens generated per row.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Timed repeats (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Sample from the base alone (adapter off).
    #[arg(long)]
    no_adapter: bool,
    /// Vocabulary size for the quickstart preset.
    #[arg(long, default_value_t = 32000)]
    vocab: usize,
    /// Seed of the weights, prompts and samples.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    json: bool,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run_bench(args: BenchArgs) -> Result<()> {
    ringtune_model::init_cpu_runtime(Some(args.threads));
    if args.batch == 0 || args.prompt_len == 0 || args.max_tokens < 2 || args.repeats == 0 {
        bail!("--batch, --prompt-len and --repeats must be >= 1, --max-tokens >= 2");
    }
    let preset = ModelPreset::from_name(&args.preset, Some(args.vocab))?;
    let cfg = preset.config();
    let lora = LoraConfig::from_tinker(32, true, true, true);
    let model = LoraModel::random(&cfg, &lora, &Device::Cpu, args.seed, args.seed + 1)?;
    // Nonzero B, so the adapter path is not a multiply by zero.
    let mut state = args.seed ^ 0x5eed;
    let flat: Vec<f32> = (0..model.params_flat()?.len())
        .map(|_| (splitmix64(&mut state) >> 40) as f32 / (1u64 << 24) as f32 * 0.02 - 0.01)
        .collect();
    model.set_params_flat(&flat)?;
    let adapters = if args.no_adapter {
        Adapters::Off
    } else {
        Adapters::On
    };
    let prompts: Vec<Vec<u32>> = (0..args.batch)
        .map(|_| {
            (0..args.prompt_len)
                .map(|_| (splitmix64(&mut state) % cfg.vocab_size as u64) as u32)
                .collect()
        })
        .collect();
    let run = |max_tokens: usize| -> Result<(f64, usize)> {
        let params = SamplingParams {
            max_tokens,
            temperature: 1.0,
            seed: args.seed,
            ..SamplingParams::default()
        };
        let t0 = Instant::now();
        let s = model.sample(&prompts, &params, adapters, &mut |_, _| false)?;
        Ok((
            t0.elapsed().as_secs_f64(),
            s.iter().map(|s| s.tokens.len()).sum(),
        ))
    };
    run(4)?; // warm-up
    let (mut prefill, mut full) = (Vec::new(), Vec::new());
    let mut tokens = 0;
    for _ in 0..args.repeats {
        prefill.push(run(1)?.0);
        let (t, n) = run(args.max_tokens)?;
        full.push(t);
        tokens = n;
    }
    let (tp, tf) = (median(&mut prefill), median(&mut full));
    let decode_tokens = tokens - args.batch;
    let decode_tps = decode_tokens as f64 / (tf - tp).max(1e-9);
    let total_tps = tokens as f64 / tf;
    if args.json {
        println!(
            "{}",
            json!({"preset": preset.name(), "threads": args.threads, "batch": args.batch,
                   "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
                   "adapter": !args.no_adapter, "prefill_s": tp, "total_s": tf,
                   "generated_tokens": tokens, "decode_tokens_per_s": decode_tps,
                   "tokens_per_s_incl_prefill": total_tps})
        );
    } else {
        println!(
            "sample {}: batch {} × {} new tokens (prompt {}), {} threads, adapter {}: \
             prefill {:.3}s, decode {:.1} tokens/s ({:.1} tokens/s including prefill)",
            preset.name(),
            args.batch,
            args.max_tokens,
            args.prompt_len,
            args.threads,
            if args.no_adapter { "off" } else { "on" },
            tp,
            decode_tps,
            total_tps
        );
    }
    Ok(())
}

/// splitmix64 for the benchmark's random tokens and adapter values.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
