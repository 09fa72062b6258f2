//! The governor's policy: plain logic over injected readings and a clock, so that every rule
//! is tested with fakes. The thread ([`super::thread`]) runs it against jemalloc and the OS.
//!
//! The numbers, all relative to the limit `L`:
//!
//! - **High-water mark**: 90 % of `L` ([`HIGH_WATER_PERCENT`]). Below it nothing is given
//!   back (jemalloc's own decay does its work); at or above it the governor gives back
//!   `usage - mark` plus 2 % of `L` ([`SLACK_PERCENT`]), so that usage lands a little under
//!   the mark instead of on it and the next poll does not start another run at once. 10 %
//!   of headroom is what the allocations between two polls at the fastest rate may take.
//! - **Polling**: the time usage would take to reach the mark growing at 4 GiB/s
//!   ([`ASSUMED_GROWTH`], about as fast as one thread can fault fresh pages in), at least
//!   2 ms ([`FAST_POLL`]) and at most 100 ms ([`SLOW_POLL`]): so a burst is seen before it
//!   passes the mark by more than one fast poll's worth. With a 320 MiB limit: 100 ms under
//!   about 100 MiB, 17 ms at 200 MiB, 2 ms from 280 MiB. A poll is one small file read (a few
//!   microseconds), so even at the fast rate the idle cost stays far under 1 % of a core.
//! - **CPU budget**, two of them over the last second ([`BUDGET_WINDOW`]), the time of every
//!   run being measured: runs that gave back less than half of what they were asked for
//!   (*unproductive*) take at most 100 ms, 10 % of one core ([`UNPRODUCTIVE_BUDGET`]); all
//!   runs together at most 500 ms, half a core ([`BUDGET`], the cap Go's garbage collector
//!   puts on its own work near a soft limit). A run is made only when one more run as long as
//!   the last one keeps both within budget; otherwise the governor skips giving back and
//!   sleeps until the oldest run leaves the window. A process whose live memory exceeds the
//!   limit cannot make it spin (the death spiral Go's soft limit avoids the same way), while
//!   pages the application keeps freeing are given back as fast as it frees them, up to half
//!   a core: what that costs is bounded by the application's own allocation rate.
//! - **Nothing left**: when a run leaves less than 1 MiB or 1/256 of `L` ([`nothing_left`])
//!   reclaimable, no further run is made until that much is reclaimable again (or usage
//!   falls under the mark): near the limit with live memory, a run per poll would burn the
//!   budget on nothing. If usage is then over `L`, the process is over its limit with
//!   nothing to give back (*unreclaimable*): live memory, not cached pages, is the problem.
//!   The governor then polls at its slow rate and stays in the state until usage falls
//!   under `L` or reclaimable pages appear. A warning is logged once per such episode.
//! - **Pressure**: [`Pressure::Ok`] under the mark, [`Pressure::Near`] from the mark to `L`,
//!   [`Pressure::Over`] above `L`, each judged after giving back what it could.

use super::Pressure;
use std::collections::VecDeque;
use std::time::Duration;

/// The high-water mark, in per cent of the limit.
pub(crate) const HIGH_WATER_PERCENT: u64 = 90;
/// What a run gives back beyond `usage - mark`, in per cent of the limit.
pub(crate) const SLACK_PERCENT: u64 = 2;
/// The longest poll interval (far from the limit), and the interval while unreclaimable.
pub(crate) const SLOW_POLL: Duration = Duration::from_millis(100);
/// The growth rate the poll interval is planned for, in bytes per second.
pub(crate) const ASSUMED_GROWTH: f64 = 4.0 * (1u64 << 30) as f64;
/// The poll interval at and above the high-water mark.
pub(crate) const FAST_POLL: Duration = Duration::from_millis(2);
/// The window the CPU budget is measured over.
pub(crate) const BUDGET_WINDOW: Duration = Duration::from_secs(1);
/// The time all runs may take within [`BUDGET_WINDOW`]: half of one core.
pub(crate) const BUDGET: Duration = Duration::from_millis(500);
/// The time unproductive runs (less than half of what was asked given back) may take within
/// [`BUDGET_WINDOW`]: 10 % of one core.
pub(crate) const UNPRODUCTIVE_BUDGET: Duration = Duration::from_millis(100);

