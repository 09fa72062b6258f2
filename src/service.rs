//! [`JemallocService`]: the service [`JemallocLayer`](crate::JemallocLayer) produces.

use crate::future::ResponseFuture;
use crate::layer::Shared;
use crate::purge::PurgeEndpoint;
use crate::scrape::MetricsEndpoint;
use crate::stats_dump::StatsEndpoint;
use http::{Request, Response};
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::Service;

/// Answers the metrics and purge paths itself and forwards every other request to `inner`.
///
/// Paths match exactly (`/metrics/` and `/Metrics` are forwarded); the query string is ignored
/// for matching. A forwarded request reaches the inner service unchanged (method, URI, headers,
/// extensions, body) and its response comes back unchanged, inside
/// [`ResponseBody`](crate::ResponseBody).
///
/// Named `JemallocService` rather than tower-http's usual `Jemalloc<S>` so that it does not
/// clash with the allocator type `tikv_jemallocator::Jemalloc` that the same files import.
#[derive(Clone)]
pub struct JemallocService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> JemallocService<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }

    /// Wraps `inner` with a default [`JemallocLayer`](crate::JemallocLayer).
    ///
    /// # Panics
    ///
    /// See [`JemallocLayer::new`](crate::JemallocLayer::new).
    pub fn layer(inner: S) -> Self {
        tower::Layer::layer(&crate::JemallocLayer::new(), inner)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for JemallocService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JemallocService")
            .field("inner", &self.inner)
            .field("metrics_path", &self.shared.metrics_path())
            .field("purge_path", &self.shared.purge_path())
            .field("stats_path", &self.shared.stats_path())
            .finish()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for JemallocService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<crate::ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let shared = &*self.shared;
        let path = req.uri().path();
        let endpoint = if let Some(metrics) = shared.metrics.as_ref().filter(|m| *m.path == *path) {
            Endpoint::Metrics(metrics)
        } else if let Some(purge) = shared.purge.as_ref().filter(|p| *p.path == *path) {
            Endpoint::Purge(purge)
        } else if let Some(stats) = shared.stats.as_ref().filter(|s| *s.path == *path) {
            Endpoint::Stats(stats)
        } else {
            return ResponseFuture::inner(self.inner.call(req));
        };
        // The body of an intercepted request is dropped unread.
        let (parts, _body) = req.into_parts();
        match endpoint {
            Endpoint::Metrics(metrics) => metrics.respond(&parts),
            Endpoint::Purge(purge) => purge.respond(&parts),
            Endpoint::Stats(stats) => stats.respond(&parts),
        }
    }
}

/// The endpoint a request's path matched.
enum Endpoint<'a> {
    Metrics(&'a MetricsEndpoint),
    Purge(&'a PurgeEndpoint),
    Stats(&'a StatsEndpoint),
}
