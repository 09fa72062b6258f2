//! Locking the endpoints down: bearer tokens (401), predicates (403), the purge cooldown (429),
//! and a storm of concurrent purges of which exactly one runs.
#![cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
// The serialising std mutex is held across awaits on purpose: every #[tokio::test] runs on its
// own runtime, and the purge slot it protects is process-wide.
#![allow(clippy::await_holding_lock)]

mod common;

use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tower::Layer;
use tower_jemalloc::{Endpoint, JemallocLayer};

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

/// Purges (and their cooldown) are process-wide: the tests of this file take turns.
static SERIAL: Mutex<()> = Mutex::new(());

fn with_auth(uri: &str, method: &str, authorization: Option<&str>) -> Request<Full<bytes::Bytes>> {
    let mut builder = Request::builder().method(method).uri(uri);
    if let Some(value) = authorization {
        builder = builder.header("authorization", value);
    }
    builder.body(Full::default()).unwrap()
}

#[tokio::test]
async fn purge_token_is_required_and_metrics_stay_open() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let layer = JemallocLayer::builder()
        .allow_anonymous(Endpoint::Purge)
        .bearer_token(Endpoint::Purge, "correct-horse")
        .purge_cooldown(Duration::ZERO)
        .build()
        .unwrap();
    let (echo, seen) = recording_echo();
    let mut service = layer.layer(echo);
    const PURGE: &str = "/debug/jemalloc/purge";

    for wrong in [
        None,
        Some("Bearer wrong"),
        Some("Bearer correct-hors"),
        Some("Basic x"),
    ] {
        let answer = send(&mut service, with_auth(PURGE, "POST", wrong)).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{wrong:?}");
        assert_eq!(answer.header("www-authenticate"), Some("Bearer"));
        assert_eq!(
            answer.text(),
            "a valid bearer token is required (Authorization: Bearer <token>)\n"
        );
    }
    // A wrong method is a 405 whoever asks.
    let answer = send(&mut service, with_auth(PURGE, "GET", None)).await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);

    let answer = send(
        &mut service,
        with_auth(PURGE, "POST", Some("Bearer correct-horse")),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());

    let answer = send(&mut service, request("GET", "/metrics")).await;
    assert_eq!(answer.status, StatusCode::OK, "/metrics stays open");
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn metrics_token_and_predicates() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let layer = JemallocLayer::builder()
        .allow_anonymous(Endpoint::Purge)
        .bearer_token(Endpoint::Metrics, "scraper")
        .authorize(Endpoint::Purge, |request| {
            request
                .extensions
                .get::<SocketAddr>()
                .is_some_and(|peer| peer.ip().is_loopback())
        })
        .purge_cooldown(Duration::ZERO)
        .build()
        .unwrap();
    let (echo, _) = recording_echo();
    let mut service = layer.layer(echo);

    let answer = send(&mut service, request("GET", "/metrics")).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let answer = send(
        &mut service,
        with_auth("/metrics", "HEAD", Some("Bearer nope")),
    )
    .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let answer = send(
        &mut service,
        with_auth("/metrics", "GET", Some("Bearer scraper")),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);

    // The predicate sees the extensions: a remote peer is refused, a loopback one let in.
    let mut remote = request("POST", "/debug/jemalloc/purge");
    remote
        .extensions_mut()
        .insert(SocketAddr::from(([192, 0, 2, 7], 4000)));
    let answer = send(&mut service, remote).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_eq!(
        answer.text(),
        "this request is not allowed to use this endpoint\n"
    );
    let answer = send(&mut service, request("POST", "/debug/jemalloc/purge")).await;
    assert_eq!(
        answer.status,
        StatusCode::FORBIDDEN,
        "no peer address: refused"
    );

    let mut local = request("POST", "/debug/jemalloc/purge");
    local
        .extensions_mut()
        .insert(SocketAddr::from(([127, 0, 0, 1], 4000)));
    let answer = send(&mut service, local).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
}

#[tokio::test]
async fn cooldown_answers_429_with_retry_after_rounded_up() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (echo, _) = recording_echo();
    let mut long = JemallocLayer::builder()
        .allow_anonymous(Endpoint::Purge)
        .purge_cooldown(Duration::from_millis(1500))
        .build()
        .unwrap()
        .layer(echo.clone());
    let mut short = JemallocLayer::builder()
        .allow_anonymous(Endpoint::Purge)
        .purge_cooldown(Duration::from_millis(300))
        .build()
        .unwrap()
        .layer(echo);

    // Start after any earlier test's purge has cooled down for this layer too.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let first = send(&mut long, request("POST", "/debug/jemalloc/purge")).await;
    assert_eq!(first.status, StatusCode::OK);
    let refused = send(&mut long, request("PUT", "/debug/jemalloc/purge")).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        refused.header("retry-after"),
        Some("2"),
        "about 1.5 s rounds up to 2"
    );
    assert_eq!(
        refused.text(),
        "purges are limited to one per 1.5s; retry in 2 s\n"
    );

    // The cooldown counts from the end of the last purge in the process, whichever layer ran it.
    let refused = send(&mut short, request("POST", "/debug/jemalloc/purge")).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.header("retry-after"), Some("1"));
    tokio::time::sleep(Duration::from_millis(350)).await;
    let again = send(&mut short, request("POST", "/debug/jemalloc/purge")).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_storm_runs_exactly_one_purge() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const STORM: usize = 32;
    let (echo, _) = recording_echo();
    let service = JemallocLayer::builder()
        .allow_anonymous(Endpoint::Purge)
        .build()
        .unwrap()
        .layer(echo);
    // Dirty pages make the purge take long enough for the storm to overlap it.
    churn(64);
    // Start after any earlier purge's cooldown.
    tokio::time::sleep(tower_jemalloc::DEFAULT_PURGE_COOLDOWN).await;

    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..STORM {
        let mut service = service.clone();
        tasks.push(tokio::spawn(async move {
            send(&mut service, request("POST", "/debug/jemalloc/purge")).await
        }));
    }
    let (mut ok, mut conflict, mut cooldown) = (0, 0, 0);
    for task in tasks {
        let answer = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("no purge request hangs")
            .unwrap();
        match answer.status {
            StatusCode::OK => ok += 1,
            StatusCode::CONFLICT => conflict += 1,
            StatusCode::TOO_MANY_REQUESTS => cooldown += 1,
            other => panic!("unexpected {other}: {}", answer.text()),
        }
    }
    eprintln!(
        "purge storm of {STORM}: {ok} ran, {conflict} got 409, {cooldown} got 429, all answered in {:?}",
        start.elapsed()
    );
    assert_eq!(ok, 1, "exactly one purge executes");
    assert_eq!(conflict + cooldown, STORM - 1);
}
