//! Renderer tests: the rendered text byte for byte against hand-written
//! fixtures from the real chat templates, against the templates themselves
//! (rendered with minijinja) for many generated conversations, and the
//! weight masks for every TrainOnWhat.

mod common;

use common::{byte_tokenizer, weighted_spans, LLAMA3_SPECIALS, QWEN_SPECIALS};
use ringtune_data::render::{python_strip, render_segments};
use ringtune_data::{Error, Message, Renderer, RendererName, Role, SplitMix64, TrainOnWhat};

const LLAMA3_TEMPLATE: &str = include_str!("fixtures/llama3_instruct.jinja");
const QWEN25_TEMPLATE: &str = include_str!("fixtures/qwen2_5_instruct.jinja");

fn m(role: Role, content: &str) -> Message {
    Message::new(role, content)
}

fn multi_turn_with_system() -> Vec<Message> {
    vec![
        m(Role::System, "You are terse."),
        m(Role::User, "Hi!"),
        m(Role::Assistant, "Hello."),
        m(Role::User, "  What is 2+2?\n"),
        m(Role::Assistant, "4"),
    ]
}

fn multi_turn_no_system() -> Vec<Message> {
    vec![
        m(Role::User, "Name a colour."),
        m(Role::Assistant, "Blue."),
        m(Role::User, "Another?"),
        m(Role::Assistant, " Green. "),
    ]
}

fn text(name: RendererName, bos: Option<&str>, msgs: &[Message], gen: bool) -> String {
    render_segments(name, bos, msgs, gen)
        .unwrap()
        .into_iter()
        .map(|s| s.text)
        .collect()
}

// ---- Hand-written fixtures, from reading the templates ----------------------

#[test]
fn llama3_text_matches_fixture() {
    let expected =
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>\
<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>\
<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>\
<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>\
<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>";
    assert_eq!(
        text(RendererName::Llama3, None, &multi_turn_with_system(), false),
        expected
    );

    let prompt =
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nName a colour.<|eot_id|>\
<|start_header_id|>assistant<|end_header_id|>\n\n";
    assert_eq!(
        text(
            RendererName::Llama3,
            None,
            &multi_turn_no_system()[..1],
            true
        ),
        prompt
    );
}

#[test]
fn qwen_text_matches_fixture_with_and_without_system() {
    let with_system = "<|im_start|>system\nYou are terse.<|im_end|>\n\
<|im_start|>user\nHi!<|im_end|>\n\
<|im_start|>assistant\nHello.<|im_end|>\n\
<|im_start|>user\n  What is 2+2?\n<|im_end|>\n\
<|im_start|>assistant\n4<|im_end|>\n";
    assert_eq!(
        text(RendererName::Qwen, None, &multi_turn_with_system(), false),
        with_system
    );

    // No system message: Qwen2.5 inserts its default one. Content is not trimmed.
    let default_system = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
<|im_start|>user\nName a colour.<|im_end|>\n\
<|im_start|>assistant\nBlue.<|im_end|>\n\
<|im_start|>user\nAnother?<|im_end|>\n\
<|im_start|>assistant\n Green. <|im_end|>\n";
    assert_eq!(
        text(RendererName::Qwen, None, &multi_turn_no_system(), false),
        default_system
    );

    let tools = vec![
        m(Role::User, "Weather?"),
        m(Role::Assistant, "Checking."),
        m(Role::Tool, "sunny"),
        m(Role::Tool, "22C"),
        m(Role::Assistant, "Sunny, 22C."),
    ];
    let expected = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
<|im_start|>user\nWeather?<|im_end|>\n\
<|im_start|>assistant\nChecking.<|im_end|>\n\
<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n22C\n</tool_response><|im_end|>\n\
<|im_start|>assistant\nSunny, 22C.<|im_end|>\n";
    assert_eq!(text(RendererName::Qwen, None, &tools, false), expected);
}

