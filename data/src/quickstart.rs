//! The quickstart's offline ingredients: a deterministic generator for the
//! bundled chat dataset (`datasets/quickstart_chat*.jsonl`) and a builder for
//! a small byte-level BPE `tokenizer.json` trained on it, so `ringtune
//! init-model --preset tiny` can make a model folder with no hub access.
//!
//! The tasks are ones a tiny model visibly learns in a minute or two of CPU
//! training: fixed answer formats ("37 + 48 = 85."), copying operands, and
//! small lookups (upper-casing, first letters). The generator is the source of
//! truth; a test checks the bundled files equal its output.

use std::io::Write;
use std::path::Path;

use serde_json::json;

use crate::render::{render_segments, Message, RendererName, Role};
use crate::rng::SplitMix64;
use crate::tokenizer::{SpecialToken, SpecialTokens, Tokenizer};
use crate::{Error, Result};

/// Seed of the bundled training file.
pub const TRAIN_SEED: u64 = 17;
/// Seed of the bundled eval file.
pub const EVAL_SEED: u64 = 1017;
/// Conversations in the bundled training file.
pub const TRAIN_CONVERSATIONS: usize = 3000;
/// Conversations in the bundled eval file.
pub const EVAL_CONVERSATIONS: usize = 200;
/// File name of the bundled training set under `datasets/`.
pub const TRAIN_FILE: &str = "quickstart_chat.jsonl";
/// File name of the bundled eval set under `datasets/`.
pub const EVAL_FILE: &str = "quickstart_chat_eval.jsonl";

/// Special tokens of the quickstart tokenizer, at ids 0, 1, 2: ChatML's,
/// so both `role_colon` and `qwen` render with it.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
/// Id of `<|endoftext|>`: the pad token, and the EOS for `role_colon`
/// (a model's `config.json` / `generation_config.json` should say so).
pub const ENDOFTEXT_ID: u32 = 0;
/// Id of `<|im_start|>`.
pub const IM_START_ID: u32 = 1;
/// Id of `<|im_end|>`: the EOS for `qwen`.
pub const IM_END_ID: u32 = 2;
/// The EOS id a model folder should declare (`config.json`,
/// `generation_config.json` `eos_token_id`) for a quickstart tokenizer built
/// for `renderer`. The tokenizer has no BOS token, so `bos_token_id` should
/// be null.
pub fn eos_id(renderer: RendererName) -> u32 {
    match renderer {
        RendererName::Qwen => IM_END_ID,
        _ => ENDOFTEXT_ID,
    }
}

const WORDS: &[&str] = &[
    "apple", "river", "stone", "cloud", "tiger", "house", "green", "light", "water", "music",
    "bread", "chair", "dream", "earth", "flame", "glass", "heart", "juice", "knife", "lemon",
    "money", "night", "ocean", "paper", "queen", "robot", "sugar", "table", "uncle", "voice",
    "whale", "youth", "zebra", "cat", "dog", "sun", "moon", "star", "tree", "bird", "fish", "book",
    "door", "road", "rain", "snow", "wind", "fire", "milk", "salt", "ship", "lamp", "hand", "bell",
    "coin", "frog", "goat", "horse", "mouse", "sheep", "plant", "grass", "sand", "rock", "hill",
    "lake", "wolf", "bear", "duck", "seed", "leaf", "root", "king", "gold", "iron", "silk", "wool",
    "corn", "rice", "bean", "pear", "plum", "kiwi", "mango", "olive", "onion", "pizza", "pasta",
    "candy", "honey", "tea", "coffee", "window", "garden", "forest", "island", "planet", "rocket",
    "camera", "pencil", "basket", "bottle", "button", "candle", "carpet", "dragon", "engine",
    "farmer", "finger", "flower", "guitar", "hammer", "jacket", "kitten", "ladder", "magnet",
    "marble", "mirror", "monkey", "needle", "orange", "parrot", "pepper", "pillow", "pocket",
    "puzzle", "rabbit", "saddle", "silver", "spider", "summer", "winter", "ticket", "tomato",
    "turtle", "violin", "wallet", "yellow", "purple",
];

