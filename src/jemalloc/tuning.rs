//! jemalloc's tuning at run time: background threads and decay times, read and changed without
//! a restart.
//!
//! A change is checked whole before anything is written, written in a fixed order, and undone
//! in reverse if a write fails, so it is applied entirely or not at all. Changes run one at a
//! time in the process.

use super::ctl::{Ctl, Write};
use super::process_slot::ProcessSlot;
use super::JemallocError;
use serde::{Deserialize, Serialize};
use std::sync::atomic::AtomicBool;

/// The longest decay time a change accepts, in milliseconds (one hour). jemalloc takes longer
/// ones, but pages held that long are better described by `-1` (never).
pub const MAX_DECAY_MS: i64 = 3_600_000;

/// jemalloc's live tuning: what `GET /debug/jemalloc/config` answers. Serialized (serde) as:
///
/// ```json
/// {"background_thread":false,"max_background_threads":2,"dirty_decay_ms":10000,
///  "muzzy_decay_ms":0,"arenas_differing":[{"arena":2,"dirty_decay_ms":0,"muzzy_decay_ms":0}]}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JemallocConfig {
    /// `background_thread`: whether jemalloc's background threads run now (they return
    /// freed pages on their own, also while the process is idle).
    pub background_thread: bool,
    /// `max_background_threads`: how many there are at most when they run.
    pub max_background_threads: u64,
    /// `arenas.dirty_decay_ms`: how long a freed page stays dirty (reusable, resident) before
    /// it is returned, for arenas created from now on; `-1`: never.
    pub dirty_decay_ms: i64,
    /// `arenas.muzzy_decay_ms`: the same for muzzy pages (released lazily with `MADV_FREE`).
    pub muzzy_decay_ms: i64,
    /// The initialized arenas whose own decay times differ from the two defaults above
    /// (jemalloc's arena for huge allocations purges eagerly, for one).
    pub arenas_differing: Vec<ArenaDecay>,
}

/// One arena's decay times, in a [`JemallocConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ArenaDecay {
    /// Its index (`arena.<i>`).
    pub arena: u32,
    /// `arena.<i>.dirty_decay_ms`.
    pub dirty_decay_ms: i64,
    /// `arena.<i>.muzzy_decay_ms`.
    pub muzzy_decay_ms: i64,
}

impl JemallocConfig {
    /// Reads jemalloc's live tuning.
    ///
    /// # Errors
    ///
    /// As [`JemallocStats::read`](crate::JemallocStats::read): jemalloc not compiled in, not
    /// the global allocator, or a mallctl call failing.
    pub fn read() -> Result<Self, JemallocError> {
        read(super::ctl::ctl()?)
    }
}

/// The live tuning, read through `ctl`.
pub(crate) fn read(ctl: &Ctl) -> Result<JemallocConfig, JemallocError> {
    let (dirty_decay_ms, muzzy_decay_ms) = ctl.decay_defaults()?;
    let arenas_differing = ctl
        .arena_decays()?
        .into_iter()
        .filter(|&(_, dirty, muzzy)| (dirty, muzzy) != (dirty_decay_ms, muzzy_decay_ms))
        .map(|(arena, dirty_decay_ms, muzzy_decay_ms)| ArenaDecay {
            arena,
            dirty_decay_ms,
            muzzy_decay_ms,
        })
        .collect();
    Ok(JemallocConfig {
        background_thread: ctl.background_threads_running()?,
        max_background_threads: ctl.max_background_threads()?,
        dirty_decay_ms,
        muzzy_decay_ms,
        arenas_differing,
    })
}

/// A setting a change may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Setting {
    BackgroundThread,
    MaxBackgroundThreads,
    DirtyDecayMs,
    MuzzyDecayMs,
}

impl Setting {
    /// Every setting, in the order a change writes them: background threads start last, once
    /// their number and the decay times they apply are in place.
    pub(crate) const ALL: [Self; 4] = [
        Self::MaxBackgroundThreads,
        Self::DirtyDecayMs,
        Self::MuzzyDecayMs,
        Self::BackgroundThread,
    ];

