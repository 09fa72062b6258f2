//! The one place that talks to jemalloc's mallctl interface.
//!
//! Everything else in the crate goes through [`ctl()`], which resolves every MIB once per
//! process and checks, once, that jemalloc really is the global allocator. Builds without
//! jemalloc get a stand-in whose every call answers [`JemallocError::Unsupported`].

#[cfg(jemalloc)]
pub(crate) use imp::{ctl, Ctl};

#[cfg(not(jemalloc))]
pub(crate) use unsupported::{ctl, Ctl};

use super::{JemallocError, JemallocStats};

/// Reading a snapshot is a mallctl call like any other, so it lives here.
impl JemallocStats {
    /// Advances jemalloc's epoch once and reads a fresh snapshot.
    ///
    /// # Errors
    ///
    /// [`JemallocError::Unsupported`](crate::JemallocError::Unsupported) when the crate was
    /// built without jemalloc, [`NotGlobalAllocator`](crate::JemallocError::NotGlobalAllocator)
    /// when jemalloc is not the process's `#[global_allocator]` (the figures would be near
    /// zero and misleading), and [`Mallctl`](crate::JemallocError::Mallctl) when a mallctl
    /// call fails.
    pub fn read() -> Result<Self, JemallocError> {
        ctl()?.snapshot()
    }
}

/// What a "void" control (no input, no output) asks of every arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(jemalloc), allow(dead_code))]
pub(crate) enum ArenasControl {
    /// `arena.<all>.purge`: release every unused dirty and muzzy page now.
    Purge,
    /// `arena.<all>.decay`: release only the pages whose decay time has passed.
    Decay,
}

/// jemalloc's build and run-time configuration.
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
    /// `config.malloc_conf`: the options jemalloc itself was built with
    /// (`--with-malloc-conf`; tikv-jemalloc-sys sets none).
    pub(crate) malloc_conf_compiled: &'static str,
    /// The heap profiler's start-up options; `None` when jemalloc was built without it
    /// (`config.prof` is false).
    pub(crate) prof: Option<ProfOptions>,
}

/// The heap profiler's start-up options (only in a jemalloc built with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(jemalloc), allow(dead_code))]
pub(crate) struct ProfOptions {
    /// `opt.prof`: started with the profiler (`prof:true`).
    pub(crate) started: bool,
    /// `opt.prof_active`: sampling from the start (`prof_active`, default true).
    pub(crate) active_at_start: bool,
    /// `opt.lg_prof_sample`: the mean sampling interval at start-up, as 2^N bytes.
    pub(crate) lg_sample: u32,
}

/// One write of a tuning change; [`Ctl::write`] answers the write that undoes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(jemalloc), allow(dead_code))]
pub(crate) enum Write {
    /// `background_thread`.
    BackgroundThread(bool),
    /// `max_background_threads`.
    MaxBackgroundThreads(usize),
    /// `arenas.dirty_decay_ms`: the default for new arenas.
    DefaultDirtyDecay(isize),
    /// `arenas.muzzy_decay_ms`.
    DefaultMuzzyDecay(isize),
    /// `arena.<i>.dirty_decay_ms`.
    DirtyDecay(u32, isize),
    /// `arena.<i>.muzzy_decay_ms`.
    MuzzyDecay(u32, isize),
}

/// One arena's figures, for the per-arena gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(jemalloc), allow(dead_code))]
pub(crate) struct ArenaFigures {
    /// Its index.
    pub(crate) arena: u32,
    /// `stats.arenas.<i>.resident`, bytes.
    pub(crate) resident: u64,
    /// `stats.arenas.<i>.pdirty`, in bytes.
    pub(crate) dirty: u64,
    /// `stats.arenas.<i>.pmuzzy`, in bytes.
    pub(crate) muzzy: u64,
    /// `stats.arenas.<i>.nthreads`: threads assigned to it.
    pub(crate) threads: u64,
}

/// Which parts of `malloc_stats_print` to write.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(jemalloc), allow(dead_code))]
pub(crate) struct PrintOptions {
    /// JSON instead of text.
    pub(crate) json: bool,
    /// Leave out per-arena, bin, large-class and mutex details.
    pub(crate) compact: bool,
}

