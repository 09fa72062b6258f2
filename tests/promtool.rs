//! `promtool check metrics` (Prometheus's own linter) accepts what `/metrics` serves.
//!
//! Needs `promtool` (Debian package `prometheus`; `.ci/run` installs it). Under CI
//! (`CI` set) a missing promtool fails the test; elsewhere the test says so and passes.
#![cfg(all(feature = "jemalloc", not(target_env = "msvc")))]

mod common;

use common::*;
use http::StatusCode;
use opentelemetry::metrics::MeterProvider;
use opentelemetry::KeyValue;
use std::io::Write;
use std::process::{Command, Stdio};
use tower::Layer;
use tower_jemalloc::JemallocLayer;

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

/// Runs `promtool check metrics` on `text`; `None` when promtool is not installed outside CI.
fn promtool_check(text: &str) -> Option<(bool, String)> {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!(
                "promtool not found ({e}): install Debian's `prometheus` package to run this check"
            );
            return None;
        }
        Err(e) => panic!("promtool is required under CI (apt-get install prometheus): {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Some((output.status.success(), report))
}

#[tokio::test]
async fn promtool_accepts_the_exposition() {
    let layer = JemallocLayer::builder()
        .namespace("restate")
        .build()
        .unwrap();
    let meter = layer.meter_provider().unwrap().meter("app");
    meter
        .u64_counter("app.requests")
        .with_description("Requests served")
        .build()
        .add(5, &[KeyValue::new("route", "/")]);
    meter
        .f64_histogram("app.latency")
        .with_unit("s")
        .with_description("Request latency")
        .build()
        .record(0.2, &[KeyValue::new("route", "/")]);
    let (echo, _) = recording_echo();
    let mut service = layer.layer(echo);
    let answer = send(&mut service, request("GET", "/metrics")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.text().contains("restate_jemalloc_resident_bytes"));

    if let Some((ok, report)) = promtool_check(answer.text()) {
        assert!(
            ok,
            "promtool check metrics failed:\n{report}\n--- exposition:\n{}",
            answer.text()
        );
    }

    // The check itself has teeth: a malformed exposition is refused.
    if let Some((ok, _)) = promtool_check("restate_bad{ 1\n") {
        assert!(!ok, "promtool refused a malformed exposition");
    }
}
