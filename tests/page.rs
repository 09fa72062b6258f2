//! The page for people (`GET /debug/jemalloc/`): what a browser gets, what scripts read from
//! it, and that it opens nothing the access rules keep closed.
#![cfg(all(feature = "jemalloc", not(target_env = "msvc")))]

mod common;

use common::*;
use http::StatusCode;
use std::collections::BTreeMap;
use tower::Layer;
use tower_jemalloc::{Endpoint, JemallocLayer, JemallocLayerBuilder, JemallocService};

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

const PAGE: &str = "/debug/jemalloc/";

/// The tests run one at a time: purges take one process-wide slot, and the history thread's
/// test needs every layer of this binary gone.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn service(builder: JemallocLayerBuilder) -> JemallocService<Echo> {
    let (echo, _) = recording_echo();
    builder.build().unwrap().layer(echo)
}

fn open() -> JemallocService<Echo> {
    service(JemallocLayer::builder().allow_anonymous(Endpoint::Purge))
}

fn with_headers(
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut request = request(method, uri);
    for (name, value) in headers {
        request.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    request
}

/// The `data-figure`/`data-bytes` pairs of a page, in document order.
fn figures_in(html: &str) -> Vec<(String, String)> {
    let mut figures = Vec::new();
    let mut rest = html;
    while let Some(at) = rest.find("data-figure=\"") {
        rest = &rest[at + "data-figure=\"".len()..];
        let name = &rest[..rest.find('"').unwrap()];
        let bytes_at = rest
            .find("data-bytes=\"")
            .expect("data-bytes beside data-figure");
        let value = &rest[bytes_at + "data-bytes=\"".len()..];
        let value = &value[..value.find('"').unwrap()];
        figures.push((name.to_owned(), value.to_owned()));
    }
    figures
}

/// The JSON the page embeds for its script.
fn embedded_json(html: &str) -> serde_json::Value {
    let start = html
        .find("<script type=\"application/json\" id=\"data\">")
        .unwrap();
    let json = &html[start..];
    let json = &json[json.find('>').unwrap() + 1..json.find("</script>").unwrap()];
    serde_json::from_str(json).unwrap()
}

/// The figures of a JSON answer, as the page writes them in `data-bytes`.
fn figures_of(json: &serde_json::Value) -> Vec<(String, String)> {
    json["figures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|figure| {
            let bytes = figure["bytes"]
                .as_u64()
                .map_or(String::new(), |bytes| bytes.to_string());
            (figure["name"].as_str().unwrap().to_owned(), bytes)
        })
        .collect()
}

/// Every value of `attribute="…"` or `url(…)` in `html`.
fn references(html: &str) -> Vec<String> {
    let mut found = Vec::new();
    for marker in ["src=\"", "href=\"", "src='", "href='", "url("] {
        let close = match marker.chars().last() {
            Some('(') => ')',
            Some(quote) => quote,
            None => unreachable!(),
        };
        let mut rest = html;
        while let Some(at) = rest.find(marker) {
            rest = &rest[at + marker.len()..];
            found.push(rest[..rest.find(close).unwrap()].to_owned());
        }
    }
    found
}

