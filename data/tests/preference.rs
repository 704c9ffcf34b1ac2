//! DPO preference pairs: rendering (the generation prompt, then weighted reply tokens),
//! every line shape, errors that name the file, line and field, length policies, the
//! held-out split, and the bundled quickstart pair files equal their generator's output.

mod common;

use std::path::Path;

use common::{byte_tokenizer, QWEN_SPECIALS};
use ringtune_data::preference::load_preference_reader;
use ringtune_data::quickstart::{bundled_preference_jsonl, PREF_EVAL_FILE, PREF_TRAIN_FILE};
use ringtune_data::{
    split_pairs, Error, LineProblem, LoadOptions, Message, OverflowPolicy, Renderer, RendererName,
    Role,
};

fn renderer(name: RendererName) -> Renderer {
    let tok = byte_tokenizer(&QWEN_SPECIALS, None, Some("<|im_end|>"));
    Renderer::new(name, &tok).unwrap()
}

fn load(text: &str, opts: &LoadOptions) -> ringtune_data::Result<ringtune_data::PreferenceSet> {
    load_preference_reader(
        text.as_bytes(),
        Path::new("pairs.jsonl"),
        &renderer(RendererName::Qwen),
        opts,
    )
}

#[test]
fn each_side_is_the_generation_prompt_then_weighted_reply_tokens() {
    for name in [RendererName::Qwen, RendererName::RoleColon] {
        let r = renderer(name);
        let line = r#"{"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5, I think"}"#;
        let set = load_preference_reader(
            line.as_bytes(),
            Path::new("p.jsonl"),
            &r,
            &LoadOptions::default(),
        )
        .unwrap();
        let pair = &set.pairs[0];
        let prompt = r
            .build_generation_prompt(&[Message::new(Role::User, "What is 2 + 2?")])
            .unwrap();
        for (side, reply) in [(&pair.chosen, "4"), (&pair.rejected, "5, I think")] {
            assert!(side.tokens.starts_with(&prompt), "{name:?}");
            assert!(side.weights[..prompt.len()].iter().all(|&w| w == 0.0));
            assert!(side.weights[prompt.len()..].iter().all(|&w| w == 1.0));
            let full = r
                .render_text(
                    &[
                        Message::new(Role::User, "What is 2 + 2?"),
                        Message::new(Role::Assistant, reply),
                    ],
                    false,
                )
                .unwrap();
            assert_eq!(r.tokenizer().decode(&side.tokens, false).unwrap(), full);
        }
        assert_eq!(set.report.examples, 1);
    }
}

#[test]
fn messages_and_reply_shapes() {
    let text = [
        r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "chosen": {"role": "assistant", "content": "Hello."}, "rejected": [{"role": "assistant", "content": "Go away."}]}"#,
        r#"{"prompt": "Hi", "chosen": "Hello.", "rejected": "No."}"#,
    ]
    .join("\n");
    let set = load(&text, &LoadOptions::default()).unwrap();
    assert_eq!(set.pairs.len(), 2);
    let r = renderer(RendererName::Qwen);
    let text = |d: &ringtune_data::Datum| r.tokenizer().decode(&d.tokens, false).unwrap();
    assert!(text(&set.pairs[0].chosen).contains("system\nBe brief.<|im_end|>"));
    assert!(text(&set.pairs[0].chosen).ends_with("Hello.<|im_end|>\n"));
    assert!(text(&set.pairs[0].rejected).ends_with("Go away.<|im_end|>\n"));
}

fn problem(text: &str) -> (usize, LineProblem, String) {
    match load(text, &LoadOptions::default()).unwrap_err() {
        e @ Error::Line { .. } => {
            let msg = e.to_string();
            let Error::Line { line, problem, .. } = e else {
                unreachable!()
            };
            (line, problem, msg)
        }
        other => panic!("expected a line error, got {other}"),
    }
}

