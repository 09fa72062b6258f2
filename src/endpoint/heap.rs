//! `GET /debug/pprof/heap`: jemalloc's heap profile, where Go's `net/http/pprof` serves it,
//! so that `go tool pprof http://HOST:PORT/debug/pprof/heap` works as against a Go service.
//!
//! - By default the live heap as gzipped pprof protobuf (`application/octet-stream`),
//!   symbolized: function names are inside, so `go tool pprof`, Pyroscope, Polar Signals or
//!   speedscope read it without the binary. One sample type, `inuse_space` in bytes. The
//!   allocator's own frames (jemalloc's, Rust's allocation shims) are named in `drop_frames`,
//!   so that `go tool pprof` attributes bytes to the code that allocated.
//! - `?format=flamegraph`: an SVG flame graph of the same (`image/svg+xml`), for a browser.
//! - `?seconds=N` (1 to 300, digits without a sign), as Go's handler: the growth over the
//!   next N seconds, the profile at the end minus the profile at the start, per stack. In
//!   pprof, a stack whose memory was freed meanwhile has a negative value; the flame graph
//!   shows only what grew.
//!
//! Needs the `profiling` feature (otherwise 501 saying so), jemalloc started with its profiler
//! (otherwise 503 saying how) and profiling active: while it is inactive the answer is a 409
//! saying how to activate it, rather than a profile of samples that are no longer being
//! taken. jemalloc not the global allocator: 503, as for the other endpoints.
//!
//! Its metrics (`…_jemalloc_heap_profiles_total`, `…_jemalloc_heap_profile_duration_seconds`)
//! are registered only in builds with the profiler: a build that answers 501 has nothing to
//! count, and a family that can only read zero would suggest a feature it does not have.
//!
//! Bounded like the stats dump: a dump runs on a thread of its own, off the async workers; at
//! most one live dump per format runs at a time, requests that arrive meanwhile share it, and
//! a finished one answers new requests for one second, so a flood costs at most one dump per
//! format per second. At most one growth window runs at a time (another gets a 409 with
//! `Retry-After`). jemalloc writes each dump to a private temporary file (mode 0600) whose name
//! is removed before it is read; a dump over the cap (default 64 MiB,
//! `heap_profile_max_bytes`) is not read (500 naming the cap).
//!
//! Deadlines and abandoned windows: a request waits for a live profile at most the builder's
//! `job_deadline` (default 30 s), for a growth window N seconds more; past it, a 503 naming
//! the job and how long it has run. A growth window belongs to the request that asked for it:
//! when that request goes away (the client hung up, its response future was dropped), the
//! window is abandoned and its slot freed at once, so the next `?seconds=N` is accepted. The
//! abandoned window's thread stops at once when it is waiting; taking its first dump, it
//! finishes that dump and stops without the second (the next window may overlap it for that
//! one dump); past its wait, it finishes its profile for nobody. A window whose request timed
//! out keeps the slot until its thread ends: it may be stuck, and a second must not start
//! beside it.
//!
//! Order of checks after admission: parameters (an unknown or repeated name, a bad format or
//! seconds: 400), jemalloc and its profiler (501/503/409), a growth window already running
//! (409). The parameters are checked first, so a bad request gets its 400 whether or not the
//! profiler is there.

use super::handler::{Context, Handler};
use super::job::{Flight, Job, JobKind, Runner};
use super::query::{self, Query};
use super::response::{self, Answer};
use crate::jemalloc::profiling::{self, ProfileFormat, ProfilingError};
use crate::telemetry::exposition::ZeroHistogram;
use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_DISPOSITION};
use http::request::Parts;
use http::{Method, StatusCode};
use opentelemetry::metrics::{Counter, Histogram, Meter};
use opentelemetry::KeyValue;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The growth windows `?seconds=` accepts.
const SECONDS: std::ops::RangeInclusive<u64> = 1..=300;

/// How to activate profiling, in the 409 while it is inactive.
const ACTIVATE: &str =
    "PUT ?active=true on the profiling endpoint (/debug/jemalloc/profiling by default)";

/// How long a finished live dump answers new requests.
const REUSE_WINDOW: Duration = Duration::from_secs(1);

