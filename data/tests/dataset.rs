//! Dataset files: the three line shapes, max_length policies, bad-line
//! skipping, held-out splits, and a clear error for every bad input.

mod common;

use std::path::{Path, PathBuf};

use common::{byte_tokenizer, QWEN_SPECIALS};
use ringtune_data::dataset::load_reader;
use ringtune_data::{
    load_jsonl, split_holdout, Error, LineProblem, LoadOptions, OverflowPolicy, Renderer,
    RendererName, TrainOnWhat,
};

fn renderer() -> Renderer {
    let tok = byte_tokenizer(&QWEN_SPECIALS, None, Some("<|im_end|>"));
    Renderer::new(RendererName::Qwen, &tok).unwrap()
}

fn load(text: &str, opts: &LoadOptions) -> ringtune_data::Result<ringtune_data::Dataset> {
    load_reader(
        text.as_bytes(),
        Path::new("data/train.jsonl"),
        Some(&renderer()),
        opts,
    )
}

fn line_problem(text: &str, opts: &LoadOptions) -> (usize, LineProblem, String) {
    match load(text, opts).unwrap_err() {
        e @ Error::Line { .. } => {
            let msg = e.to_string();
            let Error::Line {
                path,
                line,
                problem,
            } = e
            else {
                unreachable!()
            };
            assert_eq!(path, PathBuf::from("data/train.jsonl"));
            assert!(
                msg.starts_with(&format!("data/train.jsonl:{line}: ")),
                "{msg}"
            );
            (line, problem, msg)
        }
        other => panic!("expected a line error, got {other:?}"),
    }
}

const CHAT: &str = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#;

#[test]
fn loads_all_three_shapes_in_one_file() {
    let text = format!(
        "{CHAT}\n\n{{\"text\": \"plain\"}}\r\n{{\"tokens\": [1, 2, 3], \"weights\": [0, 0, 1]}}\n{{\"tokens\": [4, 5]}}"
    );
    let ds = load(&text, &LoadOptions::default()).unwrap();
    assert_eq!(ds.report.lines, 4); // the blank line is not counted
    assert_eq!(ds.examples.len(), 4);
    let r = renderer();
    let chat = &ds.examples[0];
    assert_eq!(
        r.tokenizer().decode(&chat.tokens, false).unwrap(),
        r.render_text(
            &ringtune_data::dataset::parse_messages(
                &serde_json::from_str::<serde_json::Value>(CHAT).unwrap()["messages"]
            )
            .unwrap(),
            false
        )
        .unwrap()
    );
    // Text: "plain" bytes then <|im_end|>, all weighted (qwen has no BOS).
    let text_d = &ds.examples[1];
    assert_eq!(text_d.tokens.len(), 6);
    assert_eq!(
        *text_d.tokens.last().unwrap(),
        r.tokenizer().token_id("<|im_end|>").unwrap()
    );
    assert!(text_d.weights.iter().all(|&w| w == 1.0));
    assert_eq!(ds.examples[2].tokens, vec![1, 2, 3]);
    assert_eq!(ds.examples[2].weights, vec![0.0, 0.0, 1.0]);
    assert_eq!(ds.examples[3].weights, vec![1.0, 1.0]);
    assert_eq!(
        ds.report.tokens,
        ds.examples.iter().map(|d| d.len() as u64).sum::<u64>()
    );
    assert!(
        ds.report.to_string().contains("4 examples"),
        "{}",
        ds.report
    );
}

#[test]
fn train_on_option_changes_the_weights() {
    let two_turns = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}"#;
    let w = |on| {
        let ds = load(
            two_turns,
            &LoadOptions {
                train_on: on,
                ..Default::default()
            },
        )
        .unwrap();
        ds.examples[0].target_weight()
    };
    // "b<|im_end|>" and "d<|im_end|>" are 2 tokens each with the byte tokenizer.
    assert_eq!(w(TrainOnWhat::AllAssistantMessages), 4.0);
    assert_eq!(w(TrainOnWhat::LastAssistantMessage), 2.0);
    assert!(w(TrainOnWhat::AllTokens) > w(TrainOnWhat::AllMessages));
}

