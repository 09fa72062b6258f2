//! The `service_builder` example's stack (tower-http layers outside and inside the jemalloc
//! layer), served on a real loopback socket: each layer does what the example says it does.
#![cfg(all(feature = "jemalloc", not(target_env = "msvc")))]

#[path = "../examples/service_builder/app.rs"]
mod app;
mod common;
#[path = "../examples/common/serve.rs"]
mod serve;

use common::client::{fetch, fetch_request, http1, HttpClient};
use common::parse_exposition;
use http::{Request, StatusCode};
use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tower_jemalloc::{Endpoint, JemallocLayer};

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

/// The handler deadline of the inner `TimeoutLayer` in these tests.
const HANDLER_TIMEOUT: Duration = Duration::from_millis(200);

/// Serves the example's stack on 127.0.0.1 (an ephemeral port) for the rest of the test, and
/// returns its address and the access log the outer `TraceLayer` writes.
async fn start(jemalloc: JemallocLayer) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let lines = Arc::clone(&log);
    let service = app::stack(
        jemalloc,
        HANDLER_TIMEOUT,
        app::AccessLog::new(move |line| lines.lock().unwrap().push(line)),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve::serve(
        listener,
        service,
        std::future::pending(),
        Duration::ZERO,
    ));
    (addr, log)
}

async fn get_gzip(client: &HttpClient, uri: &str) -> common::Answer {
    let request = Request::get(uri)
        .header("accept-encoding", "gzip")
        .body(Default::default())
        .unwrap();
    fetch_request(client, request).await.1
}

fn gunzip(body: &[u8]) -> String {
    let mut text = String::new();
    flate2::read::GzDecoder::new(body)
        .read_to_string(&mut text)
        .expect("a gzip body");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inner_layers_only_see_forwarded_requests() {
    // The layer's own gzip is off: a gzip-encoded /metrics could then only come from the
    // CompressionLayer, which sits inside and must not see the request.
    let (addr, _) = start(
        JemallocLayer::builder()
            .allow_anonymous(Endpoint::Purge)
            .gzip(false)
            .build()
            .unwrap(),
    )
    .await;
    let client = http1();

    let answer = get_gzip(&client, &format!("http://{addr}/")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.header("content-encoding"),
        Some("gzip"),
        "the application's answer is compressed by the inner CompressionLayer"
    );
    assert_eq!(gunzip(&answer.body), app::HELLO);

    let answer = get_gzip(&client, &format!("http://{addr}/metrics")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.header("content-encoding"),
        None,
        "/metrics never reaches the inner CompressionLayer"
    );
    assert_eq!(
        answer.header("content-type"),
        Some("text/plain; version=0.0.4")
    );
    let exposition = parse_exposition(answer.text());
    assert!(exposition.value("jemalloc_resident_bytes").unwrap() > 0.0);

    // The inner timeout is a handler deadline: /slow would take an hour.
    let started = Instant::now();
    let (_, answer) = fetch(&client, "GET", &format!("http://{addr}/slow"), b"").await;
    assert_eq!(answer.status, StatusCode::REQUEST_TIMEOUT);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// One purge runs at a time in the process (a second gets 409): the tests that purge take turns.
static PURGES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_answers_with_its_own_gzip_and_purge_report() {
    let _turn = PURGES.lock().await;
    let layer = JemallocLayer::builder()
        .allow_anonymous(Endpoint::Purge)
        .purge_cooldown(Duration::ZERO)
        .build()
        .unwrap();
    let (addr, _) = start(layer).await;
    let client = http1();

    let answer = get_gzip(&client, &format!("http://{addr}/metrics")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("content-encoding"), Some("gzip"));
    let exposition = parse_exposition(&gunzip(&answer.body));
    assert!(exposition.value("jemalloc_allocated_bytes").unwrap() > 0.0);

    common::churn(16);
    let (_, answer) = fetch(
        &client,
        "POST",
        &format!("http://{addr}/debug/jemalloc/purge"),
        b"",
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert!(answer.json()["released_bytes"].is_u64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outer_trace_layer_sees_scrapes_and_purges() {
    let _turn = PURGES.lock().await;
    let layer = JemallocLayer::builder()
        .allow_anonymous(Endpoint::Purge)
        .purge_cooldown(Duration::ZERO)
        .build()
        .unwrap();
    let (addr, log) = start(layer).await;
    let client = http1();

    for (method, path, status) in [
        ("GET", "/", StatusCode::OK),
        ("GET", "/metrics", StatusCode::OK),
        ("POST", "/debug/jemalloc/purge", StatusCode::OK),
        (
            "DELETE",
            "/debug/jemalloc/purge",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
    ] {
        let (_, answer) = fetch(&client, method, &format!("http://{addr}{path}"), b"").await;
        assert_eq!(answer.status, status, "{method} {path}");
    }

    let log = log.lock().unwrap().clone();
    for expected in [
        "GET /",
        "GET /metrics",
        "POST /debug/jemalloc/purge",
        "DELETE /debug/jemalloc/purge",
    ] {
        assert!(
            log.iter().any(|line| line == expected),
            "{expected:?} not in {log:#?}"
        );
    }
    assert!(
        log.iter()
            .any(|line| line.starts_with("  -> 405 Method Not Allowed in ")),
        "the layer's own 405 is logged: {log:#?}"
    );
}

/// The examples' connections time out when nothing moves, and not while bytes flow.
#[tokio::test]
async fn idle_connections_time_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client, server) = tokio::io::duplex(64);
    let mut idle = serve::IdleTimeout::new(server, Duration::from_millis(200));
    client.write_all(b"ping").await.unwrap();
    let mut buf = [0; 4];
    idle.read_exact(&mut buf).await.unwrap();
    let started = std::time::Instant::now();
    let err = idle.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    assert!(started.elapsed() >= Duration::from_millis(150));
}

/// The idle-timeout wrapper keeps the socket's vectored writes, so hyper does not copy each
/// response body into a per-connection buffer (which would keep the size of the largest answer).
#[tokio::test]
async fn idle_timeout_keeps_vectored_writes() {
    use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (mut server, _) = listener.accept().await.unwrap();
    assert!(client.is_write_vectored());
    let mut client = serve::IdleTimeout::new(client, Duration::from_secs(5));
    assert!(client.is_write_vectored());
    let parts = [
        std::io::IoSlice::new(b"head "),
        std::io::IoSlice::new(b"body"),
    ];
    let written = client.write_vectored(&parts).await.unwrap();
    client.write_all(&b"head body"[written..]).await.unwrap();
    let mut buf = [0; 9];
    server.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"head body");
}
