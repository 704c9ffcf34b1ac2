//! Chat renderers: messages → text segments → tokens + per-token weights.
//!
//! Each renderer reproduces a model's own chat template byte for byte:
//! - `llama3`: Meta-Llama-3-Instruct's template (`<|begin_of_text|>`, header
//!   tokens, content `| trim`, `<|eot_id|>`). Llama 3.1+ templates also inject
//!   a "Cutting Knowledge Date" system preamble; like tinker-cookbook we do not.
//! - `qwen`: Qwen2.5-Instruct's ChatML template, including its default system
//!   prompt when the conversation has none and its `<tool_response>` grouping.
//! - `role_colon`: tinker-cookbook's `User: …\n\nAssistant: …\n\n` format (no
//!   model template; the quickstart tokenizer ships a Jinja template for it).
//!
//! Weights follow tinker-cookbook's `build_supervised_example`: a message's
//! *output* (its content plus end-of-turn: `<|eot_id|>`, `<|im_end|>`, or for
//! `role_colon` the trailing `\n\n` and, after the last message, the `User:`
//! that completes the `\n\nUser:` stop sequence) is weighted according to
//! [`TrainOnWhat`]; headers, BOS and separators only under `all_tokens`.
//!
//! Segments are tokenized one by one and concatenated (as tinker-cookbook
//! does) rather than tokenizing the whole string: the boundary between a
//! prompt and an assistant reply is then a token boundary, exactly as it is
//! when the model generates that reply after the prompt at inference time.
//! Segment boundaries sit at special tokens or whitespace, where byte-level
//! BPE pre-tokenizers usually split anyway, so the ids mostly equal those of
//! tokenizing the template's output in one go (for `qwen` on the quickstart
//! data, exactly; a test checks it). They can differ where a whitespace run
//! crosses a boundary, e.g. `role_colon`'s `\n\n` before `User:`.
//!
//! Not supported (an error, never silently wrong): `tool_calls` on messages,
//! non-text content parts.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::tokenizer::Tokenizer;
use crate::{Datum, Error, Result};

/// Which chat format to render.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RendererName {
    /// `User: …\n\nAssistant: …\n\n` (tinker-cookbook's RoleColonRenderer).
    RoleColon,
    /// Llama 3 Instruct.
    Llama3,
    /// Qwen2.5 Instruct (ChatML).
    Qwen,
}

impl RendererName {
    /// Every renderer, in the order error messages list them.
    pub const ALL: [RendererName; 3] = [Self::RoleColon, Self::Llama3, Self::Qwen];

    /// The config-file name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RoleColon => "role_colon",
            Self::Llama3 => "llama3",
            Self::Qwen => "qwen",
        }
    }

    /// Guesses the renderer from a model's chat template (Jinja source), by the special
    /// tokens it writes, or for `role_colon` by its capitalised `Role: ` lines and
    /// `Assistant:` generation prompt (the template `init-model` writes). `None` when it
    /// is none of these formats.
    pub fn detect(chat_template: &str) -> Option<Self> {
        if chat_template.contains("<|start_header_id|>") && chat_template.contains("<|eot_id|>") {
            Some(Self::Llama3)
        } else if chat_template.contains("<|im_start|>") && chat_template.contains("<|im_end|>") {
            Some(Self::Qwen)
        } else if chat_template.contains("| capitalize + ': '")
            && chat_template.contains("'Assistant:'")
        {
            Some(Self::RoleColon)
        } else {
            None
        }
    }
}

impl fmt::Display for RendererName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RendererName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| Error::InvalidArgument {
                what: "renderer",
                message: format!(
                    "unknown renderer {s:?}; allowed: {}",
                    Self::ALL.map(|r| r.as_str()).join(", ")
                ),
            })
    }
}

/// Which tokens carry loss weight (tinker-cookbook's `TrainOnWhat` names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainOnWhat {
    /// Only the last assistant message's output.
    LastAssistantMessage,
    /// Every assistant message's output.
    #[default]
    AllAssistantMessages,
    /// Every message's output (system, user, tool too), not headers.
    AllMessages,
    /// Every token, headers and separators included (BOS is never a target).
    AllTokens,
}

impl TrainOnWhat {
    /// Every option, in the order error messages list them.
    pub const ALL: [TrainOnWhat; 4] = [
        Self::LastAssistantMessage,
        Self::AllAssistantMessages,
        Self::AllMessages,
        Self::AllTokens,
    ];

