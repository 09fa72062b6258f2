//! jemalloc's tuning over HTTP (`/debug/jemalloc/config`), the process and cgroup gauges, and
//! the per-arena gauges.
#![cfg(all(feature = "jemalloc", not(target_env = "msvc")))]

mod common;

use common::*;
use http::StatusCode;
use tower::Layer;
use tower_jemalloc::{Endpoint, JemallocLayer, JemallocLayerBuilder, JemallocService};

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

/// The tuning is the process's: tests that change it or depend on it run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CONFIG: &str = "/debug/jemalloc/config";

fn service(builder: JemallocLayerBuilder) -> JemallocService<Echo> {
    let (echo, _) = recording_echo();
    builder.build().unwrap().layer(echo)
}

fn open() -> JemallocService<Echo> {
    service(JemallocLayer::builder().allow_anonymous(Endpoint::Purge))
}

async fn get_config(service: &mut JemallocService<Echo>) -> serde_json::Value {
    let answer = send(service, request("GET", CONFIG)).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.header("content-type"), Some("application/json"));
    answer.json()
}

async fn put(service: &mut JemallocService<Echo>, query: &str) -> Answer {
    send(service, request("PUT", &format!("{CONFIG}?{query}"))).await
}

#[tokio::test]
async fn closed_until_an_access_rule_then_following_purges() {
    let mut closed = service(JemallocLayer::builder());
    let answer = send(&mut closed, request("GET", CONFIG)).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert!(answer.text().contains("allow_anonymous(Endpoint::Config)"));

    let mut token = service(JemallocLayer::builder().bearer_token(Endpoint::Purge, "s3cret"));
    let answer = send(&mut token, request("GET", CONFIG)).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let mut authorized = request("GET", CONFIG);
    authorized
        .headers_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    assert_eq!(send(&mut token, authorized).await.status, StatusCode::OK);
}

#[tokio::test]
async fn get_answers_the_live_settings() {
    let _serial = SERIAL.lock().await;
    let mut service = open();
    let config = get_config(&mut service).await;
    let typed: tower_jemalloc::JemallocConfig = serde_json::from_value(config.clone()).unwrap();
    assert_eq!(typed, tower_jemalloc::JemallocConfig::read().unwrap());
    for key in [
        "background_thread",
        "max_background_threads",
        "dirty_decay_ms",
        "muzzy_decay_ms",
        "arenas_differing",
    ] {
        assert!(config.get(key).is_some(), "{key} missing: {config}");
    }
    let head = send(&mut service, request("HEAD", CONFIG)).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.text().is_empty());
    let post = send(&mut service, request("POST", CONFIG)).await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post.header("allow"), Some("GET, HEAD, PUT"));
}

#[tokio::test]
async fn put_changes_every_arena_and_answers_before_and_after() {
    let _serial = SERIAL.lock().await;
    let mut service = open();
    let start = get_config(&mut service).await;
    // An arena of another thread, so that "every existing arena" means more than one.
    std::thread::spawn(|| churn(1)).join().unwrap();

    let answer = put(&mut service, "dirty_decay_ms=1234&muzzy_decay_ms=567").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let update = answer.json();
    assert_eq!(update["before"], start);
    assert_eq!(update["after"]["dirty_decay_ms"], 1234);
    assert_eq!(update["after"]["muzzy_decay_ms"], 567);
    // Every existing arena took the values: none differs from the defaults now.
    assert_eq!(update["after"]["arenas_differing"], serde_json::json!([]));
    assert_eq!(get_config(&mut service).await, update["after"]);

    let exposition = parse_exposition(send(&mut service, request("GET", "/metrics")).await.text());
    assert_eq!(
        exposition.value("jemalloc_dirty_decay_seconds"),
        Some(1.234)
    );
    assert_eq!(
        exposition.value("jemalloc_muzzy_decay_seconds"),
        Some(0.567)
    );
    let changes = |setting: &str| {
        exposition
            .samples
            .iter()
            .find(|s| {
                s.name == "jemalloc_config_changes_total"
                    && s.labels.get("setting").map(String::as_str) == Some(setting)
            })
            .map(|s| s.value)
    };
    assert_eq!(changes("dirty_decay_ms"), Some(1.0));
    assert_eq!(changes("muzzy_decay_ms"), Some(1.0));
    assert_eq!(changes("background_thread"), Some(0.0));
    assert_eq!(changes("max_background_threads"), Some(0.0));

    // Back to where the test started.
    let restore = format!(
        "dirty_decay_ms={}&muzzy_decay_ms={}",
        start["dirty_decay_ms"], start["muzzy_decay_ms"]
    );
    assert_eq!(put(&mut service, &restore).await.status, StatusCode::OK);
}

