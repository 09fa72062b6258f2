//! [`StatsSummary`]: jemalloc's configuration, the current figures, two ratios and what they
//! suggest in plain language, in the spirit of Redis's `MEMORY DOCTOR`.

use super::ctl::{Ctl, ProfOptions, Settings};
use super::options::OptionNames;
use super::{JemallocError, JemallocStats};
use crate::system::{CgroupMemory, ProcessUsage};
use serde::{Deserialize, Serialize};

/// The `summary` of `GET /debug/jemalloc/stats`: what the figures mean and what to do about
/// them. Serialized (serde) as:
///
/// ```json
/// {"version":"5.3.1-…","background_thread":{"enabled_at_start":false,"running":false},
///  "dirty_decay_ms":10000,"muzzy_decay_ms":0,"arenas":9,
///  "malloc_conf":{"compiled":"","built_in":"prof:true,prof_active:false",
///                 "symbol":"_rjem_malloc_conf","environment_variable":"_RJEM_MALLOC_CONF",
///                 "environment":null},
///  "profiler":{"compiled_in":true,"started":true,"active_at_start":false,"lg_sample":19},
///  "stats":{"allocated":…,…},
///  "ratios":{"active_to_allocated":1.2083,"resident_to_active":3.1037},
///  "hints":["…"]}
/// ```
///
/// The names in `malloc_conf` and in the hints are those of this build's jemalloc:
/// tikv-jemalloc-sys prefixes its symbols with `_rjem_` (so it reads `_RJEM_MALLOC_CONF` and
/// `_rjem_malloc_conf`) unless its `unprefixed_malloc_on_supported_platforms` feature is on
/// (then `MALLOC_CONF` and `malloc_conf`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StatsSummary {
    /// jemalloc's `version`.
    pub version: String,
    /// Whether background threads were asked for and whether they run.
    pub background_thread: BackgroundThread,
    /// `opt.dirty_decay_ms` (-1: never decay).
    pub dirty_decay_ms: i64,
    /// `opt.muzzy_decay_ms` (-1: never decay).
    pub muzzy_decay_ms: i64,
    /// `arenas.narenas`.
    pub arenas: u32,
    /// Where jemalloc's options came from.
    pub malloc_conf: MallocConf,
    /// The heap profiler: built in, and its start-up options.
    pub profiler: Profiler,
    /// The figures, from one epoch advance.
    pub stats: JemallocStats,
    /// Two ratios of the figures.
    pub ratios: Ratios,
    /// What the figures suggest, in plain language; empty when nothing stands out.
    pub hints: Vec<String>,
}

/// jemalloc's background threads, in a [`StatsSummary`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BackgroundThread {
    /// `opt.background_thread`: asked for at start-up.
    pub enabled_at_start: bool,
    /// `background_thread`: running now.
    pub running: bool,
}

/// Where jemalloc's options came from, in a [`StatsSummary`]. jemalloc reads them, in this
/// order (later ones win), from its own build, the binary and the environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MallocConf {
    /// `config.malloc_conf`: the options jemalloc itself was built with (`--with-malloc-conf`;
    /// empty for tikv-jemalloc-sys's build).
    pub compiled: String,
    /// The options the application builds into its binary through the
    /// [`symbol`](Self::symbol), if it defines it.
    #[serde(default)]
    pub built_in: Option<String>,
    /// The symbol jemalloc reads built-in options from in this build: `_rjem_malloc_conf`
    /// (prefixed) or `malloc_conf`.
    #[serde(default)]
    pub symbol: String,
    /// The environment variable jemalloc reads in this build: `_RJEM_MALLOC_CONF` (prefixed) or
    /// `MALLOC_CONF`. The other one is ignored.
    #[serde(default)]
    pub environment_variable: String,
    /// The value of [`environment_variable`](Self::environment_variable), if set.
    pub environment: Option<String>,
}

