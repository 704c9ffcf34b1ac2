//! ringtune-coordinator: see ARCHITECTURE.md for what this crate owns.
