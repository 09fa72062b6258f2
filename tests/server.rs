//! The layer in front of an axum application served by `axum::serve` on a real loopback
//! socket, hit with a real HTTP client; and the example server's own code (its `/demo/*`
//! guard, its refusal to start unguarded, its banner and its output), from `examples/common`.
#![cfg(all(feature = "jemalloc", not(target_env = "msvc")))]

mod common;

/// The examples' shared code, as the example server runs it.
#[path = "../examples/common/mod.rs"]
mod example;

use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use common::parse_exposition;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower_jemalloc::{Endpoint, JemallocLayer};

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

async fn start() -> std::net::SocketAddr {
    let router = Router::new()
        .route("/", get(|| async { "home" }))
        .route("/echo", post(|body: Bytes| async move { body }));
    let layer = JemallocLayer::builder()
        .allow_anonymous(Endpoint::Purge)
        .namespace("restate")
        .build()
        .unwrap();
    common::serve_axum(router, layer).await
}

async fn fetch(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    method: &str,
    uri: String,
    body: &'static [u8],
) -> (StatusCode, http::HeaderMap, Bytes) {
    let request = http::Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::new(Bytes::from_static(body)))
        .unwrap();
    let response =
        tokio::time::timeout(std::time::Duration::from_secs(30), client.request(request))
            .await
            .expect("answer within 30 s")
            .unwrap();
    let (parts, body) = response.into_parts();
    (
        parts.status,
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_serve_with_a_real_client() {
    let addr = start().await;
    let client = Client::builder(TokioExecutor::new()).build_http();

    let (status, _, body) = fetch(&client, "GET", format!("http://{addr}/"), b"").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"home"[..]));

    let (status, _, body) = fetch(&client, "POST", format!("http://{addr}/echo"), b"ping").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ping"[..]));

    let (status, _, _) = fetch(&client, "GET", format!("http://{addr}/nope"), b"").await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "the router's own 404 passes through"
    );

    let (status, headers, body) =
        fetch(&client, "GET", format!("http://{addr}/metrics"), b"").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "text/plain; version=0.0.4");
    let exposition = parse_exposition(std::str::from_utf8(&body).unwrap());
    assert!(
        exposition
            .value("restate_jemalloc_allocated_bytes")
            .unwrap()
            > 0.0
    );

    let (status, headers, body) = fetch(
        &client,
        "POST",
        format!("http://{addr}/debug/jemalloc/purge"),
        b"ignored",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert_eq!(headers["content-type"], "application/json");
    let report: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(report["released_bytes"].is_u64());

    let (status, headers, _) = fetch(
        &client,
        "DELETE",
        format!("http://{addr}/debug/jemalloc/purge"),
        b"",
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers["allow"], "POST, PUT");
}

#[tokio::test]
async fn router_layer_also_reaches_unmatched_paths() {
    use common::{request, send};
    let router: Router = Router::new().route("/", get(|| async { "home" })).layer(
        JemallocLayer::builder()
            .allow_anonymous(Endpoint::Purge)
            .build()
            .unwrap(),
    );
    let mut app = router;
    let answer = send(&mut app, request("GET", "/metrics")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.text().contains("jemalloc_allocated_bytes"));
    let answer = send(&mut app, request("GET", "/")).await;
    assert_eq!(answer.text(), "home");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_purge_body_gets_413_without_being_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let router: Router = Router::new().route("/", get(|| async { "home" }));
    let layer = JemallocLayer::builder()
        .bearer_token(Endpoint::Purge, "t")
        .build()
        .unwrap();
    let addr = common::serve_axum(router, layer).await;

    // Announce 1 GiB, send 64 KiB of it, and wait for the answer: it must come without the
    // server waiting for (or buffering) the rest.
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"POST /debug/jemalloc/purge HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 1073741824\r\n\r\n",
        )
        .await
        .unwrap();
    stream.write_all(&vec![b'x'; 64 * 1024]).await.unwrap();
    let mut answer = vec![0; 1024];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut answer))
        .await
        .expect("answered within 10 s, without the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(
        answer.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
        "{answer}"
    );
    assert!(answer.contains("connection: close\r\n"), "{answer}");
}

