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
    use crate::jemalloc::ctl::{ctl, ArenasControl};
    use crate::system::{CgroupMemory, ProcessUsage};

    pub(super) fn usage() -> Option<u64> {
        ProcessUsage::read().map(|usage| usage.resident)
    }

    pub(super) fn reclaimable() -> Option<u64> {
        let stats = ctl().ok()?.snapshot().ok()?;
        Some(stats.dirty + stats.muzzy)
    }

    pub(super) fn give_back(_bytes: u64) -> Option<GiveBack> {
        let ctl = ctl().ok()?;
        let before = ctl.snapshot().ok()?;
        ctl.arenas_control(ArenasControl::Purge).ok()?;
        let after = ctl.snapshot().ok()?;
        let held = |stats: &crate::JemallocStats| stats.dirty + stats.muzzy;
        Some(GiveBack {
            bytes: held(&before).saturating_sub(held(&after)),
            left: held(&after),
        })
    }

    pub(super) fn available() -> Option<(u64, &'static str)> {
        if let Some(max) = CgroupMemory::read().and_then(|cgroup| cgroup.max) {
            return Some((max, "cgroup v2 memory.max"));
        }
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some((kib * 1024, "physical memory"))
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