    /// Its name, as a query parameter, a JSON key and a metric attribute.
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Self::BackgroundThread => "background_thread",
            Self::MaxBackgroundThreads => "max_background_threads",
            Self::DirtyDecayMs => "dirty_decay_ms",
            Self::MuzzyDecayMs => "muzzy_decay_ms",
        }
    }

    /// The names of [`ALL`](Self::ALL).
    pub(crate) const NAMES: [&'static str; 4] = [
        Self::ALL[0].name(),
        Self::ALL[1].name(),
        Self::ALL[2].name(),
        Self::ALL[3].name(),
    ];
}

/// A change of jemalloc's tuning: each `Some` is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ConfigChange {
    pub(crate) background_thread: Option<bool>,
    pub(crate) max_background_threads: Option<u64>,
    pub(crate) dirty_decay_ms: Option<i64>,
    pub(crate) muzzy_decay_ms: Option<i64>,
}

impl ConfigChange {
    /// Whether it changes nothing.
    pub(crate) fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The settings it writes.
    pub(crate) fn settings(&self) -> impl Iterator<Item = Setting> + '_ {
        Setting::ALL.into_iter().filter(|setting| match setting {
            Setting::BackgroundThread => self.background_thread.is_some(),
            Setting::MaxBackgroundThreads => self.max_background_threads.is_some(),
            Setting::DirtyDecayMs => self.dirty_decay_ms.is_some(),
            Setting::MuzzyDecayMs => self.muzzy_decay_ms.is_some(),
        })
    }

    /// Checks every value, or says (in one line) which is out of range and what is allowed.
    /// `thread_limit` is `opt.max_background_threads`, the most jemalloc accepts.
    pub(crate) fn check(&self, thread_limit: u64) -> Result<(), String> {
        if let Some(threads) = self.max_background_threads {
            if threads == 0 || threads > thread_limit {
                return Err(format!(
                    "max_background_threads={threads} is out of range: use 1 to {thread_limit} \
                     (opt.max_background_threads)"
                ));
            }
        }
        for (setting, value) in [
            (Setting::DirtyDecayMs, self.dirty_decay_ms),
            (Setting::MuzzyDecayMs, self.muzzy_decay_ms),
        ] {
            if let Some(ms) = value.filter(|ms| !(-1..=MAX_DECAY_MS).contains(ms)) {
                return Err(format!(
                    "{}={ms} is out of range: use -1 (never) to {MAX_DECAY_MS} milliseconds",
                    setting.name()
                ));
            }
        }
        Ok(())
    }

    /// The writes it makes on `arenas`, in order.
    fn writes(&self, arenas: &[u32]) -> Vec<Write> {
        let mut writes = Vec::new();
        for setting in Setting::ALL {
            match setting {
                Setting::MaxBackgroundThreads => writes.extend(
                    self.max_background_threads
                        .map(|n| Write::MaxBackgroundThreads(n as usize)),
                ),
                Setting::DirtyDecayMs => {
                    if let Some(ms) = self.dirty_decay_ms {
                        writes.push(Write::DefaultDirtyDecay(ms as isize));
                        writes.extend(arenas.iter().map(|&i| Write::DirtyDecay(i, ms as isize)));
                    }
                }
                Setting::MuzzyDecayMs => {
                    if let Some(ms) = self.muzzy_decay_ms {
                        writes.push(Write::DefaultMuzzyDecay(ms as isize));
                        writes.extend(arenas.iter().map(|&i| Write::MuzzyDecay(i, ms as isize)));
                    }
                }
                Setting::BackgroundThread => {
                    writes.extend(self.background_thread.map(Write::BackgroundThread));
                }
            }
        }
        writes
    }
}

/// The outcome of a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ConfigUpdate {
    /// The tuning before the change.
    pub before: JemallocConfig,
    /// The tuning after it.
    pub after: JemallocConfig,
}