/// A body sent to an intercepted path is read and dropped before the answer, so the client
/// gets the whole answer (a 400 KB stats dump) and never a reset connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stats_get_with_a_1_mb_body_gets_the_whole_answer() {
    let router: Router = Router::new().route("/", get(|| async { "home" }));
    let layer = JemallocLayer::builder()
        .allow_anonymous(Endpoint::Stats)
        .build()
        .unwrap();
    let addr = common::serve_axum(router, layer).await;
    let body: &'static [u8] = Box::leak(vec![b'x'; 1_000_000].into_boxed_slice());
    let client = common::client::http1();
    for _ in 0..3 {
        let url = format!("http://{addr}/debug/jemalloc/stats");
        let (_, answer) = common::client::fetch(&client, "GET", &url, body).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        assert!(answer.json()["stats"]["jemalloc"].is_object());
    }
}

/// The example server's `/demo/*` guard, with a stand-in route and the peer address set as
/// `serve.rs` sets it (no traffic leaves loopback: the requests go through `oneshot`).
#[tokio::test]
async fn demo_routes_answer_loopback_peers_and_others_only_with_the_token() {
    use axum::extract::ConnectInfo;
    use example::loopback::{loopback_or_token, LoopbackOrToken};
    use tower::ServiceExt;

    let app = |token: Option<&str>| {
        let guard = LoopbackOrToken::new("the /demo/* routes", token);
        Router::new()
            .route("/demo/churn", post(|| async { "churned" }))
            .route_layer(axum::middleware::from_fn_with_state(
                guard,
                loopback_or_token,
            ))
    };
    async fn call(
        router: Router,
        peer: Option<&str>,
        authorization: Option<&str>,
    ) -> (StatusCode, Option<http::HeaderValue>, String) {
        let mut request = http::Request::builder().method("POST").uri("/demo/churn");
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        let mut request = request.body(axum::body::Body::empty()).unwrap();
        if let Some(peer) = peer {
            let peer: std::net::SocketAddr = peer.parse().unwrap();
            request.extensions_mut().insert(ConnectInfo(peer));
        }
        let response = router.oneshot(request).await.unwrap();
        let status = response.status();
        let www_authenticate = response.headers().get("www-authenticate").cloned();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            www_authenticate,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    for token in [None, Some("s3cret")] {
        for peer in ["127.0.0.1:50000", "[::1]:50000", "[::ffff:127.0.0.1]:50000"] {
            let (status, _, body) = call(app(token), Some(peer), None).await;
            assert_eq!(
                (status, body.as_str()),
                (StatusCode::OK, "churned"),
                "{peer}"
            );
        }
    }

    // No token: other peers (and requests without a known peer) are refused, saying why.
    for peer in [Some("203.0.113.7:50000"), Some("[2001:db8::7]:50000"), None] {
        let (status, _, body) = call(app(None), peer, Some("Bearer anything")).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{peer:?}");
        assert_eq!(
            body,
            "the /demo/* routes allocate up to 4 GiB: they answer loopback peers only, unless \
             the server is given a token (--purge-token or PURGE_TOKEN) and the request \
             carries it\n"
        );
    }

    // A token: other peers need it.
    let remote = Some("203.0.113.7:50000");
    for sent in [
        None,
        Some("Bearer wrong"),
        Some("Bearer s3cre"),
        Some("s3cret"),
    ] {
        let (status, www_authenticate, body) = call(app(Some("s3cret")), remote, sent).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{sent:?}");
        assert_eq!(www_authenticate.unwrap(), "Bearer");
        assert!(body.contains("Authorization: Bearer TOKEN"), "{body}");
    }
    let (status, _, body) = call(app(Some("s3cret")), remote, Some("Bearer s3cret")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "churned"));
}

/// On a non-loopback address without a token the example servers refuse to start, naming
/// every endpoint a token would guard.
#[test]
fn the_refusal_to_start_names_every_guarded_endpoint() {
    if std::env::var_os("PURGE_TOKEN").is_some() {
        eprintln!("PURGE_TOKEN is set: the examples would start with it; nothing to check");
        return;
    }
    let args =
        |list: &[&str]| example::parse_from(list.iter().map(|a| a.to_string()), 9070, &[]).unwrap();
    let refusal = args(&["--addr", "0.0.0.0:9070"]).refusal().unwrap();
    for guarded in [
        "purge (/debug/jemalloc/purge)",
        "stats (/debug/jemalloc/stats)",
        "config (/debug/jemalloc/config)",
        "heap (/debug/pprof/heap)",
        "profiling (/debug/jemalloc/profiling)",
    ] {
        assert!(refusal.contains(guarded), "{guarded} missing: {refusal}");
    }
    assert!(refusal.starts_with("0.0.0.0:9070 is not a loopback address"));
    for endpoint in Endpoint::ALL.iter().filter(|e| **e != Endpoint::Metrics) {
        assert!(refusal.contains(endpoint.default_path()), "{refusal}");
    }
    assert!(!refusal.contains("/metrics"), "{refusal}");
    assert_eq!(args(&["--addr", "127.0.0.1:9070"]).refusal(), None);
    assert_eq!(args(&["--addr", "[::1]:9070"]).refusal(), None);
    assert_eq!(
        args(&["--addr", "0.0.0.0:9070", "--purge-token", "t"]).refusal(),
        None
    );
}

