//! Behaviour of the model core beyond the PyTorch parity run: the other architectures
//! against transformers, B = 0, merge, finite differences, PEFT round trips, padding,
//! the generic (non-CPU) code path, exact resume, and every bad input's named error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ringtune_model::io::{read_safetensors, write_safetensors_atomic, NamedTensors};
use ringtune_model::peft::read_adapter_tensors;
use ringtune_model::{
    merge_with, set_force_generic, AdamW, AdamWConfig, Adapters, Batch, DType, Device, Error,
    Gradients, LoraConfig, LoraModel, LossKind, MergeOptions, ModelConfig, Tensor,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tiny() -> PathBuf {
    fixtures().join("llama-tiny")
}

fn vec_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (vec_f32(a), vec_f32(b));
    let d: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    if n == 0.0 {
        d
    } else {
        d / n
    }
}

fn all_targets(rank: usize) -> LoraConfig {
    LoraConfig {
        alpha: 16.0,
        ..LoraConfig::from_tinker(rank, true, true, true)
    }
}

/// The reference adapter after two steps (B ≠ 0) on the llama-tiny base.
fn trained_tiny() -> LoraModel {
    LoraModel::load_with_adapter(
        &tiny().join("base"),
        &tiny().join("adapter_step2"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

fn ref_batch() -> Batch {
    let (t, _) = read_safetensors(&tiny().join("batch.safetensors")).unwrap();
    let t: BTreeMap<_, _> = t.into_iter().collect();
    let ids = &t["input_ids"];
    let (rows, n) = ids.dims2().unwrap();
    let ids: Vec<u32> = ids
        .to_dtype(DType::U32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    Batch::from_dense_tokens(rows, n, &ids, &vec_f32(&t["loss_weights"])).unwrap()
}

fn ids_tensor(b: &Batch) -> Tensor {
    b.input_tensor(&Device::Cpu).unwrap()
}

#[test]
fn other_architectures_match_transformers_logits() {
    for name in ["llama3", "mistral", "qwen2", "qwen3"] {
        let dir = fixtures().join("archs").join(name);
        let cfg = ModelConfig::from_file(dir.join("config.json")).unwrap();
        let model = LoraModel::load(
            &dir,
            &LoraConfig::from_tinker(4, true, true, false),
            &Device::Cpu,
            DType::F32,
            0,
        )
        .unwrap();
        let (t, _) = read_safetensors(&dir.join("logits.safetensors")).unwrap();
        let t: BTreeMap<_, _> = t.into_iter().collect();
        let ids = t["input_ids"].to_dtype(DType::U32).unwrap();
        let logits = model.forward(&ids, None).unwrap();
        let e = rel_err(&logits, &t["logits"]);
        assert!(
            e < 1e-5,
            "{name} ({:?}): logits relative error {e:.2e}",
            cfg.architecture
        );
        // And through the device-independent path that other backends take.
        set_force_generic(true);
        let g = model.forward(&ids, None).unwrap();
        set_force_generic(false);
        let e = rel_err(&g, &t["logits"]);
        assert!(
            e < 1e-5,
            "{name}: generic-path logits relative error {e:.2e}"
        );
    }
}

#[test]
fn zero_b_gives_exactly_the_base_logits() {
    // Fresh adapters: A random, B zero.
    let model = LoraModel::load(
        &tiny().join("base"),
        &all_targets(8),
        &Device::Cpu,
        DType::F32,
        7,
    )
    .unwrap();
    let a = model.adapter_tensors();
    assert!(a
        .iter()
        .any(|(k, t)| k.ends_with("lora_A.weight") && vec_f32(t).iter().any(|&v| v != 0.0)));
    let ids = ids_tensor(&ref_batch());
    let on = vec_f32(&model.forward_with(&ids, None, Adapters::On).unwrap());
    let off = vec_f32(&model.forward_with(&ids, None, Adapters::Off).unwrap());
    assert!(
        on.iter().zip(&off).all(|(x, y)| x.to_bits() == y.to_bits()),
        "B = 0 must not change a single bit"
    );
    // Sanity: a trained adapter does change them.
    let trained = trained_tiny();
    let on2 = vec_f32(&trained.forward_with(&ids, None, Adapters::On).unwrap());
    assert!(on2.iter().zip(&off).any(|(x, y)| x != y));
    let off2 = vec_f32(&trained.forward_with(&ids, None, Adapters::Off).unwrap());
    assert_eq!(off, off2, "adapters off is the base model");
}

#[test]
fn merged_model_matches_the_adapter_forward_single_and_sharded() {
    let model = trained_tiny();
    let ids = ids_tensor(&ref_batch());
    let want = model.forward(&ids, None).unwrap();
    for (max_shard, shards) in [(u64::MAX, 1), (200_000, 5)] {
        let out = tempfile::tempdir().unwrap();
        let rep = merge_with(
            &tiny().join("base"),
            &tiny().join("adapter_step2"),
            out.path(),
            &MergeOptions {
                max_shard_bytes: max_shard,
            },
        )
        .unwrap();
        assert_eq!(rep.merged_tensors, 15);
        assert!(
            rep.shards >= shards.min(2) && (shards > 1 || rep.shards == 1),
            "{rep:?}"
        );
        if rep.shards > 1 {
            assert!(out.path().join("model.safetensors.index.json").is_file());
        }
        let merged =
            LoraModel::load(out.path(), &all_targets(8), &Device::Cpu, DType::F32, 0).unwrap();
        let got = merged.forward_with(&ids, None, Adapters::Off).unwrap();
        let e = rel_err(&got, &want);
        assert!(e <= 1e-5, "merged vs adapter forward: {e:.2e}");
    }
}

#[test]
fn merge_of_a_tied_lm_head_unties_it() {
    let dir = fixtures().join("archs/qwen3");
    let model = LoraModel::load(&dir, &all_targets(4), &Device::Cpu, DType::F32, 3).unwrap();
    // Give B values so the merge changes something.
    let flat: Vec<f32> = (0..model.param_layout().numel())
        .map(|i| ((i * 7919 % 13) as f32 - 6.0) * 1e-3)
        .collect();
    model.set_params_flat(&flat).unwrap();
    let ad = tempfile::tempdir().unwrap();
    model.save_adapter(ad.path()).unwrap();
    let out = tempfile::tempdir().unwrap();
    merge_with(&dir, ad.path(), out.path(), &MergeOptions::default()).unwrap();
    let cfg = ModelConfig::from_file(out.path().join("config.json")).unwrap();
    assert!(!cfg.tie_word_embeddings);
    let merged = LoraModel::load(out.path(), &all_targets(4), &Device::Cpu, DType::F32, 0).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 14, 3, 7]], &Device::Cpu).unwrap();
    let e = rel_err(
        &merged.forward_with(&ids, None, Adapters::Off).unwrap(),
        &model.forward(&ids, None).unwrap(),
    );
    assert!(e <= 1e-5, "{e:.2e}");
}

#[test]
fn gradients_agree_with_finite_differences() {
    let model = trained_tiny();
    let batch = ref_batch();
    let (_, grads) = model
        .forward_backward(&batch, LossKind::CrossEntropy)
        .unwrap();
    let base = model.params_flat().unwrap();
    let layout = model.param_layout().clone();
    let flat_g = grads.to_flat().unwrap();
    // The largest-gradient coordinate of a few tensors, A and B, attention, MLP and head.
    let mut checked = 0;
    let mut offset = 0;
    for (key, shape) in layout.entries() {
        let n: usize = shape.iter().product();
        let pick = key.contains("layers.0.self_attn.q_proj")
            || key.contains("layers.1.mlp.down_proj")
            || key.contains("lm_head");
        if pick {
            let (i, g) = flat_g[offset..offset + n]
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                .unwrap();
            let eps = 1e-2f32;
            let loss_at = |d: f32| {
                let mut p = base.clone();
                p[offset + i] += d;
                model.set_params_flat(&p).unwrap();
                model
                    .logprobs(&batch, LossKind::CrossEntropy, Adapters::On)
                    .unwrap()
                    .loss_sum
            };
            let fd = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps as f64);
            let rel = (fd - *g as f64).abs() / (g.abs() as f64);
            assert!(
                rel < 2e-2,
                "{key}[{i}]: analytic {g} vs finite difference {fd} (rel {rel:.2e})"
            );
            checked += 1;
        }
        offset += n;
    }
    model.set_params_flat(&base).unwrap();
    assert_eq!(checked, 6);
}

