//! Bounded loopback load against a real server: 32 keep-alive connections for a few seconds,
//! mixing scrapes (gzip, as Prometheus asks) with forwarded requests. Zero errors, and resident
//! memory grows by less than 64 MiB after warm-up. Prints the throughput it saw (a figure, not
//! a target: the benchmarks measure speed).
#![cfg(all(feature = "jemalloc", target_os = "linux"))]

mod common;

use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower_jemalloc::JemallocLayer;

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

const CONNECTIONS: usize = 32;
const WARM_UP: Duration = Duration::from_secs(1);
const MEASURED: Duration = Duration::from_secs(3);
const MIB: u64 = 1024 * 1024;

/// VmRSS of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[derive(Default)]
struct Counts {
    forwarded: AtomicU64,
    scrapes: AtomicU64,
    errors: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_load_has_no_errors_and_no_memory_growth() {
    let router = Router::new().route("/", get(|| async { "ok" }));
    let layer = JemallocLayer::builder()
        .namespace("load")
        // As many scrapes in flight as connections: no 503 by design.
        .max_concurrent_scrapes(CONNECTIONS)
        .build()
        .unwrap();
    let addr = common::serve_axum(router, layer).await;

    let counts = Arc::new(Counts::default());
    let deadline = Instant::now() + WARM_UP + MEASURED;
    let mut clients = Vec::new();
    for connection in 0..CONNECTIONS {
        let counts = Arc::clone(&counts);
        clients.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut i = connection;
            while Instant::now() < deadline {
                i += 1;
                let scrape = i % 8 == 0;
                let request = http::Request::get(if scrape { "/metrics" } else { "/" })
                    .header("host", "127.0.0.1")
                    .header("accept-encoding", "gzip")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let outcome = async {
                    sender.ready().await?;
                    let response = sender.send_request(request).await?;
                    let status = response.status();
                    let body = response.into_body().collect().await?.to_bytes();
                    Ok::<_, hyper::Error>((status, body))
                };
                match tokio::time::timeout(Duration::from_secs(10), outcome).await {
                    Ok(Ok((StatusCode::OK, body))) if !body.is_empty() => {
                        let counter = if scrape {
                            &counts.scrapes
                        } else {
                            &counts.forwarded
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        eprintln!("error: {other:?}");
                        counts.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    tokio::time::sleep(WARM_UP).await;
    let rss_after_warm_up = rss();
    let done_at_warm_up =
        counts.forwarded.load(Ordering::Relaxed) + counts.scrapes.load(Ordering::Relaxed);
    let measure_start = Instant::now();
    for client in clients {
        client.await.unwrap();
    }
    let elapsed = measure_start.elapsed();
    let rss_end = rss();
    let forwarded = counts.forwarded.load(Ordering::Relaxed);
    let scrapes = counts.scrapes.load(Ordering::Relaxed);
    let errors = counts.errors.load(Ordering::Relaxed);
    let measured = forwarded + scrapes - done_at_warm_up;
    let growth = rss_end.saturating_sub(rss_after_warm_up);
    eprintln!(
        "load: {CONNECTIONS} connections, {forwarded} forwarded + {scrapes} scrapes, {errors} errors; \
         {:.0} req/s after warm-up; RSS {} MiB -> {} MiB (growth {:.1} MiB)",
        measured as f64 / elapsed.as_secs_f64(),
        rss_after_warm_up / MIB,
        rss_end / MIB,
        growth as f64 / MIB as f64
    );
    assert_eq!(errors, 0, "no request failed");
    assert!(scrapes > 0 && forwarded > 0);
    assert!(
        growth < 64 * MIB,
        "RSS grew by {} MiB after warm-up",
        growth / MIB
    );
}
