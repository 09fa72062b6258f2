//! [`JemallocLayer`] and its builder.

use crate::access::{validate_token, Access};
use crate::purge::{PurgeEndpoint, PurgeTelemetry, DEFAULT_PURGE_COOLDOWN};
use crate::scrape::{MetricsEndpoint, Scrapes, DEFAULT_MAX_CONCURRENT_SCRAPES};
use crate::service::JemallocService;
use crate::stats_dump::{StatsEndpoint, DEFAULT_STATS_MAX_BYTES};
use opentelemetry::metrics::{Meter, MeterProvider};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tower::Layer;

/// The default path of the Prometheus endpoint.
pub const DEFAULT_METRICS_PATH: &str = "/metrics";
/// The default path of the purge endpoint.
pub const DEFAULT_PURGE_PATH: &str = "/debug/jemalloc/purge";
/// The default path of the stats endpoint.
pub const DEFAULT_STATS_PATH: &str = "/debug/jemalloc/stats";

/// The instrumentation scope the layer's own meter uses (`otel_scope_name` in Prometheus).
const SCOPE_NAME: &str = "tower-jemalloc";

/// A [`Layer`] that answers `GET /metrics` and `POST|PUT /debug/jemalloc/purge` itself and
/// forwards every other request to the service it wraps, untouched.
///
/// Cloning is cheap: the registry, meter provider and configuration live behind an `Arc`.
///
/// # Where to put it
///
/// Outermost, around the whole application (`layer.layer(router)` in axum,
/// `Server::builder().layer(..)` in tonic), so that its paths answer whatever the router does.
/// axum's `Router::layer` works too (axum 0.8 applies it to the fallback as well) but runs
/// after routing, so a nested router sees paths without its prefix; `route_layer` never sees
/// unmatched paths and does not work.
///
/// # Example
///
/// ```
/// use http::{Request, Response, StatusCode};
/// use http_body_util::Full;
/// use bytes::Bytes;
/// use tower::{service_fn, ServiceBuilder, ServiceExt, Service};
/// use tower_jemalloc::JemallocLayer;
///
/// #[global_allocator]
/// static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let layer = JemallocLayer::builder().namespace("restate").build()?;
/// let mut service = ServiceBuilder::new().layer(layer).service_fn(|_req: Request<Full<Bytes>>| async {
///     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("hello"))))
/// });
///
/// let request = Request::get("/metrics").body(Full::default())?;
/// let response = service.ready().await?.call(request).await?;
/// assert_eq!(response.status(), StatusCode::OK);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
#[must_use]
pub struct JemallocLayer {
    shared: Arc<Shared>,
}

/// What every [`JemallocService`] made by one layer shares.
pub(crate) struct Shared {
    pub(crate) metrics: Option<MetricsEndpoint>,
    pub(crate) purge: Option<PurgeEndpoint>,
    pub(crate) stats: Option<StatsEndpoint>,
    registry: prometheus::Registry,
    /// The provider the layer created (zero-config); `None` when the user brought their own.
    provider: Option<SdkMeterProvider>,
}

impl JemallocLayer {
    /// A layer with the defaults: its own Prometheus registry, exporter and meter provider, no
    /// namespace (`jemalloc_allocated_bytes`, …), `/metrics` and `/debug/jemalloc/purge`.
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

    /// A builder to choose the namespace, paths, or bring your own registry.
    pub fn builder() -> JemallocLayerBuilder {
        JemallocLayerBuilder::default()
    }

    /// The Prometheus registry `/metrics` serves.
    pub fn registry(&self) -> &prometheus::Registry {
        &self.shared.registry
    }

    /// The meter provider the layer created, so the application can record its own metrics
    /// and have them served on `/metrics` too. `None` when the registry was brought with
    /// [`JemallocLayerBuilder::registry`].
    pub fn meter_provider(&self) -> Option<&SdkMeterProvider> {
        self.shared.provider.as_ref()
    }
}

impl Default for JemallocLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for JemallocLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JemallocLayer")
            .field("metrics_path", &self.shared.metrics_path())
            .field("purge", &self.shared.purge)
            .field("stats", &self.shared.stats)
            .field("owns_provider", &self.shared.provider.is_some())
            .finish()
    }
}

impl Shared {
    pub(crate) fn metrics_path(&self) -> Option<&str> {
        self.metrics.as_ref().map(|m| &*m.path)
    }

    pub(crate) fn purge_path(&self) -> Option<&str> {
        self.purge.as_ref().map(|p| &*p.path)
    }

