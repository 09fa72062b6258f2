//! [`JemallocLayerBuilder`]: configures and checks a [`JemallocLayer`], and the layer's
//! constructors.
//!
//! Every endpoint is configured the same way, through [`path`](JemallocLayerBuilder::path),
//! [`without`](JemallocLayerBuilder::without),
//! [`bearer_token`](JemallocLayerBuilder::bearer_token),
//! [`authorize`](JemallocLayerBuilder::authorize) and
//! [`allow_anonymous`](JemallocLayerBuilder::allow_anonymous) with an [`Endpoint`]. There are
//! no per-endpoint shorthands (`purge_path`, …): one method per setting covers every
//! endpoint, including ones added later.

use crate::accounting::ledger::{Ledger, DEFAULT_MAX_ROUTES};
use crate::accounting::route::RouteFn;
use crate::accounting::Accounting;
use crate::endpoint::{
    validate_token, Access, Context, Endpoint, JobTelemetry, Predicate, Route, Routes, Settings,
};
use crate::governor::{Governor, HoldsShedding, MemoryLimit};
use crate::layer::JemallocLayer;
use crate::service::{Guard, Shared};
use crate::telemetry::instruments::{register_instruments_with, InstrumentOptions};
use opentelemetry::metrics::{Meter, MeterProvider};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use std::fmt;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// The instrumentation scope the layer's own meter uses (`otel_scope_name` in Prometheus).
const SCOPE_NAME: &str = "tower-jemalloc";

impl JemallocLayer {
    /// A layer with the defaults: its own Prometheus registry, exporter and meter provider, no
    /// namespace (`jemalloc_allocated_bytes`, …), and every endpoint on its default path:
    /// `/metrics` open, the debug endpoints (purge; stats, config, heap, profiling and the
    /// page, which follow purge's rules) closed (403) until an access rule is set with
    /// [`JemallocLayer::builder`].
    ///
    /// # Panics
    ///
    /// Never in practice: building the default configuration can only fail if the
    /// OpenTelemetry exporter cannot register itself in a registry it has just created.
    /// Use [`JemallocLayer::builder`] to handle every error.
    pub fn new() -> Self {
        Self::builder()
            .build()
            .expect("the default JemallocLayer configuration is valid")
    }

    /// A builder to choose the namespace, paths and access rules, or bring your own registry.
    pub fn builder() -> JemallocLayerBuilder {
        JemallocLayerBuilder::default()
    }
}

impl Default for JemallocLayer {
    fn default() -> Self {
        Self::new()
    }
}

/// How one endpoint is configured.
#[derive(Clone)]
struct EndpointConfig {
    /// `None`: switched off, its path is forwarded.
    path: Option<String>,
    token: Option<String>,
    predicate: Option<Predicate>,
    /// Explicitly open to anyone.
    anonymous: bool,
}

impl EndpointConfig {
    fn has_rules(&self) -> bool {
        self.token.is_some() || self.predicate.is_some() || self.anonymous
    }

    /// Open to anyone by explicit opt-in: no token or predicate to pass.
    fn is_anonymous(&self) -> bool {
        self.anonymous && self.token.is_none() && self.predicate.is_none()
    }
}

impl fmt::Debug for EndpointConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Tokens are never printed.
        f.debug_struct("EndpointConfig")
            .field("path", &self.path)
            .field("bearer_token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("predicate", &self.predicate.as_ref().map(|_| "<fn>"))
            .field("anonymous", &self.anonymous)
            .finish()
    }
}

/// Builds a [`JemallocLayer`]. Made by [`JemallocLayer::builder`].
#[must_use]
pub struct JemallocLayerBuilder {
    namespace: Option<String>,
    registry: Option<(prometheus::Registry, Meter)>,
    /// One per endpoint, in the order of [`Endpoint::ALL`].
    endpoints: Vec<(Endpoint, EndpointConfig)>,
    settings: Settings,
    memory_limit: Option<MemoryLimit>,
    shed_requests: bool,
    shed_when: Option<Predicate>,
    per_route_allocation: bool,
    route_from: Option<RouteFn>,
    max_routes: usize,
}

impl Default for JemallocLayerBuilder {
    fn default() -> Self {
        let endpoints = Endpoint::ALL
            .iter()
            .map(|&endpoint| {
                let config = EndpointConfig {
                    path: Some(endpoint.default_path().to_owned()),
                    token: None,
                    predicate: None,
                    anonymous: false,
                };
                (endpoint, config)
            })
            .collect();
        Self {
            namespace: None,
            registry: None,
            endpoints,
            settings: Settings::default(),
            memory_limit: None,
            shed_requests: false,
            shed_when: None,
            per_route_allocation: false,
            route_from: None,
            max_routes: DEFAULT_MAX_ROUTES,
        }
    }
}