/// The heap profile endpoint of one layer.
pub(crate) struct Heap {
    max_bytes: u64,
    /// One per format, in the order of [`ProfileFormat::ALL`].
    live: [Arc<Flight<Profiled>>; 2],
    /// When the growth window in progress ends, if one runs.
    growth: Arc<Mutex<Option<Instant>>>,
    /// Where growth windows run.
    growth_runner: Runner,
    /// `None` in builds without the profiler: they answer 501 and export no heap profile
    /// metrics, which would only ever read zero.
    telemetry: Option<ProfileTelemetry>,
}

/// A finished profile, or why there is none.
pub(crate) type Profiled = Result<Bytes, ProfilingError>;

/// What a heap profile request asks for.
pub(crate) struct Request {
    format: ProfileFormat,
    window: Option<Duration>,
}

impl Handler for Heap {
    const METHODS: &'static [Method] = &[Method::GET];
    const ALLOW: &'static str = "GET";
    const PARAMS: Option<&'static [&'static str]> = Some(&["format", "seconds"]);
    const ZERO_HISTOGRAMS: &'static [ZeroHistogram] = if cfg!(profiling) {
        &[DURATION_AT_ZERO]
    } else {
        &[]
    };
    type Params = Request;
    type Output = Profiled;

    fn new(context: &Context<'_>) -> Self {
        Self {
            max_bytes: context.settings.heap_profile_max_bytes,
            live: [(); 2].map(|()| {
                Arc::new(Flight::new(
                    context.runner(JobKind::HeapProfile),
                    REUSE_WINDOW,
                ))
            }),
            growth: Arc::default(),
            growth_runner: context.runner(JobKind::HeapGrowth),
            telemetry: cfg!(profiling).then(|| ProfileTelemetry::new(context.meter)),
        }
    }

    fn params(&self, _: &Parts, query: Query<'_>) -> Result<Request, Answer> {
        let format = match query.get("format") {
            None => ProfileFormat::Pprof,
            Some(value) => ProfileFormat::ALL
                .into_iter()
                .find(|format| format.as_str() == value)
                .ok_or_else(|| {
                    response::text(
                        StatusCode::BAD_REQUEST,
                        format_args!(
                            "unknown format {value:?}: use format=pprof (the default) or \
                             format=flamegraph"
                        ),
                    )
                })?,
        };
        let window = match query.get("seconds") {
            None => None,
            Some(value) => match query::whole_number::<u64>(value) {
                Some(seconds) if SECONDS.contains(&seconds) => Some(Duration::from_secs(seconds)),
                _ => {
                    return Err(response::text(
                        StatusCode::BAD_REQUEST,
                        format_args!(
                            "seconds must be a whole number from {} to {}, without a sign, \
                             got {value:?}",
                            SECONDS.start(),
                            SECONDS.end()
                        ),
                    ))
                }
            },
        };
        Ok(Request { format, window })
    }

    fn start(&self, request: &Request) -> Result<Job<Profiled>, Answer> {
        profiling::ready(ACTIVATE).map_err(|e| response::profiling_error(&e))?;
        let (format, window, max_bytes) = (request.format, request.window, self.max_bytes);
        let telemetry = self.telemetry.clone();
        let work = move |wait: &dyn Fn(Duration) -> bool| {
            let started = Instant::now();
            let profiled =
                profiling::heap_profile(format, window, max_bytes, wait).map(Bytes::from);
            let took = started.elapsed().saturating_sub(window.unwrap_or_default());
            // Nobody asks about an abandoned window: it is not a profile made.
            let made = !matches!(profiled, Err(ProfilingError::Abandoned));
            if let Some(telemetry) = telemetry.as_ref().filter(|_| made) {
                telemetry.record(format, took, &profiled);
            }
            profiled
        };
        let Some(window) = window else {
            let flight = &self.live[format as usize];
            return flight.join_or_start(move || work(&|_| true));
        };
        let slot = GrowthSlot::acquire(&self.growth, window).map_err(|wait| {
            response::retry_after(
                StatusCode::CONFLICT,
                wait,
                "a heap growth profile is already being taken; retry when it has finished",
            )
        })?;
        // The slot is freed when the request leaves (answered, timed out or hung up), or, if
        // it timed out, when the work ends.
        let job = Job::spawn_for_waiters(&self.growth_runner, slot, move |waiters| {
            work(&|window| waiters.wait(window))
        })?;
        Ok(job.waiting_longer(window))
    }

    fn answer(profiled: &Profiled, request: &Request) -> Answer {
        let body = match profiled {
            Ok(body) => body.clone(),
            Err(e) => return response::profiling_error(e),
        };
        match request.format {
            ProfileFormat::Pprof => {
                let mut answer = response::with_body(
                    StatusCode::OK,
                    HeaderValue::from_static("application/octet-stream"),
                    body,
                );
                answer.headers_mut().insert(
                    CONTENT_DISPOSITION,
                    HeaderValue::from_static("attachment; filename=\"heap.pb.gz\""),
                );
                answer
            }
            ProfileFormat::Flamegraph => response::with_body(
                StatusCode::OK,
                HeaderValue::from_static("image/svg+xml"),
                body,
            ),
        }
    }
}