    pub(crate) fn stats_path(&self) -> Option<&str> {
        self.stats.as_ref().map(|p| &*p.path)
    }
}

impl<S> Layer<S> for JemallocLayer {
    type Service = JemallocService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        JemallocService::new(inner, Arc::clone(&self.shared))
    }
}

/// Builds a [`JemallocLayer`]. Made by [`JemallocLayer::builder`].
#[must_use]
pub struct JemallocLayerBuilder {
    namespace: Option<String>,
    metrics_path: Option<String>,
    purge_path: Option<String>,
    registry: Option<(prometheus::Registry, Meter)>,
    metrics_access: Access,
    metrics_token: Option<String>,
    purge_access: Access,
    purge_token: Option<String>,
    purge_cooldown: Duration,
    max_concurrent_scrapes: usize,
    scrape_reuse_window: Duration,
    gzip: bool,
    stats_path: Option<String>,
    stats_access: Option<Access>,
    stats_token: Option<String>,
    stats_max_bytes: usize,
}

impl Default for JemallocLayerBuilder {
    fn default() -> Self {
        Self {
            namespace: None,
            metrics_path: Some(DEFAULT_METRICS_PATH.to_owned()),
            purge_path: Some(DEFAULT_PURGE_PATH.to_owned()),
            registry: None,
            metrics_access: Access::default(),
            metrics_token: None,
            purge_access: Access::default(),
            purge_token: None,
            purge_cooldown: DEFAULT_PURGE_COOLDOWN,
            max_concurrent_scrapes: DEFAULT_MAX_CONCURRENT_SCRAPES,
            scrape_reuse_window: Duration::ZERO,
            gzip: true,
            stats_path: Some(DEFAULT_STATS_PATH.to_owned()),
            stats_access: None,
            stats_token: None,
            stats_max_bytes: DEFAULT_STATS_MAX_BYTES,
        }
    }
}

