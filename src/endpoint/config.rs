//! `GET|HEAD|PUT /debug/jemalloc/config`: jemalloc's tuning, read and changed at run time.
//!
//! - `GET` answers the live settings as a JSON [`JemallocConfig`](crate::JemallocConfig):
//!   whether background threads run, how many at most, the decay times for new arenas, and
//!   the arenas whose own decay times differ; beside them, the memory governor's settings:
//!   `"memory_limit"` (bytes, or `null` when none is set), `"memory_limit_source"`
//!   (`"explicit"` for bytes, else where the limit a percentage was taken of came from:
//!   `"cgroup v2 memory.max"`, `"cgroup v1 memory.limit_in_bytes"`, `"physical memory"`;
//!   `null` without a limit) and `"shed_requests"` (this layer's switch). It takes no
//!   parameters.
//! - `PUT` changes any of them through query parameters and answers a JSON
//!   [`ConfigUpdate`](crate::ConfigUpdate) (`{"before": …, "after": …}`, each with the
//!   governor's fields too):
//!   - `background_thread=true|false`: start or stop jemalloc's background threads, which
//!     return freed pages on their own, also while the process is idle;
//!   - `max_background_threads=N`: 1 to `opt.max_background_threads` (4, jemalloc's default,
//!     unless set at start-up);
//!   - `dirty_decay_ms=N`, `muzzy_decay_ms=N`: -1 (never) to
//!     [`MAX_DECAY_MS`](crate::MAX_DECAY_MS) (one hour), applied to every existing arena
//!     (`arena.<i>.…`, including the arena jemalloc keeps for huge allocations) and to arenas
//!     created later (`arenas.…`).
//!
//!   - `memory_limit=SIZE|none`: the memory limit the governor keeps the process under, in
//!     bytes, `KiB`/`MiB`/`GiB`/`TiB` (`320MiB`) or a percentage of the detected limit
//!     (`90%`, of cgroup v2 `memory.max`, cgroup v1 `memory.limit_in_bytes`, then physical
//!     memory); `none` clears it and stops the governor. One limit per process: it applies
//!     whichever layer's endpoint sets it (see
//!     [`memory_limit`](crate::JemallocLayerBuilder::memory_limit));
//!   - `shed_requests=true|false`: whether this layer sheds forwarded requests while the
//!     process is over its limit (see
//!     [`shed_requests`](crate::JemallocLayerBuilder::shed_requests)).
//!
//!   Numbers are digits, with a `-` only where a negative value means something (the decay
//!   times' -1); a `+` is refused. An empty `PUT`, a name given twice, an unknown name or a
//!   bad value is a 400 naming what is allowed, and nothing is written: the whole change is
//!   checked first. A write that
//!   fails undoes the ones before it (500 saying so). One change runs at a time in the process
//!   (409 meanwhile). Each changed setting is logged through `tracing` (info) with its old and
//!   new value, and counted in `jemalloc_config_changes_total{setting}`.
//!
//! Closed by default, like every debug endpoint; it follows the purge endpoint's access rules
//! unless it has its own (changing decay times is as strong a lever as purging).
//!
//! Order of checks after admission: parameters (400), jemalloc availability (501/503), a
//! change already running (409), the values (400); then the change is made, on a thread of its
//! own (starting background threads and walking every arena is blocking work).
//!
//! A request waits for its read or change at most the builder's `job_deadline` (default 30 s):
//! past it, a 503 naming the job and how long it has run. A read that is still running is
//! joined by later reads; a change that is still running makes others 409.

use super::handler::{Context, Handler};
use super::job::{Flight, Job, JobKind, Runner};
use super::query::{self, Query};
use super::response::{self, Answer};
use crate::governor::{Governor, HoldsShedding, LimitSetting, MemoryLimit, Shedding};
use crate::jemalloc::tuning::{
    self, ChangeError, ChangeGuard, ConfigChange, ConfigUpdate, JemallocConfig, Setting,
    MAX_DECAY_MS,
};
use crate::jemalloc::JemallocError;
use http::request::Parts;
use http::{Method, StatusCode};
use opentelemetry::metrics::Counter;
use opentelemetry::KeyValue;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// The config endpoint of one layer.
pub(crate) struct Config {
    /// Reads share one job at a time.
    reads: Arc<Flight<Configured>>,
    /// Where changes run.
    changer: Runner,
    /// `jemalloc.config.changes` (attribute `setting`), exported as
    /// `…_jemalloc_config_changes_total`: the settings written by successful changes.
    changes: Counter<u64>,
    governor: Arc<Governor>,
    /// The layer's shared state, which holds its shedding switch (weak: it holds this).
    shedding: Weak<dyn HoldsShedding>,
}

/// What a config request asks for.
pub(crate) enum Request {
    Read { head: bool },
    Change(ConfigChange, GovernorChange),
}

