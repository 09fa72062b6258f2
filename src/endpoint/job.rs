//! Running an endpoint's blocking work (a render, a purge, a dump) off the async workers,
//! sharing one job between the requests that wait for it, and bounding every wait.
//!
//! - [`Job`]: one request's wait for a job's result, plus anything the request holds until it
//!   is answered (a slot of an in-flight limit).
//! - [`Runner`]: where the work of one [`JobKind`] runs: always a thread of its own, never
//!   tokio's shared blocking pool, so that a render never waits behind dumps or purges (or the
//!   application's own blocking tasks). Since every kind of job runs one at a time
//!   ([`Flight`], or the endpoint's own slot: the purge's process-wide guard, the growth
//!   window's slot), the layer never runs more than one thread per kind.
//! - [`Flight`]: at most one job of a kind at a time; requests that arrive while it runs join
//!   it, and a finished result may answer new requests for a reuse window.
//!
//! # Deadlines
//!
//! No request waits for ever. Each waits at most its deadline: the runner's (the builder's
//! [`job_deadline`](crate::JemallocLayerBuilder::job_deadline), default 30 s; a purge at least
//! 5 minutes), or what its endpoint sets ([`Job::waiting_at_most`]: `/metrics` from
//! Prometheus' scrape timeout; [`Job::waiting_longer`]: a heap growth window adds its length).
//! Past it the request gets a 503 with `Retry-After: 5` and a reason naming the job and how
//! long it has run. The job itself cannot be stopped (an observable callback blocked on a
//! lock, a dump under jemalloc's locks): it runs on, keeps its place in its [`Flight`] or its
//! slot, so that later requests join it (and time out in turn) instead of starting a second
//! thread of the same kind, and it is **stuck** until it ends. Stuck jobs are counted by
//! [`JobTelemetry`] and logged once each. A job ends (no longer stuck, its slot free) before
//! its result is published. Deadlines are kept by one process-wide thread (`super::timer`),
//! whatever the executor.
//!
//! A job that runs inline (the [`Runner`] of a kind that runs off the workers, called outside
//! a tokio runtime: there are no async workers to protect) has answered before the request
//! could wait: no deadline applies to it.
//!
//! # Abandoned jobs
//!
//! A job started with [`Job::spawn_for_waiters`] (a heap growth window, which mostly waits)
//! sees its waiters through [`Waiters`]: when the last one leaves (its response future is
//! dropped: the client hung up) before any timed out, the job's slot is freed at once and the
//! work can stop at its next step. A job some waiter timed out on keeps its slot until it
//! ends: it may be stuck, and a second one of its kind must not start beside it.

use super::response::{self, Answer, Reply};
use super::timer::Sleep;
use http::StatusCode;
use opentelemetry::metrics::{Counter, Meter, UpDownCounter};
use opentelemetry::KeyValue;
use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The least a request waits for a purge, whatever the configured deadline: returning the
/// dirty pages of hundreds of GiB takes minutes, and the report is what the caller asked for.
pub(crate) const MIN_PURGE_DEADLINE: Duration = Duration::from_secs(300);

/// The `Retry-After` of a request whose job is past its deadline. The job is likely stuck, so
/// a retry at once would only time out again; one in a few seconds finds it finished if it was
/// merely slow.
const STUCK_RETRY_AFTER: Duration = Duration::from_secs(5);

/// What a job is: its thread's name, its `job` attribute in the layer's telemetry, and its
/// name in the 503 of a request that waited for it too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobKind {
    /// Gathering and encoding the registry for `/metrics`.
    Render,
    /// A `malloc_stats_print` dump.
    StatsDump,
    /// Reading jemalloc's tuning.
    ConfigRead,
    /// Changing jemalloc's tuning.
    ConfigChange,
    /// A live heap profile.
    HeapProfile,
    /// A heap growth window (`?seconds=N`).
    HeapGrowth,
    /// A purge.
    Purge,
    /// Reading the figures for the page.
    PageRead,
}

impl JobKind {
    /// Every kind, in the order of the `job` attribute's values in the docs.
    #[cfg(test)]
    const ALL: [Self; 8] = [
        Self::Render,
        Self::StatsDump,
        Self::ConfigRead,
        Self::ConfigChange,
        Self::HeapProfile,
        Self::HeapGrowth,
        Self::Purge,
        Self::PageRead,
    ];

