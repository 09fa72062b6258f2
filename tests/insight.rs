//! Allocator insight: the stats dump and its summary, purge modes, purge telemetry, the OS view
//! in the purge report, and the cheap gauges.
#![cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
// The serialising std mutex is held across awaits on purpose: every #[tokio::test] runs on its
// own runtime, and the purge slot and jemalloc settings it protects are process-wide.
#![allow(clippy::await_holding_lock)]

mod common;

use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use std::sync::Mutex;
use std::time::Duration;
use tower::Layer;
use tower_jemalloc::{Endpoint, JemallocLayer, JemallocService};

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

static SERIAL: Mutex<()> = Mutex::new(());

fn service(builder: tower_jemalloc::JemallocLayerBuilder) -> (JemallocService<Echo>, Recorder) {
    let (echo, seen) = recording_echo();
    (builder.build().unwrap().layer(echo), seen)
}

fn quiet() -> tower_jemalloc::JemallocLayerBuilder {
    JemallocLayer::builder()
        .allow_anonymous(Endpoint::Purge)
        .purge_cooldown(Duration::ZERO)
}

#[tokio::test]
async fn stats_json_has_a_summary_and_jemallocs_dump() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (mut service, seen) = service(quiet());
    let answer = send(&mut service, request("GET", "/debug/jemalloc/stats")).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let json = answer.json();
    let summary = &json["summary"];

    let version = tikv_jemalloc_ctl::version::read()
        .unwrap()
        .trim_end_matches('\0');
    assert!(!version.is_empty());
    assert_eq!(summary["version"], version);
    assert!(summary["background_thread"]["enabled_at_start"].is_boolean());
    assert_eq!(summary["background_thread"]["running"], false);
    assert!(summary["dirty_decay_ms"].is_i64());
    assert!(summary["muzzy_decay_ms"].is_i64());
    assert_eq!(
        summary["arenas"],
        tikv_jemalloc_ctl::arenas::narenas::read().unwrap()
    );
    assert!(summary["malloc_conf"]["compiled"].is_string());
    // tikv-jemalloc-sys's default build: prefixed, so these are the names jemalloc reads.
    assert_eq!(summary["malloc_conf"]["symbol"], "_rjem_malloc_conf");
    assert_eq!(
        summary["malloc_conf"]["environment_variable"],
        "_RJEM_MALLOC_CONF"
    );
    assert_eq!(
        summary["profiler"]["compiled_in"],
        cfg!(feature = "profiling")
    );
    for key in GAUGES {
        assert!(summary["stats"][key].is_u64(), "summary.stats.{key}");
    }
    assert!(summary["stats"]["allocated"].as_u64().unwrap() > 0);
    assert!(summary["ratios"]["active_to_allocated"].as_f64().unwrap() >= 1.0);
    assert!(summary["ratios"]["resident_to_active"].as_f64().unwrap() >= 1.0);
    let hints: Vec<&str> = summary["hints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    assert!(
        hints
            .iter()
            .any(|h| h.starts_with("Background threads are off")
                && h.contains("PUT /debug/jemalloc/config?background_thread=true")
                && h.contains("background_thread:true in _RJEM_MALLOC_CONF.")),
        "{hints:?}"
    );
    assert!(
        hints.iter().all(|h| !h.contains(" MALLOC_CONF")),
        "a prefixed build ignores MALLOC_CONF: {hints:?}"
    );
    assert_eq!(json["detail"], "full");
    // malloc_stats_print's own JSON, embedded as it is.
    assert_eq!(json["stats"]["jemalloc"]["version"], version);
    assert!(json["stats"]["jemalloc"]["stats"]["allocated"].is_u64());
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn stats_text_format_methods_and_bad_format() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (mut service, _) = service(quiet());
    let text = send(
        &mut service,
        request("GET", "/debug/jemalloc/stats?format=text"),
    )
    .await;
    assert_eq!(text.status, StatusCode::OK);
    assert_eq!(
        text.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert!(
        text.text().contains("Begin jemalloc statistics"),
        "{}",
        text.text()
    );

    let bad = send(
        &mut service,
        request("GET", "/debug/jemalloc/stats?format=xml"),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        bad.text(),
        "unknown format \"xml\": use format=json (the default) or format=text\n"
    );

    let head = send(&mut service, request("HEAD", "/debug/jemalloc/stats")).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());

    let post = send(&mut service, request("POST", "/debug/jemalloc/stats")).await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
}

