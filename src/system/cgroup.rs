//! The memory cgroup the process runs in: cgroup v2, or the `memory` controller of cgroup v1;
//! where its files are, what the kernel charges it, and its limit.
//!
//! The directory is found from `/proc/self/cgroup` (which cgroup the process is in) and
//! `/proc/self/mountinfo` (where that hierarchy is mounted, and which of its directories is the
//! mount's root: inside a container with a cgroup namespace or a bind mount, the mount's root is
//! the container's own cgroup). cgroup v2 is tried first; on a hybrid host (cgroup v2 mounted
//! beside v1 controllers, as systemd's default was for years) the v2 directory has no
//! `memory.current` and cgroup v1's `memory` controller is used instead.
//!
//! Every path is read below a root directory, `/` in production, so that tests can lay fake
//! `proc` and cgroup files in a temporary directory. Nothing here creates a cgroup or writes a
//! limit.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Limits at or above this many bytes mean "no limit". cgroup v1 reports an unlimited
/// `memory.limit_in_bytes` as `PAGE_COUNTER_MAX` pages in bytes (9223372036854771712 with 4 KiB
/// pages, just under 2^63); no machine has 2^60 bytes (1 EiB) of memory.
const UNLIMITED: u64 = 1 << 60;

/// Which cgroup hierarchy the process's memory is accounted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CgroupVersion {
    /// The unified hierarchy: `memory.current`, `memory.max`.
    V2,
    /// cgroup v1's `memory` controller: `memory.usage_in_bytes`, `memory.limit_in_bytes`.
    V1,
}

impl CgroupVersion {
    /// The file holding what the kernel charges the cgroup, in bytes.
    pub(crate) fn usage_file(self) -> &'static str {
        match self {
            Self::V2 => "memory.current",
            Self::V1 => "memory.usage_in_bytes",
        }
    }

    /// The file holding the cgroup's hard limit.
    pub(crate) fn limit_file(self) -> &'static str {
        match self {
            Self::V2 => "memory.max",
            Self::V1 => "memory.limit_in_bytes",
        }
    }
}

/// The memory of the cgroup the process runs in (v2, or v1's `memory` controller): what the
/// kernel charges it and its limit, read from its own directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CgroupMemory {
    /// `memory.current` (v2) or `memory.usage_in_bytes` (v1), in bytes.
    pub(crate) current: u64,
    /// `memory.max` (v2) or `memory.limit_in_bytes` (v1), in bytes; `None` when there is no
    /// limit (`max`, or a v1 value of 2^60 or more).
    pub(crate) max: Option<u64>,
}

impl CgroupMemory {
    /// Reads the figures of the process's own memory cgroup; `None` when there is none to read
    /// (not Linux, no memory controller, or the files are not visible from here). The directory
    /// is found once per process: a process does not change cgroup on its own.
    pub(crate) fn read() -> Option<Self> {
        Cgroup::of_this_process()?.memory()
    }
}

/// Where the process's memory cgroup is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cgroup {
    /// The hierarchy it belongs to.
    pub(crate) version: CgroupVersion,
    /// The process's own cgroup directory.
    pub(crate) directory: PathBuf,
    /// Where the hierarchy is mounted: the highest of the cgroup's ancestors visible from here.
    pub(crate) mount: PathBuf,
}

