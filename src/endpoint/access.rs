//! Who may use an endpoint: a bearer token (compared in constant time) and/or any predicate
//! over the request, or anyone; or nobody, for a debug endpoint nobody configured.
//!
//! Checked after the method (a wrong method is a 405 whoever asks) and before any work:
//! a closed endpoint answers 403 naming the builder methods that open it; more than one
//! `Authorization` header is a 400 (a proxy in front may have checked another one than we
//! would); a missing or wrong token is a 401 with `WWW-Authenticate: Bearer`, a refused
//! predicate a 403.

use super::response::{self, Answer};
use http::header::{HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
use http::request::Parts;
use http::StatusCode;
use std::fmt;
use std::sync::Arc;

/// A predicate deciding whether a request may use an endpoint.
pub(crate) type Predicate = Arc<dyn Fn(&Parts) -> bool + Send + Sync>;

/// The access rules of one endpoint. The default lets everyone in.
#[derive(Clone, Default)]
pub(crate) struct Access {
    token: Option<Box<[u8]>>,
    predicate: Option<Predicate>,
    /// Refuses everyone with this reason: a debug endpoint without any access rule.
    closed: Option<Box<str>>,
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the token.
        f.debug_struct("Access")
            .field("bearer_token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("predicate", &self.predicate.as_ref().map(|_| "<fn>"))
            .field("closed", &self.closed.is_some())
            .finish()
    }
}

impl Access {
    /// Refuses every request with a 403 and `reason`.
    pub(crate) fn closed(reason: String) -> Self {
        Self {
            closed: Some(reason.into_boxed_str()),
            ..Self::default()
        }
    }

    pub(crate) fn set_token(&mut self, token: String) {
        self.token = Some(token.into_bytes().into_boxed_slice());
    }

    pub(crate) fn set_predicate(&mut self, predicate: Predicate) {
        self.predicate = Some(predicate);
    }

    /// `None` when the request may pass, otherwise the 403/400/401 answer.
    pub(crate) fn refusal(&self, parts: &Parts) -> Option<Answer> {
        if let Some(reason) = &self.closed {
            return Some(response::text(StatusCode::FORBIDDEN, reason));
        }
        if let Some(token) = &self.token {
            let mut headers = parts.headers.get_all(AUTHORIZATION).iter();
            let first = headers.next();
            if headers.next().is_some() {
                return Some(response::text(
                    StatusCode::BAD_REQUEST,
                    "more than one Authorization header; send exactly one",
                ));
            }
            let presented = first.and_then(|value| bearer_token(value.as_bytes()));
            if !presented.is_some_and(|presented| constant_time_eq(presented, token)) {
                let mut answer = response::text(
                    StatusCode::UNAUTHORIZED,
                    "a valid bearer token is required (Authorization: Bearer <token>)",
                );
                answer
                    .headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return Some(answer);
            }
        }
        if let Some(predicate) = &self.predicate {
            if !predicate(parts) {
                return Some(response::text(
                    StatusCode::FORBIDDEN,
                    "this request is not allowed to use this endpoint",
                ));
            }
        }
        None
    }
}

/// The credentials of an `Authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer_token(header: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer ";
    if header.len() <= SCHEME.len() || !header[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let token = header[SCHEME.len()..].trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Compares two byte strings in time that depends only on their lengths, not on where they
/// differ, so a client cannot guess the token byte by byte from response times. (The length is
/// not secret: any token of the configured length is as good a guess as another.)
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// Checks that `token` can be sent in an `Authorization: Bearer` header: the RFC 6750
/// `b64token` alphabet, not empty.
pub(crate) fn validate_token(token: &str) -> Result<(), &'static str> {
    let valid = |c: char| c.is_ascii_alphanumeric() || "-._~+/=".contains(c);
    if token.is_empty() {
        Err("must not be empty")
    } else if !token.chars().all(valid) {
        Err("may only contain A-Z a-z 0-9 - . _ ~ + / =")
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(authorization: Option<&str>) -> Parts {
        let mut builder = http::Request::post("/debug/jemalloc/purge");
        if let Some(value) = authorization {
            builder = builder.header(AUTHORIZATION, value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn with_token(token: &str) -> Access {
        let mut access = Access::default();
        access.set_token(token.to_owned());
        access
    }

    #[test]
    fn open_by_default() {
        assert!(Access::default().refusal(&parts(None)).is_none());
    }

    #[test]
    fn bearer_token_must_match_exactly() {
        let access = with_token("s3cr3t");
        assert!(access.refusal(&parts(Some("Bearer s3cr3t"))).is_none());
        assert!(access.refusal(&parts(Some("bearer s3cr3t"))).is_none());
        assert!(access.refusal(&parts(Some("BEARER   s3cr3t  "))).is_none());
        for wrong in [
            None,
            Some("Bearer s3cr3"),
            Some("Bearer s3cr3t2"),
            Some("Bearer S3CR3T"),
            Some("Basic s3cr3t"),
            Some("Bearer"),
            Some("Bearer "),
            Some("s3cr3t"),
        ] {
            let answer = access.refusal(&parts(wrong)).unwrap();
            assert_eq!(answer.status(), StatusCode::UNAUTHORIZED, "{wrong:?}");
            assert_eq!(answer.headers()[WWW_AUTHENTICATE], "Bearer");
        }
    }

    #[test]
    fn predicate_refusal_is_403_after_the_token() {
        let mut access = with_token("t");
        access.set_predicate(Arc::new(|parts: &Parts| {
            parts.headers.contains_key("x-admin")
        }));
        // No token: 401 before the predicate is asked.
        assert_eq!(
            access.refusal(&parts(None)).unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            access.refusal(&parts(Some("Bearer t"))).unwrap().status(),
            StatusCode::FORBIDDEN
        );
        let mut admin = parts(Some("Bearer t"));
        admin
            .headers
            .insert("x-admin", HeaderValue::from_static("1"));
        assert!(access.refusal(&admin).is_none());
    }

    #[test]
    fn two_authorization_headers_are_refused_whatever_their_order() {
        let access = with_token("t");
        for pair in [["Bearer wrong", "Bearer t"], ["Bearer t", "Bearer wrong"]] {
            let mut request = parts(Some(pair[0]));
            request
                .headers
                .append(AUTHORIZATION, HeaderValue::from_static(pair[1]));
            let answer = access.refusal(&request).unwrap();
            assert_eq!(answer.status(), StatusCode::BAD_REQUEST, "{pair:?}");
        }
    }

    #[test]
    fn closed_refuses_everyone_with_its_reason() {
        let access = Access::closed("closed: set a rule".into());
        let answer = access.refusal(&parts(Some("Bearer t"))).unwrap();
        assert_eq!(answer.status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn tokens_are_validated() {
        assert!(validate_token("abc-DEF_123.~+/=").is_ok());
        assert!(validate_token("").is_err());
        assert!(validate_token("has space").is_err());
        assert!(validate_token("new\nline").is_err());
    }

    #[test]
    fn debug_redacts_the_token() {
        let printed = format!("{:?}", with_token("hunter2"));
        assert!(!printed.contains("hunter2"), "{printed}");
    }
}
