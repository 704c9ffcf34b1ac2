//! Sampling with the kv cache: cached logits equal the full forward's at every position
//! (rows of different lengths in one batch, adapters on with B ≠ 0 and off, every
//! architecture), greedy is the full forward's argmax, seeds reproduce, stop conditions end
//! rows where they should, prompt logprobs match, and bad requests are named errors.

use std::path::{Path, PathBuf};

use ringtune_model::{
    set_force_generic, Adapters, DType, Device, LoraConfig, LoraModel, ModelConfig, RopeScaling,
    Sample, SamplingParams, StopReason, Tensor,
};

fn arch_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/archs")
        .join(name)
}

/// Every target (lm_head included) with random, nonzero A and B.
fn with_random_adapters(model: LoraModel, seed: u64) -> LoraModel {
    let n = model.params_flat().unwrap().len();
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let flat: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.4
        })
        .collect();
    model.set_params_flat(&flat).unwrap();
    model
}

fn lora() -> LoraConfig {
    LoraConfig::from_tinker(4, true, true, true)
}

fn load_arch(name: &str) -> LoraModel {
    let m = LoraModel::load(&arch_dir(name), &lora(), &Device::Cpu, DType::F32, 3).unwrap();
    with_random_adapters(m, 11)
}

/// The llama3 fixture's shape with Llama 3.1 rope scaling, random weights.
fn llama3_scaled() -> LoraModel {
    let mut cfg = ModelConfig::from_file(arch_dir("llama3").join("config.json")).unwrap();
    cfg.rope_scaling = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8,
    };
    let m = LoraModel::random(&cfg, &lora(), &Device::Cpu, 5, 6).unwrap();
    with_random_adapters(m, 12)
}

fn prompt(len: usize, salt: u32, vocab: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 37 + salt * 11 + 5) % vocab as u32)
        .collect()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    let d = t.dims().to_vec();
    t.reshape((d[0] * d[1], d[2]))
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// max |a − b| / max |b|.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max);
    let n = b.iter().map(|y| y.abs() as f64).fold(0.0, f64::max);
    d / n.max(1e-30)
}

/// Rows of lengths `lens` are left-padded together; the first `lens[b] − decode` tokens
/// of each go in one prefill call, the last `decode` one slot at a time. Every real
/// position's logits must equal the row's own full forward (no padding, no cache).
fn check_cache_matches_full(model: &LoraModel, lens: &[usize], decode: usize, what: &str) {
    let vocab = model.config().vocab_size;
    let prompts: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| prompt(l, i as u32, vocab))
        .collect();
    for adapters in [Adapters::On, Adapters::Off] {
        let pre: Vec<usize> = lens.iter().map(|l| l - decode).collect();
        let pmax = *pre.iter().max().unwrap();
        let start: Vec<usize> = pre.iter().map(|p| pmax - p).collect();
        // Capacity 1: the cache has to grow on the prefill and on decode steps.
        let mut cache = model.new_kv_cache(start.clone(), 1).unwrap();
        let mut ids = Vec::new();
        for (p, &s) in prompts.iter().zip(&start) {
            ids.extend(std::iter::repeat_n(0u32, s));
            ids.extend_from_slice(&p[..pmax - s]);
        }
        let ids = Tensor::from_vec(ids, (lens.len(), pmax), &Device::Cpu).unwrap();
        let mut got = vec![Vec::new(); lens.len()];
        let l = rows(
            &model
                .forward_cached(&ids, &mut cache, adapters, false)
                .unwrap(),
        );
        for b in 0..lens.len() {
            for slot in start[b]..pmax {
                got[b].push(l[b * pmax + slot].clone());
            }
        }
        for step in 0..decode {
            let ids: Vec<u32> = prompts
                .iter()
                .zip(&pre)
                .map(|(p, &n)| p[n + step])
                .collect();
            let ids = Tensor::from_vec(ids, (lens.len(), 1), &Device::Cpu).unwrap();
            let l = rows(
                &model
                    .forward_cached(&ids, &mut cache, adapters, false)
                    .unwrap(),
            );
            for b in 0..lens.len() {
                got[b].push(l[b].clone());
            }
        }
        for (b, p) in prompts.iter().enumerate() {
            let ids = Tensor::from_vec(p.clone(), (1, p.len()), &Device::Cpu).unwrap();
            let full = rows(&model.forward_with(&ids, None, adapters).unwrap());
            assert_eq!(got[b].len(), full.len());
            for (pos, (g, f)) in got[b].iter().zip(&full).enumerate() {
                let e = rel(g, f);
                assert!(
                    e <= 1e-5,
                    "{what} {adapters:?}: row {b} position {pos}: relative error {e:.2e}"
                );
            }
        }
    }
}

