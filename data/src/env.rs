//! RL environments: where an RL run's prompts come from and how a completion is scored.
//!
//! An environment hands out [`Problem`]s (a chat to render as the prompt, an id, and an
//! optional reference answer) and turns a batch of completions into [`Score`]s (a reward
//! and named per-sample metrics such as `correct` / `format`). It sees text, never tokens
//! or tensors: the RL loop renders the prompt, samples, decodes and strips the stop
//! sequence before asking for rewards.
//!
//! Two environments:
//! - [`ArithmeticEnv`]: offline and verifiable — "What is 37 + 45?" with an exact-answer
//!   check and tinker-cookbook's format reward, `correct + format_coef · (format_ok − 1)`.
//! - [`ExternalEnv`]: prompts from a JSONL file, rewards from a user's command that reads
//!   one JSON sample per line on stdin and writes one reward per line on stdout. The
//!   command is untrusted: a wrong count, a non-number, a non-zero exit or a run past the
//!   timeout is an error naming the command and the line, and nothing here waits past the
//!   deadline (a command that never reads or never exits is killed).
//!
//! Problems are a pure function of `(seed, step, n)`, so a resumed run and every rank of a
//! distributed run see the same prompts. Nothing here reads a clock except the external
//! command's timeout.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::dataset::parse_messages;
use crate::error::{Error, LineProblem, Result};
use crate::render::{Message, Role};
use crate::rng::{mix64, SplitMix64};

/// One prompt of an RL step.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    /// A stable id (the external command receives it).
    pub id: String,
    /// The conversation to render as the prompt (the model writes the next assistant turn).
    pub messages: Vec<Message>,
    /// The reference answer, when the environment knows one.
    pub answer: Option<String>,
}

/// One completion to score.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion<'a> {
    /// The problem it answers.
    pub problem: &'a Problem,
    /// The prompt as the model saw it (rendered text).
    pub prompt_text: &'a str,
    /// The completion's text, without the stop token or stop sequence.
    pub text: &'a str,
    /// Whether it ended cleanly (a stop token or stop sequence), not at `max_tokens`.
    pub stopped: bool,
}

/// The reward of one completion and its named metrics (each averaged over the step).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Score {
    /// The reward.
    pub reward: f64,
    /// Per-sample metrics, e.g. `correct` and `format` (0 or 1).
    pub metrics: BTreeMap<String, f64>,
}

/// An RL environment (see the module docs).
pub trait Env: Send {
    /// A short name for messages and metrics.
    fn name(&self) -> &str;

    /// The `n` problems of step `step` (1-based): a pure function of the environment's seed,
    /// `step` and `n`.
    fn problems(&self, step: u64, n: usize) -> Result<Vec<Problem>>;

    /// One score per completion, in order.
    fn score(&mut self, completions: &[Completion<'_>]) -> Result<Vec<Score>>;

    /// The metric names every score carries. A distributed run sums these over the ranks
    /// (a fixed list, so every rank's buffer has the same layout); other metrics a score
    /// may carry are averaged over each rank's own samples only.
    fn metric_names(&self) -> Vec<String> {
        Vec::new()
    }
}

/// tinker-cookbook's answer extraction: the last integer in the text (commas removed).
pub fn extract_final_int(text: &str) -> Option<i64> {
    let cleaned: String = text.chars().filter(|&c| c != ',').collect();
    let bytes = cleaned.as_bytes();
    let mut last = None;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let start = if i > 0 && bytes[i - 1] == b'-' {
                i - 1
            } else {
                i
            };
            let mut j = i;
            while j < bytes.len() && bytes[j].is_ascii_digit() {
                j += 1;
            }
            // An integer too long for i64 is no answer rather than a wrong one.
            last = cleaned[start..j].parse::<i64>().ok();
            i = j;
        } else {
            i += 1;
        }
    }
    last
}

/// The built-in verifiable environment: `a + b` with `a, b` uniform in `0..=max_operand`.
///
/// - `correct`: the last integer of the reply equals `a + b` (tinker's arithmetic check);
/// - `format`: the reply ended cleanly (stop token or stop sequence: tinker's parse
///   success) and is not empty (`check_format` of tinker-cookbook's `ProblemEnv` example:
///   `response.strip() != ""`), so stopping at once is not a well-formed answer;
/// - reward = `correct + format_coef · (format − 1)`.
#[derive(Clone, Debug)]
pub struct ArithmeticEnv {
    seed: u64,
    max_operand: u64,
    format_coef: f64,
}