/// The banner's URLs work from this machine: never `http://0.0.0.0:…` or `http://[::]:…`.
#[test]
fn banners_print_reachable_urls() {
    let listening = example::listening("0.0.0.0:9070".parse().unwrap());
    assert_eq!(
        listening,
        "listening on http://127.0.0.1:9070 (bound to 0.0.0.0:9070: every IPv4 address of this machine)"
    );
    let listening = example::listening("[::]:9070".parse().unwrap());
    assert!(
        listening.starts_with("listening on http://[::1]:9070 (bound to [::]:9070"),
        "{listening}"
    );
    assert_eq!(
        example::listening("127.0.0.1:9070".parse().unwrap()),
        "listening on http://127.0.0.1:9070"
    );
    let args = example::parse_from(
        ["--addr", "0.0.0.0:9070", "--purge-token", "t"]
            .map(String::from)
            .into_iter(),
        9070,
        &[],
    )
    .unwrap();
    let purge = args.purge_command("0.0.0.0:9070".parse().unwrap());
    assert!(
        purge.ends_with(" http://127.0.0.1:9070/debug/jemalloc/purge"),
        "{purge}"
    );
}

/// Output to a closed pipe (the server piped into `head`) is dropped, not a panic.
#[test]
fn output_to_a_closed_pipe_does_not_panic() {
    use std::io::Write;
    let (reader, mut writer) = std::io::pipe().unwrap();
    drop(reader);
    let err = writer.write_all(b"x\n").unwrap_err();
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::BrokenPipe,
        "the pipe is closed"
    );
    example::say_to(&mut writer, "listening on http://127.0.0.1:9070");
    example::say_to(&mut writer, format_args!("  {}", "shutting down"));
}

/// `POST /demo/work` as the example server mounts it: behind the `/demo/*` guard, with the
/// bounds given (the server's are 64 at once and 4096 MiB in all).
fn work_app(work: example::work::Work) -> Router {
    use example::loopback::{loopback_or_token, LoopbackOrToken};
    let guard = LoopbackOrToken::new("the /demo/* routes", None);
    example::work::router(work).route_layer(axum::middleware::from_fn_with_state(
        guard,
        loopback_or_token,
    ))
}

/// One `POST` to `app` from `peer`: status, `Retry-After`, content type and body.
async fn work_call(
    app: Router,
    query: &str,
    peer: &str,
) -> (StatusCode, Option<String>, Option<String>, String) {
    use axum::extract::ConnectInfo;
    use tower::ServiceExt;
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("/demo/work{query}"))
        .body(axum::body::Body::empty())
        .unwrap();
    let peer: std::net::SocketAddr = peer.parse().unwrap();
    request.extensions_mut().insert(ConnectInfo(peer));
    let response = tokio::time::timeout(std::time::Duration::from_secs(30), app.oneshot(request))
        .await
        .expect("answered within 30 s")
        .unwrap();
    let (status, retry_after, content_type) = {
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        (
            response.status(),
            header("retry-after"),
            header("content-type"),
        )
    };
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        retry_after,
        content_type,
        String::from_utf8(body.to_vec()).unwrap(),
    )
}

const LOCAL: &str = "127.0.0.1:50000";

/// A loopback peer gets the memory it asks for, held for the time it asks, and the answer
/// says what it did; other peers are refused like on the other `/demo/*` routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_work_allocates_holds_and_answers() {
    let work = example::work::Work::default();
    let started = std::time::Instant::now();
    let (status, _, content_type, body) =
        work_call(work_app(work.clone()), "?mib=8&ms=300", LOCAL).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "{\"mib\":8,\"ms\":300}\n")
    );
    assert_eq!(content_type.as_deref(), Some("application/json"));
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(300),
        "held for the time asked"
    );
    assert_eq!((work.running(), work.held_mib()), (0, 0), "all given back");

    for (query, answer) in [
        ("?ms=5&mib=1", "{\"mib\":1,\"ms\":5}\n"),
        ("?mib=2", "{\"mib\":2,\"ms\":0}\n"),
    ] {
        let (status, _, _, body) = work_call(work_app(work.clone()), query, LOCAL).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, answer), "{query}");
    }
    // The largest order is accepted (parsed only: allocating 1 GiB is not this test's job).
    assert_eq!(
        example::work::parse_order(Some("mib=1024&ms=60000")),
        Ok(example::work::Order {
            mib: 1024,
            ms: 60_000
        })
    );

    let (status, _, _, body) =
        work_call(work_app(work.clone()), "?mib=1", "203.0.113.7:50000").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body.starts_with("the /demo/* routes allocate up to 4 GiB"),
        "{body}"
    );
}

