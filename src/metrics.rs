//! The jemalloc gauges as OpenTelemetry observable instruments.
//!
//! OpenTelemetry 0.33 has no batch callbacks, so each gauge has its own callback. To keep
//! "one jemalloc epoch advance per collection, every gauge from the same snapshot", the eight
//! callbacks share a [`SharedSnapshot`]: the first callback of a collection (whichever the SDK
//! runs first) finds that it already reported the current snapshot, so it takes a new one; the
//! other seven read that new snapshot. This works for any reader (Prometheus pull, a periodic
//! OTLP reader, several at once) because it relies only on each collection running each
//! callback once. When two readers collect at the very same moment, their callbacks interleave:
//! an export may then mix gauges of two snapshots (each value still a real reading) and the
//! epoch may advance once more than strictly needed.

use crate::stats::{JemallocError, JemallocStats};
use opentelemetry::metrics::Meter;
use opentelemetry::KeyValue;
use std::sync::{Arc, Mutex};

/// Instrument name (before the exporter adds namespace and `_bytes`) and help text, in the
/// order of [`JemallocStats::FIELDS`].
pub(crate) const GAUGES: [(&str, &str); 8] = [
    (
        "jemalloc.allocated",
        "Total bytes allocated by the application",
    ),
    (
        "jemalloc.active",
        "Total bytes in active pages (multiple of page size)",
    ),
    ("jemalloc.metadata", "Bytes dedicated to jemalloc metadata"),
    (
        "jemalloc.mapped",
        "Total bytes in chunks mapped for the application",
    ),
    (
        "jemalloc.retained",
        "Bytes in virtual memory mappings retained (not returned to OS)",
    ),
    (
        "jemalloc.resident",
        "Maximum bytes in physically resident data pages",
    ),
    (
        "jemalloc.dirty",
        "Bytes in unused dirty pages that a purge would return to the OS",
    ),
    (
        "jemalloc.muzzy",
        "Bytes in unused pages advised to the OS (MADV_FREE) but not yet reclaimed by it",
    ),
];

/// Registers the jemalloc gauges on `meter`: the eight byte gauges (unit `By`) plus
/// `jemalloc.arenas`, `jemalloc.background_threads` (1 or 0) and `jemalloc.info` (1, with the
/// jemalloc version as the `version` attribute).
///
/// The gauges are read from jemalloc when the meter provider collects (on each Prometheus
/// scrape, or each export of a periodic reader), with one epoch advance per collection. With
/// [`opentelemetry_prometheus`] and a namespace of `restate`, they are exported as
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
/// use opentelemetry::metrics::MeterProvider;
/// use opentelemetry_sdk::metrics::SdkMeterProvider;
///
/// #[global_allocator]
/// static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;
///
/// let provider = SdkMeterProvider::builder().build(); // add your OTLP reader here
/// let meter = provider.meter("my-service");
/// tower_jemalloc::register_instruments(&meter).expect("jemalloc is the global allocator");
/// ```
pub fn register_instruments(meter: &Meter) -> Result<(), JemallocError> {
    let ctl = crate::ctl::ctl()?;
    let version = ctl.version()?;
    let snapshot = Arc::new(SharedSnapshot::default());
    for (field, (name, help)) in GAUGES.iter().enumerate() {
        let snapshot = Arc::clone(&snapshot);
        // The instrument handle is a zero-sized marker: the SDK keeps the callback registered
        // for the provider's lifetime whether or not the handle is kept.
        let _gauge = meter
            .u64_observable_gauge(*name)
            .with_unit("By")
            .with_description(*help)
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
    Ok(())
}

/// The snapshot the eight gauge callbacks of one registration share.
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
    /// The last cycle each gauge reported.
    reported: [u64; 8],
}

impl SharedSnapshot {
    /// The value of gauge `field` for the current collection, taking a new snapshot when this
    /// gauge already reported the current one (which means a new collection has started).
    fn observe(&self, field: usize) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.reported[field] == state.cycle {
            state.cycle += 1;
            state.stats = match crate::ctl::ctl().and_then(|ctl| ctl.snapshot()) {
                Ok(stats) => Some(stats),
                Err(e) => {
                    tracing::warn!("tower-jemalloc: cannot read jemalloc stats: {e}");
                    None
                }
            };
        }
        let cycle = state.cycle;
        state.reported[field] = cycle;
        state.stats.map(|stats| stats.values()[field])
    }
}
