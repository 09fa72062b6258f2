//! Loopback figures that need a real server: P1 passthrough throughput, P3 coalescing, P4
//! purge isolation, P5 reclaim; with `--features profiling`, the cost of sampling and of heap
//! dumps. Prints its figures; asserts nothing (the tests assert the behaviour).
//!
//! `cargo bench --bench loopback [-- passthrough|coalescing|isolation|reclaim]`
//! `cargo bench --features profiling --bench loopback -- sampling|dumps`
//!
//! `requests-count`, only when named: a fixed number of requests, to count instructions under
//! callgrind (see [`requests_count`]).

use axum::extract::Request;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use prometheus::core::{Collector, Desc};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower::{Layer, ServiceExt};
use tower_jemalloc::{JemallocLayer, JemallocStats, PurgeMode};

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

/// With the profiling feature: the profiler available, inactive until a scenario switches it.
#[cfg(feature = "profiling")]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8] = b"prof:true,prof_active:false\0";

#[cfg(feature = "profiling")]
#[path = "loopback/profiling.rs"]
mod profiling;
#[path = "loopback/records.rs"]
mod records;

const MIB: f64 = 1024.0 * 1024.0;

fn main() {
    let selected: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let run = |name: &str| selected.is_empty() || selected.iter().any(|s| s == name);
    println!(
        "machine: {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if run("passthrough") {
        passthrough();
    }
    if run("coalescing") {
        coalescing();
    }
    if run("isolation") {
        isolation();
    }
    if run("reclaim") {
        reclaim();
    }
    // Only when named: it runs under callgrind.
    if selected.iter().any(|s| s == "requests-count") {
        requests_count();
    }
    #[cfg(feature = "profiling")]
    {
        if run("sampling") {
            profiling::sampling();
        }

        if run("dumps") {
            profiling::dumps();
        }
    }
}

fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

/// Serves `app` on a loopback port of `runtime`.
fn serve(
    runtime: &tokio::runtime::Runtime,
    app: axum::routing::RouterIntoService<axum::body::Body>,
) -> SocketAddr {
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, tower::make::Shared::new(app))
                .await
                .unwrap();
        });
        addr
    })
}

fn serve_layered(
    runtime: &tokio::runtime::Runtime,
    router: Router,
    layer: JemallocLayer,
) -> SocketAddr {
    let app = ServiceExt::<Request>::map_response(layer.layer(router), IntoResponse::into_response);
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(
                listener,
                axum::ServiceExt::<Request>::into_make_service(app),
            )
            .await
            .unwrap();
        });
        addr
    })
}

