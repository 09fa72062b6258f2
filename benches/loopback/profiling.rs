//! The cost of heap profiling (`--features profiling`): sampling on an allocation-heavy
//! handler, active against inactive; and one heap dump's time, size and effect on the
//! latency of forwarded requests.

use super::{latency_line, load, median, once, runtime, serve_layered};
use crate::records::records;
use axum::routing::get;
use axum::Router;
use http::{Method, StatusCode};
use std::time::{Duration, Instant};
use tower_jemalloc::{Endpoint, JemallocLayer};

/// The layer with the debug endpoints open (loopback only).
fn layer() -> JemallocLayer {
    JemallocLayer::builder()
        .allow_anonymous(Endpoint::Purge)
        .build()
        .unwrap()
}

/// Switches profiling on or off through the control endpoint.
fn set_active(client: &tokio::runtime::Runtime, addr: std::net::SocketAddr, active: bool) {
    let path = if active {
        "/debug/jemalloc/profiling?active=true"
    } else {
        "/debug/jemalloc/profiling?active=false"
    };
    let (status, body) = client.block_on(once(addr, Method::PUT, path));
    assert_eq!(status, StatusCode::OK, "{body:?}");
}

/// Bytes and allocations one call of `records` makes on this thread.
fn records_allocation() -> (u64, usize) {
    let allocated = tikv_jemalloc_ctl::thread::allocatedp::mib()
        .and_then(|mib| mib.read())
        .unwrap();
    let before = allocated.get();
    let body = records();
    let bytes = allocated.get() - before;
    (bytes, body.len())
}

/// Throughput of the allocation-heavy handler with profiling active (default 512 KiB sample
/// interval) against inactive, in paired rounds on one server, as the passthrough figure.
pub(super) fn sampling() {
    const ROUNDS: usize = 20;
    const CONNECTIONS: usize = 16;
    const RUN: Duration = Duration::from_millis(500);
    let server = runtime(1);
    let client = runtime(1);
    let router = Router::new().route("/records", get(|| async { records() }));
    let addr = serve_layered(&server, router, layer());
    let (bytes, body) = records_allocation();

    let (mut inactive, mut active, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        let mut rates = [0.0; 2];
        for state in order {
            set_active(&client, addr, state);
            let done = client
                .block_on(load(addr, CONNECTIONS, "/records", Instant::now() + RUN))
                .len();
            rates[usize::from(state)] = done as f64 / RUN.as_secs_f64();
        }
        inactive.push(rates[0]);
        active.push(rates[1]);
        ratios.push(rates[1] / rates[0]);
    }
    set_active(&client, addr, false);
    let m_ratio = median(&mut ratios);
    println!(
        "sampling: /records allocates {:.0} KiB per request ({body} bytes of JSON answered); \
         {CONNECTIONS} connections, {ROUNDS} rounds of {RUN:?} each, interleaved",
        bytes as f64 / 1024.0,
    );
    println!(
        "  profiling inactive: median {:.0} req/s",
        median(&mut inactive)
    );
    println!(
        "  profiling active:   median {:.0} req/s (512 KiB sample interval)",
        median(&mut active)
    );
    println!(
        "  ratio active/inactive, median of the rounds' ratios: {m_ratio:.3} (quartiles {:.3}-{:.3}, min {:.3}, max {:.3})",
        ratios[ROUNDS / 4],
        ratios[ROUNDS * 3 / 4],
        ratios[0],
        ratios[ROUNDS - 1],
    );
}

/// Keeps `mib` MiB in 1 MiB blocks, from a function the profiles name.
#[inline(never)]
fn leak_for_profile(mib: usize) -> Vec<Box<[u8]>> {
    let mut kept = Vec::with_capacity(mib);
    for _ in 0..mib {
        // A loop, not a tail call into `collect`: this function stays on the sampled stacks.
        kept.push(std::hint::black_box(vec![1u8; 1 << 20].into_boxed_slice()));
    }
    kept
}

/// With 64 MiB held and profiling active: the time and size of one heap dump per format, and
/// the latency of forwarded requests while one runs, against none.
pub(super) fn dumps() {
    let client = runtime(1);
    for workers in [2, 1] {
        let server = runtime(workers);
        let router = Router::new().route("/", get(|| async { "ok" }));
        let addr = serve_layered(&server, router, layer());
        set_active(&client, addr, true);
        let held = leak_for_profile(64);
        if workers == 2 {
            sizes(&client, addr);
        }
        isolation(&client, addr, workers);
        set_active(&client, addr, false);
        drop(held);
    }
}

/// Five dumps per format, each past the previous one's reuse window.
fn sizes(client: &tokio::runtime::Runtime, addr: std::net::SocketAddr) {
    println!("heap dumps with 64 MiB held, profiling active, 5 per format (median):");
    for (format, path) in [
        ("pprof", "/debug/pprof/heap"),
        ("flame graph", "/debug/pprof/heap?format=flamegraph"),
    ] {
        let (mut times, mut sizes) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(1100));
            let start = Instant::now();
            let (status, body) = client.block_on(once(addr, Method::GET, path));
            assert_eq!(status, StatusCode::OK);
            times.push(start.elapsed().as_secs_f64() * 1e3);
            sizes.push(body.len() as f64);
        }
        println!(
            "  {format:<12} {:.1} ms (min {:.1}, max {:.1}), {:.1} KiB",
            median(&mut times),
            times[0],
            times[4],
            median(&mut sizes) / 1024.0
        );
    }
}

/// 8 connections on `/` for 2 s; 300 ms in, a heap dump (or nothing).
fn isolation(client: &tokio::runtime::Runtime, addr: std::net::SocketAddr, workers: usize) {
    const CONNECTIONS: usize = 8;
    const WINDOW: Duration = Duration::from_millis(2000);
    const DUMP_AT: Duration = Duration::from_millis(300);
    println!(
        "dump isolation: server with {workers} worker(s), {CONNECTIONS} connections over \
         {WINDOW:?}, a heap dump (64 MiB held) {DUMP_AT:?} in"
    );
    for (name, path) in [
        ("baseline (no dump)", None),
        ("pprof dump", Some("/debug/pprof/heap")),
        (
            "flame graph dump",
            Some("/debug/pprof/heap?format=flamegraph"),
        ),
        ("baseline again", None),
    ] {
        std::thread::sleep(Duration::from_millis(1100));
        let (latencies, dump) = client.block_on(async {
            let until = Instant::now() + WINDOW;
            let dump = tokio::spawn(async move {
                let path = path?;
                tokio::time::sleep(DUMP_AT).await;
                let start = Instant::now();
                let (status, body) = once(addr, Method::GET, path).await;
                assert_eq!(status, StatusCode::OK);
                Some((start.elapsed(), body.len()))
            });
            let mut latencies = load(addr, CONNECTIONS, "/", until).await;
            latencies.sort();
            (latencies, dump.await.unwrap())
        });
        println!(
            "  {name:<20} {}{}",
            latency_line(&latencies),
            dump.map_or(String::new(), |(took, bytes)| format!(
                ", dump answered in {:.1} ms, {:.1} KiB",
                took.as_secs_f64() * 1e3,
                bytes as f64 / 1024.0
            )),
        );
    }
}
