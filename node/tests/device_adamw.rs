//! The trainers with AdamW on the model's device (what a GPU run uses), exercised here on
//! the CPU through `RINGTUNE_DEVICE_ADAMW=1`:
//! - one process: the gradient sum stays on the device (only the scalars are all-reduced),
//!   the run follows the host optimizer's to rounding, and resumes bit-exactly;
//! - a rank of a distributed run: the update is the host optimizer's bit for bit (SFT, DPO
//!   and RL), so ranks on different devices still agree;
//! - a rank whose sync sums device memory (NCCL's path, here a CPU stand-in): the gradient
//!   never goes through the host buffer, and training follows the host run to rounding.
//!
//! One test function: the switch is an environment variable read when a trainer is built,
//! and this binary has no other test that could build one meanwhile.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use ringtune_config::RunConfig;
use ringtune_node::optim::DEVICE_ADAMW_ENV;
use ringtune_node::{LocalSync, RlOutcome, RlTrainer, StepSync, Trainer};

/// Records the length of every buffer it is given; `local` says whether it is the only
/// rank. Sums nothing (one rank's sum is its own value).
struct Recorder {
    local: bool,
    lens: Arc<Mutex<Vec<usize>>>,
}

impl StepSync for Recorder {
    fn all_reduce_sum(&mut self, _step: u64, buf: &mut [f32]) -> Result<(), String> {
        self.lens.lock().unwrap().push(buf.len());
        Ok(())
    }

    fn is_local(&self) -> bool {
        self.local
    }
}

/// Two ranks holding identical data, summed in "device memory" the way NCCL does it (here
/// a CPU tensor): the gradient and the tail are doubled without a host buffer. Records
/// which path each step took.
struct DeviceTwin {
    calls: Arc<Mutex<Vec<&'static str>>>,
}

impl StepSync for DeviceTwin {
    fn all_reduce_sum(&mut self, _step: u64, buf: &mut [f32]) -> Result<(), String> {
        self.calls.lock().unwrap().push("host");
        buf.iter_mut().for_each(|x| *x *= 2.0);
        Ok(())
    }

    fn all_reduce_device(
        &mut self,
        _step: u64,
        grads: &ringtune_model::Tensor,
        tail: &mut [f32],
    ) -> Option<Result<ringtune_model::Tensor, String>> {
        self.calls.lock().unwrap().push("device");
        tail.iter_mut().for_each(|x| *x *= 2.0);
        Some((grads * 2.0).map_err(|e| e.to_string()))
    }
}

fn recorder(local: bool) -> (Box<Recorder>, Arc<Mutex<Vec<usize>>>) {
    let lens = Arc::new(Mutex::new(Vec::new()));
    let r = Recorder {
        local,
        lens: lens.clone(),
    };
    (Box::new(r), lens)
}

fn write_config(dir: &Path, model: &Path, body: &str, data: &[(&str, String)]) -> RunConfig {
    let mut paths = String::new();
    for (key, lines) in data {
        let p = dir.join(format!("{key}.jsonl"));
        std::fs::write(&p, lines).unwrap();
        paths.push_str(&format!("{key} = {:?}\n", p.display().to_string()));
    }
    let text = format!(
        "output_dir = {:?}\n[model]\npath = {:?}\n[data]\n{paths}[lora]\nrank = 4\n\
         [optimizer]\nlr = 1e-2\nweight_decay = 0.01\ngrad_clip = 0.5\n{body}",
        dir.join("run").display().to_string(),
        model.display().to_string(),
    );
    let p = dir.join("run.toml");
    std::fs::write(&p, text).unwrap();
    RunConfig::load(&p).unwrap_or_else(|e| panic!("{e}"))
}

fn sft(dir: &Path, model: &Path) -> RunConfig {
    let lines: String = (0..24)
        .map(|i| {
            let q = "x".repeat(1 + (i * 7) % 23);
            format!(
                "{{\"messages\":[{{\"role\":\"user\",\"content\":\"Echo {q}\"}},\
                 {{\"role\":\"assistant\",\"content\":\"{q} {i}\"}}]}}\n"
            )
        })
        .collect();
    write_config(
        dir,
        model,
        "[train]\nbatch_size = 8\nmicro_batch_tokens = 64\nmax_steps = 4\n",
        &[("train", lines)],
    )
}

