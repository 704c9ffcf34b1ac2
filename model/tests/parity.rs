//! Parity with PyTorch 2.15 + transformers 5.24 + PEFT 0.21 (float32) on the llama-tiny
//! reference (tests/fixtures/llama-tiny, see reference.json): the loss, every LoRA
//! gradient, the AdamW moments and the adapters after one and two steps, each within a
//! normwise relative error of 1e-5 per tensor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ringtune_model::io::read_safetensors;
use ringtune_model::peft::read_adapter_tensors;
use ringtune_model::{
    AdamW, AdamWConfig, Batch, DType, Device, LoraConfig, LoraModel, LossKind, Tensor,
};

const TOL: f64 = 1e-5;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-tiny")
}

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap())
        .unwrap()
}

fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    read_safetensors(path).unwrap().0.into_iter().collect()
}

/// ‖a − b‖ / ‖b‖ (‖a − b‖ when b = 0).
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a = a
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let b = b
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let diff: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if norm == 0.0 {
        diff
    } else {
        diff / norm
    }
}

fn assert_close(
    what: &str,
    got: &[(String, Tensor)],
    want: &BTreeMap<String, Tensor>,
    suffix: &str,
) {
    assert_eq!(
        got.len(),
        want.keys().filter(|k| !k.contains("base_layer")).count(),
        "{what}: tensor count"
    );
    let mut worst = (0.0, String::new());
    for (k, t) in got {
        let key = format!("{k}{suffix}");
        let w = want
            .get(&key)
            .unwrap_or_else(|| panic!("{what}: reference lacks {key}"));
        let e = rel_err(t, w);
        if e > worst.0 {
            worst = (e, key.clone());
        }
        assert!(e <= TOL, "{what}: {key} relative error {e:.3e} > {TOL:e}");
    }
    eprintln!("{what}: worst relative error {:.3e} ({})", worst.0, worst.1);
}

fn load_batch() -> Batch {
    let b = tensors(&fixture().join("batch.safetensors"));
    let ids = &b["input_ids"];
    let (rows, t) = ids.dims2().unwrap();
    let ids: Vec<u32> = ids
        .to_dtype(DType::U32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let w: Vec<f32> = b["loss_weights"].flatten_all().unwrap().to_vec1().unwrap();
    Batch::from_dense_tokens(rows, t, &ids, &w).unwrap()
}

fn lora_config(r: &serde_json::Value) -> LoraConfig {
    let l = &r["lora"];
    let names: Vec<String> = l["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    LoraConfig::from_names(
        l["r"].as_u64().unwrap() as usize,
        l["lora_alpha"].as_f64().unwrap(),
        &names,
    )
    .unwrap()
}

/// forward_backward, then the mean's gradients (the reference differentiates the mean).
fn mean_grads(model: &LoraModel, batch: &Batch) -> (f64, ringtune_model::Gradients) {
    let (out, mut g) = model
        .forward_backward(batch, LossKind::CrossEntropy)
        .unwrap();
    g.scale(1.0 / out.weight_sum).unwrap();
    (out.mean(), g)
}

#[test]
fn matches_pytorch_peft_for_two_adamw_steps() {
    let r = reference();
    let dir = fixture();
    let model = LoraModel::load(
        &dir.join("base"),
        &lora_config(&r),
        &Device::Cpu,
        DType::F32,
        0,
    )
    .unwrap();
    model.load_adapter(&dir.join("adapter_init")).unwrap();
    let batch = load_batch();

    // Step 0: loss and gradients at the initial adapter.
    let (loss, grads) = mean_grads(&model, &batch);
    let want = r["loss_init"].as_f64().unwrap();
    assert!(
        ((loss - want) / want).abs() <= TOL,
        "loss_init {loss} vs {want}"
    );
    assert_close(
        "grads_init",
        grads.tensors(),
        &tensors(&dir.join("grads_init.safetensors")),
        "",
    );

    // Step 1: AdamW, then moments and adapter.
    let a = &r["adamw"];
    let cfg = AdamWConfig {
        lr: a["lr"].as_f64().unwrap(),
        beta1: a["betas"][0].as_f64().unwrap(),
        beta2: a["betas"][1].as_f64().unwrap(),
        eps: a["eps"].as_f64().unwrap(),
        weight_decay: a["weight_decay"].as_f64().unwrap(),
        max_grad_norm: None,
    };
    let mut opt = AdamW::new(cfg, model.param_layout().clone());
    let mut params = model.params_flat().unwrap();
    let mut g = grads.to_flat().unwrap();
    opt.step_flat(&mut params, &mut g, cfg.lr).unwrap();
    model.set_params_flat(&params).unwrap();
    let state = opt.state_tensors(&Device::Cpu).unwrap();
    let want_state = tensors(&dir.join("adam_state_step1.safetensors"));
    let m: Vec<_> = state
        .iter()
        .filter(|(k, _)| k.ends_with(".exp_avg"))
        .cloned()
        .collect();
    let v: Vec<_> = state
        .iter()
        .filter(|(k, _)| k.ends_with(".exp_avg_sq"))
        .cloned()
        .collect();
    assert_eq!(m.len() + v.len(), want_state.len());
    for (k, t) in m.iter().chain(&v) {
        let e = rel_err(t, &want_state[k]);
        assert!(e <= TOL, "adam state {k}: relative error {e:.3e}");
    }
    let step1: BTreeMap<_, _> = read_adapter_tensors(&dir.join("adapter_step1")).unwrap();
    assert_close("adapter_step1", &model.adapter_tensors(), &step1, "");

    // Step 2: loss and gradients at the step-1 adapter, then the second update.
    let (loss, grads) = mean_grads(&model, &batch);
    let want = r["loss_step1"].as_f64().unwrap();
    assert!(
        ((loss - want) / want).abs() <= TOL,
        "loss_step1 {loss} vs {want}"
    );
    assert_close(
        "grads_step1",
        grads.tensors(),
        &tensors(&dir.join("grads_step1.safetensors")),
        "",
    );
    let mut g = grads.to_flat().unwrap();
    opt.step_flat(&mut params, &mut g, cfg.lr).unwrap();
    model.set_params_flat(&params).unwrap();
    let step2 = read_adapter_tensors(&dir.join("adapter_step2")).unwrap();
    assert_close("adapter_step2", &model.adapter_tensors(), &step2, "");

    let (loss, _) = mean_grads(&model, &batch);
    let want = r["loss_step2_f64"].as_f64().unwrap();
    assert!(
        ((loss - want) / want).abs() <= TOL,
        "loss after step 2 {loss} vs {want}"
    );
}
