//! Dataset files: JSONL, one example per line, in one of three shapes
//! (chosen per line by which field it has):
//!
//! - `{"messages": [{"role": "user", "content": "…"}, …]}` — OpenAI chat
//!   shape, rendered by a [`Renderer`] with a [`TrainOnWhat`];
//! - `{"text": "…"}` — plain text, every token weighted;
//! - `{"tokens": [1, 2, …], "weights": [0, 1, …]}` — pre-tokenized; `weights`
//!   is optional (all 1) and aligned with `tokens`.
//!
//! Every problem names the file and the 1-based line. Bad lines can be
//! skipped and counted instead of failing the load; examples over
//! `max_length` are truncated, dropped, or refused, and counted. The whole
//! file is tokenized once, up front: the coordinator then only moves ids.

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::render::{Message, Renderer, Role, TrainOnWhat};
use crate::rng::SplitMix64;
use crate::{Datum, Error, LineProblem, Result};

/// Lines longer than this are refused rather than buffered.
pub const MAX_LINE_BYTES: usize = 64 << 20;
/// How many bad-line messages a [`DataReport`] keeps.
const KEEP_BAD_LINE_ERRORS: usize = 5;

/// What to do with an example longer than `max_length` tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    /// Keep the first `max_length` tokens.
    #[default]
    Truncate,
    /// Leave the example out.
    Drop,
    /// Fail the load, naming the line.
    Error,
}

impl OverflowPolicy {
    /// Every policy, in the order error messages list them.
    pub const ALL: [OverflowPolicy; 3] = [Self::Truncate, Self::Drop, Self::Error];

    /// The config-file name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Truncate => "truncate",
            Self::Drop => "drop",
            Self::Error => "error",
        }
    }
}

impl std::str::FromStr for OverflowPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| Error::InvalidArgument {
                what: "max_length policy",
                message: format!(
                    "unknown policy {s:?}; allowed: {}",
                    Self::ALL.map(|p| p.as_str()).join(", ")
                ),
            })
    }
}

/// How to load a dataset file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadOptions {
    /// Which tokens of a chat example carry weight.
    pub train_on: TrainOnWhat,
    /// Longest example in tokens; `None` for no limit.
    pub max_length: Option<usize>,
    /// What to do with longer examples.
    pub overflow: OverflowPolicy,
    /// Count and skip malformed lines instead of failing on the first.
    pub skip_bad_lines: bool,
    /// Token ids must be below this (pre-tokenized lines). `None` uses the
    /// renderer's tokenizer's vocabulary size, or no check without one.
    pub vocab_size: Option<usize>,
}

/// What loading a file did, for the user and the run log.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DataReport {
    /// The file.
    pub path: PathBuf,
    /// Non-blank lines read.
    pub lines: usize,
    /// Examples kept.
    pub examples: usize,
    /// Malformed lines skipped (only with `skip_bad_lines`).
    pub bad_lines: usize,
    /// The first few skipped lines' errors.
    pub bad_line_errors: Vec<String>,
    /// Examples cut to `max_length`.
    pub truncated: usize,
    /// Examples left out for exceeding `max_length` (policy `drop`).
    pub dropped_too_long: usize,
    /// Examples left out because no target token carries weight (e.g. a
    /// conversation with no assistant message, or truncated before it).
    pub dropped_no_weight: usize,
    /// Preference pairs left out because the chosen and rejected sides are the same tokens
    /// and weights (as written, or once truncated to `max_length`): DPO gets no gradient
    /// from them.
    pub dropped_same_sides: usize,
    /// The first such pair's line.
    pub first_same_sides_line: Option<usize>,
    /// Tokens in the kept examples.
    pub tokens: u64,
    /// Sum of target weights in the kept examples.
    pub target_weight: f64,
}