impl ArithmeticEnv {
    /// An environment drawing problems from `seed`.
    pub fn new(seed: u64, max_operand: u64, format_coef: f64) -> Result<Self> {
        if max_operand == 0 || max_operand > 1_000_000_000 {
            return Err(Error::InvalidArgument {
                what: "max_operand",
                message: format!("{max_operand} is not in 1..=1000000000"),
            });
        }
        if !(format_coef.is_finite() && format_coef >= 0.0) {
            return Err(Error::InvalidArgument {
                what: "format_coef",
                message: format!("{format_coef} is not a number >= 0"),
            });
        }
        Ok(Self {
            seed,
            max_operand,
            format_coef,
        })
    }

    /// The reward of one reply to `a + b`.
    pub fn score_reply(&self, a: i64, b: i64, text: &str, stopped: bool) -> Score {
        let answer = extract_final_int(text);
        let correct = answer == Some(a + b);
        let format = stopped && !text.trim().is_empty();
        let (c, f) = (f64::from(u8::from(correct)), f64::from(u8::from(format)));
        Score {
            reward: c + self.format_coef * (f - 1.0),
            metrics: BTreeMap::from([("correct".into(), c), ("format".into(), f)]),
        }
    }
}

/// Parses `"a + b"` out of an arithmetic problem's id.
fn parse_operands(id: &str) -> Option<(i64, i64)> {
    let (a, b) = id.split_once('+')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

impl Env for ArithmeticEnv {
    fn metric_names(&self) -> Vec<String> {
        vec!["correct".into(), "format".into()]
    }

    fn name(&self) -> &str {
        "arithmetic"
    }

    fn problems(&self, step: u64, n: usize) -> Result<Vec<Problem>> {
        let mut rng = SplitMix64::for_stream(self.seed ^ 0x5eed_a817, step);
        Ok((0..n)
            .map(|_| {
                let a = rng.below(self.max_operand + 1);
                let b = rng.below(self.max_operand + 1);
                Problem {
                    id: format!("{a}+{b}"),
                    messages: vec![Message::new(Role::User, format!("What is {a} + {b}?"))],
                    answer: Some((a + b).to_string()),
                }
            })
            .collect())
    }

    fn score(&mut self, completions: &[Completion<'_>]) -> Result<Vec<Score>> {
        completions
            .iter()
            .map(|c| {
                let (a, b) = parse_operands(&c.problem.id).ok_or_else(|| Error::Env {
                    env: "arithmetic".into(),
                    message: format!("problem id {:?} is not `a+b`", c.problem.id),
                })?;
                Ok(self.score_reply(a, b, c.text, c.stopped))
            })
            .collect()
    }
}

/// Most bytes read from a reward command's stdout (a line per sample is tiny; this only
/// bounds a runaway command).
const MAX_OUTPUT_BYTES: usize = 64 << 20;
/// Bytes of the command's stderr kept for error messages (the tail).
const STDERR_TAIL: usize = 4096;

/// Prompts from a JSONL file, rewards from a command (see the module docs).
///
/// Prompts file: one JSON object per line with `messages` (a chat) or `prompt` (a user
/// message's text), an optional `id` (default: `line-N`) and an optional `answer` (a
/// string, passed to the command). Each step takes the next `n` prompts of a seeded
/// shuffle, epoch after epoch.
///
/// The command gets one line per completion on stdin:
/// `{"id", "prompt", "messages", "completion", "stopped", "answer"}` (`prompt` is the
/// rendered prompt text) and must print one line per completion, in order: a JSON number,
/// or `{"reward": number, "metrics": {"name": number, …}}`.
#[derive(Clone, Debug)]
pub struct ExternalEnv {
    command: Vec<String>,
    timeout: Duration,
    prompts: Vec<Problem>,
    seed: u64,
}

impl ExternalEnv {
    /// Reads the prompts file. `command` is an argv (program first); the program is looked
    /// up on `PATH` when it has no `/`.
    pub fn new(command: Vec<String>, timeout: Duration, prompts: &Path, seed: u64) -> Result<Self> {
        if command.is_empty() || command[0].is_empty() {
            return Err(Error::InvalidArgument {
                what: "command",
                message: "is empty: give the program and its arguments".into(),
            });
        }
        let prompts = load_prompts(prompts)?;
        Ok(Self {
            command,
            timeout,
            prompts,
            seed,
        })
    }

    /// The command as one line for messages.
    pub fn command_line(&self) -> String {
        self.command
            .iter()
            .map(|a| {
                if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
                    format!("{a:?}")
                } else {
                    a.clone()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn fail(&self, message: String) -> Error {
        Error::Env {
            env: format!("external command `{}`", self.command_line()),
            message,
        }
    }

    /// Runs the command once over `lines` (one JSON sample each) and returns its stdout.
    fn run(&self, input: String) -> Result<String> {
        let started = Instant::now();
        let deadline = started + self.timeout;
        use std::os::unix::process::CommandExt;
        // Its own process group, so that a timeout kills what it started too (a shell
        // script's `sleep`, a server it forked), not only the command itself.
        let mut child = Command::new(&self.command[0])
            .args(&self.command[1..])
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| self.fail(format!("cannot start it: {e}")))?;
        let mut stdin = child.stdin.take().expect("stdin was piped");
        let mut stdout = child.stdout.take().expect("stdout was piped");
        let mut stderr = child.stderr.take().expect("stderr was piped");
        // Writer and readers on their own threads: a command that writes before it has read
        // everything (or never reads) must not deadlock us, and the main thread only ever
        // waits with a deadline. A thread stuck on a pipe that a grandchild keeps open is
        // abandoned, not joined.
        std::thread::spawn(move || {
            // A command that exits without reading is judged by its exit status and output.
            let _ = stdin.write_all(input.as_bytes());
        });
        let (out_tx, out_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let r = (&mut stdout)
                .take(MAX_OUTPUT_BYTES as u64 + 1)
                .read_to_end(&mut buf);
            let _ = out_tx.send(r.map(|_| buf));
        });
        let (err_tx, err_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > 2 * STDERR_TAIL {
                    buf.drain(..buf.len() - STDERR_TAIL);
                }
            }
            let _ = err_tx.send(buf);
        });

        let timed_out = |child: &mut std::process::Child| {
            kill_group(child);
            let _ = child.wait();
            self.fail(format!(
                "timed out after {:.1} s (rl.timeout_s); it was killed",
                self.timeout.as_secs_f64()
            ))
        };
        let out = match out_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(buf)) => buf,
            Ok(Err(e)) => {
                kill_group(&mut child);
                let _ = child.wait();
                return Err(self.fail(format!("reading its output: {e}")));
            }
            Err(_) => return Err(timed_out(&mut child)),
        };
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => return Err(timed_out(&mut child)),
                Err(e) => return Err(self.fail(format!("waiting for it: {e}"))),
            }
        };
        let err_tail = err_rx
            .recv_timeout(Duration::from_millis(200))
            .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
            .unwrap_or_default();
        if !status.success() {
            let tail = if err_tail.is_empty() {
                String::new()
            } else {
                format!("; its stderr ends: {}", last_chars(&err_tail, STDERR_TAIL))
            };
            return Err(self.fail(format!("exited with {status}{tail}")));
        }
        if out.len() > MAX_OUTPUT_BYTES {
            return Err(self.fail(format!(
                "wrote more than {MAX_OUTPUT_BYTES} bytes to stdout"
            )));
        }
        String::from_utf8(out).map_err(|e| self.fail(format!("its output is not UTF-8: {e}")))
    }

    /// Parses the command's output: one reward per completion.
    fn parse_rewards(&self, out: &str, expected: usize) -> Result<Vec<Score>> {
        let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.len() != expected {
            return Err(self.fail(format!(
                "printed {} reward lines for {expected} samples (one per stdin line, in order)",
                lines.len()
            )));
        }
        let mut numbered = out
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty());
        let mut scores = Vec::with_capacity(expected);
        for _ in 0..expected {
            let (i, line) = numbered.next().expect("counted above");
            let bad = |what: String| {
                self.fail(format!(
                    "output line {}: {what}: {}",
                    i + 1,
                    last_chars(line, 200)
                ))
            };
            let v: Value = serde_json::from_str(line)
                .map_err(|e| bad(format!("not a number or JSON object ({e})")))?;
            let score = match &v {
                Value::Number(n) => Score {
                    reward: n.as_f64().unwrap_or(f64::NAN),
                    metrics: BTreeMap::new(),
                },
                Value::Object(obj) => {
                    let reward = obj
                        .get("reward")
                        .ok_or_else(|| bad("no `reward` field".into()))?
                        .as_f64()
                        .ok_or_else(|| bad("`reward` is not a number".into()))?;
                    let mut metrics = BTreeMap::new();
                    if let Some(m) = obj.get("metrics") {
                        let m = m
                            .as_object()
                            .ok_or_else(|| bad("`metrics` is not an object".into()))?;
                        for (k, v) in m {
                            let x = v
                                .as_f64()
                                .ok_or_else(|| bad(format!("metric `{k}` is not a number")))?;
                            metrics.insert(k.clone(), x);
                        }
                    }
                    Score { reward, metrics }
                }
                _ => return Err(bad("expected a number or {\"reward\": number}".into())),
            };
            if !score.reward.is_finite() {
                return Err(bad("the reward is not a finite number".into()));
            }
            scores.push(score);
        }
        Ok(scores)
    }
}

