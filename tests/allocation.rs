//! Bytes allocated and kept per route (`per_route_allocation`): accuracy across `.await`s and
//! threads, bytes kept, routes and their cap, work moved to other threads, and what
//! `/metrics` shows.
#![cfg(all(feature = "jemalloc", not(target_env = "msvc")))]

mod common;

use axum::extract::MatchedPath;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use common::client::{fetch, http1, http2};
use common::{parse_exposition, request, send, Exposition};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_jemalloc::{
    JemallocLayer, RequestAccount, RouteFigures, RouteLayer, OTHER_ROUTE, UNMATCHED_ROUTE,
};

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

/// 64 KiB: a jemalloc size class, so a piece counts exactly its size.
const PIECE: usize = 64 << 10;
/// Pieces a handler allocates: 4 MiB in all.
const PIECES: usize = 64;
const EXPECTED: u64 = (PIECE * PIECES) as u64;

/// What a request costs beyond its handler's own allocations, at most, over HTTP/1.1 and
/// HTTP/2 through axum (routing, extractors, the response head): the fixed overhead the
/// README documents.
const OVERHEAD: u64 = 16 << 10;

fn layer() -> JemallocLayer {
    JemallocLayer::builder()
        .per_route_allocation(true)
        .build()
        .unwrap()
}

fn matched_route() -> RouteLayer {
    RouteLayer::new(|parts| {
        parts
            .extensions
            .get::<MatchedPath>()
            .map(MatchedPath::as_str)
    })
}

/// Allocates [`PIECES`] pieces across as many `.await`s, each piece touched, and frees them
/// (or keeps them in `kept`).
async fn pieces(kept: Option<Arc<Mutex<Vec<Vec<u8>>>>>) -> &'static str {
    let mut held = Vec::with_capacity(PIECES);
    for i in 0..PIECES {
        held.push(std::hint::black_box(vec![i as u8; PIECE]));
        tokio::task::yield_now().await;
    }
    if let Some(kept) = kept {
        kept.lock().unwrap().append(&mut held);
    }
    drop(std::hint::black_box(held));
    "done"
}

fn router(kept: Arc<Mutex<Vec<Vec<u8>>>>) -> Router {
    Router::new()
        .route("/empty", get(|| async { "done" }))
        .route("/pieces", get(|| pieces(None)))
        .route("/keep", get(move || pieces(Some(Arc::clone(&kept)))))
        .route("/users/{id}", get(|| async { "a user" }))
        .route_layer(matched_route())
}