#[cfg(jemalloc)]
mod imp {
    use super::{
        ArenaFigures, ArenasControl, JemallocError, JemallocStats, PrintOptions, ProfOptions,
        Settings, Write,
    };
    use crate::jemalloc::figures::{Unit, FIGURES};
    use std::sync::OnceLock;
    use tikv_jemalloc_ctl::{
        arenas, background_thread, background_thread_mib, config, epoch, epoch_mib,
        max_background_threads, opt, raw, stats_print, thread, version, Access, AsName, Mib,
    };

    /// `MALLCTL_ARENAS_ALL` from `jemalloc.h`: the arena index meaning "all arenas". It is
    /// spelled out as `4096` in the keys below.
    const MALLCTL_ARENAS_ALL: usize = 4096;
    const PURGE_KEY: &str = "arena.4096.purge";
    const DECAY_KEY: &str = "arena.4096.decay";
    /// The same controls on one arena (the key names the control; the arena goes in an
    /// error's reason).
    const ARENA_PURGE_KEY: &str = "arena.<i>.purge";
    const ARENA_DECAY_KEY: &str = "arena.<i>.decay";
    const ARENA_UNUSED_KEY: &str = "stats.arenas.<i>.pdirty";

    /// The MIB of one figure's key: `stats.<x>` has two components, `stats.arenas.<i>.<x>`
    /// four (tikv-jemalloc-ctl wants the exact length).
    enum FigureMib {
        Two(Mib<[usize; 2]>),
        Four(Mib<[usize; 4]>),
    }

    impl FigureMib {
        fn resolve(key: &'static [u8]) -> tikv_jemalloc_ctl::Result<Self> {
            let components = key.iter().filter(|&&b| b == b'.').count() + 1;
            Ok(if components == 2 {
                Self::Two(key.name().mib()?)
            } else {
                Self::Four(key.name().mib()?)
            })
        }

        fn read(&self) -> tikv_jemalloc_ctl::Result<usize> {
            match self {
                Self::Two(mib) => mib.read(),
                Self::Four(mib) => mib.read(),
            }
        }
    }

    /// Pre-resolved MIBs for every key the crate reads or calls.
    pub(crate) struct Ctl {
        epoch: epoch_mib,
        /// One per row of the figures table, in its order.
        figures: Vec<FigureMib>,
        narenas: arenas::narenas_mib,
        background_thread: background_thread_mib,
        purge: [usize; 3],
        decay: [usize; 3],
        page: u64,
        /// `stats.arenas.0.pdirty` and `.pmuzzy`: the arena index is the third component.
        pdirty: Mib<[usize; 4]>,
        pmuzzy: Mib<[usize; 4]>,
    }

    fn err(key: &'static str) -> impl FnOnce(tikv_jemalloc_ctl::Error) -> JemallocError {
        move |e| JemallocError::Mallctl {
            key,
            reason: e.to_string(),
        }
    }

