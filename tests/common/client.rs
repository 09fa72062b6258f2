//! HTTP clients for the tests that start a real server: HTTP/1.1 (how Prometheus scrapes) and
//! HTTP/2 with prior knowledge, every wait bounded.

use super::Answer;
use bytes::Bytes;
use http::{Request, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// How long one request (answer and whole body) may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(30);

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// An HTTP/1.1 client.
pub fn http1() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 client that speaks HTTP/2 from the first byte (prior knowledge, `h2c`), as gRPC
/// clients and `curl --http2-prior-knowledge` do.
pub fn http2() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// Sends `method uri` with `body` and collects the answer, with the HTTP version it came in.
pub async fn fetch(
    client: &HttpClient,
    method: &str,
    uri: &str,
    body: &'static [u8],
) -> (Version, Answer) {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::new(Bytes::from_static(body)))
        .unwrap();
    fetch_request(client, request).await
}

/// Sends `request` and collects the answer, with the HTTP version it came in.
pub async fn fetch_request(
    client: &HttpClient,
    request: Request<Full<Bytes>>,
) -> (Version, Answer) {
    let what = format!("{} {}", request.method(), request.uri());
    let exchange = async {
        let response = client.request(request).await.expect("request sent");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body received").to_bytes();
        (
            parts.version,
            Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            },
        )
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{what}: no complete answer within {TIMEOUT:?}"))
}
