//! Where a request's `http.route` comes from: [`RouteLayer`] inside the application's router,
//! or a function of the request the layer calls itself ([`grpc_method`], or the user's).

use super::account::RequestAccount;
use http::request::Parts;
use http::Request;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::{Layer, Service};

/// A function naming a request's route from its head, or `None` when it cannot.
pub(crate) type RouteFn = Arc<dyn for<'a> Fn(&'a Parts) -> Option<&'a str> + Send + Sync>;

/// The route function for a gRPC server (tonic): `http.route` is the gRPC method path
/// (`/package.Service/Method`), for requests with a gRPC content type.
///
/// A method the server does not serve answers `grpc-status: 12` (Unimplemented), and its
/// path is then recorded as [`UNMATCHED_ROUTE`](crate::UNMATCHED_ROUTE), so that unknown
/// methods cannot use up the cap on routes.
///
/// ```
/// let layer = tower_jemalloc::JemallocLayer::builder()
///     .per_route_allocation(true)
///     .route_from(tower_jemalloc::grpc_method)
///     .build()?;
/// # drop(layer);
/// # Ok::<(), tower_jemalloc::BuildError>(())
/// ```
pub fn grpc_method(parts: &Parts) -> Option<&str> {
    let content_type = parts.headers.get(http::header::CONTENT_TYPE)?.as_bytes();
    content_type
        .starts_with(b"application/grpc")
        .then(|| parts.uri.path())
}

/// Names each request's `http.route` from inside the application's router, where the matched
/// route is known: for axum, add it with `Router::route_layer` (which wraps only the routes
/// that matched) and read axum's `MatchedPath`:
///
/// ```
/// use axum::extract::MatchedPath;
/// use axum::routing::get;
/// use axum::Router;
/// use tower_jemalloc::RouteLayer;
///
/// let app: Router = Router::new()
///     .route("/users/{id}", get(|| async { "a user" }))
///     .route_layer(RouteLayer::new(|parts| {
///         parts.extensions.get::<MatchedPath>().map(MatchedPath::as_str)
///     }));
/// # drop(app);
/// ```
///
/// The route goes to the request's [`RequestAccount`], the thread's current one while the
/// outer [`JemallocLayer`](crate::JemallocLayer) calls and polls the request: without one
/// (the layer does not count bytes per route, or is not in front), this layer does nothing. A request that
/// matched no route is not seen here and is recorded as
/// [`UNMATCHED_ROUTE`](crate::UNMATCHED_ROUTE).
#[derive(Clone)]
pub struct RouteLayer {
    route: RouteFn,
}

impl RouteLayer {
    /// A layer that names each request's route with `route` (`None`: left as it is).
    pub fn new<F>(route: F) -> Self
    where
        F: for<'a> Fn(&'a Parts) -> Option<&'a str> + Send + Sync + 'static,
    {
        Self {
            route: Arc::new(route),
        }
    }
}

impl fmt::Debug for RouteLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteLayer").finish_non_exhaustive()
    }
}

impl<S> Layer<S> for RouteLayer {
    type Service = RouteService<S>;

    fn layer(&self, inner: S) -> RouteService<S> {
        RouteService {
            inner,
            route: Arc::clone(&self.route),
        }
    }
}

/// The service [`RouteLayer`] produces: names the request's route, then calls `inner`.
#[derive(Clone)]
pub struct RouteService<S> {
    inner: S,
    route: RouteFn,
}

impl<S: fmt::Debug> fmt::Debug for RouteService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, B> Service<Request<B>> for RouteService<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> S::Future {
        // The request's account is the thread's current one: the layer's call and polls enter
        // it, and a router calls the routes' services from them.
        let Some(account) = RequestAccount::current() else {
            return self.inner.call(req);
        };
        let (parts, body) = req.into_parts();
        if let Some(route) = (self.route)(&parts) {
            account.set_route(route);
        }
        self.inner.call(Request::from_parts(parts, body))
    }
}
