//! Helpers shared by the integration tests: a recording echo service, a one-call driver, a
//! parser for the Prometheus text format, and HTTP/1.1 and HTTP/2 clients (`client`).
#![allow(dead_code, unreachable_pub)]

pub mod client;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use tower::{Service, ServiceExt};

/// A request extension, to check extensions reach the inner service.
#[derive(Clone, Debug, PartialEq)]
pub struct Marker(pub u64);

/// What the recording service saw of one request.
#[derive(Clone, Debug, PartialEq)]
pub struct Seen {
    pub method: Method,
    pub uri: String,
    pub headers: HeaderMap,
    pub marker: Option<Marker>,
    pub body: Bytes,
}

pub type Recorder = Arc<Mutex<Vec<Seen>>>;

/// Status, header and body prefix the echo service answers with, to check responses pass
/// through unchanged.
pub const ECHO_STATUS: StatusCode = StatusCode::IM_A_TEAPOT;
pub const ECHO_HEADER: &str = "x-echo";

/// An inner service that records every request and answers 418, `x-echo: <path>` and
/// `echo:<body>`.
pub type Echo =
    tower::util::BoxCloneService<Request<Full<Bytes>>, Response<Full<Bytes>>, Infallible>;

pub fn recording_echo() -> (Echo, Recorder) {
    let recorder = Recorder::default();
    let seen = Arc::clone(&recorder);
    let service = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let seen = Arc::clone(&seen);
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await?.to_bytes();
            let path = parts.uri.path().to_owned();
            seen.lock().unwrap().push(Seen {
                method: parts.method,
                uri: parts.uri.to_string(),
                headers: parts.headers,
                marker: parts.extensions.get::<Marker>().cloned(),
                body: body.clone(),
            });
            let mut echo = b"echo:".to_vec();
            echo.extend_from_slice(&body);
            let response = Response::builder()
                .status(ECHO_STATUS)
                .header(ECHO_HEADER, path)
                .body(Full::new(Bytes::from(echo)))
                .unwrap();
            Ok::<_, Infallible>(response)
        }
    });
    (Echo::new(service), recorder)
}

/// A collected response.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("utf-8 body")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

/// Sends one request through `service` and collects the answer.
pub async fn send<S, B>(service: &mut S, request: Request<Full<Bytes>>) -> Answer
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let response = service.ready().await.unwrap().call(request).await.unwrap();
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// The number of this process's threads named `name`. Linux keeps the first 15 bytes of a
/// thread's name (`jemalloc-governor` is listed as `jemalloc-govern`): so does this.
pub fn threads_named(name: &str) -> usize {
    let shown = &name[..name.len().min(15)];
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task lists this process's threads")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == shown)
        .count()
}

/// A request with an empty body.
pub fn request(method: &str, uri: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::default())
        .unwrap()
}

/// One sample line of the text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition: samples, and `# TYPE` / `# HELP` by metric family name.
#[derive(Debug, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    pub types: BTreeMap<String, String>,
    pub help: BTreeMap<String, String>,
}

impl Exposition {
    /// The value of the only sample named `name`.
    pub fn value(&self, name: &str) -> Option<f64> {
        let mut found = self.samples.iter().filter(|s| s.name == name);
        let first = found.next()?;
        assert!(found.next().is_none(), "more than one sample named {name}");
        Some(first.value)
    }
}

/// Parses the Prometheus text format (version 0.0.4), panicking on anything malformed.
pub fn parse_exposition(text: &str) -> Exposition {
    let mut out = Exposition::default();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE line");
            out.types.insert(name.to_owned(), kind.to_owned());
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP line");
            out.help.insert(name.to_owned(), help.to_owned());
        } else if line.starts_with('#') {
            continue;
        } else {
            out.samples.push(parse_sample(line));
        }
    }
    out
}

fn parse_sample(line: &str) -> Sample {
    let name_end = line.find(['{', ' ']).expect("sample name");
    let name = line[..name_end].to_owned();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices();
        let mut key = String::new();
        loop {
            let (i, c) = chars.next().expect("unterminated labels");
            match c {
                '}' => {
                    rest = &inner[i + 1..];
                    break;
                }
                ',' => {}
                '=' => {
                    assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line}");
                    let mut value = String::new();
                    loop {
                        match chars.next().expect("unterminated label value").1 {
                            '\\' => value.push(chars.next().expect("escape").1),
                            '"' => break,
                            c => value.push(c),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                c => key.push(c),
            }
        }
    }
    let value = rest.trim().split(' ').next().expect("value");
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse()
            .unwrap_or_else(|e| panic!("bad value in {line:?}: {e}")),
    };
    Sample {
        name,
        labels,
        value,
    }
}

/// The jemalloc gauge suffixes, in the crate's order: the figures table's names.
pub const GAUGES: &[&str] = tower_jemalloc::JemallocStats::FIELDS;

/// Allocates `mib` MiB in 1 KiB blocks, touches every block, and frees them all: afterwards
/// jemalloc holds about that much in dirty pages.
pub fn churn(mib: usize) {
    // Every block goes through black_box: without it the optimiser may elide the allocations.
    let blocks: Vec<Box<[u8; 1024]>> = (0..mib * 1024)
        .map(|i| std::hint::black_box(Box::new([i as u8; 1024])))
        .collect();
    drop(std::hint::black_box(blocks));
}

/// Serves `router` wrapped in `layer` with `axum::serve` on a loopback port of the current
/// runtime, as the README shows, and returns the address.
pub async fn serve_axum(
    router: axum::Router,
    layer: tower_jemalloc::JemallocLayer,
) -> std::net::SocketAddr {
    use tower::Layer;
    serve_app(layer.layer(router)).await
}

/// Serves any tower service of axum requests (a layered router, a `ServiceBuilder` stack)
/// with `axum::serve` on a loopback port of the current runtime, and returns the address.
pub async fn serve_app<S>(app: S) -> std::net::SocketAddr
where
    S: tower::Service<axum::extract::Request> + Clone + Send + Sync + 'static,
    S::Response: axum::response::IntoResponse,
    S::Error: Into<std::convert::Infallible>,
    S::Future: Send,
{
    use axum::response::IntoResponse;
    let app = app
        .map_response(IntoResponse::into_response)
        .map_err(Into::into);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            axum::ServiceExt::<axum::extract::Request>::into_make_service(app),
        )
        .await
        .unwrap();
    });
    addr
}
