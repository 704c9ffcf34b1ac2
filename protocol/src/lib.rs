//! ringtune-protocol: see ARCHITECTURE.md for what this crate owns.
