//! `model.device` / `--device` selection: `auto` follows the launcher's slot on the host,
//! `cuda:N` on a binary without CUDA is an error naming the cargo feature. Pure logic: no
//! GPU needed.

use ringtune_config::Device;
use ringtune_node::trainer::{choose_device, device_for, local_gpu_index, resolve_device};

fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |k| {
        vars.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.to_string())
    }
}

#[test]
fn local_slot_comes_from_the_launcher() {
    assert_eq!(local_gpu_index(env(&[])).unwrap(), 0);
    assert_eq!(local_gpu_index(env(&[("LOCAL_RANK", "3")])).unwrap(), 3);
    assert_eq!(local_gpu_index(env(&[("SLURM_LOCALID", "2")])).unwrap(), 2);
    // torchrun's variable wins over Slurm's.
    assert_eq!(
        local_gpu_index(env(&[("SLURM_LOCALID", "2"), ("LOCAL_RANK", "1")])).unwrap(),
        1
    );
    // One GPU bound per process: it is cuda:0 whatever the rank.
    assert_eq!(
        local_gpu_index(env(&[("LOCAL_RANK", "5"), ("CUDA_VISIBLE_DEVICES", "5")])).unwrap(),
        0
    );
    assert_eq!(
        local_gpu_index(env(&[("LOCAL_RANK", "1"), ("CUDA_VISIBLE_DEVICES", "0,1")])).unwrap(),
        1
    );
    let e = local_gpu_index(env(&[("LOCAL_RANK", "x1")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("LOCAL_RANK") && e.contains("x1"), "{e}");
}

#[test]
fn auto_picks_the_slots_gpu_only_in_a_cuda_build() {
    assert_eq!(
        choose_device(Device::Auto, true, 2).unwrap(),
        Device::Cuda(2)
    );
    assert_eq!(choose_device(Device::Auto, false, 2).unwrap(), Device::Cpu);
    assert_eq!(choose_device(Device::Cpu, true, 2).unwrap(), Device::Cpu);
    assert_eq!(
        choose_device(Device::Cuda(1), true, 0).unwrap(),
        Device::Cuda(1)
    );
}

#[test]
fn cuda_without_a_cuda_build_names_the_feature() {
    let e = choose_device(Device::Cuda(0), false, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cuda:0") && e.contains("--features cuda"), "{e}");
    // `cuda` in a config or flag is cuda:0.
    assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
}

#[test]
fn this_binary_resolves_consistently() {
    // Whatever this test binary was built with: auto never fails without a GPU, and an
    // explicit cuda:N fails here exactly when CUDA is not compiled in.
    let cuda = cfg!(feature = "nccl");
    let d = resolve_device(Device::Auto, 0).unwrap();
    if !cuda {
        assert_eq!(d, Device::Cpu);
        assert!(device_for(Device::Auto, 0).unwrap().is_cpu());
        let e = device_for(Device::Cuda(0), 0).unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }
    assert!(device_for(Device::Cpu, 7).unwrap().is_cpu());
}
