//! Who may use an endpoint: a bearer token (compared in constant time) and/or any predicate
//! over the request, or anyone; or nobody, for a debug endpoint nobody configured. And what
//! no website may make a browser do with it.
//!
//! Checked after the method (a wrong method is a 405 whoever asks) and before any work, in
//! this order:
//!
//! 1. a closed endpoint answers 403 naming the builder methods that open it;
//! 2. **cross-origin writes**: a request with a state-changing method (anything but `GET`,
//!    `HEAD` and `OPTIONS`) that a browser marks as sent by another site gets a 403, whatever
//!    the access rule, as Go 1.25's `http.CrossOriginProtection` does: `Sec-Fetch-Site`, when
//!    present, decides (`same-origin` and `none`, a request the user typed, pass; `same-site`
//!    and `cross-site` do not); without it, an `Origin` whose `host[:port]` is not the
//!    request's own (`Host`, or the URI's authority in HTTP/2) is refused, `Origin: null`
//!    included. Browsers set both headers and no page can forge them; curl, Prometheus and
//!    scripts send neither and are not affected. A page on another site cannot read the
//!    answer without CORS, which the layer never grants, but it could still *send* a purge or
//!    a configuration change: this is what stops that. `/metrics` answers only `GET` and
//!    `HEAD`, so this concerns the debug endpoints;
//! 3. **DNS rebinding**, for anonymous access only (a debug endpoint opened with
//!    `allow_anonymous`, no token, no predicate): a `Host` (or HTTP/2 `:authority`) that is
//!    neither an IP literal (`127.0.0.1`, `[::1]`, with or without a port) nor `localhost`
//!    (any case, with or without a port or a trailing dot) gets a 403, whatever the method. An
//!    attacker's page whose host name they re-point at 127.0.0.1 is "same origin" with itself,
//!    so it could read the answers of a loopback listener; its requests still carry the
//!    attacker's host name, which is refused. A request without `Host` (HTTP/1.0) passes.
//!    A token is never sent by a browser on its own, so token access does not need this;
//!    a predicate is trusted to decide (one that admits by peer address trusts a browser on
//!    that machine just like anonymous access: check `Host` in it too, or use a token).
//!    `/metrics`, open by default and read-only, is not checked: Prometheus may well scrape
//!    it by a DNS name;
//! 4. more than one `Authorization` header is a 400 (a proxy in front may have checked
//!    another one than we would); a missing or wrong token is a 401 with
//!    `WWW-Authenticate: Bearer`, a refused predicate a 403.

use super::response::{self, Answer};
use http::header::{HeaderValue, AUTHORIZATION, HOST, ORIGIN, WWW_AUTHENTICATE};
use http::request::Parts;
use http::{Method, StatusCode};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
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
    /// Refuses state-changing requests that a browser marks as cross-origin.
    same_origin_writes: bool,
    /// Refuses a `Host` that is not an IP literal or `localhost` (anonymous access).
    local_host_only: bool,
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the token.
        f.debug_struct("Access")
            .field("bearer_token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("predicate", &self.predicate.as_ref().map(|_| "<fn>"))
            .field("closed", &self.closed.is_some())
            .field("same_origin_writes", &self.same_origin_writes)
            .field("local_host_only", &self.local_host_only)
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

    /// Refuses state-changing requests that a browser marks as sent from another origin.
    pub(crate) fn refuse_cross_origin_writes(&mut self) {
        self.same_origin_writes = true;
    }

    /// Refuses requests addressed to a host name other than `localhost` (anonymous access,
    /// against DNS rebinding).
    pub(crate) fn require_local_host(&mut self) {
        self.local_host_only = true;
    }

    /// `None` when the request may pass, otherwise the 403/400/401 answer.
    pub(crate) fn refusal(&self, parts: &Parts) -> Option<Answer> {
        if let Some(reason) = &self.closed {
            return Some(response::text(StatusCode::FORBIDDEN, reason));
        }
        if self.same_origin_writes {
            if let Some(reason) = cross_origin_write(parts) {
                return Some(response::text(StatusCode::FORBIDDEN, reason));
            }
        }
        if self.local_host_only && !addressed_locally(parts) {
            return Some(response::text(
                StatusCode::FORBIDDEN,
                "anonymous access answers only requests addressed to an IP address or \
                 localhost, not to a host name (which could be DNS rebinding): connect by IP \
                 or localhost, or give the endpoint a bearer token",
            ));
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

/// Why a browser's state-changing request from another origin is refused, or `None` when it
/// is not one. Follows Go 1.25's `http.CrossOriginProtection`: `Sec-Fetch-Site` decides when
/// present (it cannot be forged by a page, and it stays right behind a proxy that rewrites
/// `Host`); `Origin` is the fallback for browsers that do not send it.
fn cross_origin_write(parts: &Parts) -> Option<&'static str> {
    if matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    let mut sites = parts.headers.get_all("sec-fetch-site").iter().peekable();
    if sites.peek().is_some() {
        let same_origin = |site: &HeaderValue| site == "same-origin" || site == "none";
        return (!sites.all(same_origin)).then_some(
            "cross-origin request refused: a browser sent it from another site \
             (Sec-Fetch-Site); send it from curl or a script, or from a page of this origin",
        );
    }
    let mut origins = parts.headers.get_all(ORIGIN).iter().peekable();
    origins.peek()?;
    let host = request_host(parts);
    let ours = |origin: &HeaderValue| {
        let authority = origin
            .to_str()
            .ok()
            .and_then(|origin| origin.split_once("://"))
            .filter(|(scheme, _)| !scheme.is_empty())
            .map(|(_, authority)| authority);
        matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h))
    };
    (!origins.all(ours)).then_some(
        "cross-origin request refused: the Origin header is not this server's own (Host); \
         send it from curl or a script, without Origin, or from a page of this origin",
    )
}