/// Why a change was not made.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum ChangeError {
    /// A value is out of range; nothing was written.
    #[error("{0}")]
    Invalid(String),
    /// Reading or writing failed; what had been written was undone.
    #[error("{error}; {undone}")]
    Failed {
        error: JemallocError,
        /// What became of the writes made before the failure.
        undone: String,
    },
}

/// The one change-in-progress flag of the process.
static CHANGING: AtomicBool = AtomicBool::new(false);

/// Holds the process's change slot; releases it on drop (also when a change panics).
#[derive(Debug)]
pub(crate) struct ChangeGuard {
    /// Released on drop.
    _slot: ProcessSlot,
}

impl ChangeGuard {
    /// Takes the change slot, or `None` when a change is being made.
    pub(crate) fn acquire() -> Option<Self> {
        ProcessSlot::take(&CHANGING).map(|_slot| Self { _slot })
    }

    /// Makes `change` on every initialized arena and for arenas created later, after checking
    /// it whole; on a failed write, undoes what was written.
    pub(crate) fn apply(
        self,
        ctl: &Ctl,
        change: &ConfigChange,
    ) -> Result<ConfigUpdate, ChangeError> {
        apply(ctl, change)
    }
}

fn apply(ctl: &Ctl, change: &ConfigChange) -> Result<ConfigUpdate, ChangeError> {
    let failed = |error| ChangeError::Failed {
        error,
        undone: "nothing was changed".to_owned(),
    };
    change
        .check(ctl.background_thread_limit().map_err(failed)?)
        .map_err(ChangeError::Invalid)?;
    let before = read(ctl).map_err(failed)?;
    let arenas = ctl.initialized_arenas().map_err(failed)?;

    let mut done = Vec::new();
    for write in change.writes(&arenas) {
        match ctl.write(write) {
            Ok(previous) => done.push(previous),
            Err(error) => {
                let undone = undo(ctl, done);
                return Err(ChangeError::Failed { error, undone });
            }
        }
    }
    let after = read(ctl).map_err(|error| ChangeError::Failed {
        error,
        undone: "the change was made".to_owned(),
    })?;
    log(&before, &after);
    Ok(ConfigUpdate { before, after })
}

/// Writes back the previous values of `done`, last first, and says how that went.
fn undo(ctl: &Ctl, done: Vec<Write>) -> String {
    if done.is_empty() {
        return "nothing was changed".to_owned();
    }
    let count = done.len();
    let failures: Vec<String> = done
        .into_iter()
        .rev()
        .filter_map(|previous| ctl.write(previous).err().map(|e| e.to_string()))
        .collect();
    if failures.is_empty() {
        format!("the {count} values already written were restored")
    } else {
        format!(
            "restoring the values already written failed too ({}): read the settings again",
            failures.join("; ")
        )
    }
}

