//! Which requests the layer answers, which it forwards, and that forwarding changes nothing.
#![cfg(all(feature = "jemalloc", not(target_env = "msvc")))]

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use tower::{Layer, ServiceBuilder};
use tower_jemalloc::{Endpoint, JemallocLayer};

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

#[tokio::test]
async fn forwarded_requests_reach_the_inner_service_unchanged() {
    let (echo, seen) = recording_echo();
    let mut service = ServiceBuilder::new()
        .layer(JemallocLayer::new())
        .service(echo);

    let cases: Vec<(&str, &str, &[u8])> = vec![
        ("GET", "/", b""),
        ("POST", "/api/items?x=1&y=%2F", b"{\"a\":1}"),
        ("GET", "/metrics/", b""),
        ("GET", "/Metrics", b""),
        ("GET", "/metrics/extra", b""),
        ("POST", "/debug/jemalloc/purge/", b"body"),
        ("POST", "/debug/jemalloc", b""),
        ("DELETE", "/debug/jemalloc/PURGE?now", b""),
        ("BREW", "/pot", b"coffee"),
    ];
    for (i, (method, uri, body)) in cases.iter().enumerate() {
        let mut request = Request::builder()
            .method(*method)
            .uri(*uri)
            .header("x-request", i.to_string())
            .header("x-multi", "a")
            .header("x-multi", "b")
            .body(Full::new(Bytes::from_static(body)))
            .unwrap();
        request.extensions_mut().insert(Marker(i as u64));
        let expected_headers = request.headers().clone();

        let answer = send(&mut service, request).await;
        assert_eq!(answer.status, ECHO_STATUS, "{method} {uri}");
        assert_eq!(
            answer.header(ECHO_HEADER),
            Some(uri.split('?').next().unwrap())
        );
        assert_eq!(&answer.body[..], [b"echo:".as_slice(), body].concat());

        let last = seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("inner service called");
        assert_eq!(last.method.as_str(), *method);
        assert_eq!(last.uri, *uri);
        assert_eq!(last.headers, expected_headers);
        assert_eq!(last.marker, Some(Marker(i as u64)));
        assert_eq!(&last.body[..], *body);
    }
    assert_eq!(seen.lock().unwrap().len(), cases.len());
}

#[tokio::test]
async fn metrics_answers_get_and_head_and_refuses_other_methods() {
    let (echo, seen) = recording_echo();
    let mut service = JemallocLayer::new().layer(echo);

    let get = send(&mut service, request("GET", "/metrics?ignored=1")).await;
    assert_eq!(get.status, StatusCode::OK);
    assert_eq!(
        get.header("content-type"),
        Some("text/plain; version=0.0.4")
    );
    assert!(get.text().contains("# TYPE jemalloc_allocated_bytes gauge"));

    let head = send(&mut service, request("HEAD", "/metrics")).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(
        head.header("content-type"),
        Some("text/plain; version=0.0.4")
    );
    assert!(head.body.is_empty());
    let length: usize = head.header("content-length").unwrap().parse().unwrap();
    assert!(length > 0);

    for method in ["POST", "PUT", "DELETE", "OPTIONS", "PATCH", "FOO"] {
        let answer = send(&mut service, request(method, "/metrics")).await;
        assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(answer.header("allow"), Some("GET, HEAD"));
        assert_eq!(
            answer.header("content-type"),
            Some("text/plain; charset=utf-8")
        );
        assert_eq!(
            answer.text(),
            "method not allowed: /metrics accepts GET, HEAD\n"
        );
    }
    assert!(seen.lock().unwrap().is_empty(), "nothing was forwarded");
}

#[tokio::test]
async fn purge_refuses_other_methods() {
    let (echo, seen) = recording_echo();
    let mut service = JemallocLayer::new().layer(echo);
    for method in ["GET", "HEAD", "DELETE", "PATCH", "OPTIONS"] {
        let answer = send(&mut service, request(method, "/debug/jemalloc/purge")).await;
        assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(answer.header("allow"), Some("POST, PUT"));
    }
    assert!(seen.lock().unwrap().is_empty(), "nothing was forwarded");
}

#[tokio::test]
async fn custom_and_disabled_paths() {
    let (echo, seen) = recording_echo();
    let layer = JemallocLayer::builder()
        .path(Endpoint::Metrics, "/internal/prom")
        .without(Endpoint::Purge)
        .build()
        .unwrap();
    let mut service = layer.layer(echo);

    let answer = send(&mut service, request("GET", "/internal/prom")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.text().contains("jemalloc_resident_bytes"));

    for (method, uri) in [("GET", "/metrics"), ("POST", "/debug/jemalloc/purge")] {
        let answer = send(&mut service, request(method, uri)).await;
        assert_eq!(answer.status, ECHO_STATUS, "{uri} is forwarded");
    }
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn layer_clones_share_one_registry() {
    let layer = JemallocLayer::new();
    let clone = layer.clone();
    let provider = layer
        .meter_provider()
        .expect("zero-config owns its provider");
    use opentelemetry::metrics::MeterProvider;
    provider
        .meter("app")
        .u64_counter("app.requests")
        .build()
        .add(7, &[]);

    let (echo, _) = recording_echo();
    let mut service = clone.layer(echo);
    let answer = send(&mut service, request("GET", "/metrics")).await;
    let exposition = parse_exposition(answer.text());
    let requests = exposition
        .samples
        .iter()
        .find(|s| s.name == "app_requests_total")
        .expect("the application's counter is served too");
    assert_eq!(requests.value, 7.0);
}

/// A service outlives the layer that made it (`ServiceBuilder` and `Layer::layer` drop the
/// layer): its `/metrics` must still serve the provider's instruments, and the application's
/// own ones recorded through the re-exported `opentelemetry`.
#[tokio::test]
async fn metrics_keep_working_after_the_layer_is_dropped() {
    use tower_jemalloc::opentelemetry::metrics::MeterProvider;
    let layer = JemallocLayer::builder().namespace("app").build().unwrap();
    let meter = layer.meter_provider().unwrap().meter("app");
    let (echo, _) = recording_echo();
    let mut service = layer.layer(echo);
    drop(layer);
    meter.u64_counter("orders").build().add(2, &[]);

    let answer = send(&mut service, request("GET", "/metrics")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let exposition = parse_exposition(answer.text());
    assert_eq!(
        exposition.value("app_orders_total"),
        Some(2.0),
        "{}",
        answer.text()
    );
    for field in tower_jemalloc::JemallocStats::FIELDS {
        let name = format!("app_jemalloc_{field}_bytes");
        assert!(exposition.value(&name).is_some(), "no {name}");
    }
}

/// Paths are told apart by length first: same-length and very long paths still match exactly.
#[tokio::test]
async fn long_and_same_length_paths_match_exactly() {
    let long = format!("/{}", "x".repeat(80));
    let (echo, seen) = recording_echo();
    let mut service = JemallocLayer::builder()
        .path(Endpoint::Metrics, long.clone())
        .build()
        .unwrap()
        .layer(echo);
    let other_long = format!("/{}", "y".repeat(90));
    for forwarded in [
        "/metricz",
        "/metrics",
        &format!("/{}", "x".repeat(79)),
        &other_long,
    ] {
        let answer = send(&mut service, request("GET", forwarded)).await;
        assert_eq!(answer.status, ECHO_STATUS, "{forwarded}");
    }
    assert_eq!(seen.lock().unwrap().len(), 4);
    let answer = send(&mut service, request("GET", &long)).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.text().contains("jemalloc_allocated_bytes"));
}