/// The route figures of `method route`, once `count` requests are recorded there (a request
/// is recorded when the server drops its response body, just after the client has it).
async fn figures(layer: &JemallocLayer, method: &str, route: &str, count: u64) -> RouteFigures {
    for _ in 0..500 {
        let found = layer
            .top_routes(usize::MAX)
            .into_iter()
            .find(|r| r.method == method && r.route == route);
        if let Some(figures) = found.filter(|f| f.requests >= count) {
            return figures;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{method} {route}: {count} requests not recorded; routes: {:?}",
        layer.top_routes(usize::MAX)
    );
}

async fn serve(layer: &JemallocLayer, router: Router) -> SocketAddr {
    common::serve_axum(router, layer.clone()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_is_counted_whole_across_awaits_and_workers_over_http1_and_http2() {
    let layer = layer();
    let addr = serve(&layer, router(Arc::default())).await;
    for (n, client) in [http1(), http2()].iter().enumerate() {
        let n = n as u64 + 1;
        for path in ["/empty", "/pieces"] {
            for _ in 0..5 {
                let (_, answer) = fetch(client, "GET", &format!("http://{addr}{path}"), b"").await;
                assert_eq!(answer.status, StatusCode::OK);
            }
        }
        let empty = figures(&layer, "GET", "/empty", 5 * n).await;
        let pieces = figures(&layer, "GET", "/pieces", 5 * n).await;
        let per_empty = empty.allocated_bytes / empty.requests;
        let per_piece = pieces.allocated_bytes / pieces.requests;
        assert!(per_empty <= OVERHEAD, "{empty:?}");
        // The handler's own bytes, within 1 %, once the route's fixed overhead is taken off.
        let handler = per_piece.saturating_sub(per_empty);
        assert!(
            handler.abs_diff(EXPECTED) <= EXPECTED / 100,
            "counted {handler} for {EXPECTED}: {pieces:?} {empty:?}"
        );
        assert!((EXPECTED..=EXPECTED + EXPECTED / 100 + OVERHEAD).contains(&per_piece));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_frees_keeps_nothing_and_one_that_keeps_shows_it() {
    let layer = layer();
    let kept = Arc::default();
    let addr = serve(&layer, router(Arc::clone(&kept))).await;
    let client = http1();
    for path in ["/pieces", "/keep", "/pieces", "/keep"] {
        fetch(&client, "GET", &format!("http://{addr}{path}"), b"").await;
    }
    let freeing = figures(&layer, "GET", "/pieces", 2).await;
    let keeping = figures(&layer, "GET", "/keep", 2).await;
    assert!(
        freeing.kept_bytes.unsigned_abs() <= 2 * OVERHEAD,
        "a handler that frees what it allocates: {freeing:?}"
    );
    assert!(
        keeping.kept_bytes >= 2 * EXPECTED as i64
            && keeping.kept_bytes <= 2 * (EXPECTED + OVERHEAD) as i64,
        "a handler that keeps 4 MiB a request: {keeping:?}"
    );
    drop(kept);
}

/// A future polled on one thread, then moved to another and polled there: both polls count.
#[test]
fn a_request_polled_on_two_threads_is_counted_whole() {
    let layer = layer();
    let (go, wait) = tokio::sync::oneshot::channel::<()>();
    let wait = Arc::new(tokio::sync::Mutex::new(Some(wait)));
    let inner = service_fn(move |_req: Request<Full<Bytes>>| {
        let wait = Arc::clone(&wait);
        async move {
            let first = std::hint::black_box(vec![1u8; 1 << 20]);
            let wait = wait.lock().await.take().unwrap();
            wait.await.unwrap();
            let second = std::hint::black_box(vec![2u8; 1 << 20]);
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                "{}",
                first.len() + second.len()
            )))))
        }
    });
    let mut service = layer.layer(inner);
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    };
    runtime()
        .block_on(std::future::poll_fn(|cx| service.poll_ready(cx)))
        .unwrap();
    let mut future = Box::pin(service.call(request("GET", "/two-threads")));
    // First poll here: the first MiB, then the future waits.
    let first_thread = std::thread::current().id();
    runtime().block_on(async {
        assert!(futures_poll_once(future.as_mut()).await.is_none());
    });
    go.send(()).unwrap();
    let second_thread = std::thread::spawn(move || {
        let id = std::thread::current().id();
        let response = runtime().block_on(future).unwrap();
        let body = runtime().block_on(response.into_body().collect()).unwrap();
        assert_eq!(body.to_bytes(), "2097152");
        id
    })
    .join()
    .unwrap();
    assert_ne!(first_thread, second_thread);
    let routes = layer.top_routes(10);
    assert_eq!(routes.len(), 1, "{routes:?}");
    let two = 2u64 << 20;
    assert!(
        routes[0].allocated_bytes >= two && routes[0].allocated_bytes <= two + OVERHEAD,
        "{routes:?}"
    );
    assert_eq!(routes[0].route, UNMATCHED_ROUTE);
}