#[test]
fn cached_logits_equal_the_full_forward_at_every_position() {
    // Mistral's window is 5, so 12 positions cross it; qwen2 has biases, qwen3 q/k norms
    // and a tied lm_head.
    for name in ["llama3", "mistral", "qwen2", "qwen3"] {
        check_cache_matches_full(&load_arch(name), &[4, 12, 7], 3, name);
    }
    check_cache_matches_full(&llama3_scaled(), &[20, 9], 6, "llama3 rope scaling");
}

#[test]
fn the_generic_path_gives_the_same_cached_logits() {
    // With the CPU kernels switched off (what other devices run), the decode path's
    // few-row linear layers fall back to LoraLinear::forward: same numbers.
    set_force_generic(true);
    check_cache_matches_full(&load_arch("qwen2"), &[3, 8], 3, "qwen2 generic");
    set_force_generic(false);
}

#[test]
fn adapters_change_the_cached_logits() {
    // Guards the test above: with B ≠ 0, on and off must differ.
    let model = load_arch("qwen2");
    let p = prompt(5, 0, model.config().vocab_size);
    let ids = Tensor::from_vec(p, (1, 5), &Device::Cpu).unwrap();
    let mut c1 = model.new_kv_cache(vec![0], 5).unwrap();
    let mut c2 = model.new_kv_cache(vec![0], 5).unwrap();
    let on = rows(
        &model
            .forward_cached(&ids, &mut c1, Adapters::On, true)
            .unwrap(),
    );
    let off = rows(
        &model
            .forward_cached(&ids, &mut c2, Adapters::Off, true)
            .unwrap(),
    );
    assert!(rel(&on[0], &off[0]) > 1e-3);
}

fn no_stop() -> impl FnMut(usize, &[u32]) -> bool {
    |_, _| false
}

fn sample(
    model: &LoraModel,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    adapters: Adapters,
) -> Vec<Sample> {
    model
        .sample(prompts, params, adapters, &mut no_stop())
        .unwrap()
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
    row.iter().map(|&v| v as f64 - m - z.ln()).collect()
}

#[test]
fn greedy_is_the_argmax_of_the_full_forward() {
    for name in ["llama3", "qwen3"] {
        let model = load_arch(name);
        let vocab = model.config().vocab_size;
        let prompts = vec![prompt(3, 1, vocab), prompt(8, 2, vocab)];
        for adapters in [Adapters::On, Adapters::Off] {
            let params = SamplingParams {
                max_tokens: 10,
                temperature: 0.0,
                ..Default::default()
            };
            let out = sample(&model, &prompts, &params, adapters);
            for (p, s) in prompts.iter().zip(&out) {
                assert_eq!(s.tokens.len(), 10);
                assert_eq!(s.stop_reason, StopReason::MaxTokens);
                let all: Vec<u32> = p.iter().chain(&s.tokens).copied().collect();
                let ids = Tensor::from_vec(all.clone(), (1, all.len()), &Device::Cpu).unwrap();
                let full = rows(&model.forward_with(&ids, None, adapters).unwrap());
                for (i, (&tok, &lp)) in s.tokens.iter().zip(&s.logprobs).enumerate() {
                    let row = &full[p.len() - 1 + i];
                    let ls = log_softmax(row);
                    let best = (0..vocab)
                        .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
                        .unwrap();
                    assert_eq!(tok as usize, best, "{name} {adapters:?} step {i}");
                    assert!((lp as f64 - ls[best]).abs() < 1e-4, "{lp} vs {}", ls[best]);
                }
            }
        }
    }
}

