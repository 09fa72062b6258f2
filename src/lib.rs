//! Allocator observability for any tower HTTP service, in one layer.
//!
//! Wrap a service (an axum `Router`, a tonic server, a hyper service) in a [`JemallocLayer`]
//! and it gains:
//!
//! - `GET /metrics`: the Prometheus text exposition of an `opentelemetry-prometheus` exporter,
//!   with jemalloc's gauges (`jemalloc_{allocated,active,metadata,mapped,retained,resident,
//!   dirty,muzzy}_bytes`, prefixed by a namespace if you set one) registered as OpenTelemetry
//!   observable instruments, and whatever else your application records through the same meter
//!   provider. `HEAD` is answered too; other methods get a 405.
//! - `POST|PUT /debug/jemalloc/purge`: returns the unused dirty pages of all arenas to the OS
//!   and answers with a JSON [`PurgeReport`] (statistics before and after). The purge runs on
//!   a dedicated thread, never on an async worker, and only one runs at a time (409 otherwise).
//!   `?mode=decay` asks for the gentler `arena.<all>.decay`.
//! - `GET /debug/jemalloc/stats`: jemalloc's `malloc_stats_print` dump (JSON with a
//!   [`StatsSummary`] and plain-language hints, or `?format=text`).
//! - `GET|PUT /debug/jemalloc/config`: background threads and decay times, read
//!   ([`JemallocConfig`]) and changed at run time (`?background_thread=true&dirty_decay_ms=1000`,
//!   answered with a [`ConfigUpdate`]), so memory goes back steadily without a restart.
//! - A memory limit, opt-in ([`memory_limit`](JemallocLayerBuilder::memory_limit), or
//!   `PUT /debug/jemalloc/config?memory_limit=320MiB` at run time): a governor thread watches
//!   what the OOM killer watches (the cgroup's usage, or the RSS) and above 90 % of the limit
//!   gives jemalloc's cached pages back by amount, within a CPU budget; the application
//!   subscribes to the [`Pressure`] with [`JemallocLayer::memory_pressure`], and forwarded
//!   requests can be shed with a 503 while live memory exceeds the limit
//!   ([`shed_requests`](JemallocLayerBuilder::shed_requests)).
//! - Bytes allocated and kept per route, opt-in
//!   ([`per_route_allocation`](JemallocLayerBuilder::per_route_allocation)): the polling
//!   thread's jemalloc counters are read around every poll of a forwarded request's future and
//!   body, and each request is recorded into `http.server.request.allocated` (a histogram) and
//!   `http.server.request.kept` with its method, route ([`RouteLayer`] for axum,
//!   [`grpc_method`] for tonic) and status; [`RequestAccount`] brings in work moved to other
//!   threads.
//! - `GET /debug/pprof/heap` and `GET|PUT /debug/jemalloc/profiling`, with the `profiling`
//!   feature: jemalloc's heap profile as symbolized pprof (for `go tool pprof`) or an SVG
//!   flame graph, the growth over `?seconds=N`, and switching the sampling profiler at run time
//!   ([`ProfilingStatus`], [`ProfilingChange`]). Without the feature they answer 501; when
//!   jemalloc was started without `prof:true`, 503 saying how (the README's "Find what holds
//!   the memory").
//!
//! Beside jemalloc's gauges, `/metrics` has the process's RSS and virtual memory
//! (`process_memory_usage_bytes`, `process_memory_virtual_bytes`) and, inside a cgroup v2, its
//! usage and limit, all from the same snapshot; per-arena gauges are opt-in
//! ([`per_arena_metrics`](JemallocLayerBuilder::per_arena_metrics), or
//! [`register_instruments_with`] on a meter of your own).
//!
//! The layer's own paths answer whatever the service behind it is doing: `poll_ready` is ready
//! even while the inner service applies backpressure (a `ConcurrencyLimit` at its limit, say),
//! and forwarded requests then wait for the inner service's readiness in their own future. The
//! inner service must be `Clone + Send + 'static` for that, as axum's, tonic's and hyper's
//! services are ([`JemallocService`] explains).
//!
//! `/metrics` is open; the debug endpoints (purge, stats, config, heap, profiling, the page)
//! answer 403 until they have an access rule: a bearer token, a predicate, or an explicit
//! [`allow_anonymous`](JemallocLayerBuilder::allow_anonymous). The builder configures every
//! [`Endpoint`] the same way (path, switched off, access) and sets the purge cooldown and the
//! stats and scrape bounds; see the README's Security section. No website can drive the
//! debug endpoints through a browser: a cross-origin write is refused whatever the rule, and
//! anonymous access answers only requests addressed to an IP or `localhost` (against DNS
//! rebinding). No request waits for ever: past its deadline (Prometheus' scrape timeout for
//! `/metrics`, otherwise [`job_deadline`](JemallocLayerBuilder::job_deadline)) it gets a 503
//! naming the job it waited for.
//! Every other request goes to the inner service untouched. JSON answers are serde
//! types ([`PurgeReport`], [`JemallocStats`], [`StatsSummary`]) that a Rust client can read
//! back, and the crates whose types appear in the API are re-exported ([`opentelemetry`][otel],
//! [`opentelemetry_sdk`][otel-sdk], [`opentelemetry_prometheus`][otel-prom],
//! [`prometheus`][prom]), so that a user needs
//! no matching versions of their own.
//!
//! # Quick start
//!
//! jemalloc must be the process's global allocator, or the figures would describe nothing.
//! Besides this crate, the example uses `bytes`, `http`, `http-body-util`, `tokio` (features
//! `macros` and `rt`) and `tower` (feature `util`):
//!
//! ```toml
//! [dependencies]
//! tower-jemalloc = "0.1"
//! bytes = "1"
//! http = "1"
//! http-body-util = "0.1"
//! tokio = { version = "1", features = ["macros", "rt"] }
//! tower = { version = "0.5", features = ["util"] }
//! ```
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_jemalloc::JemallocLayer;
//!
//! #[global_allocator]
//! static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let mut app = ServiceBuilder::new()
//!     .layer(JemallocLayer::builder().namespace("restate").build()?)
//!     .service_fn(|_req: Request<Full<Bytes>>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("hello"))))
//!     });
//!
//! let response = app.ready().await?.call(Request::get("/metrics").body(Full::default())?).await?;
//! let text = response.into_body().collect().await?.to_bytes();
//! let text = std::str::from_utf8(&text)?;
//! assert!(text.contains("# TYPE restate_jemalloc_allocated_bytes gauge"));
//!
//! let response = app.ready().await?.call(Request::get("/").body(Full::default())?).await?;
//! assert_eq!(response.into_body().collect().await?.to_bytes(), "hello");
//! # Ok(())
//! # }
//! ```
//!
//! With axum, wrap the whole router, so that `/metrics` answers whatever the routes are.
//! `axum::serve` wants axum's own response type, hence the `map_response`:
//!
//! ```no_run
//! use axum::{extract::Request, response::IntoResponse, routing::get, Router};
//! use tower::{Layer, ServiceExt};
//! use tower_jemalloc::JemallocLayer;
//!
//! #[global_allocator]
//! static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;
//!
//! #[tokio::main]
//! async fn main() -> std::io::Result<()> {
//!     let router = Router::new().route("/", get(|| async { "hello" }));
//!     let app = ServiceExt::<Request>::map_response(
//!         JemallocLayer::new().layer(router),
//!         IntoResponse::into_response,
//!     );
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:9070").await?;
//!     axum::serve(listener, axum::ServiceExt::<Request>::into_make_service(app)).await
//! }
//! ```
//!
//! `router.layer(JemallocLayer::new())` works too (axum 0.8 applies `Router::layer` to the
//! fallback as well, so unmatched paths reach the layer), but it runs after routing: a router
//! nested under a prefix sees the path without that prefix. `route_layer` never sees unmatched
//! paths and does not work.
//!
//! With tonic, give the layer to `Server::builder()`, which wraps every route with it. tonic
//! speaks HTTP/2 only unless `accept_http1(true)`, and Prometheus scrapes over HTTP/1.1; gRPC
//! clients keep using HTTP/2 on the same port:
//!
//! ```no_run
//! use tonic::transport::Server;
//! use tower_jemalloc::JemallocLayer;
//!
//! #[global_allocator]
//! static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let (_reporter, health_service) = tonic_health::server::health_reporter();
//!     Server::builder()
//!         .accept_http1(true)
//!         .layer(JemallocLayer::new())
//!         .add_service(health_service)
//!         .serve("127.0.0.1:9071".parse()?)
//!         .await?;
//!     Ok(())
//! }
//! ```
//!
//! With plain hyper, wrap your service and hand it to hyper-util's `TowerToHyperService`;
//! the `auto` connection builder serves HTTP/1.1 and HTTP/2 alike:
//!
//! ```no_run
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use hyper::body::Incoming;
//! use hyper_util::rt::{TokioExecutor, TokioIo};
//! use hyper_util::server::conn::auto;
//! use hyper_util::service::TowerToHyperService;
//! use tower::Layer;
//! use tower_jemalloc::JemallocLayer;
//!
//! #[global_allocator]
//! static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;
//!
//! #[tokio::main]
//! async fn main() -> std::io::Result<()> {
//!     let app = tower::service_fn(|_req: Request<Incoming>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("hello"))))
//!     });
//!     let service = JemallocLayer::new().layer(app);
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:9072").await?;
//!     loop {
//!         let (stream, _) = listener.accept().await?;
//!         let service = TowerToHyperService::new(service.clone());
//!         tokio::spawn(async move {
//!             let http = auto::Builder::new(TokioExecutor::new());
//!             let _ = http.serve_connection(TokioIo::new(stream), service).await;
//!         });
//!     }
//! }
//! ```
//!
//! The `tonic`, `hyper` and `service_builder` examples add flags and a graceful Ctrl-C
//! shutdown; `two_readers` shares one meter provider between `/metrics` and a push reader.
//!
//! # Where to put the layer
//!
//! Around the whole application, so that `/metrics` and the purge path answer whatever the
//! routes are. In a [`tower::ServiceBuilder`][builder] stack the position also decides what the other
//! layers see: a layer *outside* (added before it) sees every request, scrapes and purges
//! included — right for access logs and request metrics, but a timeout there also bounds a
//! purge of many GiB, and an authentication layer there also guards `/metrics`. A layer
//! *inside* (added after it) only sees the requests the jemalloc layer forwards: right for
//! handler timeouts and response compression (`/metrics` gzips itself).
//!
//! # Without jemalloc
//!
//! On targets where jemalloc does not build (MSVC), or with the default `jemalloc` feature
//! off, the crate still compiles: `/metrics` serves the registry without jemalloc gauges and
//! the purge endpoint answers 501. When jemalloc is compiled in but is not the global allocator,
//! the gauges are left out (no misleading zeros; a warning is logged once) and purge answers
//! 503.
//!
//! [otel]: https://docs.rs/opentelemetry/0.33
//! [otel-sdk]: https://docs.rs/opentelemetry_sdk/0.33
//! [otel-prom]: https://docs.rs/opentelemetry-prometheus/0.33
//! [prom]: https://docs.rs/prometheus/0.14
//! [builder]: https://docs.rs/tower/0.5/tower/struct.ServiceBuilder.html
#![deny(missing_docs, unreachable_pub, unsafe_code)]
#![warn(missing_debug_implementations, rust_2018_idioms)]
#![cfg_attr(docsrs, feature(doc_cfg))]

