//! [`ProcessMemory`]: the OS's view of the process's memory, for the purge report: jemalloc's
//! `resident` is its own accounting, while pages released with `MADV_FREE` stay in the process's RSS until the
//! kernel needs them. The issue asked for `/proc/self/statm`; `VmRSS` in `/proc/self/status` is
//! the same figure in kB.

use serde::{Deserialize, Serialize};

/// The process's memory as the kernel reports it (Linux only).
///
/// Serialized as `{"rss":…,"lazy_free":…}`, without `lazy_free` when it is not known.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ProcessMemory {
    /// Resident set size in bytes (`VmRSS` in `/proc/self/status`: the figure of
    /// `/proc/self/statm`, already in kB, so no page size and no `unsafe` `sysconf` is needed).
    pub rss: u64,
    /// Bytes in pages released with `MADV_FREE` that the kernel has not reclaimed yet
    /// (`LazyFree` in `/proc/self/smaps_rollup`), when that file is readable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy_free: Option<u64>,
}

impl ProcessMemory {
    /// Reads the current figures; `None` where they are not available (not Linux, or `/proc`
    /// not mounted).
    pub fn read() -> Option<Self> {
        imp::read()
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use super::ProcessMemory;

    pub(super) fn read() -> Option<ProcessMemory> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        Some(ProcessMemory {
            rss: kib_field(&status, "VmRSS:")?,
            lazy_free: std::fs::read_to_string("/proc/self/smaps_rollup")
                .ok()
                .and_then(|rollup| kib_field(&rollup, "LazyFree:")),
        })
    }

    /// The value in bytes of a `Name:   1234 kB` line.
    fn kib_field(text: &str, name: &str) -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
        Some(kib * 1024)
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    pub(super) fn read() -> Option<super::ProcessMemory> {
        None
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let memory = ProcessMemory::read().expect("Linux has /proc/self/statm");
        assert!(memory.rss > 0);
        let json = serde_json::to_string(&memory).unwrap();
        assert!(
            json.starts_with(&format!("{{\"rss\":{}", memory.rss)),
            "{json}"
        );
    }
}
