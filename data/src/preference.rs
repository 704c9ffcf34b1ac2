//! Preference pairs for DPO: JSONL lines
//! `{"prompt": str | "messages": [chat], "chosen": reply, "rejected": reply}`, where a reply
//! is a string (one assistant message), a message object, or a list of messages.
//!
//! Each side is rendered as the prompt's generation prompt (the renderer's own, as for
//! sampling) followed by the reply: prompt tokens get weight 0, reply tokens weight 1. The
//! rendering is checked to start with exactly the generation prompt's tokens, so the
//! weighted part is the reply and nothing else.
//!
//! Not here: the DPO loss (ringtune-model) and the training loop (ringtune-node).

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde_json::Value;

use crate::dataset::{parse_messages, DataReport, LoadOptions, OverflowPolicy, MAX_LINE_BYTES};
use crate::error::{Error, LineProblem, Result};
use crate::render::{Message, Renderer, Role};
use crate::Datum;

/// One preference pair: the same prompt with a preferred and a dispreferred reply.
#[derive(Clone, Debug, PartialEq)]
pub struct PreferencePair {
    /// Prompt + chosen reply (reply tokens weighted 1).
    pub chosen: Datum,
    /// Prompt + rejected reply (reply tokens weighted 1).
    pub rejected: Datum,
}

/// A loaded preference file and its report (`examples` counts pairs, `tokens` both sides).
#[derive(Clone, Debug, Default)]
pub struct PreferenceSet {
    /// The pairs, in file order.
    pub pairs: Vec<PreferencePair>,
    /// What the load did.
    pub report: DataReport,
}

/// Errors kept in the report when bad lines are skipped.
const KEEP_BAD_LINE_ERRORS: usize = 5;

fn wrong(field: &str, expected: &'static str, v: &Value) -> LineProblem {
    LineProblem::WrongType {
        field: field.to_owned(),
        expected,
        found: match v {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
            Value::Object(_) => "an object",
        },
    }
}

/// Prefixes the field names of a message-parsing problem with `field` (`chosen[0].role`).
fn within(field: &str, p: LineProblem) -> LineProblem {
    let re = |f: String| format!("{field}{}", f.strip_prefix("messages").unwrap_or(&f));
    match p {
        LineProblem::MissingField(f) => LineProblem::MissingField(re(f)),
        LineProblem::WrongType {
            field: f,
            expected,
            found,
        } => LineProblem::WrongType {
            field: re(f),
            expected,
            found,
        },
        LineProblem::BadValue { field: f, message } => LineProblem::BadValue {
            field: re(f),
            message,
        },
        other => other,
    }
}

/// A reply: a string (one assistant message), a message object, or a list of messages.
fn parse_reply(field: &str, v: &Value) -> std::result::Result<Vec<Message>, LineProblem> {
    match v {
        Value::String(s) => Ok(vec![Message::new(Role::Assistant, s.clone())]),
        Value::Object(_) => {
            parse_messages(&Value::Array(vec![v.clone()])).map_err(|p| within(field, p))
        }
        Value::Array(_) => parse_messages(v).map_err(|p| within(field, p)),
        other => Err(wrong(
            field,
            "a string, a message or a list of messages",
            other,
        )),
    }
}

/// Renders prompt + reply; weight 1 on the reply's tokens only.
fn render_side(
    renderer: &Renderer,
    prompt: &[Message],
    prompt_ids: &[u32],
    reply: &[Message],
    field: &str,
) -> std::result::Result<Datum, LineProblem> {
    let mut all = prompt.to_vec();
    all.extend_from_slice(reply);
    let full = renderer
        .build_supervised_example(&all, crate::TrainOnWhat::AllTokens)
        .map_err(|e| LineProblem::Render(format!("{field}: {e}")))?;
    if full.tokens.len() <= prompt_ids.len() || !full.tokens.starts_with(prompt_ids) {
        return Err(LineProblem::BadValue {
            field: field.to_owned(),
            message: format!(
                "prompt + reply does not render as the {} renderer's generation prompt \
                 followed by reply tokens (a reply must start with an assistant message)",
                renderer.name().as_str()
            ),
        });
    }
    let mut weights = vec![0f32; full.tokens.len()];
    weights[prompt_ids.len()..].fill(1.0);
    Ok(Datum {
        tokens: full.tokens,
        weights,
    })
}

/// Turns one parsed line into a pair (before `max_length` handling).
pub fn parse_pair(
    value: &Value,
    renderer: &Renderer,
) -> std::result::Result<PreferencePair, LineProblem> {
    let obj = value
        .as_object()
        .ok_or(LineProblem::NotAnObject(match value {
            Value::Array(_) => "an array",
            _ => "not an object",
        }))?;
    let prompt = match (obj.get("messages"), obj.get("prompt")) {
        (Some(_), Some(_)) => {
            return Err(LineProblem::BadValue {
                field: "prompt".into(),
                message: "give either `prompt` or `messages`, not both".into(),
            })
        }
        (Some(m), None) => parse_messages(m)?,
        (None, Some(p)) => vec![Message::new(
            Role::User,
            p.as_str()
                .ok_or_else(|| wrong("prompt", "a string", p))?
                .to_owned(),
        )],
        (None, None) => return Err(LineProblem::MissingField("prompt (or messages)".into())),
    };
    let prompt_ids = renderer
        .build_generation_prompt(&prompt)
        .map_err(|e| LineProblem::Render(format!("prompt: {e}")))?;
    let mut sides = Vec::with_capacity(2);
    for field in ["chosen", "rejected"] {
        let v = obj
            .get(field)
            .ok_or_else(|| LineProblem::MissingField(field.into()))?;
        let reply = parse_reply(field, v)?;
        if reply[0].role != Role::Assistant {
            return Err(LineProblem::BadValue {
                field: format!("{field}[0].role"),
                message: "a reply must start with an assistant message".into(),
            });
        }
        sides.push(render_side(renderer, &prompt, &prompt_ids, &reply, field)?);
    }
    let rejected = sides.pop().expect("two sides");
    let chosen = sides.pop().expect("two sides");
    Ok(PreferencePair { chosen, rejected })
}