#[test]
fn peft_save_load_round_trips_bit_exactly() {
    let model = trained_tiny();
    let dir = tempfile::tempdir().unwrap();
    model.save_adapter(dir.path()).unwrap();
    // Same bits as the PEFT file it came from.
    let theirs = read_adapter_tensors(&tiny().join("adapter_step2")).unwrap();
    let ours = read_adapter_tensors(dir.path()).unwrap();
    assert_eq!(
        theirs.keys().collect::<Vec<_>>(),
        ours.keys().collect::<Vec<_>>()
    );
    for (k, t) in &theirs {
        let (a, b) = (vec_f32(t), vec_f32(&ours[k]));
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{k} changed"
        );
    }
    // The config PEFT and vLLM read.
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["lora_alpha"], 16.0);
    assert_eq!(cfg["bias"], "none");
    assert_eq!(cfg["fan_in_fan_out"], false);
    assert_eq!(cfg["use_rslora"], false);
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 8);
    // Load into a fresh model: identical bits again.
    let fresh = LoraModel::load(
        &tiny().join("base"),
        &all_targets(8),
        &Device::Cpu,
        DType::F32,
        99,
    )
    .unwrap();
    fresh.load_adapter(dir.path()).unwrap();
    assert_eq!(
        fresh.params_fingerprint().unwrap(),
        model.params_fingerprint().unwrap()
    );
    assert_eq!(fresh.params_flat().unwrap(), model.params_flat().unwrap());
}

#[test]
fn padding_never_changes_the_real_tokens() {
    let model = trained_tiny();
    let rows: Vec<Vec<u32>> = vec![
        (0..9).map(|i| (i * 37 + 5) % 1024).collect(),
        (0..21).map(|i| (i * 101 + 11) % 1024).collect(),
    ];
    let weights: Vec<Vec<f32>> = rows
        .iter()
        .map(|r| {
            (0..r.len())
                .map(|i| if i % 3 == 0 { 0.0 } else { 1.0 })
                .collect()
        })
        .collect();
    let padded = Batch::from_token_rows(&rows, &weights, 0).unwrap();
    assert_eq!(padded.seq(), 20);
    let (all, g_all) = model
        .forward_backward(&padded, LossKind::CrossEntropy)
        .unwrap();
    let mut loss = 0.0;
    let mut g_sum: Option<Gradients> = None;
    for (b, (r, w)) in rows.iter().zip(&weights).enumerate() {
        let one =
            Batch::from_token_rows(std::slice::from_ref(r), std::slice::from_ref(w), 0).unwrap();
        let (o, g) = model
            .forward_backward(&one, LossKind::CrossEntropy)
            .unwrap();
        for t in 0..one.seq() {
            let (x, y) = (o.logprobs[t], all.logprobs[b * padded.seq() + t]);
            assert!(
                (x - y).abs() <= 1e-5 * x.abs().max(1.0),
                "row {b} position {t}: {x} vs {y}"
            );
        }
        for t in one.seq()..padded.seq() {
            assert_eq!(
                all.logprobs[b * padded.seq() + t],
                0.0,
                "padding logprob is 0"
            );
        }
        loss += o.loss_sum;
        match &mut g_sum {
            None => g_sum = Some(g),
            Some(acc) => acc.add_assign(&g).unwrap(),
        }
    }
    assert!((loss - all.loss_sum).abs() <= 1e-5 * loss.abs());
    assert_eq!(all.tokens, 8 + 20);
    for ((k, a), (_, b)) in g_all.tensors().iter().zip(g_sum.unwrap().tensors()) {
        let e = rel_err(a, b);
        assert!(e <= 1e-5, "{k}: {e:.2e}");
    }
}

#[test]
fn generic_path_matches_the_cpu_kernels() {
    assert_generic_matches(&trained_tiny(), &ref_batch(), "llama-tiny");
}

/// The CPU kernels' loss and LoRA gradients against the generic compositions' (relative
/// error ≤ 1e-6 on the loss, ≤ 1e-5 normwise per gradient).
fn assert_generic_matches(model: &LoraModel, batch: &Batch, what: &str) {
    let (fast, gf) = model
        .forward_backward(batch, LossKind::CrossEntropy)
        .unwrap();
    set_force_generic(true);
    let slow = model.forward_backward(batch, LossKind::CrossEntropy);
    set_force_generic(false);
    let (slow, gs) = slow.unwrap();
    let rel = ((fast.loss_sum - slow.loss_sum) / slow.loss_sum).abs();
    assert!(rel < 1e-6, "{what}: loss relative error {rel:.2e}");
    for ((k, a), (_, b)) in gf.tensors().iter().zip(gs.tensors()) {
        let e = rel_err(a, b);
        assert!(e <= 1e-5, "{what}: {k}: {e:.2e}");
    }
}