#[test]
fn not_json_names_file_and_line() {
    let (line, problem, msg) = line_problem(
        &format!("{CHAT}\n{{\"messages\": [\n"),
        &LoadOptions::default(),
    );
    assert_eq!(line, 2);
    assert!(matches!(problem, LineProblem::NotJson(_)), "{problem:?}");
    assert!(msg.contains("not valid JSON"), "{msg}");
}

#[test]
fn line_without_messages_names_file_and_line() {
    let (line, problem, msg) = line_problem(
        &format!("{CHAT}\n{CHAT}\n{{\"conversation\": []}}\n"),
        &LoadOptions::default(),
    );
    assert_eq!(line, 3);
    assert_eq!(problem, LineProblem::NoExampleField);
    assert!(msg.contains("no `messages` field"), "{msg}");
}

#[test]
fn wrong_types_name_the_field() {
    let cases: &[(&str, &str)] = &[
        (r#"[1, 2]"#, "expected a JSON object"),
        (
            r#"{"messages": "hi"}"#,
            "field `messages`: expected an array, found a string",
        ),
        (r#"{"messages": []}"#, "field `messages`: is empty"),
        (
            r#"{"messages": [3]}"#,
            "field `messages[0]`: expected an object",
        ),
        (
            r#"{"messages": [{"content": "x"}]}"#,
            "missing field `messages[0].role`",
        ),
        (
            r#"{"messages": [{"role": "user"}]}"#,
            "missing field `messages[0].content`",
        ),
        (
            r#"{"messages": [{"role": 1, "content": "x"}]}"#,
            "field `messages[0].role`: expected a string, found a number",
        ),
        (
            r#"{"messages": [{"role": "robot", "content": "x"}]}"#,
            "unknown role \"robot\"",
        ),
        (
            r#"{"messages": [{"role": "user", "content": 5}]}"#,
            "field `messages[0].content`: expected a string",
        ),
        (
            r#"{"messages": [{"role": "assistant", "content": "x", "tool_calls": [{}]}]}"#,
            "tool calls are not supported",
        ),
        (
            r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
            "only {\"type\": \"text\"} content parts",
        ),
        (
            r#"{"text": ["a"]}"#,
            "field `text`: expected a string, found an array",
        ),
        (r#"{"tokens": "1 2"}"#, "field `tokens`: expected an array"),
        (
            r#"{"tokens": [1, -2]}"#,
            "field `tokens[1]`: expected a token id",
        ),
        (r#"{"tokens": [1, 2.5]}"#, "field `tokens[1]`"),
        (
            r#"{"tokens": [1, 99999]}"#,
            "id 99999 is outside the vocabulary (259 tokens)",
        ),
        (
            r#"{"tokens": [1, 2], "weights": [1]}"#,
            "field `weights`: has 1 entries but `tokens` has 2",
        ),
        (
            r#"{"tokens": [1, 2], "weights": [1, "x"]}"#,
            "field `weights[1]`: expected a number, found a string",
        ),
        (
            r#"{"tokens": [1, 2], "weights": [1, -1]}"#,
            "field `weights[1]`: is -1; a weight must be >= 0 and fit in f32",
        ),
        (
            r#"{"tokens": [1, 2], "weights": [1e39, 1]}"#,
            "field `weights[0]`: is 1e+39; a weight must be >= 0 and fit in f32",
        ),
        (
            r#"{"text": "hi", "tokens": [1, 2]}"#,
            "field `text` and `tokens`: a line is one kind of example",
        ),
    ];
    for (line, want) in cases {
        let (n, _, msg) = line_problem(line, &LoadOptions::default());
        assert_eq!(n, 1);
        assert!(
            msg.contains(want),
            "line {line}: got {msg:?}, want it to contain {want:?}"
        );
    }
}

#[test]
fn content_as_text_parts_is_accepted() {
    let line = r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}, {"role": "assistant", "content": "c"}]}"#;
    let plain = r#"{"messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}]}"#;
    let opts = LoadOptions::default();
    assert_eq!(
        load(line, &opts).unwrap().examples,
        load(plain, &opts).unwrap().examples
    );
}

#[test]
fn skip_bad_lines_counts_them_and_keeps_the_rest() {
    let text = format!("{CHAT}\nnot json\n{{\"foo\": 1}}\n{CHAT}\n");
    let opts = LoadOptions {
        skip_bad_lines: true,
        ..Default::default()
    };
    let ds = load(&text, &opts).unwrap();
    assert_eq!(ds.examples.len(), 2);
    assert_eq!(ds.report.bad_lines, 2);
    assert!(
        ds.report.bad_line_errors[0].starts_with("data/train.jsonl:2:"),
        "{:?}",
        ds.report.bad_line_errors
    );
    assert!(ds.report.bad_line_errors[1].starts_with("data/train.jsonl:3:"));
    assert!(
        ds.report.to_string().contains("2 bad lines skipped"),
        "{}",
        ds.report
    );
}

#[test]
fn empty_dataset_is_an_error() {
    for text in ["", "\n  \n\n"] {
        let err = load(text, &LoadOptions::default()).unwrap_err();
        assert!(matches!(err, Error::EmptyDataset { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("data/train.jsonl") && msg.contains("no lines"),
            "{msg}"
        );
    }
    // Every line skipped is empty too, and says why.
    let opts = LoadOptions {
        skip_bad_lines: true,
        ..Default::default()
    };
    let msg = load("x\ny\n", &opts).unwrap_err().to_string();
    assert!(
        msg.contains("empty dataset") && msg.contains("2 bad"),
        "{msg}"
    );
}

#[test]
fn conversations_with_nothing_to_train_on_are_dropped_and_counted() {
    let user_only = r#"{"messages": [{"role": "user", "content": "Hi"}]}"#;
    let ds = load(&format!("{user_only}\n{CHAT}\n"), &LoadOptions::default()).unwrap();
    assert_eq!(ds.examples.len(), 1);
    assert_eq!(ds.report.dropped_no_weight, 1);
}

#[test]
fn max_length_truncate_drop_and_error() {
    let long = r#"{"tokens": [1, 2, 3, 4, 5, 6, 7, 8]}"#;
    let short = r#"{"tokens": [1, 2, 3]}"#;
    let text = format!("{short}\n{long}\n");
    let opts = |overflow| LoadOptions {
        max_length: Some(5),
        overflow,
        ..Default::default()
    };

    let ds = load(&text, &opts(OverflowPolicy::Truncate)).unwrap();
    assert_eq!(ds.examples[1].tokens, vec![1, 2, 3, 4, 5]);
    assert_eq!(ds.examples[1].weights.len(), 5);
    assert_eq!(ds.report.truncated, 1);
    assert!(
        ds.report.to_string().contains("1 truncated"),
        "{}",
        ds.report
    );

    let ds = load(&text, &opts(OverflowPolicy::Drop)).unwrap();
    assert_eq!(ds.examples.len(), 1);
    assert_eq!(ds.report.dropped_too_long, 1);
    assert!(
        ds.report
            .to_string()
            .contains("1 dropped as longer than max_length"),
        "{}",
        ds.report
    );

    let (line, problem, msg) = line_problem(&text, &opts(OverflowPolicy::Error));
    assert_eq!(line, 2);
    assert_eq!(problem, LineProblem::TooLong { len: 8, max: 5 });
    assert!(msg.contains("8 tokens, more than max_length 5"), "{msg}");
}

#[test]
fn truncation_that_cuts_off_all_weight_drops_the_example() {
    let line = r#"{"tokens": [1, 2, 3, 4], "weights": [0, 0, 0, 1]}"#;
    let opts = LoadOptions {
        max_length: Some(3),
        ..Default::default()
    };
    let err = load(line, &opts).unwrap_err().to_string();
    assert!(err.contains("nothing to train on"), "{err}");
}

#[test]
fn chat_lines_need_a_renderer_but_token_lines_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.jsonl");
    std::fs::write(&path, format!("{{\"tokens\": [1, 2]}}\n{CHAT}\n")).unwrap();
    let err = load_jsonl(&path, None, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("t.jsonl:2:") && err.contains("needs a tokenizer"),
        "{err}"
    );
    std::fs::write(&path, "{\"tokens\": [1, 2]}\n").unwrap();
    assert_eq!(
        load_jsonl(&path, None, &LoadOptions::default())
            .unwrap()
            .examples
            .len(),
        1
    );
}

#[test]
fn missing_file_names_the_file() {
    let err = load_jsonl(
        Path::new("/nonexistent/train.jsonl"),
        None,
        &LoadOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("/nonexistent/train.jsonl"), "{err}");
}

#[test]
fn invalid_utf8_is_a_line_error() {
    let bytes = b"{\"tokens\": [1, 2]}\n\xff\xfe\n".to_vec();
    let err = load_reader(
        &bytes[..],
        Path::new("x.jsonl"),
        None,
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Line { line: 2, .. }), "{err:?}");
    assert!(err.to_string().contains("UTF-8"), "{err}");
}

#[test]
fn holdout_split_is_seeded_disjoint_and_sized() {
    let data: Vec<_> = (0..100u32)
        .map(|i| ringtune_data::Datum {
            tokens: vec![i, i],
            weights: vec![1.0, 1.0],
        })
        .collect();
    let (train, eval) = split_holdout(data.clone(), 0.1, 5).unwrap();
    assert_eq!((train.len(), eval.len()), (90, 10));
    let (train2, eval2) = split_holdout(data.clone(), 0.1, 5).unwrap();
    assert_eq!((&train, &eval), (&train2, &eval2));
    let (_, eval3) = split_holdout(data.clone(), 0.1, 6).unwrap();
    assert_ne!(eval, eval3);
    // Disjoint, covering, and in file order.
    let mut ids: Vec<u32> = train.iter().chain(&eval).map(|d| d.tokens[0]).collect();
    assert!(eval.windows(2).all(|w| w[0].tokens[0] < w[1].tokens[0]));
    ids.sort();
    assert_eq!(ids, (0..100).collect::<Vec<_>>());

    assert_eq!(split_holdout(data.clone(), 0.0, 1).unwrap().1.len(), 0);
    assert_eq!(
        split_holdout(data[..3].to_vec(), 0.01, 1).unwrap().1.len(),
        1
    );
    for bad in [1.0, -0.1, f64::NAN] {
        let err = split_holdout(data.clone(), bad, 1).unwrap_err().to_string();
        assert!(err.contains("eval fraction"), "{err}");
    }
    assert!(split_holdout(data[..1].to_vec(), 0.5, 1).is_err());
}

#[test]
fn an_oversized_line_is_a_line_error_and_can_be_skipped() {
    use std::io::Read;
    let max = ringtune_data::dataset::MAX_LINE_BYTES;
    let huge = std::io::repeat(b'a').take(max as u64 + 10);
    let tail = "\n{\"tokens\": [1, 2]}\n".as_bytes();
    let reader = std::io::BufReader::new(huge.chain(tail));
    let opts = LoadOptions {
        skip_bad_lines: true,
        ..Default::default()
    };
    let ds = load_reader(reader, Path::new("big.jsonl"), None, &opts).unwrap();
    assert_eq!(ds.examples.len(), 1);
    assert_eq!(ds.report.bad_lines, 1);
    assert!(
        ds.report.bad_line_errors[0].starts_with("big.jsonl:1: line is longer than"),
        "{:?}",
        ds.report
    );
}

/// A UTF-8 byte-order mark before the first line (some editors write one) is skipped;
/// anywhere else it is not JSON.
#[test]
fn a_byte_order_mark_before_the_first_line_is_skipped() {
    let plain = load("{\"tokens\": [1, 2, 3]}\n", &LoadOptions::default()).unwrap();
    let bom = load("\u{feff}{\"tokens\": [1, 2, 3]}\n", &LoadOptions::default()).unwrap();
    assert_eq!(bom.examples.len(), 1);
    assert_eq!(bom.examples[0].tokens, plain.examples[0].tokens);
    let (line, _, _) = line_problem(
        "{\"tokens\": [1]}\n\u{feff}{\"tokens\": [1]}\n",
        &LoadOptions::default(),
    );
    assert_eq!(line, 2);
}
