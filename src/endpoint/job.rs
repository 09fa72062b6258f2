//! Running an endpoint's blocking work (a render, a purge, a dump) off the async workers, and
//! sharing one job between the requests that wait for it.
//!
//! - [`Job`]: a receiver for a job's result, plus anything the request holds until it is
//!   answered (a slot of an in-flight limit).
//! - [`Runner`]: where the work runs: always a thread of its own, never tokio's shared blocking
//!   pool, so that a render never waits behind dumps or purges (or the application's own
//!   blocking tasks). Since every kind of job runs one at a time ([`Flight`], or the purge's
//!   process-wide slot), the layer never runs more than one thread per kind.
//! - [`Flight`]: at most one job of a kind at a time; requests that arrive while it runs join
//!   it, and a finished result may answer new requests for a reuse window.

use super::response::{self, Answer, Reply};
use http::StatusCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Where a job's work runs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Runner {
    /// Off the async workers: a new thread with this name when called from inside a tokio
    /// runtime, inline outside one (a caller without a runtime has no async workers to
    /// protect, and the answer is ready when `call` returns).
    OffWorkers(&'static str),
    /// A new thread with this name, whatever the caller (work that must never run on the
    /// caller's thread, such as a purge).
    NewThread(&'static str),
}

/// Where a job's result arrives: `None` until it is published.
type Outcome<T> = watch::Receiver<Option<Arc<T>>>;

/// A started (or joined) job: its result, when it comes.
pub(crate) struct Job<T> {
    result: Outcome<T>,
    /// Held until the request is answered.
    hold: Option<Box<dyn Send>>,
}

impl<T: Send + Sync + 'static> Job<T> {
    /// Runs `work` on `runner` and returns its job, or a 500 when no thread can be started.
    pub(crate) fn spawn(
        runner: Runner,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<Self, Answer> {
        let (sender, result) = watch::channel(None);
        run(runner, move || {
            sender.send_replace(Some(Arc::new(work())));
        })?;
        Ok(Self::watching(result))
    }

    /// The job whose result `result` will receive.
    fn watching(result: Outcome<T>) -> Self {
        Self { result, hold: None }
    }

    /// A job whose result is already known.
    fn done(result: Arc<T>) -> Self {
        Self::watching(watch::channel(Some(result)).1)
    }

    /// Keeps `value` alive until the request is answered.
    pub(crate) fn holding(mut self, value: impl Send + 'static) -> Self {
        self.hold = Some(Box::new(value));
        self
    }

    /// The reply: at once when the result is there, otherwise when it comes. A job that ends
    /// without a result (its work panicked, or was dropped unrun) is answered with a 500
    /// naming `endpoint`.
    pub(crate) fn reply(
        self,
        endpoint: &'static str,
        answer: impl FnOnce(&T) -> Answer + Send + 'static,
    ) -> Reply {
        let Self { mut result, hold } = self;
        let ready = result.borrow_and_update().clone();
        if let Some(output) = ready {
            return Reply::Now(answer(&output));
        }
        Reply::Later(Box::pin(async move {
            let _hold = hold;
            let output = match result.wait_for(Option::is_some).await {
                Ok(output) => output.clone(),
                Err(_) => None,
            };
            match output {
                Some(output) => answer(&output),
                None => response::text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format_args!("the {endpoint} job ended without a result"),
                ),
            }
        }))
    }
}

/// Runs `work` where `runner` says; a 500 when a thread cannot be started (the work is
/// dropped unrun).
fn run(runner: Runner, work: impl FnOnce() + Send + 'static) -> Result<(), Answer> {
    let name = match runner {
        Runner::OffWorkers(_) if tokio::runtime::Handle::try_current().is_err() => {
            work();
            return Ok(());
        }
        Runner::OffWorkers(name) | Runner::NewThread(name) => name,
    };
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(work)
        .map(drop)
        .map_err(|e| {
            response::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format_args!("cannot start the {name} thread: {e}"),
            )
        })
}

/// At most one job of a kind at a time: requests that arrive while it runs join it.
#[derive(Debug)]
pub(crate) struct Flight<T> {
    state: Mutex<FlightState<T>>,
    /// A result that finished less than this long ago answers new requests too.
    reuse_window: Duration,
}

#[derive(Debug)]
struct FlightState<T> {
    /// Counts the jobs started, so a finished job only clears its own entry.
    generation: u64,
    /// The job in progress, if any.
    running: Option<Outcome<T>>,
    /// The last result and when it finished, kept only with a reuse window.
    last: Option<(Instant, Arc<T>)>,
}

