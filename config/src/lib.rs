//! ringtune-config: see ARCHITECTURE.md for what this crate owns.
