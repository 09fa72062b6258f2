//! [`JemallocService`]: the service [`JemallocLayer`](crate::JemallocLayer) produces.

use crate::endpoint::{Endpoint, Routes};
use crate::future::ResponseFuture;
use http::{Request, Response};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::Service;

/// Answers the layer's paths (`/metrics`, the purge and stats paths) itself and forwards
/// every other request to `inner`.
///
/// Paths match exactly (`/metrics/` and `/Metrics` are forwarded); the query string is ignored
/// for matching. A forwarded request reaches the inner service unchanged (method, URI, headers,
/// extensions, body) and its response comes back unchanged, inside
/// [`ResponseBody`](crate::ResponseBody). The body of an intercepted request is never read.
///
/// Named `JemallocService` rather than tower-http's usual `Jemalloc<S>` so that it does not
/// clash with the allocator type `tikv_jemallocator::Jemalloc` that the same files import.
#[derive(Clone)]
pub struct JemallocService<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// What a layer and every service it made share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) routes: Routes,
    pub(crate) registry: prometheus::Registry,
    /// The provider the layer created (zero-config); `None` when the user brought their own.
    /// Held here too because dropping the last handle of a provider shuts its readers down:
    /// `/metrics` must keep working after the layer itself is gone.
    pub(crate) provider: Option<SdkMeterProvider>,
}

impl<S> JemallocService<S> {
    /// Wraps `inner`; made by [`JemallocLayer`](crate::JemallocLayer), which is the way to
    /// configure and build one (`layer.layer(inner)`).
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
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
        let mut debug = f.debug_struct("JemallocService");
        debug.field("inner", &self.inner);
        for &endpoint in Endpoint::ALL {
            debug.field(endpoint.name(), &self.shared.routes.path(endpoint));
        }
        debug.finish()
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
        let Some(route) = self.shared.routes.find(req.uri().path()) else {
            return ResponseFuture::inner(self.inner.call(req));
        };
        // The body of an intercepted request is dropped unread.
        let (parts, _body) = req.into_parts();
        ResponseFuture::reply(route.respond(&parts))
    }
}
