//! Newtypes that cross the API: ranks, world sizes, steps, sequence numbers, and the
//! per-call context every collective carries.

use std::fmt;
use std::time::Duration;

macro_rules! newtype {
    ($(#[$m:meta])* $name:ident($t:ty)) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub $t);
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

newtype!(
    /// A process's position in the ring, `0..world`.
    Rank(u32)
);
newtype!(
    /// Number of ranks taking part.
    WorldSize(u32)
);
newtype!(
    /// The caller's training step, carried for error messages and divergence checks.
    Step(u64)
);
newtype!(
    /// The n-th collective issued on a communicator; every rank counts the same way.
    Seq(u64)
);

impl Rank {
    /// As an index.
    pub fn idx(self) -> usize {
        self.0 as usize
    }
}

impl WorldSize {
    /// As a count.
    pub fn get(self) -> usize {
        self.0 as usize
    }
}

/// What every collective call carries besides its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call {
    /// The caller's step (for error messages; also checked against the peers').
    pub step: Step,
    /// The whole collective must finish within this, or fail on this rank.
    pub timeout: Duration,
}

impl Call {
    /// A call at `step` with the given timeout.
    pub fn new(step: u64, timeout: Duration) -> Self {
        Self {
            step: Step(step),
            timeout,
        }
    }
}
