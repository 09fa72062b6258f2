//! The memory governor: keeps the process under a memory limit by giving jemalloc's cached
//! pages back to the OS by amount, and tells the application (and the layer's load shedding)
//! how close to the limit it is.
//!
//! - [`limit`]: [`MemoryLimit`], what the user gives, and its parser.
//! - [`policy`]: the rules (high-water mark, poll interval, CPU budget, the unreclaimable
//!   state), as plain logic over injected readings; its module docs give every number.
//! - [`readings`]: the policy's readings from the OS and jemalloc.
//! - [`thread`]: the one governor of the process, its thread (`jemalloc-governor`), and what
//!   it publishes (the pressure channel, the figures the telemetry reads, the shedding flags).
//!
//! Knows nothing of HTTP: the layer's service reads one flag per request and answers the shed
//! requests itself.

mod limit;
mod policy;
mod readings;
mod thread;

pub use limit::{MemoryLimit, MemoryLimitError};
pub(crate) use readings::usage;
pub(crate) use thread::{Governor, HoldsShedding, LimitSetting, Shedding, Status};

/// How close the process is to its memory limit, as the governor last judged it (after giving
/// back what it could). Watch it with
/// [`JemallocLayer::memory_pressure`](crate::JemallocLayer::memory_pressure).
///
/// Exported as the gauge `jemalloc_memory_pressure`: 0 for `Ok`, 1 for `Near`, 2 for `Over`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Pressure {
    /// Under the high-water mark (90 % of the limit), or no limit is set.
    #[default]
    Ok,
    /// Between the high-water mark and the limit: the governor is giving cached pages back.
    Near,
    /// Over the limit after giving back what it could: live memory, not cached pages, is
    /// what exceeds it. Forwarded requests are shed if shedding is on.
    Over,
}

impl Pressure {
    /// Its value in the `jemalloc_memory_pressure` gauge: 0, 1 or 2.
    pub fn as_gauge(self) -> u64 {
        match self {
            Self::Ok => 0,
            Self::Near => 1,
            Self::Over => 2,
        }
    }

    fn from_gauge(value: u8) -> Self {
        match value {
            1 => Self::Near,
            2 => Self::Over,
            _ => Self::Ok,
        }
    }
}
