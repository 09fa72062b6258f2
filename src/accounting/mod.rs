//! Bytes allocated per request, by route, from jemalloc's per-thread counters.
//!
//! When the layer counts them ([`per_route_allocation`](crate::JemallocLayerBuilder::per_route_allocation)),
//! each forwarded request's future and response body are polled between two readings of the
//! polling thread's totals (`thread.allocatedp` and `thread.deallocatedp`: two plain loads
//! each), so a request that moves between worker threads is still counted whole, and nothing
//! is paid per allocation. The request is recorded when its response body is dropped: the
//! bytes it allocated into the histogram `http.server.request.allocated`, and allocated minus
//! freed into `http.server.request.kept`, under its method, route and status.
//!
//! - [`account`]: one request's account ([`RequestAccount`]), the helper that brings in work
//!   from other threads, and the recorder.
//! - [`polls`]: the request's future and body with each poll counted.
//! - [`route`]: where `http.route` comes from ([`RouteLayer`], [`grpc_method`]).
//! - [`ledger`]: the routes under their cap, and one prebuilt attribute set per series.
//!
//! What the figures are, and are not:
//!
//! - Sizes are jemalloc's size classes (a 60-byte `Vec` counts 64), of what jemalloc serves.
//! - The request's own head and body are allocated by the server and freed by the handler,
//!   and the response's head by the handler and freed by the server after writing it: both
//!   count on one side only, and mostly cancel (a few hundred bytes either way). The response
//!   body's data frames are counted as freed when handed to the server, when nothing else
//!   shares them.
//! - A request body's data is allocated by the server as it reads it and freed by the handler:
//!   routes that take large bodies show bytes kept below zero by about their size (wrapping
//!   the request body would change the type the inner service receives).
//! - Work on other threads or tasks counts only through [`RequestAccount::in_scope`] and
//!   [`RequestAccount::instrument`], and only until the request is recorded.
//! - Memory freed by a later request (a cache filled by one request and emptied by another)
//!   is kept by the first and freed by the second: bytes kept are a route's net effect on the
//!   heap over time, not a leak verdict per request.

pub(crate) mod account;
pub(crate) mod ledger;
pub(crate) mod polls;
pub(crate) mod route;

pub use account::{Instrumented, RequestAccount};
pub use ledger::{RouteFigures, DEFAULT_MAX_ROUTES, OTHER_ROUTE, UNMATCHED_ROUTE};
pub use route::{grpc_method, RouteLayer, RouteService};

use http::request::Parts;
use ledger::{method_index, Ledger};
use route::RouteFn;
use std::sync::Arc;

/// The layer's accounting: its ledger and where routes come from.
pub(crate) struct Accounting {
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) route_from: Option<RouteFn>,
}

impl std::fmt::Debug for Accounting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounting")
            .field("route_from", &self.route_from.as_ref().map(|_| "<fn>"))
            .finish_non_exhaustive()
    }
}

impl Accounting {
    /// Opens a request's account. Returns it, the request's method, and the route
    /// `route_from` names, if any (confirmed by the answer: [`account::Recorder::respond`]).
    pub(crate) fn open(&self, parts: &Parts) -> (RequestAccount, u8, Option<Box<str>>) {
        let account = RequestAccount::new(Arc::clone(&self.ledger));
        let route = self
            .route_from
            .as_ref()
            .and_then(|route| route(parts))
            .map(Box::from);
        (account, method_index(&parts.method), route)
    }
}

/// What the routes' figures suggest, for the stats summary: the routes that allocate most,
/// and any route that keeps a good part of what it allocates.
pub(crate) fn route_hints(ledger: &Ledger) -> Vec<String> {
    let routes = ledger.top_routes(usize::MAX);
    let mut hints = Vec::new();
    if routes.is_empty() {
        return hints;
    }
    let top: Vec<String> = routes
        .iter()
        .take(3)
        .map(|r| {
            format!(
                "{} {} ({} in {} request{}, {} each)",
                r.method,
                r.route,
                bytes(r.allocated_bytes),
                r.requests,
                if r.requests == 1 { "" } else { "s" },
                bytes(r.allocated_bytes / r.requests.max(1)),
            )
        })
        .collect();
    hints.push(format!(
        "Routes that allocate the most since start: {} (http_server_request_allocated_bytes).",
        top.join(", ")
    ));
    // Keeping more than 1 MiB, and more than a tenth of what it allocated.
    let keeping = routes
        .iter()
        .filter(|r| r.kept_bytes > 1 << 20 && r.kept_bytes as u64 > r.allocated_bytes / 10)
        .max_by_key(|r| r.kept_bytes);
    if let Some(r) = keeping {
        hints.push(format!(
            "{} {} kept {} of the {} its requests allocated (http_server_request_kept_bytes): \
             memory it allocates outlives its requests, as a cache's or a leak's does. A heap \
             profile shows where it is held (GET /debug/pprof/heap).",
            r.method,
            r.route,
            bytes(r.kept_bytes as u64),
            bytes(r.allocated_bytes),
        ));
    }
    hints
}

/// Bytes for people: KiB under a MiB, MiB under a GiB, GiB above, one decimal.
fn bytes(n: u64) -> String {
    let n = n as f64;
    if n < 1024.0 * 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else if n < 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} MiB", n / (1024.0 * 1024.0))
    } else {
        format!("{:.1} GiB", n / (1024.0 * 1024.0 * 1024.0))
    }
}
