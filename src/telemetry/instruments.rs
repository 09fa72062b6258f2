//! The jemalloc gauges as OpenTelemetry observable instruments.
//!
//! One gauge per row of the figures table (`jemalloc.<name>`, unit `By`). OpenTelemetry 0.33
//! has no batch callbacks, so each gauge has its own callback. To keep "one jemalloc epoch
//! advance per collection, every gauge from the same snapshot", the callbacks share a [`SharedSnapshot`]: the first callback of a collection (whichever the SDK
//! runs first) finds that it already reported the current snapshot, so it takes a new one; the
//! others read that new snapshot. This works for any reader (Prometheus pull, a periodic
//! OTLP reader, several at once) because it relies only on each collection running each
//! callback once. When two readers collect at the very same moment, their callbacks interleave:
//! an export may then mix gauges of two snapshots (each value still a real reading) and the
//! epoch may advance once more than strictly needed.

use crate::jemalloc::ctl::ArenaFigures;
use crate::jemalloc::figures::FIGURES;
use crate::jemalloc::{JemallocError, JemallocStats};
use crate::system::{CgroupMemory, ProcessUsage};
use opentelemetry::metrics::{AsyncInstrument, AsyncInstrumentBuilder, Meter, ObservableGauge};
use opentelemetry::KeyValue;
use std::sync::{Arc, Mutex};

/// Registers the jemalloc gauges on `meter`: one byte gauge (unit `By`) per figure of
/// [`JemallocStats`] plus
/// `jemalloc.arenas`, `jemalloc.background_threads` (1 or 0) and `jemalloc.info` (1, with the
/// jemalloc version as the `version` attribute); with the `profiling` feature and jemalloc
/// started with its profiler, also `jemalloc.profiling.active` (1 or 0) and
/// `jemalloc.profiling.sample_interval` (bytes).
///
/// The gauges are read from jemalloc when the meter provider collects (on each Prometheus
/// scrape, or each export of a periodic reader), with one epoch advance per collection. With
/// `opentelemetry-prometheus` and a namespace of `restate`, they are exported as
/// `restate_jemalloc_{allocated,active,metadata,mapped,retained,resident,dirty,muzzy}_bytes`.
///
/// Use this when you already run your own `SdkMeterProvider` (for example one exporting OTLP
/// only); [`JemallocLayer`](crate::JemallocLayer) calls it for you otherwise. Call it once per
/// meter provider: calling it twice registers every callback twice. For the per-arena gauges
/// too, use [`register_instruments_with`].
///
/// # Errors
///
/// When jemalloc's statistics cannot be read in this process ([`JemallocError`]), nothing is
/// registered: the gauges are left out rather than exported as misleading zeros.
///
/// # Example
///
/// ```
/// use tower_jemalloc::opentelemetry::metrics::MeterProvider;
/// use tower_jemalloc::opentelemetry_sdk::metrics::SdkMeterProvider;
///
/// #[global_allocator]
/// static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;
///
/// let provider = SdkMeterProvider::builder().build(); // add your OTLP reader here
/// let meter = provider.meter("my-service");
/// tower_jemalloc::register_instruments(&meter).expect("jemalloc is the global allocator");
/// ```
pub fn register_instruments(meter: &Meter) -> Result<(), JemallocError> {
    register_instruments_with(meter, InstrumentOptions::new())
}

/// What [`register_instruments_with`] registers beyond the gauges of
/// [`register_instruments`]. Starts with everything optional off; each method switches one
/// group on, so that options added later keep their default and existing code its meaning.
///
/// ```
/// let options = tower_jemalloc::InstrumentOptions::new().per_arena(true);
/// # drop(options);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InstrumentOptions {
    per_arena: bool,
}

impl InstrumentOptions {
    /// The defaults: the gauges of [`register_instruments`], nothing more.
    pub const fn new() -> Self {
        Self { per_arena: false }
    }