    /// Its `job` attribute.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Render => "metrics_render",
            Self::StatsDump => "stats_dump",
            Self::ConfigRead => "config_read",
            Self::ConfigChange => "config_change",
            Self::HeapProfile => "heap_profile",
            Self::HeapGrowth => "heap_growth",
            Self::Purge => "purge",
            Self::PageRead => "page_read",
        }
    }

    /// What it is, in a sentence.
    fn what(self) -> &'static str {
        match self {
            Self::Render => "the metrics render",
            Self::StatsDump => "the stats dump",
            Self::ConfigRead => "the config read",
            Self::ConfigChange => "the config change",
            Self::HeapProfile => "the heap profile",
            Self::HeapGrowth => "the heap growth window",
            Self::Purge => "the purge",
            Self::PageRead => "the page's read",
        }
    }

    /// The name of its thread (Linux shows the first 15 bytes).
    fn thread(self) -> &'static str {
        match self {
            Self::Render => "jemalloc-metrics",
            Self::StatsDump => "jemalloc-stats",
            Self::ConfigRead | Self::ConfigChange => "jemalloc-config",
            Self::HeapProfile => "jemalloc-heap-profile",
            Self::HeapGrowth => "jemalloc-heap-growth",
            Self::Purge => "jemalloc-purge",
            Self::PageRead => "jemalloc-page",
        }
    }

    /// Whether it runs inline when called outside a tokio runtime (a caller without a runtime
    /// has no async workers to protect, and the answer is ready when `call` returns). A purge
    /// or a config change never runs on the caller's thread.
    fn inline_outside_runtime(self) -> bool {
        !matches!(self, Self::Purge | Self::ConfigChange)
    }

    /// How long a request waits for it by default, given the configured deadline.
    fn deadline(self, configured: Duration) -> Duration {
        match self {
            Self::Purge => configured.max(MIN_PURGE_DEADLINE),
            _ => configured,
        }
    }
}

/// Where the jobs of one kind run, and how long a request waits for them by default.
#[derive(Debug, Clone)]
pub(crate) struct Runner {
    kind: JobKind,
    deadline: Duration,
    telemetry: JobTelemetry,
}

impl Runner {
    /// The runner of `kind`, `configured` being the layer's job deadline; its telemetry series
    /// start at 0.
    pub(crate) fn new(kind: JobKind, configured: Duration, telemetry: &JobTelemetry) -> Self {
        telemetry.start(kind);
        Self {
            kind,
            deadline: kind.deadline(configured),
            telemetry: telemetry.clone(),
        }
    }

    /// Runs `work`, which ends the job however it ends (published, panicked, dropped unrun);
    /// a 500 when a thread cannot be started (the work is dropped unrun).
    fn run(&self, work: impl FnOnce() + Send + 'static) -> Result<(), Answer> {
        let name = self.kind.thread();
        if self.kind.inline_outside_runtime() && tokio::runtime::Handle::try_current().is_err() {
            work();
            return Ok(());
        }
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
}

/// Where a job's result arrives: `None` until it is published.
type Outcome<T> = watch::Receiver<Option<Arc<T>>>;

/// What a job's waiters and its work share.
struct Record {
    kind: JobKind,
    started: Instant,
    state: Mutex<RecordState>,
    /// Signalled when the last waiter leaves.
    left: Condvar,
    telemetry: JobTelemetry,
}

struct RecordState {
    /// The requests waiting for the result.
    waiters: usize,
    /// A waiter's deadline passed before the job ended.
    stuck: bool,
    ended: bool,
    /// Freed when the last waiter leaves (unless the job is stuck), or when the job ends.
    slot: Option<Box<dyn Send>>,
}

impl Record {
    /// The record of a job of `runner` starting now, with its first waiter.
    fn start(runner: &Runner, slot: Option<Box<dyn Send>>) -> (Arc<Self>, Waiter) {
        let record = Arc::new(Self {
            kind: runner.kind,
            started: Instant::now(),
            state: Mutex::new(RecordState {
                waiters: 1,
                stuck: false,
                ended: false,
                slot,
            }),
            left: Condvar::new(),
            telemetry: runner.telemetry.clone(),
        });
        (Arc::clone(&record), Waiter(record))
    }

