//! OpenTelemetry and Prometheus: what the layer measures, and how `/metrics` writes it.
//! Knows nothing of HTTP; the endpoints use it.
//!
//! - [`instruments`]: jemalloc's figures, the process's memory and the cgroup's as
//!   OpenTelemetry observable gauges, from one snapshot per collection.
//! - [`governor`]: the memory governor's gauges and counters.
//! - [`requests`]: bytes allocated and kept per request, by route (OpenTelemetry's HTTP
//!   conventions for the attributes; the values come from the accounting).
//! - [`exposition`]: a registry's Prometheus text exposition, encoded and gzipped once per
//!   scrape.

pub(crate) mod exposition;
pub(crate) mod governor;
pub(crate) mod instruments;
pub(crate) mod requests;
