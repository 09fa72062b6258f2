//! `GET|PUT /debug/jemalloc/profiling`: the heap profiler's state, and switching it.
//!
//! - `GET`: a JSON [`ProfilingStatus`](crate::ProfilingStatus): whether profiling is available
//!   (jemalloc started with `prof:true`), active, and the sample interval.
//! - `PUT ?active=true|false`: switches sampling (`prof.active`) on or off. With `active=true`,
//!   `for=<duration>` (`90s`, `15m`, `2h`; at most 24 h) switches it off again by itself
//!   after that long, so that nobody leaves it on by accident. That deadline is replaced by a
//!   later `active=true&for=…`, cleared by `active=false`, and kept by an `active=true`
//!   without `for=` while profiling is still on (a second operator's switch-on must not
//!   quietly undo the first one's switch-off): the answer's `after.switches_off_in_seconds`
//!   says when it comes. To keep profiling on longer, give a new `for=`; to keep it on with
//!   no deadline, switch it off and on again.
//! - `PUT ?lg_sample=N` (12 to 30): samples every 2^N bytes on average from now on
//!   (`prof.reset`, which also forgets every sample taken so far). jemalloc's default is 19,
//!   512 KiB.
//! - A `PUT` answers a JSON [`ProfilingChange`](crate::ProfilingChange): the state before
//!   and after, each with `switches_off_in_seconds` while a deadline is set.
//!
//! Each parameter at most once; numbers (`lg_sample`, the number in `for`) are digits without
//! a sign: `for=+2s` and `lg_sample=+19` are 400s.
//!
//! The calls are a few mallctl reads and writes, made on the request's task (no thread).
//! Without the `profiling` feature: 501 saying to build with it; jemalloc started without its
//! profiler: `GET` says so (`available: false`, with how to start it), `PUT` is a 503 saying
//! how.
//!
//! Order of checks after admission: parameters (400), then jemalloc and its profiler, so a bad
//! request gets its 400 whether or not the profiler is there (or compiled in).

use super::handler::{Context, Handler};
use super::job::Job;
use super::query::{self, Query};
use super::response::{self, Answer};
use crate::jemalloc::profiling::{self, ProfilingError, LG_SAMPLE_RANGE, MAX_ACTIVE_FOR};
use crate::jemalloc::ProfilingChange;
use http::request::Parts;
use http::{Method, StatusCode};
use std::convert::Infallible;
use std::time::Duration;

/// The profiling control endpoint of one layer.
pub(crate) struct Profiling;

/// What a request asks for.
pub(crate) enum Request {
    /// The state.
    Status,
    /// A change: any of the three.
    Change {
        active: Option<bool>,
        for_: Option<Duration>,
        lg_sample: Option<u32>,
    },
}