/// The one growth window of a layer: taken while it runs.
struct GrowthSlot(Arc<Mutex<Option<Instant>>>);

impl GrowthSlot {
    /// The slot for a window of `window`, or how long until the running one ends.
    fn acquire(slot: &Arc<Mutex<Option<Instant>>>, window: Duration) -> Result<Self, Duration> {
        let mut ends = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ends) = *ends {
            return Err(ends.saturating_duration_since(Instant::now()));
        }
        *ends = Some(Instant::now() + window);
        Ok(Self(Arc::clone(slot)))
    }
}

impl Drop for GrowthSlot {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// The bucket bounds of the dump duration histogram, in seconds.
const DURATION_BOUNDS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// The help text of the dump duration histogram.
const DURATION_HELP: &str =
    "Time a heap profile took to dump, symbolize and encode (a growth window not counted)";

/// The dump duration histogram at zero for every format until its first dump.
const DURATION_AT_ZERO: ZeroHistogram = ZeroHistogram {
    beside: "jemalloc_heap_profiles_total",
    beside_attributes: &["format", "result"],
    name: "jemalloc_heap_profile_duration_seconds",
    help: DURATION_HELP,
    attribute: "format",
    values: &ProfileFormat::NAMES,
    bounds: DURATION_BOUNDS,
};

/// Heap profile metrics: `jemalloc.heap.profiles` (attributes `format`, `result` =
/// `ok`|`error`) and `jemalloc.heap.profile.duration` (seconds, `format`), exported as
/// `…_jemalloc_heap_profiles_total` and `…_jemalloc_heap_profile_duration_seconds`.
#[derive(Debug, Clone)]
struct ProfileTelemetry {
    profiles: Counter<u64>,
    duration: Histogram<f64>,
}

impl ProfileTelemetry {
    /// The instruments, every counter series at 0 from the start.
    fn new(meter: &Meter) -> Self {
        let telemetry = Self {
            profiles: meter
                .u64_counter("jemalloc.heap.profiles")
                .with_description(
                    "Heap profiles made by the heap profile endpoint, by format and result",
                )
                .build(),
            duration: meter
                .f64_histogram("jemalloc.heap.profile.duration")
                .with_unit("s")
                .with_description(DURATION_HELP)
                .with_boundaries(DURATION_BOUNDS.to_vec())
                .build(),
        };
        for format in ProfileFormat::NAMES {
            for result in ["ok", "error"] {
                let attributes = [
                    KeyValue::new("format", format),
                    KeyValue::new("result", result),
                ];
                telemetry.profiles.add(0, &attributes);
            }
        }
        telemetry
    }

    fn record(&self, format: ProfileFormat, took: Duration, profiled: &Profiled) {
        let format = KeyValue::new("format", format.as_str());
        let result = if profiled.is_ok() { "ok" } else { "error" };
        self.profiles
            .add(1, &[format.clone(), KeyValue::new("result", result)]);
        if profiled.is_ok() {
            self.duration.record(took.as_secs_f64(), &[format]);
        }
    }
}
