//! Safe defaults and bounded work: debug endpoints closed until an access rule is set, no
//! website able to drive them through a browser (cross-origin writes, DNS rebinding), strict
//! requests on them, stats dumps shared and bounded, purge telemetry present from the start.
#![cfg(all(feature = "jemalloc", not(target_env = "msvc")))]

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::Layer;
use tower_jemalloc::{Endpoint, JemallocLayer, JemallocLayerBuilder};

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

fn service(builder: JemallocLayerBuilder) -> JemallocServiceOf {
    let (echo, _) = recording_echo();
    builder
        .purge_cooldown(Duration::ZERO)
        .build()
        .unwrap()
        .layer(echo)
}

type JemallocServiceOf = tower_jemalloc::JemallocService<Echo>;

/// Held by the tests that expect a purge to run: purges take one process-wide slot, so two
/// tests purging at once would see 409.
static PURGES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn debug_endpoints_are_closed_by_default_and_metrics_open() {
    let mut service = service(JemallocLayer::builder());
    assert_eq!(
        send(&mut service, request("GET", "/metrics")).await.status,
        StatusCode::OK
    );
    for (method, path, endpoint) in [
        ("POST", "/debug/jemalloc/purge", "Purge"),
        ("GET", "/debug/jemalloc/stats", "Stats"),
        ("GET", "/debug/jemalloc/config", "Config"),
        ("PUT", "/debug/jemalloc/config?dirty_decay_ms=0", "Config"),
        ("GET", "/debug/pprof/heap", "Heap"),
        ("GET", "/debug/jemalloc/profiling", "Profiling"),
        ("PUT", "/debug/jemalloc/profiling?active=true", "Profiling"),
    ] {
        let answer = send(&mut service, request(method, path)).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{path}");
        let reason = answer.text();
        assert_eq!(reason.lines().count(), 1, "{reason}");
        for method in ["bearer_token", "authorize", "allow_anonymous"] {
            assert!(
                reason.contains(&format!("{method}(Endpoint::{endpoint}")),
                "{reason}"
            );
        }
    }
    // A wrong method is still a 405, whoever asks.
    let answer = send(&mut service, request("GET", "/debug/jemalloc/purge")).await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn a_token_or_the_anonymous_opt_in_opens_them() {
    let _purges = PURGES.lock().await;
    let mut guarded = service(JemallocLayer::builder().bearer_token(Endpoint::Purge, "s3cret"));
    for path in ["/debug/jemalloc/stats?format=text"] {
        let answer = send(&mut guarded, request("GET", path)).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        let mut with_token = request("GET", path);
        with_token
            .headers_mut()
            .insert("authorization", "Bearer s3cret".parse().unwrap());
        assert_eq!(send(&mut guarded, with_token).await.status, StatusCode::OK);
    }
    let mut open = service(JemallocLayer::builder().allow_anonymous(Endpoint::Stats));
    let answer = send(
        &mut open,
        request("GET", "/debug/jemalloc/stats?format=text"),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    // Stats has its own rule here; purge stays closed.
    let answer = send(&mut open, request("POST", "/debug/jemalloc/purge")).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn two_authorization_headers_run_nothing() {
    let _purges = PURGES.lock().await;
    let mut service = service(JemallocLayer::builder().bearer_token(Endpoint::Purge, "s3cret"));
    for pair in [
        ["Bearer wrong", "Bearer s3cret"],
        ["Bearer s3cret", "Bearer wrong"],
    ] {
        let mut twice = request("POST", "/debug/jemalloc/purge");
        for value in pair {
            twice
                .headers_mut()
                .append("authorization", value.parse().unwrap());
        }
        let answer = send(&mut service, twice).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{pair:?}");
        assert_eq!(
            answer.text(),
            "more than one Authorization header; send exactly one\n"
        );
    }
}

#[tokio::test]
async fn unknown_parameters_are_refused_naming_the_allowed_ones() {
    let mut service = service(JemallocLayer::builder().allow_anonymous(Endpoint::Purge));
    for (method, uri, allowed) in [
        ("POST", "/debug/jemalloc/purge?MODE=bogus", "accepts mode"),
        ("POST", "/debug/jemalloc/purge?mod=decay", "accepts mode"),
        ("GET", "/debug/jemalloc/stats?fmt=text", "accepts format"),
    ] {
        let answer = send(&mut service, request(method, uri)).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{uri}");
        assert!(answer.text().contains(allowed), "{}", answer.text());
    }
    // /metrics takes whatever parameters a scrape config adds.
    let answer = send(&mut service, request("GET", "/metrics?target=x")).await;
    assert_eq!(answer.status, StatusCode::OK);
}

/// Requests in flight together share one dump, and a finished dump answers for the reuse
/// window: a burst costs one dump, counted on `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stats_burst_costs_one_dump() {
    let service = service(
        JemallocLayer::builder()
            .allow_anonymous(Endpoint::Stats)
            .stats_rate_limit(1000)
            .stats_reuse_window(Duration::from_secs(60)),
    );
    let dumps = |text: &str| {
        parse_exposition(text)
            .samples
            .iter()
            .find(|s| {
                s.name == "jemalloc_stats_dumps_total"
                    && s.labels.get("format").map(String::as_str) == Some("json")
            })
            .map(|s| s.value)
    };
    let mut first = service.clone();
    let before = dumps(send(&mut first, request("GET", "/metrics")).await.text());
    assert_eq!(before, Some(0.0), "the counter is there from the start");

    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let mut service = service.clone();
        burst.spawn(
            async move { send(&mut service, request("GET", "/debug/jemalloc/stats")).await },
        );
    }
    let mut lengths = Vec::new();
    while let Some(answer) = burst.join_next().await {
        let answer = answer.unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        lengths.push(answer.body.len());
    }
    lengths.dedup();
    assert_eq!(lengths.len(), 1, "every request got the same dump");

    // HEAD answers from the held dump, with its length.
    let head = send(&mut first, request("HEAD", "/debug/jemalloc/stats")).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(
        head.header("content-length"),
        Some(&*lengths[0].to_string())
    );

    let after = dumps(send(&mut first, request("GET", "/metrics")).await.text());
    assert_eq!(after, Some(1.0));
}

/// Beyond the rate limit, a stats request gets a 429 with `Retry-After` and no dump.
#[tokio::test]
async fn stats_answers_are_rate_limited() {
    let mut service = service(
        JemallocLayer::builder()
            .allow_anonymous(Endpoint::Stats)
            .stats_rate_limit(2),
    );
    let statuses: Vec<_> = {
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let answer = send(
                &mut service,
                request("GET", "/debug/jemalloc/stats?format=text"),
            )
            .await;
            statuses.push((
                answer.status,
                answer.header("retry-after").map(str::to_owned),
            ));
        }
        statuses
    };
    assert_eq!(statuses[0].0, StatusCode::OK);
    assert_eq!(statuses[1].0, StatusCode::OK);
    assert_eq!(
        statuses[2],
        (StatusCode::TOO_MANY_REQUESTS, Some("1".to_owned()))
    );
    // HEAD is not counted.
    let head = send(
        &mut service,
        request("HEAD", "/debug/jemalloc/stats?format=text"),
    )
    .await;
    assert_eq!(head.status, StatusCode::OK);
}