#[test]
fn seeds_reproduce_and_rows_get_their_own_streams() {
    let model = load_arch("llama3");
    let vocab = model.config().vocab_size;
    let p = prompt(4, 3, vocab);
    let group = vec![p.clone(), p.clone(), p.clone(), p.clone()];
    let params = SamplingParams {
        max_tokens: 12,
        temperature: 1.0,
        seed: 42,
        ..Default::default()
    };
    let a = sample(&model, &group, &params, Adapters::On);
    let b = sample(&model, &group, &params, Adapters::On);
    assert_eq!(a, b, "the same seed gave different samples");
    let distinct: std::collections::BTreeSet<&Vec<u32>> = a.iter().map(|s| &s.tokens).collect();
    assert!(distinct.len() > 1, "repeated prompts got identical samples");
    let c = sample(
        &model,
        &group,
        &SamplingParams {
            seed: 43,
            ..params.clone()
        },
        Adapters::On,
    );
    assert_ne!(a, c, "different seeds gave identical samples");
    // Row 0's sample does not depend on the other rows (padding, batch size, finishing).
    let alone = sample(&model, &group[..1], &params, Adapters::On);
    let mixed = sample(
        &model,
        &[p.clone(), prompt(11, 9, vocab), prompt(2, 4, vocab)],
        &params,
        Adapters::On,
    );
    assert_eq!(alone[0].tokens, a[0].tokens);
    // A batch split in two calls with sample_rows draws what the one call drew.
    let tail = model
        .sample_rows(&group[2..], 2, &params, Adapters::On, &mut no_stop())
        .unwrap();
    for (x, y) in tail.iter().zip(&a[2..]) {
        assert_eq!(x.tokens, y.tokens);
        for (p, q) in x.logprobs.iter().zip(&y.logprobs) {
            assert!((p - q).abs() < 1e-5);
        }
    }
    assert_eq!(mixed[0].tokens, a[0].tokens);
    for (x, y) in mixed[0].logprobs.iter().zip(&a[0].logprobs) {
        assert!((x - y).abs() < 1e-5);
    }
}

#[test]
fn sampled_logprobs_are_the_models_at_temperature_one() {
    let model = load_arch("mistral");
    let vocab = model.config().vocab_size;
    let prompts = vec![prompt(6, 0, vocab), prompt(2, 1, vocab)];
    let params = SamplingParams {
        max_tokens: 9,
        seed: 3,
        ..Default::default()
    };
    let out = sample(&model, &prompts, &params, Adapters::On);
    let seqs: Vec<Vec<u32>> = prompts
        .iter()
        .zip(&out)
        .map(|(p, s)| p.iter().chain(&s.tokens).copied().collect())
        .collect();
    let lps = model.prompt_logprobs(&seqs, Adapters::On).unwrap();
    for ((p, s), lp) in prompts.iter().zip(&out).zip(&lps) {
        assert_eq!(lp.len(), p.len() + s.tokens.len());
        assert_eq!(lp[0], None);
        for (i, &x) in s.logprobs.iter().enumerate() {
            let y = lp[p.len() + i].unwrap();
            assert!(
                (x - y).abs() < 1e-4,
                "step {i}: sampler {x} vs recomputed {y}"
            );
        }
    }
}

#[test]
fn prompt_logprobs_match_the_full_forward() {
    let model = load_arch("qwen3");
    let vocab = model.config().vocab_size;
    // 150 positions: more than one chunk of the kv-cache walk.
    let seqs = vec![
        prompt(150, 2, vocab),
        prompt(1, 0, vocab),
        prompt(5, 7, vocab),
    ];
    for adapters in [Adapters::On, Adapters::Off] {
        let lps = model.prompt_logprobs(&seqs, adapters).unwrap();
        for (s, lp) in seqs.iter().zip(&lps) {
            assert_eq!(lp.len(), s.len());
            assert_eq!(lp[0], None);
            let ids = Tensor::from_vec(s.clone(), (1, s.len()), &Device::Cpu).unwrap();
            let full = rows(&model.forward_with(&ids, None, adapters).unwrap());
            for i in 1..s.len() {
                let want = log_softmax(&full[i - 1])[s[i] as usize];
                let got = lp[i].unwrap() as f64;
                assert!((got - want).abs() < 1e-4, "position {i}: {got} vs {want}");
            }
        }
    }
}

