//! The service stack of the `service_builder` example, and the accept loop that serves it.
//! Shared with `tests/service_builder.rs`, which checks that each layer does what the comments
//! below say.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::Full;
use hyper::body::Incoming;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tower::{BoxError, Service, ServiceBuilder};
use tower_http::compression::CompressionLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{OnRequest, OnResponse, TraceLayer};
use tower_jemalloc::JemallocLayer;
use tracing::Span;

/// The text `GET /` answers; long enough for `CompressionLayer` to compress it (it leaves
/// bodies under 32 bytes alone).
pub const HELLO: &str =
    "tower-jemalloc ServiceBuilder example: try /metrics and /debug/jemalloc/purge\n";

/// How long `GET /slow` takes: longer than any sensible handler timeout.
pub const SLOW: Duration = Duration::from_secs(3600);

/// Where the access log goes: stdout in the example, a buffer in the tests.
#[derive(Clone)]
pub struct AccessLog(Arc<dyn Fn(String) + Send + Sync>);

impl AccessLog {
    pub fn new(write: impl Fn(String) + Send + Sync + 'static) -> Self {
        Self(Arc::new(write))
    }
}

impl<B> OnRequest<B> for AccessLog {
    fn on_request(&mut self, request: &Request<B>, _: &Span) {
        (self.0)(format!("{} {}", request.method(), request.uri().path()));
    }
}

impl<B> OnResponse<B> for AccessLog {
    fn on_response(self, response: &Response<B>, latency: Duration, _: &Span) {
        (self.0)(format!("  -> {} in {latency:.1?}", response.status()));
    }
}

/// The application's own handlers: `/` says hello, `/slow` takes an hour, the rest is a 404.
async fn handler(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match request.uri().path() {
        "/" => (StatusCode::OK, HELLO),
        "/slow" => {
            tokio::time::sleep(SLOW).await;
            (StatusCode::OK, "finally\n")
        }
        _ => (StatusCode::NOT_FOUND, "not found\n"),
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    Ok(response)
}

/// The whole stack, outermost layer first: a request goes down the list, its response comes
/// back up. The jemalloc layer answers `/metrics` and the purge path itself, so the layers
/// *above* it see those requests and the layers *below* it never do.
pub fn stack(
    jemalloc: JemallocLayer,
    handler_timeout: Duration,
    log: AccessLog,
) -> impl Service<
    Request<Incoming>,
    Response = Response<impl Body<Data = Bytes, Error = impl Into<BoxError>> + Send + 'static>,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
       + Send
       + 'static {
    ServiceBuilder::new()
        // OUTSIDE the jemalloc layer: sees every request, scrapes and purges included. Right
        // for an access log or request metrics: you see how often Prometheus scrapes and how
        // long each scrape and purge took.
        //
        // A `TimeoutLayer` placed here would bound the layer's answers too: a purge of many
        // GiB of dirty pages (about 100 ms per GiB) could be cut off with a 408. The purge
        // itself still runs to completion on its own thread; only the report is lost.
        .layer(
            TraceLayer::new_for_http()
                .on_request(log.clone())
                .on_response(log),
        )
        .layer(jemalloc)
        // INSIDE the jemalloc layer: only requests the layer forwards, that is the
        // application's own. A timeout here is a handler deadline that never cuts a scrape or
        // a purge (those are bounded by the layer: scrapes share one render, one purge at a
        // time). 408 is the status tower-http answered with before `with_status_code`.
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            handler_timeout,
        ))
        // Compresses the application's responses (gzip, as the client's `Accept-Encoding`
        // allows). `/metrics` does not need it: the jemalloc layer gzips the exposition
        // itself, once per render, however many scrapers share it. Placed outside, this layer
        // would skip the already-encoded exposition but also compress the purge report.
        .layer(CompressionLayer::new())
        .service_fn(handler)
}
