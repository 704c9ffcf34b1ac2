//! Regenerates the bundled quickstart datasets from their generator:
//! `cargo run -p ringtune-data --example gen_quickstart_datasets [DIR]`
//! (DIR defaults to the repository's `datasets/`).

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../datasets"));
    if let Err(e) = ringtune_data::quickstart::write_bundled_datasets(&dir) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    println!("wrote {}", dir.display());
}