const SYSTEM_PROMPTS: &[&str] = &[
    "You are a helpful assistant. Answer briefly.",
    "You are a careful calculator.",
    "Answer in one short sentence.",
];

fn pick<'a>(rng: &mut SplitMix64, items: &[&'a str]) -> &'a str {
    items[rng.below(items.len() as u64) as usize]
}

fn range(rng: &mut SplitMix64, lo: u64, hi_inclusive: u64) -> u64 {
    lo + rng.below(hi_inclusive - lo + 1)
}

/// One question and its answer.
fn task(rng: &mut SplitMix64) -> (String, String) {
    match rng.below(7) {
        0 => {
            let (a, b) = (range(rng, 0, 99), range(rng, 0, 99));
            let q = pick(
                rng,
                &[
                    "What is {a} + {b}?",
                    "Compute {a} + {b}.",
                    "Add {a} and {b}.",
                ],
            );
            (
                q.replace("{a}", &a.to_string())
                    .replace("{b}", &b.to_string()),
                format!("{a} + {b} = {}.", a + b),
            )
        }
        1 => {
            let (x, y) = (range(rng, 0, 99), range(rng, 0, 99));
            let (a, b) = (x.max(y), x.min(y));
            let q = pick(
                rng,
                &[
                    "What is {a} - {b}?",
                    "Compute {a} - {b}.",
                    "Subtract {b} from {a}.",
                ],
            );
            (
                q.replace("{a}", &a.to_string())
                    .replace("{b}", &b.to_string()),
                format!("{a} - {b} = {}.", a - b),
            )
        }
        2 => {
            let (a, b) = (range(rng, 2, 9), range(rng, 2, 12));
            let q = pick(rng, &["What is {a} * {b}?", "Multiply {a} by {b}."]);
            (
                q.replace("{a}", &a.to_string())
                    .replace("{b}", &b.to_string()),
                format!("{a} * {b} = {}.", a * b),
            )
        }
        3 => {
            let w = pick(rng, WORDS);
            let q = pick(
                rng,
                &[
                    "Uppercase the word \"{w}\".",
                    "Write \"{w}\" in capital letters.",
                ],
            );
            (q.replace("{w}", w), w.to_uppercase())
        }
        4 => {
            let w = pick(rng, WORDS);
            let q = pick(
                rng,
                &["Reverse the word \"{w}\".", "Spell \"{w}\" backwards."],
            );
            (q.replace("{w}", w), w.chars().rev().collect())
        }
        5 => {
            let w = pick(rng, WORDS);
            (
                format!("How many letters are in \"{w}\"?"),
                format!("\"{w}\" has {} letters.", w.chars().count()),
            )
        }
        _ => {
            let w = pick(rng, WORDS);
            let first = w.chars().next().unwrap_or('a');
            (
                format!("What is the first letter of \"{w}\"?"),
                format!("The first letter of \"{w}\" is {first}."),
            )
        }
    }
}

/// `n` conversations from `seed`: mostly one question and answer, some with
/// a system prompt, some with two turns. Same seed, same conversations.
pub fn generate_conversations(seed: u64, n: usize) -> Vec<Vec<Message>> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|_| {
            let mut conv = Vec::new();
            if rng.below(10) == 0 {
                conv.push(Message::new(Role::System, pick(&mut rng, SYSTEM_PROMPTS)));
            }
            let turns = if rng.below(6) == 0 { 2 } else { 1 };
            for _ in 0..turns {
                let (q, a) = task(&mut rng);
                conv.push(Message::new(Role::User, q));
                conv.push(Message::new(Role::Assistant, a));
            }
            conv
        })
        .collect()
}

/// A conversation as one JSONL line (without the newline), keys in the
/// order people write them (`role` before `content`).
pub fn conversation_line(messages: &[Message]) -> String {
    let quote = |s: &str| serde_json::to_string(s).expect("strings serialise");
    let msgs: Vec<String> = messages
        .iter()
        .map(|m| {
            format!(
                "{{\"role\":{},\"content\":{}}}",
                quote(m.role.as_str()),
                quote(&m.content)
            )
        })
        .collect();
    format!("{{\"messages\":[{}]}}", msgs.join(","))
}