impl fmt::Debug for JemallocLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JemallocLayerBuilder")
            .field("namespace", &self.namespace)
            .field("own_registry", &self.registry.is_some())
            .field("endpoints", &self.endpoints)
            .field("settings", &self.settings)
            .field("memory_limit", &self.memory_limit)
            .field("shed_requests", &self.shed_requests)
            .field("shed_when", &self.shed_when.as_ref().map(|_| "<fn>"))
            .field("per_route_allocation", &self.per_route_allocation)
            .field("route_from", &self.route_from.as_ref().map(|_| "<fn>"))
            .field("max_routes", &self.max_routes)
            .finish()
    }
}

impl JemallocLayerBuilder {
    /// Prefixes every exported name: with `"restate"` the gauges are
    /// `restate_jemalloc_allocated_bytes`, …. Only for the registry the layer creates; a
    /// registry brought with [`registry`](Self::registry) has its namespace set on its own
    /// exporter.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Serves `registry` (already wired to your `opentelemetry-prometheus` exporter and meter
    /// provider) instead of creating one, and registers the jemalloc gauges on `meter`, a meter
    /// of that provider. Your application's own metrics then appear beside the gauges.
    ///
    /// ```
    /// use tower_jemalloc::opentelemetry::metrics::MeterProvider;
    /// use tower_jemalloc::opentelemetry_sdk::metrics::SdkMeterProvider;
    /// use tower_jemalloc::{opentelemetry_prometheus, prometheus, JemallocLayer};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let registry = prometheus::Registry::new();
    /// let exporter = opentelemetry_prometheus::exporter()
    ///     .with_registry(registry.clone())
    ///     .with_namespace("restate")
    ///     .build()?;
    /// let provider = SdkMeterProvider::builder().with_reader(exporter).build();
    ///
    /// let layer = JemallocLayer::builder()
    ///     .registry(registry, provider.meter("tower-jemalloc"))
    ///     .build()?;
    /// provider.meter("my-app").u64_counter("requests").build().add(1, &[]);
    /// # drop(layer);
    /// # Ok(())
    /// # }
    /// ```
    pub fn registry(mut self, registry: prometheus::Registry, meter: Meter) -> Self {
        self.registry = Some((registry, meter));
        self
    }

    fn endpoint(&mut self, endpoint: Endpoint) -> &mut EndpointConfig {
        let index = position(endpoint);
        &mut self.endpoints[index].1
    }

    /// Serves `endpoint` on `path` instead of its default (see [`Endpoint::default_path`]).
    /// The path must be absolute, without query or fragment, and differ from the other
    /// endpoints' paths.
    pub fn path(mut self, endpoint: Endpoint, path: impl Into<String>) -> Self {
        self.endpoint(endpoint).path = Some(path.into());
        self
    }

    /// Switches `endpoint` off: requests on its path are forwarded like any other.
    pub fn without(mut self, endpoint: Endpoint) -> Self {
        self.endpoint(endpoint).path = None;
        self
    }

    /// Requires `Authorization: Bearer <token>` on `endpoint`. A missing or wrong token gets a
    /// 401 with `WWW-Authenticate: Bearer`. The comparison takes the same time wherever the
    /// presented token differs, so it cannot be guessed byte by byte. For `/metrics`, set the
    /// same token in Prometheus's scrape config (`authorization: {credentials: …}`).
    ///
    /// Stats, config, heap, profiling and the page follow purge's rules (token, predicate,
    /// anonymous, or closed) until they are given a rule of their own.
    pub fn bearer_token(mut self, endpoint: Endpoint, token: impl Into<String>) -> Self {
        self.endpoint(endpoint).token = Some(token.into());
        self
    }

    /// Lets a request on `endpoint` through only when `allow` returns `true`; otherwise 403.
    /// `allow` sees the method, URI, headers and extensions (for example axum's
    /// `ConnectInfo<SocketAddr>`, present when the app is served with
    /// `into_make_service_with_connect_info::<SocketAddr>()`, or an mTLS identity your TLS
    /// layer inserted). It is checked after the bearer token, if both are set. It must not
    /// block.
    ///
    /// A predicate that admits by peer address (loopback, a private network) trusts a browser
    /// on an admitted machine as anonymous access does, but without the `Host` check
    /// [`allow_anonymous`](Self::allow_anonymous) adds against DNS rebinding: check `Host` in
    /// it too, or use a token. Cross-origin writes are refused whatever the rule.
    ///
    /// ```
    /// use std::net::SocketAddr;
    /// use axum::extract::ConnectInfo;
    /// use tower_jemalloc::{Endpoint, JemallocLayer};
    ///
    /// let layer = JemallocLayer::builder()
    ///     .authorize(Endpoint::Purge, |request| {
    ///         request
    ///             .extensions
    ///             .get::<ConnectInfo<SocketAddr>>()
    ///             .is_some_and(|ConnectInfo(peer)| peer.ip().is_loopback())
    ///     })
    ///     .build()
    ///     .unwrap();
    /// # drop(layer);
    /// ```
    pub fn authorize<F>(mut self, endpoint: Endpoint, allow: F) -> Self
    where
        F: Fn(&http::request::Parts) -> bool + Send + Sync + 'static,
    {
        self.endpoint(endpoint).predicate = Some(Arc::new(allow));
        self
    }