#[tokio::test]
async fn stats_are_capped() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (mut big, _) = service(quiet());
    let full = send(&mut big, request("GET", "/debug/jemalloc/stats")).await;
    let full_len = full.body.len();

    // Room for the compact dump but not the full one: the answer falls back to compact.
    let (mut medium, _) = service(quiet().stats_max_bytes(full_len * 2 / 3));
    let compact = send(&mut medium, request("GET", "/debug/jemalloc/stats")).await;
    assert_eq!(compact.status, StatusCode::OK, "{}", compact.text());
    let json = compact.json();
    assert_eq!(json["detail"], "compact");
    assert!(json["stats"]["jemalloc"]["stats"]["allocated"].is_u64());
    eprintln!(
        "stats dump: full JSON {full_len} bytes, compact {} bytes",
        compact.body.len()
    );

    let (mut tiny, _) = service(quiet().stats_max_bytes(1000));
    let refused = send(&mut tiny, request("GET", "/debug/jemalloc/stats")).await;
    assert_eq!(refused.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        refused.text().contains("exceeds the cap of 1000 bytes"),
        "{}",
        refused.text()
    );
    let cut = send(
        &mut tiny,
        request("GET", "/debug/jemalloc/stats?format=text"),
    )
    .await;
    assert_eq!(cut.status, StatusCode::OK);
    assert!(cut.body.len() < 1200, "{}", cut.body.len());
    assert!(cut
        .text()
        .ends_with("[truncated at 1000 bytes: raise stats_max_bytes, or use format=json]\n"));
}

fn with_auth(method: &str, uri: &str, token: &str) -> Request<Full<bytes::Bytes>> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {token}"))
        .body(Full::default())
        .unwrap()
}

#[tokio::test]
async fn stats_are_guarded_like_purge_unless_told_otherwise() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (mut inherited, _) = service(quiet().bearer_token(Endpoint::Purge, "p"));
    let answer = send(&mut inherited, request("GET", "/debug/jemalloc/stats")).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let answer = send(
        &mut inherited,
        with_auth("GET", "/debug/jemalloc/stats", "p"),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);

    let (mut own, _) = service(
        quiet()
            .bearer_token(Endpoint::Purge, "p")
            .bearer_token(Endpoint::Stats, "s"),
    );
    let answer = send(&mut own, with_auth("GET", "/debug/jemalloc/stats", "p")).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let answer = send(&mut own, with_auth("GET", "/debug/jemalloc/stats", "s")).await;
    assert_eq!(answer.status, StatusCode::OK);

    let (mut predicate, _) =
        service(quiet().authorize(Endpoint::Stats, |r| r.headers.contains_key("x-ops")));
    let answer = send(&mut predicate, request("GET", "/debug/jemalloc/stats")).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);

    let (mut custom, seen) = service(quiet().path(Endpoint::Stats, "/internal/jemalloc"));
    let answer = send(
        &mut custom,
        request("GET", "/internal/jemalloc?format=text"),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let answer = send(&mut custom, request("GET", "/debug/jemalloc/stats")).await;
    assert_eq!(answer.status, ECHO_STATUS, "the default path is forwarded");
    let (mut off, _) = service(quiet().without(Endpoint::Stats));
    let answer = send(&mut off, request("GET", "/debug/jemalloc/stats")).await;
    assert_eq!(answer.status, ECHO_STATUS);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn purge_modes_and_the_os_view() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (mut service, _) = service(quiet());

    churn(64);
    let decay = send(
        &mut service,
        request("POST", "/debug/jemalloc/purge?mode=decay"),
    )
    .await;
    assert_eq!(decay.status, StatusCode::OK, "{}", decay.text());
    let report = decay.json();
    assert_eq!(report["mode"], "decay");

    let purge = send(
        &mut service,
        request("POST", "/debug/jemalloc/purge?mode=purge"),
    )
    .await;
    let report = purge.json();
    assert_eq!(report["mode"], "purge");
    // Small allocations elsewhere (the test harness) may leave a few dirty pages behind.
    assert!(
        report["after"]["dirty"].as_u64().unwrap() < 1 << 20,
        "{report}"
    );
    // Linux: the kernel's view, before and after.
    for side in ["before", "after"] {
        assert!(report["os"][side]["rss"].as_u64().unwrap() > 0, "{report}");
        assert!(report["os"][side]["lazy_free"].is_u64(), "{report}");
    }

    let bad = send(
        &mut service,
        request("PUT", "/debug/jemalloc/purge?mode=all"),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        bad.text(),
        "unknown purge mode \"all\": use mode=purge (the default) or mode=decay\n"
    );
}

