//! The layer in a tonic server (`Server::builder().accept_http1(true).layer(..)`), as in
//! `examples/tonic.rs`, on a real loopback socket: gRPC calls still reach the services, and
//! `/metrics` answers over HTTP/1.1 (how Prometheus scrapes) and over HTTP/2.
#![cfg(all(feature = "jemalloc", not(target_env = "msvc")))]

mod common;

use common::client::{fetch, http1, http2, TIMEOUT};
use common::parse_exposition;
use http::{StatusCode, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tower_jemalloc::{Endpoint, JemallocLayer};

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

/// A running tonic server and the means to stop it.
struct Running {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    served: JoinHandle<Result<(), tonic::transport::Error>>,
}

/// Starts the health service behind the layer on 127.0.0.1, an ephemeral port.
async fn start() -> Running {
    let layer = JemallocLayer::builder()
        .allow_anonymous(Endpoint::Purge)
        .namespace("grpc")
        .purge_cooldown(Duration::ZERO)
        .build()
        .unwrap();
    start_with(layer).await
}

/// Starts the health service behind `layer` on 127.0.0.1, an ephemeral port.
async fn start_with(layer: JemallocLayer) -> Running {
    let (_reporter, health_service) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(
        Server::builder()
            .accept_http1(true)
            .layer(layer)
            .add_service(health_service)
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                let _ = stopped.await;
            }),
    );
    Running { addr, stop, served }
}

/// tonic's generated health client, over a hyper-util HTTP/2 client (tonic's own `Channel`
/// would need its `channel` feature and the tower stack behind it).
fn health_client(addr: SocketAddr) -> HealthClient<Client<HttpConnector, tonic::body::Body>> {
    let transport = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    HealthClient::with_origin(transport, format!("http://{addr}").parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_check_goes_through_the_layer() {
    let server = start().await;
    let mut client = health_client(server.addr);

    let check = |service: &str| HealthCheckRequest {
        service: service.to_owned(),
    };
    let answer = tokio::time::timeout(TIMEOUT, client.check(check("")))
        .await
        .expect("health check answered in time")
        .expect("health check succeeds");
    assert_eq!(answer.into_inner().status(), ServingStatus::Serving);

    // A gRPC error status comes back as tonic sent it, through the layer's body.
    let status = tokio::time::timeout(TIMEOUT, client.check(check("no.such.Service")))
        .await
        .expect("health check answered in time")
        .expect_err("unknown service");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_answer_over_http1_and_http2() {
    let server = start().await;
    let uri = format!("http://{}/metrics", server.addr);

    for (client, version) in [(http1(), Version::HTTP_11), (http2(), Version::HTTP_2)] {
        let (got_version, answer) = fetch(&client, "GET", &uri, b"").await;
        assert_eq!(got_version, version);
        assert_eq!(answer.status, StatusCode::OK, "{version:?}: {answer:?}");
        assert_eq!(
            answer.header("content-type"),
            Some("text/plain; version=0.0.4"),
            "{version:?}"
        );
        let exposition = parse_exposition(answer.text());
        let resident = exposition
            .value("grpc_jemalloc_resident_bytes")
            .unwrap_or_else(|| panic!("{version:?}: no resident gauge in\n{}", answer.text()));
        assert!(resident > 0.0, "{version:?}: resident {resident}");
        assert_eq!(
            exposition
                .types
                .get("grpc_jemalloc_allocated_bytes")
                .map(String::as_str),
            Some("gauge")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_answers_over_http1_and_http2() {
    let server = start().await;
    let uri = format!("http://{}/debug/jemalloc/purge", server.addr);

    for (client, version) in [(http1(), Version::HTTP_11), (http2(), Version::HTTP_2)] {
        common::churn(16);
        let (got_version, answer) = fetch(&client, "POST", &uri, b"").await;
        assert_eq!(got_version, version);
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "{version:?}: {}",
            answer.text()
        );
        assert_eq!(answer.header("content-type"), Some("application/json"));
        let report = answer.json();
        assert!(report["released_bytes"].is_u64(), "{report}");
        assert!(
            report["after"]["resident"].as_u64().unwrap() > 0,
            "{report}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_signal_stops_the_server() {
    let server = start().await;
    let (_, answer) = fetch(
        &http1(),
        "GET",
        &format!("http://{}/metrics", server.addr),
        b"",
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);

    server.stop.send(()).unwrap();
    let served = tokio::time::timeout(Duration::from_secs(10), server.served)
        .await
        .expect("server stopped within 10 s of the signal")
        .unwrap();
    served.expect("server exits cleanly");
    assert!(
        tokio::net::TcpStream::connect(server.addr).await.is_err(),
        "the listener is closed"
    );
}

/// Bytes per gRPC method: the method path is the route, and a method the server does not
/// serve (tonic answers `grpc-status: 12`) shares the unmatched value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_methods_are_the_routes_of_bytes_per_request() {
    let layer = JemallocLayer::builder()
        .per_route_allocation(true)
        .route_from(tower_jemalloc::grpc_method)
        .build()
        .unwrap();
    let server = start_with(layer.clone()).await;
    let mut client = health_client(server.addr);
    for _ in 0..3 {
        let check = HealthCheckRequest {
            service: String::new(),
        };
        tokio::time::timeout(TIMEOUT, client.check(check))
            .await
            .expect("health check answered in time")
            .expect("health check succeeds");
    }
    // A method no service has: an empty gRPC message to a made-up path.
    let unknown = http::Request::post(format!("http://{}/no.Such/Method", server.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(&[
            0, 0, 0, 0, 0,
        ])))
        .unwrap();
    let (_, answer) = common::client::fetch_request(&http2(), unknown).await;
    assert_eq!(answer.header("grpc-status"), Some("12"));

    let mut routes = Vec::new();
    for _ in 0..500 {
        routes = layer.top_routes(10);
        if routes.iter().map(|r| r.requests).sum::<u64>() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut seen: Vec<(String, String, u64)> = routes
        .into_iter()
        .map(|r| (r.method, r.route, r.requests))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            (
                "POST".to_owned(),
                tower_jemalloc::UNMATCHED_ROUTE.to_owned(),
                1
            ),
            (
                "POST".to_owned(),
                "/grpc.health.v1.Health/Check".to_owned(),
                3
            ),
        ]
    );
    let _ = server.stop.send(());
    let _ = server.served.await;
}