    /// Lets anyone use `endpoint`, without a token or predicate.
    ///
    /// Only `/metrics` is open by default (Prometheus expects it); every debug endpoint (purge,
    /// stats) answers 403 until it has an access rule: a [`bearer_token`](Self::bearer_token),
    /// a predicate ([`authorize`](Self::authorize)), or this explicit opt-in. Use it where
    /// the listener is reachable only by operators (a loopback address, an admin port); the
    /// example server calls it only when it listens on a loopback address.
    ///
    /// A browser on such a machine reaches the listener too, on behalf of any website it
    /// shows. So an anonymous debug endpoint answers only requests addressed to an IP literal
    /// or `localhost` (`Host: 127.0.0.1:9070`, `Host: localhost`; any other host name gets a
    /// 403, which stops DNS rebinding), and no debug endpoint takes a state-changing request
    /// that a browser marks as sent from another site (`Sec-Fetch-Site`, `Origin`). curl,
    /// scripts and Prometheus, which send neither header and address the listener by IP or
    /// `localhost`, are not affected. `/metrics` gets no `Host` check: it is read-only and
    /// Prometheus may scrape it by name.
    pub fn allow_anonymous(mut self, endpoint: Endpoint) -> Self {
        self.endpoint(endpoint).anonymous = true;
        self
    }

    /// The minimum time from the end of one purge to the start of the next (default 1 s);
    /// `Duration::ZERO` disables it. A purge asked for sooner gets a 429 with `Retry-After`
    /// in whole seconds, rounded up.
    pub fn purge_cooldown(mut self, cooldown: Duration) -> Self {
        self.settings.purge_cooldown = cooldown;
        self
    }

    /// How many scrapes may be in flight at once (default 1024); beyond that a scrape gets a
    /// 503 with `Retry-After: 1`. Concurrent scrapes share one render, so waiting costs almost
    /// nothing: this only bounds the memory waiting scrapes hold, and the default is far above
    /// what any monitoring setup sends.
    pub fn max_concurrent_scrapes(mut self, limit: usize) -> Self {
        self.settings.max_concurrent_scrapes = limit;
        self
    }

    /// Lets a render that finished less than `window` ago answer new scrapes too (default:
    /// zero, so a scrape joins the render in progress or starts one, never reusing one that
    /// had finished before it arrived). Scrapes in flight together always share one render; a
    /// window also merges scrapes that arrive one after another, bounding renders to about one
    /// per window under a scrape storm, at the price of data up to `window` old.
    pub fn scrape_reuse_window(mut self, window: Duration) -> Self {
        self.settings.scrape_reuse_window = window;
        self
    }

    /// Whether to export per-arena gauges (default `false`): resident, dirty and muzzy bytes
    /// and the thread count of each initialized arena, as
    /// `jemalloc_arena_{resident,dirty,muzzy}_bytes{arena="<i>"}` and
    /// `jemalloc_arena_threads{arena="<i>"}`, from the same snapshot as the other gauges.
    ///
    /// They tell which arenas hold memory (say, the arena of one busy thread pool). The
    /// cardinality is 4 series per arena: jemalloc creates 4 arenas per CPU by default, so 32
    /// series on 2 CPUs and 512 on 32, bounded by `arenas.narenas`; set `narenas` in
    /// `MALLOC_CONF` to bound it further.
    pub fn per_arena_metrics(mut self, enabled: bool) -> Self {
        self.settings.per_arena_metrics = enabled;
        self
    }

    /// Whether `/metrics` is gzip-compressed for clients whose `Accept-Encoding` allows it
    /// (default `true`; Prometheus always asks for gzip).
    pub fn gzip(mut self, enabled: bool) -> Self {
        self.settings.gzip = enabled;
        self
    }

    /// How long a finished stats dump answers new requests (default 1 s): requests in flight
    /// together always share one dump (per format), and under a flood the endpoint runs at
    /// most one dump per format per window. `Duration::ZERO`: every request that arrives
    /// after a dump finished starts a new one.
    pub fn stats_reuse_window(mut self, window: Duration) -> Self {
        self.settings.stats_reuse_window = window;
        self
    }

    /// How many stats answers (other than `HEAD`) the endpoint gives per second (default 10,
    /// at least 1); beyond that a request gets a 429 with `Retry-After: 1`. A dump is up to a
    /// few MiB, so a flood answered in full would take the process's CPU and bandwidth from
    /// the application and from `/metrics`.
    pub fn stats_rate_limit(mut self, per_second: u32) -> Self {
        self.settings.stats_rate_limit = per_second;
        self
    }

    /// The largest stats dump the endpoint answers with (default 4 MiB). A JSON dump over it
    /// is retried without per-arena details; a text dump is cut.
    pub fn stats_max_bytes(mut self, max_bytes: usize) -> Self {
        self.settings.stats_max_bytes = max_bytes;
        self
    }

