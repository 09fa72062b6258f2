//! [`History`]: the process's memory over the last few minutes, for the page's chart: one
//! [`Sample`] of jemalloc's `resident` and `dirty`, the process's RSS and the memory limit
//! every [`INTERVAL`], the last [`CAPACITY`] of them kept in a ring.
//!
//! One history per process, like the governor: made by the first layer that serves the page
//! (when jemalloc is usable), shared by the others, with a first sample taken as it is made.
//! One thread, `jemalloc-history`, takes the next ones; it holds the history weakly and stops as soon as the last layer holding it is
//! dropped (that layer's drop wakes it).
//!
//! # Cost
//!
//! - **Memory:** [`CAPACITY`] samples of 40 bytes, 7,200 bytes in one allocation made once,
//!   plus the thread's stack (it allocates nothing per sample).
//! - **CPU:** every [`INTERVAL`], one `epoch` advance and the figures' mallctl reads (the same
//!   work as a `/metrics` scrape's jemalloc part), one read of `/proc/self/statm`, and one of
//!   the cgroup's `memory.max` when no limit is set on the governor: tens of microseconds
//!   every 2 s, about 0.001 % of one core.
//!
//! It never waits on the application: it reads jemalloc and `/proc`, and takes its own lock
//! for a few nanoseconds to push a sample. Knows nothing of HTTP.

use crate::governor::Governor;
use crate::system::{CgroupMemory, ProcessUsage};
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Time between two samples.
pub(crate) const INTERVAL: Duration = Duration::from_secs(2);

/// Samples kept: 6 minutes at one every [`INTERVAL`].
pub(crate) const CAPACITY: usize = 180;

/// The name of the sampling thread.
const THREAD: &str = "jemalloc-history";

/// One moment of the process's memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct Sample {
    /// When, in milliseconds since the Unix epoch.
    pub(crate) at_ms: u64,
    /// jemalloc's `stats.resident`.
    pub(crate) resident: u64,
    /// jemalloc's unused dirty pages.
    pub(crate) dirty: u64,
    /// The process's resident set size; 0 when not known.
    pub(crate) rss: u64,
    /// The memory limit: the governor's if set, else the cgroup's; 0 when there is none.
    pub(crate) limit: u64,
}

impl Sample {
    /// Reads one sample now; `None` when jemalloc's figures cannot be read.
    pub(crate) fn read(governor: &Governor) -> Option<Self> {
        let stats = crate::jemalloc::ctl::ctl().ok()?.snapshot().ok()?;
        Some(Self {
            at_ms: now_ms(),
            resident: stats.resident,
            dirty: stats.dirty,
            rss: ProcessUsage::read().map_or(0, |usage| usage.resident),
            limit: limit(governor).unwrap_or(0),
        })
    }
}

/// The memory limit the page shows: the governor's when one is set, else the cgroup's.
pub(crate) fn limit(governor: &Governor) -> Option<u64> {
    governor
        .status()
        .limit()
        .or_else(|| CgroupMemory::read()?.max)
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// The process's recent memory, shared by every layer that serves the page.
#[derive(Debug)]
pub(crate) struct History {
    samples: Mutex<VecDeque<Sample>>,
    governor: Arc<Governor>,
    /// Tells the thread to stop (set when the history is dropped).
    stop: Arc<Stop>,
}

#[derive(Debug, Default)]
struct Stop {
    stopped: Mutex<bool>,
    wake: Condvar,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The process's history while some layer holds it.
static PROCESS: Mutex<Weak<History>> = Mutex::new(Weak::new());

impl History {
    /// The process's history: the one other layers hold, or a new one with its thread (which
    /// takes a first sample at once). `None` when the thread cannot be started.
    pub(crate) fn process(governor: &Arc<Governor>) -> Option<Arc<Self>> {
        let mut process = lock(&PROCESS);
        if let Some(history) = process.upgrade() {
            return Some(history);
        }
        let history = Arc::new(Self {
            samples: Mutex::new(VecDeque::with_capacity(CAPACITY)),
            governor: Arc::clone(governor),
            stop: Arc::default(),
        });
        // The first sample now, so that a page served at once has one.
        if let Some(sample) = Sample::read(governor) {
            history.push(sample);
        }
        let (weak, stop) = (Arc::downgrade(&history), Arc::clone(&history.stop));
        std::thread::Builder::new()
            .name(THREAD.to_owned())
            .spawn(move || run(&weak, &stop))
            .map_err(|e| tracing::warn!("cannot start the {THREAD} thread: {e}"))
            .ok()?;
        *process = Arc::downgrade(&history);
        Some(history)
    }

    /// The samples kept, oldest first.
    pub(crate) fn samples(&self) -> Vec<Sample> {
        lock(&self.samples).iter().copied().collect()
    }

    fn push(&self, sample: Sample) {
        let mut samples = lock(&self.samples);
        if samples.len() == CAPACITY {
            samples.pop_front();
        }
        samples.push_back(sample);
    }
}

impl Drop for History {
    fn drop(&mut self) {
        *lock(&self.stop.stopped) = true;
        self.stop.wake.notify_all();
    }
}

/// The sampling thread: a wait of [`INTERVAL`], then a sample, until the history is dropped.
fn run(history: &Weak<History>, stop: &Stop) {
    loop {
        {
            let stopped = lock(&stop.stopped);
            let (stopped, _) = stop
                .wake
                .wait_timeout_while(stopped, INTERVAL, |stopped| !*stopped)
                .unwrap_or_else(PoisonError::into_inner);
            if *stopped {
                return;
            }
        }
        let Some(history) = history.upgrade() else {
            return;
        };
        if let Some(sample) = Sample::read(&history.governor) {
            history.push(sample);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_ms: u64) -> Sample {
        Sample {
            at_ms,
            resident: 1,
            dirty: 2,
            rss: 3,
            limit: 0,
        }
    }

    /// A history without samples and without its thread.
    fn empty() -> History {
        History {
            samples: Mutex::new(VecDeque::new()),
            governor: Governor::process(),
            stop: Arc::default(),
        }
    }

    #[test]
    fn the_ring_keeps_the_last_samples() {
        let history = empty();
        for at in 0..CAPACITY as u64 + 5 {
            history.push(sample(at));
        }
        let samples = history.samples();
        assert_eq!(samples.len(), CAPACITY);
        assert_eq!(samples[0].at_ms, 5);
        assert_eq!(samples[CAPACITY - 1].at_ms, CAPACITY as u64 + 4);
        assert_eq!(std::mem::size_of::<Sample>(), 40);
    }

    #[test]
    fn dropping_the_history_stops_its_thread() {
        let history = empty();
        let stop = Arc::clone(&history.stop);
        let weak = Arc::downgrade(&Arc::new(history));
        // The history is gone: the thread returns at once instead of waiting.
        run(&weak, &stop);
        assert!(*lock(&stop.stopped));
    }
}
