//! The memory governor's instruments, read from what it last published (no reading of its
//! own, except the usage while no limit is set).
//!
//! With `opentelemetry-prometheus` they are exported as:
//!
//! - `jemalloc_memory_limit_bytes` (gauge): the limit; no series while none is set;
//! - `jemalloc_memory_usage_bytes` (gauge): what the governor watches, the cgroup's usage or
//!   the process's RSS (read on the scrape while no limit is set);
//! - `jemalloc_memory_pressure` (gauge): 0 ok, 1 near (above the high-water mark), 2 over
//!   (above the limit after giving back);
//! - `jemalloc_memory_unreclaimable` (gauge): 1 while over the limit with nothing left to
//!   give back, else 0;
//! - `jemalloc_memory_given_back_bytes_total` and `jemalloc_memory_give_back_runs_total`
//!   (counters): the governor's work, for the whole process;
//! - `jemalloc_shed_requests_total` (counter): the forwarded requests this layer shed.

use crate::governor::{Governor, HoldsShedding, Status};
use opentelemetry::metrics::{AsyncInstrument, Meter};
use std::sync::{Arc, Weak};

/// Whether an instrument is a gauge or a (monotonic) counter.
enum Kind {
    Gauge,
    Counter,
}

/// A reading of what the governor last published; `None`: no series.
type Reading = fn(&Status) -> Option<u64>;

/// The instruments read from the governor's status, one row each: kind, name, description,
/// unit, reading.
const STATUS_INSTRUMENTS: [(Kind, &str, &str, Option<&str>, Reading); 5] = [
    (
        Kind::Gauge,
        "jemalloc.memory.limit",
        "The memory limit the governor keeps the process under, when set",
        Some("By"),
        |status| status.limit(),
    ),
    (
        Kind::Gauge,
        "jemalloc.memory.pressure",
        "Memory pressure: 0 ok, 1 near the limit (above the high-water mark), 2 over the \
         limit after giving back",
        None,
        |status| Some(status.pressure().as_gauge()),
    ),
    (
        Kind::Gauge,
        "jemalloc.memory.unreclaimable",
        "1 while the process is over its memory limit with nothing left to give back",
        None,
        |status| Some(u64::from(status.unreclaimable())),
    ),
    (
        Kind::Counter,
        "jemalloc.memory.given_back",
        "Bytes of dirty and muzzy pages the governor gave back to the OS",
        Some("By"),
        |status| Some(status.given_back()),
    ),
    (
        Kind::Counter,
        "jemalloc.memory.give_back_runs",
        "Times the governor gave pages back",
        None,
        |status| Some(status.runs()),
    ),
];

/// Registers the governor's instruments on `meter`, reading `governor` and `shedding`.
pub(crate) fn register(
    meter: &Meter,
    governor: &Arc<Governor>,
    shedding: &Weak<dyn HoldsShedding>,
) {
    // The handles are markers: the SDK keeps each callback for the provider's lifetime. The
    // callbacks hold the governor weakly, so that a provider of the user's own, which may
    // outlive the layer, does not keep the governor thread running.
    for (kind, name, description, unit, read) in STATUS_INSTRUMENTS {
        let g = Arc::downgrade(governor);
        let callback = move |observer: &dyn AsyncInstrument<u64>| {
            if let Some(value) = g.upgrade().and_then(|g| read(g.status())) {
                observer.observe(value, &[]);
            }
        };
        match kind {
            Kind::Gauge => {
                let mut builder = meter
                    .u64_observable_gauge(name)
                    .with_description(description);
                if let Some(unit) = unit {
                    builder = builder.with_unit(unit);
                }
                let _gauge = builder.with_callback(callback).build();
            }
            Kind::Counter => {
                let mut builder = meter
                    .u64_observable_counter(name)
                    .with_description(description);
                if let Some(unit) = unit {
                    builder = builder.with_unit(unit);
                }
                let _counter = builder.with_callback(callback).build();
            }
        }
    }
    let g = Arc::downgrade(governor);
    let _usage = meter
        .u64_observable_gauge("jemalloc.memory.usage")
        .with_description(
            "The memory the governor watches: the cgroup's usage inside a cgroup with a \
             limit, otherwise the process's RSS",
        )
        .with_unit("By")
        .with_callback(move |observer| {
            let usage = g
                .upgrade()
                .filter(|g| g.status().limit().is_some())
                .and_then(|g| g.status().usage());
            if let Some(usage) = usage.or_else(crate::governor::usage) {
                observer.observe(usage, &[]);
            }
        })
        .build();
    let s = Weak::clone(shedding);
    let _shed = meter
        .u64_observable_counter("jemalloc.shed_requests")
        .with_description("Forwarded requests answered 503 because memory is over the limit")
        .with_callback(move |observer| {
            if let Some(s) = s.upgrade() {
                observer.observe(s.shedding().shed(), &[]);
            }
        })
        .build();
}