    /// Whether to register the per-arena gauges (default `false`): resident, dirty and muzzy
    /// bytes and the thread count of each initialized arena, exported as
    /// `jemalloc_arena_{resident,dirty,muzzy}_bytes{arena="<i>"}` and
    /// `jemalloc_arena_threads{arena="<i>"}`, from the same snapshot as the other gauges.
    /// Four series per arena: see
    /// [`per_arena_metrics`](crate::JemallocLayerBuilder::per_arena_metrics), the layer's
    /// switch for the same gauges, for what they cost.
    pub const fn per_arena(mut self, enabled: bool) -> Self {
        self.per_arena = enabled;
        self
    }
}

/// [`register_instruments`], with the optional gauges `options` switches on.
///
/// # Errors
///
/// As [`register_instruments`]: nothing is registered when jemalloc's statistics cannot be
/// read in this process.
///
/// # Example
///
/// ```
/// use tower_jemalloc::opentelemetry::metrics::MeterProvider;
/// use tower_jemalloc::opentelemetry_sdk::metrics::SdkMeterProvider;
/// use tower_jemalloc::InstrumentOptions;
///
/// #[global_allocator]
/// static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;
///
/// let provider = SdkMeterProvider::builder().build(); // add your OTLP reader here
/// let meter = provider.meter("my-service");
/// tower_jemalloc::register_instruments_with(&meter, InstrumentOptions::new().per_arena(true))
///     .expect("jemalloc is the global allocator");
/// ```
pub fn register_instruments_with(
    meter: &Meter,
    options: InstrumentOptions,
) -> Result<(), JemallocError> {
    let InstrumentOptions { per_arena } = options;
    let ctl = crate::jemalloc::ctl::ctl()?;
    let version = ctl.version()?;
    let snapshot = Arc::new(SharedSnapshot::new(per_arena));
    for (field, figure) in FIGURES.iter().enumerate() {
        // The instrument handle is a zero-sized marker: the SDK keeps the callback registered
        // for the provider's lifetime whether or not the handle is kept.
        let _gauge = gauge(
            meter,
            format!("jemalloc.{}", figure.name),
            figure.help,
            "By",
        )
        .with_callback(snapshot.callback(move |snapshot, observer| {
            if let Some(stats) = &snapshot.stats {
                if let Some((_, value)) = stats.iter().nth(field) {
                    observer.observe(value, &[]);
                }
            }
        }))
        .build();
    }

    // The process's whole memory beside jemalloc's, from the same snapshot: what makes RSS
    // differ from `resident` (thread stacks, mapped files, another allocator) shows here. The
    // cgroup's figures exist only inside a memory cgroup (v2, or v1's memory controller): no
    // series elsewhere (never a fake zero), and none for the limit when there is none.
    type Reading = fn(&Snapshot) -> Option<u64>;
    let process: [(&str, &str, Reading); 4] = [
        (
            "process.memory.usage",
            "The process's resident memory (VmRSS), read with the jemalloc gauges",
            |snapshot| snapshot.process.map(|usage| usage.resident),
        ),
        (
            "process.memory.virtual",
            "The process's virtual memory (VmSize), read with the jemalloc gauges",
            |snapshot| snapshot.process.map(|usage| usage.virtual_size),
        ),
        (
            "process.cgroup.memory.usage",
            "Memory the kernel charges to the process's cgroup (v2 memory.current, v1 memory.usage_in_bytes)",
            |snapshot| snapshot.cgroup.map(|cgroup| cgroup.current),
        ),
        (
            "process.cgroup.memory.limit",
            "The memory limit of the process's cgroup (v2 memory.max, v1 memory.limit_in_bytes), when it has one",
            |snapshot| snapshot.cgroup.and_then(|cgroup| cgroup.max),
        ),
    ];
    for (name, help, read) in process {
        let _gauge = gauge(meter, name.into(), help, "By")
            .with_callback(snapshot.callback(move |snapshot, observer| {
                if let Some(value) = read(snapshot) {
                    observer.observe(value, &[]);
                }
            }))
            .build();
    }

    if per_arena {
        type Figure = fn(&ArenaFigures) -> u64;
        let figures: [(&str, &str, &str, Figure); 4] = [
            (
                "jemalloc.arena.resident",
                "Resident bytes of one jemalloc arena",
                "By",
                |arena| arena.resident,
            ),
            (
                "jemalloc.arena.dirty",
                "Bytes in the unused dirty pages of one jemalloc arena",
                "By",
                |arena| arena.dirty,
            ),
            (
                "jemalloc.arena.muzzy",
                "Bytes in the unused muzzy pages of one jemalloc arena",
                "By",
                |arena| arena.muzzy,
            ),
            (
                "jemalloc.arena.threads",
                "Threads assigned to one jemalloc arena",
                "",
                |arena| arena.threads,
            ),
        ];
        for (name, help, unit, figure) in figures {
            let _gauge = gauge(meter, name.into(), help, unit)
                .with_callback(snapshot.callback(move |snapshot, observer| {
                    for arena in &snapshot.arenas {
                        let label = KeyValue::new("arena", i64::from(arena.arena));
                        observer.observe(figure(arena), &[label]);
                    }
                }))
                .build();
        }
    }

    // A few cheap gauges that need no epoch advance.
    let _arenas = meter
        .u64_observable_gauge("jemalloc.arenas")
        .with_description("Number of jemalloc arenas (arenas.narenas)")
        .with_callback(move |observer| {
            if let Ok(arenas) = ctl.narenas() {
                observer.observe(u64::from(arenas), &[]);
            }
        })
        .build();
    let _background = meter
        .u64_observable_gauge("jemalloc.background_threads")
        .with_description(
            "1 when jemalloc's background threads run (returning freed memory on their own), 0 when not",
        )
        .with_callback(move |observer| {
            if let Ok(running) = ctl.background_threads_running() {
                observer.observe(u64::from(running), &[]);
            }
        })
        .build();
    for (name, help, pick) in [
        (
            "jemalloc.dirty_decay",
            "How long a freed page stays dirty before it is returned, for new arenas \
             (arenas.dirty_decay_ms, in seconds; -1: never)",
            (|(dirty, _)| dirty) as fn((i64, i64)) -> i64,
        ),
        (
            "jemalloc.muzzy_decay",
            "How long a page stays muzzy before it is returned, for new arenas \
             (arenas.muzzy_decay_ms, in seconds; -1: never)",
            |(_, muzzy)| muzzy,
        ),
    ] {
        let _decay = meter
            .f64_observable_gauge(name)
            .with_unit("s")
            .with_description(help)
            .with_callback(move |observer| {
                if let Ok(defaults) = ctl.decay_defaults() {
                    observer.observe(decay_seconds(pick(defaults)), &[]);
                }
            })
            .build();
    }
    let _info = meter
        .u64_observable_gauge("jemalloc.info")
        .with_description("jemalloc's version as a label; always 1")
        .with_callback(move |observer| observer.observe(1, &[KeyValue::new("version", version)]))
        .build();
    #[cfg(profiling)]
    register_profiling(meter, ctl);
    Ok(())
}