#[test]
fn role_colon_text_matches_tinker_format() {
    // tinker-cookbook: "{Role}:" + " {content}\n\n" per message, and after a
    // final assistant message the "User:" that completes the "\n\nUser:" stop.
    let expected = "System: You are terse.\n\nUser: Hi!\n\nAssistant: Hello.\n\n\
User:   What is 2+2?\n\n\nAssistant: 4\n\nUser:";
    assert_eq!(
        text(
            RendererName::RoleColon,
            None,
            &multi_turn_with_system(),
            false
        ),
        expected
    );
    assert_eq!(
        text(
            RendererName::RoleColon,
            Some("<s>"),
            &multi_turn_no_system()[..1],
            true
        ),
        "<s>User: Name a colour.\n\nAssistant:"
    );
}

// ---- The templates themselves ----------------------------------------------

fn jinja(template: &str, msgs: &[Message], bos: &str, gen: bool) -> String {
    let mut env = minijinja::Environment::new();
    env.add_template("t", template).unwrap();
    let messages: Vec<_> = msgs
        .iter()
        .map(|m| minijinja::context! { role => m.role.as_str(), content => m.content.clone() })
        .collect();
    env.get_template("t")
        .unwrap()
        .render(minijinja::context! {
            messages => messages,
            bos_token => bos,
            add_generation_prompt => gen,
        })
        .unwrap()
}

/// Conversations with awkward content: surrounding whitespace (Llama 3
/// trims), empty content, newlines, unicode, template-looking text, and
/// random role orders including tool runs.
fn random_conversations(n: usize) -> Vec<Vec<Message>> {
    let pieces = [
        "hi",
        " spaced ",
        "\n\nnewlines\n",
        "",
        "tab\tand\u{a0}nbsp",
        "emoji 🦀 ünïcödé",
        "{{ not a template }}",
        "<b>html</b>",
        "  ",
        "multi\nline\n\ntext",
    ];
    let mut rng = SplitMix64::new(99);
    (0..n)
        .map(|_| {
            let len = 1 + rng.below(6) as usize;
            (0..len)
                .map(|i| {
                    let role = if i == 0 && rng.below(3) == 0 {
                        Role::System
                    } else {
                        Role::ALL[rng.below(4) as usize]
                    };
                    let a = pieces[rng.below(pieces.len() as u64) as usize];
                    let b = pieces[rng.below(pieces.len() as u64) as usize];
                    Message::new(role, format!("{a}{b}"))
                })
                .collect()
        })
        .collect()
}

#[test]
fn llama3_equals_the_real_template() {
    let mut convs = random_conversations(300);
    convs.push(multi_turn_with_system());
    convs.push(multi_turn_no_system());
    for conv in &convs {
        for gen in [false, true] {
            assert_eq!(
                text(RendererName::Llama3, None, conv, gen),
                jinja(LLAMA3_TEMPLATE, conv, "<|begin_of_text|>", gen),
                "conversation {conv:?}, generation prompt {gen}"
            );
        }
    }
}

#[test]
fn qwen_equals_the_real_qwen2_5_template() {
    let mut convs = random_conversations(300);
    convs.push(multi_turn_with_system());
    convs.push(multi_turn_no_system());
    for conv in &convs {
        for gen in [false, true] {
            assert_eq!(
                text(RendererName::Qwen, None, conv, gen),
                jinja(QWEN25_TEMPLATE, conv, "", gen),
                "conversation {conv:?}, generation prompt {gen}"
            );
        }
    }
}