/// jemalloc's heap profiler, in a [`StatsSummary`]: built in (the `profiling` feature, or
/// tikv-jemalloc-sys's `profiling` feature elsewhere in the dependency graph) and its
/// start-up options. The options are left out (JSON: absent) when it is not built in, where
/// they do not exist. `GET /debug/jemalloc/profiling` says whether it samples now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Profiler {
    /// `config.prof`: jemalloc was built with its heap profiler.
    pub compiled_in: bool,
    /// `opt.prof`: started with it (`prof:true`); without it no profile can be taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<bool>,
    /// `opt.prof_active`: sampling from the start (`prof_active`, true unless set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_at_start: Option<bool>,
    /// `opt.lg_prof_sample`: the mean interval between samples at start-up, as 2^N bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lg_sample: Option<u32>,
}

/// Ratios of the figures, in a [`StatsSummary`]; `None` (JSON `null`) when the denominator is
/// zero. Rounded to four decimals.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Ratios {
    /// `active / allocated`: above 1, fragmentation inside pages.
    pub active_to_allocated: Option<f64>,
    /// `resident / active`: above 1, pages held but not in use (dirty pages, metadata).
    pub resident_to_active: Option<f64>,
}

impl StatsSummary {
    /// Reads jemalloc's settings and one snapshot, and says what they mean.
    pub(crate) fn read(ctl: &Ctl) -> Result<Self, JemallocError> {
        let settings = ctl.settings()?;
        let stats = ctl.snapshot()?;
        let names = OptionNames::of_this_build();
        let sources = Sources {
            names,
            built_in: super::options::built_in(),
            environment: std::env::var(names.environment_variable()).ok(),
            ignored_environment: std::env::var_os(names.ignored_environment_variable()).is_some(),
        };
        let outside = Outside {
            process: ProcessUsage::read(),
            cgroup: CgroupMemory::read(),
        };
        Ok(Self::new(&settings, stats, sources, &outside))
    }

    fn new(settings: &Settings, stats: JemallocStats, sources: Sources, outside: &Outside) -> Self {
        let hints = hints(settings, &stats, &sources, outside);
        let prof = settings.prof;
        Self {
            version: settings.version.to_owned(),
            background_thread: BackgroundThread {
                enabled_at_start: settings.opt_background_thread,
                running: settings.background_threads_running,
            },
            dirty_decay_ms: settings.dirty_decay_ms,
            muzzy_decay_ms: settings.muzzy_decay_ms,
            arenas: settings.narenas,
            malloc_conf: MallocConf {
                compiled: settings.malloc_conf_compiled.to_owned(),
                built_in: sources.built_in,
                symbol: sources.names.symbol().to_owned(),
                environment_variable: sources.names.environment_variable().to_owned(),
                environment: sources.environment,
            },
            profiler: Profiler {
                compiled_in: prof.is_some(),
                started: prof.map(|p| p.started),
                active_at_start: prof.map(|p| p.active_at_start),
                lg_sample: prof.map(|p| p.lg_sample),
            },
            ratios: Ratios {
                active_to_allocated: ratio(stats.active, stats.allocated),
                resident_to_active: ratio(stats.resident, stats.active),
            },
            hints,
            stats,
        }
    }
}

/// Where jemalloc's options can come from in this build, and what they are.
#[derive(Debug)]
struct Sources {
    names: OptionNames,
    /// The value of the build's `malloc_conf` symbol, if the application defines it.
    built_in: Option<String>,
    /// The value of the environment variable the build reads, if set.
    environment: Option<String>,
    /// Whether the environment variable of the other build is set (and so ignored).
    ignored_environment: bool,
}

fn ratio(numerator: u64, denominator: u64) -> Option<f64> {
    (denominator != 0)
        .then(|| (numerator as f64 / denominator as f64 * 10_000.0).round() / 10_000.0)
}

const MIB: f64 = 1024.0 * 1024.0;

/// The process's memory as the kernel sees it, beside jemalloc's figures.
#[derive(Debug, Default)]
struct Outside {
    process: Option<ProcessUsage>,
    cgroup: Option<CgroupMemory>,
}