/// A random-init model of `cfg` whose adapters are all non-zero (B ≠ 0 as well), so that
/// every LoRA gradient is non-trivial.
fn random_with_adapters(cfg: &ModelConfig, lora: &LoraConfig) -> LoraModel {
    let model = LoraModel::random(cfg, lora, &Device::Cpu, 3, 4).unwrap();
    let flat: Vec<f32> = (0..model.param_layout().numel())
        .map(|i| ((i as f32 * 0.37).sin()) * 0.05)
        .collect();
    model.set_params_flat(&flat).unwrap();
    model
}

/// The CPU attention op computes only the key blocks each block of 64 queries can see;
/// check it against the generic composition (full score matrices) where that matters:
/// sequences over several blocks and not a multiple of 64, ragged rows, grouped-query
/// heads, a sliding window, left padding through an attention mask, and adapters with
/// B ≠ 0 so that every gradient is non-trivial.
#[test]
fn cpu_attention_op_matches_the_generic_composition_on_long_ragged_rows() {
    let dir = fixtures().join("archs").join("mistral");
    for window in [None, Some(5), Some(70)] {
        let mut cfg = ModelConfig::from_file(dir.join("config.json")).unwrap();
        cfg.max_position_embeddings = 256;
        cfg.sliding_windows = vec![window; cfg.num_hidden_layers];
        let model = random_with_adapters(&cfg, &all_targets(4));
        let v = cfg.vocab_size as u32;
        let rows: Vec<Vec<u32>> = [151usize, 97, 130]
            .iter()
            .enumerate()
            .map(|(r, &n)| (0..n as u32).map(|i| (i * 7 + r as u32 * 13) % v).collect())
            .collect();
        let weights: Vec<Vec<f32>> = rows
            .iter()
            .map(|r| (0..r.len()).map(|i| (i % 3) as f32 * 0.5).collect())
            .collect();
        let batch = Batch::from_token_rows(&rows, &weights, 0).unwrap();
        assert_generic_matches(&model, &batch, &format!("window {window:?}"));
        // Left padding through an attention mask (the sampling path's key mask).
        let (b, t) = (2, 140);
        let ids: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 11) % v).collect();
        let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
        let mask: Vec<f32> = (0..b * t)
            .map(|i| if i / t == 1 && i % t < 75 { 0.0 } else { 1.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (b, t), &Device::Cpu).unwrap();
        let fast = model.forward(&ids, Some(&mask)).unwrap();
        set_force_generic(true);
        let slow = model.forward(&ids, Some(&mask));
        set_force_generic(false);
        let e = rel_err(&fast, &slow.unwrap());
        assert!(e <= 1e-5, "window {window:?}: masked logits {e:.2e}");
    }
}

