//! `POST|PUT /debug/jemalloc/purge`: returns jemalloc's unused pages to the OS and answers a
//! JSON [`PurgeReport`](crate::PurgeReport).
//!
//! The purge runs on a thread of its own (never an async worker, whatever the runtime), only
//! one purge runs in the process at a time (one asked for meanwhile gets a 409, not a place in
//! a queue), and after a purge the endpoint refuses others for a cooldown (429 with
//! `Retry-After`). `?mode=decay` asks for the gentler `arena.<all>.decay`.
//!
//! A request waits for its purge at least 5 minutes (the builder's `job_deadline` if longer):
//! past it, a 503 naming how long the purge has run. The purge itself cannot be stopped: it
//! runs on, and other purges get 409 until it ends.
//!
//! Order of checks after admission: parameters (an unknown or repeated name, a bad mode: 400),
//! jemalloc availability (501/503), a purge already running (409), the cooldown (429); then
//! the purge runs.

use super::handler::{Context, Handler};
use super::job::{Job, JobKind, Runner};
use super::query::Query;
use super::response::{self, Answer};
use crate::jemalloc::purge::PurgeGuard;
use crate::jemalloc::{JemallocError, PurgeMode, PurgeReport};
use crate::telemetry::exposition::ZeroHistogram;
use http::request::Parts;
use http::{Method, StatusCode};
use opentelemetry::metrics::{Counter, Histogram, Meter};
use opentelemetry::KeyValue;
use std::time::Duration;

/// The purge endpoint of one layer.
pub(crate) struct Purge {
    /// Minimum time from the end of one purge to the start of the next; zero disables.
    cooldown: Duration,
    telemetry: PurgeTelemetry,
    /// Where purges run; a request waits at least 5 minutes for one.
    runner: Runner,
}

type Purged = Result<PurgeReport, JemallocError>;

impl Handler for Purge {
    const METHODS: &'static [Method] = &[Method::POST, Method::PUT];
    const ALLOW: &'static str = "POST, PUT";
    const PARAMS: Option<&'static [&'static str]> = Some(&["mode"]);
    const ZERO_HISTOGRAMS: &'static [ZeroHistogram] = &[DURATION_AT_ZERO];
    type Params = PurgeMode;
    type Output = Purged;

    fn new(context: &Context<'_>) -> Self {
        Self {
            cooldown: context.settings.purge_cooldown,
            telemetry: PurgeTelemetry::new(context.meter),
            runner: context.runner(JobKind::Purge),
        }
    }

    /// The `mode=` parameter, matched exactly (given twice, the pipeline refused it); `purge`
    /// without one.
    fn params(&self, _: &Parts, query: Query<'_>) -> Result<PurgeMode, Answer> {
        let Some(value) = query.get("mode") else {
            return Ok(PurgeMode::Purge);
        };
        value.parse().map_err(|_| {
            response::text(
                StatusCode::BAD_REQUEST,
                format_args!(
                    "unknown purge mode {value:?}: use mode=purge (the default) or mode=decay"
                ),
            )
        })
    }

    fn start(&self, &mode: &PurgeMode) -> Result<Job<Purged>, Answer> {
        let ctl = crate::jemalloc::ctl::ctl().map_err(|e| response::jemalloc_error(&e))?;
        let Some(guard) = PurgeGuard::acquire() else {
            return Err(response::text(
                StatusCode::CONFLICT,
                "a jemalloc purge is already running; retry when it has finished",
            ));
        };
        if let Some(wait) = self.cooldown_left(&guard) {
            return Err(response::retry_after(
                StatusCode::TOO_MANY_REQUESTS,
                wait,
                format_args!(
                    "purges are limited to one per {:?}; retry in {} s",
                    self.cooldown,
                    response::whole_seconds(wait)
                ),
            ));
        }
        let telemetry = self.telemetry.clone();
        // If the thread cannot start, the closure and the guard with it are dropped: the slot
        // is free again.
        Job::spawn(&self.runner, move || {
            let result = guard.run(ctl, mode);
            telemetry.record(mode, &result);
            result
        })
    }

    fn answer(purged: &Purged, _: &PurgeMode) -> Answer {
        match purged {
            Ok(report) => response::json(report),
            Err(e) => response::jemalloc_error(e),
        }
    }
}

impl Purge {
    /// How long until the cooldown after the last purge is over, if it is not yet. Asked while
    /// holding the slot, so the last purge's end cannot move meanwhile.
    fn cooldown_left(&self, guard: &PurgeGuard) -> Option<Duration> {
        if self.cooldown.is_zero() {
            return None;
        }
        self.cooldown
            .checked_sub(guard.last_purge_end()?.elapsed())
            .filter(|left| !left.is_zero())
    }
}

/// The bucket bounds of the purge duration histogram, in seconds.
const DURATION_BOUNDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The help text of the purge duration histogram.
const DURATION_HELP: &str = "Time the purge call took";