/// The bundled files' contents: (train, eval) JSONL text. Eval lines never
/// appear in train.
pub fn bundled_jsonl() -> (String, String) {
    let mut train = String::new();
    let mut seen = std::collections::HashSet::new();
    for c in generate_conversations(TRAIN_SEED, TRAIN_CONVERSATIONS) {
        let line = conversation_line(&c);
        train.push_str(&line);
        train.push('\n');
        seen.insert(line);
    }
    let mut eval = String::new();
    let mut rng_seed = EVAL_SEED;
    let mut count = 0;
    while count < EVAL_CONVERSATIONS {
        // Lines that also occur in train are skipped; if too many were,
        // draw more from the next seed until the count is met.
        for c in generate_conversations(rng_seed, EVAL_CONVERSATIONS) {
            let line = conversation_line(&c);
            if count < EVAL_CONVERSATIONS && !seen.contains(&line) {
                eval.push_str(&line);
                eval.push('\n');
                seen.insert(line);
                count += 1;
            }
        }
        rng_seed += 1;
    }
    (train, eval)
}

/// Writes [`TRAIN_FILE`] and [`EVAL_FILE`] into `dir`.
pub fn write_bundled_datasets(dir: &Path) -> Result<()> {
    let (train, eval) = bundled_jsonl();
    for (name, text) in [(TRAIN_FILE, train), (EVAL_FILE, eval)] {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// Options for [`write_quickstart_tokenizer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuickstartTokenizerOptions {
    /// Target vocabulary size (special tokens and the 256 byte symbols
    /// included). Training stops earlier when the corpus runs out of merges,
    /// so the real size is what the builder returns.
    pub vocab_size: usize,
    /// The chat format whose Jinja `chat_template` goes into
    /// `tokenizer_config.json` (`role_colon` or `qwen`).
    pub renderer: RendererName,
}

impl Default for QuickstartTokenizerOptions {
    fn default() -> Self {
        Self {
            vocab_size: 2048,
            renderer: RendererName::RoleColon,
        }
    }
}

/// Jinja template equal to the `role_colon` renderer's prompt text.
pub const ROLE_COLON_TEMPLATE: &str = "{%- for message in messages -%}\
{{- message['role'] | capitalize + ': ' + message['content'] + '\\n\\n' -}}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}";

/// Qwen2.5-Instruct's template without the tool-definition branch (the
/// quickstart has no tools); equal to the `qwen` renderer's text.
pub const QWEN_TEMPLATE: &str = "{%- if messages[0]['role'] == 'system' %}\
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\
{%- else %}\
{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\
{%- endif %}\
{%- for message in messages %}\
{%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\") %}\
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\
{%- elif message.role == \"tool\" %}\
{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}{{- '<|im_start|>user' }}{%- endif %}\
{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}\
{%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}{{- '<|im_end|>\\n' }}{%- endif %}\
{%- endif %}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

/// Trains the quickstart tokenizer in memory: byte-level BPE (digits split
/// one per token, so arithmetic is learnable digit by digit) on the bundled
/// training conversations as both renderers print them. Deterministic: the
/// BPE trainer breaks count ties by pair ids, which are fixed by the sorted
/// byte alphabet.
pub fn build_quickstart_tokenizer(opts: &QuickstartTokenizerOptions) -> Result<Tokenizer> {
    use tokenizers::decoders::DecoderWrapper;
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::models::{ModelWrapper, TrainerWrapper};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::pre_tokenizers::PreTokenizerWrapper;
    use tokenizers::AddedToken;

    let min_vocab = SPECIAL_TOKENS.len() + 256;
    if opts.vocab_size < min_vocab {
        return Err(Error::InvalidArgument {
            what: "vocab_size",
            message: format!(
                "{} is below {min_vocab} (the 256 byte symbols plus {} special tokens)",
                opts.vocab_size,
                SPECIAL_TOKENS.len()
            ),
        });
    }
    if !matches!(opts.renderer, RendererName::RoleColon | RendererName::Qwen) {
        return Err(Error::InvalidArgument {
            what: "renderer",
            message: format!(
                "the quickstart tokenizer supports role_colon and qwen, not {}",
                opts.renderer
            ),
        });
    }
    let build_err = |e: tokenizers::Error| Error::Tokenizer {
        path: "<quickstart tokenizer>".into(),
        message: e.to_string(),
    };

    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(t.to_string(), true))
        .collect();
    let mut inner = tokenizers::Tokenizer::new(ModelWrapper::BPE(BPE::default()));
    inner.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, true)),
    ]))));
    inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::new(
        false, false, true,
    ))));
    // Registered before training so the corpus's literal special tokens are
    // split out instead of being learned as merges.
    inner
        .add_special_tokens(specials.clone())
        .map_err(build_err)?;

    let mut corpus = Vec::new();
    for conv in generate_conversations(TRAIN_SEED, TRAIN_CONVERSATIONS) {
        for name in [RendererName::RoleColon, RendererName::Qwen] {
            let text: String = render_segments(name, None, &conv, false)?
                .into_iter()
                .map(|s| s.text)
                .collect();
            corpus.push(text);
        }
    }
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .vocab_size(opts.vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build(),
    );
    inner
        .train(&mut trainer, corpus.iter())
        .map_err(build_err)?;

    let id = |t: &str| -> Result<u32> {
        inner.token_to_id(t).ok_or_else(|| Error::Tokenizer {
            path: "<quickstart tokenizer>".into(),
            message: format!("special token {t:?} missing after training"),
        })
    };
    let eos_text = match opts.renderer {
        RendererName::Qwen => "<|im_end|>",
        _ => "<|endoftext|>",
    };
    let special = SpecialTokens {
        bos: None,
        eos: Some(SpecialToken {
            text: eos_text.into(),
            id: id(eos_text)?,
        }),
        pad: Some(SpecialToken {
            text: "<|endoftext|>".into(),
            id: id("<|endoftext|>")?,
        }),
        generation_eos_ids: vec![],
    };
    let template = match opts.renderer {
        RendererName::Qwen => QWEN_TEMPLATE,
        _ => ROLE_COLON_TEMPLATE,
    };
    Ok(Tokenizer::from_parts(
        inner,
        special,
        Some(template.to_string()),
        "<quickstart tokenizer>",
    ))
}