impl fmt::Display for DataReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} examples, {} tokens ({:.0} weighted) from {} lines",
            self.path.display(),
            self.examples,
            self.tokens,
            self.target_weight,
            self.lines
        )?;
        if self.truncated > 0 {
            write!(f, "; {} truncated to max_length", self.truncated)?;
        }
        if self.dropped_too_long > 0 {
            write!(
                f,
                "; {} dropped as longer than max_length",
                self.dropped_too_long
            )?;
        }
        if self.dropped_no_weight > 0 {
            write!(
                f,
                "; {} dropped with nothing to train on",
                self.dropped_no_weight
            )?;
        }
        if self.dropped_same_sides > 0 {
            write!(
                f,
                "; {} pairs dropped with identical chosen and rejected",
                self.dropped_same_sides
            )?;
            if let Some(line) = self.first_same_sides_line {
                write!(f, " (first: line {line})")?;
            }
        }
        if self.bad_lines > 0 {
            write!(f, "; {} bad lines skipped", self.bad_lines)?;
            if let Some(first) = self.bad_line_errors.first() {
                write!(f, " (first: {first})")?;
            }
        }
        Ok(())
    }
}

/// A loaded dataset and its report.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    /// The examples, in file order.
    pub examples: Vec<Datum>,
    /// What the load did.
    pub report: DataReport,
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

fn wrong(field: impl Into<String>, expected: &'static str, found: &Value) -> LineProblem {
    LineProblem::WrongType {
        field: field.into(),
        expected,
        found: json_type(found),
    }
}

/// Parses an OpenAI-shape `messages` array.
pub fn parse_messages(value: &Value) -> std::result::Result<Vec<Message>, LineProblem> {
    let list = value
        .as_array()
        .ok_or_else(|| wrong("messages", "an array", value))?;
    if list.is_empty() {
        return Err(LineProblem::BadValue {
            field: "messages".into(),
            message: "is empty".into(),
        });
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let at = |f: &str| format!("messages[{i}].{f}");
        let obj = m
            .as_object()
            .ok_or_else(|| wrong(format!("messages[{i}]"), "an object", m))?;
        let role = obj
            .get("role")
            .ok_or_else(|| LineProblem::MissingField(at("role")))?;
        let role = role
            .as_str()
            .ok_or_else(|| wrong(at("role"), "a string", role))?;
        let role: Role = role.parse().map_err(|message| LineProblem::BadValue {
            field: at("role"),
            message,
        })?;
        if obj.get("tool_calls").is_some_and(|v| !v.is_null()) {
            return Err(LineProblem::BadValue {
                field: at("tool_calls"),
                message: "tool calls are not supported by ringtune's renderers".into(),
            });
        }
        let content = obj
            .get("content")
            .ok_or_else(|| LineProblem::MissingField(at("content")))?;
        let content = match content {
            Value::String(s) => s.clone(),
            // OpenAI's list-of-parts form; only text parts are supported.
            Value::Array(parts) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    let field = format!("messages[{i}].content[{j}]");
                    if p.get("type").and_then(Value::as_str) != Some("text") {
                        return Err(LineProblem::BadValue {
                            field,
                            message: "only {\"type\": \"text\"} content parts are supported".into(),
                        });
                    }
                    let t = p
                        .get("text")
                        .ok_or_else(|| LineProblem::MissingField(format!("{field}.text")))?;
                    text.push_str(
                        t.as_str()
                            .ok_or_else(|| wrong(format!("{field}.text"), "a string", t))?,
                    );
                }
                text
            }
            other => {
                return Err(wrong(
                    at("content"),
                    "a string or a list of text parts",
                    other,
                ))
            }
        };
        out.push(Message { role, content });
    }
    Ok(out)
}

fn parse_tokens(
    obj: &serde_json::Map<String, Value>,
    tokens: &Value,
    vocab_size: Option<usize>,
) -> std::result::Result<Datum, LineProblem> {
    let list = tokens
        .as_array()
        .ok_or_else(|| wrong("tokens", "an array of token ids", tokens))?;
    let mut ids = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let id = t
            .as_u64()
            .filter(|&v| v <= u32::MAX as u64)
            .ok_or_else(|| wrong(format!("tokens[{i}]"), "a token id (integer 0..2^32)", t))?;
        if let Some(v) = vocab_size {
            if id as usize >= v {
                return Err(LineProblem::BadValue {
                    field: format!("tokens[{i}]"),
                    message: format!("id {id} is outside the vocabulary ({v} tokens)"),
                });
            }
        }
        ids.push(id as u32);
    }
    let weights = match obj.get("weights") {
        None | Some(Value::Null) => vec![1.0; ids.len()],
        Some(w) => {
            let wl = w
                .as_array()
                .ok_or_else(|| wrong("weights", "an array of numbers", w))?;
            if wl.len() != ids.len() {
                return Err(LineProblem::BadValue {
                    field: "weights".into(),
                    message: format!("has {} entries but `tokens` has {}", wl.len(), ids.len()),
                });
            }
            let mut out = Vec::with_capacity(wl.len());
            for (i, x) in wl.iter().enumerate() {
                // ≥ 0: the loss is divided by the weights' sum, which a negative weight can
                // make zero or negative; finite in f32, the type training uses.
                let Some(n) = x.as_f64() else {
                    return Err(wrong(format!("weights[{i}]"), "a number", x));
                };
                let v = n as f32;
                if !(v.is_finite() && v >= 0.0) {
                    return Err(LineProblem::BadValue {
                        field: format!("weights[{i}]"),
                        message: format!("is {x}; a weight must be >= 0 and fit in f32"),
                    });
                }
                out.push(v);
            }
            out
        }
    };
    Ok(Datum {
        tokens: ids,
        weights,
    })
}