/// Polls `future` once: `Some` with its output if it was ready.
async fn futures_poll_once<F: std::future::Future + Unpin>(mut future: F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut future).poll(cx) {
            std::task::Poll::Ready(output) => Some(output),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

#[tokio::test]
async fn a_streamed_body_is_counted_over_its_frames_and_handed_over() {
    let layer = layer();
    let inner = service_fn(|_req: Request<Full<Bytes>>| async {
        // Each frame is allocated when the body is polled, not before.
        let frames = (0..16).map(|i| {
            let data = Bytes::from(std::hint::black_box(vec![i as u8; PIECE]));
            Ok::<_, Infallible>(http_body::Frame::data(data))
        });
        let body = StreamBody::new(tokio_stream::iter(frames));
        Ok::<_, Infallible>(Response::new(body))
    });
    let mut service = layer.layer(inner);
    let response = service
        .ready()
        .await
        .unwrap()
        .call(request("GET", "/stream"))
        .await
        .unwrap();
    // The body is polled on a thread that has never read its totals: its first poll there
    // counts like the others.
    let body = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(response.into_body().collect())
            .unwrap()
            .to_bytes()
    })
    .join()
    .unwrap();
    assert_eq!(body.len(), 16 * PIECE);
    let routes = layer.top_routes(10);
    let allocated = routes[0].allocated_bytes;
    assert!(
        allocated >= 16 * PIECE as u64 && allocated <= 16 * PIECE as u64 + OVERHEAD,
        "{routes:?}"
    );
    // The frames went to the server, which frees them: not kept.
    assert!(
        routes[0].kept_bytes.unsigned_abs() <= OVERHEAD,
        "{routes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_moved_to_spawn_blocking_counts_through_the_account() {
    let layer = layer();
    let router = Router::new()
        .route(
            "/blocking",
            get(|| async {
                tokio::task::spawn_blocking(|| drop(std::hint::black_box(vec![0u8; 8 << 20])))
                    .await
                    .unwrap();
                "done"
            }),
        )
        .route(
            "/carried",
            get(|| async move {
                let account = RequestAccount::current().unwrap();
                tokio::task::spawn_blocking(move || {
                    account.in_scope(|| drop(std::hint::black_box(vec![0u8; 8 << 20])))
                })
                .await
                .unwrap();
                "done"
            }),
        )
        .route(
            "/spawned",
            get(|| async move {
                let account = RequestAccount::current().unwrap();
                let task = account.instrument(async {
                    tokio::task::yield_now().await;
                    // Inside the instrumented task, the account is current too.
                    assert!(RequestAccount::current().is_some());
                    drop(std::hint::black_box(vec![0u8; 8 << 20]));
                });
                tokio::spawn(task).await.unwrap();
                "done"
            }),
        )
        .route_layer(matched_route());
    let addr = serve(&layer, router).await;
    let client = http1();
    for path in ["/blocking", "/carried", "/spawned"] {
        let (_, answer) = fetch(&client, "GET", &format!("http://{addr}{path}"), b"").await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    let eight = 8u64 << 20;
    // Not seen without the account: the work ran on another thread.
    let blocking = figures(&layer, "GET", "/blocking", 1).await;
    assert!(blocking.allocated_bytes < OVERHEAD, "{blocking:?}");
    for route in ["/carried", "/spawned"] {
        let carried = figures(&layer, "GET", route, 1).await;
        assert!(
            carried.allocated_bytes >= eight && carried.allocated_bytes <= eight + OVERHEAD,
            "{carried:?}"
        );
        assert!(carried.kept_bytes.unsigned_abs() <= OVERHEAD, "{carried:?}");
    }
}

/// The `http.route` values `/metrics` shows.
fn route_values(exposition: &Exposition) -> std::collections::BTreeSet<String> {
    exposition
        .samples
        .iter()
        .filter(|s| s.name == "http_server_request_allocated_bytes_count")
        .map(|s| s.labels["http_route"].clone())
        .collect()
}

async fn scrape<S, B>(service: &mut S) -> Exposition
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let answer = send(service, request("GET", "/metrics")).await;
    assert_eq!(answer.status, StatusCode::OK);
    parse_exposition(answer.text())
}

#[tokio::test]
async fn a_thousand_unmatched_paths_add_one_route_value() {
    let layer = layer();
    let mut app = layer.layer(router(Arc::default()));
    send(&mut app, request("GET", "/users/7")).await;
    let before = route_values(&scrape(&mut app).await);
    assert_eq!(before, ["/users/{id}".to_owned()].into());
    for i in 0..1000 {
        let answer = send(&mut app, request("GET", &format!("/nothing/here/{i}"))).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND);
    }
    let after = route_values(&scrape(&mut app).await);
    assert_eq!(
        after,
        ["/users/{id}".to_owned(), UNMATCHED_ROUTE.to_owned()].into()
    );
}

