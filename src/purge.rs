//! Purging: returning jemalloc's unused dirty pages to the OS, one purge at a time, off the
//! async runtime.
//!
//! A purge (`arena.<MALLCTL_ARENAS_ALL>.purge`) walks every arena and `madvise`s its unused
//! pages away. It takes on the order of 100 ms per GiB of dirty pages and holds arena locks
//! while it runs, so allocations on other threads can stall behind it. The HTTP endpoint
//! therefore runs it on a dedicated thread (never an async worker, whatever the runtime), only
//! one purge runs in the process at a time (a second one asked for meanwhile is refused with a
//! 409, not queued), and after a purge the endpoint refuses others for a cooldown (429).
//!
//! `?mode=decay` runs `arena.<MALLCTL_ARENAS_ALL>.decay` instead: only the pages whose decay
//! time (`dirty_decay_ms`, `muzzy_decay_ms`) has passed are released, which is gentler.

use crate::access::{admit, Access};
use crate::ctl::Ctl;
use crate::future::ResponseFuture;
use crate::os::ProcessMemory;
use crate::response;
use crate::stats::{JemallocError, JemallocStats};
use http::header::{HeaderValue, RETRY_AFTER};
use http::request::Parts;
use http::{Method, StatusCode};
use opentelemetry::metrics::{Counter, Histogram, Meter};
use opentelemetry::KeyValue;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a purge asks of jemalloc.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PurgeMode {
    /// `arena.<all>.purge`: release every unused dirty and muzzy page now (`?mode=purge`, the
    /// default).
    #[default]
    Purge,
    /// `arena.<all>.decay`: release only the pages whose decay time has passed
    /// (`?mode=decay`): gentler, and often nothing when decay keeps up on its own.
    Decay,
}

impl PurgeMode {
    /// The name used in `?mode=` and in the report: `"purge"` or `"decay"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Purge => "purge",
            Self::Decay => "decay",
        }
    }

    /// The mode a query string asks for: the first `mode=` parameter, matched exactly;
    /// `Ok(Purge)` without one.
    fn from_query(query: Option<&str>) -> Result<Self, String> {
        let Some(value) = crate::query::param(query, "mode") else {
            return Ok(Self::Purge);
        };
        match value {
            "purge" => Ok(Self::Purge),
            "decay" => Ok(Self::Decay),
            other => Err(format!(
                "unknown purge mode {other:?}: use mode=purge (the default) or mode=decay"
            )),
        }
    }
}

/// What one purge did: the statistics just before and just after it.
///
/// Its JSON form (the body of `POST /debug/jemalloc/purge`) keeps the shape of Restate's purge
/// endpoint so existing scripts keep working, and adds what ran and the OS's view:
///
/// ```json
/// {"before":{"allocated":…,"active":…,"metadata":…,"mapped":…,"retained":…,"resident":…,"dirty":…,"muzzy":…},
///  "after":{…the same keys…},
///  "arenas_purged":4,"released_bytes":268435456,"duration_seconds":0.0213,"mode":"purge",
///  "os":{"before":{"rss":…,"lazy_free":…},"after":{"rss":…,"lazy_free":…}}}
/// ```
///
/// `os` is left out where the OS figures are not available (not Linux); `lazy_free` where
/// `/proc/self/smaps_rollup` is not readable.
#[derive(Debug, Clone, PartialEq)]
pub struct PurgeReport {
    /// Statistics read (after an epoch advance) just before the purge.
    pub before: JemallocStats,
    /// Statistics read (after another epoch advance) just after the purge.
    pub after: JemallocStats,
    /// How many arenas the purge covered (`arenas.narenas`).
    pub arenas_purged: u32,
    /// How long the purge call itself took.
    pub duration: Duration,
    /// What ran.
    pub mode: PurgeMode,
    /// The process's memory as the OS saw it before and after, where available.
    pub os: Option<(ProcessMemory, ProcessMemory)>,
}

impl PurgeReport {
    /// `before.resident − after.resident`, or 0 if resident memory grew meanwhile.
    pub fn released_bytes(&self) -> u64 {
        self.before.resident.saturating_sub(self.after.resident)
    }