/// Activation checkpointing recomputes every layer in the backward: same loss and the same
/// gradients, bit for bit, with LoRA dropout on (the recomputation must draw the same masks).
#[test]
fn activation_checkpointing_gives_the_same_gradients() {
    let dir = fixtures().join("archs").join("mistral");
    let cfg = ModelConfig::from_file(dir.join("config.json")).unwrap();
    let lora = LoraConfig {
        dropout: 0.1,
        ..all_targets(4)
    };
    let run = |checkpointing: bool| {
        let model = random_with_adapters(&cfg, &lora);
        model.set_activation_checkpointing(checkpointing);
        assert_eq!(model.activation_checkpointing(), checkpointing);
        let v = cfg.vocab_size as u32;
        let rows: Vec<Vec<u32>> = [40usize, 23]
            .iter()
            .map(|&n| (0..n as u32).map(|i| (i * 5 + 1) % v).collect())
            .collect();
        let weights: Vec<Vec<f32>> = rows.iter().map(|r| vec![1.0; r.len()]).collect();
        let batch = Batch::from_token_rows(&rows, &weights, 0).unwrap();
        model
            .forward_backward(&batch, LossKind::CrossEntropy)
            .unwrap()
    };
    let (plain, gp) = run(false);
    let (ckpt, gc) = run(true);
    assert_eq!(plain.loss_sum.to_bits(), ckpt.loss_sum.to_bits());
    let (fp, fc) = (gp.to_flat().unwrap(), gc.to_flat().unwrap());
    assert!(fp.iter().any(|&x| x != 0.0));
    assert!(fp.iter().zip(&fc).all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn empty_batch_gives_zero_loss_and_zero_gradients() {
    let model = trained_tiny();
    let batch = Batch::from_token_rows(&[], &[], 0).unwrap();
    let (out, g) = model
        .forward_backward(&batch, LossKind::CrossEntropy)
        .unwrap();
    assert_eq!((out.loss_sum, out.tokens, out.mean()), (0.0, 0, 0.0));
    assert!(g.to_flat().unwrap().iter().all(|&v| v == 0.0));
    assert_eq!(g.layout(), model.param_layout());
}

#[test]
fn resume_from_saved_state_is_bit_exact() {
    let batch = ref_batch();
    let cfg = AdamWConfig {
        max_grad_norm: Some(1.0),
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    let step = |m: &LoraModel, opt: &mut AdamW| {
        let (o, mut g) = m.forward_backward(&batch, LossKind::CrossEntropy).unwrap();
        g.scale(1.0 / o.weight_sum).unwrap();
        let mut p = m.params_flat().unwrap();
        let mut gf = g.to_flat().unwrap();
        opt.step_flat(&mut p, &mut gf, 1e-3).unwrap();
        m.set_params_flat(&p).unwrap();
    };
    let straight = trained_tiny();
    let mut opt = AdamW::new(cfg, straight.param_layout().clone());
    for _ in 0..3 {
        step(&straight, &mut opt);
    }

    let first = trained_tiny();
    let mut opt1 = AdamW::new(cfg, first.param_layout().clone());
    for _ in 0..2 {
        step(&first, &mut opt1);
    }
    let dir = tempfile::tempdir().unwrap();
    first.save_adapter(&dir.path().join("adapter")).unwrap();
    opt1.save(&dir.path().join("optimizer.safetensors"))
        .unwrap();
    drop(first);
    let resumed = LoraModel::load_with_adapter(
        &tiny().join("base"),
        &dir.path().join("adapter"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let mut opt2 = AdamW::load(
        &dir.path().join("optimizer.safetensors"),
        cfg,
        resumed.param_layout().clone(),
    )
    .unwrap();
    assert_eq!(opt2.step_count(), 2);
    step(&resumed, &mut opt2);
    assert_eq!(
        resumed.params_flat().unwrap(),
        straight.params_flat().unwrap()
    );
    assert_eq!(opt2, opt);
}

#[test]
fn flat_gradients_round_trip() {
    let model = trained_tiny();
    let (_, g) = model
        .forward_backward(&ref_batch(), LossKind::CrossEntropy)
        .unwrap();
    let flat = g.to_flat().unwrap();
    assert_eq!(flat.len(), model.param_layout().numel());
    let back = Gradients::from_flat(model.param_layout(), &flat, &Device::Cpu).unwrap();
    assert_eq!(back.to_flat().unwrap(), flat);
    let keys: Vec<&String> = g.tensors().iter().map(|(k, _)| k).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "gradients are in sorted PEFT-key order");
    assert!(matches!(
        Gradients::from_flat(model.param_layout(), &flat[1..], &Device::Cpu),
        Err(Error::ParamMismatch(_))
    ));
}

// ---------------------------------------------------------------------------------------
// Bad inputs: each gives its named error.

/// Copies the tiny base to a temp dir, letting `edit` change its tensors or config.
fn edited_base(
    edit_tensors: impl FnOnce(&mut Vec<(String, Tensor)>),
    edit_config: impl FnOnce(&mut serde_json::Value),
) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let (mut t, _) = read_safetensors(&tiny().join("base/model.safetensors")).unwrap();
    edit_tensors(&mut t);
    write_safetensors_atomic(&d.path().join("model.safetensors"), &t, None).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny().join("base/config.json")).unwrap())
            .unwrap();
    edit_config(&mut cfg);
    std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
    d
}

fn load_err(dir: &Path) -> Error {
    LoraModel::load(dir, &all_targets(8), &Device::Cpu, DType::F32, 0).unwrap_err()
}

#[test]
fn bad_configs_name_the_field() {
    let d = edited_base(
        |_| {},
        |c| c["architectures"] = serde_json::json!(["GPT2LMHeadModel"]),
    );
    let e = load_err(d.path());
    assert!(
        matches!(&e, Error::UnknownArchitecture { found, .. } if found == "GPT2LMHeadModel"),
        "{e}"
    );
    let d = edited_base(
        |_| {},
        |c| {
            c.as_object_mut().unwrap().remove("hidden_size");
        },
    );
    let e = load_err(d.path());
    assert!(
        matches!(&e, Error::MissingField { field, .. } if field == "hidden_size"),
        "{e}"
    );
    assert!(e.to_string().contains("config.json"), "{e}");
    let d = edited_base(
        |_| {},
        |c| c["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "rope_theta": 1e4}),
    );
    let e = load_err(d.path());
    assert!(
        matches!(&e, Error::InvalidField { field, .. } if field == "rope_parameters.rope_type"),
        "{e}"
    );
    let d = edited_base(|_| {}, |c| c["num_key_value_heads"] = serde_json::json!(3));
    assert!(
        matches!(load_err(d.path()), Error::InvalidField { field, .. } if field == "num_key_value_heads")
    );
    let d = edited_base(|_| {}, |_| {});
    std::fs::write(d.path().join("config.json"), "{ not json").unwrap();
    assert!(matches!(load_err(d.path()), Error::Json { .. }));
}

#[test]
fn bad_weights_name_tensor_file_and_shapes() {
    let d = edited_base(
        |t| t.retain(|(k, _)| k != "model.layers.1.mlp.up_proj.weight"),
        |_| {},
    );
    let e = load_err(d.path());
    assert!(
        matches!(&e, Error::MissingTensor { tensor, .. } if tensor == "model.layers.1.mlp.up_proj.weight"),
        "{e}"
    );
    assert!(e.to_string().contains("model.safetensors"), "{e}");

    let d = edited_base(
        |t| {
            t.push((
                "model.layers.7.extra.weight".into(),
                Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
            ))
        },
        |_| {},
    );
    let e = load_err(d.path());
    assert!(
        matches!(&e, Error::UnexpectedTensor { tensor, .. } if tensor == "model.layers.7.extra.weight"),
        "{e}"
    );

    let d = edited_base(
        |t| {
            for (k, v) in t.iter_mut() {
                if k == "model.layers.0.self_attn.k_proj.weight" {
                    *v = Tensor::zeros((16, 64), DType::F32, &Device::Cpu).unwrap();
                }
            }
        },
        |_| {},
    );
    let e = load_err(d.path());
    match &e {
        Error::ShapeMismatch {
            tensor,
            file,
            expected,
            found,
        } => {
            assert_eq!(tensor, "model.layers.0.self_attn.k_proj.weight");
            assert!(file.ends_with("model.safetensors"));
            assert_eq!(
                (expected.as_slice(), found.as_slice()),
                (&[32, 64][..], &[16, 64][..])
            );
        }
        other => panic!("expected ShapeMismatch, got {other}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("[32, 64]") && msg.contains("[16, 64]"),
        "{msg}"
    );

    let d = edited_base(|_| {}, |_| {});
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    assert!(matches!(load_err(d.path()), Error::Io { .. }));
    std::fs::write(d.path().join("model.safetensors"), b"garbage!").unwrap();
    assert!(matches!(load_err(d.path()), Error::Safetensors { .. }));
}

#[test]
fn bad_adapters_name_the_key() {
    let model = LoraModel::load(
        &tiny().join("base"),
        &all_targets(8),
        &Device::Cpu,
        DType::F32,
        0,
    )
    .unwrap();
    let write = |edit: &dyn Fn(&mut NamedTensors)| {
        let d = tempfile::tempdir().unwrap();
        let mut t: Vec<(String, Tensor)> = read_adapter_tensors(&tiny().join("adapter_step1"))
            .unwrap()
            .into_iter()
            .collect();
        edit(&mut t);
        write_safetensors_atomic(&d.path().join("adapter_model.safetensors"), &t, None).unwrap();
        std::fs::copy(
            tiny().join("adapter_step1/adapter_config.json"),
            d.path().join("adapter_config.json"),
        )
        .unwrap();
        d
    };
    let key = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight";
    let d = write(&|t| t.retain(|(k, _)| k != key));
    assert!(
        matches!(model.load_adapter(d.path()), Err(Error::MissingTensor { tensor, .. }) if tensor == key)
    );
    let d = write(&|t| {
        t.push((
            "base_model.model.model.layers.5.mlp.up_proj.lora_A.weight".into(),
            Tensor::zeros((8, 64), DType::F32, &Device::Cpu).unwrap(),
        ))
    });
    assert!(matches!(
        model.load_adapter(d.path()),
        Err(Error::UnexpectedTensor { .. })
    ));
    let d = write(&|t| {
        for (k, v) in t.iter_mut() {
            if k == key {
                *v = Tensor::zeros((176, 4), DType::F32, &Device::Cpu).unwrap();
            }
        }
    });
    assert!(
        matches!(model.load_adapter(d.path()), Err(Error::ShapeMismatch { tensor, .. }) if tensor == key)
    );
    // A base_layer tensor, as PEFT writes for lm_head, is accepted.
    model.load_adapter(&tiny().join("adapter_step1")).unwrap();
    // A different rank in the config.
    let d = write(&|_| {});
    let cfg = std::fs::read_to_string(d.path().join("adapter_config.json"))
        .unwrap()
        .replace("\"r\": 8", "\"r\": 4");
    std::fs::write(d.path().join("adapter_config.json"), cfg).unwrap();
    assert!(
        matches!(model.load_adapter(d.path()), Err(Error::InvalidField { field, .. }) if field == "r")
    );
    let cfg = std::fs::read_to_string(d.path().join("adapter_config.json"))
        .unwrap()
        .replace("\"use_dora\": false", "\"use_dora\": true");
    std::fs::write(d.path().join("adapter_config.json"), cfg).unwrap();
    assert!(
        matches!(model.load_adapter(d.path()), Err(Error::InvalidField { field, .. }) if field == "use_dora")
    );
}

#[test]
fn bad_batches_are_refused() {
    let model = trained_tiny();
    let e = Batch::from_token_rows(&[vec![1, 2, 3]], &[vec![1.0, 1.0]], 0).unwrap_err();
    assert!(matches!(e, Error::InvalidBatch(_)));
    assert!(matches!(
        Batch::from_token_rows(&[vec![1]], &[vec![1.0]], 0),
        Err(Error::InvalidBatch(_))
    ));
    assert!(matches!(
        Batch::from_token_rows(&[vec![1, 2]], &[vec![0.0, f32::NAN]], 0),
        Err(Error::InvalidBatch(_))
    ));
    // Padding with weight.
    let e = Batch::new(
        1,
        3,
        vec![1, 2, 3],
        vec![2, 3, 4],
        vec![1.0, 1.0, 1.0],
        vec![2],
    )
    .unwrap_err();
    assert!(e.to_string().contains("padding"), "{e}");
    let big = Batch::from_token_rows(&[vec![1, 5000, 3]], &[vec![0.0, 1.0, 1.0]], 0).unwrap();
    let e = model
        .forward_backward(&big, LossKind::CrossEntropy)
        .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidBatch(m) if m.contains("5000")),
        "{e}"
    );
    let ids = Tensor::new(&[[1u32, 2000]], &Device::Cpu).unwrap();
    assert!(matches!(
        model.forward(&ids, None),
        Err(Error::InvalidBatch(_))
    ));
    let ids = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
    assert!(matches!(
        model.forward(&ids, None),
        Err(Error::InvalidBatch(_))
    ));
    assert!(matches!(
        model.set_params_flat(&[0.0; 3]),
        Err(Error::ParamMismatch(_))
    ));
}

#[test]
fn attention_mask_hides_left_padding() {
    let model = trained_tiny();
    let real = [5u32, 17, 300, 42, 9];
    let alone = model
        .forward(&Tensor::new(&[real], &Device::Cpu).unwrap(), None)
        .unwrap();
    // The same tokens after two masked keys: with the mask, the last position (which sees
    // every real token) differs from `alone` only through positions — RoPE is relative, so
    // attention scores are unchanged and the logits agree.
    let padded = Tensor::new(&[[0u32, 0, 5, 17, 300, 42, 9]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[0u32, 0, 1, 1, 1, 1, 1]], &Device::Cpu).unwrap();
    let with = model.forward(&padded, Some(&mask)).unwrap();
    let a = alone.narrow(1, 4, 1).unwrap();
    let b = with.narrow(1, 6, 1).unwrap();
    assert!(rel_err(&b, &a) < 1e-5, "{}", rel_err(&b, &a));
    let without = model
        .forward(&padded, None)
        .unwrap()
        .narrow(1, 6, 1)
        .unwrap();
    assert!(
        rel_err(&without, &a) > 1e-4,
        "unmasked padding must change the numbers"
    );
}

#[test]
fn random_model_folders_load_and_match_the_in_memory_model() {
    let cfg = ringtune_model::ModelPreset::Quickstart { vocab_size: 300 }.config();
    let dir = tempfile::tempdir().unwrap();
    ringtune_model::write_random_model(dir.path(), &cfg, 11).unwrap();
    assert!(dir.path().join("generation_config.json").is_file());
    let lora = LoraConfig::from_tinker(4, true, true, false);
    let disk = LoraModel::load(dir.path(), &lora, &Device::Cpu, DType::F32, 5).unwrap();
    let mem = LoraModel::random(&cfg, &lora, &Device::Cpu, 11, 5).unwrap();
    assert_eq!(disk.config(), &cfg);
    let ids = Tensor::new(&[[1u32, 2, 3, 250, 17]], &Device::Cpu).unwrap();
    assert_eq!(
        vec_f32(&disk.forward(&ids, None).unwrap()),
        vec_f32(&mem.forward(&ids, None).unwrap())
    );
    assert_eq!(
        disk.params_fingerprint().unwrap(),
        mem.params_fingerprint().unwrap(),
        "same seed, same adapters"
    );
    // Near-uniform predictions at init: the loss is about ln(vocab).
    let rows = vec![(0..40u32).map(|i| (i * 7) % 300).collect::<Vec<_>>()];
    let batch = Batch::from_token_rows(&rows, &[vec![1.0; 40]], 0).unwrap();
    let (out, _) = disk
        .forward_backward(&batch, LossKind::CrossEntropy)
        .unwrap();
    assert!((out.mean() - (300f64).ln()).abs() < 0.1, "{}", out.mean());
}

#[test]
fn dropout_is_seeded_and_fresh_every_pass() {
    let cfg = LoraConfig {
        dropout: 0.3,
        ..all_targets(8)
    };
    let make = || {
        let m = LoraModel::load(&tiny().join("base"), &cfg, &Device::Cpu, DType::F32, 1).unwrap();
        m.load_adapter(&tiny().join("adapter_step2")).unwrap();
        m
    };
    let (a, b) = (make(), make());
    let batch = ref_batch();
    let g1 = a
        .forward_backward(&batch, LossKind::CrossEntropy)
        .unwrap()
        .1
        .to_flat()
        .unwrap();
    let g2 = a
        .forward_backward(&batch, LossKind::CrossEntropy)
        .unwrap()
        .1
        .to_flat()
        .unwrap();
    let g1b = b
        .forward_backward(&batch, LossKind::CrossEntropy)
        .unwrap()
        .1
        .to_flat()
        .unwrap();
    assert_ne!(g1, g2, "each pass draws new masks");
    // Resuming the counter replays the masks.
    assert_eq!(a.passes(), 2);
    b.set_passes(1);
    let g2b = b
        .forward_backward(&batch, LossKind::CrossEntropy)
        .unwrap()
        .1
        .to_flat()
        .unwrap();
    assert_eq!(g2, g2b);
    b.set_passes(0);
    assert_eq!(g1, g1b, "same seed, same masks");
    // No dropout outside training passes.
    let no_drop = trained_tiny();
    let lp = a
        .logprobs(&batch, LossKind::CrossEntropy, Adapters::On)
        .unwrap();
    let lp0 = no_drop
        .logprobs(&batch, LossKind::CrossEntropy, Adapters::On)
        .unwrap();
    assert_eq!(lp.logprobs, lp0.logprobs);
}

#[test]
fn lora_config_scaling_and_targets() {
    let c = LoraConfig::default();
    assert_eq!((c.rank, c.alpha, c.target_modules.len()), (32, 32.0, 8));
    assert_eq!(c.scale(), 1.0);
    let rs = LoraConfig {
        use_rslora: true,
        alpha: 16.0,
        rank: 64,
        ..c.clone()
    };
    assert_eq!(rs.scale(), 2.0);
    let attn = LoraConfig::from_tinker(8, true, false, false);
    assert_eq!(
        attn.target_modules
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>(),
        ["q_proj", "k_proj", "v_proj", "o_proj"]
    );
    assert!(
        matches!(LoraConfig::from_names(8, 8.0, &["q_proj", "c_attn"]), Err(Error::InvalidLoraConfig(m)) if m.contains("c_attn"))
    );
    assert!(LoraConfig {
        rank: 0,
        ..c.clone()
    }
    .validated()
    .is_err());
    assert!(LoraConfig::from_tinker(8, false, false, false)
        .validated()
        .is_err());
    // Only the targeted modules get parameters.
    let m = LoraModel::load(
        &tiny().join("base"),
        &LoraConfig::from_tinker(4, false, true, false),
        &Device::Cpu,
        DType::F32,
        0,
    )
    .unwrap();
    assert_eq!(m.param_layout().len(), 2 * 3 * 2);
    assert!(m
        .param_layout()
        .entries()
        .iter()
        .all(|(k, _)| k.contains(".mlp.")));
}

#[test]
fn bf16_checkpoints_load_into_f32_compute() {
    let d = edited_base(
        |t| {
            for (_, v) in t.iter_mut() {
                *v = v.to_dtype(DType::BF16).unwrap();
            }
        },
        |c| c["dtype"] = serde_json::json!("bfloat16"),
    );
    let m16 = LoraModel::load(d.path(), &all_targets(8), &Device::Cpu, DType::F32, 0).unwrap();
    let m32 = LoraModel::load(
        &tiny().join("base"),
        &all_targets(8),
        &Device::Cpu,
        DType::F32,
        0,
    )
    .unwrap();
    let ids = ids_tensor(&ref_batch());
    let e = rel_err(
        &m16.forward(&ids, None).unwrap(),
        &m32.forward(&ids, None).unwrap(),
    );
    assert!(e > 0.0 && e < 2e-2, "bf16 rounding only: {e}");
    assert!(matches!(
        LoraModel::load(
            &tiny().join("base"),
            &all_targets(8),
            &Device::Cpu,
            DType::BF16,
            0
        ),
        Err(Error::Unsupported(_))
    ));
}

#[test]
fn a_sharded_index_must_match_its_shards() {
    let out = tempfile::tempdir().unwrap();
    merge_with(
        &tiny().join("base"),
        &tiny().join("adapter_step2"),
        out.path(),
        &MergeOptions {
            max_shard_bytes: 300_000,
        },
    )
    .unwrap();
    let index = out.path().join("model.safetensors.index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    let first = v["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .clone();
    v["weight_map"]["model.layers.9.mlp.up_proj.weight"] = first;
    std::fs::write(&index, v.to_string()).unwrap();
    let e = load_err(out.path());
    assert!(
        matches!(&e, Error::MissingTensor { tensor, .. } if tensor == "model.layers.9.mlp.up_proj.weight"),
        "{e}"
    );
    v["weight_map"]["model.layers.9.mlp.up_proj.weight"] =
        serde_json::json!("../elsewhere.safetensors");
    std::fs::write(&index, v.to_string()).unwrap();
    assert!(matches!(load_err(out.path()), Error::InvalidField { .. }));
}

#[test]
fn step_model_is_step_flat() {
    let batch = ref_batch();
    let (a, b) = (trained_tiny(), trained_tiny());
    let mut oa = AdamW::new(AdamWConfig::default(), a.param_layout().clone());
    let mut ob = oa.clone();
    let (_, g) = a.forward_backward(&batch, LossKind::CrossEntropy).unwrap();
    let rep = oa.step_model(&a, &g, 1e-3).unwrap();
    let mut p = b.params_flat().unwrap();
    let mut gf = g.to_flat().unwrap();
    let rep2 = ob.step_flat(&mut p, &mut gf, 1e-3).unwrap();
    assert_eq!(rep, rep2);
    assert_eq!(a.params_flat().unwrap(), p);
    let other = LoraModel::load(
        &tiny().join("base"),
        &LoraConfig::from_tinker(4, true, false, false),
        &Device::Cpu,
        DType::F32,
        0,
    )
    .unwrap();
    assert!(matches!(
        oa.step_model(&other, &g, 1e-3),
        Err(Error::ParamMismatch(_))
    ));
}

/// Two identical quickstart-shaped models (seed `seed`), a host AdamW and a DeviceAdamW on
/// the CPU with weight decay and tight clipping, and a 2 × 9 batch (tokens `i · mul`).
struct AdamPair {
    host_model: LoraModel,
    dev_model: LoraModel,
    host: ringtune_model::AdamW,
    dev: ringtune_model::DeviceAdamW,
    batch: ringtune_model::Batch,
    ocfg: ringtune_model::AdamWConfig,
}

fn adam_pair(seed: u64, mul: usize) -> AdamPair {
    let cfg = ringtune_model::ModelPreset::Quickstart { vocab_size: 300 }.config();
    let lora = LoraConfig::from_tinker(4, true, true, false);
    let host_model = LoraModel::random(&cfg, &lora, &Device::Cpu, seed, 5).unwrap();
    let dev_model = LoraModel::random(&cfg, &lora, &Device::Cpu, seed, 5).unwrap();
    let ocfg = ringtune_model::AdamWConfig {
        weight_decay: 0.01,
        max_grad_norm: Some(0.05),
        ..ringtune_model::AdamWConfig::default()
    };
    let host = ringtune_model::AdamW::new(ocfg, host_model.param_layout().clone());
    let dev = ringtune_model::DeviceAdamW::from_host(&host, &Device::Cpu).unwrap();
    let tokens: Vec<u32> = (0..2 * 9).map(|i| (i * mul % 300) as u32).collect();
    let weights = vec![1f32; 2 * 9];
    let batch = ringtune_model::Batch::from_dense_tokens(2, 9, &tokens, &weights).unwrap();
    AdamPair {
        host_model,
        dev_model,
        host,
        dev,
        batch,
        ocfg,
    }
}

#[test]
fn device_adamw_matches_the_host_adamw() {
    // DeviceAdamW (the GPU training path) runs here on the CPU device: the same candle
    // ops as on a GPU, checked against the host AdamW over steps with weight decay and
    // clipping, then its state handed back.
    use ringtune_model::LossKind;
    let AdamPair {
        host_model,
        dev_model,
        mut host,
        mut dev,
        batch,
        ..
    } = adam_pair(11, 37);
    for step in 0..3 {
        let (_, mut g) = host_model
            .forward_backward(&batch, LossKind::CrossEntropy)
            .unwrap();
        g.scale(0.5).unwrap();
        let rh = host.step_model(&host_model, &g, 1e-2).unwrap();
        let (_, g) = dev_model
            .forward_backward(&batch, LossKind::CrossEntropy)
            .unwrap();
        let rd = dev.step_model(&dev_model, &g, 0.5, 1e-2).unwrap();
        assert_eq!(rh.clipped, rd.clipped, "step {step}");
        assert!(
            (rh.grad_norm - rd.grad_norm).abs() <= 1e-5 * rh.grad_norm,
            "step {step}: grad norm {} vs {}",
            rh.grad_norm,
            rd.grad_norm
        );
        let (a, b) = (
            host_model.params_flat().unwrap(),
            dev_model.params_flat().unwrap(),
        );
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / x.abs().max(1e-3))
            .fold(0f32, f32::max);
        // Step 1 is equal to rounding; later steps start from parameters that differ in
        // the last bits (the norm, hence the clipping factor, is an f32 sum on the device)
        // and Adam's 1/√v amplifies that a little.
        let tol = if step == 0 { 1e-5 } else { 2e-4 };
        assert!(worst <= tol, "step {step}: params differ by {worst:e}");
    }
    assert!(host.step_count() == 3 && dev.step_count() == 3);
    let back = dev.to_host().unwrap();
    let worst = host
        .exp_avg_sq()
        .iter()
        .zip(back.exp_avg_sq())
        .map(|(x, y)| (x - y).abs() / x.abs().max(1e-12))
        .fold(0f32, f32::max);
    assert!(worst <= 1e-4, "second moments differ by {worst:e}");
}

#[test]
fn device_adamw_with_the_host_norm_takes_the_host_adamw_bits() {
    // What a distributed rank on a GPU does: the all-reduced gradient is on the host
    // anyway, so its norm comes from AdamW::grad_norm and only the element-wise update
    // runs on the device. Those are single IEEE f32 operations in the host's order, so the
    // parameters and moments must come out bit for bit, clipping and weight decay included.
    use ringtune_model::{AdamW, LossKind};
    let AdamPair {
        host_model,
        dev_model,
        mut host,
        mut dev,
        batch,
        ocfg,
    } = adam_pair(12, 41);
    let mut params = host_model.params_flat().unwrap();
    let mut clipped_any = false;
    for step in 0..4 {
        let (out, g) = host_model
            .forward_backward(&batch, LossKind::CrossEntropy)
            .unwrap();
        let inv = (1.0 / out.weight_sum) as f32;
        let mut flat = g.to_flat().unwrap();
        flat.iter_mut().for_each(|x| *x *= inv);
        let norm = AdamW::grad_norm(&flat);
        let g_dev = Tensor::from_slice(&flat, flat.len(), &Device::Cpu).unwrap();
        let rh = host.step_flat(&mut params, &mut flat, 1e-2).unwrap();
        host_model.set_params_flat(&params).unwrap();
        let rd = dev
            .step_flat_tensor(&dev_model, g_dev, Some(norm), 1e-2)
            .unwrap();
        assert_eq!((rh.grad_norm, rh.clipped), (rd.grad_norm, rd.clipped));
        clipped_any |= rh.clipped;
        let d = dev_model.params_flat().unwrap();
        let same = params
            .iter()
            .zip(&d)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "step {step}: the parameters differ in their bits");
    }
    assert!(clipped_any, "the test should exercise clipping");
    let back = dev.to_host().unwrap();
    assert_eq!(back, host, "moments and step differ after 4 steps");
    // Its checkpoint file is AdamW's.
    let dir = tempfile::tempdir().unwrap();
    dev.save(&dir.path().join("opt.safetensors")).unwrap();
    let loaded = AdamW::load(
        &dir.path().join("opt.safetensors"),
        ocfg,
        host_model.param_layout().clone(),
    )
    .unwrap();
    assert_eq!(loaded, host);
}

