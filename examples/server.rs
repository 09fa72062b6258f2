//! An axum application wrapped in the layer, with a route that churns memory so you can watch
//! resident memory grow and then purge it.
//!
//! ```text
//! cargo run --release --example server [-- --addr 127.0.0.1:9070 --namespace NAME]
//! curl -s localhost:9070/metrics | grep jemalloc
//! curl -s -X POST 'localhost:9070/demo/churn?mib=512'
//! curl -s -X POST localhost:9070/debug/jemalloc/purge
//! ```
//!
//! `POST /demo/work?mib=N&ms=T` is a request that needs N MiB for T ms, as a real handler
//! would: many may run at once (at most 64, holding at most 4096 MiB together; 429 with
//! `Retry-After: 1` beyond), which makes load to try a memory limit with (`common/work.rs`).
//!
//! `--memory-limit SIZE` (`320MiB`, `90%`, or `none`, the default) keeps the process under a
//! memory limit: the layer's governor gives jemalloc's cached pages back above 90 % of it, and
//! the server prints changes of memory pressure, at most one a second (where a real service
//! would drop a cache).
//! `--shed-requests` also answers forwarded requests 503 while memory stays over the limit,
//! all but `DELETE /demo/leak`, which frees memory (README, "Stay under a memory limit"):
//!
//! ```text
//! cargo run --release --example server -- --memory-limit 512MiB --shed-requests
//! curl -s -X POST 'localhost:9070/demo/work?mib=64&ms=500'
//! curl -s -X PUT 'localhost:9070/debug/jemalloc/config?memory_limit=320MiB'
//! ```
//!
//! Built with `--features profiling`, it starts with jemalloc's heap profiler available and
//! inactive, and `POST /demo/leak?mib=N` keeps memory on purpose, for finding it in a profile
//! (README, "Find what holds the memory"):
//!
//! ```text
//! cargo run --release --example server --features profiling
//! curl -s -X PUT 'localhost:9070/debug/jemalloc/profiling?active=true&for=15m'
//! curl -s -X POST 'localhost:9070/demo/leak?mib=64'
//! go tool pprof -top http://localhost:9070/debug/pprof/heap
//! curl -s -o heap.svg 'localhost:9070/debug/pprof/heap?format=flamegraph'
//! curl -s -X DELETE localhost:9070/demo/leak
//! ```
//!
//! Safe to start anywhere: on a loopback address (the default) everything answers this
//! machine only; on any other address it needs a token (`--purge-token` or `PURGE_TOKEN`),
//! which the debug endpoints then require, and the `/demo/*` routes (up to 4 GiB allocated per
//! request) still answer only loopback peers and requests that carry the token. Its output
//! never panics: piped into `head` or closed, the server keeps serving.

use axum::extract::{MatchedPath, RawQuery};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tower::Layer;
use tower_jemalloc::{JemallocStats, RequestAccount, RouteLayer};

#[path = "common/mod.rs"]
mod common;

use common::loopback::{loopback_or_token, LoopbackOrToken};

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

/// jemalloc's options, read once when it starts: its heap profiler available, not sampling
/// until switched on (`PUT /debug/jemalloc/profiling?active=true`). `_rjem_` is the prefix
/// tikv-jemallocator gives jemalloc's symbols (this crate's build never switches on its
/// unprefixed feature, under which the symbol would be `malloc_conf`); `unsafe(…)` is
/// required from edition 2024 and accepted before.
#[cfg(feature = "profiling")]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8] = b"prof:true,prof_active:false\0";

/// The routes that allocate on request, named in the guard's answers.
const DEMO_ROUTES: &str = "the /demo/* routes (churn, leak, work)";

