//! `GET|HEAD|PUT /debug/jemalloc/config`: jemalloc's tuning, read and changed at run time.
//!
//! - `GET` answers the live settings as a JSON [`JemallocConfig`](crate::JemallocConfig):
//!   whether background threads run, how many at most, the decay times for new arenas, and
//!   the arenas whose own decay times differ. It takes no parameters.
//! - `PUT` changes any of them through query parameters and answers a JSON
//!   [`ConfigUpdate`](crate::ConfigUpdate) (`{"before": …, "after": …}`):
//!   - `background_thread=true|false`: start or stop jemalloc's background threads, which
//!     return freed pages on their own, also while the process is idle;
//!   - `max_background_threads=N`: 1 to `opt.max_background_threads` (4, jemalloc's default,
//!     unless set at start-up);
//!   - `dirty_decay_ms=N`, `muzzy_decay_ms=N`: -1 (never) to
//!     [`MAX_DECAY_MS`](crate::MAX_DECAY_MS) (one hour), applied to every existing arena
//!     (`arena.<i>.…`, including the arena jemalloc keeps for huge allocations) and to arenas
//!     created later (`arenas.…`).
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
use crate::jemalloc::tuning::{
    self, ChangeError, ChangeGuard, ConfigChange, ConfigUpdate, JemallocConfig, Setting,
    MAX_DECAY_MS,
};
use crate::jemalloc::JemallocError;
use http::request::Parts;
use http::{Method, StatusCode};
use opentelemetry::metrics::Counter;
use opentelemetry::KeyValue;
use std::sync::Arc;
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
}

/// What a config request asks for.
pub(crate) enum Request {
    Read { head: bool },
    Change(ConfigChange),
}

/// What a config job produced.
pub(crate) enum Configured {
    Read(Result<JemallocConfig, JemallocError>),
    Changed(Result<ConfigUpdate, ChangeError>),
}

/// The values each parameter takes, for the 400s.
const ALLOWED: &str = "background_thread=true|false, max_background_threads=N (1 to \
                       opt.max_background_threads), dirty_decay_ms=N and muzzy_decay_ms=N \
                       (-1 for never, up to 3600000)";

impl Handler for Config {
    const METHODS: &'static [Method] = &[Method::GET, Method::HEAD, Method::PUT];
    const ALLOW: &'static str = "GET, HEAD, PUT";
    const PARAMS: Option<&'static [&'static str]> = Some(&Setting::NAMES);
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
        Self {
            reads: Arc::new(Flight::new(
                context.runner(JobKind::ConfigRead),
                Duration::ZERO,
            )),
            changer: context.runner(JobKind::ConfigChange),
            changes,
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
        if change.is_empty() {
            return Err(bad_request(format_args!(
                "a PUT changes at least one setting: {ALLOWED}"
            )));
        }
        Ok(Request::Change(change))
    }

    fn start(&self, request: &Request) -> Result<Job<Configured>, Answer> {
        let ctl = crate::jemalloc::ctl::ctl().map_err(|e| response::jemalloc_error(&e))?;
        match *request {
            Request::Read { .. } => self
                .reads
                .join_or_start(move || Configured::Read(tuning::read(ctl))),
            Request::Change(change) => {
                let Some(guard) = ChangeGuard::acquire() else {
                    return Err(response::text(
                        StatusCode::CONFLICT,
                        "another change of jemalloc's settings is being made; retry when it \
                         has finished",
                    ));
                };
                let changes = self.changes.clone();
                Job::spawn(&self.changer, move || {
                    let result = guard.apply(ctl, &change);
                    if result.is_ok() {
                        for setting in change.settings() {
                            changes.add(1, &[KeyValue::new("setting", setting.name())]);
                        }
                    }
                    Configured::Changed(result)
                })
            }
        }
    }

    fn answer(output: &Configured, request: &Request) -> Answer {
        match output {
            Configured::Read(Ok(config)) => {
                let answer = response::json(config);
                match request {
                    Request::Read { head: true } => response::without_body(answer),
                    _ => answer,
                }
            }
            Configured::Read(Err(e)) => response::jemalloc_error(e),
            Configured::Changed(Ok(update)) => response::json(update),
            Configured::Changed(Err(ChangeError::Invalid(reason))) => bad_request(reason),
            Configured::Changed(Err(e @ ChangeError::Failed { .. })) => {
                response::text(StatusCode::INTERNAL_SERVER_ERROR, e)
            }
        }
    }
}

fn bad_request(reason: impl std::fmt::Display) -> Answer {
    response::text(StatusCode::BAD_REQUEST, reason)
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
