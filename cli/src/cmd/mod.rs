//! One module per subcommand.

pub mod bench;
pub mod bench_allreduce;
pub mod bench_train;
pub mod forward_backward;