impl Cgroup {
    /// The process's memory cgroup, found once per process (below `/`).
    pub(crate) fn of_this_process() -> Option<&'static Self> {
        static CGROUP: OnceLock<Option<Cgroup>> = OnceLock::new();
        CGROUP
            .get_or_init(|| Self::find_in(Path::new("/")))
            .as_ref()
    }

    /// The memory cgroup described by `root/proc/self/cgroup` and `root/proc/self/mountinfo`,
    /// its mount points taken below `root`.
    pub(crate) fn find_in(root: &Path) -> Option<Self> {
        let cgroups = std::fs::read_to_string(root.join("proc/self/cgroup")).ok()?;
        let mountinfo = std::fs::read_to_string(root.join("proc/self/mountinfo")).ok()?;
        Self::find(root, &cgroups, &mountinfo)
    }

    /// The memory cgroup from the text of `/proc/self/cgroup` and `/proc/self/mountinfo`: the
    /// v2 one when its directory has `memory.current` (the memory controller is enabled
    /// there), else v1's `memory` controller when its directory has `memory.usage_in_bytes`.
    pub(crate) fn find(root: &Path, cgroups: &str, mountinfo: &str) -> Option<Self> {
        let v2 = cgroups.lines().find_map(|line| line.strip_prefix("0::"));
        let v1 = cgroups.lines().find_map(|line| {
            // hierarchy-id:controller,controller:path
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            controllers
                .split(',')
                .any(|controller| controller == "memory")
                .then_some(path)
        });
        let mounts: Vec<Mount> = mountinfo.lines().filter_map(Mount::parse).collect();
        let find = |version: CgroupVersion, path: &str| {
            mounts
                .iter()
                .filter(|mount| mount.holds(version))
                .find_map(|mount| {
                    let directory = mount.directory_of(root, path)?;
                    directory
                        .join(version.usage_file())
                        .is_file()
                        .then(|| Self {
                            version,
                            directory,
                            mount: mount.point_below(root),
                        })
                })
        };
        v2.and_then(|path| find(CgroupVersion::V2, path))
            .or_else(|| v1.and_then(|path| find(CgroupVersion::V1, path)))
    }

    /// What the kernel charges the cgroup now, in bytes.
    pub(crate) fn usage(&self) -> Option<u64> {
        read_u64(&self.usage_path())
    }

    /// The file [`usage`](Self::usage) reads.
    pub(crate) fn usage_path(&self) -> PathBuf {
        self.directory.join(self.version.usage_file())
    }

    /// The cgroup's own figures (an unreadable limit file counts as no limit).
    pub(crate) fn memory(&self) -> Option<CgroupMemory> {
        Some(CgroupMemory {
            current: self.usage()?,
            max: self.limit_of(&self.directory).flatten(),
        })
    }

    /// The limit written in `directory` (this cgroup's or an ancestor's): `None` when it
    /// cannot be read, `Some(None)` when there is no limit.
    fn limit_of(&self, directory: &Path) -> Option<Option<u64>> {
        let text = std::fs::read_to_string(directory.join(self.version.limit_file())).ok()?;
        parse_limit(&text)
    }

    /// The tightest limit on the process: the smallest of the limits of its cgroup and of its
    /// ancestors up to the mount point (a limit on a parent, such as a systemd slice or a
    /// Kubernetes pod, binds the processes of every cgroup below it). Answers the directory
    /// that sets it (the deepest one on a tie) and the limit in bytes; `None` when no cgroup on
    /// the way has one.
    pub(crate) fn binding_limit(&self) -> Option<(PathBuf, u64)> {
        let mut binding: Option<(PathBuf, u64)> = None;
        let mut directory = self.directory.as_path();
        loop {
            if let Some(Some(limit)) = self.limit_of(directory) {
                if binding
                    .as_ref()
                    .is_none_or(|(_, tightest)| limit < *tightest)
                {
                    binding = Some((directory.to_path_buf(), limit));
                }
            }
            if directory == self.mount {
                return binding;
            }
            match directory.parent() {
                Some(parent) if parent.starts_with(&self.mount) => directory = parent,
                _ => return binding,
            }
        }
    }
}

/// One line of `/proc/self/mountinfo` that mounts a cgroup hierarchy.
#[derive(Debug)]
struct Mount {
    /// The directory of the hierarchy that is the mount's root.
    root: String,
    /// Where it is mounted.
    point: String,
    /// `cgroup2`, or `cgroup` for v1.
    filesystem: String,
    /// The super options: for v1, the controllers the hierarchy holds (`rw,memory`).
    options: String,
}

impl Mount {
    /// `id parent major:minor root mount-point options [optional...] - type source super-options`
    fn parse(line: &str) -> Option<Self> {
        let (mount, filesystem) = line.split_once(" - ")?;
        let mut fields = mount.split_whitespace().skip(3);
        let (root, point) = (fields.next()?, fields.next()?);
        let mut fields = filesystem.split_whitespace();
        let (filesystem, _source) = (fields.next()?, fields.next()?);
        Some(Self {
            root: unescape(root),
            point: unescape(point),
            filesystem: filesystem.to_owned(),
            options: fields.next().unwrap_or_default().to_owned(),
        })
    }

    /// Whether this is a mount of the hierarchy `version` keeps memory in.
    fn holds(&self, version: CgroupVersion) -> bool {
        match version {
            CgroupVersion::V2 => self.filesystem == "cgroup2",
            CgroupVersion::V1 => {
                self.filesystem == "cgroup" && self.options.split(',').any(|o| o == "memory")
            }
        }
    }

    /// The mount point, below `root`.
    fn point_below(&self, root: &Path) -> PathBuf {
        root.join(self.point.trim_start_matches('/'))
    }

