//! Runs the shell tests of `deploy/slurm/ringtune.sbatch` (fake `srun`,
//! `scontrol` and `ringtune`; see deploy/slurm/tests/test_sbatch.sh), so the
//! batch script's logic is checked by `cargo test --workspace` like the rest.

use std::path::Path;
use std::process::Command;

#[test]
fn sbatch_script_logic_with_a_fake_srun() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/slurm/tests/test_sbatch.sh");
    // The batch script needs bash >= 4.4 (mapfile, empty arrays under `set -u`),
    // as every Slurm cluster's Linux has; skip where there is none (macOS's 3.2).
    let version = Command::new("bash")
        .args(["-c", "echo ${BASH_VERSINFO[0]}.${BASH_VERSINFO[1]}"])
        .output();
    let ok = version.as_ref().ok().and_then(|o| {
        let v = String::from_utf8_lossy(&o.stdout);
        let (major, minor) = v.trim().split_once('.')?;
        Some((major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?) >= (4, 4))
    });
    if ok != Some(true) {
        eprintln!("skipping: bash >= 4.4 not found ({version:?})");
        return;
    }
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .expect("run test_sbatch.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} failed:\n{stdout}\n{stderr}",
        script.display()
    );
    assert!(stdout.contains("ringtune.sbatch cases passed"), "{stdout}");
}
