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

use crate::governor::{Governor, HoldsShedding};
use opentelemetry::metrics::Meter;
use std::sync::{Arc, Weak};

/// Registers the governor's instruments on `meter`, reading `governor` and `shedding`.
pub(crate) fn register(
    meter: &Meter,
    governor: &Arc<Governor>,
    shedding: &Weak<dyn HoldsShedding>,
) {
    // The handles are markers: the SDK keeps each callback for the provider's lifetime. The
    // callbacks hold the governor weakly, so that a provider of the user's own, which may
    // outlive the layer, does not keep the governor thread running.
    let g = Arc::downgrade(governor);
    let _limit = meter
        .u64_observable_gauge("jemalloc.memory.limit")
        .with_description("The memory limit the governor keeps the process under, when set")
        .with_unit("By")
        .with_callback(move |observer| {
            if let Some(limit) = g.upgrade().and_then(|g| g.status().limit()) {
                observer.observe(limit, &[]);
            }
        })
        .build();
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
    let g = Arc::downgrade(governor);
    let _pressure = meter
        .u64_observable_gauge("jemalloc.memory.pressure")
        .with_description(
            "Memory pressure: 0 ok, 1 near the limit (above the high-water mark), 2 over the \
             limit after giving back",
        )
        .with_callback(move |observer| {
            if let Some(g) = g.upgrade() {
                observer.observe(g.status().pressure().as_gauge(), &[]);
            }
        })
        .build();
    let g = Arc::downgrade(governor);
    let _unreclaimable = meter
        .u64_observable_gauge("jemalloc.memory.unreclaimable")
        .with_description(
            "1 while the process is over its memory limit with nothing left to give back",
        )
        .with_callback(move |observer| {
            if let Some(g) = g.upgrade() {
                observer.observe(u64::from(g.status().unreclaimable()), &[]);
            }
        })
        .build();
    let g = Arc::downgrade(governor);
    let _given_back = meter
        .u64_observable_counter("jemalloc.memory.given_back")
        .with_description("Bytes of dirty and muzzy pages the governor gave back to the OS")
        .with_unit("By")
        .with_callback(move |observer| {
            if let Some(g) = g.upgrade() {
                observer.observe(g.status().given_back(), &[]);
            }
        })
        .build();
    let g = Arc::downgrade(governor);
    let _runs = meter
        .u64_observable_counter("jemalloc.memory.give_back_runs")
        .with_description("Times the governor gave pages back")
        .with_callback(move |observer| {
            if let Some(g) = g.upgrade() {
                observer.observe(g.status().runs(), &[]);
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