#[tokio::test]
async fn head_on_stats_runs_no_dump_when_none_is_held() {
    let mut service = service(JemallocLayer::builder().allow_anonymous(Endpoint::Stats));
    let head = send(
        &mut service,
        request("HEAD", "/debug/jemalloc/stats?format=text"),
    )
    .await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(
        head.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    let metrics = send(&mut service, request("GET", "/metrics")).await;
    assert!(
        metrics.text().lines().any(
            |l| l.starts_with("jemalloc_stats_dumps_total{format=\"text\"") && l.ends_with(" 0")
        ),
        "{}",
        metrics.text()
    );
}

/// The value of `name{mode="<mode>"}`.
fn by_mode(exposition: &Exposition, name: &str, mode: &str) -> Option<f64> {
    exposition
        .samples
        .iter()
        .find(|s| s.name == name && s.labels.get("mode").map(String::as_str) == Some(mode))
        .map(|s| s.value)
}

#[tokio::test]
async fn purge_telemetry_is_exported_at_zero_before_any_purge() {
    let _purges = PURGES.lock().await;
    let mut service = service(
        JemallocLayer::builder()
            .namespace("restate")
            .allow_anonymous(Endpoint::Purge),
    );
    let answer = send(&mut service, request("GET", "/metrics")).await;
    let exposition = parse_exposition(answer.text());
    assert_eq!(
        exposition.types["restate_jemalloc_purge_duration_seconds"],
        "histogram"
    );
    for mode in ["purge", "decay"] {
        for suffix in ["count", "sum"] {
            let name = format!("restate_jemalloc_purge_duration_seconds_{suffix}");
            assert_eq!(
                by_mode(&exposition, &name, mode),
                Some(0.0),
                "{name} {mode}"
            );
        }
        let buckets = exposition.samples.iter().filter(|s| {
            s.name == "restate_jemalloc_purge_duration_seconds_bucket"
                && s.labels.get("mode").map(String::as_str) == Some(mode)
        });
        // 12 bounds and +Inf, every one at 0, with the labels a measured series has.
        assert_eq!(
            buckets
                .inspect(|s| {
                    assert_eq!(s.value, 0.0);
                    assert_eq!(s.labels["otel_scope_name"], "tower-jemalloc");
                })
                .count(),
            13
        );
        for result in ["ok", "error"] {
            let found = exposition.samples.iter().find(|s| {
                s.name == "restate_jemalloc_purges_total"
                    && s.labels.get("mode").map(String::as_str) == Some(mode)
                    && s.labels.get("result").map(String::as_str) == Some(result)
            });
            assert_eq!(found.map(|s| s.value), Some(0.0), "{mode} {result}");
        }
        let released = "restate_jemalloc_purge_released_bytes_total";
        assert_eq!(by_mode(&exposition, released, mode), Some(0.0), "{mode}");
    }

    // After a decay purge, its series counts it and the purge mode's stays at zero.
    let purge = send(
        &mut service,
        request("POST", "/debug/jemalloc/purge?mode=decay"),
    )
    .await;
    assert_eq!(purge.status, StatusCode::OK, "{}", purge.text());
    let answer = send(&mut service, request("GET", "/metrics")).await;
    let exposition = parse_exposition(answer.text());
    let count = "restate_jemalloc_purge_duration_seconds_count";
    assert_eq!(by_mode(&exposition, count, "decay"), Some(1.0));
    assert_eq!(by_mode(&exposition, count, "purge"), Some(0.0));
    assert_eq!(
        exposition
            .samples
            .iter()
            .filter(|s| s.name == count)
            .count(),
        2,
        "one series per mode, none twice: {}",
        answer.text()
    );
}

/// 256 scrapes at once: none gets a 503 with the default limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_scrapes_all_get_200() {
    let service = service(JemallocLayer::builder());
    let mut scrapes = tokio::task::JoinSet::new();
    for _ in 0..256 {
        let mut service = service.clone();
        scrapes.spawn(async move { send(&mut service, request("GET", "/metrics")).await.status });
    }
    while let Some(status) = scrapes.join_next().await {
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
}

/// Header names and values.
type Headers<'a> = &'a [(&'a str, &'a str)];

/// `request(method, uri)` with `headers`.
fn with_headers(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut request = request(method, uri);
    for (name, value) in headers {
        let name = http::HeaderName::from_bytes(name.as_bytes()).unwrap();
        request.headers_mut().append(name, value.parse().unwrap());
    }
    request
}

/// How many purges of `mode=purge` the layer counted, by result.
async fn purges(service: &mut JemallocServiceOf) -> (f64, f64) {
    let exposition = parse_exposition(send(service, request("GET", "/metrics")).await.text());
    let count = |result: &str| {
        exposition
            .samples
            .iter()
            .find(|s| {
                s.name == "jemalloc_purges_total"
                    && s.labels.get("mode").map(String::as_str) == Some("purge")
                    && s.labels.get("result").map(String::as_str) == Some(result)
            })
            .map_or(f64::NAN, |s| s.value)
    };
    (count("ok"), count("error"))
}

/// The measurement: a page on another site made the browser POST a purge, and it ran.
/// Now it is refused, whatever the access rule, and nothing runs; curl and same-origin pages
/// are unaffected.
#[tokio::test]
async fn no_other_website_can_make_a_browser_change_anything() {
    let _purges = PURGES.lock().await;
    let host = ("host", "127.0.0.1:9070");
    let refused_writes: [(&str, &str, Headers<'_>); 6] = [
        (
            "POST",
            "/debug/jemalloc/purge",
            &[
                host,
                ("origin", "https://evil.example"),
                ("sec-fetch-site", "cross-site"),
            ],
        ),
        (
            "POST",
            "/debug/jemalloc/purge",
            &[host, ("sec-fetch-site", "same-site")],
        ),
        // A browser without Sec-Fetch-Site: the Origin decides.
        (
            "POST",
            "/debug/jemalloc/purge",
            &[host, ("origin", "https://evil.example")],
        ),
        ("POST", "/debug/jemalloc/purge", &[host, ("origin", "null")]),
        (
            "PUT",
            "/debug/jemalloc/config?dirty_decay_ms=0",
            &[host, ("origin", "http://127.0.0.1:8080")],
        ),
        (
            "PUT",
            "/debug/jemalloc/profiling?active=true",
            &[host, ("sec-fetch-site", "cross-site")],
        ),
    ];
    let anonymous = JemallocLayer::builder().allow_anonymous(Endpoint::Purge);
    let token = JemallocLayer::builder().bearer_token(Endpoint::Purge, "s3cret");
    for (rule, builder) in [("anonymous", anonymous), ("token", token)] {
        let mut service = service(builder);
        for (method, uri, headers) in refused_writes {
            let mut request = with_headers(method, uri, headers);
            request
                .headers_mut()
                .insert("authorization", "Bearer s3cret".parse().unwrap());
            let answer = send(&mut service, request).await;
            assert_eq!(
                answer.status,
                StatusCode::FORBIDDEN,
                "{rule}: {method} {uri} {headers:?}"
            );
            let reason = answer.text();
            assert_eq!(reason.lines().count(), 1, "{reason}");
            assert!(
                reason.starts_with("cross-origin request refused: "),
                "{reason}"
            );
            assert!(reason.contains("curl or a script"), "{reason}");
        }
        assert_eq!(
            purges(&mut service).await,
            (0.0, 0.0),
            "{rule}: nothing ran"
        );
    }

    let mut service = service(JemallocLayer::builder().allow_anonymous(Endpoint::Purge));
    // curl, a script, Prometheus: no Origin, no Sec-Fetch-Site.
    let curl = with_headers("POST", "/debug/jemalloc/purge", &[host]);
    assert_eq!(send(&mut service, curl).await.status, StatusCode::OK);
    // A page of this very origin, or the user's own navigation.
    for headers in [
        &[host, ("origin", "http://127.0.0.1:9070")][..],
        &[
            host,
            ("origin", "http://127.0.0.1:9070"),
            ("sec-fetch-site", "same-origin"),
        ],
        &[host, ("sec-fetch-site", "none")],
    ] {
        let answer = send(
            &mut service,
            with_headers("POST", "/debug/jemalloc/purge", headers),
        )
        .await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "{headers:?}: {}",
            answer.text()
        );
    }
    assert_eq!(purges(&mut service).await, (4.0, 0.0));
    // Reading is not a write: a cross-site GET gets its answer (which the page cannot read
    // without CORS, and the layer grants none).
    let answer = send(
        &mut service,
        with_headers(
            "GET",
            "/debug/jemalloc/stats?format=text",
            &[host, ("sec-fetch-site", "cross-site")],
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("access-control-allow-origin"), None);
}

/// DNS rebinding: the attacker's host name, re-pointed at 127.0.0.1, is refused on every
/// method of an anonymous debug endpoint; IP literals and localhost pass, and so do token
/// access and `/metrics`.
#[tokio::test]
async fn anonymous_access_answers_only_ip_literals_and_localhost() {
    let _purges = PURGES.lock().await;
    let mut anonymous = service(JemallocLayer::builder().allow_anonymous(Endpoint::Purge));
    for (method, uri) in [
        ("POST", "/debug/jemalloc/purge"),
        ("GET", "/debug/jemalloc/stats?format=text"),
        ("HEAD", "/debug/jemalloc/stats"),
        ("GET", "/debug/jemalloc/config"),
        ("PUT", "/debug/jemalloc/config?dirty_decay_ms=1000"),
    ] {
        for host in [
            "attacker.example",
            "attacker.example:9070",
            "localhost.evil.example",
        ] {
            let answer = send(&mut anonymous, with_headers(method, uri, &[("host", host)])).await;
            assert_eq!(
                answer.status,
                StatusCode::FORBIDDEN,
                "{method} {uri} {host}"
            );
            if method != "HEAD" {
                let reason = answer.text();
                assert_eq!(reason.lines().count(), 1, "{reason}");
                assert!(reason.contains("IP address or localhost"), "{reason}");
            }
        }
    }
    assert_eq!(purges(&mut anonymous).await, (0.0, 0.0));
    for host in [
        "127.0.0.1:9070",
        "[::1]:9070",
        "localhost:9070",
        "LocalHost.",
        "10.0.0.5",
    ] {
        let answer = send(
            &mut anonymous,
            with_headers(
                "GET",
                "/debug/jemalloc/stats?format=text",
                &[("host", host)],
            ),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{host}: {}", answer.text());
    }
    // HTTP/1.0 without Host: nothing to rebind.
    let answer = send(&mut anonymous, request("POST", "/debug/jemalloc/purge")).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    // /metrics is read-only and Prometheus may scrape it by name.
    let answer = send(
        &mut anonymous,
        with_headers(
            "GET",
            "/metrics",
            &[("host", "metrics.internal.example:9070")],
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);

    // A token is not something a rebinding page has: host names are fine with one.
    let mut guarded = service(JemallocLayer::builder().bearer_token(Endpoint::Purge, "s3cret"));
    let answer = send(
        &mut guarded,
        with_headers(
            "GET",
            "/debug/jemalloc/stats?format=text",
            &[
                ("host", "ops.example:9070"),
                ("authorization", "Bearer s3cret"),
            ],
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
}

/// Serves the layer as the example server does (anonymous on loopback) with hyper-util's
/// HTTP/1.1 and HTTP/2 connection builder on a loopback port; returns the address.
async fn serve_anonymous() -> std::net::SocketAddr {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::service::TowerToHyperService;
    let layer = JemallocLayer::builder()
        .allow_anonymous(Endpoint::Purge)
        .purge_cooldown(Duration::ZERO)
        .build()
        .unwrap();
    let app = tower::service_fn(|_: Request<hyper::body::Incoming>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from("app"))))
    });
    let service = layer.layer(app);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = http.serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    addr
}

/// Writes `head` on a new connection to `addr` and returns the status line of the answer:
/// what curl sends, byte for byte, with nothing a browser adds.
async fn raw_http1(addr: std::net::SocketAddr, head: &str) -> String {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer).into_owned();
        answer.lines().next().unwrap_or_default().to_owned()
    };
    tokio::time::timeout(client::TIMEOUT, exchange)
        .await
        .expect("an answer within the timeout")
}

