//! OpenTelemetry and Prometheus: what the layer measures, and how `/metrics` writes it.
//! Knows nothing of HTTP; the endpoints use it.
//!
//! - [`instruments`]: jemalloc's figures, the process's memory and the cgroup's as
//!   OpenTelemetry observable gauges, from one snapshot per collection.
//! - [`governor`]: the memory governor's gauges and counters.
//! - [`exposition`]: a registry's Prometheus text exposition, encoded and gzipped once per
//!   scrape.

pub(crate) mod exposition;
pub(crate) mod governor;
pub(crate) mod instruments;
