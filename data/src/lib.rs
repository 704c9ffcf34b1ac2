//! ringtune-data: see ARCHITECTURE.md for what this crate owns.