    fn lock(&self) -> MutexGuard<'_, RecordState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One more waiter.
    fn waiter(self: &Arc<Self>) -> Waiter {
        self.lock().waiters += 1;
        Waiter(Arc::clone(self))
    }

    /// A waiter's deadline (`waited`) passed: the job is stuck. The 503 it gets.
    fn missed(&self, waited: Duration) -> Answer {
        let ran = self.started.elapsed();
        let first = {
            let mut state = self.lock();
            let first = !state.stuck && !state.ended;
            state.stuck |= first;
            first
        };
        let job = KeyValue::new("job", self.kind.name());
        if first {
            self.telemetry.stuck.add(1, std::slice::from_ref(&job));
            tracing::warn!(
                "tower-jemalloc: {} has run for {:.1} s, past the {:.1} s a request waited for \
                 it; it keeps its thread until it ends, and later requests join it rather than \
                 start another",
                self.kind.what(),
                ran.as_secs_f64(),
                waited.as_secs_f64(),
            );
        }
        self.telemetry.timeouts.add(1, &[job]);
        response::retry_after(
            StatusCode::SERVICE_UNAVAILABLE,
            STUCK_RETRY_AFTER,
            format_args!(
                "{} has run for {:.1} s and is not finished after this request waited {:.1} s; \
                 requests join it rather than start another, retry later",
                self.kind.what(),
                ran.as_secs_f64(),
                waited.as_secs_f64(),
            ),
        )
    }