    /// The largest jemalloc heap dump the heap profile endpoint reads (default 64 MiB); a
    /// larger one gets a 500 naming the cap. It bounds the memory a profile takes to convert.
    pub fn heap_profile_max_bytes(mut self, max_bytes: u64) -> Self {
        self.settings.heap_profile_max_bytes = max_bytes;
        self
    }

    /// How long a request waits for the job that answers it before it gets a 503 (default
    /// 30 s, [`DEFAULT_JOB_DEADLINE`](crate::DEFAULT_JOB_DEADLINE)). Every endpoint's work (a
    /// render, a stats dump, a config read or change, a heap profile, a purge) runs on a thread
    /// of its own, and something it waits on may never come back: an observable callback of
    /// the application blocked on a lock, a dump stuck under jemalloc's locks. Past its
    /// deadline a request gets a 503 with `Retry-After` and a reason naming the job and how
    /// long it has run. The job cannot be stopped: it keeps its thread, and requests for it
    /// join it (and time out in turn) rather than start a second thread of its kind, until it
    /// ends. `…_jemalloc_layer_jobs_stuck{job}` counts such jobs,
    /// `…_jemalloc_layer_jobs_timeouts_total{job}` the requests that timed out.
    ///
    /// Some requests wait otherwise:
    ///
    /// - a `/metrics` scrape that carries Prometheus' `X-Prometheus-Scrape-Timeout-Seconds`
    ///   waits that long minus half a second (at most half of it), so that Prometheus gets
    ///   the 503 before it gives up; this deadline applies only without the header;
    /// - a heap growth window (`?seconds=N`) waits N seconds more;
    /// - a purge waits at least 5 minutes: returning the pages of a large heap takes time,
    ///   and the report is what the caller asked for.
    ///
    /// Outside a tokio runtime, renders, dumps and reads run inline in `call`, and no
    /// deadline applies to them.
    pub fn job_deadline(mut self, deadline: Duration) -> Self {
        self.settings.job_deadline = deadline;
        self
    }

