//! [`JemallocService`]: the service [`JemallocLayer`](crate::JemallocLayer) produces.

use crate::endpoint::{discard, Endpoint, Reply, Routes, MAX_DISCARDED_BODY};
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
/// [`ResponseBody`](crate::ResponseBody).
///
/// No endpoint takes a request body. One sent anyway is read and dropped before the answer
/// (so that the connection is not reset under the answer), up to 1 MiB; a longer one gets a
/// 413 with `Connection: close`.
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
    ReqBody: http_body::Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
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
        let Some(index) = self.shared.routes.find(req.uri().path()) else {
            return ResponseFuture::inner(self.inner.call(req));
        };
        let (parts, body) = req.into_parts();
        if body.is_end_stream() {
            return ResponseFuture::reply(self.shared.routes.route(index).respond(&parts));
        }
        let shared = Arc::clone(&self.shared);
        ResponseFuture::reply(Reply::Later(Box::pin(async move {
            if let Err(refusal) = discard(body, MAX_DISCARDED_BODY).await {
                return refusal;
            }
            shared
                .routes
                .route(index)
                .respond(&parts)
                .into_answer()
                .await
        })))
    }
}