// The tower plumbing: a request's path through the layer.
mod accounting;
mod body;
mod builder;
mod future;
mod layer;
mod service;

// The endpoints the layer answers, through one pipeline.
mod endpoint;

// The memory governor: a limit, giving cached pages back by amount, and the pressure state.
mod governor;

// The process's memory over the last minutes, sampled for the page's chart.
mod history;

// The lower layers, which know nothing of HTTP: jemalloc itself, the operating system's view
// of the process, and the OpenTelemetry instruments and Prometheus exposition built on both.
mod jemalloc;
mod system;
mod telemetry;

pub use accounting::{
    grpc_method, Instrumented, RequestAccount, RouteFigures, RouteLayer, RouteService,
    DEFAULT_MAX_ROUTES, OTHER_ROUTE, UNMATCHED_ROUTE,
};
pub use body::ResponseBody;
pub use builder::{BuildError, JemallocLayerBuilder};
pub use endpoint::{
    Endpoint, DEFAULT_HEAP_PROFILE_MAX_BYTES, DEFAULT_JOB_DEADLINE, DEFAULT_MAX_CONCURRENT_SCRAPES,
    DEFAULT_PURGE_COOLDOWN, DEFAULT_STATS_MAX_BYTES, DEFAULT_STATS_RATE_LIMIT,
    DEFAULT_STATS_REUSE_WINDOW,
};
pub use future::ResponseFuture;
pub use governor::{MemoryLimit, MemoryLimitError, Pressure};
pub use jemalloc::{
    purge_all_arenas, ArenaDecay, BackgroundThread, ConfigUpdate, JemallocConfig, JemallocError,
    JemallocStats, MallocConf, OsMemory, Profiler, ProfilingChange, ProfilingStatus, PurgeError,
    PurgeMode, PurgeReport, Ratios, StatsSummary, UnknownPurgeMode, MAX_DECAY_MS,
};
pub use layer::JemallocLayer;
pub use service::JemallocService;
pub use system::ProcessMemory;
pub use telemetry::instruments::{
    register_instruments, register_instruments_with, InstrumentOptions,
};

// The crates whose types appear in this crate's API, so that a user needs no matching
// versions of their own: `tower_jemalloc::opentelemetry::metrics::MeterProvider`, ….
pub use opentelemetry;
pub use opentelemetry_prometheus;
pub use opentelemetry_sdk;
pub use prometheus;

#[cfg(jemalloc)]
#[cfg_attr(docsrs, doc(cfg(all(feature = "jemalloc", not(target_env = "msvc")))))]
pub mod allocator;

#[cfg(all(jemalloc, fault_injection))]
#[doc(hidden)]
pub mod __private {
    //! Test seams for this crate's own integration tests (`cfg(fault_injection)`, which
    //! build.rs sets only for cargo commands run inside this repository). Not part of the
    //! public API: no build of a crate that depends on this one has it.
    pub use crate::jemalloc::fault::{clear as clear_faults, fail_key};
}

// The unit tests exercise jemalloc's real statistics, so jemalloc is their global allocator.
#[cfg(all(test, jemalloc))]
#[global_allocator]
static GLOBAL: allocator::Jemalloc = allocator::Jemalloc;