    /// The job ended, however: it is no longer stuck, and its slot is free.
    fn end(&self) {
        let slot = {
            let mut state = self.lock();
            state.ended = true;
            if std::mem::take(&mut state.stuck) {
                let job = KeyValue::new("job", self.kind.name());
                self.telemetry.stuck.add(-1, &[job]);
            }
            state.slot.take()
        };
        drop(slot);
    }
}

/// A request waiting for a job; leaves when dropped.
struct Waiter(Arc<Record>);

impl Drop for Waiter {
    fn drop(&mut self) {
        let slot = {
            let mut state = self.0.lock();
            state.waiters -= 1;
            if state.waiters > 0 {
                return;
            }
            self.0.left.notify_all();
            // A stuck job keeps its slot until it ends: its kind must not start again beside
            // it.
            if state.stuck {
                None
            } else {
                state.slot.take()
            }
        };
        drop(slot);
    }
}

/// Ends its job when dropped: when the work returns, panics, or is dropped unrun.
struct Ending(Arc<Record>);

impl Drop for Ending {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// What the work of a [`Job::spawn_for_waiters`] job sees of the requests waiting for it.
pub(crate) struct Waiters(Arc<Record>);

impl Waiters {
    /// Waits for `duration`, or less if the last waiter leaves first: `true` when someone
    /// still waits for the job.
    pub(crate) fn wait(&self, duration: Duration) -> bool {
        let state = self.0.lock();
        let (state, _) = self
            .0
            .left
            .wait_timeout_while(state, duration, |state| state.waiters > 0)
            .unwrap_or_else(|e| e.into_inner());
        state.waiters > 0
    }
}

/// A started (or joined) job, as one request waits for it.
pub(crate) struct Job<T> {
    result: Outcome<T>,
    /// This request among the job's waiters; `None` for a result known at once.
    waiter: Option<Waiter>,
    /// How long this request waits for the result.
    deadline: Duration,
    /// Held until the request is answered.
    hold: Option<Box<dyn Send>>,
}

impl<T: Send + Sync + 'static> Job<T> {
    /// Runs `work` on `runner` and returns its job, or a 500 when no thread can be started.
    pub(crate) fn spawn(
        runner: &Runner,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<Self, Answer> {
        Self::start(runner, None, |_| work())
    }

    /// Runs `work` on `runner` and returns its job; `slot` is freed when the job's last waiter
    /// leaves, or when it ends if a waiter timed out, and `work` sees through [`Waiters`]
    /// whether anyone still waits.
    pub(crate) fn spawn_for_waiters(
        runner: &Runner,
        slot: impl Send + 'static,
        work: impl FnOnce(&Waiters) -> T + Send + 'static,
    ) -> Result<Self, Answer> {
        Self::start(runner, Some(Box::new(slot)), work)
    }

    fn start(
        runner: &Runner,
        slot: Option<Box<dyn Send>>,
        work: impl FnOnce(&Waiters) -> T + Send + 'static,
    ) -> Result<Self, Answer> {
        let (sender, result) = watch::channel(None);
        let (record, waiter) = Record::start(runner, slot);
        let ending = Ending(Arc::clone(&record));
        runner.run(move || {
            let output = Arc::new(work(&Waiters(record)));
            // Ended (no longer stuck, slot free) before anyone sees the result.
            drop(ending);
            sender.send_replace(Some(output));
        })?;
        Ok(Self::watching(result, waiter, runner.deadline))
    }

    /// The job whose result `result` will receive, waited for by `waiter`.
    fn watching(result: Outcome<T>, waiter: Waiter, deadline: Duration) -> Self {
        Self {
            result,
            waiter: Some(waiter),
            deadline,
            hold: None,
        }
    }

    /// A job whose result is already known.
    fn done(result: Arc<T>) -> Self {
        Self {
            result: watch::channel(Some(result)).1,
            waiter: None,
            deadline: Duration::ZERO,
            hold: None,
        }
    }

    /// Keeps `value` alive until the request is answered.
    pub(crate) fn holding(mut self, value: impl Send + 'static) -> Self {
        self.hold = Some(Box::new(value));
        self
    }

    /// Waits at most `deadline` (instead of the runner's).
    pub(crate) fn waiting_at_most(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Waits `extra` longer than it would (a heap growth window's length).
    pub(crate) fn waiting_longer(mut self, extra: Duration) -> Self {
        self.deadline = self.deadline.saturating_add(extra);
        self
    }

    /// The reply: at once when the result is there, otherwise when it comes, or a 503 when the
    /// deadline passes first. A job that ends without a result (its work panicked, or was
    /// dropped unrun) is answered with a 500 naming `endpoint`.
    pub(crate) fn reply(
        self,
        endpoint: &'static str,
        answer: impl FnOnce(&T) -> Answer + Send + 'static,
    ) -> Reply {
        let Self {
            mut result,
            waiter,
            deadline,
            hold,
        } = self;
        let ready = result.borrow_and_update().clone();
        if let Some(output) = ready {
            return Reply::Now(answer(&output));
        }
        let ended = move || {
            response::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format_args!("the {endpoint} job ended without a result"),
            )
        };
        let Some(waiter) = waiter else {
            // Only a finished job has no waiter, and its result is there.
            return Reply::Now(ended());
        };
        // A deadline beyond what `Instant` can hold is a year: no request lives that long.
        let asked = Instant::now();
        let at = asked
            .checked_add(deadline)
            .unwrap_or_else(|| asked + Duration::from_secs(365 * 24 * 3600));
        Reply::Later(Box::pin(async move {
            let _hold = hold;
            let mut sleep = pin!(Sleep::until(at));
            let mut published = pin!(result.wait_for(Option::is_some));
            let waited = std::future::poll_fn(|cx| {
                if let Poll::Ready(published) = published.as_mut().poll(cx) {
                    return Poll::Ready(Ok(published.ok().and_then(|output| output.clone())));
                }
                sleep.as_mut().poll(cx).map(Err)
            })
            .await;
            let answered = match waited {
                Ok(Some(output)) => answer(&output),
                Ok(None) => ended(),
                Err(Ok(())) => waiter.0.missed(asked.elapsed()),
                Err(Err(e)) => response::text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format_args!("cannot wait for {}: {e}", waiter.0.kind.what()),
                ),
            };
            drop(waiter);
            answered
        }))
    }
}

/// At most one job of a kind at a time: requests that arrive while it runs join it.
pub(crate) struct Flight<T> {
    state: Mutex<FlightState<T>>,
    runner: Runner,
    /// A result that finished less than this long ago answers new requests too.
    reuse_window: Duration,
}

struct FlightState<T> {
    /// Counts the jobs started, so a finished job only clears its own entry.
    generation: u64,
    /// The job in progress, if any. A stuck job keeps it, so that requests join it rather
    /// than start a second thread of its kind.
    running: Option<(Outcome<T>, Arc<Record>)>,
    /// The last result and when it finished, kept only with a reuse window.
    last: Option<(Instant, Arc<T>)>,
}

impl<T: Send + Sync + 'static> Flight<T> {
    /// The flight of the jobs `runner` runs.
    pub(crate) fn new(runner: Runner, reuse_window: Duration) -> Self {
        Self {
            state: Mutex::new(FlightState {
                generation: 0,
                running: None,
                last: None,
            }),
            runner,
            reuse_window,
        }
    }

