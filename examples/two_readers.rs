//! One `SdkMeterProvider`, two readers: Prometheus pulls `/metrics` (served by the layer) while a
//! `PeriodicReader` pushes the same instruments elsewhere, here to stdout; in production that
//! second reader would carry an OTLP exporter. The jemalloc gauges are registered once and
//! reach both, as does the application's own counter.
//!
//! ```text
//! cargo run --release --example two_readers [-- --addr 127.0.0.1:9074 --interval SECS]
//! curl -s http://127.0.0.1:9074/                       # counts app.requests
//! curl -s http://127.0.0.1:9074/metrics | grep -E 'jemalloc|app_requests'
//! # ...and every SECS seconds (default 10) the periodic reader prints the same instruments.
//! ```

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use opentelemetry::metrics::{Counter, MeterProvider};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use std::fmt::Display;
use std::time::Duration;
use tower::Layer;
use tower_jemalloc::{Endpoint, JemallocLayer};

#[path = "common/mod.rs"]
mod common;

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

/// A push exporter that prints every data point: the stand-in for an OTLP exporter.
#[derive(Debug)]
struct StdoutExporter;

impl PushMetricExporter for StdoutExporter {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        println!("[periodic reader]");
        for scope in metrics.scope_metrics() {
            for metric in scope.metrics() {
                let (name, unit) = (metric.name(), metric.unit());
                match metric.data() {
                    AggregatedMetrics::U64(data) => print_points(name, unit, data),
                    AggregatedMetrics::I64(data) => print_points(name, unit, data),
                    AggregatedMetrics::F64(data) => print_points(name, unit, data),
                }
            }
        }
        Ok(())
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }

    fn temporality(&self) -> Temporality {
        Temporality::Cumulative
    }
}

/// Prints gauges and sums; histograms print their count.
fn print_points<T: Display + Copy>(name: &str, unit: &str, data: &MetricData<T>) {
    // " By" after the jemalloc gauges; nothing after unitless instruments.
    let unit = if unit.is_empty() {
        String::new()
    } else {
        format!(" {unit}")
    };
    match data {
        MetricData::Gauge(gauge) => {
            for point in gauge.data_points() {
                println!("  {name} = {}{unit}", point.value());
            }
        }
        MetricData::Sum(sum) => {
            for point in sum.data_points() {
                println!("  {name} = {}{unit}", point.value());
            }
        }
        MetricData::Histogram(histogram) => {
            for point in histogram.data_points() {
                println!("  {name}: {} observations", point.count());
            }
        }
        MetricData::ExponentialHistogram(histogram) => {
            for point in histogram.data_points() {
                println!("  {name}: {} observations", point.count());
            }
        }
    }
}

#[tokio::main]
async fn main() {
    let args = common::parse(
        "two_readers",
        9074,
        &[(
            "--interval",
            "SECS",
            "how often the periodic reader prints (default 10)",
        )],
    );
    let interval = match args.extra("--interval").map(str::parse::<u64>) {
        None => Duration::from_secs(10),
        Some(Ok(secs)) if secs > 0 => Duration::from_secs(secs),
        Some(_) => common::fail(2, "--interval expects whole seconds > 0"),
    };

    // Reader 1: the Prometheus exporter, writing into the registry the layer serves.
    let registry = prometheus::Registry::new();
    // With your own registry, the namespace belongs to your exporter.
    let mut prometheus_reader =
        opentelemetry_prometheus::exporter().with_registry(registry.clone());
    if let Some(namespace) = &args.namespace {
        prometheus_reader = prometheus_reader.with_namespace(namespace);
    }
    let prometheus_reader = prometheus_reader
        .build()
        .expect("a fresh registry accepts the exporter");
    // Reader 2: pushes every `interval` from a thread of its own (no async runtime needed).
    let periodic_reader = PeriodicReader::builder(StdoutExporter)
        .with_interval(interval)
        .build();
    let provider = SdkMeterProvider::builder()
        .with_reader(prometheus_reader)
        .with_reader(periodic_reader)
        .build();

    // The layer registers the jemalloc gauges on this meter: once, for both readers.
    let mut builder = JemallocLayer::builder().registry(registry, provider.meter("tower-jemalloc"));
    if let Some(token) = &args.purge_token {
        builder = builder.bearer_token(Endpoint::Purge, token);
    }
    let layer = builder.build().unwrap_or_else(|e| common::fail(2, e));
    let requests = provider
        .meter("my-app")
        .u64_counter("app.requests")
        .with_description("Requests to /")
        .build();

    let router = Router::new().route("/", get(hello)).with_state(requests);
    let app = layer.layer(router);

    let listener = args.listen().await;
    let addr = listener
        .local_addr()
        .expect("bound listener has an address");
    println!("listening on http://{addr}");
    println!("  curl -s http://{addr}/");
    println!("  curl -s http://{addr}/metrics | grep -E 'jemalloc|app_requests'");
    println!("the periodic reader prints every {} s", interval.as_secs());

    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        println!("shutting down");
    };
    // Header-read and idle timeouts, graceful shutdown: common/serve.rs.
    common::serve::serve(listener, app, shutdown, std::time::Duration::from_secs(10)).await;
    // Stops the periodic reader's thread after one last export.
    if let Err(e) = provider.shutdown() {
        eprintln!("error: meter provider shutdown: {e}");
    }
}

async fn hello(State(requests): State<Counter<u64>>) -> &'static str {
    requests.add(1, &[]);
    "tower-jemalloc two_readers example: try /metrics\n"
}
