//! Purging: returning jemalloc's unused dirty pages to the OS, one purge at a time, off the
//! async runtime.
//!
//! A purge (`arena.<MALLCTL_ARENAS_ALL>.purge`) walks every arena and `madvise`s its unused
//! pages away. It takes on the order of 100 ms per GiB of dirty pages and holds arena locks
//! while it runs, so allocations on other threads can stall behind it. The HTTP endpoint
//! therefore runs it on a dedicated thread (never an async worker, whatever the runtime), only
//! one purge runs in the process at a time (a second one asked for meanwhile is refused with a
//! 409, not queued), and after a purge the endpoint refuses others for a cooldown (429).

use crate::access::Access;
use crate::ctl::Ctl;
use crate::future::ResponseFuture;
use crate::response;
use crate::stats::{JemallocError, JemallocStats};
use http::header::{HeaderValue, RETRY_AFTER};
use http::request::Parts;
use http::{Method, StatusCode};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What one purge did: the statistics just before and just after it.
///
/// Its JSON form (the body of `POST /debug/jemalloc/purge`) keeps the shape of Restate's purge
/// endpoint so existing scripts keep working:
///
/// ```json
/// {"before":{"allocated":…,"active":…,"metadata":…,"mapped":…,"retained":…,"resident":…,"dirty":…,"muzzy":…},
///  "after":{…the same keys…},
///  "arenas_purged":4,"released_bytes":268435456,"duration_seconds":0.0213}
/// ```
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
}

impl PurgeReport {
    /// `before.resident − after.resident`, or 0 if resident memory grew meanwhile.
    pub fn released_bytes(&self) -> u64 {
        self.before.resident.saturating_sub(self.after.resident)
    }

    /// The report as JSON; every byte figure is an integer.
    pub fn to_json(&self) -> String {
        use fmt::Write;
        let mut out = String::with_capacity(512);
        out.push_str("{\"before\":");
        self.before.write_json(&mut out);
        out.push_str(",\"after\":");
        self.after.write_json(&mut out);
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            ",\"arenas_purged\":{},\"released_bytes\":{},\"duration_seconds\":{}}}",
            self.arenas_purged,
            self.released_bytes(),
            self.duration.as_secs_f64()
        );
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

/// Purges the unused pages of all arenas on the calling thread and reports what it released.
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
pub fn purge_all_arenas() -> Result<PurgeReport, PurgeError> {
    let ctl = crate::ctl::ctl()?;
    let guard = PurgeGuard::acquire().ok_or(PurgeError::AlreadyRunning)?;
    Ok(run_guarded(ctl, guard)?)
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
fn run(ctl: &Ctl) -> Result<PurgeReport, JemallocError> {
    let before = ctl.snapshot()?;
    let arenas_purged = ctl.narenas()?;
    let start = Instant::now();
    ctl.purge_all()?;
    let duration = start.elapsed();
    let after = ctl.snapshot()?;
    Ok(PurgeReport {
        before,
        after,
        arenas_purged,
        duration,
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
}

impl PurgeEndpoint {
    /// Answers a request on the purge path. Order of checks: method (405), access
    /// (401/403), jemalloc availability (501/503), a purge already running (409), the
    /// cooldown (429 with `Retry-After`); then the purge runs on a dedicated thread and the
    /// future resolves when it reports. The request body is never read.
    pub(crate) fn respond<F>(&self, parts: &Parts) -> ResponseFuture<F> {
        if parts.method != Method::POST && parts.method != Method::PUT {
            return ResponseFuture::local(response::method_not_allowed("POST, PUT", &self.path));
        }
        if let Some(refusal) = self.access.refusal(parts) {
            return ResponseFuture::local(refusal);
        }
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
        let spawned = std::thread::Builder::new()
            .name("jemalloc-purge".to_owned())
            .spawn(move || {
                let answer = match run_guarded(ctl, guard) {
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
fn run_guarded(ctl: &Ctl, guard: PurgeGuard) -> Result<PurgeReport, JemallocError> {
    let result = run(ctl);
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

    #[test]
    fn released_bytes_saturates() {
        let grew = PurgeReport {
            before: stats(10),
            after: stats(20),
            arenas_purged: 1,
            duration: Duration::ZERO,
        };
        assert_eq!(grew.released_bytes(), 0);
        let shrank = PurgeReport {
            before: stats(20),
            after: stats(5),
            ..grew
        };
        assert_eq!(shrank.released_bytes(), 15);
    }

    #[test]
    fn json_keeps_restate_shape() {
        let report = PurgeReport {
            before: stats(4096),
            after: stats(1024),
            arenas_purged: 3,
            duration: Duration::from_millis(250),
        };
        let json = report.to_json();
        assert!(json.starts_with(r#"{"before":{"allocated":0,"#), "{json}");
        assert!(
            json.ends_with(r#""arenas_purged":3,"released_bytes":3072,"duration_seconds":0.25}"#),
            "{json}"
        );
    }

    #[test]
    fn guard_is_single_flight() {
        let first = PurgeGuard::acquire().expect("free at start");
        assert!(PurgeGuard::acquire().is_none());
        drop(first);
        assert!(PurgeGuard::acquire().is_some());
    }
}
