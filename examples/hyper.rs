//! Plain hyper 1 and hyper-util (no framework): a `tower::service_fn` application wrapped in the
//! layer, served by hyper-util's accept loop (`common/serve.rs`): HTTP/1.1 and HTTP/2 on one
//! port, a header-read timeout, an idle timeout, and a graceful Ctrl-C shutdown.
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

    // HTTP/1.1 and HTTP/2 on one port, with a header-read timeout, an idle timeout and a
    // graceful Ctrl-C shutdown: common/serve.rs.
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        println!("shutting down");
    };
    common::serve::serve(listener, service, shutdown, GRACE).await;
}