/// The stream profile of a real step (`ringtune_model::prof`) sees every op the step runs,
/// once per call, inside the phases of `forward_backward`, and changes nothing it measures.
#[test]
fn stream_profile_counts_every_op_of_a_step_and_changes_no_number() {
    use ringtune_model::prof::{capture, Row};
    let dir = tiny().join("base");
    let cfg = ModelConfig::from_file(dir.join("config.json")).unwrap();
    let layers = cfg.num_hidden_layers;
    let model = LoraModel::load(&dir, &all_targets(4), &Device::Cpu, DType::F32, 0).unwrap();
    let v = cfg.vocab_size as u32;
    let rows: Vec<Vec<u32>> = [40usize, 33]
        .iter()
        .map(|&n| (0..n as u32).map(|i| (i * 11 + 5) % v).collect())
        .collect();
    let weights: Vec<Vec<f32>> = rows.iter().map(|r| vec![1.0; r.len()]).collect();
    let batch = Batch::from_token_rows(&rows, &weights, 0).unwrap();

    let (plain, plain_grads) = model
        .forward_backward(&batch, LossKind::CrossEntropy)
        .unwrap();
    let ((out, grads), p) = capture(&Device::Cpu, || {
        model.forward_backward(&batch, LossKind::CrossEntropy)
    })
    .unwrap();
    assert_eq!(out.loss_sum.to_bits(), plain.loss_sum.to_bits());
    for ((k, a), (_, b)) in grads.tensors().iter().zip(plain_grads.tensors()) {
        assert_eq!(vec_f32(a), vec_f32(b), "{k}");
    }

    let calls = |name: &str| p.ops.iter().find(|o| o.name == name).map_or(0, |o| o.calls);
    // Seven adapted projections per layer (lm_head's adapter is the head's own code).
    assert_eq!(calls("lora-linear"), 7 * layers, "{p}");
    assert_eq!(calls("lora-linear (bwd)"), 7 * layers, "{p}");
    for op in ["attention", "attention (bwd)", "swiglu", "swiglu (bwd)"] {
        assert_eq!(calls(op), layers, "{op}: {p}");
    }
    // Two norms per layer and the final one; the first norm's input (the embeddings)
    // needs no gradient, so its backward never runs.
    assert_eq!(calls("rms-norm"), 2 * layers + 1, "{p}");
    assert_eq!(calls("rms-norm (bwd)"), 2 * layers, "{p}");
    assert!(calls("head loss") >= 1 && calls("head logits") == calls("head loss"));
    let phases: Vec<(&str, usize)> = p
        .phases
        .iter()
        .map(|r| (r.name.as_str(), r.calls))
        .collect();
    assert_eq!(
        phases,
        [("trunk forward", 1), ("head", 1), ("trunk backward", 1)]
    );
    // Outermost spans only: the ops never cover more than the capture.
    let in_ops: f64 = p.ops.iter().map(|o: &Row| o.ms).sum();
    assert!(in_ops <= p.total_ms + 1e-6, "{p}");
    assert!((p.total_ms - in_ops - p.outside_ops_ms).abs() < 1e-6);
    let in_phases: f64 = p.phases.iter().map(|r| r.ms).sum();
    assert!(in_phases <= p.total_ms + 1e-6, "{p}");

    // Off again after the capture: a capture of nothing sees nothing of the earlier step.
    let ((), empty) = capture(&Device::Cpu, || Ok(())).unwrap();
    assert!(empty.ops.is_empty() && empty.phases.is_empty());
}

