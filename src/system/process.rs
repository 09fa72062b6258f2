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

/// The process's resident and virtual memory, for the `process.memory.*` gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcessUsage {
    /// Resident set size in bytes (`VmRSS`).
    pub(crate) resident: u64,
    /// Virtual memory size in bytes (`VmSize`).
    pub(crate) virtual_size: u64,
}

impl ProcessUsage {
    /// Reads `/proc/self/statm` (read on every scrape: a few microseconds, against tens for
    /// `/proc/self/status`), in pages of the size the kernel gave the process in its auxiliary
    /// vector; `None` where either is not available.
    pub(crate) fn read() -> Option<Self> {
        imp::usage_in(std::path::Path::new("/"))
    }

    /// Reads `root/proc/self/statm` instead, for tests (the page size is still this
    /// process's).
    pub(crate) fn read_in(root: &std::path::Path) -> Option<Self> {
        imp::usage_in(root)
    }
}

/// The value in bytes of a `Name:   1234 kB` line.
pub(crate) fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(target_os = "linux")]
mod imp {
    use super::{kib_field, ProcessMemory, ProcessUsage};
    use std::path::Path;
    use std::sync::OnceLock;

    pub(super) fn read() -> Option<ProcessMemory> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        Some(ProcessMemory {
            rss: kib_field(&status, "VmRSS:")?,
            lazy_free: std::fs::read_to_string("/proc/self/smaps_rollup")
                .ok()
                .and_then(|rollup| kib_field(&rollup, "LazyFree:")),
        })
    }

    pub(super) fn usage_in(root: &Path) -> Option<ProcessUsage> {
        let page = page_size()?;
        let statm = std::fs::read_to_string(root.join("proc/self/statm")).ok()?;
        // size resident shared text lib data dt, in pages.
        let mut pages = statm.split_whitespace().map(|n| n.parse::<u64>().ok());
        let (size, resident) = (pages.next()??, pages.next()??);
        Some(ProcessUsage {
            resident: resident * page,
            virtual_size: size * page,
        })
    }

    /// The page size (`AT_PAGESZ` in `/proc/self/auxv`), read once: `sysconf` would need
    /// `unsafe`.
    fn page_size() -> Option<u64> {
        static PAGE: OnceLock<Option<u64>> = OnceLock::new();
        *PAGE.get_or_init(|| page_size_in(&std::fs::read("/proc/self/auxv").ok()?))
    }

    /// `AT_PAGESZ` in an auxiliary vector: (key, value) pairs of native words.
    pub(super) fn page_size_in(auxv: &[u8]) -> Option<u64> {
        const AT_PAGESZ: usize = 6;
        const WORD: usize = std::mem::size_of::<usize>();
        auxv.chunks_exact(2 * WORD)
            .find_map(|pair| {
                let word = |bytes: &[u8]| bytes.try_into().ok().map(usize::from_ne_bytes);
                (word(&pair[..WORD])? == AT_PAGESZ).then(|| word(&pair[WORD..]))?
            })
            .map(|page| page as u64)
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    pub(super) fn read() -> Option<super::ProcessMemory> {
        None
    }
    pub(super) fn usage_in(_: &std::path::Path) -> Option<super::ProcessUsage> {
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

    #[test]
    fn usage_agrees_with_the_status_file() {
        let usage = ProcessUsage::read().expect("Linux has /proc/self/statm and auxv");
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let vm_size = kib_field(&status, "VmSize:").unwrap();
        // The virtual size hardly moves between the two reads; RSS may, a little.
        assert!(usage.virtual_size.abs_diff(vm_size) <= vm_size / 100);
        assert!(usage.resident > 0 && usage.virtual_size >= usage.resident);
    }

    #[test]
    fn the_page_size_is_found_in_an_auxiliary_vector() {
        let words = |pairs: &[(usize, usize)]| -> Vec<u8> {
            pairs
                .iter()
                .flat_map(|&(key, value)| [key.to_ne_bytes(), value.to_ne_bytes()])
                .flatten()
                .collect()
        };
        assert_eq!(
            imp::page_size_in(&words(&[(33, 1), (6, 16384), (0, 0)])),
            Some(16384)
        );
        assert_eq!(imp::page_size_in(&words(&[(33, 1), (0, 0)])), None);
        assert_eq!(imp::page_size_in(&[]), None);
    }
}