#[test]
fn quickstart_templates_equal_their_renderers() {
    use ringtune_data::quickstart::{QWEN_TEMPLATE, ROLE_COLON_TEMPLATE};
    for conv in random_conversations(200) {
        for gen in [false, true] {
            assert_eq!(
                text(RendererName::Qwen, None, &conv, gen),
                jinja(QWEN_TEMPLATE, &conv, "", gen)
            );
            // The training sequence adds the "User:" stop overlap after a
            // final assistant turn; the template prints prompts, so it stops
            // before it.
            let segs = render_segments(RendererName::RoleColon, None, &conv, gen).unwrap();
            let printed: String = segs
                .iter()
                .filter(|s| s.kind != ringtune_data::render::SegmentKind::StopOverlap)
                .map(|s| s.text.as_str())
                .collect();
            assert_eq!(printed, jinja(ROLE_COLON_TEMPLATE, &conv, "", gen));
        }
    }
}

#[test]
fn python_strip_matches_python_whitespace() {
    assert_eq!(python_strip("\u{1c}\u{1f} x \u{a0}\u{3000}\n"), "x");
    assert_eq!(python_strip("\u{200b}x"), "\u{200b}x"); // zero-width space is not whitespace
}

// ---- Tokens and weights ------------------------------------------------------

fn spans(name: RendererName, specials: &[&str], conv: &[Message], on: TrainOnWhat) -> Vec<String> {
    let tok = byte_tokenizer(specials, None, None);
    let r = Renderer::new(name, &tok).unwrap();
    let d = r.build_supervised_example(conv, on).unwrap();
    assert_eq!(d.tokens.len(), d.weights.len());
    // The tokens spell exactly the rendered text.
    assert_eq!(
        tok.decode(&d.tokens, false).unwrap(),
        r.render_text(conv, false).unwrap()
    );
    weighted_spans(&tok, &d.tokens, &d.weights)
}

#[test]
fn llama3_weights_mark_assistant_content_and_eot() {
    let conv = multi_turn_with_system();
    let s = |on| spans(RendererName::Llama3, &LLAMA3_SPECIALS, &conv, on);
    assert_eq!(
        s(TrainOnWhat::AllAssistantMessages),
        vec!["Hello.<|eot_id|>", "4<|eot_id|>"]
    );
    assert_eq!(s(TrainOnWhat::LastAssistantMessage), vec!["4<|eot_id|>"]);
    assert_eq!(
        s(TrainOnWhat::AllMessages),
        vec![
            "You are terse.<|eot_id|>",
            "Hi!<|eot_id|>",
            "Hello.<|eot_id|>",
            "What is 2+2?<|eot_id|>",
            "4<|eot_id|>"
        ]
    );
    let all = s(TrainOnWhat::AllTokens);
    let full = text(RendererName::Llama3, None, &conv, false);
    assert_eq!(
        all,
        vec![full.strip_prefix("<|begin_of_text|>").unwrap().to_string()]
    );
}

#[test]
fn qwen_weights_mark_assistant_content_and_im_end_not_the_newline() {
    let conv = multi_turn_no_system();
    let s = |on| spans(RendererName::Qwen, &QWEN_SPECIALS, &conv, on);
    assert_eq!(
        s(TrainOnWhat::AllAssistantMessages),
        vec!["Blue.<|im_end|>", " Green. <|im_end|>"]
    );
    assert_eq!(
        s(TrainOnWhat::LastAssistantMessage),
        vec![" Green. <|im_end|>"]
    );
    // The default system prompt counts as a message.
    assert_eq!(
        s(TrainOnWhat::AllMessages)[0],
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>"
    );
    let full = text(RendererName::Qwen, None, &conv, false);
    // Qwen has no BOS, so with all_tokens everything is weighted.
    assert_eq!(s(TrainOnWhat::AllTokens), vec![full]);
}

#[test]
fn role_colon_weights_include_the_stop_overlap() {
    let conv = multi_turn_no_system();
    let s = |on| spans(RendererName::RoleColon, &[], &conv, on);
    assert_eq!(
        s(TrainOnWhat::AllAssistantMessages),
        vec![" Blue.\n\n", "  Green. \n\nUser:"]
    );
    assert_eq!(
        s(TrainOnWhat::LastAssistantMessage),
        vec!["  Green. \n\nUser:"]
    );
}