/// SIGKILL to the child's process group (it leads one: `process_group(0)`), so nothing it
/// started outlives a timeout; the child itself as a fallback.
fn kill_group(child: &mut std::process::Child) {
    // SAFETY: kill(2) with a negative pid signals that process group; no memory involved.
    let rc = unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
    if rc != 0 {
        let _ = child.kill();
    }
}

fn last_chars(s: &str, n: usize) -> &str {
    let count = s.chars().count();
    if count <= n {
        return s;
    }
    let skip = s.char_indices().nth(count - n).map_or(0, |(i, _)| i);
    &s[skip..]
}

impl Env for ExternalEnv {
    fn name(&self) -> &str {
        "external"
    }

    fn problems(&self, step: u64, n: usize) -> Result<Vec<Problem>> {
        let len = self.prompts.len() as u64;
        let first = step.saturating_sub(1).saturating_mul(n as u64);
        let mut order: Option<(u64, Vec<usize>)> = None;
        (0..n as u64)
            .map(|j| {
                let k = first + j;
                let (epoch, pos) = (k / len, (k % len) as usize);
                if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                    let mut idx: Vec<usize> = (0..self.prompts.len()).collect();
                    SplitMix64::for_stream(mix64(self.seed ^ 0xe87e_4a11), epoch).shuffle(&mut idx);
                    order = Some((epoch, idx));
                }
                let idx = order.as_ref().expect("set above").1[pos];
                Ok(self.prompts[idx].clone())
            })
            .collect()
    }

    fn score(&mut self, completions: &[Completion<'_>]) -> Result<Vec<Score>> {
        if completions.is_empty() {
            return Ok(Vec::new());
        }
        let mut input = String::new();
        for c in completions {
            let line = json!({
                "id": c.problem.id,
                "prompt": c.prompt_text,
                "messages": c.problem.messages.iter().map(|m| json!({
                    "role": m.role.as_str(), "content": m.content
                })).collect::<Vec<_>>(),
                "completion": c.text,
                "stopped": c.stopped,
                "answer": c.problem.answer,
            });
            input.push_str(&line.to_string());
            input.push('\n');
        }
        let out = self.run(input)?;
        self.parse_rewards(&out, completions.len())
    }
}

