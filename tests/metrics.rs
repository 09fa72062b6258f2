//! The jemalloc gauges as Prometheus sees them: names, types, help texts, values, and one
//! jemalloc epoch advance per scrape.
#![cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
// The serialising std mutex is held across awaits on purpose: every #[tokio::test] runs on its
// own current-thread runtime, so no other task on that thread can wait for it.
#![allow(clippy::await_holding_lock)]

mod common;

use common::*;
use http::StatusCode;
use opentelemetry::metrics::MeterProvider;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use std::sync::Mutex;
use tower::Layer;
use tower_jemalloc::JemallocLayer;

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

/// Tests that count jemalloc epochs must not run beside other scrapes.
static EPOCH: Mutex<()> = Mutex::new(());

const HELP: [&str; 8] = [
    "Total bytes allocated by the application",
    "Total bytes in active pages (multiple of page size)",
    "Bytes dedicated to jemalloc metadata",
    "Total bytes in chunks mapped for the application",
    "Bytes in virtual memory mappings retained (not returned to OS)",
    "Maximum bytes in physically resident data pages",
    "Bytes in unused dirty pages that a purge would return to the OS",
    "Bytes in unused pages advised to the OS (MADV_FREE) but not yet reclaimed by it",
];

async fn scrape(layer: &JemallocLayer) -> Exposition {
    let (echo, _) = recording_echo();
    let mut service = layer.layer(echo);
    let answer = send(&mut service, request("GET", "/metrics")).await;
    assert_eq!(answer.status, StatusCode::OK);
    parse_exposition(answer.text())
}

#[tokio::test]
async fn restate_namespace_gives_restates_names() {
    let _serial = EPOCH.lock().unwrap_or_else(|e| e.into_inner());
    let layer = JemallocLayer::builder()
        .namespace("restate")
        .build()
        .unwrap();
    let exposition = scrape(&layer).await;

    // The names Restate's dashboards use, spelled out: they must not move with the table.
    for name in [
        "allocated",
        "active",
        "metadata",
        "mapped",
        "retained",
        "resident",
    ] {
        let name = format!("restate_jemalloc_{name}_bytes");
        assert!(exposition.value(&name).is_some(), "no {name}");
    }
    for (gauge, help) in GAUGES.iter().zip(HELP) {
        let name = format!("restate_jemalloc_{gauge}_bytes");
        assert_eq!(
            exposition.types.get(&name).map(String::as_str),
            Some("gauge"),
            "{name}"
        );
        assert_eq!(
            exposition.help.get(&name).map(String::as_str),
            Some(help),
            "{name}"
        );
        let value = exposition
            .value(&name)
            .unwrap_or_else(|| panic!("{name} has a sample"));
        assert!(value >= 0.0 && value.fract() == 0.0, "{name} = {value}");
    }
    let value = |g: &str| {
        exposition
            .value(&format!("restate_jemalloc_{g}_bytes"))
            .unwrap()
    };
    assert!(value("allocated") > 0.0);
    assert!(value("active") >= value("allocated"));
    assert!(value("resident") >= value("active"));
    assert!(value("mapped") >= value("active"));
    assert!(value("metadata") > 0.0);
    // No gauge without the namespace.
    assert!(exposition
        .samples
        .iter()
        .all(|s| !s.name.starts_with("jemalloc_")));
}

#[tokio::test]
async fn no_namespace_gives_plain_names() {
    let _serial = EPOCH.lock().unwrap_or_else(|e| e.into_inner());
    let exposition = scrape(&JemallocLayer::new()).await;
    for gauge in GAUGES {
        let name = format!("jemalloc_{gauge}_bytes");
        assert_eq!(
            exposition.types.get(&name).map(String::as_str),
            Some("gauge"),
            "{name}"
        );
        assert!(exposition.value(&name).is_some(), "{name}");
    }
}

/// The heap profile endpoint answers 501 without the `profiling` feature: no profiling family
/// may suggest otherwise. With it, the heap profile counter and histogram are there from the
/// first scrape.
#[tokio::test]
async fn profiling_families_only_in_a_build_with_the_profiler() {
    let _serial = EPOCH.lock().unwrap_or_else(|e| e.into_inner());
    let layer = JemallocLayer::builder()
        .allow_anonymous(tower_jemalloc::Endpoint::Purge)
        .build()
        .unwrap();
    let exposition = scrape(&layer).await;
    let families: Vec<&str> = exposition
        .types
        .keys()
        .map(String::as_str)
        .chain(exposition.samples.iter().map(|s| s.name.as_str()))
        .collect();
    let heap_profile = |name: &&str| name.starts_with("jemalloc_heap_profile");
    if cfg!(feature = "profiling") {
        assert!(families.iter().any(heap_profile), "{families:?}");
    } else {
        assert!(!families.iter().any(heap_profile), "{families:?}");
        assert!(
            !families
                .iter()
                .any(|name| name.starts_with("jemalloc_profiling")),
            "{families:?}"
        );
    }
}

#[tokio::test]
async fn one_epoch_advance_per_scrape() {
    let _serial = EPOCH.lock().unwrap_or_else(|e| e.into_inner());
    let layer = JemallocLayer::new();
    let epoch = tikv_jemalloc_ctl::epoch::mib().unwrap();
    for _ in 0..3 {
        let before = epoch.read().unwrap();
        scrape(&layer).await;
        let after = epoch.read().unwrap();
        assert_eq!(after - before, 1, "one epoch advance per scrape");
    }
}