    /// Joins the job in progress, or answers from a result within the reuse window, or starts
    /// `work`. A request never gets a result that finished before it arrived, unless a reuse
    /// window allows it.
    pub(crate) fn join_or_start(
        self: &Arc<Self>,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<Job<T>, Answer> {
        let deadline = self.runner.deadline;
        let (sender, generation, record, waiter) = {
            let mut state = self.lock();
            if let Some(job) = self.joined(&state) {
                return Ok(job);
            }
            let (sender, receiver) = watch::channel(None);
            let (record, waiter) = Record::start(&self.runner, None);
            state.generation += 1;
            state.running = Some((receiver, Arc::clone(&record)));
            (sender, state.generation, record, waiter)
        };
        let result = sender.subscribe();
        // Clears the entry however the job ends: published, panicked, or dropped unrun (a
        // runtime shutting down), so that the next request starts afresh.
        let landing = Landing {
            flight: Arc::clone(self),
            generation,
            _ending: Ending(record),
        };
        self.runner.run(move || {
            let output = Arc::new(work());
            // Stop accepting joiners before publishing: a request that arrives once the job
            // is finished must not get a result that finished before it arrived. And end the
            // job (no longer stuck) before anyone sees the result.
            landing.land(Some(&output));
            drop(landing);
            sender.send_replace(Some(output));
        })?;
        Ok(Job::watching(result, waiter, deadline))
    }

    /// The job in progress, or a result within the reuse window, without starting anything.
    pub(crate) fn peek(&self) -> Option<Job<T>> {
        self.joined(&self.lock())
    }

    fn joined(&self, state: &FlightState<T>) -> Option<Job<T>> {
        if let Some((running, record)) = &state.running {
            let waiter = record.waiter();
            return Some(Job::watching(running.clone(), waiter, self.runner.deadline));
        }
        let (finished, result) = state.last.as_ref()?;
        (finished.elapsed() < self.reuse_window).then(|| Job::done(Arc::clone(result)))
    }

    fn lock(&self) -> MutexGuard<'_, FlightState<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T> std::fmt::Debug for Flight<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flight")
            .field("runner", &self.runner)
            .field("reuse_window", &self.reuse_window)
            .finish_non_exhaustive()
    }
}

/// Takes a finished (or abandoned) job out of its flight, and ends it.
struct Landing<T: Send + Sync + 'static> {
    flight: Arc<Flight<T>>,
    generation: u64,
    /// Ends the job, after the flight's entry is cleared (fields drop after `drop`).
    _ending: Ending,
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

/// The layer's telemetry of its jobs, through its meter:
///
/// - `jemalloc.layer.jobs.stuck` (an up-down counter, exported as the gauge
///   `…_jemalloc_layer_jobs_stuck{job}`): jobs running past the deadline of a request that
///   waited for them, until they end;
/// - `jemalloc.layer.jobs.timeouts` (a counter, `…_jemalloc_layer_jobs_timeouts_total{job}`):
///   requests answered 503 because their job was past their deadline.
///
/// `job` is one of `metrics_render`, `stats_dump`, `config_read`, `config_change`,
/// `heap_profile`, `heap_growth`, `purge`, `page_read`; each series is at 0 from the start. A stuck metrics
/// render cannot report itself (the render is what reports), and neither can any collection
/// of the same meter provider while an observable callback blocks: the timeouts counter tells
/// afterwards, and a warning is logged when a job first goes past a deadline.
#[derive(Debug, Clone)]
pub(crate) struct JobTelemetry {
    stuck: UpDownCounter<i64>,
    timeouts: Counter<u64>,
}

impl JobTelemetry {
    pub(crate) fn new(meter: &Meter) -> Self {
        Self {
            stuck: meter
                .i64_up_down_counter("jemalloc.layer.jobs.stuck")
                .with_unit("{job}")
                .with_description(
                    "Jobs of the layer (renders, dumps, purges) running past the deadline of a \
                     request that waited for them, by job",
                )
                .build(),
            timeouts: meter
                .u64_counter("jemalloc.layer.jobs.timeouts")
                .with_unit("{request}")
                .with_description(
                    "Requests answered 503 because the job they waited for was past their \
                     deadline, by job",
                )
                .build(),
        }
    }