    /// The report as JSON; every byte figure is an integer.
    pub fn to_json(&self) -> String {
        use fmt::Write;
        let mut out = String::with_capacity(640);
        out.push_str("{\"before\":");
        self.before.write_json(&mut out);
        out.push_str(",\"after\":");
        self.after.write_json(&mut out);
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            ",\"arenas_purged\":{},\"released_bytes\":{},\"duration_seconds\":{},\"mode\":\"{}\"",
            self.arenas_purged,
            self.released_bytes(),
            self.duration.as_secs_f64(),
            self.mode.as_str(),
        );
        if let Some((before, after)) = &self.os {
            out.push_str(",\"os\":{\"before\":");
            before.write_json(&mut out);
            out.push_str(",\"after\":");
            after.write_json(&mut out);
            out.push('}');
        }
        out.push('}');
        out
    }
}

/// Why a purge did not run.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PurgeError {
    /// Another purge is running in this process.
    AlreadyRunning,
    /// jemalloc cannot be used, or a mallctl call failed.
    Jemalloc(JemallocError),
}

impl fmt::Display for PurgeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AlreadyRunning => f.write_str("a jemalloc purge is already running"),
            Self::Jemalloc(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for PurgeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::AlreadyRunning => None,
            Self::Jemalloc(e) => Some(e),
        }
    }
}

impl From<JemallocError> for PurgeError {
    fn from(e: JemallocError) -> Self {
        Self::Jemalloc(e)
    }
}

/// Purges (or decays) the unused pages of all arenas on the calling thread and reports what it
/// released. The purge telemetry of a layer's meter only counts purges made through its
/// endpoint.
///
/// This blocks the calling thread for the whole purge (about 100 ms per GiB of dirty pages):
/// never call it on an async runtime worker; use a dedicated thread or your runtime's
/// blocking pool. It shares the process-wide single-flight guard with the HTTP endpoint; it
/// is not subject to the endpoint's cooldown, but the endpoint's cooldown counts from its end.
///
/// # Errors
///
/// [`PurgeError::AlreadyRunning`] when another purge is running, and
/// [`PurgeError::Jemalloc`] when jemalloc is unavailable or a mallctl call fails.
pub fn purge_all_arenas(mode: PurgeMode) -> Result<PurgeReport, PurgeError> {
    let ctl = crate::ctl::ctl()?;
    let guard = PurgeGuard::acquire().ok_or(PurgeError::AlreadyRunning)?;
    Ok(run_guarded(ctl, mode, guard)?)
}

/// The one purge-in-progress flag of the process.
static RUNNING: AtomicBool = AtomicBool::new(false);

/// Holds the process's purge slot; releases it on drop (also when a purge panics).
#[derive(Debug)]
pub(crate) struct PurgeGuard(());

impl PurgeGuard {
    /// Takes the purge slot, or `None` when a purge is already running.
    pub(crate) fn acquire() -> Option<Self> {
        RUNNING
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| Self(()))
    }
}

impl Drop for PurgeGuard {
    fn drop(&mut self) {
        RUNNING.store(false, Ordering::Release);
    }
}

/// Reads stats, purges all arenas, reads stats again. Blocking.
fn run(ctl: &Ctl, mode: PurgeMode) -> Result<PurgeReport, JemallocError> {
    let os_before = ProcessMemory::read();
    let before = ctl.snapshot()?;
    let arenas_purged = ctl.narenas()?;
    let start = Instant::now();
    ctl.purge_all(mode)?;
    let duration = start.elapsed();
    let after = ctl.snapshot()?;
    let os = os_before.zip(ProcessMemory::read());
    Ok(PurgeReport {
        before,
        after,
        arenas_purged,
        duration,
        mode,
        os,
    })
}

/// The default minimum interval between two purges through the HTTP endpoint.
pub const DEFAULT_PURGE_COOLDOWN: Duration = Duration::from_secs(1);

/// When the last purge of the process ended, for the cooldown.
static LAST_PURGE_END: Mutex<Option<Instant>> = Mutex::new(None);

