//! [`Sleep`]: a future that ends at a deadline, on any executor.
//!
//! The deadlines of waiting requests cannot use tokio's timer: a runtime built without
//! `enable_time` panics on it, and the layer also answers outside tokio. One process-wide
//! thread (`jemalloc-deadline`, started by the first sleep that has to wait, parked while no
//! sleep is pending) wakes each sleep when its deadline passes. Waking a task is all it does,
//! so it never runs the layer's or the application's work.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

/// The name of the timer thread.
const THREAD: &str = "jemalloc-deadline";

/// The one timer of the process.
struct Timer {
    queue: Mutex<Queue>,
    /// Signalled when a sleep ends before the timer thread's planned wake-up.
    sooner: Condvar,
}

/// The pending sleeps.
struct Queue {
    /// The waker of each pending sleep, by deadline; the number tells apart sleeps with the
    /// same deadline.
    wakers: BTreeMap<(Instant, u64), Waker>,
    /// The number the next sleep gets.
    next: u64,
    /// Whether the timer thread runs.
    running: bool,
    /// When the timer thread plans to wake up (`None`: not before it is signalled). Sleeps
    /// that end later need not signal it: under a stream of scrapes, each with a deadline
    /// later than the one before, it wakes once per deadline rather than once per scrape.
    wakes_at: Option<Instant>,
}

static TIMER: Timer = Timer {
    queue: Mutex::new(Queue {
        wakers: BTreeMap::new(),
        next: 0,
        running: false,
        wakes_at: None,
    }),
    sooner: Condvar::new(),
};

impl Timer {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Ends at its deadline; `Err` when the timer thread cannot be started (the operating
/// system's thread limit), since waiting without a deadline is not an option.
#[derive(Debug)]
pub(crate) struct Sleep {
    at: Instant,
    /// Its place in the queue, once it waits.
    key: Option<(Instant, u64)>,
}

impl Sleep {
    /// A sleep that ends at `at`.
    pub(crate) fn until(at: Instant) -> Self {
        Self { at, key: None }
    }
}

impl Future for Sleep {
    type Output = Result<(), String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if Instant::now() >= self.at {
            return Poll::Ready(Ok(()));
        }
        let mut queue = TIMER.lock();
        if !queue.running {
            std::thread::Builder::new()
                .name(THREAD.to_owned())
                .spawn(run)
                .map_err(|e| format!("cannot start the {THREAD} thread: {e}"))?;
            queue.running = true;
        }
        // Fired sleeps have left the queue: a sleep polled again before its deadline (woken
        // by something else) takes a place again.
        if let Some(waker) = self.key.and_then(|key| queue.wakers.get_mut(&key)) {
            waker.clone_from(cx.waker());
            return Poll::Pending;
        }
        let key = (self.at, queue.next);
        queue.next += 1;
        queue.wakers.insert(key, cx.waker().clone());
        self.key = Some(key);
        // The thread looks at the queue again whenever it is not parked, so a signal only
        // matters while it is parked past this deadline.
        if queue.wakes_at.is_none_or(|wakes| self.at < wakes) {
            TIMER.sooner.notify_one();
        }
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            TIMER.lock().wakers.remove(&key);
        }
    }
}

/// The timer thread: wakes every sleep whose deadline has passed, then parks until the next
/// deadline or a sooner sleep.
fn run() {
    /// Lets the next sleep start a new thread if this one ends (a waker that panicked).
    struct Stopped;
    impl Drop for Stopped {
        fn drop(&mut self) {
            let mut queue = TIMER.lock();
            queue.running = false;
            queue.wakes_at = None;
        }
    }
    let _stopped = Stopped;
    let mut queue = TIMER.lock();
    loop {
        let now = Instant::now();
        let mut due = Vec::new();
        while let Some(entry) = queue.wakers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            due.push(entry.remove());
        }
        if !due.is_empty() {
            // Wake outside the lock: a waker may poll (and so lock the queue) at once.
            drop(queue);
            due.into_iter().for_each(Waker::wake);
            queue = TIMER.lock();
            continue;
        }
        queue.wakes_at = queue.wakers.first_key_value().map(|(&(at, _), _)| at);
        queue = match queue.wakes_at {
            None => TIMER.sooner.wait(queue).unwrap_or_else(|e| e.into_inner()),
            Some(at) => {
                let wait = at.saturating_duration_since(now);
                TIMER
                    .sooner
                    .wait_timeout(queue, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pending(key: Option<(Instant, u64)>) -> bool {
        key.is_some_and(|key| TIMER.lock().wakers.contains_key(&key))
    }

    #[tokio::test]
    async fn sleeps_end_at_their_deadline_in_any_order() {
        let start = Instant::now();
        let late = Sleep::until(start + Duration::from_millis(300));
        let early = Sleep::until(start + Duration::from_millis(50));
        let (late, early) = tokio::join!(
            async {
                late.await.unwrap();
                Instant::now()
            },
            async {
                early.await.unwrap();
                Instant::now()
            }
        );
        assert!(early >= start + Duration::from_millis(50));
        assert!(late >= start + Duration::from_millis(300));
        assert!(early < late);
        // A deadline already past ends at once, without the timer.
        Sleep::until(start).await.unwrap();
    }

    #[tokio::test]
    async fn a_dropped_sleep_leaves_the_queue() {
        let mut sleep = Sleep::until(Instant::now() + Duration::from_secs(3600));
        let polled = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut sleep).poll(cx))).await;
        assert!(polled.is_pending());
        let key = sleep.key;
        assert!(pending(key));
        drop(sleep);
        assert!(!pending(key));
    }
}
