//! The memory governor against a real jemalloc: cached pages given back without anyone calling
//! purge, the limit set and cleared at run time, shedding started and stopped, the pressure
//! channel, and the layer's own endpoints answering throughout.
//!
//! The governor is the process's: the tests run one at a time. They set explicit limits
//! relative to the process's own usage and never touch cgroups or the machine's limits.
#![cfg(all(feature = "jemalloc", not(target_env = "msvc")))]

mod common;

use common::*;
use http::StatusCode;
use std::time::{Duration, Instant};
use tower::Layer;
use tower_jemalloc::{Endpoint, JemallocLayer, JemallocLayerBuilder, JemallocService, Pressure};

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CONFIG: &str = "/debug/jemalloc/config";
const MIB: f64 = (1 << 20) as f64;
/// A generous upper bound for "does not hang": the governor polls every 2 to 100 ms.
const DEADLINE: Duration = Duration::from_secs(20);

fn layered(builder: JemallocLayerBuilder) -> (JemallocLayer, JemallocService<Echo>) {
    let (echo, _) = recording_echo();
    let layer = builder
        .allow_anonymous(Endpoint::Purge)
        .build()
        .expect("valid configuration");
    let service = layer.layer(echo);
    (layer, service)
}

async fn metrics(service: &mut JemallocService<Echo>) -> Exposition {
    let answer = send(service, request("GET", "/metrics")).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    parse_exposition(answer.text())
}

async fn put(service: &mut JemallocService<Echo>, query: &str) -> Answer {
    send(service, request("PUT", &format!("{CONFIG}?{query}"))).await
}

