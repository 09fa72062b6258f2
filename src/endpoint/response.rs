//! The responses the layer writes itself: one-line plain-text reasons, JSON, and the shared
//! 405, `Retry-After` and jemalloc-error answers.

use crate::jemalloc::profiling::ProfilingError;
use crate::jemalloc::JemallocError;
use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::Full;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A response the layer writes itself.
pub(crate) type Answer = Response<Full<Bytes>>;

/// An intercepted request's answer: at once, or when its job reports.
pub(crate) enum Reply {
    /// Answered without waiting.
    Now(Answer),
    /// Answered when the job (a render, a purge, a dump) reports.
    Later(Pin<Box<dyn Future<Output = Answer> + Send>>),
}

const TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");

impl Reply {
    /// The answer, once it is there.
    pub(crate) async fn into_answer(self) -> Answer {
        match self {
            Self::Now(answer) => answer,
            Self::Later(answer) => answer.await,
        }
    }
}

/// `status` with `body` and its content type.
pub(crate) fn with_body(status: StatusCode, content_type: HeaderValue, body: Bytes) -> Answer {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, content_type);
    response
}

/// `status` with `reason` as a one-line `text/plain` body (line breaks inside `reason`, as in
/// some library errors' messages, become spaces).
pub(crate) fn text(status: StatusCode, reason: impl std::fmt::Display) -> Answer {
    let mut line = reason.to_string().replace(['\r', '\n'], " ");
    line.push('\n');
    with_body(status, TEXT_PLAIN, Bytes::from(line))
}

/// 200 with `value` rendered as JSON (serde_json).
pub(crate) fn json(value: &impl serde::Serialize) -> Answer {
    match serde_json::to_vec(value) {
        Ok(body) => with_body(StatusCode::OK, APPLICATION_JSON, Bytes::from(body)),
        // The crate's own types always serialize; a failure is a bug, still answered.
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format_args!("cannot render the answer as JSON: {e}"),
        ),
    }
}

/// The answer to a `HEAD`: the same status and headers, with `Content-Length` saying how
/// long the body a `GET` gets is, and no body.
pub(crate) fn without_body(mut answer: Answer) -> Answer {
    let length = http_body::Body::size_hint(answer.body())
        .exact()
        .unwrap_or(0);
    *answer.body_mut() = Full::default();
    answer
        .headers_mut()
        .insert(http::header::CONTENT_LENGTH, HeaderValue::from(length));
    answer
}

/// 405 naming the methods `path` accepts, with the matching `Allow` header.
pub(crate) fn method_not_allowed(allow: &'static str, path: &str) -> Answer {
    let mut response = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format_args!("method not allowed: {path} accepts {allow}"),
    );
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

/// `status` with `reason`, and `Retry-After` in whole seconds, rounded up (at least 1).
pub(crate) fn retry_after(
    status: StatusCode,
    wait: Duration,
    reason: impl std::fmt::Display,
) -> Answer {
    let mut response = text(status, reason);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(whole_seconds(wait)));
    response
}

/// `wait` in whole seconds, rounded up, at least 1.
pub(crate) fn whole_seconds(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// The answer for a [`JemallocError`]: 501 when jemalloc is not compiled in, 503 when it is
/// not the global allocator, 500 when a mallctl call failed; the reason as plain text.
pub(crate) fn jemalloc_error(error: &JemallocError) -> Answer {
    let status = match error {
        JemallocError::Unsupported => StatusCode::NOT_IMPLEMENTED,
        JemallocError::NotGlobalAllocator => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    text(status, error)
}

/// The answer for a [`ProfilingError`]: jemalloc's own first ([`jemalloc_error`]), then 501
/// when the profiler is not compiled in, 503 when jemalloc was started without it, 409 when it
/// is inactive, 500 otherwise; the reason as plain text.
pub(crate) fn profiling_error(error: &ProfilingError) -> Answer {
    let status = match error {
        ProfilingError::Jemalloc(e) => return jemalloc_error(e),
        ProfilingError::NotCompiled => StatusCode::NOT_IMPLEMENTED,
        ProfilingError::NotStarted => StatusCode::SERVICE_UNAVAILABLE,
        ProfilingError::Inactive(_) => StatusCode::CONFLICT,
        // Nobody waits for an abandoned window: it is never answered.
        ProfilingError::TooLarge { .. } | ProfilingError::Failed(_) | ProfilingError::Abandoned => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    text(status, error)
}

/// The answer to a forwarded request shed while the process is over its memory limit: 503,
/// `Retry-After: 1` (the governor polls every few milliseconds over the limit, so usage may
/// be back under it within a second), and the usage and limit in whole MiB.
pub(crate) fn shed_answer(status: &crate::governor::Status) -> Answer {
    let (usage, limit) = (status.usage().unwrap_or(0), status.limit().unwrap_or(0));
    let (usage_mib, limit_mib) = (usage >> 20, limit >> 20);
    let reason = if usage > limit {
        format!("shedding load: memory use {usage_mib} MiB is over the limit {limit_mib} MiB")
    } else {
        format!(
            "shedding load: memory use {usage_mib} MiB was over the limit {limit_mib} MiB \
             moments ago; requests are let back in one at a time"
        )
    };
    retry_after(
        StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(1),
        reason,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_secs(2)), 2);
        assert_eq!(whole_seconds(Duration::from_millis(2001)), 3);
        let answer = retry_after(StatusCode::TOO_MANY_REQUESTS, Duration::from_secs(2), "x");
        assert_eq!(answer.headers()[RETRY_AFTER], "2");
    }

    #[test]
    fn text_is_one_line() {
        let answer = text(StatusCode::BAD_REQUEST, "a\nb\r\nc");
        assert_eq!(answer.headers()[CONTENT_TYPE], TEXT_PLAIN);
        let body = answer.into_body();
        assert_eq!(http_body::Body::size_hint(&body).exact(), Some(7));
    }
}