    /// The series of `kind`, at 0.
    fn start(&self, kind: JobKind) {
        let job = [KeyValue::new("job", kind.name())];
        self.stuck.add(0, &job);
        self.timeouts.add(0, &job);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn value<T: Clone>(job: &Job<T>) -> Option<T> {
        job.result.borrow().as_deref().cloned()
    }

    /// A runner whose telemetry goes to `registry`, waiting `deadline`.
    fn runner(kind: JobKind, deadline: Duration) -> (Runner, prometheus::Registry) {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .build()
            .unwrap();
        let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
            .with_reader(exporter)
            .build();
        let meter = opentelemetry::metrics::MeterProvider::meter(&provider, "test");
        let telemetry = JobTelemetry::new(&meter);
        // The provider lives as long as its instruments need it in these tests.
        std::mem::forget(provider);
        (Runner::new(kind, deadline, &telemetry), registry)
    }

    /// The value of `name{job="<kind>"}` in `registry`.
    fn series(registry: &prometheus::Registry, name: &str, kind: JobKind) -> Option<f64> {
        let family = registry
            .gather()
            .into_iter()
            .find(|family| family.name() == name)?;
        family.get_metric().iter().find_map(|metric| {
            metric
                .get_label()
                .iter()
                .any(|label| label.name() == "job" && label.value() == kind.name())
                .then(|| {
                    if family.get_field_type() == prometheus::proto::MetricType::COUNTER {
                        metric.get_counter().get_value()
                    } else {
                        metric.get_gauge().get_value()
                    }
                })
        })
    }

    /// The answer, whether the job was done before `reply` or not.
    async fn answered(reply: Reply) -> Answer {
        reply.into_answer().await
    }

    async fn body(answer: Answer) -> String {
        use http_body_util::BodyExt;
        let bytes = answer.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[test]
    fn outside_a_runtime_work_runs_inline() {
        let (runner, _) = runner(JobKind::StatsDump, Duration::from_secs(1));
        let job = Job::spawn(&runner, || 7).unwrap();
        assert_eq!(value(&job), Some(7));
    }

    #[test]
    fn every_kind_has_its_own_name_and_a_purge_waits_longest() {
        let names: std::collections::BTreeSet<_> = JobKind::ALL.map(JobKind::name).into();
        assert_eq!(names.len(), JobKind::ALL.len());
        let configured = Duration::from_secs(1);
        assert_eq!(JobKind::Render.deadline(configured), configured);
        assert_eq!(JobKind::Purge.deadline(configured), MIN_PURGE_DEADLINE);
        let long = Duration::from_secs(3600);
        assert_eq!(JobKind::Purge.deadline(long), long);
    }

    #[tokio::test]
    async fn a_dropped_job_frees_its_flight() {
        let (runner, _) = runner(JobKind::StatsDump, Duration::from_secs(30));
        let flight = Arc::new(Flight::new(runner, Duration::ZERO));
        let panicking = flight
            .join_or_start(|| -> u32 { panic!("the work panics") })
            .unwrap();
        let answer = answered(panicking.reply("test", |_| unreachable!())).await;
        assert_eq!(answer.status(), StatusCode::INTERNAL_SERVER_ERROR);
        // The next request starts a new job instead of waiting on the dead one.
        let next = flight.join_or_start(|| 5).unwrap();
        let answer = answered(next.reply("test", |v| response::text(StatusCode::OK, v))).await;
        assert_eq!(answer.status(), StatusCode::OK);
    }

    #[test]
    fn joiners_share_one_job_and_the_window_reuses_it() {
        let runs = Arc::new(AtomicUsize::new(0));
        let (runner, _) = runner(JobKind::StatsDump, Duration::from_secs(30));
        let flight = Arc::new(Flight::new(runner.clone(), Duration::from_secs(60)));
        let start = |flight: &Arc<Flight<usize>>| {
            let runs = Arc::clone(&runs);
            flight
                .join_or_start(move || runs.fetch_add(1, Ordering::SeqCst) + 1)
                .unwrap()
        };
        assert_eq!(value(&start(&flight)), Some(1));
        // Inside the window: the same result, no new run.
        assert_eq!(value(&start(&flight)), Some(1));
        assert_eq!(runs.load(Ordering::SeqCst), 1);

        let no_window = Arc::new(Flight::new(runner, Duration::ZERO));
        assert_eq!(value(&start(&no_window)), Some(2));
        assert_eq!(value(&start(&no_window)), Some(3));
        assert!(no_window.peek().is_none(), "nothing running, nothing kept");
        assert_eq!(flight.peek().as_ref().and_then(value), Some(1));
    }

    #[tokio::test]
    async fn a_stuck_job_times_its_waiters_out_and_keeps_its_place() {
        let (runner, registry) = runner(JobKind::StatsDump, Duration::from_millis(200));
        let flight = Arc::new(Flight::new(runner, Duration::ZERO));
        let (release, released) = std::sync::mpsc::channel::<()>();
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&runs);
        let first = flight
            .join_or_start(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                let _ = released.recv();
                "done"
            })
            .unwrap();
        let answer = answered(first.reply("stats", |v| response::text(StatusCode::OK, v))).await;
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.headers()[http::header::RETRY_AFTER], "5");
        let reason = body(answer).await;
        assert!(
            reason.starts_with("the stats dump has run for "),
            "{reason}"
        );
        assert!(
            reason.contains(" s and is not finished after this request waited "),
            "{reason}"
        );
        assert_eq!(
            series(&registry, "jemalloc_layer_jobs_stuck", JobKind::StatsDump),
            Some(1.0)
        );

