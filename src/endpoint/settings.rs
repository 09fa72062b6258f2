//! The endpoints' own settings, set through the builder, and their defaults.

use std::time::Duration;

/// The default minimum interval between two purges through the HTTP endpoint.
pub const DEFAULT_PURGE_COOLDOWN: Duration = Duration::from_secs(1);

/// The default number of scrapes that may be in flight at once: high enough that no real
/// monitoring setup meets it (256 concurrent scrapers get no 503), low enough to bound what
/// waiting scrapes hold (a few hundred bytes each).
pub const DEFAULT_MAX_CONCURRENT_SCRAPES: usize = 1024;

/// The default cap on the size of a stats dump.
pub const DEFAULT_STATS_MAX_BYTES: usize = 4 * 1024 * 1024;

/// The default number of stats answers (other than `HEAD`) per second. A dump is up to a few
/// MiB: answering thousands a second would take the process's CPU and bandwidth from the
/// application and from `/metrics`, and an operator needs a few.
pub const DEFAULT_STATS_RATE_LIMIT: u32 = 10;

/// The default time a finished stats dump answers new requests: under a flood, at most one
/// dump per format per second.
pub const DEFAULT_STATS_REUSE_WINDOW: Duration = Duration::from_secs(1);

/// The default cap on the size of a jemalloc heap dump (before it is converted).
pub const DEFAULT_HEAP_PROFILE_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// The default time a request waits for the job that answers it (a render, a dump, a config
/// change, a live heap profile) before a 503 saying the job is stuck. A `/metrics` scrape
/// that carries Prometheus' `X-Prometheus-Scrape-Timeout-Seconds` waits by that instead; a
/// heap growth window waits this long after its window; a purge waits at least 5 minutes.
pub const DEFAULT_JOB_DEADLINE: Duration = Duration::from_secs(30);

/// The endpoints' own settings.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Minimum time from the end of one purge to the start of the next; zero disables.
    pub(crate) purge_cooldown: Duration,
    /// Scrapes in flight at once; beyond it, 503.
    pub(crate) max_concurrent_scrapes: usize,
    /// A render that finished less than this long ago answers new scrapes too.
    pub(crate) scrape_reuse_window: Duration,
    /// Whether `/metrics` gzips for clients that accept it.
    pub(crate) gzip: bool,
    /// The largest stats dump answered.
    pub(crate) stats_max_bytes: usize,
    /// A dump that finished less than this long ago answers new requests too.
    pub(crate) stats_reuse_window: Duration,
    /// Stats answers per second; beyond, 429.
    pub(crate) stats_rate_limit: u32,
    /// Whether the per-arena gauges are registered.
    pub(crate) per_arena_metrics: bool,
    /// The largest jemalloc heap dump read.
    pub(crate) heap_profile_max_bytes: u64,
    /// How long a request waits for its job unless its endpoint says otherwise.
    pub(crate) job_deadline: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            purge_cooldown: DEFAULT_PURGE_COOLDOWN,
            max_concurrent_scrapes: DEFAULT_MAX_CONCURRENT_SCRAPES,
            scrape_reuse_window: Duration::ZERO,
            gzip: true,
            stats_max_bytes: DEFAULT_STATS_MAX_BYTES,
            stats_reuse_window: DEFAULT_STATS_REUSE_WINDOW,
            stats_rate_limit: DEFAULT_STATS_RATE_LIMIT,
            per_arena_metrics: false,
            heap_profile_max_bytes: DEFAULT_HEAP_PROFILE_MAX_BYTES,
            job_deadline: DEFAULT_JOB_DEADLINE,
        }
    }
}