/// Writes `tokenizer.json` and `tokenizer_config.json` for the quickstart
/// model into `dir` (created if missing) and returns the vocabulary size the
/// model's embedding must have.
pub fn write_quickstart_tokenizer(dir: &Path, opts: &QuickstartTokenizerOptions) -> Result<usize> {
    let tok = build_quickstart_tokenizer(opts)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tok_path = dir.join("tokenizer.json");
    let text = tok.inner().to_string(true).map_err(|e| Error::Tokenizer {
        path: tok_path.clone(),
        message: e.to_string(),
    })?;
    write_file(&tok_path, text.as_bytes())?;

    let mut added = serde_json::Map::new();
    for t in SPECIAL_TOKENS {
        let id = tok
            .token_id(t)
            .expect("checked in build_quickstart_tokenizer");
        added.insert(
            id.to_string(),
            json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false,
                   "single_word": false, "special": true}),
        );
    }
    let special = tok.special_tokens();
    let cfg = json!({
        "add_bos_token": false,
        "add_eos_token": false,
        "added_tokens_decoder": added,
        "bos_token": null,
        "eos_token": special.eos.as_ref().map(|t| t.text.clone()),
        "pad_token": special.pad.as_ref().map(|t| t.text.clone()),
        "chat_template": tok.chat_template(),
        "clean_up_tokenization_spaces": false,
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    let cfg_path = dir.join("tokenizer_config.json");
    let cfg_text = serde_json::to_string_pretty(&cfg).expect("JSON values serialise");
    write_file(&cfg_path, cfg_text.as_bytes())?;
    Ok(tok.vocab_size())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// Seed of the bundled preference-pair training file.
pub const PREF_TRAIN_SEED: u64 = 23;
/// Seed of the bundled held-out preference pairs.
pub const PREF_EVAL_SEED: u64 = 1023;
/// Pairs in the bundled preference training file.
pub const PREF_TRAIN_PAIRS: usize = 2000;
/// Pairs in the bundled held-out preference file.
pub const PREF_EVAL_PAIRS: usize = 200;
/// File name of the bundled preference pairs under `datasets/`.
pub const PREF_TRAIN_FILE: &str = "quickstart_pref.jsonl";
/// File name of the bundled held-out preference pairs under `datasets/`.
pub const PREF_EVAL_FILE: &str = "quickstart_pref_eval.jsonl";

const UNHELPFUL: &[&str] = &["I don't know.", "I cannot answer that.", "Maybe."];

/// A wrong answer to the same question: the last number off by 1..=9, a word left
/// un-transformed, the wrong letter — or, one time in three, an unhelpful reply.
fn corrupt(rng: &mut SplitMix64, answer: &str) -> String {
    if rng.below(3) == 0 {
        return pick(rng, UNHELPFUL).to_string();
    }
    // The last run of digits (the result of an arithmetic or counting task).
    if let Some(end) = answer.rfind(|c: char| c.is_ascii_digit()) {
        let start = answer[..=end]
            .rfind(|c: char| !c.is_ascii_digit())
            .map_or(0, |i| i + 1);
        let n: u64 = answer[start..=end].parse().unwrap_or(0);
        let d = range(rng, 1, 9);
        let wrong = if n >= d && rng.below(2) == 0 {
            n - d
        } else {
            n + d
        };
        return format!("{}{wrong}{}", &answer[..start], &answer[end + 1..]);
    }
    if answer.chars().all(|c| c.is_ascii_uppercase()) {
        return answer.to_lowercase();
    }
    if let Some(stem) = answer.strip_suffix('.') {
        // "The first letter of "w" is f.": name the last letter instead.
        let w = stem.split('"').nth(1).unwrap_or("");
        let last = w.chars().last().unwrap_or('z');
        let first = stem.chars().last().unwrap_or('a');
        let other = if last != first { last } else { 'z' };
        return format!("{}{other}.", &stem[..stem.len() - first.len_utf8()]);
    }
    // A reversed word: the word itself (unless it reads the same both ways).
    let back: String = answer.chars().rev().collect();
    if back != answer {
        back
    } else {
        pick(rng, UNHELPFUL).to_string()
    }
}

/// `n` preference pairs from `seed` as JSONL lines `{"prompt", "chosen", "rejected"}`: a
/// quickstart question, its correct answer, and a wrong one ([`corrupt`]).
pub fn generate_preference_lines(seed: u64, n: usize) -> Vec<String> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|_| {
            let (q, a) = task(&mut rng);
            let r = corrupt(&mut rng, &a);
            json!({"prompt": q, "chosen": a, "rejected": r}).to_string()
        })
        .collect()
}

