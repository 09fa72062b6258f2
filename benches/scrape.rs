//! P2: the cost of one `/metrics` render at 0, 1,000 and 10,000 series, side by side:
//!
//! - `ours`: a `GET /metrics` through the layer (opentelemetry SDK collect, the
//!   opentelemetry-prometheus conversion to Prometheus families, text encoding), on a registry
//!   holding only the benchmark's series, like the other two;
//! - `ours+jemalloc`: the same with the layer's jemalloc instruments (one epoch advance);
//! - `metrics-exporter-prometheus`: `PrometheusHandle::render()` of the same series (what an
//!   axum route with that crate, as Restate has, costs);
//! - `hand-written`: formatting the same lines directly: the lower limit.
//!
//! Plus where our time goes: `registry.gather()` (SDK collect + the exporter's conversion)
//! alone, and what `prometheus::TextEncoder` took to encode its result (the crate now uses its
//! own encoder, `src/encode.rs`).
//!
//! Series: counters `requests_total{route="/r/<i>",status="200"}`; the `mixed` group replaces
//! a tenth of them with histograms (`latency_seconds`, 10 buckets each).
//!
//! `cargo bench --bench scrape`; for instruction counts, see [`count`].

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion};
use http::Request;
use http_body_util::{BodyExt, Full};
use opentelemetry::metrics::MeterProvider;
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::{Instrument, SdkMeterProvider, Stream};
use prometheus::Encoder;
use std::fmt::Write;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use tower::{Layer, Service};
use tower_jemalloc::JemallocLayer;

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

const SIZES: [usize; 3] = [0, 1_000, 10_000];
const BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// A registry and provider holding `counters` counter series and `histograms` histogram
/// series; the provider must live as long as the registry is scraped.
fn otel(counters: usize, histograms: usize) -> (prometheus::Registry, SdkMeterProvider) {
    let registry = prometheus::Registry::new();
    let exporter = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        // The same lines as the other two renders: no target_info, no otel_scope_* labels.
        .without_target_info()
        .scope_info_enabled(false)
        .build()
        .unwrap();
    // The SDK caps each instrument at 2,000 series by default (the rest collapse into one
    // overflow series): lift it so 10,000 series are 10,000 series.
    let provider = SdkMeterProvider::builder()
        .with_reader(exporter)
        .with_view(|_: &Instrument| {
            Stream::builder()
                .with_cardinality_limit(20_000)
                .build()
                .ok()
        })
        .build();
    let meter = provider.meter("bench");
    let counter = meter.u64_counter("requests").build();
    for i in 0..counters {
        counter.add(
            i as u64 + 1,
            &[
                KeyValue::new("route", format!("/r/{i}")),
                KeyValue::new("status", "200"),
            ],
        );
    }
    let histogram = meter
        .f64_histogram("latency")
        .with_unit("s")
        .with_boundaries(BUCKETS.to_vec())
        .build();
    for i in 0..histograms {
        histogram.record(0.042, &[KeyValue::new("route", format!("/r/{i}"))]);
    }
    (registry, provider)
}

fn metrics_rs(counters: usize, histograms: usize) -> metrics_exporter_prometheus::PrometheusHandle {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&BUCKETS)
        .unwrap()
        .build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        for i in 0..counters {
            metrics::counter!("requests_total", "route" => format!("/r/{i}"), "status" => "200")
                .increment(i as u64 + 1);
        }
        for i in 0..histograms {
            metrics::histogram!("latency_seconds", "route" => format!("/r/{i}")).record(0.042);
        }
    });
    handle
}

