//! A tonic gRPC server (the standard health service) wrapped in the layer: `/metrics` and the
//! purge endpoint answer on the same port as the gRPC services.
//!
//! ```text
//! cargo run --release --example tonic [-- --addr 127.0.0.1:9071 --namespace NAME]
//! curl -s http://127.0.0.1:9071/metrics | grep jemalloc                          # HTTP/1.1
//! curl -s --http2-prior-knowledge http://127.0.0.1:9071/metrics | grep jemalloc  # HTTP/2
//! curl -s -X POST http://127.0.0.1:9071/debug/jemalloc/purge
//! grpc_health_probe -addr=127.0.0.1:9071                                         # gRPC
//! ```
//!
//! tonic serves HTTP/2 only unless told otherwise, and Prometheus scrapes over HTTP/1.1: hence
//! `accept_http1(true)`. gRPC clients keep speaking HTTP/2 on the same port.

use common::serve::{IdleTimeout, IDLE_TIMEOUT};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_stream::StreamExt;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};
use tonic::transport::Server;

#[path = "common/mod.rs"]
mod common;

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

#[tokio::main]
async fn main() {
    let args = common::parse("tonic", 9071, &[]);

    let layer = args.layer();

    // The standard gRPC health service; its overall status ("") starts as SERVING.
    let (_reporter, health_service) = tonic_health::server::health_reporter();

    // Bound here rather than by `serve_with_shutdown(addr, ..)` so that a busy port is reported
    // before anything else and the printed URLs carry the real port (also with `--addr :0`).
    let listener = args.listen().await;
    let addr = listener
        .local_addr()
        .expect("bound listener has an address");
    println!("listening on http://{addr} (gRPC over HTTP/2; HTTP/1.1 for /metrics)");
    println!("  curl -s http://{addr}/metrics | grep jemalloc");
    println!("  curl -s --http2-prior-knowledge http://{addr}/metrics | grep jemalloc");
    println!("  {}", args.purge_command(addr));
    println!("  grpc_health_probe -addr={addr}   # grpc.health.v1.Health/Check");

    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        println!("shutting down");
    };
    // `Server::layer` wraps every route, so the layer sees each request before tonic's router.
    // `serve_with_incoming_shutdown` stops accepting on Ctrl-C and lets open calls finish.
    // tonic enforces hyper's HTTP/1.1 header-read timeout (30 s); every connection also gets
    // the idle timeout of common/serve.rs.
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map(|stream| stream.map(|stream| IdleTimeout::new(stream, IDLE_TIMEOUT)));
    let served = Server::builder()
        .accept_http1(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(layer)
        .add_service(health_service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    if let Err(e) = served {
        eprintln!("error: server failed: {e}");
        std::process::exit(1);
    }
}

/// tonic wants each connection's peer address.
impl Connected for IdleTimeout<TcpStream> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.get_ref().connect_info()
    }
}