    /// The config-file name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LastAssistantMessage => "last_assistant_message",
            Self::AllAssistantMessages => "all_assistant_messages",
            Self::AllMessages => "all_messages",
            Self::AllTokens => "all_tokens",
        }
    }
}

impl fmt::Display for TrainOnWhat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TrainOnWhat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| Error::InvalidArgument {
                what: "train_on",
                message: format!(
                    "unknown option {s:?}; allowed: {}",
                    Self::ALL.map(|r| r.as_str()).join(", ")
                ),
            })
    }
}

/// A message's author.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Instructions for the assistant.
    System,
    /// The human turn.
    User,
    /// The model turn (what is usually trained on).
    Assistant,
    /// A tool's result.
    Tool,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 4] = [Self::System, Self::User, Self::Assistant, Self::Tool];

    /// The OpenAI-format name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }

    /// Python's `str.capitalize()` of the name, as `role_colon` writes it.
    fn capitalized(self) -> &'static str {
        match self {
            Self::System => "System",
            Self::User => "User",
            Self::Assistant => "Assistant",
            Self::Tool => "Tool",
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown role {s:?}; allowed: {}",
                    Self::ALL.map(|r| r.as_str()).join(", ")
                )
            })
    }
}

/// One chat message (text content only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// What it says.
    pub content: String,
}

impl Message {
    /// A message.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// What a rendered segment is, for weighting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentKind {
    /// The beginning-of-sequence token.
    Bos,
    /// A message's role header (never generated by the model).
    Header,
    /// A message's content and end-of-turn: what the model generates.
    Output,
    /// Text between messages that belongs to neither (qwen's `\n` after
    /// `<|im_end|>`).
    Separator,
    /// tinker's `stop_overlap`: `User:` after a final `role_colon` assistant
    /// message, completing the `\n\nUser:` stop sequence.
    StopOverlap,
}

/// A piece of rendered text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// The text, special tokens written out.
    pub text: String,
    /// What it is.
    pub kind: SegmentKind,
    /// The role of the message it belongs to (`None` for BOS).
    pub role: Option<Role>,
    /// Index of that message among the rendered messages (a qwen default
    /// system prompt counts as message 0 and shifts the others by one).
    pub message: Option<usize>,
}

/// How generation ends for a renderer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopCondition {
    /// Token ids that end the reply.
    pub token_ids: Vec<u32>,
    /// Text sequences that end the reply (`role_colon`'s `\n\nUser:`).
    pub sequences: Vec<String>,
}

/// Qwen2.5-Instruct's system prompt when the conversation has none.
pub const QWEN_DEFAULT_SYSTEM: &str =
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";
const LLAMA3_BOS: &str = "<|begin_of_text|>";

/// Python's `str.strip()` (what Jinja's `trim` filter calls): Rust's
/// `char::is_whitespace` plus the ASCII separators U+001C..U+001F, which
/// Python counts as whitespace and Unicode does not.
pub fn python_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

struct Builder {
    segments: Vec<Segment>,
}

impl Builder {
    fn push(
        &mut self,
        text: impl Into<String>,
        kind: SegmentKind,
        role: Option<Role>,
        message: Option<usize>,
    ) {
        let text = text.into();
        if !text.is_empty() {
            self.segments.push(Segment {
                text,
                kind,
                role,
                message,
            });
        }
    }
}

