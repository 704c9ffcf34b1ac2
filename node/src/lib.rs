//! ringtune-node: see ARCHITECTURE.md for what this crate owns.
