//! Fuzzes how the layer classifies requests: which it answers itself (and with which status)
//! and which it forwards, byte-identical, to the inner service.
//!
//! Run (nightly and cargo-fuzz): `cargo +nightly fuzz run classify -- -max_total_time=60`
//! from the repository root. Without nightly, `cargo build --manifest-path fuzz/Cargo.toml`
//! at least checks that it builds.
#![no_main]

use arbitrary::Arbitrary;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use libfuzzer_sys::fuzz_target;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use tower::{Layer, Service, ServiceExt};
use tower_jemalloc::{Endpoint, JemallocLayer, JemallocService};

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

const TOKEN: &str = "fuzz-token";

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    method: &'a [u8],
    path: Endpointish<'a>,
    query: Option<&'a str>,
    headers: Vec<(&'a [u8], &'a [u8])>,
    authorization: Option<&'a [u8]>,
    body: &'a [u8],
}

/// Paths near the intercepted ones are the interesting part of the space.
#[derive(Arbitrary, Debug)]
enum Endpointish<'a> {
    Metrics,
    Purge,
    Stats,
    Config,
    Heap,
    Profiling,
    Page,
    Prefixed(&'a str),
    Raw(&'a str),
}

type Seen = Arc<Mutex<Option<(Method, String, HeaderMap, Bytes)>>>;
type Inner =
    tower::util::BoxCloneSyncService<Request<Full<Bytes>>, Response<Full<Bytes>>, Infallible>;

fn service() -> &'static (JemallocService<Inner>, Seen) {
    static SERVICE: OnceLock<(JemallocService<Inner>, Seen)> = OnceLock::new();
    SERVICE.get_or_init(|| {
        let seen = Seen::default();
        let record = Arc::clone(&seen);
        let echo = tower::service_fn(move |req: Request<Full<Bytes>>| {
            let record = Arc::clone(&record);
            async move {
                let (parts, body) = req.into_parts();
                let body = body.collect().await?.to_bytes();
                *record.lock().unwrap() = Some((
                    parts.method,
                    parts.uri.to_string(),
                    parts.headers,
                    body.clone(),
                ));
                Ok::<_, Infallible>(Response::new(Full::new(body)))
            }
        });
        let layer = JemallocLayer::builder()
            .bearer_token(Endpoint::Purge, TOKEN)
            .build()
            .unwrap();
        (layer.layer(Inner::new(echo)), seen)
    })
}

/// Drives a future to completion on this thread (purges finish on their own thread).
fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        std::thread::park();
    }
}

fuzz_target!(|input: Input<'_>| {
    let Ok(method) = Method::from_bytes(input.method) else {
        return;
    };
    let path = match input.path {
        Endpointish::Metrics => "/metrics".to_owned(),
        Endpointish::Purge => "/debug/jemalloc/purge".to_owned(),
        Endpointish::Stats => "/debug/jemalloc/stats".to_owned(),
        Endpointish::Config => "/debug/jemalloc/config".to_owned(),
        Endpointish::Heap => "/debug/pprof/heap".to_owned(),
        Endpointish::Profiling => "/debug/jemalloc/profiling".to_owned(),
        Endpointish::Page => "/debug/jemalloc/".to_owned(),
        Endpointish::Prefixed(rest) => format!("/metrics{rest}"),
        Endpointish::Raw(raw) => format!("/{raw}"),
    };
    let uri = match input.query {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let Ok(uri) = uri.parse::<http::Uri>() else {
        return;
    };
    let mut headers = HeaderMap::new();
    for (name, value) in input.headers {
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        else {
            return;
        };
        headers.append(name, value);
    }
    if let Some(value) = input.authorization {
        let Ok(value) = HeaderValue::from_bytes(value) else {
            return;
        };
        headers.insert(http::header::AUTHORIZATION, value);
    }
    let mut request = Request::new(Full::new(Bytes::copy_from_slice(input.body)));
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri.clone();
    *request.headers_mut() = headers.clone();

    let (service, seen) = service();
    *seen.lock().unwrap() = None;
    let response = block_on(async {
        let mut service = service.clone();
        service.ready().await.unwrap().call(request).await.unwrap()
    });
    let status = response.status();
    let forwarded = seen.lock().unwrap().take();

    let intercepted: Option<&[StatusCode]> = match uri.path() {
        "/metrics" if method == Method::GET || method == Method::HEAD => {
            Some(&[StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE])
        }
        "/debug/jemalloc/purge" if method == Method::POST || method == Method::PUT => Some(&[
            StatusCode::OK,
            StatusCode::BAD_REQUEST,
            StatusCode::UNAUTHORIZED,
            StatusCode::CONFLICT,
            StatusCode::TOO_MANY_REQUESTS,
        ]),
        // 400: a bad parameter or two Authorization headers; 429: the stats rate limit.
        "/debug/jemalloc/stats" if method == Method::GET || method == Method::HEAD => Some(&[
            StatusCode::OK,
            StatusCode::BAD_REQUEST,
            StatusCode::UNAUTHORIZED,
            StatusCode::TOO_MANY_REQUESTS,
        ]),
        // 400: a bad or missing setting; 409: another change being made.
        "/debug/jemalloc/config"
            if method == Method::GET || method == Method::HEAD || method == Method::PUT =>
        {
            Some(&[
                StatusCode::OK,
                StatusCode::BAD_REQUEST,
                StatusCode::UNAUTHORIZED,
                StatusCode::CONFLICT,
            ])
        }
        // Built without the profiling feature: 501 once admitted and its parameters read.
        "/debug/pprof/heap" if method == Method::GET => Some(&[
            StatusCode::BAD_REQUEST,
            StatusCode::UNAUTHORIZED,
            StatusCode::NOT_IMPLEMENTED,
        ]),
        "/debug/jemalloc/profiling" if method == Method::GET || method == Method::PUT => Some(&[
            StatusCode::BAD_REQUEST,
            StatusCode::UNAUTHORIZED,
            StatusCode::NOT_IMPLEMENTED,
        ]),
        // The page: a 401 without the token (a browser's GET gets the shell as its body).
        "/debug/jemalloc/" if method == Method::GET || method == Method::HEAD => Some(&[
            StatusCode::OK,
            StatusCode::BAD_REQUEST,
            StatusCode::UNAUTHORIZED,
        ]),
        "/metrics"
        | "/debug/jemalloc/"
        | "/debug/jemalloc/purge"
        | "/debug/jemalloc/stats"
        | "/debug/jemalloc/config"
        | "/debug/pprof/heap"
        | "/debug/jemalloc/profiling" => Some(&[StatusCode::METHOD_NOT_ALLOWED]),
        _ => None,
    };
    // 403: a state-changing request that a browser marks as cross-origin (`Sec-Fetch-Site`,
    // `Origin`) is refused on every endpoint, whatever its access rule (after the method: a
    // method the endpoint does not take is still a 405).
    let browser_write = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS)
        && (headers.contains_key("sec-fetch-site") || headers.contains_key(http::header::ORIGIN));
    match intercepted {
        Some(statuses) => {
            assert!(
                statuses.contains(&status) || (browser_write && status == StatusCode::FORBIDDEN),
                "{method} {uri} -> {status}"
            );
            assert!(
                forwarded.is_none(),
                "{method} {uri} was intercepted and forwarded"
            );
        }
        None => {
            let (m, u, h, b) = forwarded.expect("forwarded");
            assert_eq!((m, u, h), (method, uri.to_string(), headers));
            assert_eq!(&b[..], input.body);
            assert_eq!(status, StatusCode::OK);
        }
    }
});
