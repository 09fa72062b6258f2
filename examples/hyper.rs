//! Plain hyper 1 and hyper-util (no framework): a `tower::service_fn` application wrapped in the
//! layer, served by an accept loop, HTTP/1.1 and HTTP/2 on one port.
//!
//! ```text
//! cargo run --release --example hyper [-- --addr 127.0.0.1:9072 --namespace NAME]
//! curl -s http://127.0.0.1:9072/
//! curl -s http://127.0.0.1:9072/metrics | grep jemalloc
//! curl -s -X POST http://127.0.0.1:9072/debug/jemalloc/purge
//! ```

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::convert::Infallible;
use std::time::Duration;
use tower::Layer;

#[path = "common/mod.rs"]
mod common;

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

/// How long open connections get to finish their requests after Ctrl-C.
const GRACE: Duration = Duration::from_secs(10);

/// The application: `/` says hello, everything else is a 404.
async fn app(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = if req.uri().path() == "/" {
        Response::new(Full::new(Bytes::from_static(
            b"tower-jemalloc hyper example: try /metrics\n",
        )))
    } else {
        let mut response = Response::new(Full::new(Bytes::from_static(b"not found\n")));
        *response.status_mut() = StatusCode::NOT_FOUND;
        response
    };
    Ok(response)
}

#[tokio::main]
async fn main() {
    let args = common::parse("hyper", 9072, &[]);

    let layer = args.layer();
    // One service value for the whole server; each connection gets a cheap clone.
    let service = layer.layer(tower::service_fn(app));

    let listener = args.listen().await;
    let addr = listener
        .local_addr()
        .expect("bound listener has an address");
    println!("listening on http://{addr}");
    println!("  curl -s http://{addr}/");
    println!("  curl -s http://{addr}/metrics | grep jemalloc");
    println!("  {}", args.purge_command(addr));

    // `auto` answers HTTP/1.1 and HTTP/2 (prior knowledge) on the same port.
    let http = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: back off rather than spin.
                        eprintln!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let connection = http
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service.clone()))
                    .into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        eprintln!("connection from {peer}: {e}");
                    }
                });
            }
            _ = &mut ctrl_c => break,
        }
    }

    // Stop accepting, then let open connections finish their requests.
    drop(listener);
    println!("shutting down");
    if tokio::time::timeout(GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        eprintln!(
            "connections still open after {} s: closing them",
            GRACE.as_secs()
        );
    }
}