impl Handler for Profiling {
    const METHODS: &'static [Method] = &[Method::GET, Method::PUT];
    const ALLOW: &'static str = "GET, PUT";
    const PARAMS: Option<&'static [&'static str]> = Some(&["active", "for", "lg_sample"]);
    type Params = Request;
    type Output = Infallible;

    fn new(_: &Context<'_>) -> Self {
        Self
    }

    fn params(&self, parts: &Parts, query: Query<'_>) -> Result<Request, Answer> {
        if parts.method == Method::GET {
            if !query.is_empty() {
                return Err(bad_request(
                    "GET only reads the state: change it with PUT ?active=true|false or \
                     ?lg_sample=N",
                ));
            }
            return Ok(Request::Status);
        }
        let active = query
            .get("active")
            .map(|value| match value {
                "true" => Ok(true),
                "false" => Ok(false),
                other => Err(bad_request(format_args!(
                    "active must be true or false, got {other:?}"
                ))),
            })
            .transpose()?;
        let for_ = query.get("for").map(parse_for).transpose()?;
        let lg_sample = query
            .get("lg_sample")
            .map(|value| match query::whole_number::<u32>(value) {
                Some(lg) if LG_SAMPLE_RANGE.contains(&lg) => Ok(lg),
                _ => Err(bad_request(format_args!(
                    "lg_sample must be a whole number from {} to {}, without a sign (samples \
                     every 2^N bytes; 19 is 512 KiB), got {value:?}",
                    LG_SAMPLE_RANGE.start(),
                    LG_SAMPLE_RANGE.end()
                ))),
            })
            .transpose()?;
        if for_.is_some() && active != Some(true) {
            return Err(bad_request(
                "for= only goes with active=true: it says how long profiling stays on",
            ));
        }
        if active.is_none() && lg_sample.is_none() {
            return Err(bad_request(
                "PUT needs active=true|false (optionally for=<duration>) or lg_sample=N",
            ));
        }
        Ok(Request::Change {
            active,
            for_,
            lg_sample,
        })
    }

    /// Answers at once: the mallctl calls take microseconds, no job is needed.
    fn start(&self, request: &Request) -> Result<Job<Infallible>, Answer> {
        let answer = match *request {
            Request::Status => profiling::status().map(|status| response::json(&status)),
            Request::Change {
                active,
                for_,
                lg_sample,
            } => change(active, for_, lg_sample).map(|change| response::json(&change)),
        };
        Err(answer.unwrap_or_else(|e| response::profiling_error(&e)))
    }

    fn answer(output: &Infallible, _: &Request) -> Answer {
        match *output {}
    }
}

/// Resets sampling, then switches it, as asked; the state before the first and after the last.
fn change(
    active: Option<bool>,
    for_: Option<Duration>,
    lg_sample: Option<u32>,
) -> Result<ProfilingChange, ProfilingError> {
    let mut before = None;
    let mut after = None;
    if let Some(lg_sample) = lg_sample {
        let (b, a) = profiling::set_sampling(lg_sample)?;
        before.get_or_insert(b);
        after = Some(a);
    }
    if let Some(active) = active {
        let (b, a) = profiling::set_active(active, for_)?;
        before.get_or_insert(b);
        after = Some(a);
    }
    match (before, after) {
        (Some(before), Some(after)) => Ok(ProfilingChange { before, after }),
        // `params` refuses a PUT that asks for nothing.
        _ => Err(ProfilingError::Failed("nothing to change".to_owned())),
    }
}

fn bad_request(reason: impl std::fmt::Display) -> Answer {
    response::text(StatusCode::BAD_REQUEST, reason)
}

/// `90s`, `15m`, `2h`: a whole number (digits, no sign) and a unit, from 1 s to
/// [`MAX_ACTIVE_FOR`].
fn parse_for(value: &str) -> Result<Duration, Answer> {
    let refuse = || {
        bad_request(format_args!(
            "for must be a whole number of seconds, minutes or hours from 1s to 24h, without \
             a sign (90s, 15m, 2h), got {value:?}"
        ))
    };
    let split = value.len().saturating_sub(1);
    let (number, unit) = value.split_at_checked(split).ok_or_else(refuse)?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(refuse()),
    };
    let seconds = query::whole_number::<u64>(number)
        .and_then(|n| n.checked_mul(scale))
        .filter(|&s| s >= 1)
        .ok_or_else(refuse)?;
    let duration = Duration::from_secs(seconds);
    if duration > MAX_ACTIVE_FOR {
        return Err(refuse());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn for_takes_seconds_minutes_or_hours_up_to_a_day() {
        assert_eq!(parse_for("90s").ok(), Some(Duration::from_secs(90)));
        assert_eq!(parse_for("15m").ok(), Some(Duration::from_secs(900)));
        assert_eq!(parse_for("24h").ok(), Some(MAX_ACTIVE_FOR));
        for bad in [
            "", "s", "0s", "25h", "1d", "-1s", "+2s", "+1h", "1.5m", "10", "1 s", "é", "%32s",
        ] {
            let answer = parse_for(bad).unwrap_err();
            assert_eq!(answer.status(), StatusCode::BAD_REQUEST, "{bad:?}");
        }
    }
}