#[tokio::test]
async fn gauges_follow_the_application() {
    let _serial = EPOCH.lock().unwrap_or_else(|e| e.into_inner());
    let layer = JemallocLayer::new();
    let before = scrape(&layer)
        .await
        .value("jemalloc_allocated_bytes")
        .unwrap();
    let held: Vec<Box<[u8; 4096]>> = (0..16 * 256).map(|_| Box::new([1; 4096])).collect();
    let during = scrape(&layer)
        .await
        .value("jemalloc_allocated_bytes")
        .unwrap();
    drop(held);
    assert!(
        during - before >= 15.0 * 1024.0 * 1024.0,
        "allocated grew by {} bytes while 16 MiB were held",
        during - before
    );
}

#[tokio::test]
async fn gauges_sit_beside_the_applications_metrics_on_its_own_provider() {
    let _serial = EPOCH.lock().unwrap_or_else(|e| e.into_inner());
    let registry = prometheus::Registry::new();
    let exporter = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .with_namespace("shop")
        .build()
        .unwrap();
    let provider = SdkMeterProvider::builder().with_reader(exporter).build();
    let layer = JemallocLayer::builder()
        .registry(registry, provider.meter("tower-jemalloc"))
        .build()
        .unwrap();
    assert!(layer.meter_provider().is_none());
    provider
        .meter("shop")
        .u64_counter("orders")
        .build()
        .add(3, &[opentelemetry::KeyValue::new("kind", "book")]);

    let exposition = scrape(&layer).await;
    assert!(exposition.value("shop_jemalloc_resident_bytes").unwrap() > 0.0);
    let orders = exposition
        .samples
        .iter()
        .find(|s| s.name == "shop_orders_total")
        .expect("the application's counter");
    assert_eq!(orders.value, 3.0);
    assert_eq!(orders.labels.get("kind").map(String::as_str), Some("book"));
}

#[test]
fn register_instruments_works_on_any_meter() {
    let _serial = EPOCH.lock().unwrap_or_else(|e| e.into_inner());
    let samples = exported_with(|meter| tower_jemalloc::register_instruments(meter).unwrap());
    for gauge in GAUGES {
        let name = format!("jemalloc_{gauge}_bytes");
        assert!(samples.iter().any(|(s, _)| *s == name), "{samples:?}");
    }
}

/// The gauges of `register_instruments` on a provider of its own, exported without a namespace:
/// every sample as (name, `arena` label).
fn exported_with(register: impl FnOnce(&opentelemetry::metrics::Meter)) -> Vec<(String, String)> {
    let registry = prometheus::Registry::new();
    let exporter = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .build()
        .unwrap();
    let provider = SdkMeterProvider::builder().with_reader(exporter).build();
    register(&provider.meter("otlp-only"));
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    parse_exposition(&text)
        .samples
        .into_iter()
        .map(|s| {
            let arena = s.labels.get("arena").cloned().unwrap_or_default();
            (s.name, arena)
        })
        .collect()
}

#[test]
fn register_instruments_with_adds_the_per_arena_gauges() {
    let _serial = EPOCH.lock().unwrap_or_else(|e| e.into_inner());
    let per_arena = [
        "jemalloc_arena_resident_bytes",
        "jemalloc_arena_dirty_bytes",
        "jemalloc_arena_muzzy_bytes",
        "jemalloc_arena_threads",
    ];

    let plain = exported_with(|meter| tower_jemalloc::register_instruments(meter).unwrap());
    assert!(
        plain
            .iter()
            .any(|(name, _)| name == "jemalloc_resident_bytes"),
        "{plain:?}"
    );
    assert!(
        !plain.iter().any(|(name, _)| per_arena.contains(&&**name)),
        "per-arena gauges are opt-in: {plain:?}"
    );

    let options = tower_jemalloc::InstrumentOptions::new().per_arena(true);
    let with =
        exported_with(|meter| tower_jemalloc::register_instruments_with(meter, options).unwrap());
    assert!(
        with.iter()
            .any(|(name, _)| name == "jemalloc_resident_bytes"),
        "{with:?}"
    );
    for gauge in per_arena {
        let arenas: Vec<&str> = with
            .iter()
            .filter(|(name, _)| name == gauge)
            .map(|(_, arena)| arena.as_str())
            .collect();
        // Arena 0 always exists; every series names its arena.
        assert!(arenas.contains(&"0"), "{gauge}: {with:?}");
        assert!(
            arenas.iter().all(|arena| arena.parse::<u32>().is_ok()),
            "{gauge}: {arenas:?}"
        );
    }
}

#[test]
fn stats_read_directly() {
    let _serial = EPOCH.lock().unwrap_or_else(|e| e.into_inner());
    let stats = tower_jemalloc::JemallocStats::read().unwrap();
    assert!(stats.allocated > 0);
    // Not `active >= allocated`: jemalloc sums each arena's counters while other threads of
    // this test binary (runtimes of the tests before) may still allocate, so the two can be
    // read a few pages apart.
    assert!(stats.active > 0 && stats.resident > 0);
    assert_eq!(stats.iter().next(), Some(("allocated", stats.allocated)));
}
