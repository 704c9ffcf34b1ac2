//! `ringtune render` through the real binary: a config's examples as the trainer tokenizes
//! and weights them — `train_on`, truncation and DPO sides — and nothing written.

mod train_common;

use train_common::*;

fn render(cfg: &std::path::Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["render", cfg.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let o = ringtune(&args);
    assert_ok(&o);
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The segments of one rendered example as (weight, text).
fn segments(v: &serde_json::Value) -> Vec<(f64, String)> {
    v["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["weight"].as_f64().unwrap(),
                s["text"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn render_shows_each_token_run_with_the_weight_training_gives_it() {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.jsonl");
    let chat = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "one"}, {"role": "user", "content": "again"}, {"role": "assistant", "content": "two"}]}"#;
    write_lines(
        &train,
        &[chat.to_string(), r#"{"text": "plain text"}"#.to_string()],
    );
    let cfg = small_config(dir.path(), shared_model(), &train, "");
    // No held-out split: both lines stay in the training set.
    let all = ["--set", "data.eval_fraction=0.0"];
    let got = render(&cfg, &[&all[..], &["--count", "5"]].concat());
    assert_eq!(got.len(), 2, "{got:?}");
    // Every assistant reply is weighted (the default all_assistant_messages), each with
    // role_colon's stop overlap; the rest is not.
    assert_eq!(
        segments(&got[0]),
        [
            (0.0, "User: hi\n\nAssistant:".to_string()),
            (1.0, " one\n\n".to_string()),
            (0.0, "User: again\n\nAssistant:".to_string()),
            (1.0, " two\n\nUser:".to_string()),
        ]
    );
    let tokens = got[0]["tokens"].as_array().unwrap().len();
    assert_eq!(got[0]["weights"].as_array().unwrap().len(), tokens);
    // A text line: every token but the first (never a target) weighted.
    let text = segments(&got[1]);
    assert_eq!(text.len(), 2, "{text:?}");
    assert_eq!(text[0].0, 0.0);
    assert_eq!(text[1].0, 1.0);
    assert_eq!(
        got[1]["target_weight"].as_f64().unwrap() as usize,
        got[1]["tokens"].as_array().unwrap().len() - 1
    );

    // train_on = last_assistant_message weights the last reply only.
    let last = render(
        &cfg,
        &[
            &all[..],
            &["--set", "data.train_on=\"last_assistant_message\""],
        ]
        .concat(),
    );
    let w: Vec<f64> = segments(&last[0]).iter().map(|s| s.0).collect();
    assert_eq!(w, [0.0, 1.0], "{:?}", segments(&last[0]));
    // max_length truncates as training does.
    let short = render(&cfg, &[&all[..], &["--set", "data.max_length=5"]].concat());
    assert_eq!(short[0]["tokens"].as_array().unwrap().len(), 5);
    // An index past the end is named; nothing was written.
    let o = ringtune(&[
        "render",
        cfg.to_str().unwrap(),
        "--index",
        "7",
        "--set",
        "data.eval_fraction=0.0",
    ]);
    let err = assert_fails(&o);
    assert!(
        err.contains("--index 7: the train set has 2 example(s)"),
        "{err}"
    );
    assert!(!dir.path().join("run").exists());
}

#[test]
fn render_shows_both_sides_of_a_dpo_pair() {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("pref.jsonl");
    write_lines(
        &train,
        &[r#"{"prompt": "2+2?", "chosen": "4", "rejected": "5"}"#.to_string()],
    );
    let cfg = small_config(dir.path(), shared_model(), &train, "method = \"dpo\"");
    let got = render(&cfg, &["--set", "data.eval_fraction=0.0"]);
    assert_eq!(got.len(), 1);
    for (side, reply) in [("chosen", " 4\n\nUser:"), ("rejected", " 5\n\nUser:")] {
        assert_eq!(
            segments(&got[0][side]),
            [
                (0.0, "User: 2+2?\n\nAssistant:".to_string()),
                (1.0, reply.to_string())
            ],
            "{side}"
        );
    }
}

/// `data.renderer = "auto"` on a model whose chat template ringtune does not know (here a
/// Mistral-style `[INST]` one) falls back to role_colon: `render` and `train` say so.
#[test]
fn an_unknown_chat_template_under_auto_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for e in std::fs::read_dir(shared_model()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
    }
    let tc = model.join("tokenizer_config.json");
    let set_template = |t: &str| {
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&tc).unwrap()).unwrap();
        v["chat_template"] = serde_json::json!(t);
        std::fs::write(&tc, v.to_string()).unwrap();
    };
    let train = dir.path().join("train.jsonl");
    write_lines(&train, &chat_lines(8, 1));
    let cfg = small_config(dir.path(), &model, &train, "");
    let warning = |extra: &[&str]| {
        let mut args = vec!["render", cfg.to_str().unwrap()];
        args.extend_from_slice(extra);
        let o = ringtune(&args);
        assert_ok(&o);
        stderr(&o)
            .lines()
            .find(|l| l.starts_with("warning:"))
            .map(str::to_string)
    };
    // The template init-model writes is role_colon's: no warning.
    assert_eq!(warning(&[]), None);
    // ChatML as Qwen2.5 writes it: no warning; without its default system prompt: one.
    set_template(ringtune_data::quickstart::QWEN_TEMPLATE);
    assert_eq!(warning(&[]), None);
    set_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}");
    let w = warning(&[]).unwrap();
    assert!(w.contains("ChatML template is not Qwen2.5's"), "{w}");
    set_template(
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}",
    );
    let w = warning(&[]).unwrap();
    assert!(
        w.contains("the tokenizer's chat template is neither Llama 3's nor ChatML"),
        "{w}"
    );
    assert_eq!(warning(&["--set", "data.renderer=\"role_colon\""]), None);
    // The trainer says it too, at start-up.
    let o = ringtune(&["train", cfg.to_str().unwrap(), "--max-steps", "1"]);
    assert_ok(&o);
    assert!(
        stderr(&o).contains("warning: data.renderer = \"auto\""),
        "{}",
        stderr(&o)
    );
}