impl fmt::Debug for JemallocLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Tokens are never printed.
        f.debug_struct("JemallocLayerBuilder")
            .field("namespace", &self.namespace)
            .field("metrics_path", &self.metrics_path)
            .field("purge_path", &self.purge_path)
            .field("own_registry", &self.registry.is_some())
            .field("metrics_access", &self.metrics_access)
            .field(
                "metrics_token",
                &self.metrics_token.as_ref().map(|_| "<redacted>"),
            )
            .field("purge_access", &self.purge_access)
            .field(
                "purge_token",
                &self.purge_token.as_ref().map(|_| "<redacted>"),
            )
            .field("purge_cooldown", &self.purge_cooldown)
            .field("max_concurrent_scrapes", &self.max_concurrent_scrapes)
            .field("scrape_reuse_window", &self.scrape_reuse_window)
            .field("gzip", &self.gzip)
            .field("stats_path", &self.stats_path)
            .field("stats_access", &self.stats_access)
            .field(
                "stats_token",
                &self.stats_token.as_ref().map(|_| "<redacted>"),
            )
            .field("stats_max_bytes", &self.stats_max_bytes)
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

    /// Serves the Prometheus text exposition on `path` instead of `/metrics`.
    pub fn metrics_path(mut self, path: impl Into<String>) -> Self {
        self.metrics_path = Some(path.into());
        self
    }

    /// Does not intercept any metrics path: every such request is forwarded.
    pub fn without_metrics(mut self) -> Self {
        self.metrics_path = None;
        self
    }

    /// Serves the purge endpoint on `path` instead of `/debug/jemalloc/purge`.
    pub fn purge_path(mut self, path: impl Into<String>) -> Self {
        self.purge_path = Some(path.into());
        self
    }

    /// Does not intercept any purge path: every such request is forwarded.
    pub fn without_purge(mut self) -> Self {
        self.purge_path = None;
        self
    }

    /// Serves `registry` (already wired to your `opentelemetry-prometheus` exporter and meter
    /// provider) instead of creating one, and registers the jemalloc gauges on `meter`, a meter
    /// of that provider. Your application's own metrics then appear beside the gauges.
    ///
    /// ```
    /// use opentelemetry::metrics::MeterProvider;
    /// use opentelemetry_sdk::metrics::SdkMeterProvider;
    /// use tower_jemalloc::JemallocLayer;
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

    /// Requires `Authorization: Bearer <token>` on the purge endpoint. A missing or wrong
    /// token gets a 401 with `WWW-Authenticate: Bearer`. The comparison takes the same time
    /// wherever the presented token differs, so it cannot be guessed byte by byte.
    pub fn purge_bearer_token(mut self, token: impl Into<String>) -> Self {
        self.purge_token = Some(token.into());
        self
    }

    /// Lets a purge through only when `allow` returns `true` for the request; otherwise 403.
    /// `allow` sees the method, URI, headers and extensions (for example axum's
    /// `ConnectInfo<SocketAddr>`, or an mTLS identity your TLS layer inserted). It is checked
    /// after the bearer token, if both are set. It must not block.
    ///
    /// ```
    /// use std::net::SocketAddr;
    /// use axum::extract::ConnectInfo;
    ///
    /// let layer = tower_jemalloc::JemallocLayer::builder()
    ///     .purge_authorize(|request| {
    ///         request
    ///             .extensions
    ///             .get::<ConnectInfo<SocketAddr>>()
    ///             .is_some_and(|ConnectInfo(peer)| peer.ip().is_loopback())
    ///     })
    ///     .build()
    ///     .unwrap();
    /// # drop(layer);
    /// ```
    pub fn purge_authorize<F>(mut self, allow: F) -> Self
    where
        F: Fn(&http::request::Parts) -> bool + Send + Sync + 'static,
    {
        self.purge_access.set_predicate(Arc::new(allow));
        self
    }

    /// Requires `Authorization: Bearer <token>` on the metrics endpoint (Prometheus:
    /// `authorization: {credentials: …}` in the scrape config). Open by default.
    pub fn metrics_bearer_token(mut self, token: impl Into<String>) -> Self {
        self.metrics_token = Some(token.into());
        self
    }

    /// Lets a scrape through only when `allow` returns `true` for the request; otherwise 403.
    /// See [`purge_authorize`](Self::purge_authorize).
    pub fn metrics_authorize<F>(mut self, allow: F) -> Self
    where
        F: Fn(&http::request::Parts) -> bool + Send + Sync + 'static,
    {
        self.metrics_access.set_predicate(Arc::new(allow));
        self
    }

    /// The minimum time from the end of one purge to the start of the next (default 1 s);
    /// `Duration::ZERO` disables it. A purge asked for sooner gets a 429 with `Retry-After`
    /// in whole seconds, rounded up.
    pub fn purge_cooldown(mut self, cooldown: Duration) -> Self {
        self.purge_cooldown = cooldown;
        self
    }

    /// How many scrapes may be in flight at once (default 16); beyond that a scrape gets a 503
    /// with `Retry-After: 1`. Concurrent scrapes share one render, so this bounds waiting
    /// requests, not rendering work.
    pub fn max_concurrent_scrapes(mut self, limit: usize) -> Self {
        self.max_concurrent_scrapes = limit;
        self
    }

    /// Lets a render that finished less than `window` ago answer new scrapes too (default:
    /// zero, so a scrape joins the render in progress or starts one, never reusing one that
    /// had finished before it arrived). Scrapes in flight together
    /// always share one render; a window also merges scrapes that arrive one after another,
    /// bounding renders to about one per window under a scrape storm, at the price of data up
    /// to `window` old.
    pub fn scrape_reuse_window(mut self, window: Duration) -> Self {
        self.scrape_reuse_window = window;
        self
    }

    /// Whether `/metrics` is gzip-compressed for clients whose `Accept-Encoding` allows it
    /// (default `true`; Prometheus always asks for gzip).
    pub fn gzip(mut self, enabled: bool) -> Self {
        self.gzip = enabled;
        self
    }

    /// Serves jemalloc's statistics dump on `path` instead of `/debug/jemalloc/stats`.
    pub fn stats_path(mut self, path: impl Into<String>) -> Self {
        self.stats_path = Some(path.into());
        self
    }

    /// Does not intercept any stats path: every such request is forwarded.
    pub fn without_stats(mut self) -> Self {
        self.stats_path = None;
        self
    }

    /// Requires `Authorization: Bearer <token>` on the stats endpoint (401 otherwise).
    ///
    /// Unless a stats token or predicate is set, the stats endpoint is guarded exactly like the
    /// purge endpoint (both are debug endpoints that operators, not the public, use).
    pub fn stats_bearer_token(mut self, token: impl Into<String>) -> Self {
        self.stats_token = Some(token.into());
        self
    }

    /// Lets a stats request through only when `allow` returns `true`; otherwise 403. See
    /// [`purge_authorize`](Self::purge_authorize) and
    /// [`stats_bearer_token`](Self::stats_bearer_token).
    pub fn stats_authorize<F>(mut self, allow: F) -> Self
    where
        F: Fn(&http::request::Parts) -> bool + Send + Sync + 'static,
    {
        self.stats_access
            .get_or_insert_with(Access::default)
            .set_predicate(Arc::new(allow));
        self
    }

    /// The largest stats dump the endpoint answers with (default 4 MiB). A JSON dump over it
    /// is retried without per-arena details; a text dump is cut.
    pub fn stats_max_bytes(mut self, max_bytes: usize) -> Self {
        self.stats_max_bytes = max_bytes;
        self
    }

    /// Checks the configuration and builds the layer.
    ///
    /// When jemalloc's statistics cannot be read in this process (it is not the global
    /// allocator, or not compiled in), the layer is still built: the gauges are left out (a
    /// warning is logged once) and the purge endpoint answers 503 (501 without jemalloc).
    ///
    /// # Errors
    ///
    /// A [`BuildError`] naming the bad setting: a path that is not an absolute path, the two
    /// paths being equal, an invalid namespace, a namespace given with your own registry, or
    /// the exporter failing to register, a token that cannot be sent in a header, or a scrape
    /// limit of zero.
    pub fn build(mut self) -> Result<JemallocLayer, BuildError> {
        for (endpoint, token, access) in [
            (
                "metrics",
                self.metrics_token.take(),
                &mut self.metrics_access,
            ),
            ("purge", self.purge_token.take(), &mut self.purge_access),
        ] {
            if let Some(token) = token {
                validate_token(&token)
                    .map_err(|reason| BuildError::InvalidToken { endpoint, reason })?;
                access.set_token(token);
            }
        }
        // The stats endpoint is guarded like purge unless it has rules of its own.
        let mut stats_access = self.stats_access.take();
        if let Some(token) = self.stats_token.take() {
            validate_token(&token).map_err(|reason| BuildError::InvalidToken {
                endpoint: "stats",
                reason,
            })?;
            stats_access
                .get_or_insert_with(Access::default)
                .set_token(token);
        }
        let stats_access = stats_access.unwrap_or_else(|| self.purge_access.clone());
        if self.max_concurrent_scrapes == 0 {
            return Err(BuildError::ZeroScrapeLimit);
        }
        let metrics_path = self.metrics_path.map(validate_path).transpose()?;
        let purge_path = self.purge_path.map(validate_path).transpose()?;
        let stats_path = self.stats_path.map(validate_path).transpose()?;
        let paths = [&metrics_path, &purge_path, &stats_path];
        for (i, a) in paths.iter().enumerate() {
            if let Some(a) = a {
                if paths[i + 1..].iter().any(|b| b.as_ref() == Some(a)) {
                    return Err(BuildError::SamePath(a.to_string()));
                }
            }
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
                let exporter = exporter
                    .build()
                    .map_err(|e| BuildError::Exporter(e.to_string()))?;
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
        let _ = crate::metrics::register_instruments(&meter);

        let metrics = metrics_path.map(|path| MetricsEndpoint {
            path,
            access: self.metrics_access,
            scrapes: Arc::new(Scrapes::new(
                registry.clone(),
                self.gzip,
                self.max_concurrent_scrapes,
                self.scrape_reuse_window,
            )),
        });
        let purge = purge_path.map(|path| PurgeEndpoint {
            path,
            access: self.purge_access,
            cooldown: self.purge_cooldown,
            telemetry: PurgeTelemetry::new(&meter),
        });
        let stats = stats_path.map(|path| StatsEndpoint {
            path,
            access: stats_access,
            max_bytes: self.stats_max_bytes,
        });
        Ok(JemallocLayer {
            shared: Arc::new(Shared {
                metrics,
                purge,
                stats,
                registry,
                provider,
            }),
        })
    }
}