#[test]
fn last_assistant_message_is_the_last_one_even_if_a_user_turn_follows() {
    let mut conv = multi_turn_no_system();
    conv.push(m(Role::User, "Thanks"));
    let got = spans(
        RendererName::Qwen,
        &QWEN_SPECIALS,
        &conv,
        TrainOnWhat::LastAssistantMessage,
    );
    assert_eq!(got, vec![" Green. <|im_end|>"]);
}

#[test]
fn bos_is_never_weighted_and_generation_prompt_ends_with_the_assistant_header() {
    let tok = byte_tokenizer(
        &LLAMA3_SPECIALS,
        Some("<|begin_of_text|>"),
        Some("<|eot_id|>"),
    );
    let r = Renderer::new(RendererName::Llama3, &tok).unwrap();
    let d = r
        .build_supervised_example(&multi_turn_with_system(), TrainOnWhat::AllTokens)
        .unwrap();
    assert_eq!(d.tokens[0], tok.token_id("<|begin_of_text|>").unwrap());
    assert_eq!(d.weights[0], 0.0);
    assert!(d.weights[1..].iter().all(|&w| w == 1.0));

    let p = r
        .build_generation_prompt(&multi_turn_with_system()[..2])
        .unwrap();
    assert!(tok
        .decode(&p, false)
        .unwrap()
        .ends_with("Hi!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"));
    assert!(r
        .stop_condition()
        .token_ids
        .contains(&tok.token_id("<|eot_id|>").unwrap()));
}

#[test]
fn special_tokens_are_single_tokens_in_the_encoding() {
    let tok = byte_tokenizer(&QWEN_SPECIALS, None, None);
    let r = Renderer::new(RendererName::Qwen, &tok).unwrap();
    let d = r
        .build_supervised_example(&multi_turn_with_system(), TrainOnWhat::AllAssistantMessages)
        .unwrap();
    let im_end = tok.token_id("<|im_end|>").unwrap();
    assert_eq!(d.tokens.iter().filter(|&&t| t == im_end).count(), 5);
}

// ---- Errors ------------------------------------------------------------------

#[test]
fn renderer_refuses_a_tokenizer_without_its_special_tokens() {
    let tok = byte_tokenizer(&QWEN_SPECIALS, None, None);
    let err = Renderer::new(RendererName::Llama3, &tok).unwrap_err();
    match &err {
        Error::MissingSpecialToken {
            renderer, token, ..
        } => {
            assert_eq!(*renderer, "llama3");
            assert_eq!(token, "<|begin_of_text|>");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("<|begin_of_text|>"), "{err}");
}

#[test]
fn empty_conversation_is_an_error() {
    let err = render_segments(RendererName::Qwen, None, &[], false).unwrap_err();
    assert!(err.to_string().contains("no messages"), "{err}");
}

#[test]
fn names_parse_and_unknown_names_list_the_allowed_ones() {
    assert_eq!("qwen".parse::<RendererName>().unwrap(), RendererName::Qwen);
    assert_eq!(
        "last_assistant_message".parse::<TrainOnWhat>().unwrap(),
        TrainOnWhat::LastAssistantMessage
    );
    let err = "chatml".parse::<RendererName>().unwrap_err().to_string();
    assert!(err.contains("role_colon, llama3, qwen"), "{err}");
    let err = "assistant".parse::<TrainOnWhat>().unwrap_err().to_string();
    assert!(err.contains("all_assistant_messages"), "{err}");
    assert_eq!(TrainOnWhat::default(), TrainOnWhat::AllAssistantMessages);
}

#[test]
fn detect_renderer_from_templates() {
    assert_eq!(
        RendererName::detect(LLAMA3_TEMPLATE),
        Some(RendererName::Llama3)
    );
    assert_eq!(
        RendererName::detect(QWEN25_TEMPLATE),
        Some(RendererName::Qwen)
    );
    assert_eq!(RendererName::detect("{{ messages }}"), None);
}
