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
        imp::usage()
    }
}

/// The memory of the cgroup (v2) the process runs in: what the kernel charges it and its
/// limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CgroupMemory {
    /// `memory.current`, in bytes.
    pub(crate) current: u64,
    /// `memory.max`, in bytes; `None` when it is `max` (no limit).
    pub(crate) max: Option<u64>,
}

impl CgroupMemory {
    /// Reads the figures of the process's cgroup v2; `None` when there is none to read (not
    /// Linux, cgroup v1 only, or the files are not visible from here).
    pub(crate) fn read() -> Option<Self> {
        imp::cgroup()
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use super::{CgroupMemory, ProcessMemory, ProcessUsage};
    use std::path::PathBuf;
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

    pub(super) fn usage() -> Option<ProcessUsage> {
        let page = page_size()?;
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
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

    pub(super) fn cgroup() -> Option<CgroupMemory> {
        // A process does not change cgroup on its own: find the directory once.
        static DIRECTORY: OnceLock<Option<PathBuf>> = OnceLock::new();
        let directory = DIRECTORY.get_or_init(|| {
            let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
            cgroup_directory(&cgroups, &mounts)
        });
        let directory = directory.as_ref()?;
        let read = |file: &str| std::fs::read_to_string(directory.join(file)).ok();
        let current = read("memory.current")?.trim().parse().ok()?;
        let max = match read("memory.max")?.trim() {
            "max" => None,
            limit => Some(limit.parse().ok()?),
        };
        Some(CgroupMemory { current, max })
    }

    /// The directory of the process's cgroup v2, from `/proc/self/cgroup` (its `0::<path>`
    /// line) and `/proc/self/mountinfo` (where the `cgroup2` hierarchy is mounted, and which
    /// of its directories is the mount's root).
    pub(super) fn cgroup_directory(cgroups: &str, mountinfo: &str) -> Option<PathBuf> {
        let path = cgroups.lines().find_map(|line| line.strip_prefix("0::"))?;
        mountinfo.lines().find_map(|line| {
            let (mount, filesystem) = line.split_once(" - ")?;
            if filesystem.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            // id parent major:minor root mount-point ...
            let mut fields = mount.split_whitespace().skip(3);
            let (root, point) = (fields.next()?, fields.next()?);
            let inside = path.strip_prefix(root.trim_end_matches('/'))?;
            if !(inside.is_empty() || inside.starts_with('/')) {
                return None;
            }
            let directory = PathBuf::from(point).join(inside.trim_start_matches('/'));
            directory
                .join("memory.current")
                .exists()
                .then_some(directory)
        })
    }

    /// The value in bytes of a `Name:   1234 kB` line.
    pub(super) fn kib_field(text: &str, name: &str) -> Option<u64> {
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
    pub(super) fn usage() -> Option<super::ProcessUsage> {
        None
    }
    pub(super) fn cgroup() -> Option<super::CgroupMemory> {
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
        let vm_size = imp::kib_field(&status, "VmSize:").unwrap();
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

    #[test]
    fn the_cgroup_directory_is_found_under_the_cgroup2_mount() {
        let mounts = "24 30 0:22 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n\
                      25 30 0:23 / /proc rw - proc proc rw\n";
        // The directory must exist to be chosen: none of these does on a test machine.
        assert_eq!(
            imp::cgroup_directory("0::/app.slice/x.service\n", mounts),
            None
        );
        assert_eq!(imp::cgroup_directory("4:memory:/x\n", mounts), None);
        // With the mount's root at a directory of the hierarchy (a cgroup namespace), the
        // path is taken relative to it; a path outside the root is not this mount's.
        let dir = std::env::temp_dir().join(format!("tj-cgroup-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("inner")).unwrap();
        std::fs::write(dir.join("inner/memory.current"), "1\n").unwrap();
        let mounts = format!(
            "24 30 0:22 /outer {} rw - cgroup2 cgroup2 rw\n",
            dir.display()
        );
        assert_eq!(
            imp::cgroup_directory("0::/outer/inner\n", &mounts),
            Some(dir.join("inner"))
        );
        assert_eq!(imp::cgroup_directory("0::/elsewhere\n", &mounts), None);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