/// The host (and port) the request was addressed to: `Host`, or the URI's authority (HTTP/2's
/// `:authority`, or an HTTP/1.1 request in absolute form).
fn request_host(parts: &Parts) -> Option<&str> {
    match parts.headers.get(HOST) {
        Some(host) => host.to_str().ok(),
        None => parts.uri.authority().map(|authority| authority.as_str()),
    }
}

/// Whether every host the request names (each `Host` header and the URI's authority) is an IP
/// literal or `localhost`: a DNS-rebinding page can only name its own host name. A request
/// that names none (HTTP/1.0 without `Host`) passes.
fn addressed_locally(parts: &Parts) -> bool {
    let hosts = parts
        .headers
        .get_all(HOST)
        .iter()
        .map(|host| host.to_str().ok());
    let authority = parts
        .uri
        .authority()
        .map(|authority| Some(authority.as_str()));
    hosts
        .chain(authority)
        .all(|host| host.is_some_and(is_local_host))
}

/// `host[:port]` where host is an IPv4 literal, a bracketed IPv6 literal, or `localhost` (any
/// case, with or without a trailing dot).
fn is_local_host(authority: &str) -> bool {
    let port_ok = |port: &str| port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = authority.strip_prefix('[') {
        let Some((address, after)) = rest.split_once(']') else {
            return false;
        };
        return address.parse::<Ipv6Addr>().is_ok()
            && (after.is_empty() || after.strip_prefix(':').is_some_and(port_ok));
    }
    let (host, port) = match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    };
    if !port.is_none_or(port_ok) {
        return false;
    }
    host.parse::<Ipv4Addr>().is_ok()
        || host
            .strip_suffix('.')
            .unwrap_or(host)
            .eq_ignore_ascii_case("localhost")
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

    /// A request with `headers`, and the URI's authority when `uri` is absolute.
    fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn guarded() -> Access {
        let mut access = Access::default();
        access.refuse_cross_origin_writes();
        access
    }

    const PURGE: &str = "/debug/jemalloc/purge";

    #[test]
    fn sec_fetch_site_decides_for_state_changing_methods() {
        let access = guarded();
        for site in ["cross-site", "same-site", "bogus"] {
            for method in ["POST", "PUT", "DELETE", "PATCH"] {
                let parts = request(method, PURGE, &[("sec-fetch-site", site)]);
                let answer = access.refusal(&parts).expect(site);
                assert_eq!(answer.status(), StatusCode::FORBIDDEN, "{method} {site}");
            }
            // Safe methods are never refused for their origin.
            for method in ["GET", "HEAD", "OPTIONS"] {
                let parts = request(method, PURGE, &[("sec-fetch-site", site)]);
                assert!(access.refusal(&parts).is_none(), "{method} {site}");
            }
        }
        for site in ["same-origin", "none"] {
            // Sec-Fetch-Site wins over an Origin that differs from Host (a proxy rewriting Host).
            let parts = request(
                "POST",
                PURGE,
                &[
                    ("sec-fetch-site", site),
                    ("origin", "https://admin.example"),
                    ("host", "127.0.0.1:9070"),
                ],
            );
            assert!(access.refusal(&parts).is_none(), "{site}");
        }
        // One cross-site value among several is enough.
        let mut parts = request("POST", PURGE, &[("sec-fetch-site", "same-origin")]);
        parts
            .headers
            .append("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(access.refusal(&parts).is_some());
    }

    #[test]
    fn origin_must_be_the_request_host_when_sec_fetch_site_is_missing() {
        let access = guarded();
        let host = ("host", "127.0.0.1:9070");
        for origin in [
            "https://evil.example",
            "http://127.0.0.1:9071",
            "http://127.0.0.1",
            "null",
            "127.0.0.1:9070",
            "://127.0.0.1:9070",
        ] {
            let parts = request("POST", PURGE, &[host, ("origin", origin)]);
            let answer = access.refusal(&parts).expect(origin);
            assert_eq!(answer.status(), StatusCode::FORBIDDEN, "{origin}");
        }
        for origin in ["http://127.0.0.1:9070", "HTTP://127.0.0.1:9070"] {
            let parts = request("POST", PURGE, &[host, ("origin", origin)]);
            assert!(access.refusal(&parts).is_none(), "{origin}");
        }
        let parts = request(
            "PUT",
            PURGE,
            &[
                ("host", "LocalHost:9070"),
                ("origin", "http://localhost:9070"),
            ],
        );
        assert!(access.refusal(&parts).is_none());
        // HTTP/2: the authority is in the URI, not in a Host header.
        let h2 = "http://[::1]:9070/debug/jemalloc/purge";
        let parts = request("POST", h2, &[("origin", "http://[::1]:9070")]);
        assert!(access.refusal(&parts).is_none());
        let parts = request("POST", h2, &[("origin", "http://evil.example")]);
        assert!(access.refusal(&parts).is_some());
        // An Origin and no host to compare it with.
        let parts = request("POST", PURGE, &[("origin", "http://127.0.0.1:9070")]);
        assert!(access.refusal(&parts).is_some());
    }

    #[test]
    fn requests_without_browser_headers_pass() {
        let access = guarded();
        for method in ["POST", "PUT", "GET"] {
            let parts = request(method, PURGE, &[("host", "evil.example")]);
            assert!(access.refusal(&parts).is_none(), "{method}");
        }
    }

    #[test]
    fn local_hosts_are_ip_literals_and_localhost() {
        for host in [
            "127.0.0.1",
            "127.0.0.1:9070",
            "10.1.2.3:80",
            "[::1]",
            "[::1]:9070",
            "[2001:db8::7]:443",
            "localhost",
            "LOCALHOST:9070",
            "localhost.",
            "localhost.:9070",
            "localhost:",
        ] {
            assert!(is_local_host(host), "{host}");
        }
        for host in [
            "attacker.example",
            "attacker.example:9070",
            "localhost.attacker.example",
            "sub.localhost",
            "127.0.0.1.nip.io",
            "127.1",
            "::1",
            "[::1",
            "[::1]x",
            "[::1]:port",
            "[localhost]",
            "127.0.0.1:99999999",
            "127.0.0.1:90:70",
            "user@127.0.0.1",
            "",
        ] {
            assert!(!is_local_host(host), "{host}");
        }
    }

    #[test]
    fn anonymous_access_refuses_host_names_on_every_method() {
        let mut access = Access::default();
        access.require_local_host();
        for method in ["GET", "HEAD", "POST", "PUT"] {
            let parts = request(method, PURGE, &[("host", "attacker.example:9070")]);
            let answer = access.refusal(&parts).expect(method);
            assert_eq!(answer.status(), StatusCode::FORBIDDEN, "{method}");
            let parts = request(method, PURGE, &[("host", "127.0.0.1:9070")]);
            assert!(access.refusal(&parts).is_none(), "{method}");
        }
        // No Host at all (HTTP/1.0): nothing to rebind.
        assert!(access.refusal(&request("POST", PURGE, &[])).is_none());
        // HTTP/2's authority, and an absolute-form URI, are checked like Host.
        let parts = request(
            "GET",
            "http://attacker.example:9070/debug/jemalloc/stats",
            &[],
        );
        assert!(access.refusal(&parts).is_some());
        let parts = request("GET", "http://localhost:9070/debug/jemalloc/stats", &[]);
        assert!(access.refusal(&parts).is_none());
        let parts = request(
            "GET",
            "http://attacker.example/debug/jemalloc/stats",
            &[("host", "127.0.0.1")],
        );
        assert!(access.refusal(&parts).is_some());
        // A second Host header naming a host name.
        let mut parts = request("GET", PURGE, &[("host", "127.0.0.1")]);
        parts
            .headers
            .append(HOST, HeaderValue::from_static("attacker.example"));
        assert!(access.refusal(&parts).is_some());
    }

    #[test]
    fn debug_redacts_the_token() {
        let printed = format!("{:?}", with_token("hunter2"));
        assert!(!printed.contains("hunter2"), "{printed}");
    }
}
