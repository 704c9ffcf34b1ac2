//! `ringtune render`: a run config's examples as the trainer sees them — the tokens the
//! renderer and tokenizer made, and the loss weight of each — for checking a chat format,
//! `train_on` and truncation before training (tinker-cookbook's colourised example view).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use ringtune_config::{Method, RunConfig};
use ringtune_data::{Datum, Tokenizer};
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The run config (TOML; see configs/README.md).
    pub config: PathBuf,
    /// Override any config key, as `train --set` does (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Show the held-out examples (`data.eval`, or the `data.eval_fraction` split).
    #[arg(long)]
    pub eval: bool,
    /// The first example to show (0-based, in file order of the examples kept).
    #[arg(long, default_value_t = 0)]
    pub index: usize,
    /// How many examples to show.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// One JSON object per example: tokens, weights and the text of each weight's segment.
    #[arg(long)]
    pub json: bool,
}

/// Consecutive tokens of one weight, decoded together (special tokens kept). The first
/// token is never a target, so it counts as weight 0 whatever the file says.
fn segments(tok: &Tokenizer, d: &Datum) -> Result<Vec<(f32, String)>> {
    let mut out: Vec<(f32, Vec<u32>)> = Vec::new();
    for (i, (&t, &w)) in d.tokens.iter().zip(&d.weights).enumerate() {
        let w = if i == 0 { 0.0 } else { w };
        match out.last_mut() {
            Some((lw, ids)) if *lw == w => ids.push(t),
            _ => out.push((w, vec![t])),
        }
    }
    out.into_iter()
        .map(|(w, ids)| Ok((w, tok.decode(&ids, false)?)))
        .collect()
}

fn datum_json(tok: &Tokenizer, d: &Datum) -> Result<serde_json::Value> {
    let segs: Vec<_> = segments(tok, d)?
        .into_iter()
        .map(|(w, text)| json!({"weight": w, "text": text}))
        .collect();
    Ok(json!({
        "tokens": d.tokens,
        "weights": d.weights,
        "target_weight": d.target_weight(),
        "segments": segs,
    }))
}

fn write_datum(out: &mut impl Write, tok: &Tokenizer, d: &Datum) -> Result<()> {
    for (w, text) in segments(tok, d)? {
        writeln!(out, "  w={w:<4} {text:?}")?;
    }
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    let cfg = RunConfig::load_with_overrides(&args.config, &args.set)?;
    let model_dir = ringtune_node::trainer::prepare_model_dir(&cfg)?;
    let tok = Tokenizer::from_dir(&model_dir)?;
    if let Some(w) = ringtune_node::trainer::renderer_warning(cfg.data.renderer, &tok) {
        eprintln!("warning: {w}");
    }
    let set = if args.eval { "eval" } else { "train" };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let pick = |len: usize| -> Result<std::ops::Range<usize>> {
        if args.index >= len {
            bail!(
                "--index {}: the {set} set has {len} example(s) (0..{len})",
                args.index
            )
        }
        Ok(args.index..(args.index + args.count).min(len))
    };
    match cfg.train.method {
        Method::Rl => bail!(
            "{}: an RL run has no dataset to render (its prompts come from the environment: \
             `ringtune sample` shows what the policy is given)",
            args.config.display()
        ),
        Method::Sft => {
            let (train, eval, reports) = ringtune_node::trainer::load_examples(&cfg, &tok)?;
            for r in &reports {
                eprintln!("data: {r}");
            }
            let examples = if args.eval { eval } else { train };
            for i in pick(examples.len())? {
                let d = &examples[i];
                if args.json {
                    let mut v = datum_json(&tok, d)?;
                    v["index"] = json!(i);
                    v["set"] = json!(set);
                    writeln!(out, "{v}")?;
                } else {
                    writeln!(
                        out,
                        "{set} example {i} of {}: {} tokens, target weight {}",
                        examples.len(),
                        d.len(),
                        d.target_weight()
                    )?;
                    write_datum(&mut out, &tok, d)?;
                }
            }
        }
        Method::Dpo => {
            let (train, eval, reports) = ringtune_node::dpo::load_pairs(&cfg, &tok)?;
            for r in &reports {
                eprintln!("data: {r}");
            }
            let pairs = if args.eval { eval } else { train };
            for i in pick(pairs.len())? {
                let p = &pairs[i];
                if args.json {
                    writeln!(
                        out,
                        "{}",
                        json!({"index": i, "set": set, "chosen": datum_json(&tok, &p.chosen)?,
                               "rejected": datum_json(&tok, &p.rejected)?})
                    )?;
                } else {
                    writeln!(out, "{set} pair {i} of {}:", pairs.len())?;
                    for (side, d) in [("chosen", &p.chosen), ("rejected", &p.rejected)] {
                        writeln!(
                            out,
                            " {side}: {} tokens, target weight {}",
                            d.len(),
                            d.target_weight()
                        )?;
                        write_datum(&mut out, &tok, d)?;
                    }
                }
            }
        }
    }
    out.flush().context("writing to stdout")?;
    Ok(())
}