/// Renders messages to text segments. `bos` is the BOS text for
/// `role_colon` (the tokenizer's `bos_token`); the other renderers ignore it.
/// With `generation_prompt`, the assistant header that starts a reply is
/// appended (as HF's `add_generation_prompt=True`).
pub fn render_segments(
    name: RendererName,
    bos: Option<&str>,
    messages: &[Message],
    generation_prompt: bool,
) -> Result<Vec<Segment>> {
    if messages.is_empty() && !generation_prompt {
        return Err(Error::Render("the conversation has no messages".into()));
    }
    let mut b = Builder {
        segments: Vec::new(),
    };
    use SegmentKind::*;
    match name {
        RendererName::RoleColon => {
            if let Some(bos) = bos {
                b.push(bos, Bos, None, None);
            }
            for (i, m) in messages.iter().enumerate() {
                let r = Some(m.role);
                b.push(format!("{}:", m.role.capitalized()), Header, r, Some(i));
                b.push(format!(" {}\n\n", m.content), Output, r, Some(i));
            }
            match messages.last() {
                Some(last) if last.role == Role::Assistant && !generation_prompt => {
                    b.push(
                        "User:",
                        StopOverlap,
                        Some(last.role),
                        Some(messages.len() - 1),
                    );
                }
                _ => {}
            }
            if generation_prompt {
                b.push(
                    "Assistant:",
                    Header,
                    Some(Role::Assistant),
                    Some(messages.len()),
                );
            }
        }
        RendererName::Llama3 => {
            b.push(LLAMA3_BOS, Bos, None, None);
            for (i, m) in messages.iter().enumerate() {
                let r = Some(m.role);
                b.push(
                    format!(
                        "<|start_header_id|>{}<|end_header_id|>\n\n",
                        m.role.as_str()
                    ),
                    Header,
                    r,
                    Some(i),
                );
                b.push(
                    format!("{}<|eot_id|>", python_strip(&m.content)),
                    Output,
                    r,
                    Some(i),
                );
            }
            if generation_prompt {
                b.push(
                    "<|start_header_id|>assistant<|end_header_id|>\n\n",
                    Header,
                    Some(Role::Assistant),
                    Some(messages.len()),
                );
            }
        }
        RendererName::Qwen => {
            let default_system;
            let messages: &[Message] = if messages.first().map(|m| m.role) == Some(Role::System) {
                messages
            } else {
                let mut v = Vec::with_capacity(messages.len() + 1);
                v.push(Message::new(Role::System, QWEN_DEFAULT_SYSTEM));
                v.extend_from_slice(messages);
                default_system = v;
                &default_system
            };
            for (i, m) in messages.iter().enumerate() {
                let r = Some(m.role);
                if m.role == Role::Tool {
                    // Consecutive tool results share one user turn.
                    let first = i == 0 || messages[i - 1].role != Role::Tool;
                    let last = i + 1 == messages.len() || messages[i + 1].role != Role::Tool;
                    let mut header = String::new();
                    if first {
                        header.push_str("<|im_start|>user");
                    }
                    header.push_str("\n<tool_response>\n");
                    b.push(header, Header, r, Some(i));
                    let mut out = format!("{}\n</tool_response>", m.content);
                    if last {
                        out.push_str("<|im_end|>");
                    }
                    b.push(out, Output, r, Some(i));
                    if last {
                        b.push("\n", Separator, r, Some(i));
                    }
                } else {
                    b.push(
                        format!("<|im_start|>{}\n", m.role.as_str()),
                        Header,
                        r,
                        Some(i),
                    );
                    b.push(format!("{}<|im_end|>", m.content), Output, r, Some(i));
                    b.push("\n", Separator, r, Some(i));
                }
            }
            if generation_prompt {
                b.push(
                    "<|im_start|>assistant\n",
                    Header,
                    Some(Role::Assistant),
                    Some(messages.len()),
                );
            }
        }
    }
    Ok(b.segments)
}

/// The weight of a segment under `train_on`; `last_assistant` is the index
/// of the last assistant message among the rendered messages.
fn segment_weight(seg: &Segment, train_on: TrainOnWhat, last_assistant: Option<usize>) -> f32 {
    use SegmentKind::*;
    let on = match seg.kind {
        Bos => false,
        Header | Separator => train_on == TrainOnWhat::AllTokens,
        Output | StopOverlap => match train_on {
            TrainOnWhat::LastAssistantMessage => {
                seg.message.is_some() && seg.message == last_assistant
            }
            TrainOnWhat::AllAssistantMessages => seg.role == Some(Role::Assistant),
            TrainOnWhat::AllMessages | TrainOnWhat::AllTokens => true,
        },
    };
    if on {
        1.0
    } else {
        0.0
    }
}

/// A renderer bound to a tokenizer.
#[derive(Clone, Debug)]
pub struct Renderer {
    name: RendererName,
    tokenizer: Tokenizer,
}

