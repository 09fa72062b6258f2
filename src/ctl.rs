//! The one place that talks to jemalloc's mallctl interface.
//!
//! Everything else in the crate goes through [`ctl()`], which resolves every MIB once per
//! process and checks, once, that jemalloc really is the global allocator. Builds without
//! jemalloc get a stand-in whose every call answers
//! [`JemallocError::Unsupported`](crate::JemallocError::Unsupported).

#[cfg(jemalloc)]
pub(crate) use imp::{ctl, Ctl};

#[cfg(not(jemalloc))]
pub(crate) use unsupported::{ctl, Ctl};

#[cfg(jemalloc)]
mod imp {
    use super::{Settings, StatsDump};
    use crate::purge::PurgeMode;
    use crate::stats::{JemallocError, JemallocStats};
    use std::io::Write;
    use std::sync::OnceLock;
    use tikv_jemalloc_ctl::{
        arenas, background_thread, background_thread_mib, config, epoch, epoch_mib, opt, raw,
        stats, stats_print, thread, version, Access, AsName, Mib,
    };

    /// `MALLCTL_ARENAS_ALL` from `jemalloc.h`: the arena index meaning "all arenas". It is
    /// spelled out as `4096` in the keys below.
    const MALLCTL_ARENAS_ALL: usize = 4096;
    const PURGE_KEY: &str = "arena.4096.purge";
    const DECAY_KEY: &str = "arena.4096.decay";
    const PDIRTY_KEY: &str = "stats.arenas.4096.pdirty";
    const PMUZZY_KEY: &str = "stats.arenas.4096.pmuzzy";

    /// Pre-resolved MIBs for every key the crate reads or calls.
    pub(crate) struct Ctl {
        epoch: epoch_mib,
        allocated: stats::allocated_mib,
        active: stats::active_mib,
        metadata: stats::metadata_mib,
        mapped: stats::mapped_mib,
        retained: stats::retained_mib,
        resident: stats::resident_mib,
        pdirty: Mib<[usize; 4]>,
        pmuzzy: Mib<[usize; 4]>,
        narenas: arenas::narenas_mib,
        background_thread: background_thread_mib,
        purge: [usize; 3],
        decay: [usize; 3],
        page: u64,
    }

    fn err(key: &'static str) -> impl FnOnce(tikv_jemalloc_ctl::Error) -> JemallocError {
        move |e| JemallocError::Mallctl {
            key,
            reason: e.to_string(),
        }
    }

