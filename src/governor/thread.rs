//! The one governor of the process and its thread.
//!
//! Every layer holds the process's [`Governor`] (made by the first layer, shared by the
//! others), whether or not a limit is set; it costs nothing but a little memory until one
//! is. Setting a limit (a builder's, or `PUT …/config?memory_limit=…` on any layer) starts
//! the thread `jemalloc-governor`; clearing it (`memory_limit=none`) or dropping the last
//! layer (and every service it made) stops it within one poll. There is one limit per
//! process, since there is one jemalloc and one RSS: a second layer built with a limit
//! replaces the first one's, the last one set wins, and every layer sees the same pressure.
//! Shedding is switched per layer ([`Shedding`]): each layer decides whether its forwarded
//! requests are shed while the process is over its limit.

use super::policy::{Gate, Policy, ShedGate, Step, RECOVERY_PACE};
use super::readings::{self, Real};
use super::{MemoryLimit, Pressure};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use tokio::sync::watch;

/// The process's governor, shared by every layer; dropping the last handle stops its thread.
#[derive(Debug)]
pub(crate) struct Governor {
    inner: Arc<Inner>,
}

/// What the governor thread and the layers share.
#[derive(Debug)]
struct Inner {
    control: Mutex<Control>,
    wake: Condvar,
    pressure: watch::Sender<Pressure>,
    status: Status,
}

/// What the governor last saw and did, for the telemetry and the shed answers.
#[derive(Debug, Default)]
pub(crate) struct Status {
    /// The limit in bytes; 0 when none is set.
    limit: AtomicU64,
    /// The last usage reading, after giving back; 0 before the first.
    usage: AtomicU64,
    pressure: AtomicU8,
    unreclaimable: AtomicBool,
    given_back: AtomicU64,
    runs: AtomicU64,
    /// Load shedding's gate is not open (closed, or pacing after an episode over the limit).
    gated: AtomicBool,
}

impl Status {
    /// The limit in bytes, if one is set.
    pub(crate) fn limit(&self) -> Option<u64> {
        Some(self.limit.load(Relaxed)).filter(|&limit| limit != 0)
    }

    /// The usage the governor last read (after giving back), if it runs.
    pub(crate) fn usage(&self) -> Option<u64> {
        Some(self.usage.load(Relaxed)).filter(|&usage| usage != 0)
    }

    pub(crate) fn pressure(&self) -> Pressure {
        Pressure::from_gauge(self.pressure.load(Relaxed))
    }

    pub(crate) fn unreclaimable(&self) -> bool {
        self.unreclaimable.load(Relaxed)
    }

    /// Bytes given back by the governor since the process started.
    pub(crate) fn given_back(&self) -> u64 {
        self.given_back.load(Relaxed)
    }

    /// Give-back runs since the process started.
    pub(crate) fn runs(&self) -> u64 {
        self.runs.load(Relaxed)
    }
}

/// The limit as set, for the config endpoint's answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LimitSetting {
    /// What was asked for.
    pub(crate) asked: MemoryLimit,
    pub(crate) bytes: u64,
    /// `"explicit"` for bytes, else where the limit the percentage is taken of came from.
    pub(crate) source: &'static str,
}

#[derive(Debug, Default)]
struct Control {
    limit: Option<LimitSetting>,
    /// Bumped on every change of the limit: wakes the thread.
    changes: u64,
    /// The thread that runs while it equals its own; bumped to retire it.
    epoch: u64,
    running: bool,
    /// Every layer's shedding switch.
    sheds: Vec<Weak<dyn HoldsShedding>>,
    /// Load shedding's gate, stepped at every poll.
    gate: ShedGate,
}

/// What holds a layer's [`Shedding`] switch: the layer's shared state, which keeps it inline
/// so that a forwarded request reads it with one load from a pointer it already has.
pub(crate) trait HoldsShedding: Send + Sync {
    fn shedding(&self) -> &Shedding;
}

/// [`Shedding::flags`]: forwarded requests are shed now.
const SHED: u8 = 1;
/// [`Shedding::flags`]: forwarded requests' bytes are counted (set once, when the layer is
/// built).
const ACCOUNT: u8 = 2;