/// `jemalloc.profiling.active` (1 or 0) and `jemalloc.profiling.sample_interval` (bytes), in
/// builds with the heap profiler; left out while jemalloc runs without it (`prof:false`).
#[cfg(profiling)]
fn register_profiling(meter: &Meter, ctl: &'static crate::jemalloc::ctl::Ctl) {
    let started = move || ctl.prof_started().unwrap_or(false);
    let _active = meter
        .u64_observable_gauge("jemalloc.profiling.active")
        .with_description("1 while jemalloc's heap profiler samples allocations, 0 when not")
        .with_callback(move |observer| {
            if let (true, Ok(active)) = (started(), ctl.prof_active()) {
                observer.observe(u64::from(active), &[]);
            }
        })
        .build();
    let _interval = meter
        .u64_observable_gauge("jemalloc.profiling.sample_interval")
        .with_unit("By")
        .with_description(
            "Mean bytes allocated between two heap profile samples (2^prof.lg_sample)",
        )
        .with_callback(move |observer| {
            if let (true, Ok(lg)) = (started(), ctl.prof_lg_sample()) {
                if let Some(bytes) = 1u64.checked_shl(lg) {
                    observer.observe(bytes, &[]);
                }
            }
        })
        .build();
}

/// A decay time in seconds, with jemalloc's `-1` (never) kept as `-1`.
fn decay_seconds(ms: i64) -> f64 {
    if ms < 0 {
        -1.0
    } else {
        ms as f64 / 1000.0
    }
}