    /// Keeps the process under `limit` (default: no limit): the memory governor watches what
    /// the OOM killer watches (the cgroup's usage inside a cgroup with a limit, otherwise the
    /// process's RSS) on its own thread, `jemalloc-governor`, and above 90 % of the limit
    /// gives jemalloc's cached (dirty, then muzzy) pages back to the OS by amount (what
    /// usage exceeds 90 % by, plus 2 % of the limit), the arenas holding the most first. It
    /// polls as often as a 4 GiB/s burst needs to be seen before it passes 90 % (every 100 ms
    /// far from the limit, every 2 ms near it), and spends at most half a core giving pages
    /// back, and at most 10 % of one core on runs that find little to give back (both
    /// measured over the last second). When usage stays over the limit with nothing left to
    /// give back, live memory is
    /// the problem: it says so (the `jemalloc_memory_unreclaimable` gauge, a warning logged
    /// once, a stats hint), polls every 100 ms instead of spinning, and sheds load if
    /// [`shed_requests`](Self::shed_requests) is on. The application can react through
    /// [`JemallocLayer::memory_pressure`].
    ///
    /// There is one governor per process, since there is one jemalloc and one RSS: it starts
    /// when the first layer with a limit is built, a second layer built with a limit replaces
    /// the limit (the last one set wins), and every layer reports the same pressure. It stops
    /// when the limit is cleared (`PUT /debug/jemalloc/config?memory_limit=none`) or when the
    /// last layer and every service it made are dropped. The limit can also be set or changed
    /// at run time through the config endpoint, on a layer built without one.
    ///
    /// A [`MemoryLimit::PercentOfAvailable`] is taken of the limit detected at build time
    /// (cgroup v2 `memory.max`, cgroup v1 `memory.limit_in_bytes`, then physical memory).
    ///
    /// ```
    /// use tower_jemalloc::{JemallocLayer, MemoryLimit};
    ///
    /// let layer = JemallocLayer::builder()
    ///     .memory_limit("320MiB".parse()?)
    ///     .shed_requests(true)
    ///     .build()?;
    /// # drop(layer);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn memory_limit(mut self, limit: MemoryLimit) -> Self {
        self.memory_limit = Some(limit);
        self
    }

    /// Whether forwarded requests are shed while the process is over its memory limit after
    /// the governor gave back what it could (default `false`): they get a 503 with
    /// `Retry-After: 1` and a one-line reason (`shedding load: memory use 700 MiB is over the
    /// limit 640 MiB`) instead of reaching the inner service, and count in
    /// `jemalloc_shed_requests_total`. Once usage is back under the limit, requests are let
    /// back in one per 50 ms until usage is under 90 % of the limit and nothing was shed for a
    /// second (opening at once would let every waiting client in before their memory shows);
    /// a request arriving alone is let in at once. The layer's own endpoints always answer, so
    /// `/metrics` is scraped and the debug endpoints can be used while it sheds. Shedding
    /// starts only at [`Pressure::Over`]; [`Pressure::Near`] never starts it.
    ///
    /// Switched at run time with `PUT /debug/jemalloc/config?shed_requests=true|false`.
    /// Without a memory limit nothing is ever shed.
    ///
    /// [`Pressure::Over`]: crate::Pressure::Over
    /// [`Pressure::Near`]: crate::Pressure::Near
    pub fn shed_requests(mut self, enabled: bool) -> Self {
        self.shed_requests = enabled;
        self
    }

    /// Which forwarded requests may be shed (default: all of them). `shed` sees the method,
    /// URI, headers and extensions, and returns `true` for a request that may be turned away;
    /// the others reach the inner service whatever the memory use, for example health checks
    /// or requests that free memory. Called only while shedding, so it costs nothing
    /// otherwise; it must not block. Shedding itself is switched on by
    /// [`shed_requests`](Self::shed_requests).
    ///
    /// ```
    /// use tower_jemalloc::JemallocLayer;
    ///
    /// let layer = JemallocLayer::builder()
    ///     .memory_limit("2GiB".parse()?)
    ///     .shed_requests(true)
    ///     .shed_when(|request| request.uri.path() != "/healthz")
    ///     .build()?;
    /// # drop(layer);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn shed_when<F>(mut self, shed: F) -> Self
    where
        F: Fn(&http::request::Parts) -> bool + Send + Sync + 'static,
    {
        self.shed_when = Some(Arc::new(shed));
        self
    }

    /// Whether to count the bytes each forwarded request allocates, by route (default
    /// `false`): the histogram `http.server.request.allocated` and the up-down counter
    /// `http.server.request.kept` (bytes allocated and not freed), exported as
    /// `http_server_request_allocated_bytes_{bucket,sum,count}` and
    /// `http_server_request_kept_bytes`, with OpenTelemetry's HTTP attributes
    /// `http.request.method`, `http.route` and `http.response.status_code`.
    ///
    /// The layer reads the polling thread's totals of bytes allocated and freed (jemalloc's
    /// `thread.allocatedp`, two plain loads) before and after every poll of the request's
    /// future and response body, so a request that moves between worker threads is counted
    /// whole and nothing is paid per allocation; the request is recorded when its response
    /// body is dropped. Work a handler moves to another thread or task counts only through
    /// the request's [`RequestAccount`](crate::RequestAccount)
    /// ([`RequestAccount::current`](crate::RequestAccount::current) in the handler). Each request's `http.route` comes from [`RouteLayer`](crate::RouteLayer)
    /// inside the application's router (axum), from [`route_from`](Self::route_from), or is
    /// [`UNMATCHED_ROUTE`](crate::UNMATCHED_ROUTE). The stats endpoint's hints and
    /// [`top_routes`](crate::JemallocLayer::top_routes) name the routes that allocate most.
    ///
    /// Needs jemalloc as the global allocator: without it (or without the `jemalloc`
    /// feature) nothing is counted and a warning is logged once at build.
    ///
    /// ```
    /// let layer = tower_jemalloc::JemallocLayer::builder()
    ///     .per_route_allocation(true)
    ///     .build()?;
    /// # drop(layer);
    /// # Ok::<(), tower_jemalloc::BuildError>(())
    /// ```
    pub fn per_route_allocation(mut self, enabled: bool) -> Self {
        self.per_route_allocation = enabled;
        self
    }

    /// Names each forwarded request's `http.route` from its head, when the application's
    /// router cannot ([`RouteLayer`](crate::RouteLayer) does it from inside an axum router):
    /// [`grpc_method`](crate::grpc_method) for tonic, or a function of your own returning a
    /// route template (`None`: [`UNMATCHED_ROUTE`](crate::UNMATCHED_ROUTE)). A route named
    /// here is recorded as unmatched when the answer is a 404 or a gRPC `Unimplemented`, so
    /// that requests for paths the application does not serve share one value; a route set
    /// by [`RouteLayer`](crate::RouteLayer) takes precedence. Called once per request, on
    /// the request's path: it must be quick and must not block.
    pub fn route_from<F>(mut self, route: F) -> Self
    where
        F: for<'a> Fn(&'a http::request::Parts) -> Option<&'a str> + Send + Sync + 'static,
    {
        self.route_from = Some(Arc::new(route));
        self
    }

    /// The most distinct `http.route` values recorded (default
    /// [`DEFAULT_MAX_ROUTES`](crate::DEFAULT_MAX_ROUTES), 100); routes first seen past it are
    /// recorded as [`OTHER_ROUTE`](crate::OTHER_ROUTE). With the method and status, the
    /// series stay bounded: at most `(max_routes + 2)` routes × 10 methods × the statuses
    /// the application answers.
    pub fn max_routes(mut self, max_routes: usize) -> Self {
        self.max_routes = max_routes;
        self
    }

    /// Checks the configuration and builds the layer.
    ///
    /// When jemalloc's statistics cannot be read in this process (it is not the global
    /// allocator, or not compiled in), the layer is still built: the gauges are left out (a
    /// warning is logged once) and the purge and stats endpoints answer 503 (501 without
    /// jemalloc).
    ///
    /// # Errors
    ///
    /// A [`BuildError`] naming the bad setting: a path that is not an absolute path, two
    /// endpoints on the same path, an invalid namespace, a namespace given with your own
    /// registry, the exporter failing to register, a token that cannot be sent in a header,
    /// a scrape limit of zero, a job deadline of zero, a memory limit under 1 MiB, or a memory
    /// limit given as a percentage when no limit can be detected to take it of.
    pub fn build(self) -> Result<JemallocLayer, BuildError> {
        if self.settings.max_concurrent_scrapes == 0 {
            return Err(BuildError::ZeroScrapeLimit);
        }
        if self.settings.job_deadline.is_zero() {
            return Err(BuildError::ZeroJobDeadline);
        }
        let mut paths: Vec<(Endpoint, Box<str>, Access)> = Vec::new();
        for (endpoint, config) in &self.endpoints {
            let Some(path) = &config.path else { continue };
            let path = validate_path(path)?;
            if paths.iter().any(|(_, other, _)| *other == path) {
                return Err(BuildError::SamePath(path.into()));
            }
            // An endpoint without rules of its own follows the rules of the one it names.
            let rules = match endpoint.access_from() {
                Some(from) if !config.has_rules() => self.config(from),
                _ => config,
            };
            let mut access = if rules.has_rules() || endpoint.open_by_default() {
                access(*endpoint, rules)?
            } else {
                Access::closed(format!(
                    "{path} is closed until it has an access rule: set one with the layer \
                     builder's bearer_token(Endpoint::{endpoint:?}, ..), \
                     authorize(Endpoint::{endpoint:?}, ..) or allow_anonymous(Endpoint::{endpoint:?})"
                ))
            };
            // No website may make a browser change anything (only the debug endpoints take
            // state-changing methods), and anonymous debug endpoints answer only requests
            // addressed to an IP or localhost: see `endpoint::access`.
            access.refuse_cross_origin_writes();
            if !endpoint.open_by_default() && rules.is_anonymous() {
                access.require_local_host();
            }
            paths.push((*endpoint, path, access));
        }
        if let Some(namespace) = &self.namespace {
            validate_namespace(namespace)?;
        }

        let (registry, meter, provider) = match (self.registry, self.namespace) {
            (Some(_), Some(namespace)) => return Err(BuildError::NamespaceWithRegistry(namespace)),
            (Some((registry, meter)), None) => (registry, meter, None),
            (None, namespace) => {
                let registry = prometheus::Registry::new();
                let mut exporter =
                    opentelemetry_prometheus::exporter().with_registry(registry.clone());
                if let Some(namespace) = namespace {
                    exporter = exporter.with_namespace(namespace);
                }
                let exporter = exporter.build().map_err(BuildError::Exporter)?;
                let provider = SdkMeterProvider::builder().with_reader(exporter).build();
                let meter = provider.meter_with_scope(
                    opentelemetry::InstrumentationScope::builder(SCOPE_NAME)
                        .with_version(env!("CARGO_PKG_VERSION"))
                        .build(),
                );
                (registry, meter, Some(provider))
            }
        };
        // Without jemalloc the gauges are left out; `ctl` has logged why, once.
        let options = InstrumentOptions::new().per_arena(self.settings.per_arena_metrics);
        let _ = register_instruments_with(&meter, options);

        let zero_histograms: Vec<_> = paths
            .iter()
            .flat_map(|(endpoint, ..)| endpoint.zero_histograms().iter().copied())
            .collect();
        let limit = self
            .memory_limit
            .map(Governor::resolve)
            .transpose()
            .map_err(BuildError::MemoryLimit)?;
        let governor = Governor::process();
        let jobs = JobTelemetry::new(&meter);
        // Counted only where jemalloc's thread counters mean something: `ctl` has logged why
        // not, once; this says what it means here.
        let accounting = match (self.per_route_allocation, crate::jemalloc::ctl::ctl()) {
            (true, Ok(_)) => Some(Accounting {
                ledger: Ledger::new(&meter, self.max_routes),
                route_from: self.route_from,
            }),
            (true, Err(e)) => {
                tracing::warn!("tower-jemalloc: {e}; bytes per route are not counted");
                None
            }
            (false, _) => None,
        };
        let served: Vec<(Endpoint, Box<str>)> = paths
            .iter()
            .map(|(endpoint, path, _)| (*endpoint, path.clone()))
            .collect();
        let layer = JemallocLayer::new_cyclic(|shared| {
            // The handlers and the telemetry reach the layer's shedding switch through its
            // shared state, weakly: the shared state holds them.
            let holder: Weak<dyn HoldsShedding> = shared.clone();
            let shedding = governor.shedding(Weak::clone(&holder), self.shed_requests);
            if accounting.is_some() {
                shedding.account_requests();
            }
            // Like the jemalloc gauges, left out when jemalloc is not usable here.
            if crate::jemalloc::ctl::ctl().is_ok() {
                crate::telemetry::governor::register(&meter, &governor, &holder);
            }
            let context = Context {
                registry: &registry,
                meter: &meter,
                settings: &self.settings,
                zero_histograms: &zero_histograms,
                jobs: &jobs,
                governor: &governor,
                shedding: &holder,
                ledger: accounting.as_ref().map(|a| &a.ledger),
                paths: &served,
            };
            let routes = paths
                .into_iter()
                .map(|(endpoint, path, access)| Route::new(endpoint, path, access, &context))
                .collect();
            Shared {
                routes: Routes::new(routes),
                registry,
                provider,
                shedding,
                guard: Guard {
                    governor: Arc::clone(&governor),
                    shed_when: self.shed_when,
                },
                accounting,
            }
        });
        if let Some(limit) = limit {
            governor
                .apply_limit(Some(limit))
                .map_err(BuildError::MemoryLimit)?;
        }
        Ok(layer)
    }

    fn config(&self, endpoint: Endpoint) -> &EndpointConfig {
        &self.endpoints[position(endpoint)].1
    }
}