/// Reads an RL prompts file (see [`ExternalEnv`]).
pub fn load_prompts(path: &Path) -> Result<Vec<Problem>> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut out = Vec::new();
    let bad = |line: usize, problem: LineProblem| Error::Line {
        path: PathBuf::from(path),
        line,
        problem,
    };
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| bad(n, LineProblem::NotJson(e.to_string())))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(&line).map_err(|e| bad(n, LineProblem::NotJson(e.to_string())))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad(n, LineProblem::NotAnObject("another JSON value")))?;
        let messages = match (obj.get("messages"), obj.get("prompt")) {
            (Some(m), _) => parse_messages(m).map_err(|p| bad(n, p))?,
            (None, Some(Value::String(p))) => vec![Message::new(Role::User, p.clone())],
            (None, Some(_)) => {
                return Err(bad(
                    n,
                    LineProblem::BadValue {
                        field: "prompt".into(),
                        message: "must be a string".into(),
                    },
                ))
            }
            (None, None) => return Err(bad(n, LineProblem::MissingField("messages".into()))),
        };
        let text_field = |f: &str| -> Result<Option<String>> {
            match obj.get(f) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(bad(
                    n,
                    LineProblem::BadValue {
                        field: f.into(),
                        message: "must be a string".into(),
                    },
                )),
            }
        };
        let id = text_field("id")?.unwrap_or_else(|| format!("line-{n}"));
        let answer = text_field("answer")?;
        out.push(Problem {
            id,
            messages,
            answer,
        });
    }
    if out.is_empty() {
        return Err(Error::EmptyDataset {
            path: path.to_owned(),
            detail: "no prompts".into(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, stopped: bool, expect: (f64, f64, f64)) {
        let env = ArithmeticEnv::new(0, 99, 0.5).unwrap();
        let s = env.score_reply(37, 45, text, stopped);
        let got = (s.reward, s.metrics["correct"], s.metrics["format"]);
        assert_eq!(got, expect, "{text:?} stopped={stopped}");
    }

    #[test]
    fn arithmetic_scoring() {
        // Correct and ended cleanly: reward 1.
        check("82", true, (1.0, 1.0, 1.0));
        check(" 82.", true, (1.0, 1.0, 1.0));
        // tinker's lenient answer check: the last integer counts.
        check("37 + 45 = 82", true, (1.0, 1.0, 1.0));
        check("82, or 81", true, (0.0, 0.0, 1.0));
        // Correct digits but cut off at max_tokens: format penalty.
        check("82", false, (0.5, 1.0, 0.0));
        // Wrong but ended cleanly: 0.
        check("81", true, (0.0, 0.0, 1.0));
        check("-82", true, (0.0, 0.0, 1.0));
        // No number: wrong but well-formed; empty: malformed; too long to be a number.
        check("eighty-two", true, (0.0, 0.0, 1.0));
        check("", true, (-0.5, 0.0, 0.0));
        check(" \n", true, (-0.5, 0.0, 0.0));
        check("99999999999999999999999", true, (0.0, 0.0, 1.0));
        check("eighty-two", false, (-0.5, 0.0, 0.0));
        check("99999999999999999999999", false, (-0.5, 0.0, 0.0));
    }

    #[test]
    fn final_int_extraction() {
        assert_eq!(extract_final_int("1,234"), Some(1234));
        assert_eq!(extract_final_int("a -5 b 7"), Some(7));
        assert_eq!(extract_final_int("x-12"), Some(-12));
        assert_eq!(extract_final_int("none"), None);
    }

    #[test]
    fn arithmetic_problems_are_seeded() {
        let env = ArithmeticEnv::new(3, 99, 0.1).unwrap();
        let a = env.problems(5, 8).unwrap();
        assert_eq!(a, env.problems(5, 8).unwrap());
        assert_ne!(a, env.problems(6, 8).unwrap());
        assert_ne!(
            a,
            ArithmeticEnv::new(4, 99, 0.1)
                .unwrap()
                .problems(5, 8)
                .unwrap()
        );
        for p in &a {
            let (x, y) = parse_operands(&p.id).unwrap();
            assert!((0..=99).contains(&x) && (0..=99).contains(&y));
            assert_eq!(p.messages[0].content, format!("What is {x} + {y}?"));
            assert_eq!(p.answer.as_deref(), Some((x + y).to_string().as_str()));
        }
        assert!(ArithmeticEnv::new(0, 0, 0.1).is_err());
        assert!(ArithmeticEnv::new(0, 9, -1.0).is_err());
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    /// An external env over a two-prompt file, with `timeout`.
    fn external(script: &str, timeout_ms: u64) -> (tempfile::TempDir, ExternalEnv) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("prompts.jsonl");
        std::fs::write(
            &p,
            "{\"id\": \"q1\", \"prompt\": \"What is 37 + 45?\", \"answer\": \"82\"}\n\
             \n\
             {\"messages\": [{\"role\": \"user\", \"content\": \"Say hi\"}]}\n",
        )
        .unwrap();
        let env = ExternalEnv::new(sh(script), Duration::from_millis(timeout_ms), &p, 0).unwrap();
        (dir, env)
    }

    fn score(env: &mut ExternalEnv, texts: &[&str]) -> Result<Vec<Score>> {
        let problems = env.problems(1, texts.len()).unwrap();
        let completions: Vec<Completion> = problems
            .iter()
            .zip(texts)
            .map(|(p, t)| Completion {
                problem: p,
                prompt_text: "User: x\n\nAssistant:",
                text: t,
                stopped: true,
            })
            .collect();
        env.score(&completions)
    }

    fn err(script: &str, timeout_ms: u64, texts: &[&str]) -> String {
        let (_d, mut env) = external(script, timeout_ms);
        let e = score(&mut env, texts).unwrap_err().to_string();
        assert!(e.contains("external command `sh -c "), "{e}");
        e
    }

    #[test]
    fn external_rewards_from_a_script() {
        // Reward 1 exactly when the completion is "82": the script sees the JSON sample.
        let (_d, mut env) = external(
            r#"while IFS= read -r line; do case "$line" in *'"completion":"82"'*) echo 1;; *) echo 0.25;; esac; done"#,
            10_000,
        );
        let s = score(&mut env, &["82", "81", "82"]).unwrap();
        assert_eq!(
            s.iter().map(|s| s.reward).collect::<Vec<_>>(),
            vec![1.0, 0.25, 1.0]
        );
        // The object form with metrics.
        let (_d, mut env) = external(
            r#"while IFS= read -r line; do echo '{"reward": -2, "metrics": {"len": 3}}'; done"#,
            10_000,
        );
        let s = score(&mut env, &["a", "b"]).unwrap();
        assert_eq!(s[1].reward, -2.0);
        assert_eq!(s[1].metrics["len"], 3.0);
    }

    #[test]
    fn external_sees_id_prompt_answer_and_completion() {
        let dir = tempfile::tempdir().unwrap();
        let seen = dir.path().join("seen.jsonl");
        let (_d, mut env) = external(
            &format!(
                "tee {} | while IFS= read -r l; do echo 0; done",
                seen.display()
            ),
            10_000,
        );
        score(&mut env, &["x\ny \"q\"", "z"]).unwrap();
        let text = std::fs::read_to_string(&seen).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        let ids: Vec<&str> = lines.iter().map(|v| v["id"].as_str().unwrap()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(sorted, vec!["line-3", "q1"]);
        assert_eq!(lines[0]["completion"], "x\ny \"q\"");
        assert_eq!(lines[0]["prompt"], "User: x\n\nAssistant:");
        assert_eq!(lines[0]["stopped"], true);
        let q1 = lines.iter().find(|v| v["id"] == "q1").unwrap();
        assert_eq!(q1["answer"], "82");
        assert_eq!(q1["messages"][0]["content"], "What is 37 + 45?");
    }

    #[test]
    fn external_errors_name_command_line_and_cause() {
        let e = err("cat >/dev/null; echo 1; echo abc", 10_000, &["a", "b"]);
        assert!(e.contains("output line 2") && e.contains("abc"), "{e}");
        let e = err("cat >/dev/null; echo 1", 10_000, &["a", "b"]);
        assert!(e.contains("printed 1 reward lines for 2 samples"), "{e}");
        let e = err(
            "cat >/dev/null; echo 1; echo 2; echo 3",
            10_000,
            &["a", "b"],
        );
        assert!(e.contains("printed 3 reward lines for 2 samples"), "{e}");
        let e = err(
            "cat >/dev/null; echo 'reward model crashed' >&2; exit 3",
            10_000,
            &["a"],
        );
        assert!(
            e.contains("exit status: 3") && e.contains("reward model crashed"),
            "{e}"
        );
        let e = err("cat >/dev/null; echo '{\"score\": 1}'", 10_000, &["a"]);
        assert!(e.contains("output line 1: no `reward` field"), "{e}");
        let e = err("cat >/dev/null; echo NaN", 10_000, &["a"]);
        assert!(e.contains("output line 1"), "{e}");
        let e = err("cat >/dev/null; echo 1e999", 10_000, &["a"]);
        assert!(e.contains("output line 1"), "{e}");
    }

    #[test]
    fn external_timeout_kills_and_never_hangs() {
        for script in [
            // Never reads, never exits.
            "exec sleep 30",
            // Reads everything, then hangs before answering.
            "cat >/dev/null; exec sleep 30",
            // A grandchild keeps stdout open after the command is killed.
            "sleep 30 & wait",
        ] {
            let t = Instant::now();
            let e = err(script, 300, &["a", "b"]);
            assert!(e.contains("timed out after 0.3 s"), "{e}");
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "{script}: {:?}",
                t.elapsed()
            );
        }
    }

    /// What the command started goes with it: a timeout kills its process group.
    #[test]
    fn external_timeout_kills_what_the_command_started() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let e = err(
            &format!("sleep 30 & echo $! > {}; wait", pidfile.display()),
            300,
            &["a"],
        );
        assert!(e.contains("timed out"), "{e}");
        let pid = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .to_string();
        // Gone, or a zombie its new parent has not reaped yet.
        let gone = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |st| {
                st.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
        };
        let t = Instant::now();
        while !gone() && t.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            gone(),
            "the command's `sleep` (pid {pid}) outlived the timeout"
        );
    }

    #[test]
    fn external_command_that_never_reads_a_large_input() {
        // 3 MB of samples to a command that ignores stdin: no deadlock on the pipe.
        let (_d, mut env) = external(
            "i=0; while [ $i -lt 300 ]; do echo 0; i=$((i+1)); done",
            10_000,
        );
        let long = "x".repeat(10_000);
        let texts: Vec<&str> = (0..300).map(|_| long.as_str()).collect();
        assert_eq!(score(&mut env, &texts).unwrap().len(), 300);
    }

    #[test]
    fn external_missing_program_and_bad_prompts() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.jsonl");
        std::fs::write(&p, "{\"prompt\": \"hi\"}\n").unwrap();
        let mut env = ExternalEnv::new(
            vec!["/nonexistent/reward-cmd".into()],
            Duration::from_secs(1),
            &p,
            0,
        )
        .unwrap();
        let e = score(&mut env, &["a"]).unwrap_err().to_string();
        assert!(
            e.contains("/nonexistent/reward-cmd") && e.contains("cannot start it"),
            "{e}"
        );
        assert!(ExternalEnv::new(vec![], Duration::from_secs(1), &p, 0).is_err());
        for (text, want) in [
            (
                "{\"prompt\": \"a\"}\nnot json\n",
                "p.jsonl:2: not valid JSON",
            ),
            ("{\"prompt\": 3}\n", "p.jsonl:1: field `prompt`"),
            ("{\"id\": \"a\"}\n", "p.jsonl:1: missing field `messages`"),
            (
                "{\"prompt\": \"a\", \"answer\": 5}\n",
                "p.jsonl:1: field `answer`",
            ),
            ("\n", "empty dataset"),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = load_prompts(&p).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn external_problems_cycle_through_seeded_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.jsonl");
        let lines: String = (0..5)
            .map(|i| format!("{{\"id\": \"{i}\", \"prompt\": \"q{i}\"}}\n"))
            .collect();
        std::fs::write(&p, lines).unwrap();
        let env = ExternalEnv::new(sh("true"), Duration::from_secs(1), &p, 7).unwrap();
        // Steps 1..=5 of 2 prompts cover epochs 0 and 1: each epoch is a permutation.
        let ids: Vec<String> = (1..=5)
            .flat_map(|s| env.problems(s, 2).unwrap())
            .map(|p| p.id)
            .collect();
        for epoch in ids.chunks(5) {
            let mut e = epoch.to_vec();
            e.sort();
            assert_eq!(e, vec!["0", "1", "2", "3", "4"]);
        }
        assert_eq!(env.problems(3, 2).unwrap(), env.problems(3, 2).unwrap());
    }
}
