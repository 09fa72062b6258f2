//! One meter provider with two readers, as in `examples/two_readers.rs`: the Prometheus exporter
//! whose registry the layer serves on `/metrics`, and a `PeriodicReader` pushing to another
//! exporter. The jemalloc gauges, registered once by the layer, and the application's own
//! counter reach both.
#![cfg(all(feature = "jemalloc", not(target_env = "msvc")))]

mod common;

use common::{parse_exposition, request, send, GAUGES};
use http::StatusCode;
use opentelemetry::metrics::MeterProvider;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::Layer;
use tower_jemalloc::JemallocLayer;

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

/// The last export the periodic reader pushed: instrument name → (scope name, value), for
/// the `u64` gauges and sums.
type Exported = Arc<Mutex<Option<BTreeMap<String, (String, u64)>>>>;

/// A push exporter that keeps what it was given, standing in for an OTLP exporter.
#[derive(Debug, Default)]
struct Recording(Exported);

impl PushMetricExporter for Recording {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let mut seen = BTreeMap::new();
        for scope in metrics.scope_metrics() {
            for metric in scope.metrics() {
                let value = match metric.data() {
                    AggregatedMetrics::U64(MetricData::Gauge(gauge)) => {
                        gauge.data_points().map(|p| p.value()).sum()
                    }
                    AggregatedMetrics::U64(MetricData::Sum(sum)) => {
                        sum.data_points().map(|p| p.value()).sum()
                    }
                    _ => continue,
                };
                seen.insert(
                    metric.name().to_owned(),
                    (scope.scope().name().to_owned(), value),
                );
            }
        }
        *self.0.lock().unwrap() = Some(seen);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_readers_get_the_jemalloc_gauges_and_the_app_counter() {
    let registry = prometheus::Registry::new();
    let prometheus_reader = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .build()
        .unwrap();
    let exported = Exported::default();
    // An interval far beyond the test: only `force_flush` below makes it export.
    let periodic_reader = PeriodicReader::builder(Recording(Arc::clone(&exported)))
        .with_interval(Duration::from_secs(3600))
        .build();
    let provider = SdkMeterProvider::builder()
        .with_reader(prometheus_reader)
        .with_reader(periodic_reader)
        .build();

    let layer = JemallocLayer::builder()
        .registry(registry, provider.meter("tower-jemalloc"))
        .build()
        .unwrap();
    let orders = provider.meter("my-app").u64_counter("app.orders").build();
    orders.add(3, &[]);

    let (echo, _) = common::recording_echo();
    let mut service = layer.layer(echo);
    let answer = send(&mut service, request("GET", "/metrics")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let exposition = parse_exposition(answer.text());
    for gauge in GAUGES {
        let name = format!("jemalloc_{gauge}_bytes");
        assert!(
            exposition.value(&name).is_some(),
            "/metrics lacks {name}:\n{}",
            answer.text()
        );
    }
    assert!(exposition.value("jemalloc_resident_bytes").unwrap() > 0.0);
    assert_eq!(exposition.value("app_orders_total"), Some(3.0));

    // The periodic reader's export, on its own thread; bounded by the SDK's flush timeout.
    tokio::task::spawn_blocking({
        let provider = provider.clone();
        move || provider.force_flush()
    })
    .await
    .unwrap()
    .expect("the periodic reader exports");
    let pushed = exported
        .lock()
        .unwrap()
        .clone()
        .expect("the periodic reader exported once");
    for gauge in GAUGES {
        let name = format!("jemalloc.{gauge}");
        let (scope, _) = pushed
            .get(&name)
            .unwrap_or_else(|| panic!("the periodic reader lacks {name}: {pushed:?}"));
        assert_eq!(scope, "tower-jemalloc", "{name}");
    }
    assert!(pushed["jemalloc.resident"].1 > 0, "{pushed:?}");
    assert!(pushed["jemalloc.allocated"].1 > 0, "{pushed:?}");
    assert_eq!(pushed["app.orders"], ("my-app".to_owned(), 3));

    // Each reader collects on its own: a second scrape still serves everything.
    let answer = send(&mut service, request("GET", "/metrics")).await;
    let exposition = parse_exposition(answer.text());
    assert!(exposition.value("jemalloc_allocated_bytes").unwrap() > 0.0);
    assert_eq!(exposition.value("app_orders_total"), Some(3.0));

    provider.shutdown().unwrap();
}