/// An application without a router of its own: routes from the request's path, folded when
/// the application does not know the path, and capped.
#[tokio::test]
async fn route_from_is_folded_on_404_and_capped() {
    let layer = JemallocLayer::builder()
        .per_route_allocation(true)
        .route_from(|parts| Some(parts.uri.path()))
        .max_routes(2)
        .build()
        .unwrap();
    let inner = service_fn(|req: Request<Full<Bytes>>| async move {
        let status = if req.uri().path().starts_with("/known") {
            StatusCode::OK
        } else {
            StatusCode::NOT_FOUND
        };
        let response = Response::builder().status(status).body(Full::default());
        Ok::<_, Infallible>(response.unwrap())
    });
    let mut app = layer.layer(inner);
    // Unknown paths first: they must not use up the cap of 2 routes.
    let paths = [
        "/unknown/1",
        "/unknown/2",
        "/unknown/3",
        "/known/a",
        "/known/b",
    ];
    for path in paths.into_iter().chain(["/known/c", "/known/d"]) {
        send(&mut app, request("GET", path)).await;
    }
    let routes: std::collections::BTreeMap<String, u64> = layer
        .top_routes(usize::MAX)
        .into_iter()
        .map(|r| (r.route, r.requests))
        .collect();
    let expected = [
        ("/known/a".to_owned(), 1),
        ("/known/b".to_owned(), 1),
        (OTHER_ROUTE.to_owned(), 2),
        (UNMATCHED_ROUTE.to_owned(), 3),
    ];
    assert_eq!(routes, expected.into());
}

#[tokio::test]
async fn grpc_methods_are_routes_and_unimplemented_ones_are_unmatched() {
    let layer = JemallocLayer::builder()
        .per_route_allocation(true)
        .route_from(tower_jemalloc::grpc_method)
        .build()
        .unwrap();
    let inner = service_fn(|req: Request<Full<Bytes>>| async move {
        // As tonic answers: 200, and a method it does not serve says so in grpc-status.
        let mut response = Response::builder().header("content-type", "application/grpc");
        if req.uri().path() != "/grpc.health.v1.Health/Check" {
            response = response.header("grpc-status", "12");
        }
        Ok::<_, Infallible>(response.body(Full::default()).unwrap())
    });
    let mut app = layer.layer(inner);
    for path in ["/grpc.health.v1.Health/Check", "/no.Such/Method", "/x.Y/Z"] {
        let request = Request::post(path)
            .header("content-type", "application/grpc")
            .body(Full::default())
            .unwrap();
        send(&mut app, request).await;
    }
    // Not gRPC: not named by grpc_method.
    send(&mut app, request("GET", "/plain")).await;
    let mut routes: Vec<(String, u64)> = layer
        .top_routes(usize::MAX)
        .into_iter()
        .map(|r| (r.route, r.requests))
        .collect();
    routes.sort();
    assert_eq!(
        routes,
        [
            (UNMATCHED_ROUTE.to_owned(), 1),
            (UNMATCHED_ROUTE.to_owned(), 2),
            ("/grpc.health.v1.Health/Check".to_owned(), 1),
        ]
        .map(|(r, n)| (r, n))
        .to_vec()
    );
}

#[tokio::test]
async fn metrics_show_the_histogram_and_the_bytes_kept_with_http_attributes() {
    let layer = JemallocLayer::builder()
        .namespace("restate")
        .per_route_allocation(true)
        .build()
        .unwrap();
    let kept = Arc::default();
    let mut app = layer.layer(router(Arc::clone(&kept)));
    send(&mut app, request("GET", "/keep")).await;
    send(&mut app, request("GET", "/users/1")).await;
    let answer = send(&mut app, request("GET", "/metrics")).await;
    let text = answer.text();
    let exposition = parse_exposition(text);
    let histogram = "restate_http_server_request_allocated_bytes";
    let kept_name = "restate_http_server_request_kept_bytes";
    assert_eq!(exposition.types[histogram], "histogram");
    assert_eq!(exposition.types[kept_name], "gauge");
    let keep_sample = |name: &str| {
        exposition
            .samples
            .iter()
            .find(|s| s.name == name && s.labels["http_route"] == "/keep")
            .unwrap_or_else(|| panic!("{name} for /keep in\n{text}"))
            .clone()
    };
    let sum = keep_sample(&format!("{histogram}_sum"));
    assert_eq!(sum.labels["http_request_method"], "GET");
    assert_eq!(sum.labels["http_response_status_code"], "200");
    assert!(sum.value >= EXPECTED as f64 && sum.value <= (EXPECTED + OVERHEAD) as f64);
    assert!(keep_sample(kept_name).value >= EXPECTED as f64);
    // 1 KiB to 1 GiB, a factor of 4 apart: the 4 MiB request is in the 4 MiB bucket's
    // neighbour above (4 MiB and some overhead), not below it.
    let bounds: Vec<String> = exposition
        .samples
        .iter()
        .filter(|s| s.name == format!("{histogram}_bucket") && s.labels["http_route"] == "/keep")
        .map(|s| s.labels["le"].clone())
        .collect();
    assert_eq!(
        bounds,
        [
            "1024",
            "4096",
            "16384",
            "65536",
            "262144",
            "1048576",
            "4194304",
            "16777216",
            "67108864",
            "268435456",
            "1073741824",
            "+Inf"
        ]
    );
    drop(kept);
}