    /// Fails when a test armed `key` (only in builds with the fault-injection seam).
    fn fault(key: &'static str) -> Result<(), JemallocError> {
        #[cfg(fault_injection)]
        crate::jemalloc::fault::check(key)?;
        let _ = key;
        Ok(())
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
            let figures = FIGURES
                .iter()
                .map(|figure| FigureMib::resolve(figure.key).map_err(err(figure.key_str())))
                .collect::<Result<_, _>>()?;
            let stats_mib = |name: &'static [u8]| -> Result<Mib<[usize; 4]>, JemallocError> {
                name.name().mib().map_err(err(ARENA_UNUSED_KEY))
            };
            Ok(Self {
                pdirty: stats_mib(b"stats.arenas.0.pdirty\0")?,
                pmuzzy: stats_mib(b"stats.arenas.0.pmuzzy\0")?,
                epoch: epoch::mib().map_err(err("epoch"))?,
                figures,
                narenas: arenas::narenas::mib().map_err(err("arenas.narenas"))?,
                background_thread: background_thread::mib().map_err(err("background_thread"))?,
                purge,
                decay,
                page: page as u64,
            })
        }

        /// Advances the epoch once, then reads every figure from that snapshot.
        pub(crate) fn snapshot(&self) -> Result<JemallocStats, JemallocError> {
            fault("epoch")?;
            self.epoch.advance().map_err(err("epoch"))?;
            JemallocStats::try_from_table(|index, figure| {
                let value = self.figures[index].read().map_err(err(figure.key_str()))? as u64;
                Ok(match figure.unit {
                    Unit::Bytes => value,
                    Unit::Pages => value * self.page,
                })
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

        /// `arena.<MALLCTL_ARENAS_ALL>.purge` or `.decay` (see [`ArenasControl`]). Blocks the
        /// calling thread for as long as that takes.
        pub(crate) fn arenas_control(&self, control: ArenasControl) -> Result<(), JemallocError> {
            let (key, mib) = match control {
                ArenasControl::Purge => (PURGE_KEY, &self.purge),
                ArenasControl::Decay => (DECAY_KEY, &self.decay),
            };
            fault(key)?;
            void_control(mib).map_err(|code| JemallocError::Mallctl {
                key,
                reason: std::io::Error::from_raw_os_error(code).to_string(),
            })
        }

        /// `arena.<i>.purge` or `.decay` (see [`ArenasControl`]) for arena `arena` alone: an
        /// index from [`initialized_arenas`](Self::initialized_arenas) or
        /// [`arena_figures`](Self::arena_figures). Blocks the calling thread for as long as
        /// that takes.
        pub(crate) fn arena_control(
            &self,
            arena: u32,
            control: ArenasControl,
        ) -> Result<(), JemallocError> {
            let (key, mut mib) = match control {
                ArenasControl::Purge => (ARENA_PURGE_KEY, self.purge),
                ArenasControl::Decay => (ARENA_DECAY_KEY, self.decay),
            };
            mib[1] = arena as usize;
            fault(key)?;
            void_control(&mib).map_err(|code| JemallocError::Mallctl {
                key,
                reason: format!("arena {arena}: {}", std::io::Error::from_raw_os_error(code)),
            })
        }

        /// Advances jemalloc's epoch alone: the statistics read after it are fresh.
        pub(crate) fn advance_epoch(&self) -> Result<(), JemallocError> {
            fault("epoch")?;
            self.epoch.advance().map(drop).map_err(err("epoch"))
        }

        /// Arena `arena`'s unused pages, from the current epoch: `stats.arenas.<i>.pdirty` and
        /// `stats.arenas.<i>.pmuzzy`, in bytes.
        pub(crate) fn arena_unused(&self, arena: u32) -> Result<(u64, u64), JemallocError> {
            let read = |mut mib: Mib<[usize; 4]>| -> Result<u64, JemallocError> {
                mib[2] = arena as usize;
                let pages: usize = mib.read().map_err(arena_err(ARENA_UNUSED_KEY, arena))?;
                Ok(pages as u64 * self.page)
            };
            Ok((read(self.pdirty)?, read(self.pmuzzy)?))
        }

        /// jemalloc's build and run-time configuration.
        pub(crate) fn settings(&self) -> Result<Settings, JemallocError> {
            let config_prof: bool = b"config.prof\0".name().read().map_err(err("config.prof"))?;
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
                prof: if config_prof {
                    Some(self.prof_options()?)
                } else {
                    None
                },
            })
        }

        /// `opt.prof`, `opt.prof_active` and `opt.lg_prof_sample`: only in a jemalloc built
        /// with its profiler (`config.prof`), where these keys exist. Read whatever this
        /// crate's features, since the `profiling` feature may be on elsewhere in the
        /// dependency graph.
        fn prof_options(&self) -> Result<ProfOptions, JemallocError> {
            let lg_sample: usize = b"opt.lg_prof_sample\0"
                .name()
                .read()
                .map_err(err("opt.lg_prof_sample"))?;
            Ok(ProfOptions {
                started: b"opt.prof\0".name().read().map_err(err("opt.prof"))?,
                active_at_start: b"opt.prof_active\0"
                    .name()
                    .read()
                    .map_err(err("opt.prof_active"))?,
                lg_sample: lg_sample as u32,
            })
        }

        /// Writes `malloc_stats_print`'s output to `out`.
        pub(crate) fn stats_print(
            &self,
            options: PrintOptions,
            out: &mut impl std::io::Write,
        ) -> Result<(), JemallocError> {
            let mut print = stats_print::Options::default();
            print.json_format = options.json;
            print.skip_per_arena = options.compact;
            print.skip_bin_size_classes = options.compact;
            print.skip_large_size_classes = options.compact;
            print.skip_mutex_statistics = options.compact;
            stats_print::stats_print(out, print).map_err(|e| JemallocError::Mallctl {
                key: "malloc_stats_print",
                reason: e.to_string(),
            })
        }
    }

    /// The heap profiler's controls (`opt.prof`, `prof.*`): only in builds with the
    /// `profiling` feature, where jemalloc has them.
    #[cfg(profiling)]
    impl Ctl {
        /// `opt.prof`: whether jemalloc was started with its profiler (`prof:true`). Without
        /// it, every other `prof.*` call fails.
        pub(crate) fn prof_started(&self) -> Result<bool, JemallocError> {
            tikv_jemalloc_ctl::profiling::prof::read().map_err(err("opt.prof"))
        }

        /// `prof.active`: whether allocations are being sampled now.
        pub(crate) fn prof_active(&self) -> Result<bool, JemallocError> {
            b"prof.active\0".name().read().map_err(err("prof.active"))
        }

        /// Writes `prof.active`.
        pub(crate) fn set_prof_active(&self, active: bool) -> Result<(), JemallocError> {
            fault("prof.active")?;
            b"prof.active\0"
                .name()
                .write(active)
                .map_err(err("prof.active"))
        }

        /// `prof.lg_sample`: the mean interval between samples is 2^this bytes.
        pub(crate) fn prof_lg_sample(&self) -> Result<u32, JemallocError> {
            let lg: usize = b"prof.lg_sample\0"
                .name()
                .read()
                .map_err(err("prof.lg_sample"))?;
            Ok(lg as u32)
        }

        /// `prof.reset`: forgets every sample taken so far and samples every 2^`lg_sample`
        /// bytes from now on.
        pub(crate) fn prof_reset(&self, lg_sample: u32) -> Result<(), JemallocError> {
            fault("prof.reset")?;
            b"prof.reset\0"
                .name()
                .write(lg_sample as usize)
                .map_err(err("prof.reset"))
        }

        /// `prof.dump` into a private temporary file whose name is already removed: the
        /// open file, to read the profile from. The temporary file and the `prof.dump` call
        /// are jemalloc_pprof's (its process-wide handle, so that an application using it
        /// directly takes turns with this crate). Blocks; must not run on an async worker.
        pub(crate) fn prof_dump(&self) -> Result<std::fs::File, JemallocError> {
            fault("prof.dump")?;
            let handle =
                jemalloc_pprof::PROF_CTL
                    .as_ref()
                    .ok_or_else(|| JemallocError::Mallctl {
                        key: "prof.dump",
                        reason: "jemalloc was started without its profiler (opt.prof is false)"
                            .to_owned(),
                    })?;
            handle
                .blocking_lock()
                .dump()
                .map_err(|e| JemallocError::Mallctl {
                    key: "prof.dump",
                    reason: format!("{e:#}"),
                })
        }
    }

    /// The MIB of `arena.<i>.<x>` for arena `arena` (`name` spells it with index 0).
    fn arena_mib(
        name: &'static [u8],
        key: &'static str,
        arena: u32,
    ) -> Result<Mib<[usize; 3]>, JemallocError> {
        let mut mib: Mib<[usize; 3]> = name.name().mib().map_err(err(key))?;
        mib[1] = arena as usize;
        Ok(mib)
    }

    /// A mallctl error about arena `arena`'s `key` (keys are static; the arena goes in the
    /// reason).
    fn arena_err(
        key: &'static str,
        arena: u32,
    ) -> impl FnOnce(tikv_jemalloc_ctl::Error) -> JemallocError {
        move |e| JemallocError::Mallctl {
            key,
            reason: format!("arena {arena}: {e}"),
        }
    }

    /// Run-time tuning: reading and writing background threads and decay times.
    impl Ctl {
        /// `opt.max_background_threads`: the most `max_background_threads` may be set to.
        pub(crate) fn background_thread_limit(&self) -> Result<u64, JemallocError> {
            b"opt.max_background_threads\0"
                .name()
                .read()
                .map(|n: usize| n as u64)
                .map_err(err("opt.max_background_threads"))
        }

        /// The indexes of the arenas that exist (`arena.<i>.initialized` below
        /// `arenas.narenas`).
        pub(crate) fn initialized_arenas(&self) -> Result<Vec<u32>, JemallocError> {
            const KEY: &str = "arena.<i>.initialized";
            let mut mib: Mib<[usize; 3]> = arena_mib(b"arena.0.initialized\0", KEY, 0)?;
            let mut arenas = Vec::new();
            for arena in 0..self.narenas()? {
                mib[1] = arena as usize;
                if mib.read().map_err(arena_err(KEY, arena))? {
                    arenas.push(arena);
                }
            }
            Ok(arenas)
        }

        /// The defaults for new arenas: `arenas.dirty_decay_ms`, `arenas.muzzy_decay_ms`.
        pub(crate) fn decay_defaults(&self) -> Result<(i64, i64), JemallocError> {
            let read = |name: &'static [u8], key: &'static str| {
                name.name()
                    .read()
                    .map(|ms: isize| ms as i64)
                    .map_err(err(key))
            };
            Ok((
                read(b"arenas.dirty_decay_ms\0", "arenas.dirty_decay_ms")?,
                read(b"arenas.muzzy_decay_ms\0", "arenas.muzzy_decay_ms")?,
            ))
        }

        /// `max_background_threads`.
        pub(crate) fn max_background_threads(&self) -> Result<u64, JemallocError> {
            max_background_threads::read()
                .map(|n| n as u64)
                .map_err(err("max_background_threads"))
        }

        /// Each initialized arena's own decay times: `(arena, dirty_decay_ms, muzzy_decay_ms)`.
        pub(crate) fn arena_decays(&self) -> Result<Vec<(u32, i64, i64)>, JemallocError> {
            const DIRTY: &str = "arena.<i>.dirty_decay_ms";
            const MUZZY: &str = "arena.<i>.muzzy_decay_ms";
            let mut dirty = arena_mib(b"arena.0.dirty_decay_ms\0", DIRTY, 0)?;
            let mut muzzy = arena_mib(b"arena.0.muzzy_decay_ms\0", MUZZY, 0)?;
            self.initialized_arenas()?
                .into_iter()
                .map(|arena| {
                    dirty[1] = arena as usize;
                    muzzy[1] = arena as usize;
                    let dirty_ms: isize = dirty.read().map_err(arena_err(DIRTY, arena))?;
                    let muzzy_ms: isize = muzzy.read().map_err(arena_err(MUZZY, arena))?;
                    Ok((arena, dirty_ms as i64, muzzy_ms as i64))
                })
                .collect()
        }

        /// Makes `write` and answers the write that undoes it (the previous value).
        pub(crate) fn write(&self, write: Write) -> Result<Write, JemallocError> {
            let decay = |name: &'static [u8], key: &'static str, ms: isize| {
                fault(key)?;
                name.name().update(ms).map_err(err(key))
            };
            let arena_decay = |name: &'static [u8], key: &'static str, arena: u32, ms: isize| {
                fault(key)?;
                arena_mib(name, key, arena)?
                    .update(ms)
                    .map_err(arena_err(key, arena))
            };
            Ok(match write {
                Write::BackgroundThread(on) => {
                    fault("background_thread")?;
                    Write::BackgroundThread(
                        self.background_thread
                            .update(on)
                            .map_err(err("background_thread"))?,
                    )
                }
                Write::MaxBackgroundThreads(threads) => {
                    fault("max_background_threads")?;
                    Write::MaxBackgroundThreads(
                        max_background_threads::update(threads)
                            .map_err(err("max_background_threads"))?,
                    )
                }
                Write::DefaultDirtyDecay(ms) => Write::DefaultDirtyDecay(decay(
                    b"arenas.dirty_decay_ms\0",
                    "arenas.dirty_decay_ms",
                    ms,
                )?),
                Write::DefaultMuzzyDecay(ms) => Write::DefaultMuzzyDecay(decay(
                    b"arenas.muzzy_decay_ms\0",
                    "arenas.muzzy_decay_ms",
                    ms,
                )?),
                Write::DirtyDecay(arena, ms) => Write::DirtyDecay(
                    arena,
                    arena_decay(
                        b"arena.0.dirty_decay_ms\0",
                        "arena.<i>.dirty_decay_ms",
                        arena,
                        ms,
                    )?,
                ),
                Write::MuzzyDecay(arena, ms) => Write::MuzzyDecay(
                    arena,
                    arena_decay(
                        b"arena.0.muzzy_decay_ms\0",
                        "arena.<i>.muzzy_decay_ms",
                        arena,
                        ms,
                    )?,
                ),
            })
        }

        /// Each initialized arena's figures, from the current epoch (call after
        /// [`snapshot`](Self::snapshot)).
        pub(crate) fn arena_figures(&self) -> Result<Vec<ArenaFigures>, JemallocError> {
            const KEY: &str = "stats.arenas.<i>";
            // `stats.arenas.<i>.<x>`: the arena index is the third component.
            let mib = |name: &'static [u8]| -> Result<Mib<[usize; 4]>, JemallocError> {
                name.name().mib().map_err(err(KEY))
            };
            let (mut resident, mut pdirty, mut pmuzzy, mut nthreads) = (
                mib(b"stats.arenas.0.resident\0")?,
                mib(b"stats.arenas.0.pdirty\0")?,
                mib(b"stats.arenas.0.pmuzzy\0")?,
                mib(b"stats.arenas.0.nthreads\0")?,
            );
            self.initialized_arenas()?
                .into_iter()
                .map(|arena| {
                    for mib in [&mut resident, &mut pdirty, &mut pmuzzy, &mut nthreads] {
                        mib[2] = arena as usize;
                    }
                    let read = |mib: &Mib<[usize; 4]>| -> Result<u64, JemallocError> {
                        let value: usize = mib.read().map_err(arena_err(KEY, arena))?;
                        Ok(value as u64)
                    };
                    let threads: u32 = nthreads.read().map_err(arena_err(KEY, arena))?;
                    Ok(ArenaFigures {
                        arena,
                        resident: read(&resident)?,
                        dirty: read(&pdirty)? * self.page,
                        muzzy: read(&pmuzzy)? * self.page,
                        threads: u64::from(threads),
                    })
                })
                .collect()
        }
    }

    /// Calls the void control `mib` (`arena.<i>.purge` or `arena.<i>.decay`, any index):
    /// jemalloc's error code when it fails.
    fn void_control(mib: &[usize; 3]) -> Result<(), i32> {
        // SAFETY: `mib` is the MIB `mallctlnametomib` resolved for `arena.4096.purge` or
        // `arena.4096.decay`, its arena component (index 1) possibly replaced by another
        // arena index, which jemalloc checks before use (an index above `arenas.narenas`
        // answers ENOENT, an arena not initialized is skipped; the index `arenas.narenas`
        // itself means all arenas, so callers pass indexes of initialized arenas). These are
        // void controls: they take no input and produce no output, so null
        // `oldp`/`oldlenp`/`newp` with `newlen == 0` is the documented call. tikv-jemalloc-ctl
        // has no wrapper for void controls (`raw::write` sends a value and gets EPERM back).
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
            Err(code)
        }
    }

    /// tikv-jemalloc-ctl's string reads keep jemalloc's C terminator.
    fn trim_nul(s: &'static str) -> &'static str {
        s.trim_end_matches('\0')
    }
}

