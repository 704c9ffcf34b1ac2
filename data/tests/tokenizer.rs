//! Loading a model folder's tokenizer files, and every way they can be bad.

mod common;

use std::path::Path;

use common::{byte_tokenizer_json, QWEN_SPECIALS};
use ringtune_data::{Error, Tokenizer};
use serde_json::json;

fn folder(
    tokenizer_config: Option<serde_json::Value>,
    generation: Option<&str>,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tokenizer.json"),
        byte_tokenizer_json(&QWEN_SPECIALS),
    )
    .unwrap();
    if let Some(cfg) = tokenizer_config {
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    }
    if let Some(g) = generation {
        std::fs::write(dir.path().join("generation_config.json"), g).unwrap();
    }
    dir
}

fn qwen_like_config() -> serde_json::Value {
    json!({
        "added_tokens_decoder": {
            "256": {"content": "<|endoftext|>", "special": true},
            "257": {"content": "<|im_start|>", "special": true},
            "258": {"content": "<|im_end|>", "special": true}
        },
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "pad_token": {"__type": "AddedToken", "content": "<|endoftext|>"},
        "chat_template": "{{ messages }}"
    })
}

fn config_error(dir: &Path) -> (String, String) {
    match Tokenizer::from_dir(dir).unwrap_err() {
        Error::TokenizerConfig {
            path,
            field,
            message,
        } => (
            format!("{}", path.file_name().unwrap().to_string_lossy()),
            format!("{field}: {message}"),
        ),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn loads_special_tokens_template_and_generation_eos_list() {
    let dir = folder(
        Some(qwen_like_config()),
        Some(r#"{"eos_token_id": [258, 256], "bos_token_id": 256}"#),
    );
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let s = tok.special_tokens();
    assert!(s.bos.is_none());
    assert_eq!(s.eos.as_ref().unwrap().id, 258);
    assert_eq!(s.pad.as_ref().unwrap().text, "<|endoftext|>");
    assert_eq!(s.generation_eos_ids, vec![258, 256]);
    assert_eq!(tok.stop_token_ids(), vec![256, 258]);
    assert_eq!(tok.pad_id(), 256);
    assert_eq!(tok.chat_template(), Some("{{ messages }}"));
    assert_eq!(tok.vocab_size(), 259);
    assert_eq!(
        tok.encode("a<|im_end|>").unwrap(),
        vec![tok.encode("a").unwrap()[0], 258]
    );
    assert_eq!(
        tok.decode(&tok.encode("héllo").unwrap(), false).unwrap(),
        "héllo"
    );
}

#[test]
fn generation_eos_may_be_a_single_int_and_files_are_optional() {
    let dir = folder(Some(qwen_like_config()), Some(r#"{"eos_token_id": 257}"#));
    assert_eq!(
        Tokenizer::from_dir(dir.path())
            .unwrap()
            .special_tokens()
            .generation_eos_ids,
        vec![257]
    );
    let bare = folder(None, None);
    let tok = Tokenizer::from_dir(bare.path()).unwrap();
    assert_eq!(tok.special_tokens(), &Default::default());
    assert_eq!(tok.pad_id(), 0);
}

#[test]
fn named_chat_template_list_picks_default() {
    let mut cfg = qwen_like_config();
    cfg["chat_template"] =
        json!([{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]);
    let dir = folder(Some(cfg), None);
    assert_eq!(
        Tokenizer::from_dir(dir.path()).unwrap().chat_template(),
        Some("D")
    );
}

#[test]
fn added_token_missing_from_tokenizer_json_is_added_at_its_declared_id() {
    let mut cfg = qwen_like_config();
    cfg["added_tokens_decoder"]["259"] = json!({"content": "<|extra|>", "special": true});
    let dir = folder(Some(cfg), None);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.token_id("<|extra|>"), Some(259));
    assert_eq!(tok.encode("<|extra|>").unwrap(), vec![259]);
}

#[test]
fn missing_tokenizer_json_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn corrupt_tokenizer_json_names_the_file() {
    let dir = folder(None, None);
    std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Tokenizer { .. }), "{err:?}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn tokenizer_config_not_json() {
    let dir = folder(None, None);
    std::fs::write(dir.path().join("tokenizer_config.json"), "{ nope").unwrap();
    let (file, msg) = config_error(dir.path());
    assert_eq!(file, "tokenizer_config.json");
    assert!(msg.contains("not valid JSON"), "{msg}");
}

#[test]
fn eos_token_not_in_vocabulary_names_the_field() {
    let mut cfg = qwen_like_config();
    cfg["eos_token"] = json!("</s>");
    let (file, msg) = config_error(folder(Some(cfg), None).path());
    assert_eq!(file, "tokenizer_config.json");
    assert!(
        msg.starts_with("eos_token:") && msg.contains("</s>"),
        "{msg}"
    );
}

#[test]
fn bos_token_of_wrong_type_names_the_field() {
    let mut cfg = qwen_like_config();
    cfg["bos_token"] = json!(5);
    let (_, msg) = config_error(folder(Some(cfg), None).path());
    assert!(
        msg.starts_with("bos_token:") && msg.contains("a number"),
        "{msg}"
    );
}

#[test]
fn added_token_id_disagreeing_with_tokenizer_json_is_an_error() {
    let mut cfg = qwen_like_config();
    cfg["added_tokens_decoder"] = json!({"300": {"content": "<|im_end|>", "special": true}});
    let (_, msg) = config_error(folder(Some(cfg), None).path());
    assert!(
        msg.starts_with("added_tokens_decoder.300") && msg.contains("258"),
        "{msg}"
    );
}

#[test]
fn generation_config_eos_of_wrong_type_or_range_names_file_and_field() {
    let (file, msg) = config_error(folder(None, Some(r#"{"eos_token_id": "x"}"#)).path());
    assert_eq!(file, "generation_config.json");
    assert!(msg.starts_with("eos_token_id:"), "{msg}");
    let (_, msg) = config_error(folder(None, Some(r#"{"eos_token_id": [1, 99999]}"#)).path());
    assert!(
        msg.contains("99999") && msg.contains("outside the vocabulary"),
        "{msg}"
    );
}