fn hand_written(counters: usize, histograms: usize, out: &mut String) {
    out.clear();
    out.push_str("# TYPE requests_total counter\n");
    for i in 0..counters {
        let _ = writeln!(
            out,
            "requests_total{{route=\"/r/{i}\",status=\"200\"}} {}",
            i + 1
        );
    }
    if histograms > 0 {
        out.push_str("# TYPE latency_seconds histogram\n");
    }
    for i in 0..histograms {
        for (b, le) in BUCKETS.iter().enumerate() {
            let count = u64::from(b >= 3);
            let _ = writeln!(
                out,
                "latency_seconds_bucket{{route=\"/r/{i}\",le=\"{le}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "latency_seconds_bucket{{route=\"/r/{i}\",le=\"+Inf\"}} 1"
        );
        let _ = writeln!(out, "latency_seconds_sum{{route=\"/r/{i}\"}} 0.042");
        let _ = writeln!(out, "latency_seconds_count{{route=\"/r/{i}\"}} 1");
    }
}

/// One `GET /metrics` through `service`, driven without a runtime (the render runs inline).
fn scrape<S, B>(service: &mut S) -> usize
where
    S: Service<Request<Full<Bytes>>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    let request = Request::get("/metrics").body(Full::default()).unwrap();
    let mut future = pin!(service.call(request));
    let Poll::Ready(response) = future.as_mut().poll(&mut cx) else {
        unreachable!("renders run inline outside a runtime")
    };
    let mut collect = pin!(response.unwrap().into_body().collect());
    let Poll::Ready(body) = collect.as_mut().poll(&mut cx) else {
        unreachable!("the body is in memory")
    };
    body.unwrap().to_bytes().len()
}

type Answer = Result<http::Response<Full<Bytes>>, std::convert::Infallible>;
type Handler = fn(Request<Full<Bytes>>) -> std::future::Ready<Answer>;

/// The application behind the layer: never reached by a scrape.
fn inner() -> tower::util::ServiceFn<Handler> {
    fn answer(_: Request<Full<Bytes>>) -> std::future::Ready<Answer> {
        std::future::ready(Ok(http::Response::new(Full::default())))
    }
    tower::service_fn(answer as Handler)
}

/// The layer (gzip off) serving `registry`, with its jemalloc gauges on a meter of another
/// provider, so that the registry holds only the benchmark's series. Keep the provider alive
/// while scraping.
fn layered_without_gauges(
    registry: prometheus::Registry,
) -> (
    tower_jemalloc::JemallocService<tower::util::ServiceFn<Handler>>,
    SdkMeterProvider,
) {
    let elsewhere = SdkMeterProvider::builder().build();
    let layer = JemallocLayer::builder()
        .registry(registry, elsewhere.meter("unused"))
        .gzip(false)
        .build()
        .unwrap();
    (layer.layer(inner()), elsewhere)
}

fn compare(c: &mut Criterion, group: &str, histogram_share: usize) {
    let mut group = c.benchmark_group(group);
    for size in SIZES {
        let histograms = size.checked_div(histogram_share).unwrap_or(0);
        let counters = size - histograms;

        let (registry, provider) = otel(counters, histograms);
        let (mut ours, _elsewhere) = layered_without_gauges(registry.clone());
        group.bench_with_input(BenchmarkId::new("ours", size), &size, |b, _| {
            b.iter(|| black_box(scrape(&mut ours)))
        });
        group.bench_with_input(BenchmarkId::new("ours: gather", size), &size, |b, _| {
            b.iter(|| black_box(registry.gather()))
        });
        let families = registry.gather();
        let mut buf = Vec::new();
        group.bench_with_input(
            BenchmarkId::new("prometheus TextEncoder alone", size),
            &size,
            |b, _| {
                b.iter(|| {
                    buf.clear();
                    prometheus::TextEncoder::new()
                        .encode(&families, &mut buf)
                        .unwrap();
                    black_box(buf.len())
                })
            },
        );

        let (registry, provider2) = otel(counters, histograms);
        let meter = provider2.meter("tower-jemalloc");
        let mut with_jemalloc = JemallocLayer::builder()
            .registry(registry, meter)
            .gzip(false)
            .build()
            .unwrap()
            .layer(inner());
        group.bench_with_input(BenchmarkId::new("ours+jemalloc", size), &size, |b, _| {
            b.iter(|| black_box(scrape(&mut with_jemalloc)))
        });

        let handle = metrics_rs(counters, histograms);
        group.bench_with_input(
            BenchmarkId::new("metrics-exporter-prometheus", size),
            &size,
            |b, _| b.iter(|| black_box(handle.render().len())),
        );

        let mut out = String::new();
        group.bench_with_input(BenchmarkId::new("hand-written", size), &size, |b, _| {
            b.iter(|| {
                hand_written(counters, histograms, &mut out);
                black_box(out.len())
            })
        });
        drop((provider, provider2));
    }
    group.finish();
}

fn scrapes(c: &mut Criterion) {
    compare(c, "scrape counters", 0);
    compare(c, "scrape mixed", 10);
}

/// Renders made in a counting run (`SCRAPE_COUNT`).
const COUNTED_RENDERS: usize = 20;

/// The counted part of a counting run: `COUNTED_RENDERS` renders by `render`.
#[inline(never)]
fn renders_in_a_row(mut render: impl FnMut() -> usize) -> usize {
    (0..COUNTED_RENDERS).map(|_| black_box(render())).sum()
}

/// Instruction counts under callgrind, which repeat exactly (timings move by several per cent
/// between runs): `SCRAPE_COUNT=ours|metrics-exporter-prometheus` renders 1,000 counter series
/// [`COUNTED_RENDERS`] times inside `renders_in_a_row`, after one render to warm up.
///
/// ```sh
/// SCRAPE_COUNT=ours valgrind --tool=callgrind --toggle-collect='*renders_in_a_row*' <binary>
/// ```
fn count(which: &str) {
    const SERIES: usize = 1_000;
    let bytes = match which {
        "ours" => {
            let (registry, _provider) = otel(SERIES, 0);
            let (mut ours, _elsewhere) = layered_without_gauges(registry);
            scrape(&mut ours);
            renders_in_a_row(|| scrape(&mut ours))
        }
        "metrics-exporter-prometheus" => {
            let handle = metrics_rs(SERIES, 0);
            handle.render();
            renders_in_a_row(|| handle.render().len())
        }
        other => panic!("SCRAPE_COUNT is `ours` or `metrics-exporter-prometheus`, not `{other}`"),
    };
    println!("{COUNTED_RENDERS} renders of {SERIES} counters by {which}: {bytes} bytes");
}

fn main() {
    if let Ok(which) = std::env::var("SCRAPE_COUNT") {
        count(&which);
        return;
    }
    let mut criterion = Criterion::default()
        .sample_size(30)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2))
        .configure_from_args();
    scrapes(&mut criterion);
    criterion.final_summary();
}
