//! Builds and runs a C++ harness that compiles CUDA kernels on the CPU against
//! `src/cuda/emu.h` (shared by `flash_emu.rs` and `kernels_emu.rs`).
//!
//! Needs a C++20 compiler (`$CXX`, else `c++`); without one the caller's test says so and
//! passes, unless `RINGTUNE_REQUIRE_CXX=1`.

use std::path::Path;
use std::process::Command;

/// Compiles `tests/<harness>/main.cpp` with `defines`, runs it, and checks that it exited
/// cleanly with exactly `expected_ok` lines ending in ": ok" (a harness that stopped early
/// must not pass). Skips, saying so, when there is no C++ compiler and
/// `RINGTUNE_REQUIRE_CXX` is not 1.
pub fn run_harness(harness: &str, defines: &[&str], expected_ok: usize) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join(harness);
    let built = Command::new(&cxx)
        .args([
            "-std=c++20",
            "-O2",
            "-pthread",
            "-fno-strict-aliasing",
            "-DRINGTUNE_EMU",
        ])
        .args(defines)
        .arg("-I")
        .arg(root.join("src/cuda"))
        .arg(root.join("tests").join(harness).join("main.cpp"))
        .arg("-o")
        .arg(&exe)
        .output();
    let built = match built {
        Ok(out) => out,
        Err(e) if std::env::var("RINGTUNE_REQUIRE_CXX").as_deref() != Ok("1") => {
            eprintln!("SKIPPED: no C++ compiler ({cxx:?}: {e}); set CXX to run this test");
            return;
        }
        Err(e) => panic!("{cxx:?}: {e}"),
    };
    assert!(
        built.status.success(),
        "compiling the emulated kernels ({harness}) failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    let text = String::from_utf8_lossy(&run.stdout);
    eprintln!("{harness} {defines:?}\n{text}");
    assert!(
        run.status.success(),
        "a check is over its bound ({harness} {defines:?}):\n{text}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(
        text.lines().filter(|l| l.ends_with(": ok")).count(),
        expected_ok,
        "{text}"
    );
}
