//! `/metrics` under load and failure: concurrent scrapes share one render, the in-flight limit
//! answers 503, gzip follows `Accept-Encoding`, and an exporter error is a 500.
#![cfg(all(feature = "jemalloc", not(target_env = "msvc")))]

mod common;

use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tower::Layer;
use tower_jemalloc::JemallocLayer;

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

/// A collector that counts how often the registry is gathered and, while `hold` is set, blocks
/// each gather until released, so a render stays in progress as long as a test needs.
#[derive(Clone)]
struct Probe {
    desc: Arc<Desc>,
    renders: Arc<AtomicUsize>,
    gate: Arc<(Mutex<Gate>, Condvar)>,
}

impl Default for Probe {
    fn default() -> Self {
        Self {
            desc: Arc::new(desc("probe", "counts renders")),
            renders: Arc::default(),
            gate: Arc::default(),
        }
    }
}

fn desc(name: &str, help: &str) -> Desc {
    Desc::new(name.into(), help.into(), vec![], Default::default()).unwrap()
}

#[derive(Default)]
struct Gate {
    hold: bool,
    waiting: usize,
}

impl Probe {
    fn hold(&self) {
        self.gate.0.lock().unwrap().hold = true;
    }

    fn release(&self) {
        self.gate.0.lock().unwrap().hold = false;
        self.gate.1.notify_all();
    }

    /// Waits (bounded) until a gather is blocked in the gate.
    fn wait_until_blocked(&self) {
        let (lock, cvar) = &*self.gate;
        let guard = lock.lock().unwrap();
        let (_guard, timeout) = cvar
            .wait_timeout_while(guard, Duration::from_secs(10), |g| g.waiting == 0)
            .unwrap();
        assert!(!timeout.timed_out(), "a render started within 10 s");
    }
}

impl Collector for Probe {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.renders.fetch_add(1, Ordering::SeqCst);
        let (lock, cvar) = &*self.gate;
        let mut gate = lock.lock().unwrap();
        gate.waiting += 1;
        cvar.notify_all();
        while gate.hold {
            gate = cvar.wait(gate).unwrap();
        }
        gate.waiting -= 1;
        Vec::new()
    }
}