/// `merge` checks an adapter's tensors against its own config as loading it does, and an
/// adapter holding NaN is refused by both: otherwise each writes or scores garbage and
/// reports success.
#[test]
fn merge_and_load_refuse_adapters_that_disagree_with_their_config_or_hold_nan() {
    let base = tiny().join("base");
    let ad = tempfile::tempdir().unwrap();
    trained_tiny().save_adapter(ad.path()).unwrap();
    let weights = ad.path().join("adapter_model.safetensors");
    let config = ad.path().join("adapter_config.json");
    let (good_t, _) = read_safetensors(&weights).unwrap();
    let good_c = std::fs::read_to_string(&config).unwrap();
    let merge_err = || {
        let out = tempfile::tempdir().unwrap();
        let e = merge_with(&base, ad.path(), out.path(), &MergeOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            !out.path().join("model.safetensors").exists(),
            "nothing is written: {e}"
        );
        e
    };
    let set_config = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(&good_c).unwrap();
        f(&mut v);
        std::fs::write(&config, v.to_string()).unwrap();
    };

    // The config's r is not the tensors' (the scale alpha/r would be wrong).
    set_config(&|v| v["r"] = serde_json::json!(16));
    let e = merge_err();
    assert!(
        e.contains("says r = 16") && e.contains("expected [16,"),
        "{e}"
    );
    // Fewer target modules than the tensors have.
    set_config(&|v| v["target_modules"] = serde_json::json!(["q_proj", "v_proj"]));
    let e = merge_err();
    assert!(
        e.contains("not one of the adapter config's target_modules"),
        "{e}"
    );
    std::fs::write(&config, &good_c).unwrap();

    // One layer's pair missing.
    let without: NamedTensors = good_t
        .iter()
        .filter(|(k, _)| !k.contains("layers.1.mlp.up_proj"))
        .cloned()
        .collect();
    write_safetensors_atomic(&weights, &without, None).unwrap();
    let e = merge_err();
    assert!(e.contains("layers.1.mlp.up_proj.lora_A"), "{e}");
    // No tensors at all.
    write_safetensors_atomic(&weights, &Vec::new(), None).unwrap();
    assert!(merge_err().contains("holds no LoRA tensors"));

    // A NaN, refused by merge and by loading, naming the tensor.
    let nan: NamedTensors = good_t
        .iter()
        .map(|(k, t)| {
            if k.ends_with("layers.0.self_attn.q_proj.lora_B.weight") {
                let mut v = vec_f32(t);
                v[3] = f32::NAN;
                (
                    k.clone(),
                    Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap(),
                )
            } else {
                (k.clone(), t.clone())
            }
        })
        .collect();
    write_safetensors_atomic(&weights, &nan, None).unwrap();
    let e = merge_err();
    assert!(
        e.contains("q_proj.lora_B.weight") && e.contains("NaN at flat index 3"),
        "{e}"
    );
    let e = LoraModel::load_with_adapter(&base, ad.path(), &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not finite"), "{e}");

    // The good adapter still merges.
    write_safetensors_atomic(&weights, &good_t, None).unwrap();
    let out = tempfile::tempdir().unwrap();
    merge_with(&base, ad.path(), out.path(), &MergeOptions::default()).unwrap();
}

