//! Safe defaults and bounded work: debug endpoints closed until an access rule is set, strict
//! requests on them, stats dumps shared and bounded, purge telemetry present from the start.
#![cfg(all(feature = "jemalloc", not(target_env = "msvc")))]

mod common;

use common::*;
use http::StatusCode;
use std::time::Duration;
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
