//! Purging: returning jemalloc's unused pages to the OS, one purge at a time in the process.
//!
//! A purge (`arena.<MALLCTL_ARENAS_ALL>.purge`) walks every arena and `madvise`s its unused
//! pages away. It takes on the order of 100 ms per GiB of dirty pages and holds arena locks
//! while it runs, so allocations on other threads can stall behind it: only one purge runs in
//! the process at a time ([`PurgeGuard`]), and the caller keeps it off async workers.
//! [`PurgeMode::Decay`] runs `arena.<MALLCTL_ARENAS_ALL>.decay` instead: only the pages whose
//! decay time (`dirty_decay_ms`, `muzzy_decay_ms`) has passed are released, which is gentler.

use super::ctl::{ArenasControl, Ctl};
use super::process_slot::ProcessSlot;
use super::{JemallocError, JemallocStats};
use crate::system::ProcessMemory;
use serde::{Deserialize, Serialize};
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a purge asks of jemalloc.
///
/// Non-exhaustive: jemalloc has other ways of giving memory back, and a later version may
/// offer one, so a `match` on it needs a wildcard arm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
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
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Purge => "purge",
            Self::Decay => "decay",
        }
    }

    /// Every mode, in the order the docs list them.
    pub(crate) const ALL: [Self; 2] = [Self::Purge, Self::Decay];

    /// The names of [`ALL`](Self::ALL).
    pub(crate) const NAMES: [&'static str; 2] = [Self::ALL[0].as_str(), Self::ALL[1].as_str()];
}

impl std::str::FromStr for PurgeMode {
    type Err = UnknownPurgeMode;

    /// `"purge"` or `"decay"`, exactly.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|mode| mode.as_str() == s)
            .ok_or(UnknownPurgeMode)
    }
}

/// A purge mode other than `purge` or `decay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown purge mode: use purge or decay")]
#[non_exhaustive]
pub struct UnknownPurgeMode;

/// What one purge did: the statistics just before and just after it.
///
/// Its JSON form (serde; the body of `POST /debug/jemalloc/purge`) keeps the shape of
/// Restate's purge endpoint so existing scripts keep working, and adds what ran and the OS's
/// view:
///
/// ```json
/// {"before":{"allocated":…,"active":…,"metadata":…,"mapped":…,"retained":…,"resident":…,"dirty":…,"muzzy":…},
///  "after":{…the same keys…},
///  "arenas_purged":4,"released_bytes":268435456,"duration_seconds":0.0213,"mode":"purge",
///  "os":{"before":{"rss":…,"lazy_free":…},"after":{"rss":…,"lazy_free":…}}}
/// ```
///
/// `os` is left out where the OS figures are not available (not Linux); `lazy_free` where
/// `/proc/self/smaps_rollup` is not readable. `released_bytes` is written for readers of the
/// JSON and recomputed from `before` and `after` when read back.
///
/// ```
/// let answer = r#"{"before":{"resident":300},"after":{"resident":100},"arenas_purged":4,
///                  "released_bytes":200,"duration_seconds":0.02,"mode":"purge"}"#;
/// let report: tower_jemalloc::PurgeReport = serde_json::from_str(answer)?;
/// assert_eq!(report.released_bytes(), 200);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "ReportJson", from = "ReportJson")]
#[non_exhaustive]
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
    /// The process's memory as the OS saw it just before and just after the purge, where
    /// available (Linux).
    pub os: Option<OsMemory>,
}

impl PurgeReport {
    /// `before.resident − after.resident`, or 0 if resident memory grew meanwhile.
    pub fn released_bytes(&self) -> u64 {
        self.before.resident.saturating_sub(self.after.resident)
    }
}

/// The process's memory as the OS saw it around a purge ([`PurgeReport::os`]): what a
/// purge changed in the RSS, which is what the kernel, a container limit and `top` count.
///
/// Its JSON form is `{"before":{"rss":…,"lazy_free":…},"after":{…}}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct OsMemory {
    /// Read just before the purge.
    pub before: ProcessMemory,
    /// Read just after the purge.
    pub after: ProcessMemory,
}

impl OsMemory {
    /// `before.rss − after.rss`, or 0 if the RSS grew meanwhile. Pages released with
    /// `MADV_FREE` stay in the RSS until the kernel needs them: see
    /// [`ProcessMemory::lazy_free`].
    pub fn rss_released(&self) -> u64 {
        self.before.rss.saturating_sub(self.after.rss)
    }
}

/// The JSON shape of a [`PurgeReport`].
#[derive(Serialize, Deserialize)]
struct ReportJson {
    before: JemallocStats,
    after: JemallocStats,
    arenas_purged: u32,
    #[serde(default)]
    released_bytes: u64,
    duration_seconds: f64,
    mode: PurgeMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    os: Option<OsMemory>,
}

