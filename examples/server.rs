//! An axum application wrapped in the layer, with a route that churns memory so you can watch
//! resident memory grow and then purge it.
//!
//! ```text
//! cargo run --release --example server [-- --addr 127.0.0.1:9070 --namespace NAME]
//! curl -s localhost:9070/metrics | grep jemalloc
//! curl -s -X POST 'localhost:9070/demo/churn?mib=512'
//! curl -s -X POST localhost:9070/debug/jemalloc/purge
//! ```

use axum::extract::RawQuery;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tower::Layer;
use tower_jemalloc::JemallocStats;

#[path = "common/mod.rs"]
mod common;

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

#[tokio::main]
async fn main() {
    let args = common::parse("server", 9070, &[]);

    let layer = args.layer();

    let router = Router::new()
        .route(
            "/",
            get(|| async { "tower-jemalloc example server: try /metrics\n" }),
        )
        .route("/demo/churn", post(churn))
        .with_state(Arc::new(Semaphore::new(1)));
    // Wrap the whole router so /metrics answers whatever the routes are.
    let app = layer.layer(router);

    let listener = args.listen().await;
    let addr = listener
        .local_addr()
        .expect("bound listener has an address");
    println!("listening on http://{addr}");
    println!("  curl -s http://{addr}/metrics | grep jemalloc");
    println!("  curl -s -X POST 'http://{addr}/demo/churn?mib=512'");
    println!("  {}", args.purge_command(addr));

    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        println!("shutting down");
    };
    // hyper-util rather than axum::serve, for its header-read timeout, an idle timeout and the
    // peer address as `ConnectInfo<SocketAddr>` (for an access predicate): common/serve.rs.
    common::serve::serve(listener, app, shutdown, Duration::from_secs(10)).await;
}

/// `POST /demo/churn?mib=N`: allocates N MiB in 1 KiB blocks, touches them, frees them, and
/// answers the stats before, while held, and after. One churn at a time.
async fn churn(
    axum::extract::State(slot): axum::extract::State<Arc<Semaphore>>,
    RawQuery(query): RawQuery,
) -> Response {
    let mib = match parse_mib(query.as_deref()) {
        Ok(mib) => mib,
        Err(reason) => return (StatusCode::BAD_REQUEST, format!("{reason}\n")).into_response(),
    };
    let Ok(_permit) = slot.try_acquire() else {
        return (StatusCode::CONFLICT, "a churn is already running\n").into_response();
    };
    // Allocating gigabytes takes a while: keep it off the async workers.
    let result = tokio::task::spawn_blocking(move || {
        let before = JemallocStats::read()?;
        // black_box keeps the optimiser from eliding the allocations.
        let blocks: Vec<Box<[u8; 1024]>> = (0..mib * 1024)
            .map(|i| std::hint::black_box(Box::new([i as u8; 1024])))
            .collect();
        let held = JemallocStats::read()?;
        drop(std::hint::black_box(blocks));
        let after = JemallocStats::read()?;
        let answer = Churned {
            mib,
            before,
            held,
            after,
        };
        Ok::<_, tower_jemalloc::JemallocError>(
            serde_json::to_string(&answer).unwrap_or_default() + "\n",
        )
    })
    .await;
    match result {
        Ok(Ok(json)) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("churn failed: {e}\n"),
        )
            .into_response(),
    }
}

/// The answer of `/demo/churn`: the figures before, while held, and after.
#[derive(serde::Serialize)]
struct Churned {
    mib: usize,
    before: JemallocStats,
    held: JemallocStats,
    after: JemallocStats,
}

fn parse_mib(query: Option<&str>) -> Result<usize, String> {
    const RANGE: std::ops::RangeInclusive<usize> = 1..=4096;
    let value = query
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("mib="))
        .ok_or("missing query parameter mib (1 to 4096)")?;
    match value.parse::<usize>() {
        Ok(mib) if RANGE.contains(&mib) => Ok(mib),
        _ => Err(format!(
            "mib must be an integer from 1 to 4096, got {value:?}"
        )),
    }
}