#[tokio::test]
async fn bad_puts_get_400_and_change_nothing() {
    let _serial = SERIAL.lock().await;
    let mut service = open();
    let before = get_config(&mut service).await;
    for (query, reason) in [
        (
            "",
            "a PUT changes at least one setting: background_thread=true|false",
        ),
        (
            "background_thread=yes",
            "background_thread=\"yes\" is not valid",
        ),
        (
            "dirty_decay_ms=-2",
            "dirty_decay_ms=-2 is out of range: use -1 (never) to 3600000",
        ),
        (
            "muzzy_decay_ms=3600001",
            "muzzy_decay_ms=3600001 is out of range",
        ),
        (
            "dirty_decay_ms=soon",
            "dirty_decay_ms=\"soon\" is not valid",
        ),
        (
            "max_background_threads=0",
            "max_background_threads=0 is out of range: use 1 to",
        ),
        (
            "max_background_threads=100000",
            "max_background_threads=100000 is out of range",
        ),
        (
            "dirty_decay_ms=100&dirty_decay_ms=200",
            "parameter \"dirty_decay_ms\" is given twice",
        ),
        (
            "dirty_decay_ms=+5000",
            "dirty_decay_ms=\"+5000\" is not valid",
        ),
        ("dirty_decay_ms=100&decay=1", "unknown parameter \"decay\""),
        // A valid value beside a bad one: nothing is applied.
        (
            "dirty_decay_ms=100&muzzy_decay_ms=-7",
            "muzzy_decay_ms=-7 is out of range",
        ),
        (
            "background_thread=true&max_background_threads=0",
            "out of range",
        ),
    ] {
        let answer = put(&mut service, query).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(
            answer.header("content-type"),
            Some("text/plain; charset=utf-8")
        );
        assert!(
            answer.text().starts_with(reason) || answer.text().contains(reason),
            "{query}: {}",
            answer.text()
        );
        assert_eq!(
            answer.text().lines().count(),
            1,
            "one line: {}",
            answer.text()
        );
    }
    let answer = send(
        &mut service,
        request("GET", &format!("{CONFIG}?dirty_decay_ms=1")),
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert!(answer.text().starts_with("GET takes no parameters"));
    assert_eq!(get_config(&mut service).await, before);
}

#[cfg(fault_injection)]
#[tokio::test]
async fn a_failed_write_undoes_the_ones_before_it() {
    let _serial = SERIAL.lock().await;
    let mut service = open();
    let before = get_config(&mut service).await;
    // The dirty decay times (the default and every arena's) are written before the muzzy
    // default, which fails.
    tower_jemalloc::__private::fail_key("arenas.muzzy_decay_ms");
    let answer = put(&mut service, "dirty_decay_ms=4321&muzzy_decay_ms=10").await;
    tower_jemalloc::__private::clear_faults();
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        answer
            .text()
            .starts_with("mallctl `arenas.muzzy_decay_ms` failed: injected fault; the "),
        "{}",
        answer.text()
    );
    assert!(answer
        .text()
        .contains("values already written were restored"));
    assert_eq!(get_config(&mut service).await, before);
}