/// What the policy reads and does; the thread implements it with jemalloc and the OS, the
/// tests with fakes. `None` is a reading that failed: the policy then waits for the next poll.
pub(crate) trait Readings {
    /// What the OOM killer watches: the cgroup's usage or the process's RSS, in bytes.
    fn usage(&mut self) -> Option<u64>;
    /// The dirty and muzzy bytes jemalloc holds now.
    fn reclaimable(&mut self) -> Option<u64>;
    /// Gives back at least `bytes` if it can, arenas holding the most first: what was given
    /// back and what is still reclaimable.
    fn give_back(&mut self, bytes: u64) -> Option<GiveBack>;
    /// A monotonic clock: the time since some fixed start.
    fn now(&mut self) -> Duration;
}

/// What one give-back call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GiveBack {
    /// Bytes given back.
    pub(crate) bytes: u64,
    /// Dirty and muzzy bytes still held.
    pub(crate) left: u64,
}

/// What one poll found and did, for the thread to publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Step {
    /// The usage after giving back (the reading before, when nothing was given back).
    pub(crate) usage: u64,
    pub(crate) pressure: Pressure,
    /// Over the limit with nothing left to give back.
    pub(crate) unreclaimable: bool,
    /// Bytes given back in this poll, if a run was made.
    pub(crate) given_back: Option<u64>,
    /// Log the unreclaimable warning now (once per episode).
    pub(crate) warn: bool,
    /// How long to sleep before the next poll.
    pub(crate) sleep: Duration,
}

/// The state of the policy between polls.
#[derive(Debug)]
pub(crate) struct Policy {
    limit: u64,
    /// Start, duration and whether it was productive, of the runs within the last
    /// [`BUDGET_WINDOW`].
    runs: VecDeque<(Duration, Duration, bool)>,
    /// How long the last run took: the estimate of the next one's cost.
    last_took: Duration,
    /// The last run left less than [`nothing_left`]: no run until that much is reclaimable
    /// again (or usage falls under the mark).
    exhausted: bool,
    unreclaimable: bool,
    warned: bool,
}

/// Below this much reclaimable memory there is nothing worth giving back: 1 MiB or 1/256 of
/// the limit, whichever is larger (jemalloc's arenas always hold a little).
pub(crate) fn nothing_left(limit: u64) -> u64 {
    (1 << 20).max(limit / 256)
}

impl Policy {
    pub(crate) fn new(limit: u64) -> Self {
        Self {
            limit,
            runs: VecDeque::new(),
            last_took: Duration::ZERO,
            exhausted: false,
            unreclaimable: false,
            warned: false,
        }
    }

    pub(crate) fn limit(&self) -> u64 {
        self.limit
    }

    /// Changes the limit; the budget spent so far still counts.
    pub(crate) fn set_limit(&mut self, limit: u64) {
        self.limit = limit;
        self.exhausted = false;
        self.unreclaimable = false;
        self.warned = false;
    }

    pub(crate) fn mark(&self) -> u64 {
        self.limit / 100 * HIGH_WATER_PERCENT + self.limit % 100 * HIGH_WATER_PERCENT / 100
    }

    fn pressure(&self, usage: u64) -> Pressure {
        if usage > self.limit {
            Pressure::Over
        } else if usage >= self.mark() {
            Pressure::Near
        } else {
            Pressure::Ok
        }
    }

    /// The poll interval at `usage`: the time to reach the mark at [`ASSUMED_GROWTH`], between
    /// [`FAST_POLL`] and [`SLOW_POLL`].
    pub(crate) fn interval(&self, usage: u64) -> Duration {
        let headroom = self.mark().saturating_sub(usage) as f64;
        Duration::from_secs_f64(headroom / ASSUMED_GROWTH).clamp(FAST_POLL, SLOW_POLL)
    }

    /// The time spent giving back within the window ending at `now` (all runs, and the
    /// unproductive ones), forgetting older runs.
    fn spent(&mut self, now: Duration) -> (Duration, Duration) {
        while let Some(&(start, _, _)) = self.runs.front() {
            if now.saturating_sub(start) < BUDGET_WINDOW {
                break;
            }
            self.runs.pop_front();
        }
        let all = self.runs.iter().map(|&(_, took, _)| took).sum();
        let unproductive = self
            .runs
            .iter()
            .filter(|&&(_, _, productive)| !productive)
            .map(|&(_, took, _)| took)
            .sum();
        (all, unproductive)
    }