/// The memory governor's state, for its hints (filled by the stats endpoint: this module
/// knows nothing of the governor).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct GovernorFacts {
    /// The limit in bytes, if one is set.
    pub(crate) limit: Option<u64>,
    /// The usage the governor last read.
    pub(crate) usage: u64,
    /// Over the limit with nothing left to give back.
    pub(crate) unreclaimable: bool,
    /// This layer is shedding forwarded requests now.
    pub(crate) shedding: bool,
}

/// What the governor's state suggests, in plain language.
pub(crate) fn governor_hints(facts: &GovernorFacts) -> Vec<String> {
    let mut hints = Vec::new();
    let Some(limit) = facts.limit else {
        return hints;
    };
    if facts.unreclaimable {
        hints.push(format!(
            "Memory use {usage} MiB is over the limit {limit} MiB with nothing left to give \
             back: live memory exceeds the limit, not cached pages. Raise the limit (PUT \
             /debug/jemalloc/config?memory_limit=SIZE), find what holds the memory (GET \
             /debug/pprof/heap), or turn load away (shed_requests=true).",
            usage = facts.usage >> 20,
            limit = limit >> 20,
        ));
    }
    if facts.shedding {
        hints.push(format!(
            "This layer is shedding load: forwarded requests get 503 with Retry-After while \
             memory use is over the limit {} MiB, and are served again as soon as it falls \
             under it (jemalloc_shed_requests_total counts them).",
            limit >> 20,
        ));
    }
    hints
}