/// Where `endpoint` is in [`Endpoint::ALL`], and so in the builder's list of configurations.
fn position(endpoint: Endpoint) -> usize {
    Endpoint::ALL
        .iter()
        .position(|e| *e == endpoint)
        .expect("every endpoint is in Endpoint::ALL")
}

/// The access rules of `endpoint` from `config`, its token checked.
fn access(endpoint: Endpoint, config: &EndpointConfig) -> Result<Access, BuildError> {
    let mut access = Access::default();
    if let Some(token) = &config.token {
        validate_token(token).map_err(|reason| BuildError::InvalidToken { endpoint, reason })?;
        access.set_token(token.clone());
    }
    if let Some(predicate) = &config.predicate {
        access.set_predicate(Arc::clone(predicate));
    }
    Ok(access)
}

fn validate_path(path: &str) -> Result<Box<str>, BuildError> {
    let reason = if !path.starts_with('/') {
        Some("must start with '/'")
    } else if path.contains(['?', '#']) {
        Some("must not contain a query ('?') or fragment ('#')")
    } else if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("must not contain whitespace or control characters")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(BuildError::InvalidPath {
            path: path.to_owned(),
            reason,
        }),
        None => Ok(path.into()),
    }
}

/// A Prometheus metric name prefix: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn validate_namespace(namespace: &str) -> Result<(), BuildError> {
    let mut chars = namespace.chars();
    let valid_first = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    if valid_first && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        Ok(())
    } else {
        Err(BuildError::InvalidNamespace(namespace.to_owned()))
    }
}

