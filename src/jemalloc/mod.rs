//! Everything that talks to jemalloc, and nothing that knows of HTTP.
//!
//! - `allocator`: with the profiler, the global allocator, kept off one slow path of jemalloc's.
//! - [`figures`]: the one table of the allocator figures, and [`JemallocStats`] built from it.
//! - [`ctl`]: every mallctl call, through MIBs resolved once per process.
//! - [`instruments`]: the figures as OpenTelemetry observable gauges.
//! - [`dump`]: `malloc_stats_print` into memory, capped.
//! - [`purge`]: returning unused pages to the OS, one purge at a time.
//! - [`profiling`]: the heap profiler switched on and off, its dumps as pprof or flame graphs.
//! - [`summary`]: jemalloc's configuration and a plain-language reading of the figures.
//! - [`slot`]: work that runs one at a time in the process.
//! - `stack_walk`: with the profiler on x86_64 Linux, a faster walk of sampled stacks.
//! - [`tuning`]: background threads and decay times, read and changed at run time.

#[cfg(profiling)]
pub(crate) mod allocator;
pub(crate) mod ctl;
pub(crate) mod dump;
mod error;
#[cfg(all(jemalloc, feature = "__fault-injection"))]
pub(crate) mod fault;
pub(crate) mod figures;
pub(crate) mod instruments;
pub(crate) mod profiling;
pub(crate) mod purge;
mod slot;
#[cfg(stack_walk)]
pub(crate) mod stack_walk;
pub(crate) mod summary;
pub(crate) mod tuning;

pub use error::JemallocError;
pub use figures::JemallocStats;
pub use profiling::{ProfilingChange, ProfilingStatus};
pub use purge::{purge_all_arenas, PurgeError, PurgeMode, PurgeReport, UnknownPurgeMode};
pub use summary::{BackgroundThread, MallocConf, Ratios, StatsSummary};
pub use tuning::{ArenaDecay, ConfigUpdate, JemallocConfig, MAX_DECAY_MS};
