//! The shipped configs parse and validate, and configs/README.md documents every key.

use std::path::Path;

use ringtune_config::RunConfig;

fn configs_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

#[test]
fn every_shipped_config_is_valid() {
    let mut n = 0;
    for e in std::fs::read_dir(configs_dir()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            RunConfig::load(&p).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 2, "expected quickstart.toml and sft.toml");
}

#[test]
fn readme_documents_every_key() {
    let readme = std::fs::read_to_string(configs_dir().join("README.md")).unwrap();
    let mut cfg = RunConfig::default();
    // Optional keys are absent from the serialized form when unset; set them to see them.
    cfg.model.init_preset = Some("x".into());
    cfg.data.eval = Some("x".into());
    cfg.optimizer.grad_clip = Some(1.0);
    cfg.train.max_steps = Some(1);
    let v = serde_json::to_value(&cfg).unwrap();
    let mut missing = Vec::new();
    for (k, v) in v.as_object().unwrap() {
        let leaves: Vec<String> = match v.as_object() {
            Some(sub) => sub.keys().cloned().collect(),
            None => vec![k.clone()],
        };
        if v.is_object() && !readme.contains(&format!("## `[{k}]`")) {
            missing.push(format!("[{k}]"));
        }
        for leaf in leaves {
            if !readme.contains(&format!("| `{leaf}` |")) {
                missing.push(leaf);
            }
        }
    }
    assert!(missing.is_empty(), "configs/README.md lacks {missing:?}");
}