/// Polls `check` every 20 ms until it returns `Some`, for at most [`DEADLINE`].
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(start.elapsed() < DEADLINE, "still waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The usage the governor watches, as `/metrics` reports it.
async fn usage(service: &mut JemallocService<Echo>) -> f64 {
    metrics(service)
        .await
        .value("jemalloc_memory_usage_bytes")
        .expect("usage is exported")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_pages_above_the_mark_are_given_back_without_a_purge_call() {
    let _serial = SERIAL.lock().await;
    let (_layer, mut service) = layered(JemallocLayer::builder());
    // Decay would return the pages too, only later: make it never, so that what goes back
    // is the governor's doing.
    let answer = put(&mut service, "dirty_decay_ms=-1&muzzy_decay_ms=-1").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let before = metrics(&mut service).await;
    assert_eq!(
        before.value("jemalloc_memory_limit_bytes"),
        None,
        "no limit yet"
    );

    // 64 MiB allocated, touched and freed on this worker thread, which lives on: dirty pages
    // in its arena (pages freed by a thread that then exits were not left dirty in our runs).
    churn(64);
    let exposition = metrics(&mut service).await;
    let dirty = exposition.value("jemalloc_dirty_bytes").unwrap();
    assert!(dirty >= 32.0 * MIB, "dirty pages were made: {dirty}");
    let given_back = exposition
        .value("jemalloc_memory_given_back_bytes_total")
        .unwrap();

    // A limit just above the usage: usage is over the high-water mark (90 %).
    let usage = exposition.value("jemalloc_memory_usage_bytes").unwrap();
    let limit = (usage + 4.0 * MIB) as u64;
    let answer = put(&mut service, &format!("memory_limit={limit}")).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let after = &answer.json()["after"];
    assert_eq!(after["memory_limit"], limit);
    assert_eq!(after["memory_limit_source"], "explicit");

    let start = Instant::now();
    let (grown, dirty_now) = loop {
        let exposition = metrics(&mut service).await;
        let grown = exposition
            .value("jemalloc_memory_given_back_bytes_total")
            .unwrap()
            - given_back;
        let dirty_now = exposition.value("jemalloc_dirty_bytes").unwrap();
        if grown >= usage - 0.9 * limit as f64 && dirty_now < dirty {
            break (grown, dirty_now);
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no pages given back: {grown} bytes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        dirty_now + grown / 2.0 <= dirty,
        "dirty {dirty} -> {dirty_now}, given back {grown}"
    );
    let exposition = metrics(&mut service).await;
    assert_eq!(
        exposition.value("jemalloc_memory_limit_bytes"),
        Some(limit as f64)
    );
    assert!(
        exposition
            .value("jemalloc_memory_give_back_runs_total")
            .unwrap()
            >= 1.0
    );

    let answer = put(
        &mut service,
        "memory_limit=none&dirty_decay_ms=10000&muzzy_decay_ms=0",
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_is_set_and_cleared_at_run_time() {
    let _serial = SERIAL.lock().await;
    let (layer, mut service) = layered(JemallocLayer::builder());
    let config = send(&mut service, request("GET", CONFIG)).await.json();
    assert_eq!(config["memory_limit"], serde_json::Value::Null);
    assert_eq!(config["memory_limit_source"], serde_json::Value::Null);
    assert_eq!(config["shed_requests"], false);
    eventually("no governor thread while no limit is set", || async {
        (threads_named("jemalloc-governor") == 0).then_some(())
    })
    .await;

    let answer = put(&mut service, "memory_limit=8GiB").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let update = answer.json();
    assert_eq!(update["before"]["memory_limit"], serde_json::Value::Null);
    assert_eq!(update["after"]["memory_limit"], 8u64 << 30);
    let config = send(&mut service, request("GET", CONFIG)).await.json();
    assert_eq!(config, update["after"]);
    assert_eq!(config["memory_limit_source"], "explicit");
    eventually("the governor thread to start", || async {
        (threads_named("jemalloc-governor") == 1).then_some(())
    })
    .await;
    let exposition = metrics(&mut service).await;
    assert_eq!(
        exposition.value("jemalloc_memory_limit_bytes"),
        Some((8u64 << 30) as f64)
    );
    assert_eq!(exposition.value("jemalloc_memory_pressure"), Some(0.0));
    assert_eq!(exposition.value("jemalloc_memory_unreclaimable"), Some(0.0));
    assert_eq!(*layer.memory_pressure().borrow(), Pressure::Ok);

    // A percentage of what the process may use: the cgroup's limit or the machine's memory.
    let answer = put(&mut service, "memory_limit=50%").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let after = &answer.json()["after"];
    assert!(
        after["memory_limit"].as_u64().unwrap() >= 1 << 20,
        "{after}"
    );
    let source = after["memory_limit_source"].as_str().unwrap();
    assert!(
        [
            "cgroup v2 memory.max",
            "cgroup v1 memory.limit_in_bytes",
            "physical memory"
        ]
        .contains(&source),
        "{source}"
    );

    for (query, reason) in [
        ("memory_limit=320MB", "memory limit \"320MB\" is not valid"),
        ("memory_limit=0", "the smallest limit is 1MiB"),
        ("memory_limit=150%", "from 1% to 100%"),
        ("memory_limit=", "or memory_limit=none to clear it"),
        ("shed_requests=yes", "use shed_requests=true|false"),
        ("memory_limit=1GiB&memory_limit=2GiB", "given twice"),
    ] {
        let answer = put(&mut service, query).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{query}");
        assert!(answer.text().contains(reason), "{query}: {}", answer.text());
        assert_eq!(answer.text().trim_end().lines().count(), 1, "{query}");
    }
    let unchanged = send(&mut service, request("GET", CONFIG)).await.json();
    assert_eq!(
        unchanged["memory_limit_source"], source,
        "nothing was written"
    );

    let answer = put(&mut service, "memory_limit=none").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(
        answer.json()["after"]["memory_limit"],
        serde_json::Value::Null
    );
    assert_eq!(
        metrics(&mut service)
            .await
            .value("jemalloc_memory_limit_bytes"),
        None
    );
    eventually("the governor thread to stop", || async {
        (threads_named("jemalloc-governor") == 0).then_some(())
    })
    .await;

    // Built with a limit: the thread runs until the last layer and service are gone.
    drop((layer, service));
    let (layer, service) = layered(JemallocLayer::builder().memory_limit("8GiB".parse().unwrap()));
    // The thread names itself once it runs.
    eventually("the governor thread to start", || async {
        (threads_named("jemalloc-governor") == 1).then_some(())
    })
    .await;
    drop((layer, service));
    eventually(
        "the governor thread to stop with its last layer",
        || async { (threads_named("jemalloc-governor") == 0).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limit_forwarded_requests_are_shed_and_the_endpoints_answer() {
    let _serial = SERIAL.lock().await;
    let (layer, mut service) = layered(
        JemallocLayer::builder()
            .shed_requests(true)
            .shed_when(|request| request.uri.path() != "/healthz"),
    );
    let mut pressure = layer.memory_pressure();
    assert_eq!(*pressure.borrow_and_update(), Pressure::Ok);
    assert_eq!(
        send(&mut service, request("GET", "/work")).await.status,
        ECHO_STATUS
    );

    // A limit far below live memory: nothing the governor gives back can reach it.
    let answer = put(&mut service, "memory_limit=1MiB").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    tokio::time::timeout(DEADLINE, pressure.wait_for(|p| *p == Pressure::Over))
        .await
        .expect("pressure turns Over")
        .unwrap();

    let shed = send(&mut service, request("POST", "/work")).await;
    assert_eq!(shed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(shed.header("retry-after"), Some("1"));
    assert!(shed
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    let text = shed.text().trim_end();
    assert!(
        text.starts_with("shedding load: memory use ")
            && text.ends_with(" is over the limit 1 MiB"),
        "{text}"
    );
    // Spared by the predicate, and the layer's own endpoints answer.
    assert_eq!(
        send(&mut service, request("GET", "/healthz")).await.status,
        ECHO_STATUS
    );
    let config = send(&mut service, request("GET", CONFIG)).await;
    assert_eq!(config.status, StatusCode::OK);
    assert_eq!(config.json()["shed_requests"], true);
    let start = Instant::now();
    let exposition = loop {
        let exposition = metrics(&mut service).await;
        if exposition.value("jemalloc_memory_unreclaimable") == Some(1.0) {
            break exposition;
        }
        assert!(start.elapsed() < DEADLINE, "never unreclaimable");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(exposition.value("jemalloc_memory_pressure"), Some(2.0));
    assert_eq!(exposition.value("jemalloc_shed_requests_total"), Some(1.0));
    let stats = send(&mut service, request("GET", "/debug/jemalloc/stats")).await;
    assert_eq!(stats.status, StatusCode::OK);
    let hints = stats.json()["summary"]["hints"].to_string();
    assert!(hints.contains("live memory exceeds"), "{hints}");
    assert!(hints.contains("shedding"), "{hints}");

    // Shedding switched off at run time: served again, the limit stays.
    let answer = put(&mut service, "shed_requests=false").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(
        send(&mut service, request("GET", "/work")).await.status,
        ECHO_STATUS
    );
    let answer = put(&mut service, "shed_requests=true").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(
        send(&mut service, request("GET", "/work")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    // The limit raised far above usage: the gate lets requests back in one per pace while
    // requests were shed less than a second ago, then opens.
    let answer = put(&mut service, "memory_limit=1TiB").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    tokio::time::timeout(DEADLINE, pressure.wait_for(|p| *p == Pressure::Ok))
        .await
        .expect("pressure back to Ok")
        .unwrap();
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(send(&mut service, request("GET", "/work")).await.status);
    }
    assert!(statuses.contains(&ECHO_STATUS), "{statuses:?}");
    assert!(
        statuses.contains(&StatusCode::SERVICE_UNAVAILABLE),
        "paced, not open at once: {statuses:?}"
    );
    let paced = send(&mut service, request("GET", "/work")).await;
    if paced.status == StatusCode::SERVICE_UNAVAILABLE {
        assert!(
            paced.text().contains("let back in one at a time"),
            "{}",
            paced.text()
        );
        statuses.push(paced.status);
    }
    let paced_sheds = statuses
        .iter()
        .filter(|&&status| status == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    // A second and more without shedding: open.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for _ in 0..5 {
        assert_eq!(
            send(&mut service, request("GET", "/work")).await.status,
            ECHO_STATUS
        );
    }

    // The limit cleared: served again at once, pressure back to Ok.
    let answer = put(&mut service, "memory_limit=none").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(
        send(&mut service, request("GET", "/work")).await.status,
        ECHO_STATUS
    );
    assert_eq!(*pressure.borrow_and_update(), Pressure::Ok);
    let exposition = metrics(&mut service).await;
    assert_eq!(exposition.value("jemalloc_memory_unreclaimable"), Some(0.0));
    assert_eq!(
        exposition.value("jemalloc_shed_requests_total"),
        Some((2 + paced_sheds) as f64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pressure_is_near_between_the_mark_and_the_limit() {
    let _serial = SERIAL.lock().await;
    let (layer, mut service) = layered(JemallocLayer::builder());
    let mut pressure = layer.memory_pressure();
    // Live memory large enough that the test's own allocations do not move usage by 5 %.
    let live: Vec<u8> = vec![1; 128 << 20];
    std::hint::black_box(&live);
    let purge = send(&mut service, request("POST", "/debug/jemalloc/purge")).await;
    assert_eq!(purge.status, StatusCode::OK, "{}", purge.text());
    let usage = usage(&mut service).await;
    // Usage at 95 % of the limit: above the mark, under the limit.
    let limit = (usage / 0.95) as u64;
    let answer = put(&mut service, &format!("memory_limit={limit}")).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    tokio::time::timeout(DEADLINE, pressure.wait_for(|p| *p == Pressure::Near))
        .await
        .expect("pressure turns Near")
        .unwrap();
    assert_eq!(
        metrics(&mut service)
            .await
            .value("jemalloc_memory_pressure"),
        Some(1.0)
    );
    assert_eq!(
        send(&mut service, request("GET", "/work")).await.status,
        ECHO_STATUS,
        "Near never sheds"
    );
    let answer = put(&mut service, "memory_limit=none").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(*pressure.borrow_and_update(), Pressure::Ok);
    drop(live);
}