/// Every bad query gets 400 and a one-line reason, before any memory is allocated.
#[tokio::test]
async fn demo_work_refuses_bad_queries_with_a_reason() {
    let work = example::work::Work::default();
    for (query, reason) in [
        (
            "",
            "missing query parameter mib (1 to 1024): how many MiB to allocate\n",
        ),
        (
            "?ms=10",
            "missing query parameter mib (1 to 1024): how many MiB to allocate\n",
        ),
        (
            "?mib=0",
            "mib must be an integer from 1 to 1024, got \"0\"\n",
        ),
        (
            "?mib=1025",
            "mib must be an integer from 1 to 1024, got \"1025\"\n",
        ),
        (
            "?mib=-1",
            "mib must be an integer from 1 to 1024, got \"-1\"\n",
        ),
        ("?mib=", "mib must be an integer from 1 to 1024, got \"\"\n"),
        (
            "?mib=1&ms=60001",
            "ms must be an integer from 0 to 60000, got \"60001\"\n",
        ),
        (
            "?mib=1&ms=1.5",
            "ms must be an integer from 0 to 60000, got \"1.5\"\n",
        ),
        ("?mib=1&mib=2", "query parameter mib given twice\n"),
        (
            "?mib=1&size=2",
            "unknown query parameter \"size\": /demo/work takes mib and ms\n",
        ),
    ] {
        let (status, _, _, body) = work_call(work_app(work.clone()), query, LOCAL).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::BAD_REQUEST, reason),
            "{query}"
        );
    }
    assert_eq!((work.running(), work.held_mib()), (0, 0));
}

/// Beyond the bounds (how many at once, how many MiB in all) a request gets 429 with
/// `Retry-After: 1` at once, and is served again once the others are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_work_is_bounded_in_count_and_memory() {
    let deadline = || std::time::Instant::now() + std::time::Duration::from_secs(20);
    async fn wait_for(what: impl Fn() -> bool, until: std::time::Instant) {
        while !what() {
            assert!(
                std::time::Instant::now() < until,
                "did not happen within 20 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    // Two at once: a third waits for nothing and gets 429.
    let work = example::work::Work::with_limits(2, 64);
    let holders: Vec<_> = (0..2)
        .map(|_| tokio::spawn(work_call(work_app(work.clone()), "?mib=1&ms=1500", LOCAL)))
        .collect();
    wait_for(|| work.running() == 2, deadline()).await;
    let (status, retry_after, _, body) = work_call(work_app(work.clone()), "?mib=1", LOCAL).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(
        body,
        "2 /demo/work requests are running: at most 2 at once\n"
    );
    for holder in holders {
        assert_eq!(holder.await.unwrap().0, StatusCode::OK);
    }
    let (status, _, _, _) = work_call(work_app(work.clone()), "?mib=1", LOCAL).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "served again once the others are done"
    );

    // 8 MiB in all: 6 held, 4 more is too many, 2 more fits.
    let work = example::work::Work::with_limits(4, 8);
    let holder = tokio::spawn(work_call(work_app(work.clone()), "?mib=6&ms=1500", LOCAL));
    wait_for(|| work.held_mib() == 6, deadline()).await;
    let (status, retry_after, _, body) = work_call(work_app(work.clone()), "?mib=4", LOCAL).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(
        body,
        "running /demo/work requests hold 6 MiB: at most 8 MiB in all, 4 more asked\n"
    );
    let (status, _, _, body) = work_call(work_app(work.clone()), "?mib=2", LOCAL).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "{\"mib\":2,\"ms\":0}\n")
    );
    assert_eq!(holder.await.unwrap().0, StatusCode::OK);
    assert_eq!((work.running(), work.held_mib()), (0, 0));
}