/// One layer's load-shedding switch: the service reads [`detour`](Self::detour), one atomic
/// load per forwarded request.
#[derive(Debug, Default)]
pub(crate) struct Shedding {
    /// Shedding is on for this layer (builder or config endpoint).
    enabled: AtomicBool,
    /// [`SHED`]: on and the gate is not open, forwarded requests are shed, unless one takes
    /// the admission the gate granted ([`try_admit`](Self::try_admit)). [`ACCOUNT`]: the
    /// layer counts each forwarded request's bytes. One byte for both, so that a forwarded
    /// request tests one load to know it goes the direct way.
    flags: AtomicU8,
    /// One admission granted while the gate paces.
    admit: AtomicBool,
    /// Requests shed so far.
    shed: AtomicU64,
}

impl Shedding {
    /// Whether a forwarded request takes the way round: it may be shed, or its bytes are
    /// counted.
    #[inline(always)]
    pub(crate) fn detour(&self) -> bool {
        self.flags.load(Relaxed) != 0
    }

    /// Whether forwarded requests are to be shed now.
    pub(crate) fn active(&self) -> bool {
        self.flags.load(Relaxed) & SHED != 0
    }

    fn set_active(&self, active: bool) {
        if active {
            self.flags.fetch_or(SHED, Relaxed);
        } else {
            self.flags.fetch_and(!SHED, Relaxed);
        }
    }