    /// One poll: read, give back if above the mark and within budget, judge the pressure.
    pub(crate) fn step(&mut self, readings: &mut impl Readings) -> Step {
        let Some(usage) = readings.usage() else {
            // Nothing to go by: keep the last state, try again at the slow rate.
            return Step {
                usage: 0,
                pressure: Pressure::Ok,
                unreclaimable: false,
                given_back: None,
                warn: false,
                sleep: SLOW_POLL,
            };
        };
        let mut after = usage;
        let mut given_back = None;
        let mut sleep = self.interval(usage);
        let mark = self.mark();
        if usage >= mark {
            let floor = nothing_left(self.limit);
            // After a run that drained everything, give back only once something worth it has
            // appeared: near the limit with live memory, a run per poll would burn the budget
            // on nothing.
            if self.exhausted && readings.reclaimable().is_some_and(|bytes| bytes >= floor) {
                self.exhausted = false;
            }
            let worth_it = !self.exhausted;
            let now = readings.now();
            let (spent, unproductive) = self.spent(now);
            // A run is made when the window is empty, or when one more run as long as the
            // last one keeps both budgets.
            let within_budget = spent.is_zero()
                || (spent + self.last_took <= BUDGET
                    && unproductive + self.last_took <= UNPRODUCTIVE_BUDGET);
            if worth_it && within_budget {
                let want = usage - mark + self.limit / 100 * SLACK_PERCENT;
                let result = readings.give_back(want);
                let took = readings.now().saturating_sub(now);
                let productive = result.is_some_and(|result| result.bytes >= want / 2);
                self.runs.push_back((now, took, productive));
                self.last_took = took;
                if let Some(result) = result {
                    given_back = Some(result.bytes);
                    after = readings
                        .usage()
                        .unwrap_or(usage.saturating_sub(result.bytes));
                    self.exhausted = result.left < floor;
                }
            } else if worth_it {
                // Over budget: wait until the oldest run leaves the window.
                let oldest = self.runs.front().map_or(now, |&(start, _, _)| start);
                sleep = (oldest + BUDGET_WINDOW).saturating_sub(now).max(FAST_POLL);
            }
        } else {
            self.exhausted = false;
        }
        self.unreclaimable = self.exhausted && after > self.limit;
        if after <= self.limit {
            self.warned = false;
        }
        if self.unreclaimable {
            sleep = SLOW_POLL;
        }
        let warn = self.unreclaimable && !self.warned;
        self.warned |= warn;
        Step {
            usage: after,
            pressure: self.pressure(after),
            unreclaimable: self.unreclaimable,
            given_back,
            warn,
            sleep,
        }
    }
}

/// While recovering from an episode over the limit, one forwarded request is let in per this
/// interval (when shedding is on).
pub(crate) const RECOVERY_PACE: Duration = Duration::from_millis(50);
/// Recovery ends once usage is under the mark and no request was shed for this long.
pub(crate) const RECOVERY_QUIET: Duration = Duration::from_secs(1);

/// What load shedding lets through, for layers that shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Every forwarded request.
    Open,
    /// None: the process is over its limit.
    Closed,
    /// One request per [`RECOVERY_PACE`]: the process was over its limit and is not yet back
    /// under the mark with the load gone.
    Pacing,
}

/// Load shedding's gate. Shedding decides on usage, and usage lags admission: a request let
/// in now faults its memory in over the next tens of milliseconds. Opening the gate the moment
/// usage falls under the limit lets every client waiting at that moment in before any of their
/// memory shows (measured: a 512 MiB limit peaked at 0.7–2.1 GiB). So after an episode over
/// the limit the gate opens one request at a time, one per [`RECOVERY_PACE`], long enough for
/// a request's memory to show before the next is let in, and opens fully only once usage is
/// under the high-water mark and nothing was shed for [`RECOVERY_QUIET`] (the load is gone).
/// A request arriving alone after the load is let in at once: the pace's allowance waits for
/// it.
#[derive(Debug, Default)]
pub(crate) struct ShedGate {
    recovering: bool,
    /// When the last admission was granted.
    granted: Option<Duration>,
    /// Requests shed so far (every layer), and when that count last changed.
    shed: u64,
    shed_at: Duration,
}