/// The purge endpoint of one layer.
#[derive(Debug)]
pub(crate) struct PurgeEndpoint {
    pub(crate) path: Box<str>,
    pub(crate) access: Access,
    /// Minimum time from the end of one purge to the start of the next; zero disables.
    pub(crate) cooldown: Duration,
    pub(crate) telemetry: PurgeTelemetry,
}

/// Purge metrics, recorded through the layer's meter: `jemalloc.purges` (attributes `result`
/// = `ok`|`error` and `mode`), `jemalloc.purge.duration` (seconds, `mode`) and
/// `jemalloc.purge.released` (bytes, `mode`), exported as `…_jemalloc_purges_total`,
/// `…_jemalloc_purge_duration_seconds` and `…_jemalloc_purge_released_bytes_total`.
#[derive(Debug, Clone)]
pub(crate) struct PurgeTelemetry {
    purges: Counter<u64>,
    duration: Histogram<f64>,
    released: Counter<u64>,
}

impl PurgeTelemetry {
    pub(crate) fn new(meter: &Meter) -> Self {
        Self {
            purges: meter
                .u64_counter("jemalloc.purges")
                .with_description("Purges run through the purge endpoint, by result and mode")
                .build(),
            duration: meter
                .f64_histogram("jemalloc.purge.duration")
                .with_unit("s")
                .with_description("Time the purge call took")
                .with_boundaries(vec![
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ])
                .build(),
            released: meter
                .u64_counter("jemalloc.purge.released")
                .with_unit("By")
                .with_description("Resident bytes released by purges")
                .build(),
        }
    }

    fn record(&self, mode: PurgeMode, result: &Result<PurgeReport, JemallocError>) {
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

impl PurgeEndpoint {
    /// Answers a request on the purge path. Order of checks: method (405), access
    /// (401/403), mode (400), jemalloc availability (501/503), a purge already running (409),
    /// the cooldown (429 with `Retry-After`); then the purge runs on a dedicated thread and the
    /// future resolves when it reports. The request body is never read.
    pub(crate) fn respond<F>(&self, parts: &Parts) -> ResponseFuture<F> {
        let methods = [Method::POST, Method::PUT];
        if let Some(refusal) = admit(parts, methods, "POST, PUT", &self.path, &self.access) {
            return ResponseFuture::local(refusal);
        }
        let mode = match PurgeMode::from_query(parts.uri.query()) {
            Ok(mode) => mode,
            Err(reason) => {
                return ResponseFuture::local(response::text(StatusCode::BAD_REQUEST, reason))
            }
        };
        let ctl = match crate::ctl::ctl() {
            Ok(ctl) => ctl,
            Err(e) => return ResponseFuture::local(e.to_response()),
        };
        let Some(guard) = PurgeGuard::acquire() else {
            return ResponseFuture::local(response::text(
                StatusCode::CONFLICT,
                "a jemalloc purge is already running; retry when it has finished",
            ));
        };
        // Checked while holding the slot: the last purge recorded its end before releasing it.
        if let Some(wait) = self.cooldown_left() {
            drop(guard);
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            let mut answer = response::text(
                StatusCode::TOO_MANY_REQUESTS,
                format_args!(
                    "purges are limited to one per {:?}; retry in {seconds} s",
                    self.cooldown
                ),
            );
            answer
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(seconds));
            return ResponseFuture::local(answer);
        }

        let (sender, receiver) = tokio::sync::oneshot::channel();
        let telemetry = self.telemetry.clone();
        let spawned = std::thread::Builder::new()
            .name("jemalloc-purge".to_owned())
            .spawn(move || {
                let result = run_guarded(ctl, mode, guard);
                telemetry.record(mode, &result);
                let answer = match result {
                    Ok(report) => response::json(report.to_json()),
                    Err(e) => e.to_response(),
                };
                // The client may have gone away; the purge is done either way.
                let _ = sender.send(answer);
            });
        match spawned {
            Ok(_) => ResponseFuture::pending(async move {
                receiver.await.unwrap_or_else(|_| {
                    // The thread always sends before it ends; it can only vanish by
                    // panicking, and the client still deserves an answer.
                    response::text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the purge thread ended without a report",
                    )
                })
            }),
            // The closure, and with it the guard, was dropped: the slot is free again.
            Err(e) => ResponseFuture::local(response::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format_args!("cannot start the purge thread: {e}"),
            )),
        }
    }

    /// How long until the cooldown after the last purge is over, if it is not yet.
    fn cooldown_left(&self) -> Option<Duration> {
        if self.cooldown.is_zero() {
            return None;
        }
        let last = (*LAST_PURGE_END.lock().unwrap_or_else(|e| e.into_inner()))?;
        self.cooldown
            .checked_sub(last.elapsed())
            .filter(|left| !left.is_zero())
    }
}