/// Drives `connections` keep-alive connections at `path` until `until`, returning each
/// request's latency.
async fn load(
    addr: SocketAddr,
    connections: usize,
    path: &'static str,
    until: Instant,
) -> Vec<Duration> {
    let mut tasks = Vec::new();
    for _ in 0..connections {
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(addr).await;
            let mut latencies = Vec::new();
            while Instant::now() < until {
                let start = Instant::now();
                fetch(&mut sender, path).await;
                latencies.push(start.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all
}

/// One request on a connection of its own: the status and the body.
async fn once(addr: SocketAddr, method: http::Method, path: &str) -> (http::StatusCode, Bytes) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    (
        status,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

/// The loopback figures in instructions, which repeat from run to run where throughput on a
/// shared machine does not: `REQUESTS_COUNT` (default 2,000) requests, one after another on
/// one keep-alive connection, to `REQUESTS_PATH`: `/` (default, a handler that allocates
/// next to nothing, as the passthrough figure's) or `/records` (the allocation-heavy handler
/// of the sampling figure), through the layer, served by one tokio worker. Run under
/// `valgrind --tool=callgrind` with 0 and with N requests: the difference over N is the
/// instructions per request, client and server together. With `--features profiling`,
/// jemalloc's profiler is started and inactive unless `_RJEM_MALLOC_CONF=prof_active:true`
/// says otherwise.
fn requests_count() {
    let count: usize = std::env::var("REQUESTS_COUNT")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000);
    let path = match std::env::var("REQUESTS_PATH").as_deref() {
        Ok("/records") => "/records",
        _ => "/",
    };
    let server = runtime(1);
    let client = runtime(1);
    let router = Router::new()
        .route("/", get(|| async { "ok" }))
        .route("/records", get(|| async { records::records() }));
    let layer = JemallocLayer::builder().build().unwrap();
    let addr = serve_layered(&server, router, layer);
    client.block_on(requests_in_a_row(addr, path, 20)); // warm up
    let start = Instant::now();
    client.block_on(requests_in_a_row(addr, path, count));
    use tikv_jemalloc_ctl::{Access, AsName};
    let active: Result<bool, _> = b"prof.active\0".name().read();
    println!(
        "requests-count: {count} requests to {path}; profiling compiled in: {}, prof.active: \
         {active:?}; {:.1} µs each",
        cfg!(feature = "profiling"),
        start.elapsed().as_secs_f64() * 1e6 / count.max(1) as f64
    );
}

/// `count` requests to `path`, one after another on one keep-alive connection.
async fn requests_in_a_row(addr: SocketAddr, path: &'static str, count: usize) {
    let mut sender = connect(addr).await;
    for _ in 0..count {
        fetch(&mut sender, path).await;
    }
}

/// A keep-alive HTTP/1.1 connection to `addr`, without Nagle's delay.
async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// `GET path` on `sender`'s connection, its body read to the end; it must succeed.
async fn fetch(sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>, path: &str) {
    let request = http::Request::get(path)
        .header("host", "127.0.0.1")
        .body(Empty::<Bytes>::new())
        .unwrap();
    sender.ready().await.unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert!(response.status().is_success());
    response.into_body().collect().await.unwrap();
}

/// Request count, p50, p99, max and the count over 10 ms of `sorted` latencies, for one line.
fn latency_line(sorted: &[Duration]) -> String {
    format!(
        "{} requests, p50 {:?}, p99 {:?}, max {:?}, {} over 10 ms",
        sorted.len(),
        percentile(sorted, 0.50),
        percentile(sorted, 0.99),
        sorted[sorted.len() - 1],
        sorted
            .iter()
            .filter(|l| **l > Duration::from_millis(10))
            .count(),
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

/// P1: throughput of a trivial handler with and without the layer, interleaved.
fn passthrough() {
    const ROUNDS: usize = 20;
    const CONNECTIONS: usize = 16;
    const RUN: Duration = Duration::from_millis(500);
    // One core serves, one drives the load.
    let server = runtime(1);
    let client = runtime(1);
    let router = || Router::new().route("/", get(|| async { "ok" }));
    let bare = serve(&server, router().into_service());
    let layered = serve_layered(&server, router(), JemallocLayer::new());

    // Throughput on this 2-core machine drifts by ±20 % over seconds, far more than the layer
    // costs; so each round measures both back to back (alternating which goes first) and the
    // figure is the median of the rounds' ratios, which cancels the drift.
    let (mut without, mut with, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 {
            [bare, layered]
        } else {
            [layered, bare]
        };
        let mut rates = [0.0; 2];
        for addr in order {
            let done = client
                .block_on(load(addr, CONNECTIONS, "/", Instant::now() + RUN))
                .len();
            rates[usize::from(addr == layered)] = done as f64 / RUN.as_secs_f64();
        }
        without.push(rates[0]);
        with.push(rates[1]);
        ratios.push(rates[1] / rates[0]);
    }
    let (m_without, m_with) = (median(&mut without), median(&mut with));
    let m_ratio = median(&mut ratios);
    println!(
        "passthrough: {CONNECTIONS} connections, {ROUNDS} rounds of {RUN:?} each, interleaved"
    );
    println!("  without layer: median {m_without:.0} req/s");
    println!("  with layer:    median {m_with:.0} req/s");
    println!(
        "  ratio with/without, median of the rounds' ratios: {m_ratio:.3} (quartiles {:.3}-{:.3}, min {:.3}, max {:.3})",
        ratios[ROUNDS / 4],
        ratios[ROUNDS * 3 / 4],
        ratios[0],
        ratios[ROUNDS - 1],
    );
}

/// Counts renders of the registry it is registered in.
struct RenderCounter(Desc, Arc<AtomicUsize>);

impl Collector for RenderCounter {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.0]
    }
    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.1.fetch_add(1, Ordering::SeqCst);
        Vec::new()
    }
}

/// P3: 64 concurrent scrapes, 20 times over, over sockets: with the layer's own series only (a
/// render of about 0.1 ms) and with 1,000 more counter series (a render of about a
/// millisecond, like a real service's), without and with a reuse window.
fn coalescing() {
    for series in [0, 1_000] {
        for window in [Duration::ZERO, Duration::from_millis(5)] {
            coalescing_with(series, window);
        }
    }
}

fn coalescing_with(series: usize, window: Duration) {
    const BURST: usize = 64;
    const BURSTS: usize = 20;
    let server = runtime(2);
    let client = runtime(1);
    let layer = JemallocLayer::builder()
        .max_concurrent_scrapes(BURST)
        .scrape_reuse_window(window)
        .build()
        .unwrap();
    let renders = Arc::new(AtomicUsize::new(0));
    let desc = Desc::new(
        "renders".into(),
        "renders".into(),
        vec![],
        Default::default(),
    )
    .unwrap();
    layer
        .registry()
        .register(Box::new(RenderCounter(desc, Arc::clone(&renders))))
        .unwrap();
    let requests = opentelemetry::metrics::MeterProvider::meter(
        layer.meter_provider().expect("the layer's own provider"),
        "bench",
    )
    .u64_counter("requests")
    .build();
    for i in 0..series {
        requests.add(
            1,
            &[
                opentelemetry::KeyValue::new("route", format!("/r/{i}")),
                opentelemetry::KeyValue::new("status", "200"),
            ],
        );
    }
    let addr = serve_layered(&server, Router::new(), layer);

    let mut per_burst = Vec::new();
    let mut times = Vec::new();
    client.block_on(async {
        // Connections are opened once; each burst sends one scrape on each.
        let mut senders = Vec::new();
        for _ in 0..BURST {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            senders.push(sender);
        }
        for _ in 0..BURSTS {
            let before = renders.load(Ordering::SeqCst);
            let start = Instant::now();
            let mut tasks = Vec::new();
            for mut sender in senders.drain(..) {
                tasks.push(tokio::spawn(async move {
                    fetch(&mut sender, "/metrics").await;
                    sender
                }));
            }
            for task in tasks {
                senders.push(task.await.unwrap());
            }
            times.push(start.elapsed());
            per_burst.push(renders.load(Ordering::SeqCst) - before);
        }
    });
    times.sort();
    println!(
        "coalescing ({series} extra series, reuse window {window:?}): {BURSTS} bursts of {BURST} concurrent scrapes over loopback: renders per burst max {}, mean {:.2}; burst answered in median {:?} (max {:?})",
        per_burst.iter().max().unwrap(),
        per_burst.iter().sum::<usize>() as f64 / BURSTS as f64,
        times[times.len() / 2],
        times[times.len() - 1],
    );
}

/// Allocates `mib` MiB in 1 KiB blocks, touches them and frees them, on the calling thread.
/// (Not on a thread of its own: jemalloc returns the dirty pages of a thread that exits, so
/// nothing would be left to purge.)
fn churn(mib: usize) {
    // Every block goes through black_box: without it the optimiser may elide the allocations.
    let blocks: Vec<Box<[u8; 1024]>> = (0..mib * 1024)
        .map(|i| std::hint::black_box(Box::new([i as u8; 1024])))
        .collect();
    drop(std::hint::black_box(blocks));
}

/// P4: p99 of forwarded requests while a 1 GiB purge runs: through the layer (dedicated
/// thread) vs inline on a runtime worker, vs no purge; on two workers and on one.
fn isolation() {
    // Two workers (work stealing can move tasks off a blocked worker), then one (it cannot).
    for workers in [2, 1] {
        isolation_with(workers);
    }
}

fn isolation_with(workers: usize) {
    const CONNECTIONS: usize = 8;
    const WINDOW: Duration = Duration::from_millis(2000);
    const PURGE_AT: Duration = Duration::from_millis(300);
    let server = runtime(workers);
    let client = runtime(1);
    let router = Router::new()
        .route("/", get(|| async { "ok" }))
        // What not to do: a purge inside an async handler blocks its worker.
        .route(
            "/inline-purge",
            post(|| async {
                let report = tower_jemalloc::purge_all_arenas(PurgeMode::Purge).unwrap();
                serde_json::to_string(&report).unwrap()
            }),
        );
    let layer = JemallocLayer::builder()
        .purge_cooldown(Duration::ZERO)
        .build()
        .unwrap();
    let addr = serve_layered(&server, router, layer);

    let scenario = |purge_path: Option<&'static str>| -> (Vec<Duration>, Option<f64>) {
        if purge_path.is_some() {
            churn(1024);
        }
        client.block_on(async {
            let until = Instant::now() + WINDOW;
            let purge = tokio::spawn(async move {
                let path = purge_path?;
                tokio::time::sleep(PURGE_AT).await;
                let (_, body) = once(addr, http::Method::POST, path).await;
                let report: serde_json::Value = serde_json::from_slice(&body).unwrap();
                report["duration_seconds"].as_f64()
            });
            let mut latencies = load(addr, CONNECTIONS, "/", until).await;
            latencies.sort();
            (latencies, purge.await.unwrap())
        })
    };
    println!("purge isolation: server with {workers} worker(s), {CONNECTIONS} connections over {WINDOW:?}, a purge of 1 GiB of dirty pages {PURGE_AT:?} in");
    for (name, path) in [
        ("baseline (no purge)", None),
        ("purge via the layer", Some("/debug/jemalloc/purge")),
        ("purge inline on a worker", Some("/inline-purge")),
        ("baseline again", None),
    ] {
        let (latencies, purge_seconds) = scenario(path);
        println!(
            "  {name:<26} {}{}",
            latency_line(&latencies),
            purge_seconds.map_or(String::new(), |s| format!(", purge took {:.1} ms", s * 1e3)),
        );
    }
}

/// P5: share of dirty + muzzy bytes one purge gives back after freeing 1 GiB in 1 KiB blocks,
/// and the purge's duration per GiB.
fn reclaim() {
    let mut shares = Vec::new();
    let mut per_gib = Vec::new();
    for _ in 0..3 {
        churn(1024);
        let report = tower_jemalloc::purge_all_arenas(PurgeMode::Purge).unwrap();
        let unused = |s: &JemallocStats| (s.dirty + s.muzzy) as f64;
        assert!(
            unused(&report.before) > 900.0 * MIB,
            "the churn left dirty pages"
        );
        let share = 1.0 - unused(&report.after) / unused(&report.before);
        shares.push(share);
        let gib = (unused(&report.before) - unused(&report.after)) / (1024.0 * MIB);
        per_gib.push(report.duration.as_secs_f64() * 1e3 / gib);
        println!(
            "  reclaim run: dirty+muzzy {:.1} MiB -> {:.1} MiB ({:.2}% given back), purge {:.1} ms, released {:.1} MiB resident",
            unused(&report.before) / MIB,
            unused(&report.after) / MIB,
            share * 100.0,
            report.duration.as_secs_f64() * 1e3,
            report.released_bytes() as f64 / MIB,
        );
    }
    println!(
        "reclaim: median {:.2}% of dirty+muzzy given back; median {:.1} ms per GiB purged",
        median(&mut shares) * 100.0,
        median(&mut per_gib)
    );
}