    /// The directory of cgroup `path` (as `/proc/self/cgroup` spells it) under this mount,
    /// below `root`; `None` when the path lies outside the mount's root.
    fn directory_of(&self, root: &Path, path: &str) -> Option<PathBuf> {
        let inside = path.strip_prefix(self.root.trim_end_matches('/'))?;
        if !(inside.is_empty() || inside.starts_with('/')) {
            return None;
        }
        Some(self.point_below(root).join(inside.trim_start_matches('/')))
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> String {
    if !field.contains('\\') {
        return field.to_owned();
    }
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let digits = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(digits, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A limit file's value: `None` when it is not a limit at all, `Some(None)` for "no limit"
/// (`max`, or 2^60 bytes and above).
pub(crate) fn parse_limit(text: &str) -> Option<Option<u64>> {
    match text.trim() {
        "max" => Some(None),
        value => {
            let bytes: u64 = value.parse().ok()?;
            Some((bytes < UNLIMITED).then_some(bytes))
        }
    }
}

/// A file holding one decimal number.
pub(crate) fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A temporary directory standing for `/`, removed when dropped. Tests write fake `proc`
    /// and cgroup files in it; nothing touches the machine's cgroups.
    pub(crate) struct FakeRoot(pub(crate) PathBuf);

    impl FakeRoot {
        pub(crate) fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "tower-jemalloc-{name}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        /// Writes `contents` to `path` (relative to the fake root), creating directories.
        pub(crate) fn write(&self, path: &str, contents: &str) -> &Self {
            let path = self.0.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, contents).unwrap();
            self
        }

        pub(crate) fn path(&self, path: &str) -> PathBuf {
            self.0.join(path)
        }
    }

    impl Drop for FakeRoot {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A cgroup v2 host as systemd sets it up, the process in `/app.slice/app.service`.
    pub(crate) const V2_MOUNTS: &str = "\
        22 28 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw\n\
        24 28 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";

    /// A hybrid cgroup v1 host: v1 controllers, cgroup v2 mounted beside them without memory.
    pub(crate) const V1_MOUNTS: &str = "\
        31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
        32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n\
        35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
        41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";

    pub(crate) const V1_CGROUPS: &str = "\
        5:cpu,cpuacct:/app\n\
        4:memory:/app\n\
        0::/\n";

    #[test]
    fn v2_is_found_under_the_cgroup2_mount() {
        let root = FakeRoot::new("cgroup-v2");
        root.write("proc/self/cgroup", "0::/app.slice/app.service\n")
            .write("proc/self/mountinfo", V2_MOUNTS)
            .write(
                "sys/fs/cgroup/app.slice/app.service/memory.current",
                "1234\n",
            )
            .write("sys/fs/cgroup/app.slice/app.service/memory.max", "max\n");
        let cgroup = Cgroup::find_in(&root.0).expect("a cgroup v2 with memory.current");
        assert_eq!(cgroup.version, CgroupVersion::V2);
        assert_eq!(
            cgroup.directory,
            root.path("sys/fs/cgroup/app.slice/app.service")
        );
        assert_eq!(
            cgroup.memory(),
            Some(CgroupMemory {
                current: 1234,
                max: None
            })
        );
        root.write(
            "sys/fs/cgroup/app.slice/app.service/memory.max",
            "536870912\n",
        );
        assert_eq!(cgroup.memory().unwrap().max, Some(512 << 20));
        // Without a limit file (the root cgroup has none), the usage is still reported.
        std::fs::remove_file(root.path("sys/fs/cgroup/app.slice/app.service/memory.max")).unwrap();
        assert_eq!(
            cgroup.memory(),
            Some(CgroupMemory {
                current: 1234,
                max: None
            })
        );
    }

    #[test]
    fn v1_is_found_on_a_hybrid_host() {
        let root = FakeRoot::new("cgroup-v1");
        root.write("proc/self/cgroup", V1_CGROUPS)
            .write("proc/self/mountinfo", V1_MOUNTS)
            // The v2 root of a hybrid host has no memory.current.
            .write("sys/fs/cgroup/unified/cgroup.procs", "")
            .write("sys/fs/cgroup/memory/app/memory.usage_in_bytes", "4096\n")
            .write(
                "sys/fs/cgroup/memory/app/memory.limit_in_bytes",
                "9223372036854771712\n",
            );
        let cgroup = Cgroup::find_in(&root.0).expect("cgroup v1's memory controller");
        assert_eq!(cgroup.version, CgroupVersion::V1);
        assert_eq!(cgroup.directory, root.path("sys/fs/cgroup/memory/app"));
        // PAGE_COUNTER_MAX is no limit.
        assert_eq!(
            cgroup.memory(),
            Some(CgroupMemory {
                current: 4096,
                max: None
            })
        );
        root.write(
            "sys/fs/cgroup/memory/app/memory.limit_in_bytes",
            "1073741824\n",
        );
        assert_eq!(cgroup.memory().unwrap().max, Some(1 << 30));
    }

    #[test]
    fn v1_memory_may_share_a_hierarchy_with_other_controllers() {
        let root = FakeRoot::new("cgroup-v1-joint");
        root.write("proc/self/cgroup", "3:cpu,memory:/job\n")
            .write(
                "proc/self/mountinfo",
                "35 31 0:32 / /sys/fs/cgroup/cpu,memory rw - cgroup cgroup rw,cpu,memory\n",
            )
            .write("sys/fs/cgroup/cpu,memory/job/memory.usage_in_bytes", "1\n")
            .write("sys/fs/cgroup/cpu,memory/job/memory.limit_in_bytes", "2\n");
        let cgroup = Cgroup::find_in(&root.0).unwrap();
        assert_eq!(cgroup.version, CgroupVersion::V1);
        assert_eq!(
            cgroup.memory(),
            Some(CgroupMemory {
                current: 1,
                max: Some(2)
            })
        );
    }

    #[test]
    fn no_memory_cgroup_is_none() {
        let root = FakeRoot::new("cgroup-none");
        // The v2 directory exists but the memory controller is not enabled in it.
        root.write("proc/self/cgroup", "0::/app\n")
            .write("proc/self/mountinfo", V2_MOUNTS)
            .write("sys/fs/cgroup/app/cgroup.procs", "");
        assert_eq!(Cgroup::find_in(&root.0), None);
        // A v1 memory line whose controller is not mounted here.
        root.write("proc/self/cgroup", "4:memory:/app\n");
        assert_eq!(Cgroup::find_in(&root.0), None);
        // No /proc at all.
        assert_eq!(Cgroup::find_in(&root.path("nothing")), None);
    }

    #[test]
    fn a_nested_mount_root_is_taken_relative_to_it() {
        // In a container the mount's root is the container's own cgroup: the path in
        // /proc/self/cgroup is relative to the whole hierarchy, the directory to the mount.
        let root = FakeRoot::new("cgroup-nested");
        root.write("proc/self/cgroup", "0::/kubepods/pod1/ctr\n")
            .write(
                "proc/self/mountinfo",
                "24 30 0:22 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
            )
            .write("sys/fs/cgroup/ctr/memory.current", "7\n");
        let cgroup = Cgroup::find_in(&root.0).unwrap();
        assert_eq!(cgroup.directory, root.path("sys/fs/cgroup/ctr"));
        assert_eq!(cgroup.mount, root.path("sys/fs/cgroup"));
        // A path outside the mount's root is not this mount's, nor is a sibling whose name
        // merely starts the same way.
        root.write("proc/self/cgroup", "0::/elsewhere\n");
        assert_eq!(Cgroup::find_in(&root.0), None);
        root.write("proc/self/cgroup", "0::/kubepods/pod10/ctr\n");
        assert_eq!(Cgroup::find_in(&root.0), None);
    }

    #[test]
    fn the_tightest_limit_of_the_ancestors_binds() {
        let root = FakeRoot::new("cgroup-ancestors");
        root.write("proc/self/cgroup", "0::/app.slice/app.service\n")
            .write("proc/self/mountinfo", V2_MOUNTS)
            .write("sys/fs/cgroup/app.slice/app.service/memory.current", "1\n")
            .write("sys/fs/cgroup/app.slice/app.service/memory.max", "max\n")
            .write("sys/fs/cgroup/app.slice/memory.max", "1000\n");
        let cgroup = Cgroup::find_in(&root.0).unwrap();
        assert_eq!(
            cgroup.binding_limit(),
            Some((root.path("sys/fs/cgroup/app.slice"), 1000))
        );
        // Its own limit, when tighter, binds; on a tie the deepest wins.
        root.write("sys/fs/cgroup/app.slice/app.service/memory.max", "1000\n");
        assert_eq!(
            cgroup.binding_limit(),
            Some((root.path("sys/fs/cgroup/app.slice/app.service"), 1000))
        );
        // Nothing is read above the mount point.
        root.write("sys/fs/cgroup/app.slice/app.service/memory.max", "max\n")
            .write("sys/fs/cgroup/app.slice/memory.max", "max\n")
            .write("sys/fs/memory.max", "10\n");
        assert_eq!(cgroup.binding_limit(), None);
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/sys/fs/my\040cgroup"), "/sys/fs/my cgroup");
        assert_eq!(unescape(r"/a\134b"), r"/a\b");
        assert_eq!(unescape(r"/trailing\04"), r"/trailing\04");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn limits_parse() {
        assert_eq!(parse_limit("max\n"), Some(None));
        assert_eq!(parse_limit("9223372036854771712\n"), Some(None));
        assert_eq!(parse_limit("1152921504606846976"), Some(None));
        assert_eq!(
            parse_limit("1152921504606846975"),
            Some(Some((1 << 60) - 1))
        );
        assert_eq!(parse_limit("335544320\n"), Some(Some(320 << 20)));
        assert_eq!(parse_limit("-1"), None);
        assert_eq!(parse_limit(""), None);
    }
}