/// Runs a purge while holding the slot; records when it ended (for the cooldown) before the
/// slot is released, so that no second purge can slip in between.
fn run_guarded(
    ctl: &Ctl,
    mode: PurgeMode,
    guard: PurgeGuard,
) -> Result<PurgeReport, JemallocError> {
    let result = run(ctl, mode);
    *LAST_PURGE_END.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    drop(guard);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(resident: u64) -> JemallocStats {
        JemallocStats {
            resident,
            ..JemallocStats::default()
        }
    }

    fn report(before: u64, after: u64) -> PurgeReport {
        PurgeReport {
            before: stats(before),
            after: stats(after),
            arenas_purged: 1,
            duration: Duration::ZERO,
            mode: PurgeMode::Purge,
            os: None,
        }
    }

    #[test]
    fn released_bytes_saturates() {
        let grew = report(10, 20);
        assert_eq!(grew.released_bytes(), 0);
        assert_eq!(report(20, 5).released_bytes(), 15);
    }

    #[test]
    fn json_keeps_restate_shape() {
        let mut report = PurgeReport {
            arenas_purged: 3,
            duration: Duration::from_millis(250),
            mode: PurgeMode::Decay,
            ..report(4096, 1024)
        };
        let json = report.to_json();
        assert!(json.starts_with(r#"{"before":{"allocated":0,"#), "{json}");
        assert!(
            json.ends_with(
                r#""arenas_purged":3,"released_bytes":3072,"duration_seconds":0.25,"mode":"decay"}"#
            ),
            "{json}"
        );
        let os = |rss, lazy_free| ProcessMemory { rss, lazy_free };
        report.os = Some((os(10, Some(2)), os(8, None)));
        let json = report.to_json();
        assert!(
            json.ends_with(
                r#""mode":"decay","os":{"before":{"rss":10,"lazy_free":2},"after":{"rss":8}}}"#
            ),
            "{json}"
        );
    }

    #[test]
    fn mode_comes_from_the_query() {
        assert_eq!(PurgeMode::from_query(None), Ok(PurgeMode::Purge));
        assert_eq!(PurgeMode::from_query(Some("")), Ok(PurgeMode::Purge));
        assert_eq!(PurgeMode::from_query(Some("x=1&y")), Ok(PurgeMode::Purge));
        assert_eq!(
            PurgeMode::from_query(Some("mode=purge")),
            Ok(PurgeMode::Purge)
        );
        assert_eq!(
            PurgeMode::from_query(Some("a=b&mode=decay")),
            Ok(PurgeMode::Decay)
        );
        assert_eq!(
            PurgeMode::from_query(Some("mode=decay&mode=nope")),
            Ok(PurgeMode::Decay)
        );
        for bad in ["mode=", "mode", "mode=Purge", "mode=purge%20", "mode=all"] {
            let reason = PurgeMode::from_query(Some(bad)).unwrap_err();
            assert!(
                reason.contains("mode=purge") && reason.contains("mode=decay"),
                "{reason}"
            );
        }
    }

    #[test]
    fn guard_is_single_flight() {
        let first = PurgeGuard::acquire().expect("free at start");
        assert!(PurgeGuard::acquire().is_none());
        drop(first);
        assert!(PurgeGuard::acquire().is_some());
    }
}