#[test]
fn bad_lines_name_file_line_and_field() {
    let ok = r#"{"prompt": "Hi", "chosen": "a", "rejected": "b"}"#;
    for (bad, field) in [
        (r#"{"prompt": "Hi", "chosen": "a"}"#, "rejected"),
        (r#"{"prompt": 3, "chosen": "a", "rejected": "b"}"#, "prompt"),
        (r#"{"chosen": "a", "rejected": "b"}"#, "prompt"),
        (
            r#"{"prompt": "Hi", "chosen": 7, "rejected": "b"}"#,
            "chosen",
        ),
        (
            r#"{"prompt": "Hi", "chosen": "a", "rejected": [{"role": "user", "content": "x"}]}"#,
            "rejected[0].role",
        ),
        (
            r#"{"prompt": "Hi", "chosen": [{"role": "assistant"}], "rejected": "b"}"#,
            "chosen[0].content",
        ),
        (
            r#"{"prompt": "Hi", "messages": [], "chosen": "a", "rejected": "b"}"#,
            "prompt",
        ),
    ] {
        let (line, _, msg) = problem(&format!("{ok}\n\n{bad}\n"));
        assert_eq!(line, 3, "{msg}");
        assert!(msg.starts_with("pairs.jsonl:3"), "{msg}");
        assert!(msg.contains(field), "{field}: {msg}");
    }
    let (line, p, _) = problem("not json\n");
    assert_eq!(line, 1);
    assert!(matches!(p, LineProblem::NotJson(_)));
    // Skipping bad lines keeps the good ones and counts the rest.
    let opts = LoadOptions {
        skip_bad_lines: true,
        ..Default::default()
    };
    let set = load(&format!("{ok}\n{{\"prompt\": 1}}\n{ok}\n"), &opts).unwrap();
    assert_eq!((set.pairs.len(), set.report.bad_lines), (2, 1));
    assert!(matches!(
        load("", &LoadOptions::default()),
        Err(Error::EmptyDataset { .. })
    ));
}

#[test]
fn max_length_applies_to_both_sides() {
    let line = r#"{"prompt": "Hi", "chosen": "a short one", "rejected": "a much, much longer reply than the other"}"#;
    let full = load(line, &LoadOptions::default()).unwrap().pairs[0].clone();
    let max = full.chosen.len() + 2;
    assert!(full.rejected.len() > max);
    let with = |overflow| LoadOptions {
        max_length: Some(max),
        overflow,
        ..Default::default()
    };
    let t = load(line, &with(OverflowPolicy::Truncate)).unwrap();
    assert_eq!(t.pairs[0].rejected.len(), max);
    assert_eq!(t.pairs[0].chosen, full.chosen);
    assert_eq!(t.report.truncated, 1);
    assert!(matches!(
        load(line, &with(OverflowPolicy::Drop)),
        Err(Error::EmptyDataset { .. })
    ));
    let e = load(line, &with(OverflowPolicy::Error)).unwrap_err();
    assert!(matches!(
        e,
        Error::Line {
            line: 1,
            problem: LineProblem::TooLong { .. },
            ..
        }
    ));
    // A cut that leaves a side no reply token drops the pair.
    let prompt_len = full
        .chosen
        .weights
        .iter()
        .take_while(|&&w| w == 0.0)
        .count();
    let none = LoadOptions {
        max_length: Some(prompt_len),
        ..Default::default()
    };
    assert!(matches!(load(line, &none), Err(Error::EmptyDataset { .. })));
}

#[test]
fn pairs_whose_sides_are_identical_are_dropped_and_counted() {
    let text = [
        r#"{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}"#,
        r#"{"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}"#,
        r#"{"prompt": "Yo", "chosen": "Same reply, then more", "rejected": "Same reply, then less"}"#,
    ]
    .join("\n");
    let set = load(&text, &LoadOptions::default()).unwrap();
    assert_eq!(set.pairs.len(), 2);
    assert_eq!(set.report.dropped_same_sides, 1);
    assert_eq!(set.report.first_same_sides_line, Some(2));
    assert!(
        set.report
            .to_string()
            .contains("1 pairs dropped with identical chosen and rejected (first: line 2)"),
        "{}",
        set.report
    );
    // Truncation can make two different replies the same: the third pair, cut inside the
    // shared "Same reply, then " prefix.
    let third = load(text.lines().nth(2).unwrap(), &LoadOptions::default()).unwrap();
    let p = &third.pairs[0];
    let shared = p
        .chosen
        .tokens
        .iter()
        .zip(&p.rejected.tokens)
        .take_while(|(a, b)| a == b)
        .count();
    let cut = LoadOptions {
        max_length: Some(shared),
        overflow: OverflowPolicy::Truncate,
        ..Default::default()
    };
    let set = load(&text, &cut).unwrap();
    assert_eq!(set.report.dropped_same_sides, 2, "{}", set.report);
    // Nothing but such pairs: an empty dataset that says why.
    let e = load(text.lines().nth(1).unwrap(), &LoadOptions::default()).unwrap_err();
    assert!(
        e.to_string()
            .contains("1 with identical chosen and rejected"),
        "{e}"
    );
}

#[test]
fn split_pairs_is_seeded_and_disjoint() {
    let text: String = (0..20)
        .map(|i| format!("{{\"prompt\": \"q{i}\", \"chosen\": \"a\", \"rejected\": \"b\"}}\n"))
        .collect();
    let set = load(&text, &LoadOptions::default()).unwrap();
    let (t1, e1) = split_pairs(set.pairs.clone(), 0.25, 7).unwrap();
    let (t2, e2) = split_pairs(set.pairs.clone(), 0.25, 7).unwrap();
    assert_eq!((t1.len(), e1.len()), (15, 5));
    assert_eq!((&t1, &e1), (&t2, &e2));
    assert!(e1.iter().all(|p| !t1.contains(p)));
    let (_, e3) = split_pairs(set.pairs, 0.25, 8).unwrap();
    assert_ne!(e1, e3);
}

#[test]
fn bundled_preference_files_match_the_generator() {
    let (train, eval) = bundled_preference_jsonl();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../datasets");
    assert_eq!(
        std::fs::read_to_string(dir.join(PREF_TRAIN_FILE)).unwrap(),
        train,
        "regenerate with `cargo run -p ringtune-data --example gen_quickstart_datasets`"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join(PREF_EVAL_FILE)).unwrap(),
        eval
    );
    // Every pair's sides differ, and held-out prompts are not in train.
    let prompts = |t: &str| -> Vec<String> {
        t.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                assert_ne!(v["chosen"], v["rejected"], "{l}");
                v["prompt"].as_str().unwrap().to_owned()
            })
            .collect()
    };
    let tp: std::collections::HashSet<String> = prompts(&train).into_iter().collect();
    assert!(prompts(&eval).iter().all(|p| !tp.contains(p)));
}
