//! The jemalloc gauges as OpenTelemetry observable instruments, and the Prometheus text
//! rendering behind `GET /metrics`.
//!
//! OpenTelemetry 0.33 has no batch callbacks, so each gauge has its own callback. To keep
//! "one jemalloc epoch advance per collection, every gauge from the same snapshot", the eight
//! callbacks share a [`SharedSnapshot`]: the first callback of a collection (whichever the SDK
//! runs first) finds that it already reported the current snapshot, so it takes a new one; the
//! other seven read that new snapshot. This works for any reader (Prometheus pull, a periodic
//! OTLP reader, several at once) because it relies only on each collection running each
//! callback once.

use crate::stats::{JemallocError, JemallocStats};
use opentelemetry::metrics::Meter;
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

/// Registers the jemalloc gauges (unit `By`) on `meter`.
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
    crate::ctl::ctl()?;
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

/// Gathers `registry` and encodes it in the Prometheus text format.
pub(crate) fn render(registry: &prometheus::Registry) -> Result<Vec<u8>, String> {
    use prometheus::Encoder;
    let families = registry.gather();
    let mut buf = Vec::with_capacity(16 * 1024);
    prometheus::TextEncoder::new()
        .encode(&families, &mut buf)
        .map_err(|e| format!("cannot encode metrics: {e}"))?;
    Ok(buf)
}

/// The content type of [`render`]'s output (`text/plain; version=0.0.4`).
fn content_type() -> &'static str {
    prometheus::TEXT_FORMAT
}

/// Answers a request on the metrics path: `GET` renders the registry, `HEAD` the same headers
/// without the body, anything else is a 405.
pub(crate) fn respond(
    registry: &prometheus::Registry,
    method: &http::Method,
    path: &str,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
    use http::{Method, StatusCode};

    let head = method == Method::HEAD;
    if method != Method::GET && !head {
        return crate::response::method_not_allowed("GET, HEAD", path);
    }
    let text = match render(registry) {
        Ok(text) => text,
        Err(reason) => return crate::response::text(StatusCode::INTERNAL_SERVER_ERROR, reason),
    };
    let length = text.len();
    let body = if head {
        bytes::Bytes::new()
    } else {
        text.into()
    };
    let mut response = http::Response::new(http_body_util::Full::new(body));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type()));
    if head {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
    }
    response
}