#[tokio::test]
async fn off_by_default_no_account_and_no_families() {
    let layer = JemallocLayer::new();
    let inner = service_fn(|_req: Request<Full<Bytes>>| async move {
        let has_account = RequestAccount::current().is_some();
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
            has_account.to_string(),
        ))))
    });
    let mut app = layer.layer(inner);
    assert_eq!(send(&mut app, request("GET", "/x")).await.text(), "false");
    let exposition = scrape(&mut app).await;
    assert!(exposition
        .types
        .keys()
        .all(|name| !name.starts_with("http_server")));
    assert!(layer.top_routes(10).is_empty());
}

#[tokio::test]
async fn a_request_that_fails_is_recorded_without_a_status() {
    let layer = layer();
    let inner = service_fn(|_req: Request<Full<Bytes>>| async {
        let _held = std::hint::black_box(vec![0u8; PIECE]);
        Err::<Response<Full<Bytes>>, _>(std::io::Error::other("the service failed"))
    });
    let mut app = layer.layer(inner);
    let result = app.ready().await.unwrap().call(request("GET", "/")).await;
    assert!(result.is_err());
    let exposition = scrape(&mut app).await;
    let count = exposition
        .samples
        .iter()
        .find(|s| s.name == "http_server_request_allocated_bytes_count")
        .expect("the failed request is recorded");
    assert_eq!(count.value, 1.0);
    assert!(!count.labels.contains_key("http_response_status_code"));
}

#[tokio::test]
async fn the_stats_summary_names_the_top_routes() {
    let layer = JemallocLayer::builder()
        .per_route_allocation(true)
        .allow_anonymous(tower_jemalloc::Endpoint::Stats)
        .build()
        .unwrap();
    let kept = Arc::default();
    let mut app = layer.layer(router(Arc::clone(&kept)));
    send(&mut app, request("GET", "/keep")).await;
    send(&mut app, request("GET", "/pieces")).await;
    let answer = send(
        &mut app,
        request("GET", "http://127.0.0.1/debug/jemalloc/stats"),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let hints = answer.json()["summary"]["hints"].clone();
    let hints: Vec<String> = serde_json::from_value(hints).unwrap();
    let top = hints
        .iter()
        .find(|h| h.starts_with("Routes that allocate the most"))
        .unwrap_or_else(|| panic!("{hints:?}"));
    assert!(top.contains("GET /keep (4.0 MiB in 1 request"), "{top}");
    assert!(top.contains("GET /pieces"), "{top}");
    let keeping = hints
        .iter()
        .find(|h| h.contains("kept"))
        .unwrap_or_else(|| panic!("{hints:?}"));
    assert!(keeping.starts_with("GET /keep kept 4.0 MiB"), "{keeping}");
    drop(kept);
}

/// The account is the thread's current one only while the request's code runs, and a panic
/// in that code does not leave it behind.
#[test]
fn the_current_account_is_left_when_the_request_code_returns_or_panics() {
    assert!(RequestAccount::current().is_none());
    let layer = layer();
    let inner = service_fn(|req: Request<Full<Bytes>>| {
        assert!(RequestAccount::current().is_some(), "current inside call");
        if req.uri().path() == "/panic" {
            panic!("the inner service panics in call");
        }
        std::future::ready(Ok::<_, Infallible>(Response::new(Full::<Bytes>::default())))
    });
    let mut service = layer.layer(inner);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(service.poll_ready(&mut cx).is_ready());
    let future = service.call(request("GET", "/fine"));
    assert!(RequestAccount::current().is_none());
    drop(future);
    assert!(service.poll_ready(&mut cx).is_ready());
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        service.call(request("GET", "/panic"))
    }));
    assert!(unwound.is_err());
    assert!(RequestAccount::current().is_none());
}