    /// Sends every forwarded request the way round, where its bytes are counted.
    pub(crate) fn account_requests(&self) {
        self.flags.fetch_or(ACCOUNT, Relaxed);
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Relaxed)
    }

    /// Takes the admission the gate granted, if it is still there: while recovering from an
    /// episode over the limit, one forwarded request per pace gets through.
    pub(crate) fn try_admit(&self) -> bool {
        self.admit.swap(false, Relaxed)
    }

    /// Counts one shed request.
    pub(crate) fn count(&self) {
        self.shed.fetch_add(1, Relaxed);
    }

    /// Requests shed by this layer so far.
    pub(crate) fn shed(&self) -> u64 {
        self.shed.load(Relaxed)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the state whole: a panic elsewhere does not spoil it.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The process's governor while some layer holds it.
static PROCESS: Mutex<Weak<Governor>> = Mutex::new(Weak::new());

impl Governor {
    /// The process's governor: the one the other layers hold, or a new one.
    pub(crate) fn process() -> Arc<Self> {
        let mut process = lock(&PROCESS);
        if let Some(governor) = process.upgrade() {
            return governor;
        }
        let governor = Arc::new(Self {
            inner: Arc::new(Inner {
                control: Mutex::new(Control::default()),
                wake: Condvar::new(),
                pressure: watch::Sender::new(Pressure::Ok),
                status: Status::default(),
            }),
        });
        *process = Arc::downgrade(&governor);
        governor
    }

    /// A subscription to the pressure state.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Pressure> {
        self.inner.pressure.subscribe()
    }

    pub(crate) fn status(&self) -> &Status {
        &self.inner.status
    }

    /// The limit as set, if any.
    pub(crate) fn limit(&self) -> Option<LimitSetting> {
        lock(&self.inner.control).limit.clone()
    }

    /// A new shedding switch, on or off, for the layer `holder` is being built into (it
    /// cannot be upgraded yet): the governor sets it from now on.
    pub(crate) fn shedding(&self, holder: Weak<dyn HoldsShedding>, enabled: bool) -> Shedding {
        let shedding = Shedding::default();
        let mut control = lock(&self.inner.control);
        control.sheds.retain(|shed| shed.strong_count() > 0);
        control.sheds.push(holder);
        self.set_shedding_locked(&shedding, enabled);
        shedding
    }

    /// Switches a layer's shedding on or off; it takes effect at once if the process is over
    /// its limit.
    pub(crate) fn set_shedding(&self, shedding: &Shedding, enabled: bool) {
        let _control = lock(&self.inner.control);
        self.set_shedding_locked(shedding, enabled);
    }

    fn set_shedding_locked(&self, shedding: &Shedding, enabled: bool) {
        shedding.enabled.store(enabled, Relaxed);
        let gated = self.inner.status.gated.load(Relaxed);
        shedding.set_active(enabled && gated);
    }

    /// What `asked` comes to now: bytes as given, or a percentage of the limit detected now.
    ///
    /// # Errors
    ///
    /// A one-line reason when a percentage is asked for and no limit can be detected.
    pub(crate) fn resolve(asked: MemoryLimit) -> Result<LimitSetting, String> {
        // Detected again on every setting, explicit ones too: it also decides which usage
        // the governor reads (the cgroup's, or the RSS), and a cgroup may have moved.
        let detected = readings::available();
        if let MemoryLimit::Bytes(bytes) = asked {
            if bytes < super::limit::MIN_LIMIT_BYTES {
                return Err(format!(
                    "memory limit of {bytes} bytes is below the smallest, 1MiB"
                ));
            }
            return Ok(LimitSetting {
                asked,
                bytes,
                source: "explicit",
            });
        }
        let Some((available, source)) = detected else {
            return Err(format!(
                "memory_limit={asked} needs a limit to take a percentage of, and none was \
                 found (no cgroup limit, no /proc/meminfo): give bytes instead"
            ));
        };
        let bytes = asked.bytes(Some(available)).unwrap_or(available);
        Ok(LimitSetting {
            asked,
            bytes: bytes.max(super::limit::MIN_LIMIT_BYTES),
            source,
        })
    }

    /// Sets a resolved limit (starting the thread if it is not running) or clears it
    /// (stopping the thread, and with it any shedding).
    ///
    /// # Errors
    ///
    /// A one-line reason when the thread cannot start; the limit is then cleared.
    pub(crate) fn apply_limit(&self, setting: Option<LimitSetting>) -> Result<(), String> {
        let mut control = lock(&self.inner.control);
        control.limit = setting.clone();
        control.changes += 1;
        match &setting {
            Some(setting) => {
                tracing::info!(
                    limit = setting.bytes,
                    source = setting.source,
                    "memory governor: keeping the process under {} MiB ({})",
                    setting.bytes >> 20,
                    setting.asked,
                );
                self.inner.status.limit.store(setting.bytes, Relaxed);
                if !control.running {
                    control.running = true;
                    control.epoch += 1;
                    let epoch = control.epoch;
                    let inner = Arc::clone(&self.inner);
                    let spawned = std::thread::Builder::new()
                        .name("jemalloc-governor".into())
                        .spawn(move || run(&inner, epoch));
                    if let Err(e) = spawned {
                        control.running = false;
                        control.limit = None;
                        self.inner.status.limit.store(0, Relaxed);
                        return Err(format!("cannot start the governor thread: {e}"));
                    }
                }
            }
            None => {
                if control.running {
                    tracing::info!("memory governor: limit cleared, stopping");
                }
                let holders = retire(&self.inner, &mut control);
                drop(control);
                // Outside the lock: a layer's last reference may go with them.
                drop(holders);
                self.inner.wake.notify_all();
                return Ok(());
            }
        }
        self.inner.wake.notify_all();
        Ok(())
    }
}

impl Drop for Governor {
    /// The last layer is gone: the thread stops at its next wake-up, which is now.
    fn drop(&mut self) {
        let mut control = lock(&self.inner.control);
        control.limit = None;
        let holders = retire(&self.inner, &mut control);
        drop(control);
        // Outside the lock: a layer's last reference may go with them.
        drop(holders);
        self.inner.wake.notify_all();
    }
}

/// Every layer's shedding switch, held while it is published. The caller drops them only
/// after releasing the control lock: the last reference to a layer may be among them, and
/// dropping a layer drops its governor handle, which takes the lock.
fn holders(control: &Control) -> Vec<Arc<dyn HoldsShedding>> {
    control.sheds.iter().filter_map(Weak::upgrade).collect()
}

