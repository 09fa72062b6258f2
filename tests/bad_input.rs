//! Property test: ≥ 10,000 generated requests (odd methods, paths with `//`, `..`, `%2F`,
//! trailing slashes and mixed case, long paths and queries, many and large headers, bodies of
//! varied sizes) through the layer in front of a recording echo service. No panic; every
//! intercepted request gets its documented status; every other request reaches the inner
//! service byte-identical and its answer comes back unchanged.
#![cfg(all(feature = "jemalloc", not(target_env = "msvc")))]

mod common;

use bytes::Bytes;
use common::*;
use http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::Full;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Mutex;
use tower::Layer;
use tower_jemalloc::{Endpoint, JemallocLayer};

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

const TOKEN: &str = "s3cret-token";
const CASES: u32 = 10_000;

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        3 => prop::sample::select(vec![
            Method::GET, Method::HEAD, Method::POST, Method::PUT, Method::DELETE,
            Method::PATCH, Method::OPTIONS, Method::TRACE, Method::CONNECT,
        ]),
        1 => "[A-Za-z!#$%&'*+.^_`|~-]{1,12}".prop_map(|m| Method::from_bytes(m.as_bytes()).unwrap()),
    ]
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "metrics", "Metrics", "METRICS", "debug", "jemalloc", "purge", "Purge", "", ".", "..",
            "%2F", "%2f", "metrics%2F", "debug%2Fjemalloc", "%00", "~",
        ]).prop_map(str::to_owned),
        1 => "[A-Za-z0-9._~-]{0,24}",
        1 => long("[a-z]{1,8}", 25..250),
    ]
}

/// A long string made by repeating a short generated one (generating thousands of characters one
/// by one would make 10,000 cases slow).
fn long(unit: &'static str, repeats: std::ops::Range<usize>) -> impl Strategy<Value = String> {
    (unit, repeats).prop_map(|(unit, n)| unit.repeat(n))
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        // The two endpoints exactly: their statuses are checked below.
        2 => Just("/metrics".to_owned()),
        2 => Just("/debug/jemalloc/purge".to_owned()),
        1 => Just("/debug/jemalloc/stats".to_owned()),
        // Near misses and noise.
        6 => (prop::collection::vec(segment(), 0..8), any::<bool>()).prop_map(|(segments, trailing)| {
            let mut path = format!("/{}", segments.join("/"));
            if trailing {
                path.push('/');
            }
            path
        }),
    ]
}

fn query() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        2 => Just(None),
        1 => prop::sample::select(vec![
            "mode=purge", "mode=decay", "mode=", "mode=all", "format=text", "format=json",
            "format=xml", "format", "x=1&mode=decay",
        ]).prop_map(|q| Some(q.to_owned())),
        2 => "[A-Za-z0-9=&%._~+-]{0,64}".prop_map(Some),
        1 => long("[A-Za-z0-9=&]{1,8}", 250..1000).prop_map(Some),
    ]
}

fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
    let authorization = prop_oneof![
        Just(format!("Bearer {TOKEN}")),
        Just("Bearer wrong".to_owned()),
        Just(format!("bearer  {TOKEN} ")),
        "[ -~]{0,40}",
    ]
    .prop_map(|v| ("authorization".to_owned(), v));
    let other = (
        "x-[a-z0-9-]{1,20}",
        prop_oneof![4 => "[ -~]{0,64}".boxed(), 1 => long("[a-zA-Z0-9]{1,8}", 250..1000).boxed()],
    );
    let encoding = prop::sample::select(vec!["gzip", "identity", "gzip;q=0", "*", "br"])
        .prop_map(|v| ("accept-encoding".to_owned(), v.to_owned()));
    prop::collection::vec(
        prop_oneof![4 => other, 1 => authorization, 1 => encoding],
        0..48,
    )
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => Just(Vec::new()),
        3 => prop::collection::vec(any::<u8>(), 0..256),
        1 => (1usize..256 * 1024).prop_map(|n| vec![0xA5; n]),
    ]
}

#[derive(Default, Debug)]
struct Tally {
    forwarded: u64,
    intercepted: BTreeMap<u16, u64>,
}

