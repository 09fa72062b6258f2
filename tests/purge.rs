//! The purge endpoint against a real jemalloc: memory really goes back, one purge at a time.
#![cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
// The serialising std mutex is held across awaits on purpose: every #[tokio::test] runs on its
// own current-thread runtime, so no other task on that thread can wait for it.
#![allow(clippy::await_holding_lock)]

mod common;

use common::*;
use http::StatusCode;
use std::sync::Mutex;
use tower::Layer;
use tower::{Service, ServiceExt};
use tower_jemalloc::{Endpoint, JemallocLayer};

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

/// Purges are process-wide single-flight: the tests of this file take turns.
static SERIAL: Mutex<()> = Mutex::new(());

const MIB: u64 = 1024 * 1024;

/// These tests purge back to back: no cooldown.
fn layer() -> JemallocLayer {
    JemallocLayer::builder()
        .allow_anonymous(Endpoint::Purge)
        .purge_cooldown(std::time::Duration::ZERO)
        .build()
        .unwrap()
}

#[tokio::test]
async fn purge_returns_freed_small_blocks_to_the_os() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (echo, seen) = recording_echo();
    let mut service = layer().layer(echo);

    churn(256);
    let answer = send(&mut service, request("POST", "/debug/jemalloc/purge")).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let report = answer.json();

    for key in GAUGES {
        assert!(report["before"][key].is_u64(), "before.{key} in {report}");
        assert!(report["after"][key].is_u64(), "after.{key} in {report}");
    }
    assert!(report["arenas_purged"].as_u64().unwrap() >= 1);
    assert!(report["duration_seconds"].as_f64().unwrap() > 0.0);

    let before_dirty = report["before"]["dirty"].as_u64().unwrap();
    let after_dirty = report["after"]["dirty"].as_u64().unwrap();
    let released = report["released_bytes"].as_u64().unwrap();
    let before_resident = report["before"]["resident"].as_u64().unwrap();
    let after_resident = report["after"]["resident"].as_u64().unwrap();
    eprintln!(
        "purge after a 256 MiB churn: dirty {} -> {} MiB, released {} MiB in {:.1} ms",
        before_dirty / MIB,
        after_dirty / MIB,
        released / MIB,
        report["duration_seconds"].as_f64().unwrap() * 1e3
    );
    assert!(
        before_dirty >= 200 * MIB,
        "the churn left dirty pages: {report}"
    );
    assert!(after_dirty < 8 * MIB, "the purge emptied them: {report}");
    assert!(released >= 200 * MIB, "resident memory went back: {report}");
    assert_eq!(released, before_resident - after_resident);
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn put_purges_too_and_a_body_is_read_and_dropped() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (echo, _) = recording_echo();
    let mut service = layer().layer(echo);
    // A misspelt or unknown parameter runs nothing.
    let answer = send(
        &mut service,
        request("PUT", "/debug/jemalloc/purge?verbose=1"),
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        answer.text(),
        "unknown parameter \"verbose\": /debug/jemalloc/purge accepts mode\n"
    );
    // A body up to 1 MiB is read and dropped, then the purge answers.
    let request = http::Request::put("/debug/jemalloc/purge")
        .body(http_body_util::Full::new(bytes::Bytes::from(vec![
            7u8;
            1 << 20
        ])))
        .unwrap();
    let answer = send(&mut service, request).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert!(answer.json()["after"]["resident"].is_u64());
}

#[tokio::test]
async fn a_purge_while_one_runs_gets_409() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (echo, _) = recording_echo();
    let mut service = layer().layer(echo);
    // Enough dirty pages that the first purge is still running when the second arrives.
    churn(128);

    let first = service
        .ready()
        .await
        .unwrap()
        .call(request("POST", "/debug/jemalloc/purge"));
    let second = service
        .ready()
        .await
        .unwrap()
        .call(request("POST", "/debug/jemalloc/purge"));
    let (first, second) = tokio::join!(first, second);
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(second.status(), StatusCode::CONFLICT);
    use http_body_util::BodyExt;
    let reason = second.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        &reason[..],
        b"a jemalloc purge is already running; retry when it has finished\n"
    );

    // Once the first has answered, the slot is free again.
    let third = send(&mut service, request("POST", "/debug/jemalloc/purge")).await;
    assert_eq!(third.status, StatusCode::OK);
}

#[test]
fn purge_all_arenas_is_usable_without_http() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    churn(32);
    let report = tower_jemalloc::purge_all_arenas(tower_jemalloc::PurgeMode::Purge).unwrap();
    assert!(report.before.dirty >= 16 * MIB, "{report:?}");
    assert!(report.after.dirty < report.before.dirty);
    let json = serde_json::to_string(&report).unwrap();
    assert!(json.contains("\"released_bytes\":"), "{json}");
}

#[cfg(fault_injection)]
#[tokio::test]
async fn mallctl_failures_answer_500_naming_the_key() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (echo, _) = recording_echo();
    let mut service = layer().layer(echo);

    tower_jemalloc::__private::fail_key("arena.4096.purge");
    let answer = send(&mut service, request("POST", "/debug/jemalloc/purge")).await;
    tower_jemalloc::__private::clear_faults();
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        answer.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(
        answer.text(),
        "mallctl `arena.4096.purge` failed: injected fault\n"
    );

    tower_jemalloc::__private::fail_key("epoch");
    let answer = send(&mut service, request("POST", "/debug/jemalloc/purge")).await;
    tower_jemalloc::__private::clear_faults();
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(answer.text(), "mallctl `epoch` failed: injected fault\n");

    // After the faults, purging works again (the single-flight slot was released).
    let answer = send(&mut service, request("POST", "/debug/jemalloc/purge")).await;
    assert_eq!(answer.status, StatusCode::OK);
}

/// Stands in for the tests above that make mallctl calls fail: they need the fault-injection
/// seam, compiled in only when cargo runs inside this repository (its `.cargo/config.toml`).
#[cfg(not(fault_injection))]
#[test]
#[ignore = "needs cfg(fault_injection): run cargo from the repository"]
fn fault_injection_tests_need_cargo_run_from_the_repository() {}