/// A change of the governor's settings.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct GovernorChange {
    /// `Some(None)`: clear the limit.
    memory_limit: Option<Option<MemoryLimit>>,
    shed_requests: Option<bool>,
}

impl GovernorChange {
    fn is_empty(&self) -> bool {
        self.memory_limit.is_none() && self.shed_requests.is_none()
    }
}

/// The governor's settings as the config endpoint shows them, beside jemalloc's.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct GovernorView {
    memory_limit: Option<u64>,
    memory_limit_source: Option<&'static str>,
    shed_requests: bool,
}

impl GovernorView {
    fn read(governor: &Governor, shedding: &Shedding) -> Self {
        let limit = governor.limit();
        Self {
            memory_limit: limit.as_ref().map(|limit| limit.bytes),
            memory_limit_source: limit.map(|limit| limit.source),
            shed_requests: shedding.enabled(),
        }
    }
}

/// The JSON of a read: jemalloc's settings and the governor's in one object.
#[derive(serde::Serialize)]
struct View<'a> {
    #[serde(flatten)]
    jemalloc: &'a JemallocConfig,
    #[serde(flatten)]
    governor: &'a GovernorView,
}

/// The JSON of a change.
#[derive(serde::Serialize)]
struct Update<'a> {
    before: View<'a>,
    after: View<'a>,
}

/// What a config job produced.
pub(crate) enum Configured {
    Read(Result<JemallocConfig, JemallocError>, GovernorView),
    Changed(Result<(ConfigUpdate, GovernorView, GovernorView), ChangeError>),
}

/// The parameter names: jemalloc's settings, then the governor's.
const NAMES: [&str; 6] = [
    Setting::NAMES[0],
    Setting::NAMES[1],
    Setting::NAMES[2],
    Setting::NAMES[3],
    "memory_limit",
    "shed_requests",
];

/// The values each parameter takes, for the 400s.
const ALLOWED: &str = "background_thread=true|false, max_background_threads=N (1 to \
                       opt.max_background_threads), dirty_decay_ms=N and muzzy_decay_ms=N \
                       (-1 for never, up to 3600000), memory_limit=SIZE (320MiB, 90%) or \
                       none, shed_requests=true|false";

impl Handler for Config {
    const METHODS: &'static [Method] = &[Method::GET, Method::HEAD, Method::PUT];
    const ALLOW: &'static str = "GET, HEAD, PUT";
    const PARAMS: Option<&'static [&'static str]> = Some(&NAMES);
    type Params = Request;
    type Output = Configured;

    fn new(context: &Context<'_>) -> Self {
        let changes = context
            .meter
            .u64_counter("jemalloc.config.changes")
            .with_description(
                "Settings of jemalloc written through the config endpoint, by setting",
            )
            .build();
        for setting in Setting::ALL {
            changes.add(0, &[KeyValue::new("setting", setting.name())]);
        }
        for setting in ["memory_limit", "shed_requests"] {
            changes.add(0, &[KeyValue::new("setting", setting)]);
        }
        Self {
            reads: Arc::new(Flight::new(
                context.runner(JobKind::ConfigRead),
                Duration::ZERO,
            )),
            changer: context.runner(JobKind::ConfigChange),
            changes,
            governor: Arc::clone(context.governor),
            shedding: Weak::clone(context.shedding),
        }
    }

    fn params(&self, parts: &Parts, query: Query<'_>) -> Result<Request, Answer> {
        if parts.method != Method::PUT {
            if !query.is_empty() {
                return Err(bad_request(format_args!(
                    "{} takes no parameters: change settings with PUT and {ALLOWED}",
                    parts.method
                )));
            }
            return Ok(Request::Read {
                head: parts.method == Method::HEAD,
            });
        }
        let change = parse(query)?;
        let governor = parse_governor(query)?;
        if change.is_empty() && governor.is_empty() {
            return Err(bad_request(format_args!(
                "a PUT changes at least one setting: {ALLOWED}"
            )));
        }
        Ok(Request::Change(change, governor))
    }

    fn start(&self, request: &Request) -> Result<Job<Configured>, Answer> {
        let ctl = crate::jemalloc::ctl::ctl().map_err(|e| response::jemalloc_error(&e))?;
        match *request {
            Request::Read { .. } => {
                let (governor, holder) = (Arc::clone(&self.governor), self.holder()?);
                self.reads.join_or_start(move || {
                    let view = GovernorView::read(&governor, holder.shedding());
                    Configured::Read(tuning::read(ctl), view)
                })
            }
            Request::Change(change, governor_change) => {
                let Some(guard) = ChangeGuard::acquire() else {
                    return Err(response::text(
                        StatusCode::CONFLICT,
                        "another change of jemalloc's settings is being made; retry when it \
                         has finished",
                    ));
                };
                let changes = self.changes.clone();
                let (governor, holder) = (Arc::clone(&self.governor), self.holder()?);
                Job::spawn(&self.changer, move || {
                    Configured::Changed(change_all(
                        guard,
                        ctl,
                        &change,
                        governor_change,
                        &governor,
                        holder.shedding(),
                        &changes,
                    ))
                })
            }
        }
    }

    fn answer(output: &Configured, request: &Request) -> Answer {
        match output {
            Configured::Read(Ok(config), governor) => {
                let answer = response::json(&View {
                    jemalloc: config,
                    governor,
                });
                match request {
                    Request::Read { head: true } => response::without_body(answer),
                    _ => answer,
                }
            }
            Configured::Read(Err(e), _) => response::jemalloc_error(e),
            Configured::Changed(Ok((update, before, after))) => response::json(&Update {
                before: View {
                    jemalloc: &update.before,
                    governor: before,
                },
                after: View {
                    jemalloc: &update.after,
                    governor: after,
                },
            }),
            Configured::Changed(Err(ChangeError::Invalid(reason))) => bad_request(reason),
            Configured::Changed(Err(e @ ChangeError::Failed { .. })) => {
                response::text(StatusCode::INTERNAL_SERVER_ERROR, e)
            }
        }
    }
}

