//! The responses the layer writes itself: one-line plain-text reasons and JSON.

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::Full;

const TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");

fn with_body(status: StatusCode, content_type: HeaderValue, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, content_type);
    response
}

/// `status` with `reason` as a one-line `text/plain` body (line breaks inside `reason`, as in
/// some library errors' messages, become spaces).
pub(crate) fn text(status: StatusCode, reason: impl std::fmt::Display) -> Response<Full<Bytes>> {
    let mut line = reason.to_string().replace(['\r', '\n'], " ");
    line.push('\n');
    with_body(status, TEXT_PLAIN, Bytes::from(line))
}

/// 200 with a JSON body.
pub(crate) fn json(body: String) -> Response<Full<Bytes>> {
    with_body(StatusCode::OK, APPLICATION_JSON, Bytes::from(body))
}

/// 405 naming the methods `path` accepts, with the matching `Allow` header.
pub(crate) fn method_not_allowed(allow: &'static str, path: &str) -> Response<Full<Bytes>> {
    let mut response = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format_args!("method not allowed: {path} accepts {allow}"),
    );
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}
