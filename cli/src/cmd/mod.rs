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
pub mod render;
pub mod sample;
pub mod train;

/// A thread count for the benchmarks, which print it: at least 1 (elsewhere 0 means "all
/// cores", which a benchmark table would misreport).
pub(crate) fn bench_threads(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("'{s}' is not a thread count of at least 1")),
    }
}