/// Turns one parsed line into a datum (before `max_length` handling).
pub fn parse_example(
    value: &Value,
    renderer: Option<&Renderer>,
    opts: &LoadOptions,
) -> std::result::Result<Datum, LineProblem> {
    let obj = value
        .as_object()
        .ok_or_else(|| LineProblem::NotAnObject(json_type(value)))?;
    let need_renderer = |what: &str| {
        renderer.ok_or_else(|| {
            LineProblem::Render(format!(
                "a `{what}` line needs a tokenizer and renderer, and none was given"
            ))
        })
    };
    let render_err = |e: Error| LineProblem::Render(e.to_string());
    let kinds: Vec<&str> = ["messages", "text", "tokens"]
        .into_iter()
        .filter(|k| obj.contains_key(*k))
        .collect();
    if kinds.len() > 1 {
        return Err(LineProblem::BadValue {
            field: kinds.join("` and `"),
            message: "a line is one kind of example: give only one of them".into(),
        });
    }
    if let Some(messages) = obj.get("messages") {
        let messages = parse_messages(messages)?;
        need_renderer("messages")?
            .build_supervised_example(&messages, opts.train_on)
            .map_err(render_err)
    } else if let Some(text) = obj.get("text") {
        let text = text
            .as_str()
            .ok_or_else(|| wrong("text", "a string", text))?;
        need_renderer("text")?
            .build_text_example(text)
            .map_err(render_err)
    } else if let Some(tokens) = obj.get("tokens") {
        let vocab = opts
            .vocab_size
            .or_else(|| renderer.map(|r| r.tokenizer().vocab_size()));
        parse_tokens(obj, tokens, vocab)
    } else {
        Err(LineProblem::NoExampleField)
    }
}

/// Reads one line of at most `MAX_LINE_BYTES` into `buf` (without the
/// newline). Returns `Ok(None)` at end of file, `Ok(Some(false))` for a line
/// that was too long (its remainder consumed).
fn read_line<R: BufRead>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<Option<bool>> {
    buf.clear();
    let n = r
        .by_ref()
        .take(MAX_LINE_BYTES as u64 + 1)
        .read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        return Ok(Some(true));
    }
    if buf.len() > MAX_LINE_BYTES {
        // Discard the rest of the oversized line.
        let mut sink = Vec::new();
        loop {
            sink.clear();
            let m = r.by_ref().take(1 << 20).read_until(b'\n', &mut sink)?;
            if m == 0 || sink.last() == Some(&b'\n') {
                break;
            }
        }
        return Ok(Some(false));
    }
    Ok(Some(true)) // last line without a newline
}

/// Loads a JSONL dataset file. `renderer` is needed for `messages` and
/// `text` lines; pre-tokenized files can pass `None`.
pub fn load_jsonl(path: &Path, renderer: Option<&Renderer>, opts: &LoadOptions) -> Result<Dataset> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    load_reader(BufReader::new(file), path, renderer, opts)
}