#[test]
fn generated_requests_get_their_documented_answers() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let layer = JemallocLayer::builder()
        .bearer_token(Endpoint::Purge, TOKEN)
        .build()
        .unwrap();
    let (echo, seen) = recording_echo();
    let service = Mutex::new(layer.layer(echo));
    let tally = Mutex::new(Tally::default());
    let skipped = std::sync::atomic::AtomicU64::new(0);

    let config = ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(method in method(), path in path(), query in query(), headers in headers(), body in body())| {
        let uri = match &query {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        };
        // Only requests an HTTP server could hand over: a parseable URI and header set.
        let Ok(uri) = uri.parse::<http::Uri>() else {
            skipped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(());
        };
        let mut request = Request::builder().method(method.clone()).uri(uri.clone());
        let mut header_map = http::HeaderMap::new();
        for (name, value) in &headers {
            let (Ok(name), Ok(value)) = (HeaderName::try_from(name.as_str()), HeaderValue::try_from(value.as_str())) else {
                skipped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(());
            };
            header_map.append(name, value);
        }
        *request.headers_mut().unwrap() = header_map.clone();
        let request = request.body(Full::new(Bytes::from(body.clone()))).unwrap();

        let before = seen.lock().unwrap().len();
        let answer = runtime.block_on(async {
            let mut service = service.lock().unwrap().clone();
            send(&mut service, request).await
        });
        let after = seen.lock().unwrap().len();
        let mut tally = tally.lock().unwrap();

        let authorizations = header_map.get_all("authorization").iter().count();
        // Every parameter name, for the strict endpoints.
        let names: Vec<&str> = uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| pair.split_once('=').map_or(pair, |(key, _)| key))
            .collect();
        let only = |allowed: &str| names.iter().all(|name| *name == allowed);
        let authorized = header_map.get("authorization").is_some_and(|v| {
            let v = v.as_bytes();
            v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") && v[7..].trim_ascii() == TOKEN.as_bytes()
        });
        // The first `name=` parameter, as the layer reads it.
        let param = |name: &str| {
            uri.query()?.split('&').find_map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (key == name).then_some(value)
            })
        };
        let get = method == Method::GET || method == Method::HEAD;
        let expected: Option<&[StatusCode]> = match uri.path() {
            "/metrics" if get => Some(&[StatusCode::OK]),
            "/metrics" => Some(&[StatusCode::METHOD_NOT_ALLOWED]),
            "/debug/jemalloc/purge" if method != Method::POST && method != Method::PUT => {
                Some(&[StatusCode::METHOD_NOT_ALLOWED])
            }
            // The stats endpoint is guarded like purge (no rules of its own here).
            "/debug/jemalloc/purge" | "/debug/jemalloc/stats" if get || method == Method::POST || method == Method::PUT => {
                if uri.path() == "/debug/jemalloc/stats" && !get {
                    Some(&[StatusCode::METHOD_NOT_ALLOWED])
                } else if authorizations > 1 {
                    Some(&[StatusCode::BAD_REQUEST])
                } else if !authorized {
                    Some(&[StatusCode::UNAUTHORIZED])
                } else if !only(if uri.path() == "/debug/jemalloc/stats" { "format" } else { "mode" }) {
                    Some(&[StatusCode::BAD_REQUEST])
                } else if uri.path() == "/debug/jemalloc/stats" {
                    match param("format") {
                        // A burst of generated requests meets the stats rate limit.
                        None | Some("json") | Some("text") => {
                            Some(&[StatusCode::OK, StatusCode::TOO_MANY_REQUESTS])
                        }
                        Some(_) => Some(&[StatusCode::BAD_REQUEST]),
                    }
                } else {
                    match param("mode") {
                        None | Some("purge") | Some("decay") => {
                            Some(&[StatusCode::OK, StatusCode::CONFLICT, StatusCode::TOO_MANY_REQUESTS])
                        }
                        Some(_) => Some(&[StatusCode::BAD_REQUEST]),
                    }
                }
            }
            "/debug/jemalloc/stats" => Some(&[StatusCode::METHOD_NOT_ALLOWED]),
            _ => None,
        };
        match expected {
            Some(statuses) => {
                prop_assert!(statuses.contains(&answer.status), "{method} {uri}: {} {:?}", answer.status, answer.body);
                prop_assert_eq!(after, before, "an intercepted request is not forwarded");
                if answer.status == StatusCode::OK {
                    prop_assert_eq!(answer.body.is_empty(), method == Method::HEAD);
                } else {
                    let reason = answer.text();
                    prop_assert!(reason.ends_with('\n') && reason.lines().count() == 1, "one-line reason: {reason:?}");
                }
                *tally.intercepted.entry(answer.status.as_u16()).or_default() += 1;
            }
            None => {
                prop_assert_eq!(after, before + 1, "forwarded exactly once");
                let last = seen.lock().unwrap().last().cloned().unwrap();
                prop_assert_eq!(&last.method, &method);
                prop_assert_eq!(&last.uri, &uri.to_string());
                prop_assert_eq!(&last.headers, &header_map);
                prop_assert_eq!(&last.body[..], &body[..]);
                prop_assert_eq!(answer.status, ECHO_STATUS);
                prop_assert_eq!(answer.header(ECHO_HEADER), Some(uri.path()));
                prop_assert_eq!(&answer.body[5..], &body[..]);
                tally.forwarded += 1;
            }
        }
    });

    let tally = tally.into_inner().unwrap();
    let total = tally.forwarded + tally.intercepted.values().sum::<u64>();
    eprintln!(
        "bad input: {total} requests ({} generated cases skipped as unsendable): {} forwarded unchanged, intercepted by status {:?}",
        skipped.into_inner(),
        tally.forwarded,
        tally.intercepted
    );
    assert!(
        total >= u64::from(CASES),
        "at least {CASES} requests went through, got {total}"
    );
}