impl ShedGate {
    /// The gate after a poll that judged the process `over` its limit or not, `under_mark`
    /// or not, with `shed` requests shed so far, at `now`; and whether to grant one admission
    /// now.
    pub(crate) fn step(
        &mut self,
        over: bool,
        under_mark: bool,
        shed: u64,
        now: Duration,
    ) -> (Gate, bool) {
        if shed != self.shed {
            self.shed = shed;
            self.shed_at = now;
        }
        if over {
            self.recovering = true;
            self.granted = None;
            return (Gate::Closed, false);
        }
        if !self.recovering {
            return (Gate::Open, false);
        }
        if under_mark && now.saturating_sub(self.shed_at) >= RECOVERY_QUIET {
            *self = Self {
                shed: self.shed,
                shed_at: self.shed_at,
                ..Self::default()
            };
            return (Gate::Open, false);
        }
        let grant = self
            .granted
            .is_none_or(|granted| now.saturating_sub(granted) >= RECOVERY_PACE);
        if grant {
            self.granted = Some(now);
        }
        (Gate::Pacing, grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Memory as the fake sees it: `live` bytes in use, `cached` reclaimable bytes on top.
    /// Giving back takes `cost` per call on the fake clock.
    struct Fake {
        live: u64,
        cached: u64,
        clock: Duration,
        cost: Duration,
        asked: Vec<u64>,
    }

    impl Fake {
        fn new(live: u64, cached: u64) -> Self {
            Self {
                live,
                cached,
                clock: Duration::ZERO,
                cost: Duration::from_millis(1),
                asked: Vec::new(),
            }
        }
    }

    impl Readings for Fake {
        fn usage(&mut self) -> Option<u64> {
            Some(self.live + self.cached)
        }
        fn reclaimable(&mut self) -> Option<u64> {
            Some(self.cached)
        }
        fn give_back(&mut self, bytes: u64) -> Option<GiveBack> {
            self.asked.push(bytes);
            self.clock += self.cost;
            let given = bytes.min(self.cached);
            self.cached -= given;
            Some(GiveBack {
                bytes: given,
                left: self.cached,
            })
        }
        fn now(&mut self) -> Duration {
            self.clock
        }
    }

    #[test]
    fn the_mark_is_ninety_percent() {
        let policy = Policy::new(1000 * MIB);
        assert_eq!(policy.mark(), 900 * MIB);
        assert_eq!(Policy::new(1000).mark(), 900);
        assert_eq!(Policy::new(u64::MAX).mark(), u64::MAX / 100 * 90 + 13);
    }

    #[test]
    fn polls_faster_as_usage_nears_the_mark() {
        let policy = Policy::new(1000 * MIB);
        let ms = |usage: u64| policy.interval(usage * MIB).as_secs_f64() * 1000.0;
        assert_eq!(policy.interval(0), SLOW_POLL);
        // 200 MiB under the mark at 4 GiB/s: 48.8 ms; 40 MiB: 9.8 ms.
        assert!((48.0..49.0).contains(&ms(700)), "{}", ms(700));
        assert!((9.5..10.0).contains(&ms(860)), "{}", ms(860));
        assert_eq!(policy.interval(899 * MIB), FAST_POLL);
        assert_eq!(policy.interval(900 * MIB), FAST_POLL);
        assert_eq!(policy.interval(2000 * MIB), FAST_POLL);
        let mut last = SLOW_POLL;
        for usage in (0..=1000).step_by(10) {
            let interval = policy.interval(usage * MIB);
            assert!(interval <= last, "{usage} MiB");
            last = interval;
        }
    }

    #[test]
    fn below_the_mark_nothing_is_given_back() {
        let mut policy = Policy::new(1000 * MIB);
        let mut fake = Fake::new(400 * MIB, 400 * MIB);
        let step = policy.step(&mut fake);
        assert_eq!(step.pressure, Pressure::Ok);
        assert_eq!(step.given_back, None);
        assert!(fake.asked.is_empty());
        // 100 MiB under the mark at 4 GiB/s.
        assert_eq!(
            step.sleep,
            Duration::from_secs_f64((100 * MIB) as f64 / ASSUMED_GROWTH)
        );
    }

    #[test]
    fn above_the_mark_it_gives_back_the_excess_and_a_little() {
        let mut policy = Policy::new(1000 * MIB);
        let mut fake = Fake::new(500 * MIB, 450 * MIB);
        let step = policy.step(&mut fake);
        // 950 - 900 + 2 % of 1000.
        assert_eq!(fake.asked, [70 * MIB]);
        assert_eq!(step.given_back, Some(70 * MIB));
        assert_eq!(step.usage, 880 * MIB);
        assert_eq!(step.pressure, Pressure::Ok);
        assert!(!step.unreclaimable);
        // Under the mark again: no second run.
        let step = policy.step(&mut fake);
        assert_eq!(fake.asked.len(), 1);
        assert_eq!(step.pressure, Pressure::Ok);
    }

    #[test]
    fn pressure_follows_usage_after_giving_back() {
        let mut policy = Policy::new(1000 * MIB);
        let mut fake = Fake::new(850 * MIB, 0);
        assert_eq!(policy.step(&mut fake).pressure, Pressure::Ok);
        fake.live = 950 * MIB;
        let step = policy.step(&mut fake);
        assert_eq!(step.pressure, Pressure::Near);
        assert_eq!(step.sleep, FAST_POLL);
        assert!(
            !step.unreclaimable,
            "under the limit is never unreclaimable"
        );
        fake.live = 1100 * MIB;
        let step = policy.step(&mut fake);
        assert_eq!(step.pressure, Pressure::Over);
        assert!(step.unreclaimable);
        fake.live = 990 * MIB;
        assert_eq!(policy.step(&mut fake).pressure, Pressure::Near);
        fake.live = 100 * MIB;
        assert_eq!(policy.step(&mut fake).pressure, Pressure::Ok);
    }

    #[test]
    fn over_the_limit_with_nothing_left_it_waits_instead_of_spinning() {
        let mut policy = Policy::new(1000 * MIB);
        let mut fake = Fake::new(1200 * MIB, 100 * MIB);
        let step = policy.step(&mut fake);
        assert_eq!(step.given_back, Some(100 * MIB));
        assert_eq!(step.pressure, Pressure::Over);
        assert!(step.unreclaimable);
        assert!(step.warn, "warned on entering the state");
        assert_eq!(step.sleep, SLOW_POLL);
        // Next polls: nothing reclaimable, so no run, no second warning, slow polling.
        for _ in 0..5 {
            let step = policy.step(&mut fake);
            assert_eq!(step.given_back, None);
            assert!(step.unreclaimable && !step.warn);
            assert_eq!(step.sleep, SLOW_POLL);
        }
        assert_eq!(fake.asked.len(), 1);
        // Dirty pages appear: given back, still over, still no warning.
        fake.cached = 50 * MIB;
        let step = policy.step(&mut fake);
        assert_eq!(step.given_back, Some(50 * MIB));
        assert!(step.unreclaimable && !step.warn);
        // Live memory falls under the limit: the episode ends; the next one warns again.
        fake.live = 950 * MIB;
        let step = policy.step(&mut fake);
        assert!(!step.unreclaimable);
        assert_eq!(step.pressure, Pressure::Near);
        fake.live = 1300 * MIB;
        let step = policy.step(&mut fake);
        assert!(step.unreclaimable && step.warn);
    }

    #[test]
    fn near_the_limit_with_nothing_to_give_back_no_run_is_made() {
        let mut policy = Policy::new(1000 * MIB);
        // Live memory at 95 %: above the mark, under the limit, nothing cached.
        let mut fake = Fake::new(950 * MIB, 0);
        assert_eq!(policy.step(&mut fake).given_back, Some(0));
        for _ in 0..100 {
            let step = policy.step(&mut fake);
            assert_eq!(step.given_back, None);
            assert_eq!(step.pressure, Pressure::Near);
            assert!(!step.unreclaimable);
            assert_eq!(
                step.sleep, FAST_POLL,
                "near the limit, it keeps watching closely"
            );
        }
        assert_eq!(fake.asked.len(), 1);
        // Dirty pages appear: given back at the next poll.
        fake.cached = 30 * MIB;
        assert_eq!(policy.step(&mut fake).given_back, Some(30 * MIB));
        // Under the mark, then over it again: a run is tried even with nothing cached.
        fake.live = 100 * MIB;
        policy.step(&mut fake);
        fake.live = 950 * MIB;
        assert_eq!(policy.step(&mut fake).given_back, Some(0));
    }

    #[test]
    fn a_little_left_over_the_limit_is_still_nothing() {
        let mut policy = Policy::new(1000 * MIB);
        // 1000 MiB / 256 is just under 4 MiB: 3 MiB left counts as nothing.
        assert_eq!(nothing_left(1000 * MIB), 4000 * 1024);
        let mut fake = Fake::new(1200 * MIB, 3 * MIB);
        fake.cost = Duration::ZERO;
        assert!(policy.step(&mut fake).unreclaimable);
        assert_eq!(nothing_left(100 * MIB), MIB);
    }

    /// Runs a policy for 10 fake seconds against a process whose reclaimable memory reappears
    /// at every poll (`cached` MiB), each run taking 30 ms: the share of time spent giving back.
    fn share_of_time_giving_back(cached: u64) -> f64 {
        let mut policy = Policy::new(1000 * MIB);
        // Usage 980 MiB: 100 MiB asked at every run.
        let mut fake = Fake::new(980 * MIB - cached * MIB, 0);
        fake.cost = Duration::from_millis(30);
        let mut total_run = Duration::ZERO;
        let start = fake.clock;
        while fake.clock - start < Duration::from_secs(10) {
            fake.cached = cached * MIB;
            let before = fake.clock;
            let step = policy.step(&mut fake);
            total_run += fake.clock - before;
            // Sleeping is what moves the clock between polls.
            fake.clock += step.sleep;
            // Usage is under the limit even when no run is made: never Over, never
            // unreclaimable.
            assert_ne!(step.pressure, Pressure::Over);
            assert!(!step.unreclaimable);
        }
        total_run.as_secs_f64() / (fake.clock - start).as_secs_f64()
    }

    #[test]
    fn the_cpu_budget_caps_productive_runs_at_half_a_core() {
        // A churning process: every run gives back what it was asked for.
        let share = share_of_time_giving_back(200);
        assert!((0.3..=0.505).contains(&share), "{share}");
    }

    #[test]
    fn the_cpu_budget_caps_unproductive_runs_at_a_tenth_of_a_core() {
        // Each run gives back 10 MiB of the 100 asked: more than nothing, less than half.
        let share = share_of_time_giving_back(10);
        assert!((0.05..=0.105).contains(&share), "{share}");
    }

    #[test]
    fn over_budget_it_sleeps_to_the_end_of_the_window() {
        let mut policy = Policy::new(1000 * MIB);
        let mut fake = Fake::new(900 * MIB, 500 * MIB);
        fake.cost = Duration::from_millis(300);
        assert!(policy.step(&mut fake).given_back.is_some());
        fake.cached = 500 * MIB;
        let step = policy.step(&mut fake);
        assert_eq!(step.given_back, None, "over budget");
        assert_eq!(step.sleep, Duration::from_millis(700));
        fake.clock += step.sleep;
        assert!(policy.step(&mut fake).given_back.is_some());
    }

    #[test]
    fn a_failed_reading_waits_for_the_next_poll() {
        struct Broken;
        impl Readings for Broken {
            fn usage(&mut self) -> Option<u64> {
                None
            }
            fn reclaimable(&mut self) -> Option<u64> {
                unreachable!()
            }
            fn give_back(&mut self, _: u64) -> Option<GiveBack> {
                unreachable!()
            }
            fn now(&mut self) -> Duration {
                Duration::ZERO
            }
        }
        let step = Policy::new(MIB << 10).step(&mut Broken);
        assert_eq!(step.sleep, SLOW_POLL);
        assert_eq!(step.given_back, None);
    }

    #[test]
    fn the_gate_closes_over_the_limit_and_reopens_one_request_at_a_time() {
        let ms = Duration::from_millis;
        let mut gate = ShedGate::default();
        assert_eq!(gate.step(false, false, 0, ms(0)), (Gate::Open, false));
        assert_eq!(gate.step(true, false, 0, ms(2)), (Gate::Closed, false));
        // Under the limit again, above the mark: one admission now, the next a pace later.
        assert_eq!(gate.step(false, false, 5, ms(4)), (Gate::Pacing, true));
        assert_eq!(gate.step(false, false, 9, ms(30)), (Gate::Pacing, false));
        assert_eq!(gate.step(false, false, 9, ms(54)), (Gate::Pacing, true));
        // Under the mark, but requests were shed less than a second ago: still pacing.
        assert_eq!(gate.step(false, true, 12, ms(200)), (Gate::Pacing, true));
        assert_eq!(gate.step(false, true, 12, ms(1100)), (Gate::Pacing, true));
        // Nothing shed for a second, under the mark: open.
        assert_eq!(gate.step(false, true, 12, ms(1200)), (Gate::Open, false));
        assert_eq!(gate.step(false, false, 12, ms(1300)), (Gate::Open, false));
        // Over again: closed; the first poll under the limit grants at once.
        assert_eq!(gate.step(true, false, 12, ms(1400)), (Gate::Closed, false));
        assert_eq!(gate.step(false, false, 12, ms(1402)), (Gate::Pacing, true));
    }
}