impl Config {
    /// The layer's shared state: alive while a request is routed through it.
    fn holder(&self) -> Result<Arc<dyn HoldsShedding>, Answer> {
        self.shedding.upgrade().ok_or_else(|| {
            response::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the layer is being dropped",
            )
        })
    }
}

fn bad_request(reason: impl std::fmt::Display) -> Answer {
    response::text(StatusCode::BAD_REQUEST, reason)
}

/// Makes a `PUT`'s change: the governor's limit is resolved first (a percentage with nothing
/// detected to take it of is a 400 before anything is written), then jemalloc's settings are
/// changed, then the governor's. Each changed setting is logged and counted.
fn change_all(
    guard: ChangeGuard,
    ctl: &'static crate::jemalloc::ctl::Ctl,
    change: &ConfigChange,
    governor_change: GovernorChange,
    governor: &Governor,
    shedding: &Shedding,
    changes: &Counter<u64>,
) -> Result<(ConfigUpdate, GovernorView, GovernorView), ChangeError> {
    let limit: Option<Option<LimitSetting>> = match governor_change.memory_limit {
        None => None,
        Some(None) => Some(None),
        Some(Some(asked)) => Some(Some(
            Governor::resolve(asked).map_err(ChangeError::Invalid)?,
        )),
    };
    let before = GovernorView::read(governor, shedding);
    let update = guard.apply(ctl, change)?;
    for setting in change.settings() {
        changes.add(1, &[KeyValue::new("setting", setting.name())]);
    }
    if let Some(limit) = limit {
        let text = limit
            .as_ref()
            .map_or_else(|| "none".to_owned(), |limit| limit.bytes.to_string());
        governor.apply_limit(limit).map_err(ChangeError::Invalid)?;
        tracing::info!(setting = "memory_limit", old = ?before.memory_limit, new = %text, "memory governor setting changed");
        changes.add(1, &[KeyValue::new("setting", "memory_limit")]);
    }
    if let Some(enabled) = governor_change.shed_requests {
        governor.set_shedding(shedding, enabled);
        tracing::info!(
            setting = "shed_requests",
            old = before.shed_requests,
            new = enabled,
            "memory governor setting changed"
        );
        changes.add(1, &[KeyValue::new("setting", "shed_requests")]);
    }
    let after = GovernorView::read(governor, shedding);
    Ok((update, before, after))
}

/// The governor's part of a `PUT`'s query, or a 400 naming the first bad value.
fn parse_governor(query: Query<'_>) -> Result<GovernorChange, Answer> {
    let mut change = GovernorChange::default();
    if let Some(value) = query.get("memory_limit") {
        change.memory_limit =
            Some(match value {
                "none" => None,
                _ => Some(value.parse::<MemoryLimit>().map_err(|e| {
                    bad_request(format_args!("{e}; or memory_limit=none to clear it"))
                })?),
            });
    }
    if let Some(value) = query.get("shed_requests") {
        change.shed_requests = Some(match value {
            "true" => true,
            "false" => false,
            _ => {
                return Err(bad_request(format_args!(
                    "shed_requests={value:?} is not valid: use shed_requests=true|false"
                )))
            }
        });
    }
    Ok(change)
}