/// Loads a JSONL file of preference pairs. `opts.max_length` / `opts.overflow` apply to each
/// side (a truncated side that keeps no reply token drops the pair), `opts.skip_bad_lines`
/// as for SFT data; `opts.train_on` is not used (the reply is what is trained on).
pub fn load_preference_jsonl(
    path: &Path,
    renderer: &Renderer,
    opts: &LoadOptions,
) -> Result<PreferenceSet> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    load_preference_reader(BufReader::new(file), path, renderer, opts)
}

/// [`load_preference_jsonl`] over any reader; `path` is used in messages.
pub fn load_preference_reader<R: BufRead>(
    mut reader: R,
    path: &Path,
    renderer: &Renderer,
    opts: &LoadOptions,
) -> Result<PreferenceSet> {
    let mut report = DataReport {
        path: path.to_path_buf(),
        ..Default::default()
    };
    let line_err = |line: usize, problem: LineProblem| Error::Line {
        path: path.to_path_buf(),
        line,
        problem,
    };
    let mut pairs = Vec::new();
    let mut buf = Vec::new();
    let mut line_no = 0usize;
    loop {
        buf.clear();
        let n = reader
            .by_ref()
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let too_long = buf.last() != Some(&b'\n') && buf.len() > MAX_LINE_BYTES;
        if too_long {
            // Not worth resynchronising inside a 64 MiB line: refuse the file.
            return Err(line_err(line_no, LineProblem::LineTooLong(MAX_LINE_BYTES)));
        }
        let parsed = match std::str::from_utf8(&buf) {
            Err(e) => Err(LineProblem::NotJson(format!("not UTF-8: {e}"))),
            Ok(s) if s.trim().is_empty() => continue,
            Ok(s) => serde_json::from_str::<Value>(s.trim_end())
                .map_err(|e| LineProblem::NotJson(e.to_string()))
                .and_then(|v| parse_pair(&v, renderer)),
        };
        report.lines += 1;
        let mut pair = match parsed {
            Ok(p) => p,
            Err(problem) if opts.skip_bad_lines => {
                report.bad_lines += 1;
                if report.bad_line_errors.len() < KEEP_BAD_LINE_ERRORS {
                    report
                        .bad_line_errors
                        .push(line_err(line_no, problem).to_string());
                }
                continue;
            }
            Err(problem) => return Err(line_err(line_no, problem)),
        };
        if let Some(max) = opts.max_length {
            let longest = pair.chosen.len().max(pair.rejected.len());
            if longest > max {
                match opts.overflow {
                    OverflowPolicy::Truncate => {
                        pair.chosen.truncate(max);
                        pair.rejected.truncate(max);
                        report.truncated += 1;
                    }
                    OverflowPolicy::Drop => {
                        report.dropped_too_long += 1;
                        continue;
                    }
                    OverflowPolicy::Error => {
                        return Err(line_err(
                            line_no,
                            LineProblem::TooLong { len: longest, max },
                        ))
                    }
                }
            }
        }
        if pair.chosen.target_weight() == 0.0 || pair.rejected.target_weight() == 0.0 {
            report.dropped_no_weight += 1;
            continue;
        }
        if pair.chosen == pair.rejected {
            report.dropped_same_sides += 1;
            report.first_same_sides_line.get_or_insert(line_no);
            continue;
        }
        report.tokens += (pair.chosen.len() + pair.rejected.len()) as u64;
        report.target_weight += pair.chosen.target_weight() + pair.rejected.target_weight();
        pairs.push(pair);
    }
    report.examples = pairs.len();
    if pairs.is_empty() {
        return Err(Error::EmptyDataset {
            path: path.to_path_buf(),
            detail: if report.lines == 0 {
                "the file has no lines".into()
            } else {
                format!(
                    "none of its {} lines gave a preference pair ({} bad, {} longer than \
                     max_length, {} with no reply token left, {} with identical chosen and \
                     rejected)",
                    report.lines,
                    report.bad_lines,
                    report.dropped_too_long,
                    report.dropped_no_weight,
                    report.dropped_same_sides
                )
            },
        });
    }
    Ok(PreferenceSet { pairs, report })
}

/// Splits off held-out pairs exactly as [`crate::split_holdout`] splits examples (same
/// count, same seeded choice, file order kept).
pub fn split_pairs(
    pairs: Vec<PreferencePair>,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<PreferencePair>, Vec<PreferencePair>)> {
    let marks: Vec<Datum> = (0..pairs.len())
        .map(|i| Datum {
            tokens: vec![i as u32],
            weights: vec![0.0],
        })
        .collect();
    let (_, eval) = crate::split_holdout(marks, fraction, seed)?;
    let mut is_eval = vec![false; pairs.len()];
    for d in eval {
        is_eval[d.tokens[0] as usize] = true;
    }
    let (mut train, mut held) = (Vec::new(), Vec::new());
    for (p, e) in pairs.into_iter().zip(is_eval) {
        if e {
            held.push(p);
        } else {
            train.push(p);
        }
    }
    Ok((train, held))
}