#[tokio::main]
async fn main() {
    let notes = "The /demo/* routes allocate up to 4 GiB a request: they answer loopback peers\n\
                 only, and other peers only with Authorization: Bearer TOKEN when the server\n\
                 has a token (--purge-token or PURGE_TOKEN).";
    let args = common::parse_with_notes("server", 9070, common::MEMORY_FLAGS, notes);

    // Bytes allocated per request, by route: `http_server_request_allocated_bytes` and
    // `http_server_request_kept_bytes` (README, "Which requests allocate").
    let layer = args
        .memory_flags(args.builder().per_route_allocation(true))
        .and_then(|builder| builder.build().map_err(|e| e.to_string()))
        .unwrap_or_else(|e| common::fail(2, e));
    let guard = LoopbackOrToken::new(DEMO_ROUTES, args.purge_token.as_deref());

    let demo = Router::new()
        .route("/demo/churn", post(churn))
        .with_state(Arc::new(Semaphore::new(1)))
        .route("/demo/leak", post(leak).delete(release))
        .with_state(Leaked::default())
        .merge(common::work::router(common::work::Work::default()))
        .route_layer(axum::middleware::from_fn_with_state(
            guard.clone(),
            loopback_or_token,
        ));
    let router = Router::new()
        .route(
            "/",
            get(|| async { "tower-jemalloc example server: try /metrics\n" }),
        )
        .merge(demo)
        // Names each request's `http.route` after the route template it matched.
        .route_layer(RouteLayer::new(|parts| {
            parts
                .extensions
                .get::<MatchedPath>()
                .map(MatchedPath::as_str)
        }));
    // Wrap the whole router so /metrics answers whatever the routes are.
    let app = layer.layer(router);

    let listener = args.listen().await;
    let bound = listener
        .local_addr()
        .expect("bound listener has an address");
    let url = common::reachable(bound);
    common::say(common::listening(bound));
    common::say(format_args!(
        "  curl -s http://{url}/metrics | grep jemalloc"
    ));
    common::say(format_args!(
        "  curl -s -X POST 'http://{url}/demo/churn?mib=512'"
    ));
    common::say(format_args!(
        "  curl -s -X POST 'http://{url}/demo/work?mib=64&ms=500'"
    ));
    if let Some(page) = layer.path(tower_jemalloc::Endpoint::Page) {
        common::say(format_args!(
            "  open http://{url}{page} in a browser: the memory at a glance, a chart, purge"
        ));
    }
    common::say(format_args!("  {}", args.purge_command(bound)));
    common::say(format_args!("  {}", guard.rule()));
    common::say(format_args!("  {}", args.memory_summary()));
    if cfg!(feature = "profiling") {
        common::say(
            "  heap profiling is available, inactive: README, \"Find what holds the memory\"",
        );
    }

    // The application's side of the limit: a real service would drop a cache here.
    // At most a line a second: near the limit the state may change at every poll (2 ms).
    let mut pressure = layer.memory_pressure();
    tokio::spawn(async move {
        let mut said = *pressure.borrow_and_update();
        while pressure.changed().await.is_ok() {
            let now = *pressure.borrow_and_update();
            if now != said {
                common::say(format_args!("memory pressure: {now:?}"));
                said = now;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    });

    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        common::say("shutting down");
    };
    // hyper-util rather than axum::serve, for its header-read timeout, an idle timeout and the
    // peer address as `ConnectInfo<SocketAddr>` (for an access predicate): common/serve.rs.
    common::serve::serve(listener, app, shutdown, Duration::from_secs(10)).await;
}

/// `POST /demo/churn?mib=N`: allocates N MiB in 1 KiB blocks, touches them, frees them, and
/// answers the stats before, while held, and after. One churn at a time. The work runs in
/// `spawn_blocking`, inside the request's account, so that its bytes count for the route.
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
    // Allocating gigabytes takes a while: keep it off the async workers, in the request's
    // account (the layer counts only the threads polling the request itself).
    let account = RequestAccount::current();
    let work = move || {
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
    };
    let result = tokio::task::spawn_blocking(move || match account {
        Some(account) => account.in_scope(work),
        None => work(),
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

/// The most `/demo/leak` keeps in total.
const MAX_LEAKED_MIB: usize = 4096;

/// What `/demo/leak` keeps: 1 MiB blocks.
type Leaked = Arc<Mutex<Vec<Box<[u8]>>>>;

/// `POST /demo/leak?mib=N`: keeps N more MiB until `DELETE /demo/leak` (at most 4096 MiB in
/// all), and answers how much is kept.
async fn leak(
    axum::extract::State(leaked): axum::extract::State<Leaked>,
    RawQuery(query): RawQuery,
) -> Response {
    let mib = match parse_mib(query.as_deref()) {
        Ok(mib) => mib,
        Err(reason) => return (StatusCode::BAD_REQUEST, format!("{reason}\n")).into_response(),
    };
    let mut kept = leaked.lock().unwrap_or_else(|e| e.into_inner());
    if kept.len() + mib > MAX_LEAKED_MIB {
        let reason = format!(
            "{} MiB kept already: at most {MAX_LEAKED_MIB} MiB in all (DELETE /demo/leak frees it)\n",
            kept.len()
        );
        return (StatusCode::CONFLICT, reason).into_response();
    }
    leak_memory(&mut kept, mib);
    let json = format!("{{\"leaked_mib\":{}}}\n", kept.len());
    ([(header::CONTENT_TYPE, "application/json")], json).into_response()
}

/// Allocates `mib` blocks of 1 MiB, touched, and keeps them. Never inlined, so that heap
/// profiles name it: this is the function to find in `go tool pprof -top` or a flame graph.
#[inline(never)]
fn leak_memory(kept: &mut Vec<Box<[u8]>>, mib: usize) {
    for i in 0..mib {
        let block = vec![i as u8 | 1; 1024 * 1024].into_boxed_slice();
        kept.push(std::hint::black_box(block));
    }
}

/// `DELETE /demo/leak`: frees everything `/demo/leak` kept.
async fn release(axum::extract::State(leaked): axum::extract::State<Leaked>) -> Response {
    let freed = std::mem::take(&mut *leaked.lock().unwrap_or_else(|e| e.into_inner()));
    let json = format!("{{\"freed_mib\":{}}}\n", freed.len());
    ([(header::CONTENT_TYPE, "application/json")], json).into_response()
}