/// The bundled preference files' contents: (train, held-out) JSONL text. Held-out prompts
/// never occur in train.
pub fn bundled_preference_jsonl() -> (String, String) {
    let prompt_of = |line: &str| {
        serde_json::from_str::<serde_json::Value>(line).expect("generated JSON")["prompt"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    let mut seen = std::collections::HashSet::new();
    let mut train = String::new();
    for line in generate_preference_lines(PREF_TRAIN_SEED, PREF_TRAIN_PAIRS) {
        seen.insert(prompt_of(&line));
        train.push_str(&line);
        train.push('\n');
    }
    let mut eval = String::new();
    let (mut count, mut seed) = (0, PREF_EVAL_SEED);
    while count < PREF_EVAL_PAIRS {
        for line in generate_preference_lines(seed, PREF_EVAL_PAIRS) {
            if count < PREF_EVAL_PAIRS && seen.insert(prompt_of(&line)) {
                eval.push_str(&line);
                eval.push('\n');
                count += 1;
            }
        }
        seed += 1;
    }
    (train, eval)
}

/// Writes [`PREF_TRAIN_FILE`] and [`PREF_EVAL_FILE`] into `dir`.
pub fn write_bundled_preference_datasets(dir: &Path) -> Result<()> {
    let (train, eval) = bundled_preference_jsonl();
    for (name, text) in [(PREF_TRAIN_FILE, train), (PREF_EVAL_FILE, eval)] {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}