fn layer_with(collector: impl Collector + 'static, limit: usize) -> JemallocLayer {
    let layer = JemallocLayer::builder()
        .max_concurrent_scrapes(limit)
        .build()
        .unwrap();
    layer.registry().register(Box::new(collector)).unwrap();
    layer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_scrapes_share_one_render() {
    let probe = Probe::default();
    let layer = layer_with(probe.clone(), 64);
    let (echo, _) = recording_echo();
    let service = layer.layer(echo);

    // Hold the first render open so all 64 scrapes arrive while it is in progress.
    probe.hold();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let mut service = service.clone();
        tasks.push(tokio::spawn(async move {
            send(&mut service, request("GET", "/metrics")).await
        }));
        if tasks.len() == 1 {
            probe.wait_until_blocked();
        }
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    probe.release();
    let mut bodies = Vec::new();
    for task in tasks {
        let answer = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("every scrape answers")
            .unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        bodies.push(answer.body);
    }
    let renders = probe.renders.load(Ordering::SeqCst);
    eprintln!("64 concurrent scrapes -> {renders} render(s)");
    assert!(renders <= 2, "64 concurrent scrapes took {renders} renders");
    assert!(
        bodies.iter().all(|b| b == &bodies[0]),
        "they share one body"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_beyond_the_limit_get_503() {
    let probe = Probe::default();
    let layer = layer_with(probe.clone(), 2);
    let (echo, _) = recording_echo();
    let service = layer.layer(echo);

    probe.hold();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut service = service.clone();
        held.push(tokio::spawn(async move {
            send(&mut service, request("GET", "/metrics")).await
        }));
    }
    probe.wait_until_blocked();
    // Give the second scrape time to register as in flight (it joins the blocked render).
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut service3 = service.clone();
    let refused = send(&mut service3, request("GET", "/metrics")).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(
        refused.text(),
        "too many concurrent scrapes (limit 2); retry shortly\n"
    );

    probe.release();
    for task in held {
        assert_eq!(task.await.unwrap().status, StatusCode::OK);
    }
    // The slots are free again.
    let answer = send(&mut service3, request("GET", "/metrics")).await;
    assert_eq!(answer.status, StatusCode::OK);
}

fn gunzip(bytes: &[u8]) -> String {
    let mut out = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut out)
        .expect("valid gzip");
    out
}

fn scrape_request(method: &str, accept_encoding: Option<&str>) -> Request<Full<bytes::Bytes>> {
    let mut builder = Request::builder().method(method).uri("/metrics");
    if let Some(value) = accept_encoding {
        builder = builder.header("accept-encoding", value);
    }
    builder.body(Full::default()).unwrap()
}

#[tokio::test]
async fn gzip_when_accepted_identity_otherwise() {
    let (echo, _) = recording_echo();
    let mut service = JemallocLayer::new().layer(echo);

    // Prometheus's header.
    let prometheus = "gzip";
    let zipped = send(&mut service, scrape_request("GET", Some(prometheus))).await;
    assert_eq!(zipped.status, StatusCode::OK);
    assert_eq!(zipped.header("content-encoding"), Some("gzip"));
    assert_eq!(zipped.header("vary"), Some("accept-encoding"));
    assert_eq!(
        zipped.header("content-type"),
        Some("text/plain; version=0.0.4")
    );
    let text = gunzip(&zipped.body);
    assert!(
        text.contains("# TYPE jemalloc_resident_bytes gauge"),
        "{text}"
    );

    for accept in [None, Some("identity"), Some("br"), Some("gzip;q=0")] {
        let plain = send(&mut service, scrape_request("GET", accept)).await;
        assert_eq!(plain.header("content-encoding"), None, "{accept:?}");
        assert_eq!(plain.header("vary"), Some("accept-encoding"));
        assert!(plain.text().contains("jemalloc_resident_bytes"));
    }

    let head = send(&mut service, scrape_request("HEAD", Some("gzip, deflate"))).await;
    assert_eq!(head.header("content-encoding"), Some("gzip"));
    assert!(head.body.is_empty());

    let (echo, _) = recording_echo();
    let mut no_gzip = JemallocLayer::builder()
        .gzip(false)
        .build()
        .unwrap()
        .layer(echo);
    let plain = send(&mut no_gzip, scrape_request("GET", Some("gzip"))).await;
    assert_eq!(plain.header("content-encoding"), None);
    assert_eq!(plain.header("vary"), None);
    assert!(plain.text().contains("jemalloc_resident_bytes"));
}

/// A collector whose family has no name, which the text encoder refuses.
struct Broken(Desc);

impl Collector for Broken {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.0]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut family = MetricFamily::default();
        family.set_help("has no name".to_owned());
        family.set_field_type(prometheus::proto::MetricType::GAUGE);
        family.mut_metric().push(Default::default());
        vec![family]
    }
}

#[tokio::test]
async fn exporter_errors_are_500_with_the_reason() {
    let layer = layer_with(Broken(desc("broken", "has no name")), 16);
    let (echo, seen) = recording_echo();
    let mut service = layer.layer(echo);
    let answer = send(&mut service, request("GET", "/metrics")).await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        answer.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert!(
        answer.text().starts_with("cannot encode metrics: ") && answer.text().ends_with('\n'),
        "{}",
        answer.text()
    );
    assert_eq!(answer.text().lines().count(), 1);
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_reuse_window_merges_scrapes_that_follow_each_other() {
    let probe = Probe::default();
    let layer = JemallocLayer::builder()
        .scrape_reuse_window(Duration::from_millis(300))
        .build()
        .unwrap();
    layer.registry().register(Box::new(probe.clone())).unwrap();
    let (echo, _) = recording_echo();
    let mut service = layer.layer(echo);

    for _ in 0..5 {
        assert_eq!(
            send(&mut service, request("GET", "/metrics")).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        probe.renders.load(Ordering::SeqCst),
        1,
        "one render answered all five"
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    send(&mut service, request("GET", "/metrics")).await;
    assert_eq!(
        probe.renders.load(Ordering::SeqCst),
        2,
        "after the window, a fresh render"
    );

    // Without a window (the default), scrapes one after another each get a fresh render.
    let probe = Probe::default();
    let layer = JemallocLayer::new();
    layer.registry().register(Box::new(probe.clone())).unwrap();
    let (echo, _) = recording_echo();
    let mut service = layer.layer(echo);
    for _ in 0..3 {
        send(&mut service, request("GET", "/metrics")).await;
    }
    assert_eq!(probe.renders.load(Ordering::SeqCst), 3);
}