/// `--shed-requests` is a switch: it takes no value, and the next argument is read as a flag.
#[test]
fn switches_take_no_value() {
    let flags: &[example::Flag] = &[
        ("--memory-limit", "SIZE", "the limit"),
        ("--shed-requests", "", "shed"),
    ];
    let args = |list: &[&str]| example::parse_from(list.iter().map(|a| a.to_string()), 9070, flags);
    let parsed = args(&["--shed-requests", "--memory-limit", "320MiB"]).unwrap();
    assert_eq!(parsed.extra("--shed-requests"), Some("true"));
    assert_eq!(parsed.extra("--memory-limit"), Some("320MiB"));
    let parsed = args(&["--memory-limit", "90%"]).unwrap();
    assert_eq!(parsed.extra("--shed-requests"), None);
    assert_eq!(
        args(&["--memory-limit"]).err().as_deref(),
        Some("--memory-limit needs a value")
    );
}

/// The example server's `--memory-limit` and `--shed-requests` reach the layer: its config
/// endpoint shows them, and over the limit it sheds every forwarded request but the one that
/// frees memory. A limit the parser refuses stops the server with the reason.
#[tokio::test]
async fn memory_flags_reach_the_layer() {
    use common::{request, send};
    let args = |list: &[&str]| {
        example::parse_from(
            list.iter().map(|a| a.to_string()),
            9070,
            example::MEMORY_FLAGS,
        )
        .unwrap()
    };
    async fn config(args: &example::Args) -> serde_json::Value {
        let builder = JemallocLayer::builder().allow_anonymous(Endpoint::Purge);
        let layer = args.memory_flags(builder).unwrap().build().unwrap();
        let mut app: Router = Router::new().layer(layer);
        let answer = send(&mut app, request("GET", "/debug/jemalloc/config")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        answer.json()
    }

    // Far above what this test process uses, so that the process-wide governor gives nothing
    // back and sheds nothing while the other tests run.
    let limited = config(&args(&["--memory-limit", "8GiB", "--shed-requests"])).await;
    assert_eq!(limited["memory_limit"], 8u64 << 30, "{limited}");
    assert_eq!(limited["memory_limit_source"], "explicit", "{limited}");
    assert_eq!(limited["shed_requests"], true, "{limited}");
    assert!(args(&["--memory-limit", "8GiB"])
        .memory_summary()
        .starts_with("memory limit 8GiB: cached pages given back above 90 % of it; no shedding"));

    for list in [&[][..], &["--memory-limit", "none"][..]] {
        let parsed = args(list);
        let unlimited = config(&parsed).await;
        assert_eq!(
            unlimited["memory_limit"],
            serde_json::Value::Null,
            "{list:?}: {unlimited}"
        );
        assert_eq!(unlimited["shed_requests"], false, "{list:?}: {unlimited}");
        assert!(parsed.memory_summary().starts_with("no memory limit"));
    }

    // Over a 1 MiB limit (this process uses more; nothing brings it under), a layer built
    // with the flags sheds forwarded requests, but not the one that frees memory, and its own
    // endpoints answer. In this test, after the others: the limit is the process's.
    let shedding = args(&["--memory-limit", "1MiB", "--shed-requests"]);
    let builder = JemallocLayer::builder().allow_anonymous(Endpoint::Purge);
    let layer = shedding.memory_flags(builder).unwrap().build().unwrap();
    let mut app: Router = Router::new()
        .route("/demo/work", post(|| async { "worked" }))
        .route("/demo/leak", axum::routing::delete(|| async { "freed" }))
        .layer(layer);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let shed = loop {
        let answer = send(&mut app, request("POST", "/demo/work")).await;
        if answer.status == StatusCode::SERVICE_UNAVAILABLE {
            break answer;
        }
        assert_eq!(answer.text(), "worked");
        assert!(std::time::Instant::now() < until, "not shed within 20 s");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!(shed.headers["retry-after"], "1");
    assert!(
        shed.text().starts_with("shedding load: memory use "),
        "{}",
        shed.text()
    );
    let freed = send(&mut app, request("DELETE", "/demo/leak")).await;
    assert_eq!((freed.status, freed.text()), (StatusCode::OK, "freed"));
    let metrics = send(&mut app, request("GET", "/metrics")).await;
    assert_eq!(metrics.status, StatusCode::OK);
    drop(app);

    for bad in ["320MB", "0", "150%", ""] {
        let Err(reason) = args(&["--memory-limit", bad]).memory_flags(JemallocLayer::builder())
        else {
            panic!("--memory-limit {bad:?} accepted");
        };
        assert!(
            reason.starts_with(&format!(
                "--memory-limit: memory limit {bad:?} is not valid: "
            )),
            "{reason}"
        );
        assert!(!reason.contains('\n'), "one line: {reason}");
    }
}