impl Renderer {
    /// Binds `name` to `tokenizer`, checking that every special token the
    /// format writes is a single token of the vocabulary.
    pub fn new(name: RendererName, tokenizer: &Tokenizer) -> Result<Self> {
        let needed: &[&str] = match name {
            RendererName::RoleColon => &[],
            RendererName::Llama3 => &[
                LLAMA3_BOS,
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ],
            RendererName::Qwen => &["<|im_start|>", "<|im_end|>"],
        };
        for &t in needed {
            let Some(id) = tokenizer.token_id(t) else {
                return Err(Error::MissingSpecialToken {
                    renderer: name.as_str(),
                    token: t.into(),
                    problem: format!("which {} does not have", tokenizer.source().display()),
                });
            };
            let ids = tokenizer.encode(t)?;
            if ids != [id] {
                return Err(Error::MissingSpecialToken {
                    renderer: name.as_str(),
                    token: t.into(),
                    problem: format!(
                        "but {} encodes it as {ids:?}, not as the single token {id} (it is not an added token)",
                        tokenizer.source().display()
                    ),
                });
            }
        }
        Ok(Self {
            name,
            tokenizer: tokenizer.clone(),
        })
    }

    /// The format.
    pub fn name(&self) -> RendererName {
        self.name
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    fn bos_text(&self) -> Option<&str> {
        self.tokenizer
            .special_tokens()
            .bos
            .as_ref()
            .map(|t| t.text.as_str())
    }

    /// The segments of a conversation (see [`render_segments`]).
    pub fn segments(&self, messages: &[Message], generation_prompt: bool) -> Result<Vec<Segment>> {
        render_segments(self.name, self.bos_text(), messages, generation_prompt)
    }

    /// The conversation as the chat template would print it.
    pub fn render_text(&self, messages: &[Message], generation_prompt: bool) -> Result<String> {
        Ok(self
            .segments(messages, generation_prompt)?
            .into_iter()
            .map(|s| s.text)
            .collect())
    }

    /// Tokens and weights for supervised training on a conversation.
    pub fn build_supervised_example(
        &self,
        messages: &[Message],
        train_on: TrainOnWhat,
    ) -> Result<Datum> {
        let segments = self.segments(messages, false)?;
        let last_assistant = segments
            .iter()
            .filter(|s| s.role == Some(Role::Assistant))
            .filter_map(|s| s.message)
            .max();
        let mut datum = Datum::default();
        for seg in &segments {
            let ids = self.tokenizer.encode(&seg.text)?;
            let w = segment_weight(seg, train_on, last_assistant);
            datum.weights.extend(std::iter::repeat_n(w, ids.len()));
            datum.tokens.extend(ids);
        }
        Ok(datum)
    }

    /// Tokens of a prompt that asks the model for the next assistant reply.
    pub fn build_generation_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        for seg in self.segments(messages, true)? {
            out.extend(self.tokenizer.encode(&seg.text)?);
        }
        Ok(out)
    }

    /// A plain-text example (a `{"text": …}` line): the format's BOS, the
    /// text, and the tokenizer's `eos_token` when it has one. Every token but
    /// BOS is weighted.
    pub fn build_text_example(&self, text: &str) -> Result<Datum> {
        let mut datum = Datum::default();
        let bos = match self.name {
            RendererName::Llama3 => Some(LLAMA3_BOS),
            RendererName::RoleColon => self.bos_text(),
            RendererName::Qwen => None,
        };
        if let Some(bos) = bos {
            let ids = self.tokenizer.encode(bos)?;
            datum.weights.extend(std::iter::repeat_n(0.0, ids.len()));
            datum.tokens.extend(ids);
        }
        let mut ids = self.tokenizer.encode(text)?;
        if let Some(eos) = &self.tokenizer.special_tokens().eos {
            ids.push(eos.id);
        }
        datum.weights.extend(std::iter::repeat_n(1.0, ids.len()));
        datum.tokens.extend(ids);
        Ok(datum)
    }

    /// How a generated reply ends.
    pub fn stop_condition(&self) -> StopCondition {
        let mut token_ids = self.tokenizer.stop_token_ids();
        let mut sequences = Vec::new();
        let end_of_turn = match self.name {
            RendererName::RoleColon => {
                sequences.push("\n\nUser:".to_string());
                None
            }
            RendererName::Llama3 => self.tokenizer.token_id("<|eot_id|>"),
            RendererName::Qwen => self.tokenizer.token_id("<|im_end|>"),
        };
        if let Some(id) = end_of_turn {
            if !token_ids.contains(&id) {
                token_ids.push(id);
                token_ids.sort_unstable();
            }
        }
        StopCondition {
            token_ids,
            sequences,
        }
    }
}
