//! The body of an intercepted request: read and thrown away, up to a bound, before answering.
//!
//! No endpoint takes a body, but a client may send one. Answering without reading it makes
//! the server close the connection with unread data in its socket, which resets it: the
//! client can lose the end of the answer. So a body up to [`MAX_DISCARDED_BODY`] is read and
//! dropped (nothing is kept in memory); a longer one (declared or sent) gets a 413 with
//! `Connection: close` at once.

use super::response::{self, Answer};
use bytes::Buf;
use http::header::{HeaderValue, CONNECTION};
use http::StatusCode;
use http_body::Body;
use http_body_util::BodyExt;

/// The most request-body bytes read and discarded before answering an intercepted request.
pub(crate) const MAX_DISCARDED_BODY: u64 = 1024 * 1024;

/// Reads `body` to its end and drops it, or answers why not: 413 past `limit` bytes, 400 when
/// reading fails.
pub(crate) async fn discard<B>(body: B, limit: u64) -> Result<(), Answer>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let too_large = || {
        let mut answer = response::text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format_args!("this endpoint takes no request body (at most {limit} bytes are ignored)"),
        );
        answer
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        answer
    };
    if body.size_hint().lower() > limit {
        return Err(too_large());
    }
    let mut body = std::pin::pin!(body);
    let mut read = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            response::text(
                StatusCode::BAD_REQUEST,
                format_args!("cannot read the request body: {}", e.into()),
            )
        })?;
        if let Some(data) = frame.data_ref() {
            read += data.remaining() as u64;
            if read > limit {
                return Err(too_large());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Full;

    #[tokio::test]
    async fn small_bodies_are_read_large_ones_refused() {
        assert!(discard(Full::new(Bytes::from(vec![0; 1000])), 1000)
            .await
            .is_ok());
        let answer = discard(Full::new(Bytes::from(vec![0; 1001])), 1000)
            .await
            .unwrap_err();
        assert_eq!(answer.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(answer.headers()[CONNECTION], "close");
    }
}
