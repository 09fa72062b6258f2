//! The policy's readings from the OS and jemalloc, and the limit a percentage is taken of.

use super::policy::{GiveBack, Readings};
use std::time::{Duration, Instant};

/// The real readings: the usage the OOM killer watches, jemalloc's dirty and muzzy pages, and
/// giving them back.
#[derive(Debug)]
pub(crate) struct Real {
    start: Instant,
}

impl Real {
    pub(crate) fn new() -> Self {
        Self {
            start: Instant::now(),
        }
    }
}

impl Readings for Real {
    fn usage(&mut self) -> Option<u64> {
        usage()
    }

    fn reclaimable(&mut self) -> Option<u64> {
        imp::reclaimable()
    }

    fn give_back(&mut self, bytes: u64) -> Option<GiveBack> {
        imp::give_back(bytes)
    }

    fn now(&mut self) -> Duration {
        self.start.elapsed()
    }
}

/// What the OOM killer watches, in bytes: the cgroup's usage inside a cgroup with a limit,
/// otherwise the process's RSS.
pub(crate) fn usage() -> Option<u64> {
    imp::usage()
}

/// The limit a [`MemoryLimit::PercentOfAvailable`](super::MemoryLimit) is taken of, and where
/// it came from (`"cgroup v2 memory.max"`, `"cgroup v1 memory.limit_in_bytes"`,
/// `"physical memory"`).
pub(crate) fn available() -> Option<(u64, &'static str)> {
    imp::available()
}

#[cfg(jemalloc)]
mod imp {
    use super::GiveBack;
    use crate::jemalloc::ctl::ctl;
    use crate::jemalloc::give_back;
    use crate::system::limit::{detect_limit, memory_usage};

    pub(super) fn usage() -> Option<u64> {
        memory_usage().map(|usage| usage.bytes)
    }

    pub(super) fn reclaimable() -> Option<u64> {
        give_back::reclaimable(ctl().ok()?).ok()
    }

    pub(super) fn give_back(bytes: u64) -> Option<GiveBack> {
        let given = give_back::give_back(ctl().ok()?, bytes).ok()?;
        Some(GiveBack {
            bytes: given.bytes,
            left: given.left,
        })
    }

    pub(super) fn available() -> Option<(u64, &'static str)> {
        detect_limit().map(|limit| (limit.bytes, limit.source.as_str()))
    }
}

#[cfg(not(jemalloc))]
mod imp {
    use super::GiveBack;

    pub(super) fn usage() -> Option<u64> {
        None
    }
    pub(super) fn reclaimable() -> Option<u64> {
        None
    }
    pub(super) fn give_back(_bytes: u64) -> Option<GiveBack> {
        None
    }
    pub(super) fn available() -> Option<(u64, &'static str)> {
        None
    }
}
