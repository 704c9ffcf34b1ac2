//! `ringtune sample` end to end: the real binary on a random-init quickstart model with its
//! real tokenizer.json — JSON output fields, reproducible seeds, stop strings (the row ends
//! at the stop string and the text is cut before it), chats from a JSONL file, prompt
//! logprobs, and named errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use ringtune_data::Tokenizer;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ringtune");

fn model() -> &'static Path {
    static MODEL: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, p) = MODEL.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model");
        let o = run(&[
            "init-model",
            "--preset",
            "quickstart",
            "--out",
            p.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (dir, p)
    });
    p
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap()
}

/// `ringtune sample --model <tiny> --json` plus `args`; the JSON lines.
fn sample(args: &[&str]) -> Vec<Value> {
    let m = model().to_str().unwrap().to_owned();
    let mut all = vec!["sample", "--model", &m, "--json"];
    all.extend_from_slice(args);
    let o = run(&all);
    assert!(
        o.status.success(),
        "ringtune sample failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn tokens(v: &Value) -> Vec<u32> {
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn json_lines_carry_text_tokens_logprobs_and_reproduce() {
    let args = [
        "--prompt",
        "What is 2+3?",
        "--max-tokens",
        "10",
        "--num-samples",
        "3",
        "--seed",
        "7",
        "--batch-size",
        "2",
    ];
    let a = sample(&args);
    assert_eq!(a.len(), 3);
    let tok = Tokenizer::from_dir(model()).unwrap();
    for (i, s) in a.iter().enumerate() {
        assert_eq!(s["prompt_index"], 0);
        assert_eq!(s["sample_index"], i);
        let t = tokens(s);
        assert!(!t.is_empty() && t.len() <= 10);
        let lps = s["logprobs"].as_array().unwrap();
        assert_eq!(lps.len(), t.len());
        assert!(lps.iter().all(|x| x.as_f64().unwrap() <= 0.0));
        let reason = s["stop_reason"].as_str().unwrap();
        assert!(["max_tokens", "stop_token", "stop_hook"].contains(&reason));
        if reason == "max_tokens" {
            assert_eq!(t.len(), 10);
            assert_eq!(s["text"], tok.decode(&t, true).unwrap());
        }
        assert!(s.get("prompt_logprobs").is_none());
    }
    assert_ne!(
        tokens(&a[0]),
        tokens(&a[1]),
        "samples of one prompt are equal"
    );
    // The same seed again: the same samples, bit for bit.
    assert_eq!(sample(&args), a);
    // In another batch size: the same tokens (logprobs to rounding: the matmuls' shapes
    // differ).
    let mut again = args.to_vec();
    again[9] = "3";
    let b = sample(&again);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(tokens(x), tokens(y));
        assert_eq!(x["text"], y["text"]);
        for (p, q) in x["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(y["logprobs"].as_array().unwrap())
        {
            assert!((p.as_f64().unwrap() - q.as_f64().unwrap()).abs() < 1e-5);
        }
    }
    let mut other = args.to_vec();
    other[7] = "8";
    assert_ne!(sample(&other), a, "another seed gave the same samples");
}

#[test]
fn a_stop_string_ends_the_row_and_cuts_the_text() {
    let base = [
        "--prompt",
        "Tell me a story.",
        "--max-tokens",
        "24",
        "--temperature",
        "0",
    ];
    let free = sample(&base);
    let free_toks = tokens(&free[0]);
    let text = free[0]["text"].as_str().unwrap().to_owned();
    let chars: Vec<char> = text.trim().chars().collect();
    assert!(
        chars.len() >= 8,
        "greedy text too short for the test: {text:?}"
    );
    let stop: String = chars[4..7].iter().collect();
    let mut args = base.to_vec();
    args.extend(["--stop", &stop]);
    let stopped = sample(&args);
    let s = &stopped[0];
    // Expected: the shortest greedy prefix whose text contains the stop string.
    let tok = Tokenizer::from_dir(model()).unwrap();
    let k = (1..=free_toks.len())
        .find(|&k| tok.decode(&free_toks[..k], true).unwrap().contains(&stop))
        .unwrap();
    assert_eq!(tokens(s), free_toks[..k], "stop {stop:?}");
    assert_eq!(s["stop_reason"], "stop_hook");
    let full = tok.decode(&free_toks[..k], true).unwrap();
    let want = &full[..full.find(&stop).unwrap()];
    assert_eq!(s["text"], want);
    assert!(!s["text"].as_str().unwrap().contains(&stop));
}

#[test]
fn chats_from_jsonl_with_prompt_logprobs_and_the_text_mode() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("chats.jsonl");
    std::fs::write(
        &input,
        concat!(
            r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "dropped"}]}"#,
            "\n\n",
            r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7*6?"}]}"#,
            "\n"
        ),
    )
    .unwrap();
    let out = sample(&[
        "--input",
        input.to_str().unwrap(),
        "--max-tokens",
        "5",
        "--prompt-logprobs",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
    ]);
    assert_eq!(out.len(), 2);
    assert_eq!(out[1]["prompt_index"], 1);
    for s in &out {
        let lps = s["prompt_logprobs"].as_array().unwrap();
        assert_eq!(lps.len() as u64, s["prompt_tokens"].as_u64().unwrap());
        assert!(lps[0].is_null());
        assert!(lps[1..].iter().all(|x| x.as_f64().unwrap() < 0.0));
    }
    // The renderer drops the trailing assistant turn: the prompt ends with the generation
    // prompt, not with "dropped".
    let m = model().to_str().unwrap();
    let o = run(&[
        "sample",
        "--model",
        m,
        "--input",
        input.to_str().unwrap(),
        "--max-tokens",
        "3",
    ]);
    assert!(o.status.success());
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("--- prompt 0 sample 0 (3 tokens"), "{text}");
    assert!(text.contains("--- prompt 1 sample 0"), "{text}");
}

#[test]
fn bad_inputs_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"ok\"}]}\nnot json\n",
    )
    .unwrap();
    let m = model().to_str().unwrap();
    let o = run(&["sample", "--model", m, "--input", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("bad.jsonl") && err.contains("line 2"), "{err}");
    let o = run(&["sample", "--model", m, "--prompt", "x", "--top-p", "0"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("top_p"), "{err}");
    let missing = dir.path().join("nope");
    let o = run(&[
        "sample",
        "--model",
        missing.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("nope"), "{err}");
}

/// A tokenizer with more tokens than the model has embeddings is refused by `sample` and
/// `eval` up front, as `train` does, rather than failing on the first out-of-range id.
#[test]
fn sample_and_eval_refuse_a_tokenizer_larger_than_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let (small, big) = (dir.path().join("small"), dir.path().join("big"));
    for (p, v) in [(&small, "512"), (&big, "2048")] {
        let o = run(&[
            "init-model",
            "--out",
            p.to_str().unwrap(),
            "--vocab-size",
            v,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(big.join(f), small.join(f)).unwrap();
    }
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, "{\"text\": \"hello world\"}\n").unwrap();
    let m = small.to_str().unwrap();
    for args in [
        vec![
            "sample",
            "--model",
            m,
            "--prompt",
            "hi",
            "--max-tokens",
            "2",
        ],
        vec!["eval", "--model", m, "--data", data.to_str().unwrap()],
    ] {
        let o = run(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}: {err}");
        assert!(err.contains("the tokenizer has"), "{args:?}: {err}");
    }
}
