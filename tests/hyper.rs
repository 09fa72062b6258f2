//! The layer served by plain hyper, as in `examples/hyper.rs`: `TowerToHyperService` and
//! hyper-util's `auto` connection builder (HTTP/1.1 and HTTP/2) in a `TcpListener` accept loop
//! with graceful shutdown, on a real loopback socket.
#![cfg(all(feature = "jemalloc", not(target_env = "msvc")))]

mod common;

use bytes::Bytes;
use common::client::{fetch, http1, http2};
use common::parse_exposition;
use http::{Request, Response, StatusCode, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tower::Layer;
use tower_jemalloc::{Endpoint, JemallocLayer};

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

async fn app(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = if req.uri().path() == "/" {
        Response::new(Full::new(Bytes::from_static(b"hello from hyper")))
    } else {
        let mut response = Response::new(Full::new(Bytes::from_static(b"not found")));
        *response.status_mut() = StatusCode::NOT_FOUND;
        response
    };
    Ok(response)
}

/// A running server and the means to stop it.
struct Running {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    served: JoinHandle<()>,
}

/// Starts the example's accept loop on 127.0.0.1, an ephemeral port.
async fn start() -> Running {
    let layer = JemallocLayer::builder()
        .allow_anonymous(Endpoint::Purge)
        .purge_cooldown(Duration::ZERO)
        .build()
        .unwrap();
    let service = layer.layer(tower::service_fn(app));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, mut stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(async move {
        let http = auto::Builder::new(TokioExecutor::new());
        let graceful = GracefulShutdown::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, _) = accepted.unwrap();
                    let connection = http
                        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service.clone()))
                        .into_owned();
                    let connection = graceful.watch(connection);
                    tokio::spawn(connection);
                }
                _ = &mut stopped => break,
            }
        }
        drop(listener);
        tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
            .await
            .expect("open connections close within 10 s");
    });
    Running { addr, stop, served }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_the_app_and_answers_the_endpoints_over_http1_and_http2() {
    let server = start().await;
    let base = format!("http://{}", server.addr);

    for (client, version) in [(http1(), Version::HTTP_11), (http2(), Version::HTTP_2)] {
        let (got_version, answer) = fetch(&client, "GET", &format!("{base}/"), b"").await;
        assert_eq!(got_version, version);
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.text(), "hello from hyper");

        let (_, answer) = fetch(&client, "GET", &format!("{base}/nope"), b"").await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "the app's own 404");
        assert_eq!(answer.text(), "not found");

        let (_, answer) = fetch(&client, "GET", &format!("{base}/metrics"), b"").await;
        assert_eq!(answer.status, StatusCode::OK, "{version:?}");
        assert_eq!(
            answer.header("content-type"),
            Some("text/plain; version=0.0.4")
        );
        let exposition = parse_exposition(answer.text());
        for gauge in common::GAUGES {
            let name = format!("jemalloc_{gauge}_bytes");
            assert!(
                exposition.value(&name).is_some(),
                "{version:?}: no {name} in\n{}",
                answer.text()
            );
        }
        assert!(exposition.value("jemalloc_allocated_bytes").unwrap() > 0.0);

        common::churn(16);
        let (_, answer) = fetch(
            &client,
            "PUT",
            &format!("{base}/debug/jemalloc/purge"),
            b"ignored",
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        assert_eq!(answer.header("content-type"), Some("application/json"));
        let report = answer.json();
        assert!(report["released_bytes"].is_u64(), "{report}");
        assert!(report["arenas_purged"].as_u64().unwrap() > 0, "{report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_closes_the_listener() {
    let server = start().await;
    let base = format!("http://{}", server.addr);
    let client = http1();
    let (_, answer) = fetch(&client, "GET", &format!("{base}/metrics"), b"").await;
    assert_eq!(answer.status, StatusCode::OK);

    // The client keeps its keep-alive connection open: graceful shutdown must close it.
    server.stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server.served)
        .await
        .expect("server stopped within 10 s of the signal")
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(server.addr).await.is_err(),
        "the listener is closed"
    );
    drop(client);
}
