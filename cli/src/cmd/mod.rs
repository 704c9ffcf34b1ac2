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

/// How long after a first SIGTERM another SIGTERM still counts as the same stop request.
/// On Slurm, `scancel` signals every process of the job while the batch script and `srun`
/// forward theirs, so one stop arrives as two or three SIGTERMs within milliseconds; taking
/// the second as "stop at once" lost the checkpoint the first asked for. A SIGINT (a
/// person's second Ctrl-C) always counts.
pub(crate) const TERM_ECHO: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether signal `next` repeats the first stop request (`first`, received at `first_at`)
/// rather than asking to stop at once (see [`TERM_ECHO`]).
pub(crate) fn is_term_echo(first: i32, first_at: std::time::Instant, next: i32) -> bool {
    first == libc::SIGTERM && next == libc::SIGTERM && first_at.elapsed() < TERM_ECHO
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_quick_second_sigterm_is_an_echo() {
        let now = std::time::Instant::now();
        assert!(super::is_term_echo(libc::SIGTERM, now, libc::SIGTERM));
        assert!(!super::is_term_echo(libc::SIGTERM, now, libc::SIGINT));
        assert!(!super::is_term_echo(libc::SIGINT, now, libc::SIGTERM));
        assert!(!super::is_term_echo(libc::SIGINT, now, libc::SIGINT));
        let long_ago = now - super::TERM_ECHO - std::time::Duration::from_millis(1);
        assert!(!super::is_term_echo(libc::SIGTERM, long_ago, libc::SIGTERM));
    }
}
