//! ringtune-collectives: see ARCHITECTURE.md for what this crate owns.