#[tokio::test]
async fn the_page_is_one_self_contained_answer_with_its_figures() {
    let _serial = SERIAL.lock().await;
    let mut service = open();
    let answer = send(&mut service, request("GET", PAGE)).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(
        answer.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(answer.header("cache-control"), Some("no-store"));
    let csp = answer.header("content-security-policy").unwrap();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    let html = answer.text();
    assert!(html.starts_with("<!doctype html>"));
    assert!(html.contains("name=\"viewport\""), "usable at phone width");

    // Self-contained: no reference leaves the answer, and no address of anywhere else.
    for reference in references(html) {
        assert!(
            !reference.contains("//") && !reference.contains(':') || reference.starts_with("data:"),
            "external reference {reference:?}"
        );
    }
    assert!(!html.contains("http://") && !html.contains("https://"));
    assert!(html.len() < 64 * 1024, "{} bytes", html.len());

    // Each figure is in the HTML (readable without JavaScript) with its bytes, as in the JSON.
    let figures = figures_in(html);
    let names: Vec<&str> = figures.iter().map(|(name, _)| name.as_str()).collect();
    for name in [
        "resident",
        "dirty",
        "allocated",
        "active",
        "muzzy",
        "metadata",
        "rss",
        "limit",
    ] {
        assert!(names.contains(&name), "{name} missing: {names:?}");
    }
    for name in tower_jemalloc::JemallocStats::FIELDS {
        assert!(names.contains(name), "{name} missing: {names:?}");
    }
    let embedded = embedded_json(html);
    // The governor's figures after the cards.
    let governor: Vec<_> = figures
        .iter()
        .skip(figures_of(&embedded).len())
        .cloned()
        .collect();
    let figures: Vec<_> = figures[..figures.len() - governor.len()].to_vec();
    assert_eq!(figures, figures_of(&embedded));
    let given_back = embedded["governor"]["given_back_bytes"].as_u64().unwrap();
    let usage = embedded["governor"]["usage"]
        .as_u64()
        .map_or(String::new(), |usage| usage.to_string());
    assert_eq!(
        governor,
        [
            ("governor_usage".to_owned(), usage),
            ("given_back".to_owned(), given_back.to_string())
        ]
    );
    let resident: u64 = figures
        .iter()
        .find(|(n, _)| n == "resident")
        .unwrap()
        .1
        .parse()
        .unwrap();
    assert!(resident > 0);
    assert!(html.contains(">Gentle purge<") && html.contains(">Purge…<"));

    // The JSON the script polls: the same figures, the history, the paths it calls.
    let json = send(&mut service, request("GET", &format!("{PAGE}?format=json"))).await;
    assert_eq!(json.status, StatusCode::OK);
    assert_eq!(json.header("content-type"), Some("application/json"));
    let json = json.json();
    let live = figures_of(&json);
    assert_eq!(
        live.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        figures.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    assert!(
        live.iter()
            .all(|(name, bytes)| name == "limit" || !bytes.is_empty()),
        "{live:?}"
    );
    assert_eq!(json["endpoints"]["purge"], "/debug/jemalloc/purge");
    assert_eq!(json["endpoints"]["config"], "/debug/jemalloc/config");
    assert!(json["hints"].is_array());
    assert!(json["governor"]["pressure"].is_string());
    assert_eq!(json["history"]["capacity"], 180);
    assert_eq!(json["history"]["interval_ms"], 2000);
    let history = &json["history"];
    let length = history["at_ms"].as_array().unwrap().len();
    for column in ["resident", "dirty", "rss", "limit"] {
        assert_eq!(
            history[column].as_array().unwrap().len(),
            length,
            "{column}"
        );
    }
    assert_eq!(json["profiling"]["built"], cfg!(feature = "profiling"));

    // Per-route figures are off: the field is null, and the page says how to turn them on.
    assert!(json["routes"].is_null());
    assert!(html.contains("Per-route figures are off"));
    assert!(html.contains("per_route_allocation(true)"));

    // Accept: application/json asks for the JSON too.
    let accept = with_headers("GET", PAGE, &[("accept", "application/json")]);
    let answer = send(&mut service, accept).await;
    assert_eq!(answer.header("content-type"), Some("application/json"));
}

#[tokio::test]
async fn a_polling_page_is_never_rate_limited() {
    let _serial = SERIAL.lock().await;
    let mut service = service(
        JemallocLayer::builder()
            .allow_anonymous(Endpoint::Purge)
            .stats_rate_limit(1),
    );
    for _ in 0..30 {
        let answer = send(&mut service, request("GET", &format!("{PAGE}?format=json"))).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
}

#[tokio::test]
async fn head_bad_parameters_and_methods() {
    let _serial = SERIAL.lock().await;
    let mut service = open();
    let head = send(&mut service, request("HEAD", PAGE)).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert!(
        head.header("content-length")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 1000
    );
    for bad in ["?format=xml", "?token=x", "?format=json&format=json"] {
        let answer = send(&mut service, request("GET", &format!("{PAGE}{bad}"))).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(answer.text().lines().count(), 1);
    }
    let post = send(&mut service, request("POST", PAGE)).await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
}

#[tokio::test]
async fn closed_until_an_access_rule_and_its_own_rule_wins() {
    let _serial = SERIAL.lock().await;
    let mut closed = service(JemallocLayer::builder());
    let answer = send(&mut closed, request("GET", PAGE)).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert!(answer.text().contains("allow_anonymous(Endpoint::Page)"));
    assert!(figures_in(answer.text()).is_empty());

    // A rule of its own: the page closed to a predicate while purge is anonymous.
    let mut own = service(
        JemallocLayer::builder()
            .allow_anonymous(Endpoint::Purge)
            .authorize(Endpoint::Page, |_| false),
    );
    let answer = send(&mut own, request("GET", PAGE)).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert!(figures_in(answer.text()).is_empty());

    // Switched off: forwarded like any other path.
    let mut off = service(
        JemallocLayer::builder()
            .allow_anonymous(Endpoint::Purge)
            .without(Endpoint::Page),
    );
    assert_eq!(
        send(&mut off, request("GET", PAGE)).await.status,
        ECHO_STATUS
    );

    // Anonymous access answers only requests addressed to an IP or localhost.
    let mut open = open();
    let rebound = with_headers("GET", PAGE, &[("host", "evil.example:9070")]);
    let answer = send(&mut open, rebound).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert!(figures_in(answer.text()).is_empty());
}

#[tokio::test]
async fn with_a_token_the_page_asks_for_it_and_shows_nothing_without() {
    let _serial = SERIAL.lock().await;
    let mut service = service(JemallocLayer::builder().bearer_token(Endpoint::Purge, "s3cret"));

    // A browser's GET: 401 with the shell, which asks for the token and shows no figure.
    let answer = send(&mut service, request("GET", PAGE)).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.header("www-authenticate"), Some("Bearer"));
    assert_eq!(
        answer.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(answer.header("content-security-policy").is_some());
    let shell = answer.text();
    assert!(shell.contains("data-page=\"token\""));
    assert!(shell.contains("sessionStorage"));
    assert!(shell.contains("Authorization"));
    assert!(figures_in(shell).is_empty(), "no figure without the token");
    assert!(!shell.contains("id=\"data\""));
    assert!(
        !shell.contains("/debug/jemalloc/purge"),
        "no path without the token"
    );

    // The JSON without the token: the plain 401.
    let answer = send(&mut service, request("GET", &format!("{PAGE}?format=json"))).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        answer.header("content-type"),
        Some("text/plain; charset=utf-8")
    );

    // A token in the query string is never read.
    for query in [
        "?token=s3cret",
        "?access_token=s3cret",
        "?format=json&access_token=s3cret",
    ] {
        let answer = send(&mut service, request("GET", &format!("{PAGE}{query}"))).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{query}");
        assert!(figures_in(answer.text()).is_empty(), "{query}");
    }

    // A wrong token: the shell again.
    let wrong = with_headers("GET", PAGE, &[("authorization", "Bearer nope")]);
    let answer = send(&mut service, wrong).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert!(figures_in(answer.text()).is_empty());

    // With the header: the figures.
    for uri in [PAGE.to_owned(), format!("{PAGE}?format=json")] {
        let authorized = with_headers("GET", &uri, &[("authorization", "Bearer s3cret")]);
        let answer = send(&mut service, authorized).await;
        assert_eq!(answer.status, StatusCode::OK, "{uri}");
    }
    let authorized = with_headers("GET", PAGE, &[("authorization", "Bearer s3cret")]);
    let answer = send(&mut service, authorized).await;
    assert!(!figures_in(answer.text()).is_empty());
}

#[tokio::test]
async fn what_the_page_calls_keeps_its_cross_origin_protection() {
    let _serial = SERIAL.lock().await;
    let mut service = open();
    let json = send(&mut service, request("GET", &format!("{PAGE}?format=json")))
        .await
        .json();
    let purge = json["endpoints"]["purge"].as_str().unwrap().to_owned();
    let config = json["endpoints"]["config"].as_str().unwrap().to_owned();
    let host = ("host", "127.0.0.1:9070");
    let writes = [
        ("POST", format!("{purge}?mode=decay")),
        ("PUT", format!("{config}?dirty_decay_ms=10000")),
    ];
    for (method, uri) in &writes {
        for headers in [
            &[host, ("sec-fetch-site", "cross-site")][..],
            &[host, ("origin", "https://evil.example")][..],
        ] {
            let answer = send(&mut service, with_headers(method, uri, headers)).await;
            assert_eq!(
                answer.status,
                StatusCode::FORBIDDEN,
                "{method} {uri} {headers:?}"
            );
        }
    }
    // The page's own fetch (same origin) passes.
    let same = with_headers(
        "POST",
        &format!("{purge}?mode=decay"),
        &[
            host,
            ("sec-fetch-site", "same-origin"),
            ("origin", "http://127.0.0.1:9070"),
        ],
    );
    let answer = send(&mut service, same).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
}

#[tokio::test]
async fn a_moved_endpoint_is_called_where_it_is() {
    let _serial = SERIAL.lock().await;
    let mut service = service(
        JemallocLayer::builder()
            .allow_anonymous(Endpoint::Purge)
            .path(Endpoint::Purge, "/admin/purge")
            .path(Endpoint::Page, "/admin/memory")
            .without(Endpoint::Heap),
    );
    let json = send(&mut service, request("GET", "/admin/memory?format=json"))
        .await
        .json();
    let endpoints: BTreeMap<String, String> =
        serde_json::from_value(json["endpoints"].clone()).unwrap();
    assert_eq!(endpoints["purge"], "/admin/purge");
    assert!(!endpoints.contains_key("heap"));
}

/// Waits (bounded) until `count` threads are named `jemalloc-history`: a new thread names
/// itself once it runs, and an ending one is gone once it has returned.
async fn wait_for_history_threads(count: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while threads_named("jemalloc-history") != count {
        assert!(
            std::time::Instant::now() < deadline,
            "{} history threads, not {count}",
            threads_named("jemalloc-history")
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn one_history_thread_while_a_layer_serves_the_page() {
    let _serial = SERIAL.lock().await;
    let (mut first, second) = (open(), open());
    wait_for_history_threads(1).await;
    let json = send(&mut first, request("GET", &format!("{PAGE}?format=json")))
        .await
        .json();
    assert!(
        !json["history"]["at_ms"].as_array().unwrap().is_empty(),
        "a first sample as the history starts"
    );
    assert_eq!(
        threads_named("jemalloc-history"),
        1,
        "one per process, whatever the layers"
    );
    // The last layer's drop wakes the thread, which ends at once.
    drop((first, second));
    wait_for_history_threads(0).await;
    // A layer without the page starts none.
    let _off = service(
        JemallocLayer::builder()
            .allow_anonymous(Endpoint::Purge)
            .without(Endpoint::Page),
    );
    assert_eq!(threads_named("jemalloc-history"), 0);
}