/// An inner service that is not ready at first (a concurrency limit at its limit, say): the
/// layer answers ready and the request waits for the inner service in its future. Its bytes
/// are counted all the same, the inner service's `call` included.
#[derive(Clone)]
struct ReadyOnSecondPoll {
    polled: bool,
}

impl tower::Service<Request<Full<Bytes>>> for ReadyOnSecondPoll {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        if std::mem::replace(&mut self.polled, true) {
            return std::task::Poll::Ready(Ok(()));
        }
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }

    fn call(&mut self, _req: Request<Full<Bytes>>) -> Self::Future {
        assert!(
            RequestAccount::current().is_some(),
            "current inside a waited call"
        );
        let body = std::hint::black_box(vec![7u8; 1 << 20]);
        std::future::ready(Ok(Response::new(Full::new(Bytes::from(body)))))
    }
}

#[tokio::test]
async fn a_request_that_waits_for_the_inner_service_is_counted() {
    let layer = layer();
    let mut service = layer.layer(ReadyOnSecondPoll { polled: false });
    let answer = send(&mut service, request("GET", "/waited")).await;
    assert_eq!(answer.body.len(), 1 << 20);
    let routes = layer.top_routes(10);
    assert_eq!(routes.len(), 1, "{routes:?}");
    let one = 1u64 << 20;
    assert!(
        (one..=one + OVERHEAD).contains(&routes[0].allocated_bytes),
        "{routes:?}"
    );
    // The body's data went to the client: handed over, not kept.
    assert!(
        routes[0].kept_bytes.unsigned_abs() <= OVERHEAD,
        "{routes:?}"
    );
}

/// The page for people shows the top routes: in its JSON (`routes`) and in its HTML tables,
/// and while bytes per route are off it says how to turn them on.
#[tokio::test]
async fn the_page_shows_the_top_routes() {
    let layer = JemallocLayer::builder()
        .per_route_allocation(true)
        .allow_anonymous(tower_jemalloc::Endpoint::Purge)
        .build()
        .unwrap();
    let kept = Arc::default();
    let mut app = layer.layer(router(Arc::clone(&kept)));
    send(&mut app, request("GET", "/keep")).await;
    send(&mut app, request("GET", "/users/3")).await;
    let json = send(
        &mut app,
        request("GET", "http://127.0.0.1/debug/jemalloc/?format=json"),
    )
    .await;
    assert_eq!(json.status, StatusCode::OK, "{}", json.text());
    let routes = json.json()["routes"].clone();
    let keep = routes
        .as_array()
        .expect("routes while counting")
        .iter()
        .find(|row| row["route"] == "/keep")
        .unwrap_or_else(|| panic!("{routes}"));
    assert_eq!(keep["method"], "GET");
    assert_eq!(keep["requests"], 1);
    assert!(keep["kept_bytes"].as_i64().unwrap() >= EXPECTED as i64);
    let html = send(&mut app, request("GET", "http://127.0.0.1/debug/jemalloc/")).await;
    assert!(html.text().contains("GET /keep"), "{}", html.text());
    assert!(html.text().contains("GET /users/{id}"));
    drop(kept);

    let off = JemallocLayer::builder()
        .allow_anonymous(tower_jemalloc::Endpoint::Purge)
        .build()
        .unwrap();
    let mut app = off.layer(router(Arc::default()));
    let json = send(
        &mut app,
        request("GET", "http://127.0.0.1/debug/jemalloc/?format=json"),
    )
    .await;
    assert!(json.json()["routes"].is_null());
    let html = send(&mut app, request("GET", "http://127.0.0.1/debug/jemalloc/")).await;
    assert!(html.text().contains("per_route_allocation(true)"));
}