/// [`load_jsonl`] over any reader; `path` is used in messages.
pub fn load_reader<R: BufRead>(
    mut reader: R,
    path: &Path,
    renderer: Option<&Renderer>,
    opts: &LoadOptions,
) -> Result<Dataset> {
    if opts.max_length == Some(0) {
        return Err(Error::InvalidArgument {
            what: "max_length",
            message: "must be at least 2 tokens (or unset)".into(),
        });
    }
    let mut report = DataReport {
        path: path.to_path_buf(),
        ..Default::default()
    };
    let mut examples = Vec::new();
    let mut buf = Vec::new();
    let mut line_no = 0usize;
    let line_err = |line: usize, problem: LineProblem| Error::Line {
        path: path.to_path_buf(),
        line,
        problem,
    };
    loop {
        let state = read_line(&mut reader, &mut buf).map_err(|e| Error::io(path, e))?;
        let Some(fits) = state else { break };
        line_no += 1;
        let parsed = if !fits {
            Err(LineProblem::LineTooLong(MAX_LINE_BYTES))
        } else {
            match std::str::from_utf8(&buf) {
                Err(e) => Err(LineProblem::NotJson(format!("not UTF-8: {e}"))),
                Ok(s) if s.trim().is_empty() => continue,
                // A UTF-8 byte-order mark (some editors write one) is not part of the JSON.
                Ok(s) => serde_json::from_str::<Value>(if line_no == 1 {
                    s.strip_prefix('\u{feff}').unwrap_or(s)
                } else {
                    s
                })
                .map_err(|e| LineProblem::NotJson(e.to_string()))
                .and_then(|v| parse_example(&v, renderer, opts)),
            }
        };
        report.lines += 1;
        let mut datum = match parsed {
            Ok(d) => d,
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
            if datum.len() > max {
                match opts.overflow {
                    OverflowPolicy::Truncate => {
                        datum.truncate(max);
                        report.truncated += 1;
                    }
                    OverflowPolicy::Drop => {
                        report.dropped_too_long += 1;
                        continue;
                    }
                    OverflowPolicy::Error => {
                        return Err(line_err(
                            line_no,
                            LineProblem::TooLong {
                                len: datum.len(),
                                max,
                            },
                        ))
                    }
                }
            }
        }
        let w = datum.target_weight();
        if datum.len() < 2 || w == 0.0 {
            report.dropped_no_weight += 1;
            continue;
        }
        report.tokens += datum.len() as u64;
        report.target_weight += w;
        examples.push(datum);
    }
    report.examples = examples.len();
    if examples.is_empty() {
        let detail = if report.lines == 0 {
            "the file has no lines".to_string()
        } else {
            format!(
                "none of its {} lines gave an example ({} bad, {} longer than max_length, {} with nothing to train on)",
                report.lines, report.bad_lines, report.dropped_too_long, report.dropped_no_weight
            )
        };
        return Err(Error::EmptyDataset {
            path: path.to_path_buf(),
            detail,
        });
    }
    Ok(Dataset { examples, report })
}

/// Splits off a held-out set: `round(fraction × n)` examples (at least one,
/// leaving at least one for training) picked by a seeded shuffle. Both parts
/// keep file order. `fraction == 0` gives an empty held-out set.
pub fn split_holdout(
    examples: Vec<Datum>,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<Datum>, Vec<Datum>)> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(Error::InvalidArgument {
            what: "eval fraction",
            message: format!("{fraction} is not in [0, 1)"),
        });
    }
    let n = examples.len();
    if fraction == 0.0 {
        return Ok((examples, Vec::new()));
    }
    if n < 2 {
        return Err(Error::InvalidArgument {
            what: "eval fraction",
            message: format!("cannot hold out a fraction of {n} example(s)"),
        });
    }
    let n_eval = ((fraction * n as f64).round() as usize).clamp(1, n - 1);
    // A stream distinct from the epoch shuffles' (which use small epoch numbers).
    const HOLDOUT_STREAM: u64 = 0x0068_6f6c_646f_7574; // "holdout" in ASCII
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::for_stream(seed, HOLDOUT_STREAM).shuffle(&mut order);
    let mut is_eval = vec![false; n];
    for &i in &order[..n_eval] {
        is_eval[i] = true;
    }
    let mut train = Vec::with_capacity(n - n_eval);
    let mut eval = Vec::with_capacity(n_eval);
    for (d, e) in examples.into_iter().zip(is_eval) {
        if e {
            eval.push(d);
        } else {
            train.push(d);
        }
    }
    Ok((train, eval))
}
