//! One module per subcommand.

pub mod bench;
pub mod bench_allreduce;
pub mod bench_train;
pub mod coordinator;
pub mod eval;
pub mod forward_backward;
pub mod init_model;
pub mod merge;
pub mod node;
pub mod sample;
pub mod train;