/// What the figures suggest, in plain language.
fn hints(
    settings: &Settings,
    stats: &JemallocStats,
    sources: &Sources,
    outside: &Outside,
) -> Vec<String> {
    let mut hints = Vec::new();
    let mib = |bytes: u64| bytes as f64 / MIB;
    let names = sources.names;
    if sources.ignored_environment {
        hints.push(format!(
            "{ignored} is set, but this build's jemalloc reads {read} ({how}): {ignored} is \
             ignored. Move its options to {read}.",
            ignored = names.ignored_environment_variable(),
            read = names.environment_variable(),
            how = if names.prefixed() {
                "its symbols carry tikv-jemalloc-sys's _rjem_ prefix"
            } else {
                "it is built unprefixed, as the C library's malloc"
            },
        ));
    }
    if !settings.background_threads_running {
        hints.push(format!(
            "Background threads are off: freed memory goes back to the OS only when allocation \
             activity drives decay, so an idle process keeps its dirty pages. Start them now \
             with PUT /debug/jemalloc/config?background_thread=true (until the process \
             restarts), and for good with background_thread:true in {}.",
            names.environment_variable()
        ));
    }
    if settings.dirty_decay_ms < 0 {
        hints.push(
            "dirty_decay_ms is -1: dirty pages are never returned on their own, only by a purge. \
             Set a decay time now with PUT /debug/jemalloc/config?dirty_decay_ms=N."
                .to_owned(),
        );
    }
    if let Some(ProfOptions { started: false, .. }) = settings.prof {
        hints.push(format!(
            "jemalloc's heap profiler is compiled in but was not started (opt.prof is false), so \
             no heap profile can be taken: to have it available, {}",
            names.how_to_set("prof:true,prof_active:false")
        ));
    }
    if stats.retained > 0 {
        hints.push(format!(
            "retained ({:.1} MiB) is virtual address space jemalloc keeps for reuse; it is not \
             in RSS and costs no physical memory.",
            mib(stats.retained)
        ));
    }
    if stats.resident > 0 && stats.dirty > stats.resident / 4 && stats.dirty > 64 << 20 {
        hints.push(format!(
            "{:.1} MiB of dirty pages ({:.0}% of resident) are freed memory jemalloc still \
             holds: a purge returns them now; a lower dirty_decay_ms returns them sooner.",
            mib(stats.dirty),
            100.0 * stats.dirty as f64 / stats.resident as f64
        ));
    }
    if stats.muzzy > 0 {
        hints.push(format!(
            "{:.1} MiB of muzzy pages were released lazily (MADV_FREE): they may still count \
             in RSS until the kernel needs the memory.",
            mib(stats.muzzy)
        ));
    }
    if stats.allocated > 64 << 20 && stats.active as f64 > 1.5 * stats.allocated as f64 {
        hints.push(format!(
            "active is {:.2}x allocated: memory is fragmented inside pages (many partly used \
             slabs). A purge does not help; look at allocation patterns or size classes.",
            stats.active as f64 / stats.allocated as f64
        ));
    }
    if let Some(process) = outside.process {
        let beyond = process.resident.saturating_sub(stats.resident);
        if beyond > 64 << 20 && beyond > process.resident / 4 {
            hints.push(format!(
                "RSS ({:.1} MiB) is {:.1} MiB above jemalloc's resident ({:.1} MiB): that memory \
                 is outside jemalloc (thread stacks, mapped files, another allocator such as a \
                 C library's malloc, or MADV_FREE pages not yet reclaimed). A purge or decay \
                 settings do not return it.",
                mib(process.resident),
                mib(beyond),
                mib(stats.resident)
            ));
        }
    }
    if let Some(CgroupMemory {
        current,
        max: Some(limit),
    }) = outside.cgroup
    {
        let share = 100.0 * stats.resident as f64 / limit as f64;
        let mut hint = format!(
            "jemalloc's resident is {share:.0}% of the cgroup's memory limit ({:.1} MiB; the \
             cgroup uses {:.1} MiB).",
            mib(limit),
            mib(current)
        );
        if current as f64 >= 0.8 * limit as f64 {
            hint.push_str(&format!(
                " The cgroup is near its limit, where the kernel reclaims and then kills: \
                 {:.1} MiB of dirty pages could go back now with a purge, or steadily with \
                 PUT /debug/jemalloc/config?background_thread=true&dirty_decay_ms=N (a \
                 shorter decay time).",
                mib(stats.dirty)
            ));
        }
        hints.push(hint);
    }
    hints
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(background: bool, dirty_decay_ms: i64) -> Settings {
        Settings {
            version: "5.3.0",
            opt_background_thread: background,
            background_threads_running: background,
            dirty_decay_ms,
            muzzy_decay_ms: 0,
            narenas: 4,
            malloc_conf_compiled: "",
            prof: None,
        }
    }

    /// A prefixed build with no options set anywhere.
    fn sources() -> Sources {
        Sources {
            names: OptionNames::PREFIXED,
            built_in: None,
            environment: None,
            ignored_environment: false,
        }
    }

    #[test]
    fn hints_follow_the_figures() {
        const MIB: u64 = 1 << 20;
        let calm = JemallocStats {
            allocated: 100 * MIB,
            active: 110 * MIB,
            resident: 130 * MIB,
            ..JemallocStats::default()
        };
        assert!(hints(
            &settings(true, 10_000),
            &calm,
            &sources(),
            &Outside::default()
        )
        .is_empty());

        let hints = hints(
            &settings(false, -1),
            &JemallocStats {
                allocated: 100 * MIB,
                active: 200 * MIB,
                resident: 800 * MIB,
                retained: 50 * MIB,
                dirty: 500 * MIB,
                muzzy: 10 * MIB,
                ..JemallocStats::default()
            },
            &sources(),
            &Outside::default(),
        );
        let all = hints.join("\n");
        assert_eq!(hints.len(), 6, "{all}");
        for expected in [
            "Background threads are off",
            "dirty_decay_ms is -1",
            "retained (50.0 MiB) is virtual address space",
            "500.0 MiB of dirty pages (62% of resident)",
            "10.0 MiB of muzzy pages",
            "active is 2.00x allocated",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
    }

    #[test]
    fn summary_json_keeps_its_shape_with_null_ratios_when_empty() {
        let summary = StatsSummary::new(
            &settings(true, 10_000),
            JemallocStats::default(),
            Sources {
                environment: Some("a\"b".into()),
                ..sources()
            },
            &Outside::default(),
        );
        let out = serde_json::to_string(&summary).unwrap();
        assert!(
            out.contains(r#""ratios":{"active_to_allocated":null,"resident_to_active":null}"#),
            "{out}"
        );
        assert!(out.starts_with(r#"{"version":"5.3.0","background_thread":{"enabled_at_start":true,"running":true},"dirty_decay_ms":10000,"muzzy_decay_ms":0,"arenas":4,"malloc_conf":{"compiled":"","built_in":null,"symbol":"_rjem_malloc_conf","environment_variable":"_RJEM_MALLOC_CONF","environment":"a\"b"},"profiler":{"compiled_in":false},"stats":{"allocated":0,"#), "{out}");
        assert_eq!(serde_json::from_str::<StatsSummary>(&out).unwrap(), summary);
    }

    #[test]
    fn hints_name_memory_outside_jemalloc_and_the_cgroup_limit() {
        const MIB: u64 = 1 << 20;
        let stats = JemallocStats {
            allocated: 300 * MIB,
            active: 310 * MIB,
            resident: 400 * MIB,
            dirty: 80 * MIB,
            ..JemallocStats::default()
        };
        let outside = |rss: u64, current: u64, max: Option<u64>| Outside {
            process: Some(ProcessUsage {
                resident: rss * MIB,
                virtual_size: 4 * rss * MIB,
            }),
            cgroup: Some(CgroupMemory {
                current: current * MIB,
                max: max.map(|max| max * MIB),
            }),
        };
        let hints_for =
            |outside| hints(&settings(true, 10_000), &stats, &sources(), &outside).join("\n");
        // RSS close to resident, no limit: nothing to say.
        assert_eq!(hints_for(outside(420, 430, None)), "");
        let all = hints_for(outside(600, 620, Some(1000)));
        assert!(
            all.contains("RSS (600.0 MiB) is 200.0 MiB above jemalloc's resident (400.0 MiB)"),
            "{all}"
        );
        assert!(
            all.contains("resident is 40% of the cgroup's memory limit (1000.0 MiB; the cgroup uses 620.0 MiB).")
                && !all.contains("near its limit"),
            "{all}"
        );
        let near = hints_for(outside(420, 850, Some(1000)));
        assert!(!near.contains("RSS ("), "{near}");
        assert!(near.contains("near its limit"), "{near}");
        assert!(
            near.contains("80.0 MiB of dirty pages could go back"),
            "{near}"
        );
    }

    #[test]
    fn hints_name_the_builds_variable_and_the_config_endpoint() {
        let background_off = |names| {
            let sources = Sources { names, ..sources() };
            hints(
                &settings(false, 10_000),
                &JemallocStats::default(),
                &sources,
                &Outside::default(),
            )
        };
        assert_eq!(
            background_off(OptionNames::PREFIXED),
            ["Background threads are off: freed memory goes back to the OS only when allocation \
              activity drives decay, so an idle process keeps its dirty pages. Start them now \
              with PUT /debug/jemalloc/config?background_thread=true (until the process \
              restarts), and for good with background_thread:true in _RJEM_MALLOC_CONF."]
        );
        let unprefixed = background_off(OptionNames::UNPREFIXED).join("\n");
        assert!(
            unprefixed.contains("background_thread:true in MALLOC_CONF.")
                && !unprefixed.contains("_RJEM_"),
            "{unprefixed}"
        );
    }

    #[test]
    fn hints_say_which_environment_variable_is_ignored() {
        let ignored = |names| {
            let sources = Sources {
                names,
                ignored_environment: true,
                ..sources()
            };
            hints(
                &settings(true, 10_000),
                &JemallocStats::default(),
                &sources,
                &Outside::default(),
            )
        };
        assert_eq!(
            ignored(OptionNames::PREFIXED),
            ["MALLOC_CONF is set, but this build's jemalloc reads _RJEM_MALLOC_CONF (its symbols \
              carry tikv-jemalloc-sys's _rjem_ prefix): MALLOC_CONF is ignored. Move its options \
              to _RJEM_MALLOC_CONF."]
        );
        assert_eq!(
            ignored(OptionNames::UNPREFIXED),
            ["_RJEM_MALLOC_CONF is set, but this build's jemalloc reads MALLOC_CONF (it is built \
              unprefixed, as the C library's malloc): _RJEM_MALLOC_CONF is ignored. Move its \
              options to MALLOC_CONF."]
        );
    }

    #[test]
    fn a_profiler_built_in_but_not_started_gets_a_hint_in_the_builds_form() {
        let with_prof = |started| Settings {
            prof: Some(ProfOptions {
                started,
                active_at_start: false,
                lg_sample: 19,
            }),
            ..settings(true, 10_000)
        };
        let stats = JemallocStats::default();
        let started = hints(&with_prof(true), &stats, &sources(), &Outside::default());
        assert!(started.is_empty(), "{started:?}");
        let not_started = hints(&with_prof(false), &stats, &sources(), &Outside::default());
        assert_eq!(
            not_started,
            [
                "jemalloc's heap profiler is compiled in but was not started (opt.prof is false), \
              so no heap profile can be taken: to have it available, start the process with the \
              environment variable _RJEM_MALLOC_CONF=prof:true,prof_active:false, or build the \
              options into the binary: #[unsafe(export_name = \"_rjem_malloc_conf\")] pub \
              static MALLOC_CONF: &[u8] = b\"prof:true,prof_active:false\\0\";"
            ]
        );
        let unprefixed = Sources {
            names: OptionNames::UNPREFIXED,
            ..sources()
        };
        let not_started = hints(&with_prof(false), &stats, &unprefixed, &Outside::default());
        assert!(
            not_started[0].contains("MALLOC_CONF=prof:true")
                && not_started[0].contains(r#"#[unsafe(export_name = "malloc_conf")]"#)
                && !not_started[0].contains("_rjem_"),
            "{not_started:?}"
        );
    }

    #[test]
    fn the_profilers_options_are_reported_when_built_in() {
        let settings = Settings {
            prof: Some(ProfOptions {
                started: true,
                active_at_start: false,
                lg_sample: 19,
            }),
            ..settings(true, 10_000)
        };
        let summary = StatsSummary::new(
            &settings,
            JemallocStats::default(),
            Sources {
                built_in: Some("prof:true,prof_active:false".into()),
                ..sources()
            },
            &Outside::default(),
        );
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(
            json["profiler"],
            serde_json::json!({"compiled_in":true,"started":true,"active_at_start":false,"lg_sample":19})
        );
        assert_eq!(
            json["malloc_conf"]["built_in"],
            "prof:true,prof_active:false"
        );
    }

    #[test]
    fn governor_hints_say_what_is_over_and_what_to_do() {
        assert!(governor_hints(&GovernorFacts::default()).is_empty());
        let calm = GovernorFacts {
            limit: Some(320 << 20),
            usage: 100 << 20,
            ..GovernorFacts::default()
        };
        assert!(governor_hints(&calm).is_empty());
        let over = GovernorFacts {
            limit: Some(320 << 20),
            usage: 400 << 20,
            unreclaimable: true,
            shedding: true,
        };
        let hints = governor_hints(&over);
        assert_eq!(hints.len(), 2);
        assert!(hints[0].starts_with("Memory use 400 MiB is over the limit 320 MiB"));
        assert!(hints[0].contains("live memory exceeds the limit"));
        assert!(hints[0].contains("memory_limit=SIZE"));
        assert!(hints[1].contains("shedding load"));
    }

    #[test]
    fn ratios_round_to_four_decimals() {
        assert_eq!(ratio(2, 3), Some(0.6667));
        assert_eq!(ratio(1, 0), None);
    }
}
