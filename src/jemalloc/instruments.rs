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

use super::figures::FIGURES;
use super::{JemallocError, JemallocStats};
use opentelemetry::metrics::Meter;
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
/// meter provider: calling it twice registers every callback twice.
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
    let ctl = super::ctl::ctl()?;
    let version = ctl.version()?;
    let snapshot = Arc::new(SharedSnapshot::default());
    for (field, figure) in FIGURES.iter().enumerate() {
        let snapshot = Arc::clone(&snapshot);
        // The instrument handle is a zero-sized marker: the SDK keeps the callback registered
        // for the provider's lifetime whether or not the handle is kept.
        let _gauge = meter
            .u64_observable_gauge(format!("jemalloc.{}", figure.name))
            .with_unit("By")
            .with_description(figure.help)
            .with_callback(move |observer| {
                if let Some(value) = snapshot.observe(field) {
                    observer.observe(value, &[]);
                }
            })
            .build();
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
fn register_profiling(meter: &Meter, ctl: &'static super::ctl::Ctl) {
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

/// The snapshot the figure gauges' callbacks of one registration share.
#[derive(Default)]
struct SharedSnapshot {
    state: Mutex<SnapshotState>,
}

#[derive(Default)]
struct SnapshotState {
    /// Incremented each time a new snapshot is taken.
    cycle: u64,
    /// The snapshot of `cycle`; `None` when reading it failed.
    stats: Option<JemallocStats>,
    /// The last cycle each gauge reported, by row of the figures table.
    reported: [u64; FIGURES.len()],
}

impl SharedSnapshot {
    /// The value of gauge `field` for the current collection, taking a new snapshot when this
    /// gauge already reported the current one (which means a new collection has started).
    fn observe(&self, field: usize) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.reported[field] == state.cycle {
            state.cycle += 1;
            state.stats = match super::ctl::ctl().and_then(|ctl| ctl.snapshot()) {
                Ok(stats) => Some(stats),
                Err(e) => {
                    tracing::warn!("tower-jemalloc: cannot read jemalloc stats: {e}");
                    None
                }
            };
        }
        let cycle = state.cycle;
        state.reported[field] = cycle;
        let stats = state.stats?;
        stats.iter().nth(field).map(|(_, value)| value)
    }
}