    /// The process-wide controller, or why there is none. Computed once; the warning about a
    /// foreign global allocator is therefore logged once.
    pub(crate) fn ctl() -> Result<&'static Ctl, JemallocError> {
        static CTL: OnceLock<Result<Ctl, JemallocError>> = OnceLock::new();
        CTL.get_or_init(|| {
            let result = jemalloc_is_global_allocator().and_then(|global| {
                if global {
                    Ctl::resolve()
                } else {
                    Err(JemallocError::NotGlobalAllocator)
                }
            });
            if let Err(e) = &result {
                tracing::warn!(
                    "tower-jemalloc: {e}; jemalloc gauges are not exported and purge is disabled"
                );
            }
            result
        })
        .as_ref()
        .map_err(Clone::clone)
    }

    /// Allocates 64 KiB through the global allocator and checks that jemalloc's per-thread
    /// `thread.allocatedp` counter saw it. When the global allocator is something else, the
    /// counter does not move.
    fn jemalloc_is_global_allocator() -> Result<bool, JemallocError> {
        const PROBE: usize = 64 * 1024;
        let counter = thread::allocatedp::mib()
            .and_then(|mib| mib.read())
            .map_err(err("thread.allocatedp"))?;
        let before = counter.get();
        let probe: Vec<u8> = Vec::with_capacity(PROBE);
        std::hint::black_box(&probe);
        drop(probe);
        let after = counter.get();
        Ok(after.wrapping_sub(before) >= PROBE as u64)
    }

    impl Ctl {
        fn resolve() -> Result<Self, JemallocError> {
            let mut purge = [0usize; 3];
            raw::name_to_mib(b"arena.4096.purge\0", &mut purge).map_err(err(PURGE_KEY))?;
            debug_assert_eq!(purge[1], MALLCTL_ARENAS_ALL);
            let mut decay = [0usize; 3];
            raw::name_to_mib(b"arena.4096.decay\0", &mut decay).map_err(err(DECAY_KEY))?;
            let page: usize = b"arenas.page\0".name().read().map_err(err("arenas.page"))?;
            Ok(Self {
                epoch: epoch::mib().map_err(err("epoch"))?,
                allocated: stats::allocated::mib().map_err(err("stats.allocated"))?,
                active: stats::active::mib().map_err(err("stats.active"))?,
                metadata: stats::metadata::mib().map_err(err("stats.metadata"))?,
                mapped: stats::mapped::mib().map_err(err("stats.mapped"))?,
                retained: stats::retained::mib().map_err(err("stats.retained"))?,
                resident: stats::resident::mib().map_err(err("stats.resident"))?,
                pdirty: b"stats.arenas.4096.pdirty\0"
                    .name()
                    .mib()
                    .map_err(err(PDIRTY_KEY))?,
                pmuzzy: b"stats.arenas.4096.pmuzzy\0"
                    .name()
                    .mib()
                    .map_err(err(PMUZZY_KEY))?,
                narenas: arenas::narenas::mib().map_err(err("arenas.narenas"))?,
                background_thread: background_thread::mib().map_err(err("background_thread"))?,
                purge,
                decay,
                page: page as u64,
            })
        }

        /// Advances the epoch once, then reads every figure from that snapshot.
        pub(crate) fn snapshot(&self) -> Result<JemallocStats, JemallocError> {
            crate::fault::check("epoch")?;
            self.epoch.advance().map_err(err("epoch"))?;
            self.read_current()
        }

        /// Reads every figure from the current snapshot without advancing the epoch.
        fn read_current(&self) -> Result<JemallocStats, JemallocError> {
            let pdirty: usize = self.pdirty.read().map_err(err(PDIRTY_KEY))?;
            let pmuzzy: usize = self.pmuzzy.read().map_err(err(PMUZZY_KEY))?;
            Ok(JemallocStats {
                allocated: self.allocated.read().map_err(err("stats.allocated"))? as u64,
                active: self.active.read().map_err(err("stats.active"))? as u64,
                metadata: self.metadata.read().map_err(err("stats.metadata"))? as u64,
                mapped: self.mapped.read().map_err(err("stats.mapped"))? as u64,
                retained: self.retained.read().map_err(err("stats.retained"))? as u64,
                resident: self.resident.read().map_err(err("stats.resident"))? as u64,
                dirty: pdirty as u64 * self.page,
                muzzy: pmuzzy as u64 * self.page,
            })
        }

        /// `arenas.narenas`: how many arenas exist (and so how many a purge of all covers).
        pub(crate) fn narenas(&self) -> Result<u32, JemallocError> {
            self.narenas.read().map_err(err("arenas.narenas"))
        }

        /// jemalloc's `version` string.
        pub(crate) fn version(&self) -> Result<&'static str, JemallocError> {
            version::read().map(trim_nul).map_err(err("version"))
        }

        /// Whether jemalloc's background threads are running now (`background_thread`).
        pub(crate) fn background_threads_running(&self) -> Result<bool, JemallocError> {
            self.background_thread
                .read()
                .map_err(err("background_thread"))
        }

        /// `arena.<MALLCTL_ARENAS_ALL>.purge` (returns every arena's unused dirty and muzzy
        /// pages to the OS now) or `arena.<MALLCTL_ARENAS_ALL>.decay` (only the pages whose
        /// decay time has passed: gentler). Blocks the calling thread for as long as that takes.
        pub(crate) fn purge_all(&self, mode: PurgeMode) -> Result<(), JemallocError> {
            let (key, mib) = match mode {
                PurgeMode::Purge => (PURGE_KEY, &self.purge),
                PurgeMode::Decay => (DECAY_KEY, &self.decay),
            };
            crate::fault::check(key)?;
            // SAFETY: `mib` was resolved by `mallctlnametomib` for `arena.4096.purge` or
            // `arena.4096.decay`, void controls: they take no input and produce no output, so
            // null `oldp`/`oldlenp`/`newp` with `newlen == 0` is the documented call.
            // tikv-jemalloc-ctl has no wrapper for void controls (`raw::write` sends a value
            // and gets EPERM back).
            #[allow(unsafe_code)]
            let code = unsafe {
                tikv_jemalloc_sys::mallctlbymib(
                    mib.as_ptr(),
                    mib.len(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    0,
                )
            };
            if code == 0 {
                Ok(())
            } else {
                Err(JemallocError::Mallctl {
                    key,
                    reason: std::io::Error::from_raw_os_error(code).to_string(),
                })
            }
        }

        /// jemalloc's build and run-time configuration, for the stats summary.
        pub(crate) fn settings(&self) -> Result<Settings, JemallocError> {
            let decay_ms = |name: &'static [u8], key: &'static str| {
                name.name()
                    .read()
                    .map(|ms: isize| ms as i64)
                    .map_err(err(key))
            };
            Ok(Settings {
                version: self.version()?,
                opt_background_thread: opt::background_thread::read()
                    .map_err(err("opt.background_thread"))?,
                background_threads_running: self.background_threads_running()?,
                dirty_decay_ms: decay_ms(b"opt.dirty_decay_ms\0", "opt.dirty_decay_ms")?,
                muzzy_decay_ms: decay_ms(b"opt.muzzy_decay_ms\0", "opt.muzzy_decay_ms")?,
                narenas: self.narenas()?,
                malloc_conf_compiled: config::malloc_conf::read()
                    .map(trim_nul)
                    .map_err(err("config.malloc_conf"))?,
            })
        }

        /// `malloc_stats_print` output, at most `cap` bytes. With `compact`, per-arena, bin,
        /// large-class and mutex details are left out.
        pub(crate) fn stats_print(
            &self,
            json: bool,
            compact: bool,
            cap: usize,
        ) -> Result<StatsDump, JemallocError> {
            let mut options = stats_print::Options::default();
            options.json_format = json;
            options.skip_per_arena = compact;
            options.skip_bin_size_classes = compact;
            options.skip_large_size_classes = compact;
            options.skip_mutex_statistics = compact;
            let mut writer = CappedWriter {
                out: Vec::with_capacity(cap.min(256 * 1024)),
                cap,
                truncated: false,
            };
            stats_print::stats_print(&mut writer, options).map_err(|e| JemallocError::Mallctl {
                key: "malloc_stats_print",
                reason: e.to_string(),
            })?;
            Ok(StatsDump {
                text: writer.out,
                truncated: writer.truncated,
            })
        }
    }

    /// tikv-jemalloc-ctl's string reads keep jemalloc's C terminator.
    fn trim_nul(s: &'static str) -> &'static str {
        s.trim_end_matches('\0')
    }

    /// Keeps the first `cap` bytes and drops the rest (never failing, so jemalloc finishes its
    /// walk normally).
    struct CappedWriter {
        out: Vec<u8>,
        cap: usize,
        truncated: bool,
    }

    impl Write for CappedWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let room = self.cap - self.out.len();
            if buf.len() > room {
                self.truncated = true;
            }
            self.out.extend_from_slice(&buf[..buf.len().min(room)]);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}