/// Stops the running thread (if any) and publishes "no limit": pressure ok, no shedding.
/// Returns the layers' switches it published to, to be dropped outside the lock.
#[must_use]
fn retire(inner: &Inner, control: &mut Control) -> Vec<Arc<dyn HoldsShedding>> {
    control.epoch += 1;
    control.running = false;
    let status = &inner.status;
    status.limit.store(0, Relaxed);
    status.usage.store(0, Relaxed);
    status.unreclaimable.store(false, Relaxed);
    control.gate = ShedGate::default();
    let holders = holders(control);
    publish_pressure(inner, &holders, Pressure::Ok, Gate::Open, false);
    holders
}

/// Publishes the pressure, and the gate to every layer's shedding switch (`grant`: one
/// admission for each layer that sheds).
fn publish_pressure(
    inner: &Inner,
    holders: &[Arc<dyn HoldsShedding>],
    pressure: Pressure,
    gate: Gate,
    grant: bool,
) {
    inner
        .status
        .pressure
        .store(pressure.as_gauge() as u8, Relaxed);
    let gated = gate != Gate::Open;
    inner.status.gated.store(gated, Relaxed);
    for holder in holders {
        let shed = holder.shedding();
        if grant {
            shed.admit.store(true, Relaxed);
        }
        shed.set_active(gated && shed.enabled());
    }
    inner.pressure.send_if_modified(|current| {
        let changed = *current != pressure;
        *current = pressure;
        changed
    });
}

/// The governor thread: polls, gives back, publishes, sleeps; exits when retired.
fn run(inner: &Inner, epoch: u64) {
    let mut readings = Real::new();
    let mut policy: Option<Policy> = None;
    let start = std::time::Instant::now();
    loop {
        let (limit, seen) = {
            let control = lock(&inner.control);
            match &control.limit {
                Some(limit) if control.epoch == epoch => (limit.bytes, control.changes),
                _ => return,
            }
        };
        let policy = match &mut policy {
            Some(policy) => {
                if policy.limit() != limit {
                    policy.set_limit(limit);
                }
                policy
            }
            None => policy.insert(Policy::new(limit)),
        };
        let step = policy.step(&mut readings);
        let under_mark = step.usage < policy.mark();
        let mut control = lock(&inner.control);
        if control.epoch != epoch {
            return;
        }
        let holders = holders(&control);
        let shed: u64 = holders.iter().map(|holder| holder.shedding().shed()).sum();
        let over = step.pressure == Pressure::Over;
        let (gate, grant) = control.gate.step(over, under_mark, shed, start.elapsed());
        publish(inner, &holders, &step, limit, gate, grant);
        // While the gate paces, poll at least once a pace, so that admissions keep coming.
        let sleep = match gate {
            Gate::Pacing => step.sleep.min(RECOVERY_PACE),
            Gate::Open | Gate::Closed => step.sleep,
        };
        drop(control);
        // Outside the lock: a layer's last reference may go with them.
        drop(holders);
        let control = lock(&inner.control);
        if control.epoch != epoch {
            return;
        }
        if control.changes == seen {
            let _ = inner
                .wake
                .wait_timeout(control, sleep)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

fn publish(
    inner: &Inner,
    holders: &[Arc<dyn HoldsShedding>],
    step: &Step,
    limit: u64,
    gate: Gate,
    grant: bool,
) {
    let status = &inner.status;
    if step.usage != 0 {
        status.usage.store(step.usage, Relaxed);
    }
    if let Some(bytes) = step.given_back {
        status.given_back.fetch_add(bytes, Relaxed);
        status.runs.fetch_add(1, Relaxed);
    }
    status.unreclaimable.store(step.unreclaimable, Relaxed);
    if step.warn {
        tracing::warn!(
            usage = step.usage,
            limit,
            "memory use {} MiB is over the limit {} MiB with nothing left to give back: live \
             memory exceeds the limit; raise the limit or find what holds the memory",
            step.usage >> 20,
            limit >> 20,
        );
    }
    publish_pressure(inner, holders, step.pressure, gate, grant);
}
