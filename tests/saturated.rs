//! The layer's own endpoints answer while the application behind it applies backpressure
//! (here `ConcurrencyLimit(1)` with its one slot held by a slow request), and forwarded
//! requests still wait for the application's readiness (`poll_ready` before `call`).
#![cfg(all(feature = "jemalloc", not(target_env = "msvc")))]

mod common;

use axum::routing::get;
use axum::Router;
use common::client::{fetch, http1};
use common::{request, send, serve_app};
use http::StatusCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_jemalloc::JemallocLayer;

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

/// How long a test waits for an answer that must come while the application is busy.
const PROMPT: Duration = Duration::from_secs(1);

/// A router whose `/slow` holds its request until `release` is notified, after telling
/// `entered`.
fn router(entered: Arc<Notify>, release: Arc<Notify>) -> Router {
    Router::new().route("/", get(|| async { "hello" })).route(
        "/slow",
        get(move || async move {
            entered.notify_one();
            release.notified().await;
            "slow"
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_answers_over_http_while_the_app_is_saturated() {
    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let app = ServiceBuilder::new()
        .layer(JemallocLayer::new())
        .concurrency_limit(1)
        .service(router(Arc::clone(&entered), Arc::clone(&release)));
    let addr = serve_app(app).await;
    let client = http1();

    let slow = tokio::spawn({
        let client = client.clone();
        async move { fetch(&client, "GET", &format!("http://{addr}/slow"), b"").await }
    });
    tokio::time::timeout(PROMPT, entered.notified())
        .await
        .expect("the slow request reached the handler");

    // The application's only slot is taken: /metrics is answered all the same.
    let metrics = tokio::time::timeout(
        PROMPT,
        fetch(&client, "GET", &format!("http://{addr}/metrics"), b""),
    )
    .await
    .expect("/metrics answered within 1 s while the app is saturated")
    .1;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(metrics.text().contains("jemalloc_allocated_bytes"));

    // A forwarded request waits for the slot instead of being called past the limit.
    let forwarded = tokio::spawn({
        let client = client.clone();
        async move { fetch(&client, "GET", &format!("http://{addr}/"), b"").await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !forwarded.is_finished(),
        "served past the concurrency limit"
    );

    release.notify_one();
    let slow = slow.await.unwrap().1;
    assert_eq!((slow.status, slow.text()), (StatusCode::OK, "slow"));
    let forwarded = forwarded.await.unwrap().1;
    assert_eq!(
        (forwarded.status, forwarded.text()),
        (StatusCode::OK, "hello")
    );
}

#[tokio::test]
async fn one_service_answers_its_paths_while_a_forwarded_request_waits() {
    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let mut service = ServiceBuilder::new()
        .layer(JemallocLayer::new())
        .concurrency_limit(1)
        .service(router(Arc::clone(&entered), Arc::clone(&release)));

    // The slow request takes the only slot through this very service.
    let slow = tokio::spawn(call_when_ready(&mut service, "/slow").await);
    entered.notified().await;

    // Ready although the inner service is not: a forwarded request waits in its future...
    let waiting = tokio::spawn(call_when_ready(&mut service, "/").await);
    // ...and the same service still answers /metrics at once.
    let metrics = tokio::time::timeout(PROMPT, send(&mut service, request("GET", "/metrics")))
        .await
        .expect("/metrics answered while the inner service is not ready");
    assert_eq!(metrics.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished(), "called past the concurrency limit");

    release.notify_one();
    assert_eq!(slow.await.unwrap().unwrap().status(), StatusCode::OK);
    let answer = waiting.await.unwrap().unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    // And with the slot free again, forwarded requests take the direct path.
    let answer = send(&mut service, request("GET", "/")).await;
    assert_eq!((answer.status, answer.text()), (StatusCode::OK, "hello"));
}

/// `poll_ready`, then `call` with `GET path`: the response future, to be polled later.
async fn call_when_ready<S>(service: &mut S, path: &str) -> S::Future
where
    S: Service<http::Request<http_body_util::Full<bytes::Bytes>>>,
    S::Error: std::fmt::Debug,
{
    tokio::time::timeout(PROMPT, ServiceExt::<http::Request<_>>::ready(&mut *service))
        .await
        .expect("ready within 1 s, whatever the inner service")
        .unwrap();
    service.call(request("GET", path))
}