#[test]
fn the_model_fingerprint_is_stable_and_sees_another_model() {
    let cfg = ringtune_model::ModelPreset::Quickstart { vocab_size: 300 }.config();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    ringtune_model::write_random_model(&a, &cfg, 11).unwrap();
    ringtune_model::write_random_model(&b, &cfg, 11).unwrap();
    let fp = ringtune_model::model_fingerprint(&a).unwrap();
    assert_eq!(fp.len(), 64);
    // The same model written twice has the same fingerprint.
    assert_eq!(ringtune_model::model_fingerprint(&b).unwrap(), fp);
    // Another seed: same shapes and header layout, other weights.
    ringtune_model::write_random_model(&b, &cfg, 12).unwrap();
    assert_ne!(ringtune_model::model_fingerprint(&b).unwrap(), fp);
    // A byte in the middle of the data (the fingerprint samples evenly; 32 of 63 gaps in
    // is a sample's first byte) and a changed config.json each change it.
    ringtune_model::write_random_model(&b, &cfg, 11).unwrap();
    let weights = b.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let at = 32 * (bytes.len() - 4096) / 63;
    bytes[at] ^= 1;
    std::fs::write(&weights, &bytes).unwrap();
    assert_ne!(ringtune_model::model_fingerprint(&b).unwrap(), fp);
    bytes[at] ^= 1;
    std::fs::write(&weights, &bytes).unwrap();
    assert_eq!(ringtune_model::model_fingerprint(&b).unwrap(), fp);
    let config = std::fs::read_to_string(b.join("config.json")).unwrap();
    std::fs::write(b.join("config.json"), config.replace("}", " }")).unwrap();
    assert_ne!(ringtune_model::model_fingerprint(&b).unwrap(), fp);
    // A folder without weights is an error naming the file.
    std::fs::remove_file(&weights).unwrap();
    let err = ringtune_model::model_fingerprint(&b)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}
