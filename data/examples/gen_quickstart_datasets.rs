//! Regenerates the bundled quickstart datasets (chats and DPO preference pairs) from their
//! generator:
//! `cargo run -p ringtune-data --example gen_quickstart_datasets [DIR]`
//! (DIR defaults to the repository's `datasets/`).

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../datasets"));
    let q = &ringtune_data::quickstart::write_bundled_datasets;
    let p = &ringtune_data::quickstart::write_bundled_preference_datasets;
    if let Err(e) = q(&dir).and_then(|()| p(&dir)) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    println!("wrote {}", dir.display());
}