fn dpo(dir: &Path, model: &Path) -> RunConfig {
    let lines: String = (0..16)
        .map(|i| {
            let q = "x".repeat(1 + (i * 7) % 23);
            format!(
                "{{\"prompt\": \"Echo {q}\", \"chosen\": \"{q} {i}\", \"rejected\": \"no{}\"}}\n",
                "!".repeat(i % 5)
            )
        })
        .collect();
    write_config(
        dir,
        model,
        "[train]\nmethod = \"dpo\"\nbatch_size = 4\nmicro_batch_tokens = 64\nmax_steps = 2\n\
         [dpo]\nbeta = 0.5\n",
        &[("train", lines)],
    )
}

fn rl(dir: &Path, model: &Path) -> RunConfig {
    write_config(
        dir,
        model,
        "[train]\nmethod = \"rl\"\nmax_steps = 2\nsave_every = 0\n\
         [rl]\ngroups_per_step = 2\ngroup_size = 4\nmax_tokens = 4\n",
        &[],
    )
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn set_device_adamw(on: bool) {
    std::env::set_var(DEVICE_ADAMW_ENV, if on { "1" } else { "0" });
}

#[test]
fn device_adamw_in_the_trainers() {
    let m = tempfile::tempdir().unwrap();
    let model: PathBuf = m.path().join("m");
    ringtune_node::init_model("quickstart", &model, 0, 2048).unwrap();
    let n = {
        let d = tempfile::tempdir().unwrap();
        set_device_adamw(false);
        let t = Trainer::new(sft(d.path(), &model), false, Box::new(LocalSync)).unwrap();
        t.model().param_layout().numel()
    };

    // One process: host AdamW vs the gradient sum and AdamW on the device.
    let dirs: Vec<_> = (0..6).map(|_| tempfile::tempdir().unwrap()).collect();
    set_device_adamw(false);
    let (sync, host_lens) = recorder(true);
    let mut host = Trainer::new(sft(dirs[0].path(), &model), false, sync).unwrap();
    let (sync, host_twin_lens) = recorder(false);
    let mut host_rank = Trainer::new(sft(dirs[1].path(), &model), false, sync).unwrap();
    set_device_adamw(true);
    let (sync, dev_lens) = recorder(true);
    let mut dev = Trainer::new(sft(dirs[2].path(), &model), false, sync).unwrap();
    let (sync, dev_rank_lens) = recorder(false);
    let mut dev_rank = Trainer::new(sft(dirs[3].path(), &model), false, sync).unwrap();
    for step in 1..=4 {
        let (h, d) = (host.train_step().unwrap(), dev.train_step().unwrap());
        let (hr, dr) = (
            host_rank.train_step().unwrap(),
            dev_rank.train_step().unwrap(),
        );
        if step == 1 {
            // Same parameters going in: the same loss to the bit.
            assert_eq!(h.loss, d.loss);
        }
        assert!(
            (h.loss - d.loss).abs() <= 1e-5 * h.loss,
            "step {step}: loss {} (host) vs {} (device)",
            h.loss,
            d.loss
        );
        assert!(
            (h.grad_norm - d.grad_norm).abs() <= 1e-4 * h.grad_norm,
            "step {step}: grad norm {} vs {}",
            h.grad_norm,
            d.grad_norm
        );
        assert_eq!((hr.loss, hr.grad_norm), (dr.loss, dr.grad_norm));
    }
    // The device-resident sum reached the sync as its two scalars only.
    assert_eq!(*host_lens.lock().unwrap(), vec![n + 2; 4]);
    assert_eq!(*dev_lens.lock().unwrap(), vec![2; 4]);
    assert_eq!(*host_twin_lens.lock().unwrap(), vec![n + 2; 4]);
    assert_eq!(*dev_rank_lens.lock().unwrap(), vec![n + 2; 4]);
    let (hp, dp) = (host.params_flat().unwrap(), dev.params_flat().unwrap());
    let worst = hp
        .iter()
        .zip(&dp)
        .map(|(a, b)| (a - b).abs() / a.abs().max(1e-3))
        .fold(0f32, f32::max);
    assert!(
        worst <= 1e-3,
        "device AdamW drifted from the host's by {worst:e}"
    );
    // A rank's device update is the host's, bit for bit.
    assert_eq!(
        bits(&host_rank.params_flat().unwrap()),
        bits(&dev_rank.params_flat().unwrap()),
        "a distributed rank's device AdamW is not the host's bit for bit"
    );
    assert_eq!(
        host_rank.adapter_sha256().unwrap(),
        dev_rank.adapter_sha256().unwrap()
    );

    // Resume on the device path: 2 steps, checkpoint, a new trainer for steps 3 and 4.
    let cfg = sft(dirs[4].path(), &model);
    let mut first = Trainer::new(cfg.clone(), false, Box::new(LocalSync)).unwrap();
    first.train_step().unwrap();
    first.train_step().unwrap();
    first.save().unwrap();
    drop(first);
    let mut resumed = Trainer::new(cfg, true, Box::new(LocalSync)).unwrap();
    assert_eq!(resumed.step(), 2);
    resumed.train_step().unwrap();
    resumed.train_step().unwrap();
    assert_eq!(
        bits(&resumed.params_flat().unwrap()),
        bits(&dp),
        "the resumed device-AdamW run differs from the straight one"
    );

    // A rank whose sync sums device memory (NCCL's path): one device collective per step,
    // never the host buffer; the gradient doubled and Σw doubled cancel, so it follows the
    // one-process host run (its norm is the device's f32 sum, so to rounding).
    let calls = Arc::new(Mutex::new(Vec::new()));
    let d5 = tempfile::tempdir().unwrap();
    let mut twin = Trainer::new(
        sft(d5.path(), &model),
        false,
        Box::new(DeviceTwin {
            calls: calls.clone(),
        }),
    )
    .unwrap();
    for _ in 0..4 {
        twin.train_step().unwrap();
    }
    assert_eq!(*calls.lock().unwrap(), vec!["device"; 4]);
    let tp = twin.params_flat().unwrap();
    let worst = hp
        .iter()
        .zip(&tp)
        .map(|(a, b)| (a - b).abs() / a.abs().max(1e-3))
        .fold(0f32, f32::max);
    assert!(worst <= 1e-3, "the device-summed rank drifted by {worst:e}");

    // DPO as a rank: bit for bit.
    let pair: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    set_device_adamw(false);
    let mut a = Trainer::new(dpo(pair[0].path(), &model), false, recorder(false).0).unwrap();
    set_device_adamw(true);
    let mut b = Trainer::new(dpo(pair[1].path(), &model), false, recorder(false).0).unwrap();
    for _ in 0..2 {
        let (x, y) = (a.train_step().unwrap(), b.train_step().unwrap());
        assert_eq!((x.loss, x.grad_norm), (y.loss, y.grad_norm));
    }
    assert_eq!(
        bits(&a.params_flat().unwrap()),
        bits(&b.params_flat().unwrap()),
        "DPO: device AdamW is not the host's bit for bit"
    );

    // RL as a rank: bit for bit; and in one process it runs and trains.
    let run_rl = |dir: &Path, device: bool, local: bool| {
        set_device_adamw(device);
        let mut t = RlTrainer::new(rl(dir, &model), false, recorder(local).0).unwrap();
        let out = t.run(&AtomicBool::new(false), &mut |_| {}).unwrap();
        assert!(matches!(out, RlOutcome::Finished { step: 2 }));
        t.params_flat().unwrap()
    };
    let rl_dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let h = run_rl(rl_dirs[0].path(), false, false);
    let d = run_rl(rl_dirs[1].path(), true, false);
    assert_eq!(bits(&h), bits(&d), "RL: device AdamW is not the host's");
    let local = run_rl(rl_dirs[2].path(), true, true);
    let worst = h
        .iter()
        .zip(&local)
        .map(|(a, b)| (a - b).abs() / a.abs().max(1e-3))
        .fold(0f32, f32::max);
    assert!(worst <= 1e-3, "RL on the device drifted by {worst:e}");
}
