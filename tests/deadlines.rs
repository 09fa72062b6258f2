//! No scrape waits for ever: a render blocked by the application's observable callback gets
//! its scrapes a 503 within Prometheus' scrape timeout, on one render thread, and the layer
//! recovers once the callback returns.
#![cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
// The serialising std mutex, and the lock the callback blocks on, are held across awaits on
// purpose: every #[tokio::test] runs on its own current-thread runtime, and the render that
// waits for the lock runs on a thread of its own.
#![allow(clippy::await_holding_lock)]

mod common;

use common::*;
use http::StatusCode;
use opentelemetry::metrics::{MeterProvider, ObservableGauge};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tower::Layer;
use tower_jemalloc::{JemallocLayer, JemallocLayerBuilder};

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

/// The tests of this file count render threads: they take turns.
static SERIAL: Mutex<()> = Mutex::new(());

/// The thread `/metrics` renders on.
#[cfg(target_os = "linux")]
const RENDER_THREAD: &str = "jemalloc-metrics";

/// An upper bound for "does not hang", far above every deadline in this file.
const HANG: Duration = Duration::from_secs(30);

/// A layer whose provider has an application gauge whose callback waits for `lock`.
fn blocked_by(
    builder: JemallocLayerBuilder,
    lock: &Arc<Mutex<()>>,
) -> (JemallocLayer, ObservableGauge<u64>) {
    let layer = builder.build().unwrap();
    let lock = Arc::clone(lock);
    let gauge = layer
        .meter_provider()
        .unwrap()
        .meter("app")
        .u64_observable_gauge("app.connections")
        .with_callback(move |observer| {
            let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
            observer.observe(1, &[]);
        })
        .build();
    (layer, gauge)
}

fn scrape(timeout: Option<&str>) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut scrape = request("GET", "/metrics");
    if let Some(timeout) = timeout {
        scrape.headers_mut().insert(
            "x-prometheus-scrape-timeout-seconds",
            timeout.parse().unwrap(),
        );
    }
    scrape
}

fn turn() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[tokio::test]
async fn a_blocked_render_gets_503_within_the_scrape_timeout_on_one_thread() {
    let _turn = turn();
    let lock = Arc::new(Mutex::new(()));
    let (layer, _gauge) = blocked_by(JemallocLayer::builder(), &lock);
    let mut service = layer.layer(recording_echo().0);
    let held = lock.lock().unwrap();

    // Prometheus' timeout is 1 s: the answer comes before it, so that Prometheus sees it.
    let asked = Instant::now();
    let answer = tokio::time::timeout(HANG, send(&mut service, scrape(Some("1"))))
        .await
        .expect("the scrape is answered");
    let waited = asked.elapsed();
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        answer.text()
    );
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(1),
        "answered after {waited:?}, not between the deadline and Prometheus' timeout"
    );
    assert!(answer.header("retry-after").is_some());
    let reason = answer.text();
    assert!(
        reason.starts_with("the metrics render has run for ")
            && reason.contains(" s and is not finished after this request waited "),
        "{reason}"
    );
    assert_eq!(reason.lines().count(), 1);

    // The next scrape joins the stuck render rather than start another, and times out too.
    let answer = tokio::time::timeout(HANG, send(&mut service, scrape(Some("1"))))
        .await
        .expect("the second scrape is answered");
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(answer.text().starts_with("the metrics render has run for "));
    #[cfg(target_os = "linux")]
    assert_eq!(threads_named(RENDER_THREAD), 1, "one render thread");

    // The callback returns: the stuck render ends, and scrapes are answered again.
    drop(held);
    let answer = tokio::time::timeout(HANG, send(&mut service, scrape(Some("1"))))
        .await
        .expect("answered once the callback returns");
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    // A render of its own (never one that finished before it arrived) shows what happened.
    let answer = send(&mut service, scrape(None)).await;
    assert_eq!(answer.status, StatusCode::OK);
    let exposition = parse_exposition(answer.text());
    let series = |name: &str| {
        exposition
            .samples
            .iter()
            .find(|s| {
                s.name == name && s.labels.get("job").map(String::as_str) == Some("metrics_render")
            })
            .map(|s| s.value)
    };
    assert_eq!(series("jemalloc_layer_jobs_timeouts_total"), Some(2.0));
    assert_eq!(series("jemalloc_layer_jobs_stuck"), Some(0.0));
    assert_eq!(exposition.value("app_connections"), Some(1.0));
}

#[tokio::test]
async fn without_the_header_a_scrape_waits_the_job_deadline() {
    let _turn = turn();
    let lock = Arc::new(Mutex::new(()));
    let builder = JemallocLayer::builder().job_deadline(Duration::from_millis(300));
    let (layer, _gauge) = blocked_by(builder, &lock);
    let mut service = layer.layer(recording_echo().0);
    let held = lock.lock().unwrap();

    let asked = Instant::now();
    let answer = tokio::time::timeout(HANG, send(&mut service, scrape(None)))
        .await
        .expect("the scrape is answered");
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        answer.text()
    );
    assert!(asked.elapsed() >= Duration::from_millis(300));
    assert!(
        answer.text().contains("after this request waited "),
        "{}",
        answer.text()
    );

    drop(held);
    let answer = tokio::time::timeout(HANG, send(&mut service, scrape(None)))
        .await
        .expect("answered once the callback returns");
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test]
async fn a_scrape_timeout_that_is_not_a_number_of_seconds_is_refused() {
    let _turn = turn();
    let mut service = JemallocLayer::new().layer(recording_echo().0);
    for bad in ["0", "-2", "ten", "10s", "inf"] {
        let answer = send(&mut service, scrape(Some(bad))).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{bad:?}");
        assert_eq!(
            answer.text(),
            format!(
                "X-Prometheus-Scrape-Timeout-Seconds must be a positive number of seconds, \
                 got {bad:?}\n"
            )
        );
    }
    // What Prometheus sends is accepted.
    for good in ["10", "0.5", "9.75"] {
        let answer = send(&mut service, scrape(Some(good))).await;
        assert_eq!(answer.status, StatusCode::OK, "{good:?}");
    }
}