#[test]
fn stop_tokens_max_tokens_and_the_hook_end_rows() {
    let model = load_arch("qwen2");
    let vocab = model.config().vocab_size;
    let prompts = vec![
        prompt(3, 5, vocab),
        prompt(6, 6, vocab),
        prompt(4, 8, vocab),
    ];
    let greedy = SamplingParams {
        max_tokens: 8,
        temperature: 0.0,
        ..Default::default()
    };
    let free = sample(&model, &prompts, &greedy, Adapters::On);
    // Stop on row 0's 3rd greedy token: row 0 ends right there, the stop token included.
    let stop_tok = free[0].tokens[2];
    let stopped = sample(
        &model,
        &prompts,
        &SamplingParams {
            stop_token_ids: vec![stop_tok],
            ..greedy.clone()
        },
        Adapters::On,
    );
    for (f, s) in free.iter().zip(&stopped) {
        match f.tokens.iter().position(|&t| t == stop_tok) {
            Some(i) => {
                assert_eq!(s.tokens, f.tokens[..=i]);
                assert_eq!(s.stop_reason, StopReason::StopToken);
            }
            None => {
                assert_eq!(s.tokens, f.tokens);
                assert_eq!(s.stop_reason, StopReason::MaxTokens);
            }
        }
    }
    assert!(stopped[0].tokens.len() <= 3);
    // max_tokens.
    let short = sample(
        &model,
        &prompts,
        &SamplingParams {
            max_tokens: 2,
            ..greedy.clone()
        },
        Adapters::On,
    );
    for (f, s) in free.iter().zip(&short) {
        assert_eq!(s.tokens, f.tokens[..2]);
        assert_eq!(s.stop_reason, StopReason::MaxTokens);
    }
    // The hook: row 1 stops after 4 tokens, the others run on; it sees each row's tokens.
    let mut calls = vec![0usize; 3];
    let mut hook = |row: usize, toks: &[u32]| {
        calls[row] += 1;
        assert_eq!(toks, &free[row].tokens[..toks.len()]);
        row == 1 && toks.len() == 4
    };
    let hooked = model
        .sample(&prompts, &greedy, Adapters::On, &mut hook)
        .unwrap();
    assert_eq!(hooked[1].tokens, free[1].tokens[..4]);
    assert_eq!(hooked[1].stop_reason, StopReason::StopHook);
    assert_eq!(hooked[0], free[0]);
    assert_eq!(hooked[2], free[2]);
    assert_eq!(calls, vec![8, 4, 8]);
    // Nothing to do.
    let none = sample(
        &model,
        &prompts,
        &SamplingParams {
            max_tokens: 0,
            ..greedy
        },
        Adapters::On,
    );
    assert!(none.iter().all(|s| s.tokens.is_empty()));
}

#[test]
fn bad_requests_are_named_errors() {
    let model = load_arch("llama3");
    let vocab = model.config().vocab_size as u32;
    let p = SamplingParams::default();
    let e = model
        .sample(&[vec![1, 2], vec![]], &p, Adapters::On, &mut no_stop())
        .unwrap_err()
        .to_string();
    assert!(e.contains("prompt 1") && e.contains("empty"), "{e}");
    let e = model
        .sample(&[vec![1, vocab + 3]], &p, Adapters::On, &mut no_stop())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("prompt 0, position 1") && e.contains("vocabulary"),
        "{e}"
    );
    let e = model
        .prompt_logprobs(&[vec![vocab]], Adapters::Off)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sequence 0"), "{e}");
    let e = model
        .sample(
            &[vec![1]],
            &SamplingParams { top_p: 2.0, ..p },
            Adapters::On,
            &mut no_stop(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("top_p"), "{e}");
}

#[test]
fn long_samples_grow_the_cache_and_stay_exact() {
    // 300 new tokens: past the 256 slots sample() reserves up front.
    let model = load_arch("qwen3");
    let vocab = model.config().vocab_size;
    let p = prompt(5, 1, vocab);
    let params = SamplingParams {
        max_tokens: 300,
        seed: 9,
        ..Default::default()
    };
    let s = &sample(&model, std::slice::from_ref(&p), &params, Adapters::On)[0];
    assert_eq!(s.tokens.len(), 300);
    assert_eq!(s.stop_reason, StopReason::MaxTokens);
    let all: Vec<u32> = p.iter().chain(&s.tokens).copied().collect();
    let lp = &model.prompt_logprobs(&[all], Adapters::On).unwrap()[0];
    for (i, &x) in s.logprobs.iter().enumerate() {
        let y = lp[p.len() + i].unwrap();
        assert!(
            (x - y).abs() < 1e-4,
            "step {i}: sampler {x} vs recomputed {y}"
        );
    }
}
