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
    use crate::stats::{JemallocError, JemallocStats};
    use std::sync::OnceLock;
    use tikv_jemalloc_ctl::{arenas, epoch, epoch_mib, raw, stats, thread, Access, AsName, Mib};

    /// `MALLCTL_ARENAS_ALL` from `jemalloc.h`: the arena index meaning "all arenas". It is
    /// spelled out as `4096` in the keys below.
    const MALLCTL_ARENAS_ALL: usize = 4096;
    const PURGE_KEY: &str = "arena.4096.purge";
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
        purge: [usize; 3],
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
                purge,
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

        /// `arena.<MALLCTL_ARENAS_ALL>.purge`: returns every arena's unused dirty (and muzzy)
        /// pages to the OS. Blocks the calling thread for as long as that takes.
        pub(crate) fn purge_all(&self) -> Result<(), JemallocError> {
            crate::fault::check(PURGE_KEY)?;
            // SAFETY: `purge` is a MIB that `mallctlnametomib` resolved for
            // `arena.4096.purge`, a void control: it takes no input and produces no output,
            // so null `oldp`/`oldlenp`/`newp` with `newlen == 0` is the documented call.
            // tikv-jemalloc-ctl has no wrapper for void controls (`raw::write` sends a value
            // and gets EPERM back).
            #[allow(unsafe_code)]
            let code = unsafe {
                tikv_jemalloc_sys::mallctlbymib(
                    self.purge.as_ptr(),
                    self.purge.len(),
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
                    key: PURGE_KEY,
                    reason: std::io::Error::from_raw_os_error(code).to_string(),
                })
            }
        }
    }
}

#[cfg(not(jemalloc))]
mod unsupported {
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
        pub(crate) fn purge_all(&self) -> Result<(), JemallocError> {
            match *self {}
        }
    }
}