#[cfg(not(jemalloc))]
mod unsupported {
    use super::{
        ArenaFigures, ArenasControl, JemallocError, JemallocStats, PrintOptions, Settings, Write,
    };

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
        pub(crate) fn arenas_control(&self, _: ArenasControl) -> Result<(), JemallocError> {
            match *self {}
        }
        pub(crate) fn arena_control(&self, _: u32, _: ArenasControl) -> Result<(), JemallocError> {
            match *self {}
        }
        pub(crate) fn advance_epoch(&self) -> Result<(), JemallocError> {
            match *self {}
        }
        pub(crate) fn arena_unused(&self, _: u32) -> Result<(u64, u64), JemallocError> {
            match *self {}
        }
        pub(crate) fn settings(&self) -> Result<Settings, JemallocError> {
            match *self {}
        }
        pub(crate) fn background_thread_limit(&self) -> Result<u64, JemallocError> {
            match *self {}
        }
        pub(crate) fn initialized_arenas(&self) -> Result<Vec<u32>, JemallocError> {
            match *self {}
        }
        pub(crate) fn decay_defaults(&self) -> Result<(i64, i64), JemallocError> {
            match *self {}
        }
        pub(crate) fn max_background_threads(&self) -> Result<u64, JemallocError> {
            match *self {}
        }
        pub(crate) fn arena_decays(&self) -> Result<Vec<(u32, i64, i64)>, JemallocError> {
            match *self {}
        }
        pub(crate) fn write(&self, _: Write) -> Result<Write, JemallocError> {
            match *self {}
        }
        pub(crate) fn arena_figures(&self) -> Result<Vec<ArenaFigures>, JemallocError> {
            match *self {}
        }
        pub(crate) fn stats_print(
            &self,
            _: PrintOptions,
            _: &mut impl std::io::Write,
        ) -> Result<(), JemallocError> {
            match *self {}
        }
    }
}
