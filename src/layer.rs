//! [`JemallocLayer`]: the tower [`Layer`](https://docs.rs/tower/0.5/tower/trait.Layer.html)
//! that puts the endpoints in front of a service.
//!
//! Its constructors ([`JemallocLayer::new`], [`JemallocLayer::builder`]) live in the builder's
//! file, beside the configuration they check.

use crate::endpoint::Endpoint;
use crate::governor::Pressure;
use crate::service::{JemallocService, Shared};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use std::fmt;
use std::sync::{Arc, Weak};
use tower::Layer;

/// A tower [`Layer`](https://docs.rs/tower/0.5/tower/trait.Layer.html) that answers its own
/// paths itself (`GET /metrics`, and the debug endpoints: purge, stats, config, and with the
/// `profiling` feature the heap profile and the profiler's control; see [`Endpoint`]) and
/// forwards every other request to the service it wraps, untouched.
///
/// Made by [`JemallocLayer::new`] (the defaults) or [`JemallocLayer::builder`]. Cloning is
/// cheap: the routes, registry and meter provider live behind one `Arc`, shared with every
/// service the layer makes (so `/metrics` keeps working after the layer is dropped).
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

impl JemallocLayer {
    /// A layer around the shared state `build` makes, given a weak pointer to it.
    pub(crate) fn new_cyclic(build: impl FnOnce(&Weak<Shared>) -> Shared) -> Self {
        Self {
            shared: Arc::new_cyclic(build),
        }
    }

    /// The `n` routes whose requests allocated the most since the layer was built (per method,
    /// over every status), with what they kept; empty unless the layer counts bytes per route
    /// ([`per_route_allocation`](crate::JemallocLayerBuilder::per_route_allocation)).
    pub fn top_routes(&self, n: usize) -> Vec<crate::RouteFigures> {
        self.shared
            .accounting
            .as_ref()
            .map(|accounting| accounting.ledger.top_routes(n))
            .unwrap_or_default()
    }

    /// The memory pressure as the governor judges it, to react to: [`Pressure::Ok`] under
    /// the high-water mark (90 % of the limit), [`Pressure::Near`] above it while the
    /// governor gives cached pages back, [`Pressure::Over`] above the limit after giving back
    /// what it could. `Ok` for ever while no limit is set (see
    /// [`memory_limit`](crate::JemallocLayerBuilder::memory_limit)). There is one governor
    /// per process: every layer's receiver sees the same state. A change is published at the
    /// governor's poll that sees it (every 100 ms far from the limit, every 2 ms near it).
    ///
    /// The receiver's `changed()` ends with an error once the last layer is dropped and the
    /// governor stops; `borrow()` still gives the last state.
    ///
    /// # Example: drop a cache near the limit
    ///
    /// ```
    /// use std::collections::HashMap;
    /// use std::sync::{Arc, Mutex};
    /// use tower_jemalloc::{JemallocLayer, Pressure};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let cache: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
    /// let layer = JemallocLayer::builder().memory_limit("2GiB".parse()?).build()?;
    ///
    /// let mut pressure = layer.memory_pressure();
    /// let cached = Arc::clone(&cache);
    /// tokio::spawn(async move {
    ///     while pressure.changed().await.is_ok() {
    ///         let now = *pressure.borrow_and_update();
    ///         if now != Pressure::Ok {
    ///             // Memory the governor cannot give back: the application's own.
    ///             cached.lock().unwrap().clear();
    ///         }
    ///     }
    /// });
    /// # Ok(())
    /// # }
    /// ```
    pub fn memory_pressure(&self) -> tokio::sync::watch::Receiver<Pressure> {
        self.shared.guard.governor.subscribe()
    }

    /// The Prometheus registry `/metrics` serves.
    pub fn registry(&self) -> &prometheus::Registry {
        &self.shared.registry
    }

    /// The meter provider the layer created, so the application can record its own metrics
    /// and have them served on `/metrics` too. `None` when the registry was brought with
    /// [`JemallocLayerBuilder::registry`](crate::JemallocLayerBuilder::registry).
    ///
    /// ```
    /// use tower_jemalloc::opentelemetry::metrics::MeterProvider;
    ///
    /// let layer = tower_jemalloc::JemallocLayer::builder().namespace("shop").build()?;
    /// let meter = layer.meter_provider().expect("the layer made it").meter("my-app");
    /// meter.u64_counter("orders").build().add(1, &[]); // served as shop_orders_total
    /// # Ok::<(), tower_jemalloc::BuildError>(())
    /// ```
    pub fn meter_provider(&self) -> Option<&SdkMeterProvider> {
        self.shared.provider.as_ref()
    }

    /// The path `endpoint` answers, or `None` when it is switched off.
    pub fn path(&self, endpoint: Endpoint) -> Option<&str> {
        self.shared.routes.path(endpoint)
    }
}

impl fmt::Debug for JemallocLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JemallocLayer")
            .field("routes", &self.shared.routes)
            .field("owns_provider", &self.shared.provider.is_some())
            .finish()
    }
}

impl<S> Layer<S> for JemallocLayer {
    type Service = JemallocService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        JemallocService::new(inner, Arc::clone(&self.shared))
    }
}