impl<T: Send + Sync + 'static> Flight<T> {
    pub(crate) fn new(reuse_window: Duration) -> Self {
        Self {
            state: Mutex::new(FlightState {
                generation: 0,
                running: None,
                last: None,
            }),
            reuse_window,
        }
    }

    /// Joins the job in progress, or answers from a result within the reuse window, or starts
    /// `work` on `runner`. A request never gets a result that finished before it arrived,
    /// unless a reuse window allows it.
    pub(crate) fn join_or_start(
        self: &Arc<Self>,
        runner: Runner,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<Job<T>, Answer> {
        let (sender, generation) = {
            let mut state = self.lock();
            if let Some(running) = &state.running {
                return Ok(Job::watching(running.clone()));
            }
            if let Some((finished, result)) = &state.last {
                if finished.elapsed() < self.reuse_window {
                    return Ok(Job::done(Arc::clone(result)));
                }
            }
            let (sender, receiver) = watch::channel(None);
            state.generation += 1;
            state.running = Some(receiver);
            (sender, state.generation)
        };
        let result = sender.subscribe();
        // Clears the entry however the job ends: published, panicked, or dropped unrun (a
        // runtime shutting down), so that the next request starts afresh.
        let landing = Landing {
            flight: Arc::clone(self),
            generation,
        };
        run(runner, move || {
            let output = Arc::new(work());
            // Stop accepting joiners before publishing: a request that arrives once the job
            // is finished must not get a result that finished before it arrived.
            landing.land(Some(&output));
            sender.send_replace(Some(output));
        })?;
        Ok(Job::watching(result))
    }

    /// The job in progress, or a result within the reuse window, without starting anything.
    pub(crate) fn peek(&self) -> Option<Job<T>> {
        let state = self.lock();
        if let Some(running) = &state.running {
            return Some(Job::watching(running.clone()));
        }
        let (finished, result) = state.last.as_ref()?;
        (finished.elapsed() < self.reuse_window).then(|| Job::done(Arc::clone(result)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FlightState<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Takes a finished (or abandoned) job out of its flight.
struct Landing<T: Send + Sync + 'static> {
    flight: Arc<Flight<T>>,
    generation: u64,
}

impl<T: Send + Sync + 'static> Landing<T> {
    fn land(&self, output: Option<&Arc<T>>) {
        let mut state = self.flight.lock();
        if state.generation == self.generation && state.running.is_some() {
            state.running = None;
            if let Some(output) = output.filter(|_| !self.flight.reuse_window.is_zero()) {
                state.last = Some((Instant::now(), Arc::clone(output)));
            }
        }
    }
}

impl<T: Send + Sync + 'static> Drop for Landing<T> {
    fn drop(&mut self) {
        self.land(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn value<T: Clone>(job: &Job<T>) -> Option<T> {
        job.result.borrow().as_deref().cloned()
    }

    #[test]
    fn outside_a_runtime_work_runs_inline() {
        let job = Job::spawn(Runner::OffWorkers("test-job"), || 7).unwrap();
        assert_eq!(value(&job), Some(7));
    }

    #[tokio::test]
    async fn a_dropped_job_frees_its_flight() {
        let flight = Arc::new(Flight::new(Duration::ZERO));
        let panicking = flight
            .join_or_start(Runner::NewThread("test-job"), || -> u32 {
                panic!("the work panics")
            })
            .unwrap();
        let Reply::Later(answer) = panicking.reply("test", |_| unreachable!()) else {
            panic!("the job cannot be done yet");
        };
        assert_eq!(answer.await.status(), StatusCode::INTERNAL_SERVER_ERROR);
        // The next request starts a new job instead of waiting on the dead one.
        let next = flight
            .join_or_start(Runner::NewThread("test-job"), || 5)
            .unwrap();
        let Reply::Later(answer) = next.reply("test", |v| response::text(StatusCode::OK, v)) else {
            panic!("still running");
        };
        assert_eq!(answer.await.status(), StatusCode::OK);
    }

    #[test]
    fn joiners_share_one_job_and_the_window_reuses_it() {
        let runs = Arc::new(AtomicUsize::new(0));
        let flight = Arc::new(Flight::new(Duration::from_secs(60)));
        let start = |flight: &Arc<Flight<usize>>| {
            let runs = Arc::clone(&runs);
            flight
                .join_or_start(Runner::OffWorkers("test-job"), move || {
                    runs.fetch_add(1, Ordering::SeqCst) + 1
                })
                .unwrap()
        };
        assert_eq!(value(&start(&flight)), Some(1));
        // Inside the window: the same result, no new run.
        assert_eq!(value(&start(&flight)), Some(1));
        assert_eq!(runs.load(Ordering::SeqCst), 1);

        let no_window = Arc::new(Flight::new(Duration::ZERO));
        assert_eq!(value(&start(&no_window)), Some(2));
        assert_eq!(value(&start(&no_window)), Some(3));
        assert!(no_window.peek().is_none(), "nothing running, nothing kept");
        assert_eq!(flight.peek().as_ref().and_then(value), Some(1));
    }
}