/// The change a `PUT`'s query asks for (names were checked by the pipeline: known, each at
/// most once), or a 400 naming the first bad value.
fn parse(query: Query<'_>) -> Result<ConfigChange, Answer> {
    let mut change = ConfigChange::default();
    for setting in Setting::ALL {
        let name = setting.name();
        let Some(value) = query.get(name) else {
            continue;
        };
        let invalid = |allowed: &str| {
            bad_request(format_args!(
                "{name}={value:?} is not valid: use {name}={allowed}"
            ))
        };
        match setting {
            Setting::BackgroundThread => {
                change.background_thread = Some(match value {
                    "true" => true,
                    "false" => false,
                    _ => return Err(invalid("true|false")),
                });
            }
            Setting::MaxBackgroundThreads => {
                change.max_background_threads = Some(
                    query::whole_number(value)
                        .ok_or_else(|| invalid("N, a whole number from 1, without a sign"))?,
                );
            }
            Setting::DirtyDecayMs | Setting::MuzzyDecayMs => {
                let ms = query::signed_number(value).ok_or_else(|| {
                    invalid(&format!(
                        "N, milliseconds from -1 (never) to {MAX_DECAY_MS}, with no + sign"
                    ))
                })?;
                if setting == Setting::DirtyDecayMs {
                    change.dirty_decay_ms = Some(ms);
                } else {
                    change.muzzy_decay_ms = Some(ms);
                }
            }
        }
    }
    Ok(change)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(query: &str) -> Result<ConfigChange, String> {
        let checked = Query::check(Some(query), Config::PARAMS, "/debug/jemalloc/config");
        checked.and_then(parse).map_err(|answer| {
            assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
            format!("{:?}", answer.into_body())
        })
    }

    #[test]
    fn a_put_query_becomes_a_change() {
        assert_eq!(
            parsed("background_thread=true&dirty_decay_ms=200"),
            Ok(ConfigChange {
                background_thread: Some(true),
                dirty_decay_ms: Some(200),
                ..ConfigChange::default()
            })
        );
        assert_eq!(
            parsed("muzzy_decay_ms=-1&max_background_threads=2&background_thread=false"),
            Ok(ConfigChange {
                background_thread: Some(false),
                max_background_threads: Some(2),
                muzzy_decay_ms: Some(-1),
                ..ConfigChange::default()
            })
        );
    }

    fn governor(query: &str) -> Result<GovernorChange, String> {
        let checked = Query::check(Some(query), Config::PARAMS, "/debug/jemalloc/config");
        checked.and_then(parse_governor).map_err(|answer| {
            assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
            format!("{:?}", answer.into_body())
        })
    }

    #[test]
    fn the_governors_settings_parse_with_jemallocs() {
        assert_eq!(
            governor("memory_limit=320MiB&shed_requests=true&dirty_decay_ms=5"),
            Ok(GovernorChange {
                memory_limit: Some(Some(MemoryLimit::Bytes(320 << 20))),
                shed_requests: Some(true),
            })
        );
        assert_eq!(
            governor("memory_limit=none"),
            Ok(GovernorChange {
                memory_limit: Some(None),
                shed_requests: None,
            })
        );
        assert_eq!(
            governor("memory_limit=90%&shed_requests=false"),
            Ok(GovernorChange {
                memory_limit: Some(Some(MemoryLimit::PercentOfAvailable(90.0))),
                shed_requests: Some(false),
            })
        );
        assert!(governor("dirty_decay_ms=5").unwrap().is_empty());
        for (query, expected) in [
            (
                "memory_limit=320MB",
                "use bytes (1048576), KiB, MiB, GiB or TiB",
            ),
            ("memory_limit=None", "or memory_limit=none to clear it"),
            ("memory_limit=0%", "from 1% to 100%"),
            ("shed_requests=1", "use shed_requests=true|false"),
            ("shed_requests=true&shed_requests=false", "given twice"),
        ] {
            let reason = governor(query).unwrap_err();
            assert!(reason.contains(expected), "{query}: {reason}");
        }
    }

    #[test]
    fn bad_values_signs_and_repeated_names_are_refused() {
        for (query, expected) in [
            ("background_thread=yes", "use background_thread=true|false"),
            ("background_thread=", "use background_thread=true|false"),
            (
                "dirty_decay_ms=fast",
                "milliseconds from -1 (never) to 3600000",
            ),
            ("dirty_decay_ms=1.5", "milliseconds"),
            ("max_background_threads=-1", "a whole number from 1"),
            ("max_background_threads=+2", "from 1, without a sign"),
            ("dirty_decay_ms=+5000", "with no + sign"),
            ("muzzy_decay_ms=+0", "with no + sign"),
            ("dirty_decay_ms=--1", "milliseconds"),
            ("dirty_decay_ms=%2D1", "milliseconds"),
            (
                "dirty_decay_ms=1&dirty_decay_ms=2",
                "parameter \\\"dirty_decay_ms\\\" is given twice",
            ),
        ] {
            let reason = parsed(query).unwrap_err();
            assert!(reason.contains(expected), "{query}: {reason}");
        }
    }
}
