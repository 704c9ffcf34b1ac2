//! Test helpers shared by the integration tests.
#![allow(dead_code)]

use ringtune_data::{SpecialToken, SpecialTokens, Tokenizer};
use serde_json::json;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

/// Special tokens of the real Llama 3 and Qwen2.5 vocabularies.
pub const LLAMA3_SPECIALS: [&str; 5] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
];
pub const QWEN_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A byte-level tokenizer with no merges: every byte of ordinary text is one
/// token (ids 0..256), then `specials` as added special tokens. One token per
/// byte makes weight masks easy to check: the weighted tokens decode to
/// exactly the weighted text.
pub fn byte_tokenizer(specials: &[&str], bos: Option<&str>, eos: Option<&str>) -> Tokenizer {
    let inner = tokenizers::Tokenizer::from_bytes(byte_tokenizer_json(specials)).unwrap();
    let st = |t: &str| SpecialToken {
        text: t.to_string(),
        id: inner.token_to_id(t).unwrap(),
    };
    let special = SpecialTokens {
        bos: bos.map(st),
        eos: eos.map(st),
        pad: None,
        generation_eos_ids: vec![],
    };
    Tokenizer::from_parts(inner, special, None, "<test byte tokenizer>")
}

/// The `tokenizer.json` text of [`byte_tokenizer`], as a model folder would
/// hold it.
pub fn byte_tokenizer_json(specials: &[&str]) -> String {
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let vocab: serde_json::Map<String, serde_json::Value> = alphabet
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), json!(i)))
        .collect();
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": 256 + i, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    })
    .to_string()
}

/// The maximal runs of tokens with non-zero weight, decoded (special tokens
/// kept), in order.
pub fn weighted_spans(tok: &Tokenizer, tokens: &[u32], weights: &[f32]) -> Vec<String> {
    assert_eq!(tokens.len(), weights.len());
    let mut spans = Vec::new();
    let mut run: Vec<u32> = Vec::new();
    for (&t, &w) in tokens.iter().zip(weights) {
        if w != 0.0 {
            run.push(t);
        } else if !run.is_empty() {
            spans.push(tok.decode(&run, false).unwrap());
            run.clear();
        }
    }
    if !run.is_empty() {
        spans.push(tok.decode(&run, false).unwrap());
    }
    spans
}
