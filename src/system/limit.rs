//! How much memory the process may use, and how much it uses by the same measure: the two
//! figures a memory governor compares.
//!
//! - [`detect_limit`]: the tightest cgroup v2 `memory.max` of the process's cgroup and its
//!   ancestors, else the same for cgroup v1's `memory.limit_in_bytes`, else the machine's
//!   `MemTotal`. A cgroup limit above `MemTotal` does not bind: physical memory runs out first,
//!   so `MemTotal` is answered then.
//! - [`memory_usage`]: what the OOM killer that enforces that limit watches: the usage of the
//!   cgroup that sets the limit (v2 `memory.current`, v1 `memory.usage_in_bytes`) when the limit
//!   is a cgroup's, else the process's RSS.
//!
//! The cgroup's usage includes the page cache it has charged (files the process read or
//! wrote), which the kernel reclaims before it kills; a process that does much file I/O sees
//! it here. That is the figure the kernel compares with the limit, and one small file read,
//! which is why it is the one watched.
//!
//! Each function has an `_in(root)` twin reading every file below `root` instead of `/`, for
//! tests with fake files. Nothing here creates a cgroup or changes a limit.

use super::cgroup::{read_u64, Cgroup, CgroupVersion};
use super::process::{kib_field, ProcessUsage};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Where a detected limit comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LimitSource {
    /// `memory.max` of the process's cgroup v2 (or of an ancestor, when tighter).
    CgroupV2,
    /// `memory.limit_in_bytes` of the process's cgroup v1 memory controller (or of an
    /// ancestor, when tighter).
    CgroupV1,
    /// `MemTotal` in `/proc/meminfo`.
    PhysicalMemory,
}

impl LimitSource {
    /// How the config endpoint and the docs name it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::CgroupV2 => "cgroup v2 memory.max",
            Self::CgroupV1 => "cgroup v1 memory.limit_in_bytes",
            Self::PhysicalMemory => "physical memory",
        }
    }
}

/// The most memory the process may use, as the system sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DetectedLimit {
    /// The limit, in bytes.
    pub(crate) bytes: u64,
    /// Where it comes from.
    pub(crate) source: LimitSource,
}

/// Whose memory [`MemoryUsage`] measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UsageOf {
    /// The cgroup whose limit binds the process (the process's own or an ancestor's): every
    /// process in it counts, and so does the page cache it has charged.
    Cgroup,
    /// The process alone: its resident set size.
    Process,
}

/// How much memory the process uses, by the measure its limit is enforced on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MemoryUsage {
    /// Bytes in use.
    pub(crate) bytes: u64,
    /// Whose.
    pub(crate) of: UsageOf,
}

/// Detects the process's memory limit (see the [module docs](self)); `None` when nothing can
/// be read (not Linux, or `/proc` not mounted).
///
/// Reads every limit file again on each call (a limit may be changed at run time), and makes
/// [`memory_usage`] follow the answer from then on.
pub(crate) fn detect_limit() -> Option<DetectedLimit> {
    let detection = Detection::of(Path::new("/"), Cgroup::of_this_process());
    *lock_usage_source() = Some(detection.usage);
    detection.limit
}

/// [`detect_limit`] with every file read below `root`.
#[cfg(test)]
pub(crate) fn detect_limit_in(root: &Path) -> Option<DetectedLimit> {
    Detection::of(root, Cgroup::find_in(root).as_ref()).limit
}

/// What the OOM killer watches (see the [module docs](self)); `None` when it cannot be read.
///
/// Cheap enough to poll every few milliseconds: one small file read. The cgroup's directories
/// are found once per process, and which figure to read is decided on the first call and again
/// on each [`detect_limit`] (the governor calls it when a limit is set). When the cgroup's file
/// cannot be read, the process's RSS is answered, marked as such.
pub(crate) fn memory_usage() -> Option<MemoryUsage> {
    let mut source = lock_usage_source();
    source
        .get_or_insert_with(|| Detection::of(Path::new("/"), Cgroup::of_this_process()).usage)
        .read(Path::new("/"))
}

/// [`memory_usage`] with every file read below `root` (nothing is remembered between calls).
#[cfg(test)]
pub(crate) fn memory_usage_in(root: &Path) -> Option<MemoryUsage> {
    Detection::of(root, Cgroup::find_in(root).as_ref())
        .usage
        .read(root)
}

/// Which figure [`memory_usage`] reads, decided by the last detection.
fn lock_usage_source() -> std::sync::MutexGuard<'static, Option<UsageSource>> {
    static SOURCE: Mutex<Option<UsageSource>> = Mutex::new(None);
    SOURCE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The figure that measures the process against its limit.