impl From<PurgeReport> for ReportJson {
    fn from(report: PurgeReport) -> Self {
        Self {
            released_bytes: report.released_bytes(),
            before: report.before,
            after: report.after,
            arenas_purged: report.arenas_purged,
            duration_seconds: report.duration.as_secs_f64(),
            mode: report.mode,
            os: report.os,
        }
    }
}

impl From<ReportJson> for PurgeReport {
    fn from(json: ReportJson) -> Self {
        Self {
            before: json.before,
            after: json.after,
            arenas_purged: json.arenas_purged,
            duration: Duration::try_from_secs_f64(json.duration_seconds).unwrap_or_default(),
            mode: json.mode,
            os: json.os,
        }
    }
}

/// Why a purge did not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PurgeError {
    /// Another purge is running in this process.
    #[error("a jemalloc purge is already running")]
    AlreadyRunning,
    /// jemalloc cannot be used, or a mallctl call failed.
    #[error("{0}")]
    Jemalloc(#[from] JemallocError),
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
    let ctl = super::ctl::ctl()?;
    let guard = PurgeGuard::acquire().ok_or(PurgeError::AlreadyRunning)?;
    Ok(guard.run(ctl, mode)?)
}

/// The one purge-in-progress flag of the process.
static RUNNING: AtomicBool = AtomicBool::new(false);

/// When the last purge of the process ended.
static LAST_PURGE_END: Mutex<Option<Instant>> = Mutex::new(None);

/// Holds the process's purge slot; releases it on drop (also when a purge panics).
#[derive(Debug)]
pub(crate) struct PurgeGuard {
    /// Released on drop.
    _slot: ProcessSlot,
}

impl PurgeGuard {
    /// Takes the purge slot, or `None` when a purge is already running.
    pub(crate) fn acquire() -> Option<Self> {
        ProcessSlot::take(&RUNNING).map(|_slot| Self { _slot })
    }

    /// When the last purge ended, if one has run. Read while holding the slot, it cannot
    /// change: the last purge recorded its end before releasing the slot.
    pub(crate) fn last_purge_end(&self) -> Option<Instant> {
        *LAST_PURGE_END.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads stats, purges all arenas, reads stats again (blocking); records when it ended
    /// before the slot is released, so that no second purge can slip in between.
    pub(crate) fn run(self, ctl: &Ctl, mode: PurgeMode) -> Result<PurgeReport, JemallocError> {
        let result = measure(ctl, mode);
        *LAST_PURGE_END.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        drop(self);
        result
    }
}

fn measure(ctl: &Ctl, mode: PurgeMode) -> Result<PurgeReport, JemallocError> {
    let os_before = ProcessMemory::read();
    let before = ctl.snapshot()?;
    let arenas_purged = ctl.narenas()?;
    let start = Instant::now();
    ctl.arenas_control(match mode {
        PurgeMode::Purge => ArenasControl::Purge,
        PurgeMode::Decay => ArenasControl::Decay,
    })?;
    let duration = start.elapsed();
    let after = ctl.snapshot()?;
    let os = os_before
        .zip(ProcessMemory::read())
        .map(|(before, after)| OsMemory { before, after });
    Ok(PurgeReport {
        before,
        after,
        arenas_purged,
        duration,
        mode,
        os,
    })
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
        let json = serde_json::to_string(&report).unwrap();
        assert!(json.starts_with(r#"{"before":{"allocated":0,"#), "{json}");
        assert!(
            json.ends_with(
                r#""arenas_purged":3,"released_bytes":3072,"duration_seconds":0.25,"mode":"decay"}"#
            ),
            "{json}"
        );
        let os = |rss, lazy_free| ProcessMemory { rss, lazy_free };
        report.os = Some(OsMemory {
            before: os(10, Some(2)),
            after: os(8, None),
        });
        assert_eq!(report.os.unwrap().rss_released(), 2);
        let json = serde_json::to_string(&report).unwrap();
        assert!(
            json.ends_with(
                r#""mode":"decay","os":{"before":{"rss":10,"lazy_free":2},"after":{"rss":8}}}"#
            ),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<PurgeReport>(&json).unwrap(), report);
    }

    #[test]
    fn modes_parse_exactly() {
        assert_eq!("purge".parse(), Ok(PurgeMode::Purge));
        assert_eq!("decay".parse(), Ok(PurgeMode::Decay));
        for bad in ["", "Purge", "purge ", "all"] {
            assert_eq!(bad.parse::<PurgeMode>(), Err(UnknownPurgeMode), "{bad:?}");
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