/// Why [`JemallocLayerBuilder::build`] refused a configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A path is not an absolute URI path.
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two endpoints have the same path.
    #[error("two endpoints have the same path {0:?}")]
    SamePath(String),
    /// The namespace is not a valid Prometheus name prefix (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
    #[error("invalid namespace {0:?}: must match [a-zA-Z_:][a-zA-Z0-9_:]*")]
    InvalidNamespace(String),
    /// A namespace was given together with your own registry; set it on your exporter instead.
    #[error("namespace {0:?} given with your own registry: set it on your exporter instead")]
    NamespaceWithRegistry(String),
    /// The OpenTelemetry Prometheus exporter could not be built; the exporter's error is the
    /// [`source`](std::error::Error::source).
    #[error("cannot build the Prometheus exporter")]
    Exporter(#[source] opentelemetry_sdk::error::OTelSdkError),
    /// A bearer token cannot be sent in an `Authorization` header.
    #[error("invalid {endpoint} bearer token: {reason}")]
    InvalidToken {
        /// The endpoint it was given for.
        endpoint: Endpoint,
        /// What is wrong with it (the token itself is never included).
        reason: &'static str,
    },
    /// [`max_concurrent_scrapes`](JemallocLayerBuilder::max_concurrent_scrapes) is zero, which
    /// would refuse every scrape; switch the endpoint off with
    /// [`without`](JemallocLayerBuilder::without)`(Endpoint::Metrics)` instead.
    #[error(
        "max_concurrent_scrapes is 0, which refuses every scrape; use without(Endpoint::Metrics)"
    )]
    ZeroScrapeLimit,
    /// [`job_deadline`](JemallocLayerBuilder::job_deadline) is zero, which would answer 503
    /// to every request that has to wait for its job.
    #[error("job_deadline is 0, which answers 503 to every request that waits for its job")]
    ZeroJobDeadline,
    /// The [`memory_limit`](JemallocLayerBuilder::memory_limit) cannot be set: a percentage
    /// with no limit detected to take it of, or the governor thread could not start.
    #[error("cannot set the memory limit: {0}")]
    MemoryLimit(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(builder: JemallocLayerBuilder) -> BuildError {
        builder.build().expect_err("refused")
    }

    #[test]
    fn rejects_bad_configuration() {
        let err = refused(JemallocLayer::builder().path(Endpoint::Metrics, "metrics"));
        assert!(matches!(err, BuildError::InvalidPath { .. }), "{err:?}");
        let err = refused(JemallocLayer::builder().path(Endpoint::Purge, "/a?b"));
        assert!(matches!(err, BuildError::InvalidPath { .. }), "{err:?}");
        let err = refused(
            JemallocLayer::builder()
                .path(Endpoint::Metrics, "/x")
                .path(Endpoint::Purge, "/x"),
        );
        assert!(
            matches!(err, BuildError::SamePath(ref p) if p == "/x"),
            "{err:?}"
        );
        let err = refused(JemallocLayer::builder().path(Endpoint::Stats, "/debug/jemalloc/purge"));
        assert!(
            matches!(err, BuildError::SamePath(ref p) if p == "/debug/jemalloc/purge"),
            "{err:?}"
        );
        let err = refused(JemallocLayer::builder().namespace("1abc"));
        assert!(
            matches!(err, BuildError::InvalidNamespace(ref n) if n == "1abc"),
            "{err:?}"
        );
        let err = refused(JemallocLayer::builder().namespace(""));
        assert!(
            matches!(err, BuildError::InvalidNamespace(ref n) if n.is_empty()),
            "{err:?}"
        );

        let provider = SdkMeterProvider::builder().build();
        let err = refused(
            JemallocLayer::builder()
                .namespace("x")
                .registry(prometheus::Registry::new(), provider.meter("m")),
        );
        assert!(
            matches!(err, BuildError::NamespaceWithRegistry(ref n) if n == "x"),
            "{err:?}"
        );

        let err = refused(JemallocLayer::builder().bearer_token(Endpoint::Purge, "a b"));
        assert!(
            matches!(
                err,
                BuildError::InvalidToken {
                    endpoint: Endpoint::Purge,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "invalid purge bearer token: may only contain A-Z a-z 0-9 - . _ ~ + / ="
        );
        let err = refused(JemallocLayer::builder().bearer_token(Endpoint::Metrics, ""));
        assert!(
            matches!(
                err,
                BuildError::InvalidToken {
                    endpoint: Endpoint::Metrics,
                    ..
                }
            ),
            "{err:?}"
        );
        let err = refused(JemallocLayer::builder().max_concurrent_scrapes(0));
        assert!(matches!(err, BuildError::ZeroScrapeLimit), "{err:?}");
        let err = refused(JemallocLayer::builder().job_deadline(Duration::ZERO));
        assert!(matches!(err, BuildError::ZeroJobDeadline), "{err:?}");
        let err = refused(JemallocLayer::builder().memory_limit(MemoryLimit::Bytes(4096)));
        assert_eq!(
            err.to_string(),
            "cannot set the memory limit: memory limit of 4096 bytes is below the smallest, 1MiB"
        );
    }

    #[test]
    fn debug_never_prints_tokens() {
        let builder = JemallocLayer::builder()
            .bearer_token(Endpoint::Purge, "hunter2")
            .bearer_token(Endpoint::Metrics, "swordfish");
        let printed = format!("{builder:?}");
        assert!(!printed.contains("hunter2") && !printed.contains("swordfish"));
        let layer = builder.build().unwrap();
        let printed = format!("{layer:?}");
        assert!(!printed.contains("hunter2") && !printed.contains("swordfish"));
    }

    #[test]
    fn every_endpoint_can_be_moved_or_switched_off() {
        let layer = Endpoint::ALL
            .iter()
            .fold(JemallocLayer::builder(), |builder, &endpoint| {
                builder.without(endpoint)
            })
            .build()
            .unwrap();
        for &endpoint in Endpoint::ALL {
            assert_eq!(layer.path(endpoint), None, "{endpoint}");
        }
        let layer = JemallocLayer::builder()
            .path(Endpoint::Stats, "/stats")
            .build()
            .unwrap();
        assert_eq!(layer.path(Endpoint::Stats), Some("/stats"));
        assert_eq!(layer.path(Endpoint::Metrics), Some("/metrics"));
    }

    #[test]
    fn stats_follows_purge_rules_unless_it_has_its_own() {
        let parts = |auth: Option<&str>| {
            let mut request = http::Request::get("/");
            if let Some(auth) = auth {
                request = request.header("authorization", auth);
            }
            request.body(()).unwrap().into_parts().0
        };
        let builder = JemallocLayer::builder().bearer_token(Endpoint::Purge, "p");
        let inherited = access(Endpoint::Stats, builder.config(Endpoint::Purge)).unwrap();
        assert!(inherited.refusal(&parts(None)).is_some());
        assert!(inherited.refusal(&parts(Some("Bearer p"))).is_none());
        let layer = builder.build().unwrap();
        let printed = format!("{layer:?}");
        // Purge's token, and the copies stats, config, heap, profiling and page inherit.
        assert_eq!(printed.matches("<redacted>").count(), 6, "{printed}");
    }
}