/// Logs each setting that changed, with its old and new value.
fn log(before: &JemallocConfig, after: &JemallocConfig) {
    let values = |config: &JemallocConfig| {
        [
            config.background_thread.to_string(),
            config.max_background_threads.to_string(),
            config.dirty_decay_ms.to_string(),
            config.muzzy_decay_ms.to_string(),
        ]
    };
    let settings = [
        Setting::BackgroundThread,
        Setting::MaxBackgroundThreads,
        Setting::DirtyDecayMs,
        Setting::MuzzyDecayMs,
    ];
    for ((setting, old), new) in settings.iter().zip(values(before)).zip(values(after)) {
        if old != new {
            tracing::info!(
                setting = setting.name(),
                %old,
                %new,
                "tower-jemalloc: jemalloc setting changed"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_out_of_range_are_named() {
        let ok = ConfigChange {
            background_thread: Some(true),
            max_background_threads: Some(2),
            dirty_decay_ms: Some(-1),
            muzzy_decay_ms: Some(MAX_DECAY_MS),
        };
        assert_eq!(ok.check(2), Ok(()));
        for (change, expected) in [
            (
                ConfigChange {
                    max_background_threads: Some(0),
                    ..ConfigChange::default()
                },
                "max_background_threads=0 is out of range: use 1 to 2",
            ),
            (
                ConfigChange {
                    max_background_threads: Some(3),
                    ..ConfigChange::default()
                },
                "max_background_threads=3 is out of range",
            ),
            (
                ConfigChange {
                    dirty_decay_ms: Some(-2),
                    ..ConfigChange::default()
                },
                "dirty_decay_ms=-2 is out of range: use -1 (never) to 3600000 milliseconds",
            ),
            (
                ConfigChange {
                    muzzy_decay_ms: Some(MAX_DECAY_MS + 1),
                    ..ConfigChange::default()
                },
                "muzzy_decay_ms=3600001 is out of range",
            ),
        ] {
            let reason = change.check(2).unwrap_err();
            assert!(reason.starts_with(expected), "{reason}");
        }
    }

    #[test]
    fn writes_come_in_order_with_threads_last() {
        let change = ConfigChange {
            background_thread: Some(true),
            max_background_threads: Some(1),
            dirty_decay_ms: Some(200),
            muzzy_decay_ms: None,
        };
        assert_eq!(
            change.writes(&[0, 3]),
            [
                Write::MaxBackgroundThreads(1),
                Write::DefaultDirtyDecay(200),
                Write::DirtyDecay(0, 200),
                Write::DirtyDecay(3, 200),
                Write::BackgroundThread(true),
            ]
        );
        assert!(ConfigChange::default().writes(&[0]).is_empty());
    }

    /// Records every event's fields as `name=value` lines.
    #[derive(Default, Clone)]
    struct Capture(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

    impl tracing::Subscriber for Capture {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            struct Fields(String);
            impl tracing::field::Visit for Fields {
                fn record_debug(
                    &mut self,
                    field: &tracing::field::Field,
                    value: &dyn std::fmt::Debug,
                ) {
                    self.0.push_str(&format!("{}={value:?} ", field.name()));
                }
            }
            let mut fields = Fields(format!("{} ", event.metadata().level()));
            event.record(&mut fields);
            self.0.lock().unwrap().push(fields.0.trim_end().to_owned());
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    #[test]
    fn each_changed_setting_is_logged_with_old_and_new_values() {
        let before = JemallocConfig {
            background_thread: false,
            max_background_threads: 2,
            dirty_decay_ms: 10_000,
            muzzy_decay_ms: 0,
            arenas_differing: Vec::new(),
        };
        let after = JemallocConfig {
            background_thread: true,
            dirty_decay_ms: 200,
            ..before.clone()
        };
        let capture = Capture::default();
        tracing::subscriber::with_default(capture.clone(), || log(&before, &after));
        assert_eq!(
            *capture.0.lock().unwrap(),
            [
                "INFO message=tower-jemalloc: jemalloc setting changed setting=\"background_thread\" old=false new=true",
                "INFO message=tower-jemalloc: jemalloc setting changed setting=\"dirty_decay_ms\" old=10000 new=200",
            ]
        );
    }

    #[test]
    fn config_json_has_its_documented_shape() {
        let config = JemallocConfig {
            background_thread: false,
            max_background_threads: 2,
            dirty_decay_ms: 10_000,
            muzzy_decay_ms: 0,
            arenas_differing: vec![ArenaDecay {
                arena: 2,
                dirty_decay_ms: 0,
                muzzy_decay_ms: 0,
            }],
        };
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(
            json,
            r#"{"background_thread":false,"max_background_threads":2,"dirty_decay_ms":10000,"muzzy_decay_ms":0,"arenas_differing":[{"arena":2,"dirty_decay_ms":0,"muzzy_decay_ms":0}]}"#
        );
        assert_eq!(
            serde_json::from_str::<JemallocConfig>(&json).unwrap(),
            config
        );
    }
}