#[derive(Debug, Clone, PartialEq, Eq)]
enum UsageSource {
    /// A cgroup's usage file.
    Cgroup(PathBuf),
    /// The process's RSS.
    Process,
}

impl UsageSource {
    fn read(&self, root: &Path) -> Option<MemoryUsage> {
        if let Self::Cgroup(file) = self {
            if let Some(bytes) = read_u64(file) {
                return Some(MemoryUsage {
                    bytes,
                    of: UsageOf::Cgroup,
                });
            }
        }
        Some(MemoryUsage {
            bytes: ProcessUsage::read_in(root)?.resident,
            of: UsageOf::Process,
        })
    }
}

/// A limit and the usage that goes with it.
struct Detection {
    limit: Option<DetectedLimit>,
    usage: UsageSource,
}

impl Detection {
    fn of(root: &Path, cgroup: Option<&Cgroup>) -> Self {
        let physical = std::fs::read_to_string(root.join("proc/meminfo"))
            .ok()
            .and_then(|meminfo| kib_field(&meminfo, "MemTotal:"))
            .map(|bytes| DetectedLimit {
                bytes,
                source: LimitSource::PhysicalMemory,
            });
        let binding = cgroup.and_then(|cgroup| Some((cgroup, cgroup.binding_limit()?)));
        match binding {
            Some((cgroup, (directory, bytes)))
                if physical.is_none_or(|physical| bytes <= physical.bytes) =>
            {
                Self {
                    limit: Some(DetectedLimit {
                        bytes,
                        source: match cgroup.version {
                            CgroupVersion::V2 => LimitSource::CgroupV2,
                            CgroupVersion::V1 => LimitSource::CgroupV1,
                        },
                    }),
                    usage: UsageSource::Cgroup(directory.join(cgroup.version.usage_file())),
                }
            }
            _ => Self {
                limit: physical,
                usage: UsageSource::Process,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::cgroup::tests::{FakeRoot, V1_CGROUPS, V1_MOUNTS, V2_MOUNTS};

    const MEMINFO: &str = "MemTotal:        8000000 kB\nMemFree:         1000000 kB\n";

    /// A fake root with `/proc/meminfo` and a process of 250 resident pages.
    fn fake(name: &str) -> FakeRoot {
        let root = FakeRoot::new(name);
        root.write("proc/meminfo", MEMINFO)
            .write("proc/self/statm", "1000 250 10 5 0 200 0\n");
        root
    }

    /// The usage of the fake process: 250 pages of this machine's size.
    fn assert_process_usage(usage: Option<MemoryUsage>) {
        let usage = usage.expect("statm is readable");
        assert_eq!(usage.of, UsageOf::Process);
        let page = usage.bytes / 250;
        assert!(
            usage.bytes == page * 250 && page.is_power_of_two() && page >= 4096,
            "{usage:?}"
        );
    }

    /// No cgroup limit binds under `root`: the limit is physical memory (the fake 8,000,000
    /// kB of `MemTotal`) and the usage is the process's RSS.
    fn assert_physical_memory_and_rss(root: &FakeRoot) {
        assert_eq!(
            detect_limit_in(&root.0),
            Some(DetectedLimit {
                bytes: 8_000_000 * 1024,
                source: LimitSource::PhysicalMemory
            })
        );
        assert_process_usage(memory_usage_in(&root.0));
    }

    fn v2(root: &FakeRoot, max: &str, current: &str) {
        root.write("proc/self/cgroup", "0::/app.slice/app.service\n")
            .write("proc/self/mountinfo", V2_MOUNTS)
            .write(
                "sys/fs/cgroup/app.slice/app.service/memory.current",
                current,
            )
            .write("sys/fs/cgroup/app.slice/app.service/memory.max", max);
    }

    #[test]
    fn cgroup_v2_memory_max_is_the_limit_and_its_usage_is_watched() {
        let root = fake("limit-v2");
        v2(&root, "335544320\n", "104857600\n");
        assert_eq!(
            detect_limit_in(&root.0),
            Some(DetectedLimit {
                bytes: 320 << 20,
                source: LimitSource::CgroupV2
            })
        );
        assert_eq!(
            memory_usage_in(&root.0),
            Some(MemoryUsage {
                bytes: 100 << 20,
                of: UsageOf::Cgroup
            })
        );
        assert_eq!(LimitSource::CgroupV2.as_str(), "cgroup v2 memory.max");
    }

    #[test]
    fn cgroup_v2_max_falls_back_to_physical_memory_and_rss() {
        let root = fake("limit-v2-max");
        v2(&root, "max\n", "104857600\n");
        assert_physical_memory_and_rss(&root);
        assert_eq!(LimitSource::PhysicalMemory.as_str(), "physical memory");
    }

    #[test]
    fn cgroup_v1_memory_limit_in_bytes_is_the_limit() {
        let root = fake("limit-v1");
        root.write("proc/self/cgroup", V1_CGROUPS)
            .write("proc/self/mountinfo", V1_MOUNTS)
            .write(
                "sys/fs/cgroup/memory/app/memory.usage_in_bytes",
                "52428800\n",
            )
            .write(
                "sys/fs/cgroup/memory/app/memory.limit_in_bytes",
                "268435456\n",
            );
        assert_eq!(
            detect_limit_in(&root.0),
            Some(DetectedLimit {
                bytes: 256 << 20,
                source: LimitSource::CgroupV1
            })
        );
        assert_eq!(
            memory_usage_in(&root.0),
            Some(MemoryUsage {
                bytes: 50 << 20,
                of: UsageOf::Cgroup
            })
        );
        assert_eq!(
            LimitSource::CgroupV1.as_str(),
            "cgroup v1 memory.limit_in_bytes"
        );
    }

    #[test]
    fn cgroup_v1_unlimited_falls_back_to_physical_memory() {
        let root = fake("limit-v1-unlimited");
        root.write("proc/self/cgroup", V1_CGROUPS)
            .write("proc/self/mountinfo", V1_MOUNTS)
            .write(
                "sys/fs/cgroup/memory/app/memory.usage_in_bytes",
                "52428800\n",
            )
            .write(
                "sys/fs/cgroup/memory/app/memory.limit_in_bytes",
                "9223372036854771712\n",
            )
            .write(
                "sys/fs/cgroup/memory/memory.limit_in_bytes",
                "9223372036854771712\n",
            );
        assert_eq!(
            detect_limit_in(&root.0).map(|limit| limit.source),
            Some(LimitSource::PhysicalMemory)
        );
        assert_process_usage(memory_usage_in(&root.0));
    }

    #[test]
    fn an_ancestors_limit_binds_and_its_usage_is_watched() {
        // A nested mount root (a container's cgroup namespace) and a limit on the pod, above
        // the container's own cgroup.
        let root = fake("limit-nested");
        root.write("proc/self/cgroup", "0::/kubepods/pod1/ctr\n")
            .write(
                "proc/self/mountinfo",
                "24 30 0:22 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
            )
            .write("sys/fs/cgroup/ctr/memory.current", "1000\n")
            .write("sys/fs/cgroup/ctr/memory.max", "max\n")
            .write("sys/fs/cgroup/memory.current", "3000\n")
            .write("sys/fs/cgroup/memory.max", "1073741824\n");
        assert_eq!(
            detect_limit_in(&root.0),
            Some(DetectedLimit {
                bytes: 1 << 30,
                source: LimitSource::CgroupV2
            })
        );
        assert_eq!(
            memory_usage_in(&root.0),
            Some(MemoryUsage {
                bytes: 3000,
                of: UsageOf::Cgroup
            })
        );
    }

    #[test]
    fn a_cgroup_limit_above_physical_memory_does_not_bind() {
        let root = fake("limit-above-ram");
        v2(&root, "17179869184\n", "1\n");
        assert_physical_memory_and_rss(&root);
    }

    #[test]
    fn without_a_cgroup_physical_memory_and_rss() {
        let root = fake("limit-none");
        assert_physical_memory_and_rss(&root);
        // Nothing readable at all.
        let empty = FakeRoot::new("limit-empty");
        assert_eq!(detect_limit_in(&empty.0), None);
        assert_eq!(memory_usage_in(&empty.0), None);
    }

    #[test]
    fn meminfo_without_mem_total_is_no_limit() {
        let root = fake("limit-meminfo");
        root.write("proc/meminfo", "MemFree: 1000 kB\n");
        assert_eq!(detect_limit_in(&root.0), None);
        root.write("proc/meminfo", "MemTotal:       16384 kB\n");
        assert_eq!(
            detect_limit_in(&root.0).map(|limit| limit.bytes),
            Some(16 << 20)
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_has_a_limit_and_a_usage() {
        let limit = detect_limit().expect("Linux has /proc/meminfo");
        let usage = memory_usage().expect("Linux has /proc/self/statm");
        assert!(limit.bytes > 0 && usage.bytes > 0, "{limit:?} {usage:?}");
        // The usage goes with the limit's source.
        let expected = match limit.source {
            LimitSource::PhysicalMemory => UsageOf::Process,
            LimitSource::CgroupV1 | LimitSource::CgroupV2 => UsageOf::Cgroup,
        };
        assert_eq!(usage.of, expected);
    }
}
