//! [`JemallocService`]: the service [`JemallocLayer`](crate::JemallocLayer) produces.

use crate::accounting::account::{Recorder, Tally};
use crate::accounting::Accounting;
use crate::endpoint::{
    discard, shed_answer, Endpoint, Predicate, Reply, Routes, MAX_DISCARDED_BODY,
};
use crate::future::ResponseFuture;
use crate::governor::{Governor, HoldsShedding, Shedding};
use crate::jemalloc::thread::ThreadTotals;
use http::{Request, Response};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use std::fmt;
use std::future::Future;
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
/// # Readiness: monitoring never waits on the application
///
/// The layer's own endpoints answer whatever the inner service is doing: `poll_ready` asks the
/// inner service, but answers ready even when it is not (a `ConcurrencyLimit` at its limit, a
/// load shedder, a saturated pool), so that `/metrics` is served exactly when the application
/// is busiest. Forwarded requests still keep the tower contract with the inner service:
///
/// - when the inner service said it was ready, the request is passed to its `call` at once
///   (the fast path: no allocation, no clone);
/// - otherwise the service takes a clone of the inner service, and the response future first
///   waits for that clone's `poll_ready`, then calls it (one boxed future per such request).
///
/// This is why the inner service must be `Clone + Send + 'static`, as axum's `Router`,
/// tonic's routes, tower's `service_fn` and every tower middleware around such services are.
/// The backpressure the inner service applies then shows as forwarded requests waiting for
/// their answer rather than as the connection not being read: HTTP/2 still bounds them by its
/// concurrent streams per connection, HTTP/1.1 by one request per connection, the same as
/// behind axum's `Router`, which also answers ready and waits per route.
///
/// Named `JemallocService` rather than tower-http's usual `Jemalloc<S>` so that it does not
/// clash with the allocator type `tikv_jemallocator::Jemalloc` that the same files import.
pub struct JemallocService<S> {
    inner: S,
    shared: Arc<Shared>,
    /// The inner service answered ready to the last `poll_ready` and was not called since.
    inner_ready: bool,
}

impl<S: Clone> Clone for JemallocService<S> {
    /// A clone of the inner service has not been polled ready, whatever `self`'s state.
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
            inner_ready: false,
        }
    }
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
    /// This layer's shedding switch, inline: a forwarded request reads its flag with one load
    /// from the pointer to this struct, which it has already loaded to match the path.
    pub(crate) shedding: Shedding,
    pub(crate) guard: Guard,
    /// Bytes per request, when the layer counts them (its shedding switch's detour flag is
    /// then set, so that forwarded requests come this way).
    pub(crate) accounting: Option<Accounting>,
}

impl HoldsShedding for Shared {
    fn shedding(&self) -> &Shedding {
        &self.shedding
    }
}

/// The layer's part in the memory governor: its hold on the process's governor (which stops
/// when the last one goes), and which requests may be shed.
pub(crate) struct Guard {
    pub(crate) governor: Arc<Governor>,
    pub(crate) shed_when: Option<Predicate>,
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("shed_when", &self.shed_when.as_ref().map(|_| "<fn>"))
            .finish()
    }
}

impl<S> JemallocService<S> {
    /// Wraps `inner`; made by [`JemallocLayer`](crate::JemallocLayer), which is the way to
    /// configure and build one (`layer.layer(inner)`).
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self {
            inner,
            shared,
            inner_ready: false,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably. Whatever readiness the inner service had reserved is
    /// asked for again before the next forwarded call.
    pub fn get_mut(&mut self) -> &mut S {
        self.inner_ready = false;
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> JemallocService<S> {
    /// A forwarded request while this layer sheds or counts bytes per request: the 503 when
    /// it sheds and `shed_when` does not spare the request, otherwise the forwarding, counted
    /// or not. Out of line, so that the direct path keeps only the flag's test.
    #[cold]
    #[inline(never)]
    fn call_detour<ReqBody, ResBody>(&mut self, req: Request<ReqBody>) -> ResponseFuture<S::Future>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        ReqBody: Send + 'static,
    {
        let (parts, body) = req.into_parts();
        if self.shared.shedding.active() {
            let shed = match &self.shared.guard.shed_when {
                Some(shed_when) => shed_when(&parts),
                None => true,
            };
            if shed && !self.shared.shedding.try_admit() {
                self.shared.shedding.count();
                let status = self.shared.guard.governor.status();
                return ResponseFuture::reply(Reply::Now(shed_answer(status)));
            }
        }
        let Some(accounting) = &self.shared.accounting else {
            let req = Request::from_parts(parts, body);
            if std::mem::take(&mut self.inner_ready) {
                return ResponseFuture::inner(self.inner.call(req));
            }
            return ResponseFuture::waiting(self.wait_for_inner(req));
        };
        let (account, method, route) = accounting.open(&parts);
        // From here on the request's bytes count: what the inner service's `call` does. The
        // account itself is freed after the request is recorded, and the box below when the
        // server drops the future: neither counts.
        let req = Request::from_parts(parts, body);
        let mut tally = Tally::default();
        if std::mem::take(&mut self.inner_ready) {
            let entered = account.enter();
            let before = ThreadTotals::now();
            let future = self.inner.call(req);
            tally.add_since(before);
            drop(entered);
            let recorder = Recorder::new(account, method, route, tally);
            return ResponseFuture::accounted(future, recorder);
        }
        let recorder = Recorder::new(account, method, route, tally);
        ResponseFuture::accounted(self.inner_when_ready(req), recorder)
    }

    /// The answer to a forwarded request that arrived while the inner service was not ready:
    /// the inner service (whatever readiness it is acquiring goes with it) waits in the
    /// response future, and a clone takes its place for the requests after this one.
    #[cold]
    #[inline(never)]
    fn wait_for_inner<ReqBody>(
        &mut self,
        req: Request<ReqBody>,
    ) -> crate::future::Waiting<Result<S::Response, S::Error>>
    where
        S: Service<Request<ReqBody>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        ReqBody: Send + 'static,
    {
        Box::pin(self.inner_when_ready(req))
    }

    /// [`wait_for_inner`](Self::wait_for_inner)'s future, unboxed: a counted request boxes
    /// it with its recorder.
    fn inner_when_ready<ReqBody>(
        &mut self,
        req: Request<ReqBody>,
    ) -> impl Future<Output = Result<S::Response, S::Error>> + Send + 'static
    where
        S: Service<Request<ReqBody>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        ReqBody: Send + 'static,
    {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        async move {
            std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
            inner.call(req).await
        }
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
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: http_body::Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<crate::ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    /// Ready whenever the layer can answer its own paths, which is always, unless the inner
    /// service failed: see [Readiness](JemallocService#readiness-monitoring-never-waits-on-the-application).
    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if !self.inner_ready {
            match self.inner.poll_ready(cx) {
                Poll::Ready(Ok(())) => self.inner_ready = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // Not ready: the layer's own paths are answered all the same, and a forwarded
                // request waits for a clone of the inner service in its response future.
                Poll::Pending => {}
            }
        }
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let Some(index) = self.shared.routes.find(req.uri().path()) else {
            // One load and a branch while not shedding and not counting bytes: the flags sit
            // in the shared state this call has already loaded, the governor sets one only
            // while this layer sheds and the process is over its limit, and the builder the
            // other. Everything else is out of line.
            if self.shared.shedding.detour() {
                return self.call_detour(req);
            }
            if std::mem::take(&mut self.inner_ready) {
                return ResponseFuture::inner(self.inner.call(req));
            }
            return ResponseFuture::waiting(self.wait_for_inner(req));
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
