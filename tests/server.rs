//! The layer in front of an axum application served by `axum::serve` on a real loopback
//! socket, hit with a real HTTP client.
#![cfg(all(feature = "jemalloc", not(target_env = "msvc")))]

mod common;

use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use common::parse_exposition;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower_jemalloc::{Endpoint, JemallocLayer};

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

async fn start() -> std::net::SocketAddr {
    let router = Router::new()
        .route("/", get(|| async { "home" }))
        .route("/echo", post(|body: Bytes| async move { body }));
    let layer = JemallocLayer::builder()
        .allow_anonymous(Endpoint::Purge)
        .namespace("restate")
        .build()
        .unwrap();
    common::serve_axum(router, layer).await
}

async fn fetch(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    method: &str,
    uri: String,
    body: &'static [u8],
) -> (StatusCode, http::HeaderMap, Bytes) {
    let request = http::Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::new(Bytes::from_static(body)))
        .unwrap();
    let response =
        tokio::time::timeout(std::time::Duration::from_secs(30), client.request(request))
            .await
            .expect("answer within 30 s")
            .unwrap();
    let (parts, body) = response.into_parts();
    (
        parts.status,
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_serve_with_a_real_client() {
    let addr = start().await;
    let client = Client::builder(TokioExecutor::new()).build_http();

    let (status, _, body) = fetch(&client, "GET", format!("http://{addr}/"), b"").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"home"[..]));

    let (status, _, body) = fetch(&client, "POST", format!("http://{addr}/echo"), b"ping").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ping"[..]));

    let (status, _, _) = fetch(&client, "GET", format!("http://{addr}/nope"), b"").await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "the router's own 404 passes through"
    );

    let (status, headers, body) =
        fetch(&client, "GET", format!("http://{addr}/metrics"), b"").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "text/plain; version=0.0.4");
    let exposition = parse_exposition(std::str::from_utf8(&body).unwrap());
    assert!(
        exposition
            .value("restate_jemalloc_allocated_bytes")
            .unwrap()
            > 0.0
    );

    let (status, headers, body) = fetch(
        &client,
        "POST",
        format!("http://{addr}/debug/jemalloc/purge"),
        b"ignored",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert_eq!(headers["content-type"], "application/json");
    let report: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(report["released_bytes"].is_u64());

    let (status, headers, _) = fetch(
        &client,
        "DELETE",
        format!("http://{addr}/debug/jemalloc/purge"),
        b"",
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers["allow"], "POST, PUT");
}

#[tokio::test]
async fn router_layer_also_reaches_unmatched_paths() {
    use common::{request, send};
    let router: Router = Router::new().route("/", get(|| async { "home" })).layer(
        JemallocLayer::builder()
            .allow_anonymous(Endpoint::Purge)
            .build()
            .unwrap(),
    );
    let mut app = router;
    let answer = send(&mut app, request("GET", "/metrics")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.text().contains("jemalloc_allocated_bytes"));
    let answer = send(&mut app, request("GET", "/")).await;
    assert_eq!(answer.text(), "home");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_purge_body_gets_413_without_being_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let router: Router = Router::new().route("/", get(|| async { "home" }));
    let layer = JemallocLayer::builder()
        .bearer_token(Endpoint::Purge, "t")
        .build()
        .unwrap();
    let addr = common::serve_axum(router, layer).await;

    // Announce 1 GiB, send 64 KiB of it, and wait for the answer: it must come without the
    // server waiting for (or buffering) the rest.
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"POST /debug/jemalloc/purge HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 1073741824\r\n\r\n",
        )
        .await
        .unwrap();
    stream.write_all(&vec![b'x'; 64 * 1024]).await.unwrap();
    let mut answer = vec![0; 1024];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut answer))
        .await
        .expect("answered within 10 s, without the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(
        answer.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
        "{answer}"
    );
    assert!(answer.contains("connection: close\r\n"), "{answer}");
}

/// A body sent to an intercepted path is read and dropped before the answer, so the client
/// gets the whole answer (a 400 KB stats dump) and never a reset connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stats_get_with_a_1_mb_body_gets_the_whole_answer() {
    let router: Router = Router::new().route("/", get(|| async { "home" }));
    let layer = JemallocLayer::builder()
        .allow_anonymous(Endpoint::Stats)
        .build()
        .unwrap();
    let addr = common::serve_axum(router, layer).await;
    let body: &'static [u8] = Box::leak(vec![b'x'; 1_000_000].into_boxed_slice());
    let client = common::client::http1();
    for _ in 0..3 {
        let url = format!("http://{addr}/debug/jemalloc/stats");
        let (_, answer) = common::client::fetch(&client, "GET", &url, body).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        assert!(answer.json()["stats"]["jemalloc"].is_object());
    }
}