fn validate_path(path: String) -> Result<Box<str>, BuildError> {
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
        Some(reason) => Err(BuildError::InvalidPath { path, reason }),
        None => Ok(path.into_boxed_str()),
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
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BuildError {
    /// A path is not an absolute URI path.
    InvalidPath {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two endpoints (metrics, purge, stats) have the same path.
    SamePath(String),
    /// The namespace is not a valid Prometheus name prefix (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
    InvalidNamespace(String),
    /// A namespace was given together with your own registry; set it on your exporter instead.
    NamespaceWithRegistry(String),
    /// The OpenTelemetry Prometheus exporter could not be built.
    Exporter(String),
    /// A bearer token cannot be sent in an `Authorization` header.
    InvalidToken {
        /// `"metrics"`, `"purge"` or `"stats"`.
        endpoint: &'static str,
        /// What is wrong with it (the token itself is never included).
        reason: &'static str,
    },
    /// [`max_concurrent_scrapes`](JemallocLayerBuilder::max_concurrent_scrapes) is zero, which
    /// would refuse every scrape; use [`without_metrics`](JemallocLayerBuilder::without_metrics).
    ZeroScrapeLimit,
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidPath { path, reason } => write!(f, "invalid path {path:?}: {reason}"),
            Self::SamePath(path) => {
                write!(f, "two endpoints have the same path {path:?}")
            }
            Self::InvalidNamespace(ns) => write!(
                f,
                "invalid namespace {ns:?}: must match [a-zA-Z_:][a-zA-Z0-9_:]*"
            ),
            Self::NamespaceWithRegistry(ns) => write!(
                f,
                "namespace {ns:?} given with your own registry: set it on your exporter instead"
            ),
            Self::Exporter(e) => write!(f, "cannot build the Prometheus exporter: {e}"),
            Self::InvalidToken { endpoint, reason } => {
                write!(f, "invalid {endpoint} bearer token: {reason}")
            }
            Self::ZeroScrapeLimit => f.write_str(
                "max_concurrent_scrapes is 0, which refuses every scrape; use without_metrics()",
            ),
        }
    }
}