/// A `u64` gauge builder with its help and unit (none when empty).
fn gauge<'a>(
    meter: &'a Meter,
    name: String,
    help: &'static str,
    unit: &'static str,
) -> AsyncInstrumentBuilder<'a, ObservableGauge<u64>, u64> {
    let gauge = meter.u64_observable_gauge(name).with_description(help);
    if unit.is_empty() {
        gauge
    } else {
        gauge.with_unit(unit)
    }
}

/// What one collection reads, once, for every gauge that needs an epoch advance.
#[derive(Default)]
struct Snapshot {
    /// `None` when reading it failed.
    stats: Option<JemallocStats>,
    process: Option<ProcessUsage>,
    cgroup: Option<CgroupMemory>,
    /// Empty unless the per-arena gauges are registered.
    arenas: Vec<ArenaFigures>,
}

/// The snapshot the gauges' callbacks of one registration share.
struct SharedSnapshot {
    per_arena: bool,
    state: Mutex<SnapshotState>,
}

#[derive(Default)]
struct SnapshotState {
    /// Incremented each time a new snapshot is taken.
    cycle: u64,
    snapshot: Snapshot,
    /// The last cycle each gauge reported, by gauge (in the order they were registered).
    reported: Vec<u64>,
}

impl SharedSnapshot {
    fn new(per_arena: bool) -> Self {
        Self {
            per_arena,
            state: Mutex::default(),
        }
    }

    /// A callback that reports from the snapshot of the current collection (taking a new
    /// one when this gauge already reported the current one: a new collection has started).
    fn callback(
        self: &Arc<Self>,
        report: impl Fn(&Snapshot, &dyn AsyncInstrument<u64>) + Send + Sync + 'static,
    ) -> impl Fn(&dyn AsyncInstrument<u64>) + Send + Sync + 'static {
        let gauge = {
            let mut state = self.lock();
            state.reported.push(0);
            state.reported.len() - 1
        };
        let shared = Arc::clone(self);
        move |observer| {
            let mut state = shared.lock();
            if state.reported[gauge] == state.cycle {
                state.cycle += 1;
                state.snapshot = shared.read();
            }
            state.reported[gauge] = state.cycle;
            report(&state.snapshot, observer);
        }
    }

    /// Advances jemalloc's epoch once and reads everything the gauges report.
    fn read(&self) -> Snapshot {
        let ctl = crate::jemalloc::ctl::ctl();
        let stats = match ctl.clone().and_then(|ctl| ctl.snapshot()) {
            Ok(stats) => Some(stats),
            Err(e) => {
                tracing::warn!("tower-jemalloc: cannot read jemalloc stats: {e}");
                None
            }
        };
        let arenas = match ctl {
            Ok(ctl) if self.per_arena && stats.is_some() => {
                ctl.arena_figures().unwrap_or_else(|e| {
                    tracing::warn!("tower-jemalloc: cannot read per-arena stats: {e}");
                    Vec::new()
                })
            }
            _ => Vec::new(),
        };
        Snapshot {
            stats,
            process: ProcessUsage::read(),
            cgroup: CgroupMemory::read(),
            arenas,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SnapshotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}