#[tokio::test]
async fn process_gauges_agree_with_the_kernel() {
    // No other test of this file allocates meanwhile, and 64 MiB held and touched make RSS
    // large beside the test harness's own movements.
    let _serial = SERIAL.lock().await;
    let held = std::hint::black_box(vec![1u8; 64 << 20]);
    let mut service = open();
    let exposition = parse_exposition(send(&mut service, request("GET", "/metrics")).await.text());
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib = |name: &str| -> f64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line[name.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse::<f64>()
            .unwrap()
            * 1024.0
    };
    let (rss, vm) = (kib("VmRSS:"), kib("VmSize:"));
    drop(held);
    let gauge = exposition.value("process_memory_usage_bytes").unwrap();
    assert!(
        (gauge - rss).abs() <= rss * 0.05,
        "process_memory_usage_bytes {gauge} vs VmRSS {rss}"
    );
    let virtual_size = exposition.value("process_memory_virtual_bytes").unwrap();
    assert!(
        (virtual_size - vm).abs() <= vm * 0.05,
        "process_memory_virtual_bytes {virtual_size} vs VmSize {vm}"
    );

    // The cgroup's figures: where a memory cgroup is visible (v2 with memory.current, else
    // v1's memory controller) they match its files; elsewhere there is no series at all.
    // cgroup v1 reports "no limit" as a huge number (2^63 rounded down to a page).
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let v2 = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|path| {
            (
                format!("/sys/fs/cgroup{path}"),
                "memory.current",
                "memory.max",
            )
        });
    let v1 = cgroups
        .lines()
        .find_map(|l| {
            let (controllers, path) = l.split_once(':')?.1.split_once(':')?;
            controllers
                .split(',')
                .any(|c| c == "memory")
                .then_some(path)
        })
        .map(|path| {
            (
                format!("/sys/fs/cgroup/memory{path}"),
                "memory.usage_in_bytes",
                "memory.limit_in_bytes",
            )
        });
    let cgroup = [v2, v1]
        .into_iter()
        .flatten()
        .find(|(dir, usage, _)| std::path::Path::new(&format!("{dir}/{usage}")).exists());
    let usage = exposition.value("process_cgroup_memory_usage_bytes");
    match cgroup {
        Some((dir, usage_file, limit_file)) => {
            let current: f64 = std::fs::read_to_string(format!("{dir}/{usage_file}"))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            let usage = usage.expect("a memory cgroup is visible: its usage is exported");
            assert!(
                (usage - current).abs() <= current * 0.10,
                "{usage} vs {current} ({dir}/{usage_file})"
            );
            let max = std::fs::read_to_string(format!("{dir}/{limit_file}")).unwrap();
            let limit = exposition.value("process_cgroup_memory_limit_bytes");
            match max.trim().parse::<f64>() {
                Ok(max) if max < 2f64.powi(60) => assert_eq!(limit, Some(max)),
                _ => assert_eq!(limit, None, "{dir}/{limit_file} is {max:?}: no limit"),
            }
        }
        None => {
            eprintln!("no memory cgroup visible from this process: checking only that no cgroup series is exported");
            assert_eq!(usage, None);
            assert_eq!(exposition.value("process_cgroup_memory_limit_bytes"), None);
        }
    }
}

#[tokio::test]
async fn per_arena_gauges_are_opt_in_and_bounded() {
    let _serial = SERIAL.lock().await;
    let exposition = |builder: JemallocLayerBuilder| async move {
        let mut service = service(builder);
        let answer = send(&mut service, request("GET", "/metrics")).await;
        parse_exposition(answer.text())
    };
    let default = exposition(JemallocLayer::builder()).await;
    assert!(default.samples.iter().all(|s| !s.name.contains("arena_")));

    std::thread::spawn(|| churn(1)).join().unwrap();
    let with = exposition(JemallocLayer::builder().per_arena_metrics(true)).await;
    let narenas = with.value("jemalloc_arenas").unwrap() as usize;
    for name in [
        "jemalloc_arena_resident_bytes",
        "jemalloc_arena_dirty_bytes",
        "jemalloc_arena_muzzy_bytes",
        "jemalloc_arena_threads",
    ] {
        let series: Vec<_> = with.samples.iter().filter(|s| s.name == name).collect();
        assert!(
            !series.is_empty() && series.len() <= narenas,
            "{name}: {}",
            series.len()
        );
        assert!(series
            .iter()
            .all(|s| s.labels["arena"].parse::<u32>().is_ok()));
    }
    let resident: f64 = with
        .samples
        .iter()
        .filter(|s| s.name == "jemalloc_arena_resident_bytes")
        .map(|s| s.value)
        .sum();
    let total = with.value("jemalloc_resident_bytes").unwrap();
    assert!(resident > 0.0 && resident <= total, "{resident} of {total}");
}

/// Stands in for the tests above that make mallctl calls fail: they need the fault-injection
/// seam, compiled in only when cargo runs inside this repository (its `.cargo/config.toml`).
#[cfg(not(fault_injection))]
#[test]
#[ignore = "needs cfg(fault_injection): run cargo from the repository"]
fn fault_injection_tests_need_cargo_run_from_the_repository() {}
