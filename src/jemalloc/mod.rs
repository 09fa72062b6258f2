//! Everything that talks to jemalloc (mallctl calls and what is built from their answers),
//! and nothing that knows of HTTP or OpenTelemetry.
//!
//! - [`figures`]: the one table of the allocator figures, and [`JemallocStats`] built from it.
//! - [`ctl`]: every mallctl call, through MIBs resolved once per process.
//! - [`dump`]: `malloc_stats_print` into memory, capped.
//! - [`purge`]: returning unused pages to the OS, one purge at a time.
//! - [`give_back`]: returning unused pages by amount, the arenas holding the most first.
//! - [`profiling`]: the heap profiler switched on and off, its dumps as pprof or flame graphs.
//! - [`options`]: where jemalloc reads its options in this build (prefixed or not), and the
//!   snippets that set them.
//! - [`summary`]: jemalloc's configuration and a plain-language reading of the figures.
//! - [`process_slot`]: work that runs one at a time in the process.
//! - [`thread`]: the calling thread's totals of bytes allocated and freed.
//! - [`tuning`]: background threads and decay times, read and changed at run time.

pub(crate) mod ctl;
pub(crate) mod dump;
mod error;
#[cfg(all(jemalloc, fault_injection))]
pub(crate) mod fault;
pub(crate) mod figures;
#[cfg(jemalloc)]
pub(crate) mod give_back;
pub(crate) mod options;
mod process_slot;
pub(crate) mod profiling;
pub(crate) mod purge;
pub(crate) mod summary;
pub(crate) mod thread;
pub(crate) mod tuning;

pub use error::JemallocError;
pub use figures::JemallocStats;
pub use profiling::{ProfilingChange, ProfilingStatus};
pub use purge::{purge_all_arenas, OsMemory, PurgeError, PurgeMode, PurgeReport, UnknownPurgeMode};
pub use summary::{BackgroundThread, MallocConf, Profiler, Ratios, StatsSummary};
pub use tuning::{ArenaDecay, ConfigUpdate, JemallocConfig, MAX_DECAY_MS};