#[cfg(not(jemalloc))]
mod unsupported {
    use super::{Settings, StatsDump};
    use crate::purge::PurgeMode;
    use crate::stats::{JemallocError, JemallocStats};

    /// Stand-in for builds without jemalloc: it can never be constructed.
    pub(crate) enum Ctl {}

    pub(crate) fn ctl() -> Result<&'static Ctl, JemallocError> {
        Err(JemallocError::Unsupported)
    }

    impl Ctl {
        pub(crate) fn snapshot(&self) -> Result<JemallocStats, JemallocError> {
            match *self {}
        }
        pub(crate) fn narenas(&self) -> Result<u32, JemallocError> {
            match *self {}
        }
        pub(crate) fn version(&self) -> Result<&'static str, JemallocError> {
            match *self {}
        }
        pub(crate) fn background_threads_running(&self) -> Result<bool, JemallocError> {
            match *self {}
        }
        pub(crate) fn purge_all(&self, _: PurgeMode) -> Result<(), JemallocError> {
            match *self {}
        }
        pub(crate) fn settings(&self) -> Result<Settings, JemallocError> {
            match *self {}
        }
        pub(crate) fn stats_print(
            &self,
            _: bool,
            _: bool,
            _: usize,
        ) -> Result<StatsDump, JemallocError> {
            match *self {}
        }
    }
}

/// jemalloc's configuration, as the stats summary reports it.
#[derive(Debug, Clone)]
#[cfg_attr(not(jemalloc), allow(dead_code))]
pub(crate) struct Settings {
    /// `version`.
    pub(crate) version: &'static str,
    /// `opt.background_thread`: whether background threads were asked for at start-up.
    pub(crate) opt_background_thread: bool,
    /// `background_thread`: whether they run now.
    pub(crate) background_threads_running: bool,
    /// `opt.dirty_decay_ms` (-1: never decay).
    pub(crate) dirty_decay_ms: i64,
    /// `opt.muzzy_decay_ms` (-1: never decay).
    pub(crate) muzzy_decay_ms: i64,
    /// `arenas.narenas`.
    pub(crate) narenas: u32,
    /// `config.malloc_conf`: the options built into the binary.
    pub(crate) malloc_conf_compiled: &'static str,
}

/// Output of `malloc_stats_print`, possibly cut at the size cap.
#[cfg_attr(not(jemalloc), allow(dead_code))]
pub(crate) struct StatsDump {
    pub(crate) text: Vec<u8>,
    pub(crate) truncated: bool,
}
