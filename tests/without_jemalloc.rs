//! A process whose global allocator is not jemalloc (this test binary sets none), and a build
//! without jemalloc at all (`cargo test --no-default-features --test without_jemalloc`): the
//! gauges are left out rather than faked, the application's metrics are still served, and
//! purge answers with a clear status.

mod common;

use common::*;
use http::StatusCode;
use opentelemetry::metrics::MeterProvider;
use tower::Layer;
use tower_jemalloc::{Endpoint, JemallocError, JemallocLayer, PurgeError};

/// 503 when jemalloc is compiled in but not the global allocator, 501 when not compiled in.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
const EXPECTED: (StatusCode, JemallocError) = (
    StatusCode::SERVICE_UNAVAILABLE,
    JemallocError::NotGlobalAllocator,
);
#[cfg(not(all(feature = "jemalloc", not(target_env = "msvc"))))]
const EXPECTED: (StatusCode, JemallocError) =
    (StatusCode::NOT_IMPLEMENTED, JemallocError::Unsupported);

#[tokio::test]
async fn gauges_are_absent_but_app_metrics_are_served() {
    let layer = JemallocLayer::builder()
        .allow_anonymous(Endpoint::Purge)
        .namespace("restate")
        .build()
        .unwrap();
    layer
        .meter_provider()
        .unwrap()
        .meter("app")
        .u64_counter("app.jobs")
        .build()
        .add(2, &[]);
    let (echo, _) = recording_echo();
    let mut service = layer.layer(echo);

    let answer = send(&mut service, request("GET", "/metrics")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let exposition = parse_exposition(answer.text());
    assert!(
        exposition
            .samples
            .iter()
            // The endpoints' own counters are there at 0; no allocator figure is.
            .all(|s| !s.name.contains("jemalloc")
                || s.name.contains("purge")
                || s.name.contains("stats_dumps")
                || s.name.contains("config_changes")
                || s.name.contains("heap_profile")
                || s.name.contains("layer_jobs")),
        "no jemalloc gauge (only the endpoints' counters, at 0) without jemalloc as global allocator:\n{}",
        answer.text()
    );
    assert_eq!(exposition.value("restate_app_jobs_total"), Some(2.0));
}

#[tokio::test]
async fn purge_answers_with_the_reason() {
    let (echo, seen) = recording_echo();
    let mut service = JemallocLayer::builder()
        .allow_anonymous(Endpoint::Purge)
        .build()
        .unwrap()
        .layer(echo);
    let (status, error) = EXPECTED;
    let answer = send(&mut service, request("POST", "/debug/jemalloc/purge")).await;
    assert_eq!(answer.status, status);
    assert_eq!(
        answer.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(answer.text(), format!("{error}\n"));
    assert!(seen.lock().unwrap().is_empty());

    // The method check still comes first.
    let answer = send(&mut service, request("GET", "/debug/jemalloc/purge")).await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);

    // The heap profile and profiling endpoints (which follow purge's rules) give jemalloc's
    // reason before the profiler's.
    for (method, path) in [
        ("GET", "/debug/pprof/heap"),
        ("GET", "/debug/jemalloc/profiling"),
        ("PUT", "/debug/jemalloc/profiling?active=true"),
        // The page, which shows jemalloc's figures, in either format.
        ("GET", "/debug/jemalloc/"),
        ("GET", "/debug/jemalloc/?format=json"),
    ] {
        let answer = send(&mut service, request(method, path)).await;
        assert_eq!(answer.status, status, "{method} {path}");
        assert_eq!(answer.text(), format!("{error}\n"), "{method} {path}");
    }
}

#[test]
fn the_library_api_says_why() {
    let (_, error) = EXPECTED;
    assert_eq!(tower_jemalloc::JemallocStats::read(), Err(error.clone()));
    assert_eq!(
        tower_jemalloc::purge_all_arenas(tower_jemalloc::PurgeMode::Purge),
        Err(PurgeError::Jemalloc(error.clone()))
    );
    let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder().build();
    assert_eq!(
        tower_jemalloc::register_instruments(&provider.meter("m")),
        Err(error)
    );
}