/// On a real loopback socket: curl's requests pass (HTTP/1.1 with `Host: 127.0.0.1:port`,
/// HTTP/1.0 without `Host`); over HTTP/2 the `:authority` is what is checked, both for
/// rebinding and as the host an `Origin` must match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_passes_and_http2_authority_is_checked_on_a_real_socket() {
    let _purges = PURGES.lock().await;
    let addr = serve_anonymous().await;
    let port = addr.port();

    let curl = format!(
        "POST /debug/jemalloc/purge HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: curl/8.5.0\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(raw_http1(addr, &curl).await, "HTTP/1.1 200 OK");
    let http10 = "POST /debug/jemalloc/purge HTTP/1.0\r\n\r\n";
    assert_eq!(raw_http1(addr, http10).await, "HTTP/1.0 200 OK");
    let rebound = format!(
        "GET /debug/jemalloc/stats HTTP/1.1\r\nHost: attacker.example:{port}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(raw_http1(addr, &rebound).await, "HTTP/1.1 403 Forbidden");
    let cross_site = format!(
        "POST /debug/jemalloc/purge HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Origin: https://evil.example\r\nSec-Fetch-Site: cross-site\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(raw_http1(addr, &cross_site).await, "HTTP/1.1 403 Forbidden");

    // HTTP/2 with prior knowledge, on a connection to 127.0.0.1 whatever the URI names: the
    // URI's authority becomes `:authority`, and no Host header is sent.
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let mut h2 = |method: &str, authority: &str, path: &str, origin: Option<&str>| {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{authority}{path}"));
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        let request = request.body(Full::<Bytes>::default()).unwrap();
        let response = sender.send_request(request);
        async move {
            let response = tokio::time::timeout(client::TIMEOUT, response)
                .await
                .expect("an answer within the timeout")
                .unwrap();
            assert_eq!(response.version(), http::Version::HTTP_2);
            response.status()
        }
    };
    let local = format!("127.0.0.1:{port}");
    let rebound = format!("attacker.example:{port}");
    let stats = "/debug/jemalloc/stats?format=text";
    assert_eq!(h2("GET", &local, stats, None).await, StatusCode::OK);
    assert_eq!(
        h2("GET", &rebound, stats, None).await,
        StatusCode::FORBIDDEN
    );
    let purge = "/debug/jemalloc/purge";
    let own = format!("http://{local}");
    assert_eq!(h2("POST", &local, purge, Some(&own)).await, StatusCode::OK);
    let other = "http://127.0.0.1:1";
    assert_eq!(
        h2("POST", &local, purge, Some(other)).await,
        StatusCode::FORBIDDEN
    );
}