/// The purge duration histogram at zero for every mode until that mode's first purge, beside
/// `…_jemalloc_purges_total` (which has every series from the start).
const DURATION_AT_ZERO: ZeroHistogram = ZeroHistogram {
    beside: "jemalloc_purges_total",
    beside_attributes: &["mode", "result"],
    name: "jemalloc_purge_duration_seconds",
    help: DURATION_HELP,
    attribute: "mode",
    values: &PurgeMode::NAMES,
    bounds: DURATION_BOUNDS,
};

/// Purge metrics, recorded through the layer's meter: `jemalloc.purges` (attributes `result`
/// = `ok`|`error` and `mode`), `jemalloc.purge.duration` (seconds, `mode`) and
/// `jemalloc.purge.released` (bytes, `mode`), exported as `…_jemalloc_purges_total`,
/// `…_jemalloc_purge_duration_seconds` and `…_jemalloc_purge_released_bytes_total`.
#[derive(Debug, Clone)]
struct PurgeTelemetry {
    purges: Counter<u64>,
    duration: Histogram<f64>,
    released: Counter<u64>,
}

impl PurgeTelemetry {
    /// The instruments, with every counter series present at 0 from the start, so that an
    /// alert on `jemalloc_purges_total{result="error"}` has a series to watch before the first
    /// purge. OpenTelemetry exports no histogram series without a measurement, so the
    /// duration histogram's are written at zero by `/metrics` ([`DURATION_AT_ZERO`]).
    fn new(meter: &Meter) -> Self {
        let telemetry = Self::instruments(meter);
        for mode in PurgeMode::ALL {
            let mode = KeyValue::new("mode", mode.as_str());
            for result in ["ok", "error"] {
                let attributes = [KeyValue::new("result", result), mode.clone()];
                telemetry.purges.add(0, &attributes);
            }
            telemetry.released.add(0, &[mode]);
        }
        telemetry
    }

    fn instruments(meter: &Meter) -> Self {
        Self {
            purges: meter
                .u64_counter("jemalloc.purges")
                .with_description("Purges run through the purge endpoint, by result and mode")
                .build(),
            duration: meter
                .f64_histogram("jemalloc.purge.duration")
                .with_unit("s")
                .with_description(DURATION_HELP)
                .with_boundaries(DURATION_BOUNDS.to_vec())
                .build(),
            released: meter
                .u64_counter("jemalloc.purge.released")
                .with_unit("By")
                .with_description("Resident bytes released by purges")
                .build(),
        }
    }

    fn record(&self, mode: PurgeMode, result: &Purged) {
        let mode = KeyValue::new("mode", mode.as_str());
        match result {
            Ok(report) => {
                self.purges
                    .add(1, &[KeyValue::new("result", "ok"), mode.clone()]);
                self.duration
                    .record(report.duration.as_secs_f64(), std::slice::from_ref(&mode));
                self.released.add(report.released_bytes(), &[mode]);
            }
            Err(_) => self
                .purges
                .add(1, &[KeyValue::new("result", "error"), mode]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::JobTelemetry;

    fn mode(query: &str) -> Result<PurgeMode, String> {
        let meter = opentelemetry::global::meter("test");
        let purge = Purge {
            cooldown: Duration::ZERO,
            telemetry: PurgeTelemetry::new(&meter),
            runner: Runner::new(JobKind::Purge, Duration::ZERO, &JobTelemetry::new(&meter)),
        };
        let parts = http::Request::post(format!("/debug/jemalloc/purge?{query}"))
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let checked = Query::check(parts.uri.query(), Purge::PARAMS, "/debug/jemalloc/purge");
        checked
            .and_then(|q| purge.params(&parts, q))
            .map_err(|answer| {
                assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
                format!("{:?}", answer.into_body())
            })
    }

    #[test]
    fn mode_comes_from_the_query() {
        assert_eq!(mode(""), Ok(PurgeMode::Purge));
        assert_eq!(mode("&"), Ok(PurgeMode::Purge));
        assert_eq!(mode("mode=purge"), Ok(PurgeMode::Purge));
        assert_eq!(mode("mode=decay"), Ok(PurgeMode::Decay));
        for bad in ["mode=decay&mode=purge", "mode=decay&mode=decay"] {
            assert!(mode(bad).unwrap_err().contains("is given twice"), "{bad}");
        }
        for bad in ["x=1", "mode=decay&y"] {
            assert!(
                mode(bad).unwrap_err().contains("unknown parameter"),
                "{bad}"
            );
        }
        for bad in [
            "mode=",
            "mode",
            "mode=Purge",
            "mode=purge%20",
            "mode=all",
            "mode=%64ecay",
        ] {
            let reason = mode(bad).unwrap_err();
            assert!(
                reason.contains("mode=purge") && reason.contains("mode=decay"),
                "{reason}"
            );
        }
    }
}
