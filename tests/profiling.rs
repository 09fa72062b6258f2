//! Heap profiling against a real jemalloc: `cargo test --features profiling --test profiling`.
//! Without the feature (`cargo test`), only the 501 answers are checked.
//!
//! The profiler's state is process-wide: the tests of this file take turns and each starts
//! from profiling inactive at the default sample interval.
#![cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
// The serialising std mutex is held across awaits on purpose: every #[tokio::test] runs on its
// own current-thread runtime, so no other task on that thread can wait for it.
#![allow(clippy::await_holding_lock)]

mod common;

use common::*;
use http::StatusCode;
use tower::Layer;
use tower_jemalloc::{Endpoint, JemallocLayer};

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

/// The profiler available and inactive, as the README tells users to start it.
#[cfg(feature = "profiling")]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8] = b"prof:true,prof_active:false\0";

const HEAP: &str = "/debug/pprof/heap";
const CONTROL: &str = "/debug/jemalloc/profiling";

fn layer(builder: tower_jemalloc::JemallocLayerBuilder) -> JemallocService<Echo> {
    builder
        .allow_anonymous(Endpoint::Purge)
        .build()
        .unwrap()
        .layer(recording_echo().0)
}

type JemallocService<S> = tower_jemalloc::JemallocService<S>;

#[cfg(not(feature = "profiling"))]
#[tokio::test]
async fn without_the_feature_both_endpoints_say_how_to_build_it() {
    let mut service = layer(JemallocLayer::builder());
    for (method, path) in [
        ("GET", HEAP),
        ("GET", CONTROL),
        ("PUT", "/debug/jemalloc/profiling?active=true"),
    ] {
        let answer = send(&mut service, request(method, path)).await;
        assert_eq!(
            answer.status,
            StatusCode::NOT_IMPLEMENTED,
            "{method} {path}"
        );
        assert_eq!(
            answer.text(),
            "heap profiling is not compiled in: build with `--features profiling` \
             (tower-jemalloc's profiling feature)\n"
        );
    }
}

#[cfg(feature = "profiling")]
mod with_the_feature {
    use super::*;
    use std::io::Read;
    use std::sync::{Mutex, MutexGuard};
    use std::time::Duration;
    use tower::{Service, ServiceExt};

    static SERIAL: Mutex<()> = Mutex::new(());

