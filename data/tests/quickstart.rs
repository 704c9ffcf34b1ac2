//! The quickstart's bundled dataset and offline tokenizer.

use std::path::Path;
use std::time::Instant;

use ringtune_data::quickstart::{
    build_quickstart_tokenizer, bundled_jsonl, eos_id, generate_conversations,
    write_quickstart_tokenizer, QuickstartTokenizerOptions, ENDOFTEXT_ID, EVAL_FILE,
    SPECIAL_TOKENS, TRAIN_FILE,
};
use ringtune_data::{
    load_jsonl, LoadOptions, Renderer, RendererName, Role, Tokenizer, TrainOnWhat,
};

fn datasets_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../datasets")
}

#[test]
fn bundled_files_are_the_generator_output() {
    let (train, eval) = bundled_jsonl();
    let on_disk = |name: &str| std::fs::read_to_string(datasets_dir().join(name)).unwrap();
    // If this fails, regenerate with
    // `cargo run -p ringtune-data --example gen_quickstart_datasets`.
    assert!(
        on_disk(TRAIN_FILE) == train,
        "datasets/{TRAIN_FILE} differs from the generator"
    );
    assert!(
        on_disk(EVAL_FILE) == eval,
        "datasets/{EVAL_FILE} differs from the generator"
    );
    assert!(train.len() < 1 << 20, "keep the bundled file under 1 MiB");
    let train_lines: std::collections::HashSet<&str> = train.lines().collect();
    assert!(
        eval.lines().all(|l| !train_lines.contains(l)),
        "eval lines never appear in train"
    );
    assert_eq!(eval.lines().count(), 200);
}

#[test]
fn generator_is_deterministic_and_answers_correctly() {
    assert_eq!(generate_conversations(5, 50), generate_conversations(5, 50));
    assert_ne!(generate_conversations(5, 50), generate_conversations(6, 50));
    let convs = generate_conversations(5, 500);
    for conv in &convs {
        for pair in conv.windows(2) {
            let (q, a) = (&pair[0], &pair[1]);
            if q.role != Role::User || a.role != Role::Assistant {
                continue;
            }
            // Arithmetic answers are "A op B = C." with C right.
            if let Some((lhs, rhs)) = a
                .content
                .strip_suffix('.')
                .and_then(|s| s.split_once(" = "))
            {
                let parts: Vec<&str> = lhs.split(' ').collect();
                if parts.len() == 3 {
                    let (x, y): (i64, i64) = (parts[0].parse().unwrap(), parts[2].parse().unwrap());
                    let want = match parts[1] {
                        "+" => x + y,
                        "-" => x - y,
                        "*" => x * y,
                        op => panic!("op {op}"),
                    };
                    assert_eq!(rhs.parse::<i64>().unwrap(), want, "{conv:?}");
                    assert!(q.content.contains(parts[0]) && q.content.contains(parts[2]));
                }
            }
        }
    }
    assert!(convs.iter().any(|c| c[0].role == Role::System));
    assert!(convs.iter().any(|c| c.len() == 4));
}

#[test]
fn quickstart_tokenizer_round_trips_and_loads_the_bundled_data() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let vocab =
        write_quickstart_tokenizer(dir.path(), &QuickstartTokenizerOptions::default()).unwrap();
    eprintln!(
        "quickstart tokenizer: vocab {vocab}, built in {:?}",
        t0.elapsed()
    );
    assert!(
        (SPECIAL_TOKENS.len() + 256..=2048).contains(&vocab),
        "{vocab}"
    );

    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.vocab_size(), vocab);
    for (i, s) in SPECIAL_TOKENS.iter().enumerate() {
        assert_eq!(tok.encode(s).unwrap(), vec![i as u32], "{s}");
    }
    assert_eq!(
        tok.special_tokens().eos.as_ref().unwrap().text,
        "<|endoftext|>"
    );
    assert_eq!(
        tok.special_tokens().eos.as_ref().unwrap().id,
        eos_id(RendererName::RoleColon)
    );
    assert_eq!(tok.token_id("<|im_end|>"), Some(eos_id(RendererName::Qwen)));
    assert_eq!(tok.pad_id(), ENDOFTEXT_ID);
    assert!(tok.special_tokens().bos.is_none());
    assert_eq!(
        RendererName::detect(tok.chat_template().unwrap()),
        Some(RendererName::RoleColon)
    );
    // Digits are one token each, so sums are learnable digit by digit.
    assert_eq!(tok.encode("1234").unwrap().len(), 4);
    let s = "What is 37 + 48?\n\nÜber 🦀";
    assert_eq!(tok.decode(&tok.encode(s).unwrap(), false).unwrap(), s);

    for name in [RendererName::RoleColon, RendererName::Qwen] {
        let r = Renderer::new(name, &tok).unwrap();
        let ds = load_jsonl(
            &datasets_dir().join(TRAIN_FILE),
            Some(&r),
            &LoadOptions::default(),
        )
        .unwrap();
        assert_eq!(ds.examples.len(), 3000);
        assert_eq!(ds.report.bad_lines + ds.report.dropped_no_weight, 0);
        let mean = ds.report.tokens as f64 / ds.examples.len() as f64;
        eprintln!("{name}: {}; {mean:.1} tokens/example", ds.report);
        assert!(ds
            .examples
            .iter()
            .all(|d| d.tokens.iter().all(|&t| (t as usize) < vocab)));
    }
}

#[test]
fn qwen_segments_tokenize_like_the_whole_text_on_the_quickstart_data() {
    let tok = build_quickstart_tokenizer(&QuickstartTokenizerOptions {
        renderer: RendererName::Qwen,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        tok.special_tokens().eos.as_ref().unwrap().text,
        "<|im_end|>"
    );
    let r = Renderer::new(RendererName::Qwen, &tok).unwrap();
    for conv in generate_conversations(3, 300) {
        let d = r
            .build_supervised_example(&conv, TrainOnWhat::AllAssistantMessages)
            .unwrap();
        let whole = tok.encode(&r.render_text(&conv, false).unwrap()).unwrap();
        assert_eq!(d.tokens, whole, "{conv:?}");
    }
}

#[test]
fn quickstart_tokenizer_is_deterministic() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let opts = QuickstartTokenizerOptions {
        vocab_size: 700,
        ..Default::default()
    };
    assert_eq!(write_quickstart_tokenizer(a.path(), &opts).unwrap(), 700);
    write_quickstart_tokenizer(b.path(), &opts).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        assert!(
            std::fs::read(a.path().join(f)).unwrap() == std::fs::read(b.path().join(f)).unwrap(),
            "{f} differs between two builds"
        );
    }
}

#[test]
fn quickstart_tokenizer_rejects_bad_options() {
    let e = build_quickstart_tokenizer(&QuickstartTokenizerOptions {
        vocab_size: 100,
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("vocab_size") && e.contains("259"), "{e}");
    let e = build_quickstart_tokenizer(&QuickstartTokenizerOptions {
        renderer: RendererName::Llama3,
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("role_colon and qwen"), "{e}");
}