        // A later request joins the stuck job (no second run) and times out too.
        let (never, _) = std::sync::mpsc::channel::<()>();
        let second = flight
            .join_or_start(move || {
                drop(never);
                "second"
            })
            .unwrap()
            .waiting_at_most(Duration::from_millis(50));
        let answer = answered(second.reply("stats", |v| response::text(StatusCode::OK, v))).await;
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let timeouts = "jemalloc_layer_jobs_timeouts_total";
        assert_eq!(series(&registry, timeouts, JobKind::StatsDump), Some(2.0));
        assert_eq!(
            series(&registry, "jemalloc_layer_jobs_stuck", JobKind::StatsDump),
            Some(1.0)
        );

        // Once it ends it is no longer stuck, and the next request gets a fresh job.
        release.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while series(&registry, "jemalloc_layer_jobs_stuck", JobKind::StatsDump) != Some(0.0) {
            assert!(Instant::now() < deadline, "the job never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let third = flight.join_or_start(|| "third").unwrap();
        let answer = answered(third.reply("stats", |v| response::text(StatusCode::OK, v))).await;
        assert_eq!(body(answer).await, "third\n");
    }

    #[tokio::test]
    async fn the_slot_is_freed_when_the_last_waiter_leaves() {
        let (runner, _) = runner(JobKind::HeapGrowth, Duration::from_secs(30));
        let slot = Arc::new(());
        let (stopped, stop) = std::sync::mpsc::channel();
        let job = Job::spawn_for_waiters(&runner, Arc::clone(&slot), move |waiters| {
            let waited_out = waiters.wait(Duration::from_secs(60));
            stopped.send(waited_out).unwrap();
        })
        .unwrap();
        let reply = job.reply("heap", |()| response::text(StatusCode::OK, ""));
        assert_eq!(Arc::strong_count(&slot), 2, "the job holds the slot");
        // The client hangs up: its answer is dropped unanswered.
        drop(reply);
        assert_eq!(Arc::strong_count(&slot), 1, "freed at once");
        let waited_out = stop.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(!waited_out, "the work saw that nobody waits");
    }

    #[tokio::test]
    async fn a_stuck_job_keeps_its_slot_until_it_ends() {
        let (runner, _) = runner(JobKind::HeapGrowth, Duration::from_millis(50));
        let slot = Arc::new(());
        let (release, released) = std::sync::mpsc::channel::<()>();
        let job = Job::spawn_for_waiters(&runner, Arc::clone(&slot), move |_| {
            let _ = released.recv();
        })
        .unwrap();
        let answer = answered(job.reply("heap", |()| response::text(StatusCode::OK, ""))).await;
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
        let reason = body(answer).await;
        assert!(
            reason.starts_with("the heap growth window has run for"),
            "{reason}"
        );
        assert_eq!(Arc::strong_count(&slot), 2, "kept while stuck");
        release.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&slot) > 1 {
            assert!(Instant::now() < deadline, "the job never freed its slot");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