impl std::error::Error for BuildError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_configuration() {
        let err = JemallocLayer::builder().metrics_path("metrics").build();
        assert!(
            matches!(err, Err(BuildError::InvalidPath { .. })),
            "{err:?}"
        );
        let err = JemallocLayer::builder().purge_path("/a?b").build();
        assert!(
            matches!(err, Err(BuildError::InvalidPath { .. })),
            "{err:?}"
        );
        let err = JemallocLayer::builder()
            .metrics_path("/x")
            .purge_path("/x")
            .build();
        assert_eq!(err.unwrap_err(), BuildError::SamePath("/x".into()));
        let err = JemallocLayer::builder()
            .stats_path("/debug/jemalloc/purge")
            .build();
        assert_eq!(
            err.unwrap_err(),
            BuildError::SamePath("/debug/jemalloc/purge".into())
        );
        let err = JemallocLayer::builder().namespace("1abc").build();
        assert_eq!(
            err.unwrap_err(),
            BuildError::InvalidNamespace("1abc".into())
        );
        let err = JemallocLayer::builder().namespace("").build();
        assert_eq!(err.unwrap_err(), BuildError::InvalidNamespace("".into()));

        let provider = SdkMeterProvider::builder().build();
        let err = JemallocLayer::builder()
            .namespace("x")
            .registry(prometheus::Registry::new(), provider.meter("m"))
            .build();
        assert_eq!(
            err.unwrap_err(),
            BuildError::NamespaceWithRegistry("x".into())
        );

        let err = JemallocLayer::builder().purge_bearer_token("a b").build();
        assert!(
            matches!(
                err,
                Err(BuildError::InvalidToken {
                    endpoint: "purge",
                    ..
                })
            ),
            "{err:?}"
        );
        let err = JemallocLayer::builder().metrics_bearer_token("").build();
        assert!(
            matches!(
                err,
                Err(BuildError::InvalidToken {
                    endpoint: "metrics",
                    ..
                })
            ),
            "{err:?}"
        );
        let err = JemallocLayer::builder().max_concurrent_scrapes(0).build();
        assert_eq!(err.unwrap_err(), BuildError::ZeroScrapeLimit);
    }

    #[test]
    fn debug_never_prints_tokens() {
        let builder = JemallocLayer::builder()
            .purge_bearer_token("hunter2")
            .metrics_bearer_token("swordfish");
        let printed = format!("{builder:?}");
        assert!(!printed.contains("hunter2") && !printed.contains("swordfish"));
        let layer = builder.build().unwrap();
        let printed = format!("{layer:?}");
        assert!(!printed.contains("hunter2") && !printed.contains("swordfish"));
    }

    #[test]
    fn both_endpoints_can_be_switched_off() {
        let layer = JemallocLayer::builder()
            .without_metrics()
            .without_purge()
            .without_stats()
            .build()
            .unwrap();
        assert!(layer.shared.metrics_path().is_none());
        assert!(layer.shared.purge_path().is_none());
        assert!(layer.shared.stats_path().is_none());
    }
}