    /// Takes this file's turn and puts the profiler back to inactive, default interval.
    async fn turn(service: &mut JemallocService<Echo>) -> MutexGuard<'static, ()> {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let uri = format!("{CONTROL}?active=false&lg_sample=19");
        let answer = send(service, request("PUT", &uri)).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        serial
    }

    async fn put(service: &mut JemallocService<Echo>, query: &str) -> serde_json::Value {
        let answer = send(service, request("PUT", &format!("{CONTROL}?{query}"))).await;
        assert_eq!(answer.status, StatusCode::OK, "{query}: {}", answer.text());
        assert_eq!(answer.header("content-type"), Some("application/json"));
        answer.json()
    }

    /// `mib` blocks of 1 MiB, filled with `fill`. Always inlined, so that the allocations are
    /// made from the named functions below (a loop, not a tail call, so that they stay on the
    /// stack in optimised builds too).
    #[inline(always)]
    fn blocks(mib: usize, fill: u8) -> Vec<Box<[u8]>> {
        let mut kept = Vec::with_capacity(mib);
        for _ in 0..mib {
            kept.push(std::hint::black_box(vec![fill; 1 << 20].into_boxed_slice()));
        }
        kept
    }

    /// Keeps `mib` MiB, from a function the profiles must name.
    #[inline(never)]
    fn held_before_the_window(mib: usize) -> Vec<Box<[u8]>> {
        blocks(mib, 1)
    }

    /// The same, from another function, for what grows during a window.
    #[inline(never)]
    fn grown_during_the_window(mib: usize) -> Vec<Box<[u8]>> {
        blocks(mib, 3)
    }

    fn gunzip(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(body)
            .read_to_end(&mut out)
            .expect("a gzipped pprof profile");
        out
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|window| window == needle.as_bytes())
    }

    #[tokio::test]
    async fn the_control_reports_and_switches_the_profiler() {
        let mut service = layer(JemallocLayer::builder());
        let _turn = turn(&mut service).await;

        let answer = send(&mut service, request("GET", CONTROL)).await;
        assert_eq!(answer.status, StatusCode::OK);
        let status: tower_jemalloc::ProfilingStatus = serde_json::from_slice(&answer.body).unwrap();
        assert!(status.available && !status.active, "{status:?}");
        assert_eq!(status.lg_sample, Some(19));
        assert_eq!(status.sample_interval_bytes, Some(512 * 1024));
        assert_eq!(status.how_to_enable, None);

        let change = put(&mut service, "active=true").await;
        assert_eq!(change["before"]["active"], false);
        assert_eq!(change["after"]["active"], true);
        assert!(change["after"].get("switches_off_in_seconds").is_none());

        let change = put(&mut service, "lg_sample=20").await;
        assert_eq!(change["before"]["sample_interval_bytes"], 524_288);
        assert_eq!(change["after"]["sample_interval_bytes"], 1_048_576);
        assert_eq!(change["after"]["lg_sample"], 20);
        assert_eq!(change["after"]["active"], true);

        let change: tower_jemalloc::ProfilingChange =
            serde_json::from_value(put(&mut service, "active=false&lg_sample=19").await).unwrap();
        assert!(change.before.active && !change.after.active, "{change:?}");
        assert_eq!(change.after.lg_sample, Some(19));

        // The gauges follow.
        put(&mut service, "active=true").await;
        let exposition =
            parse_exposition(send(&mut service, request("GET", "/metrics")).await.text());
        assert_eq!(exposition.value("jemalloc_profiling_active"), Some(1.0));
        assert_eq!(
            exposition.value("jemalloc_profiling_sample_interval_bytes"),
            Some(524_288.0)
        );
    }

    #[tokio::test]
    async fn for_switches_profiling_off_by_itself() {
        let mut service = layer(JemallocLayer::builder());
        let _turn = turn(&mut service).await;
        let change = put(&mut service, "active=true&for=1s").await;
        assert_eq!(change["after"]["active"], true);
        assert_eq!(change["after"]["switches_off_in_seconds"], 1);
        let mut active = true;
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let status = send(&mut service, request("GET", CONTROL)).await.json();
            active = status["active"] == true;
            if !active {
                assert!(status.get("switches_off_in_seconds").is_none(), "{status}");
                break;
            }
        }
        assert!(!active, "still active 4 s after for=1s");
    }

    /// Polls the state until profiling is off, for at most `limit`; whether it is.
    async fn switched_off_within(service: &mut JemallocService<Echo>, limit: Duration) -> bool {
        let step = Duration::from_millis(100);
        for _ in 0..limit.as_millis() / step.as_millis() {
            tokio::time::sleep(step).await;
            let status = send(service, request("GET", CONTROL)).await.json();
            if status["active"] == false {
                return true;
            }
        }
        false
    }

    #[tokio::test]
    async fn a_switch_on_without_for_keeps_the_deadline_and_says_so() {
        let mut service = layer(JemallocLayer::builder());
        let _turn = turn(&mut service).await;

        // A second active=true names no deadline: the first one's stays, and the answer says
        // when it comes.
        put(&mut service, "active=true&for=2s").await;
        let change = put(&mut service, "active=true").await;
        assert_eq!(change["after"]["active"], true);
        let left = change["after"]["switches_off_in_seconds"].as_u64();
        assert!(matches!(left, Some(1..=2)), "{change}");
        assert!(
            change["before"]["switches_off_in_seconds"].is_u64(),
            "{change}"
        );
        assert!(
            switched_off_within(&mut service, Duration::from_secs(5)).await,
            "the deadline of for=2s was dropped by a later active=true"
        );

        // A new for= replaces the deadline, shorter or longer.
        put(&mut service, "active=true&for=1h").await;
        let change = put(&mut service, "active=true&for=2s").await;
        assert_eq!(change["before"]["switches_off_in_seconds"], 3600);
        assert_eq!(change["after"]["switches_off_in_seconds"], 2);
        let change = put(&mut service, "active=true&for=1h").await;
        assert_eq!(change["after"]["switches_off_in_seconds"], 3600);

        // active=false clears it: switched on again without for=, profiling stays on.
        let change = put(&mut service, "active=false").await;
        assert!(change["after"].get("switches_off_in_seconds").is_none());
        let change = put(&mut service, "active=true").await;
        assert_eq!(change["after"]["active"], true);
        assert!(change["after"].get("switches_off_in_seconds").is_none());
        put(&mut service, "active=true&for=1s").await;
        put(&mut service, "active=false").await;
        put(&mut service, "active=true").await;
        assert!(
            !switched_off_within(&mut service, Duration::from_millis(1500)).await,
            "a deadline survived active=false"
        );
    }

    #[tokio::test]
    async fn bad_input_is_refused_naming_what_is_allowed() {
        let mut service = layer(JemallocLayer::builder());
        let _turn = turn(&mut service).await;
        put(&mut service, "active=true").await;
        for (method, uri, reason) in [
            (
                "GET",
                "/debug/pprof/heap?format=svg",
                "use format=pprof (the default) or format=flamegraph",
            ),
            ("GET", "/debug/pprof/heap?seconds=0", "from 1 to 300"),
            ("GET", "/debug/pprof/heap?seconds=301", "from 1 to 300"),
            ("GET", "/debug/pprof/heap?seconds=1.5", "from 1 to 300"),
            ("GET", "/debug/pprof/heap?seconds=+3", "without a sign"),
            (
                "GET",
                "/debug/pprof/heap?seconds=3&seconds=1",
                "parameter \"seconds\" is given twice",
            ),
            (
                "GET",
                "/debug/pprof/heap?debug=1",
                "accepts format, seconds",
            ),
            (
                "GET",
                "/debug/jemalloc/profiling?active=true",
                "change it with PUT",
            ),
            (
                "PUT",
                "/debug/jemalloc/profiling",
                "PUT needs active=true|false",
            ),
            (
                "PUT",
                "/debug/jemalloc/profiling?active=yes",
                "active must be true or false",
            ),
            (
                "PUT",
                "/debug/jemalloc/profiling?lg_sample=11",
                "from 12 to 30",
            ),
            (
                "PUT",
                "/debug/jemalloc/profiling?lg_sample=31",
                "from 12 to 30",
            ),
            (
                "PUT",
                "/debug/jemalloc/profiling?active=true&for=25h",
                "from 1s to 24h",
            ),
            (
                "PUT",
                "/debug/jemalloc/profiling?active=true&for=10",
                "from 1s to 24h",
            ),
            (
                "PUT",
                "/debug/jemalloc/profiling?active=false&for=1m",
                "only goes with active=true",
            ),
            (
                "PUT",
                "/debug/jemalloc/profiling?active=true&for=+2s",
                "without a sign",
            ),
            (
                "PUT",
                "/debug/jemalloc/profiling?lg_sample=+20",
                "without a sign",
            ),
            (
                "PUT",
                "/debug/jemalloc/profiling?active=false&active=true",
                "parameter \"active\" is given twice",
            ),
        ] {
            let answer = send(&mut service, request(method, uri)).await;
            assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{method} {uri}");
            assert!(answer.text().contains(reason), "{uri}: {}", answer.text());
            assert_eq!(answer.text().lines().count(), 1);
        }
        // Nothing was changed by the refused requests.
        let status = send(&mut service, request("GET", CONTROL)).await.json();
        assert_eq!(
            (status["active"].clone(), status["lg_sample"].clone()),
            (true.into(), 19.into())
        );
        for (method, path) in [("POST", HEAP), ("DELETE", CONTROL)] {
            let answer = send(&mut service, request(method, path)).await;
            assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
        }
    }

    #[tokio::test]
    async fn inactive_profiling_gets_409_saying_how_to_activate() {
        let mut service = layer(JemallocLayer::builder());
        let _turn = turn(&mut service).await;
        for uri in [HEAP, "/debug/pprof/heap?format=flamegraph&seconds=1"] {
            let answer = send(&mut service, request("GET", uri)).await;
            assert_eq!(answer.status, StatusCode::CONFLICT);
            assert!(
                answer.text().contains("PUT ?active=true"),
                "{}",
                answer.text()
            );
        }
    }

    /// The stats summary reports what this test binary builds in: the profiler compiled in,
    /// started, inactive, at the default interval, from the options of `MALLOC_CONF` above.
    #[tokio::test]
    async fn the_summary_reports_the_profilers_build_and_options() {
        let mut service = layer(JemallocLayer::builder());
        let answer = send(&mut service, request("GET", "/debug/jemalloc/stats")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        let summary = &answer.json()["summary"];
        assert_eq!(
            summary["profiler"],
            serde_json::json!({
                "compiled_in": true, "started": true, "active_at_start": false, "lg_sample": 19
            })
        );
        let malloc_conf = &summary["malloc_conf"];
        assert_eq!(malloc_conf["built_in"], "prof:true,prof_active:false");
        assert_eq!(malloc_conf["symbol"], "_rjem_malloc_conf");
        assert_eq!(malloc_conf["environment_variable"], "_RJEM_MALLOC_CONF");
        assert!(
            !summary["hints"].to_string().contains("heap profiler"),
            "{}",
            summary["hints"]
        );
    }

    #[tokio::test]
    async fn the_live_heap_names_what_holds_the_memory() {
        let mut service = layer(JemallocLayer::builder());
        let _turn = turn(&mut service).await;
        let temp_before = temp_files();
        put(&mut service, "active=true").await;
        let held = held_before_the_window(16);

        let answer = send(&mut service, request("GET", HEAP)).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        assert_eq!(
            answer.header("content-type"),
            Some("application/octet-stream")
        );
        assert_eq!(
            answer.header("content-disposition"),
            Some("attachment; filename=\"heap.pb.gz\"")
        );
        let profile = gunzip(&answer.body);
        // Symbolized: the function's name is in the profile's string table.
        assert!(contains(&profile, "held_before_the_window"));
        assert!(contains(&profile, "inuse_space"));
        // The allocator's frames are named for pprof's drop_frames, so that the bytes are
        // attributed to the code that allocated.
        assert!(contains(&profile, "_rjem_.*|prof_backtrace_impl"));

        let answer = send(
            &mut service,
            request("GET", "/debug/pprof/heap?format=flamegraph"),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.header("content-type"), Some("image/svg+xml"));
        let svg = answer.text();
        assert!(svg.starts_with("<?xml"), "an SVG document");
        assert!(svg.contains("held_before_the_window"));
        // The allocator's frames are cut as drop_frames cuts them in pprof: the graph's
        // leaves are the code that allocated.
        for allocator in [
            "prof_backtrace_impl",
            "_rjem_je_prof_backtrace",
            "_rjem_",
            "__rust_alloc",
        ] {
            assert!(!svg.contains(allocator), "{allocator} in the flame graph");
        }
        drop(held);

        // jemalloc's dump files are gone.
        assert_eq!(temp_files(), temp_before);
        let exposition =
            parse_exposition(send(&mut service, request("GET", "/metrics")).await.text());
        let ok = |format: &str| {
            exposition
                .samples
                .iter()
                .find(|s| {
                    s.name == "jemalloc_heap_profiles_total"
                        && s.labels["format"] == format
                        && s.labels["result"] == "ok"
                })
                .map(|s| s.value)
        };
        assert_eq!((ok("pprof"), ok("flamegraph")), (Some(1.0), Some(1.0)));
        assert!(exposition
            .samples
            .iter()
            .any(|s| s.name == "jemalloc_heap_profile_duration_seconds_count"
                && s.labels["format"] == "pprof"
                && s.value == 1.0));
    }

    /// The temporary files named as the dump's are (`tempfile`'s `.tmp` prefix): other
    /// programs (a compiler, say) may come and go in the same directory meanwhile.
    fn temp_files() -> std::collections::BTreeSet<std::ffi::OsString> {
        std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .filter(|name| name.to_string_lossy().starts_with(".tmp"))
            .collect()
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_dump() {
        let mut service = layer(JemallocLayer::builder());
        let _turn = turn(&mut service).await;
        put(&mut service, "active=true").await;
        let call = |service: &JemallocService<Echo>| {
            let mut service = service.clone();
            async move {
                service
                    .ready()
                    .await
                    .unwrap()
                    .call(request("GET", HEAP))
                    .await
            }
        };
        let answers = tokio::join!(
            call(&service),
            call(&service),
            call(&service),
            call(&service)
        );
        for response in [answers.0, answers.1, answers.2, answers.3] {
            assert_eq!(response.unwrap().status(), StatusCode::OK);
        }
        let exposition =
            parse_exposition(send(&mut service, request("GET", "/metrics")).await.text());
        let dumps: f64 = exposition
            .samples
            .iter()
            .filter(|s| s.name == "jemalloc_heap_profiles_total" && s.labels["format"] == "pprof")
            .map(|s| s.value)
            .sum();
        assert_eq!(dumps, 1.0, "four requests together, one dump");
    }

    #[tokio::test]
    async fn seconds_answers_the_growth_over_the_window() {
        let mut service = layer(JemallocLayer::builder());
        let _turn = turn(&mut service).await;
        put(&mut service, "active=true").await;
        let held = held_before_the_window(16);

        let window = service.ready().await.unwrap().call(request(
            "GET",
            "/debug/pprof/heap?format=flamegraph&seconds=2",
        ));
        let during = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let grown = grown_during_the_window(16);
            // A second window while one runs: 409, with when to retry.
            let mut other = service.clone();
            let answer = send(&mut other, request("GET", "/debug/pprof/heap?seconds=1")).await;
            (grown, answer)
        };
        let (answer, (grown, refused)) = tokio::join!(window, during);
        assert_eq!(refused.status, StatusCode::CONFLICT);
        assert!(refused.header("retry-after").is_some());
        let answer = answer.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        use http_body_util::BodyExt;
        let svg = answer.into_body().collect().await.unwrap().to_bytes();
        let svg = std::str::from_utf8(&svg).unwrap();
        assert!(
            svg.contains("growth over 2 s"),
            "the title says what it shows"
        );
        assert!(
            svg.contains("grown_during_the_window"),
            "what grew is there"
        );
        assert!(
            !svg.contains("held_before_the_window"),
            "what was held before is not"
        );
        drop((held, grown));
    }

    #[tokio::test]
    async fn a_hung_up_growth_window_frees_its_slot_at_once() {
        let mut service = layer(JemallocLayer::builder());
        let _turn = turn(&mut service).await;
        put(&mut service, "active=true").await;

        let window = service
            .ready()
            .await
            .unwrap()
            .call(request("GET", "/debug/pprof/heap?seconds=300"));
        let refused = send(&mut service, request("GET", "/debug/pprof/heap?seconds=1")).await;
        assert_eq!(refused.status, StatusCode::CONFLICT, "the window runs");

        // The client hangs up: its response future is dropped. The next window is accepted at
        // once, not 300 s later.
        drop(window);
        let answer = send(&mut service, request("GET", "/debug/pprof/heap?seconds=1")).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        assert_eq!(
            answer.header("content-type"),
            Some("application/octet-stream")
        );

        // The abandoned window stopped too, rather than wait out its 300 s.
        #[cfg(target_os = "linux")]
        {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while threads_named("jemalloc-heap-growth") > 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "an abandoned growth window still runs"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    #[tokio::test]
    async fn a_dump_over_the_cap_is_refused_naming_it() {
        let mut service = layer(JemallocLayer::builder().heap_profile_max_bytes(100));
        let _turn = turn(&mut service).await;
        put(&mut service, "active=true").await;
        let answer = send(&mut service, request("GET", HEAP)).await;
        assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            answer.text().contains("over the cap of 100 bytes"),
            "{}",
            answer.text()
        );
        assert!(answer.text().contains("heap_profile_max_bytes"));
    }

    /// jemalloc started without `prof:true` (the environment overrides the binary's options):
    /// run in a child process of this test binary.
    #[test]
    fn started_without_the_profiler_gets_503_saying_how() {
        const CHILD: &str = "TOWER_JEMALLOC_PROFILING_CHILD";
        if std::env::var_os(CHILD).is_none() {
            let output = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "with_the_feature::started_without_the_profiler_gets_503_saying_how",
                    "--nocapture",
                ])
                .env(CHILD, "1")
                .env("_RJEM_MALLOC_CONF", "prof:false")
                .output()
                .unwrap();
            let printed = String::from_utf8_lossy(&output.stdout);
            assert!(
                output.status.success(),
                "{printed}{}",
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(printed.contains("1 passed"), "{printed}");
            return;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut service = layer(JemallocLayer::builder());
            let status = send(&mut service, request("GET", CONTROL)).await;
            assert_eq!(status.status, StatusCode::OK);
            let status = status.json();
            assert_eq!(status["available"], false);
            assert!(status["how_to_enable"]
                .as_str()
                .unwrap()
                .contains("_RJEM_MALLOC_CONF=prof:true"));
            for (method, uri) in [
                ("GET", HEAP),
                ("PUT", "/debug/jemalloc/profiling?active=true"),
            ] {
                let answer = send(&mut service, request(method, uri)).await;
                assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{uri}");
                let reason = answer.text();
                assert!(reason.contains("_RJEM_MALLOC_CONF=prof:true"), "{reason}");
                assert!(
                    reason.contains(
                        r#"#[unsafe(export_name = "_rjem_malloc_conf")] pub static MALLOC_CONF: &[u8] = b"prof:true,prof_active:false\0";"#
                    ),
                    "{reason}"
                );
            }
            // The summary says so too, with the environment's options and the same advice.
            let stats = send(&mut service, request("GET", "/debug/jemalloc/stats")).await;
            let summary = &stats.json()["summary"];
            assert_eq!(summary["profiler"]["started"], false);
            assert_eq!(summary["malloc_conf"]["environment"], "prof:false");
            let hints = summary["hints"].to_string();
            assert!(
                hints.contains("heap profiler is compiled in but was not started")
                    && hints.contains("_RJEM_MALLOC_CONF=prof:true,prof_active:false"),
                "{hints}"
            );
            // No gauges for a profiler that is not there.
            let metrics = send(&mut service, request("GET", "/metrics")).await;
            assert!(!metrics.text().contains("jemalloc_profiling_active"));
        });
    }
}