#[cfg(fault_injection)]
#[tokio::test]
async fn purge_telemetry_reaches_metrics() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (mut service, _) = service(quiet().namespace("restate"));

    churn(32);
    assert_eq!(
        send(&mut service, request("POST", "/debug/jemalloc/purge"))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        send(
            &mut service,
            request("POST", "/debug/jemalloc/purge?mode=decay")
        )
        .await
        .status,
        StatusCode::OK
    );
    tower_jemalloc::__private::fail_key("arena.4096.purge");
    let failed = send(&mut service, request("POST", "/debug/jemalloc/purge")).await;
    tower_jemalloc::__private::clear_faults();
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);

    let metrics = send(&mut service, request("GET", "/metrics")).await;
    let exposition = parse_exposition(metrics.text());
    let sample = |name: &str, labels: &[(&str, &str)]| {
        exposition
            .samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .unwrap_or_else(|| panic!("{name} {labels:?} in\n{}", metrics.text()))
            .value
    };
    assert_eq!(exposition.types["restate_jemalloc_purges_total"], "counter");
    assert_eq!(
        sample(
            "restate_jemalloc_purges_total",
            &[("result", "ok"), ("mode", "purge")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            "restate_jemalloc_purges_total",
            &[("result", "ok"), ("mode", "decay")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            "restate_jemalloc_purges_total",
            &[("result", "error"), ("mode", "purge")]
        ),
        1.0
    );
    assert_eq!(
        exposition.types["restate_jemalloc_purge_duration_seconds"],
        "histogram"
    );
    assert_eq!(
        sample(
            "restate_jemalloc_purge_duration_seconds_count",
            &[("mode", "purge")]
        ),
        1.0
    );
    assert!(
        sample(
            "restate_jemalloc_purge_released_bytes_total",
            &[("mode", "purge")]
        ) >= 16.0 * 1024.0 * 1024.0
    );
}

#[tokio::test]
async fn cheap_gauges() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (mut service, _) = service(quiet());
    let scrape = |answer: Answer| parse_exposition(answer.text());

    let exposition = scrape(send(&mut service, request("GET", "/metrics")).await);
    let arenas = tikv_jemalloc_ctl::arenas::narenas::read().unwrap();
    assert_eq!(exposition.value("jemalloc_arenas"), Some(f64::from(arenas)));
    assert_eq!(exposition.value("jemalloc_background_threads"), Some(0.0));
    let info = exposition
        .samples
        .iter()
        .find(|s| s.name == "jemalloc_info")
        .expect("jemalloc_info");
    assert_eq!(info.value, 1.0);
    assert_eq!(
        info.labels["version"],
        tikv_jemalloc_ctl::version::read()
            .unwrap()
            .trim_end_matches('\0')
    );

    // The gauge follows jemalloc: start the background threads, then stop them again.
    tikv_jemalloc_ctl::background_thread::write(true).unwrap();
    let running = scrape(send(&mut service, request("GET", "/metrics")).await);
    tikv_jemalloc_ctl::background_thread::write(false).unwrap();
    assert_eq!(running.value("jemalloc_background_threads"), Some(1.0));
}

/// Stands in for the tests above that make mallctl calls fail: they need the fault-injection
/// seam, compiled in only when cargo runs inside this repository (its `.cargo/config.toml`).
#[cfg(not(fault_injection))]
#[test]
#[ignore = "needs cfg(fault_injection): run cargo from the repository"]
fn fault_injection_tests_need_cargo_run_from_the_repository() {}
