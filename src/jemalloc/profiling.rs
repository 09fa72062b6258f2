//! Heap profiling: jemalloc's sampling profiler switched on and off, and its heap dumps as
//! symbolized pprof or SVG flame graphs (through Polar Signals' `jemalloc_pprof`).
//!
//! jemalloc samples one allocation every 2^`lg_sample` bytes on average (512 KiB by default)
//! and records its stack; a dump lists, per stack, the sampled objects still live, scaled up
//! to an estimate of the bytes that stack holds. Three conditions, each its own answer:
//! the profiler compiled in (the `profiling` feature), started (`prof:true` in jemalloc's
//! options, read once at start-up) and active (`prof.active`, switchable at run time).

use super::JemallocError;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The sampling intervals [`set_sampling`] accepts, as 2^N bytes: 4 KiB to 1 GiB.
pub(crate) const LG_SAMPLE_RANGE: std::ops::RangeInclusive<u32> = 12..=30;

/// The longest `for=` a switch-on may have: profiling left on by accident is what it prevents.
pub(crate) const MAX_ACTIVE_FOR: Duration = Duration::from_secs(24 * 60 * 60);

/// How to start jemalloc with its profiler, for the answers that say it is not: the
/// environment variable and the built-in options under this build's names (prefixed or not,
/// see [`OptionNames`](super::options::OptionNames)), available and not yet sampling.
pub(crate) fn how_to_start() -> String {
    super::options::OptionNames::of_this_build().how_to_set("prof:true,prof_active:false")
}

/// The state of jemalloc's heap profiler: the JSON of `GET /debug/jemalloc/profiling`, and the
/// `before` and `after` of a `PUT`.
///
/// ```json
/// {"available":true,"active":false,"lg_sample":19,"sample_interval_bytes":524288}
/// ```
///
/// `available` is whether jemalloc was started with its profiler (`prof:true`); without it
/// the other figures are left out and `how_to_enable` says what to do. `switches_off_in_seconds`
/// is there while a switch-on with `for=` runs, also after a later `active=true` without
/// `for=`, which keeps that deadline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ProfilingStatus {
    /// jemalloc was started with its profiler (`opt.prof`).
    pub available: bool,
    /// Allocations are being sampled now (`prof.active`).
    pub active: bool,
    /// The mean interval between samples is 2^this bytes (`prof.lg_sample`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lg_sample: Option<u32>,
    /// The mean interval between samples, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_interval_bytes: Option<u64>,
    /// Profiling switches itself off in this many seconds (rounded up), as a `for=` asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switches_off_in_seconds: Option<u64>,
    /// When not available: how to start jemalloc with its profiler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub how_to_enable: Option<String>,
}

/// What a change did: the profiler's state before and after it (the JSON of
/// `PUT /debug/jemalloc/profiling`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ProfilingChange {
    /// Before the change.
    pub before: ProfilingStatus,
    /// After it.
    pub after: ProfilingStatus,
}

/// Why a heap profile cannot be had, or the profiler not changed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[cfg_attr(not(profiling), allow(dead_code))]
pub(crate) enum ProfilingError {
    /// jemalloc itself cannot be used (not compiled in, not the global allocator, a failed
    /// call).
    #[error(transparent)]
    Jemalloc(#[from] JemallocError),
    /// jemalloc is there, its profiler is not compiled in.
    #[cfg_attr(profiling, allow(dead_code))]
    #[error(
        "heap profiling is not compiled in: build with `--features profiling` \
         (tower-jemalloc's profiling feature)"
    )]
    NotCompiled,
    /// Compiled in, but jemalloc was started without `prof:true`.
    #[error(
        "jemalloc was started without its heap profiler (opt.prof is false): {}",
        how_to_start()
    )]
    NotStarted,
    /// Started, but not sampling.
    #[error("heap profiling is inactive, so no profile is being taken: activate it with {0}")]
    Inactive(String),
    /// The dump is larger than the cap.
    #[error(
        "the jemalloc heap dump is {size} bytes, over the cap of {cap} bytes; \
         raise it with heap_profile_max_bytes"
    )]
    TooLarge {
        /// The dump's size.
        size: u64,
        /// The cap.
        cap: u64,
    },
    /// The dump could not be read or converted.
    #[error("the heap profile could not be made: {0}")]
    Failed(String),
    /// A growth window was given up before it ended: nobody waits for it any more.
    #[error("the heap growth window was abandoned: nobody waits for it any more")]
    Abandoned,
}

/// The answer formats of a heap profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProfileFormat {
    /// Gzipped pprof protobuf, symbolized.
    Pprof,
    /// An SVG flame graph.
    Flamegraph,
}

impl ProfileFormat {
    /// Its name in `?format=` and in telemetry.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Pprof => "pprof",
            Self::Flamegraph => "flamegraph",
        }
    }

    /// Every format.
    pub(crate) const ALL: [Self; 2] = [Self::Pprof, Self::Flamegraph];

    /// The names of [`ALL`](Self::ALL).
    pub(crate) const NAMES: [&'static str; 2] = [Self::ALL[0].as_str(), Self::ALL[1].as_str()];
}

pub(crate) use imp::{heap_profile, ready, set_active, set_sampling, status};

#[cfg(profiling)]
mod imp {
    use super::{how_to_start, ProfileFormat, ProfilingError, ProfilingStatus, MAX_ACTIVE_FOR};
    use crate::jemalloc::ctl::{ctl, Ctl};
    use pprof_util::{FlamegraphOptions, StackProfile, WeightedStack};
    use std::collections::HashMap;
    use std::io::{BufReader, Read};
    use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
    use std::time::{Duration, Instant};

    /// The controller, with jemalloc's profiler started.
    fn started() -> Result<&'static Ctl, ProfilingError> {
        let ctl = ctl()?;
        if ctl.prof_started()? {
            Ok(ctl)
        } else {
            Err(ProfilingError::NotStarted)
        }
    }

    /// The profiler's state.
    pub(crate) fn status() -> Result<ProfilingStatus, ProfilingError> {
        let ctl = ctl()?;
        let expiry = EXPIRY.lock();
        read_status(ctl, *expiry)
    }

    fn read_status(
        ctl: &Ctl,
        deadline: Option<Instant>,
    ) -> Result<ProfilingStatus, ProfilingError> {
        if !ctl.prof_started()? {
            return Ok(ProfilingStatus {
                available: false,
                active: false,
                lg_sample: None,
                sample_interval_bytes: None,
                switches_off_in_seconds: None,
                how_to_enable: Some(how_to_start()),
            });
        }
        let lg_sample = ctl.prof_lg_sample()?;
        let active = ctl.prof_active()?;
        Ok(ProfilingStatus {
            available: true,
            active,
            lg_sample: Some(lg_sample),
            sample_interval_bytes: 1u64.checked_shl(lg_sample),
            switches_off_in_seconds: deadline.filter(|_| active).map(|at| {
                let left = at.saturating_duration_since(Instant::now());
                left.as_secs() + u64::from(left.subsec_nanos() > 0)
            }),
            how_to_enable: None,
        })
    }

    /// Checks that a profile can be taken now: `activate` says how to activate profiling in
    /// the answer when it is inactive.
    pub(crate) fn ready(activate: &str) -> Result<(), ProfilingError> {
        if started()?.prof_active()? {
            Ok(())
        } else {
            Err(ProfilingError::Inactive(activate.to_owned()))
        }
    }

    /// Switches sampling on or off; with `for_`, it switches itself off after that long.
    ///
    /// The deadline of an earlier `for_`: replaced by a new `for_`, cleared by a switch-off,
    /// and kept by a switch-on without `for_` while profiling is still on (a second
    /// `active=true` must not quietly undo the first one's promise to switch off). Returns the
    /// state before and after; `after` shows a deadline still to come.
    pub(crate) fn set_active(
        active: bool,
        for_: Option<Duration>,
    ) -> Result<(ProfilingStatus, ProfilingStatus), ProfilingError> {
        let ctl = started()?;
        let for_ = for_.filter(|_| active);
        if for_.is_some() {
            // Before switching anything: no switch-on with a for= that nothing would end.
            EXPIRY.start_timer()?;
        }
        let mut expiry = EXPIRY.lock();
        let before = read_status(ctl, *expiry)?;
        ctl.set_prof_active(active)?;
        *expiry = match for_ {
            Some(d) => Some(Instant::now() + d.min(MAX_ACTIVE_FOR)),
            // A switch-on that names no deadline keeps the one of the switch-on still running.
            None if active && before.active => *expiry,
            None => None,
        };
        EXPIRY.wake.notify_all();
        let after = read_status(ctl, *expiry)?;
        Ok((before, after))
    }

    /// Forgets the samples taken so far and samples every 2^`lg_sample` bytes from now on.
    pub(crate) fn set_sampling(
        lg_sample: u32,
    ) -> Result<(ProfilingStatus, ProfilingStatus), ProfilingError> {
        let ctl = started()?;
        let expiry = EXPIRY.lock();
        let before = read_status(ctl, *expiry)?;
        ctl.prof_reset(lg_sample)?;
        let after = read_status(ctl, *expiry)?;
        Ok((before, after))
    }

    /// The deadline of a `for=`, and the one thread (started at the first `for=`) that
    /// switches profiling off when it passes. Process-wide, as `prof.active` is.
    struct Expiry {
        deadline: Mutex<Option<Instant>>,
        wake: Condvar,
        timer: OnceLock<Result<(), String>>,
    }

    static EXPIRY: Expiry = Expiry {
        deadline: Mutex::new(None),
        wake: Condvar::new(),
        timer: OnceLock::new(),
    };

    impl Expiry {
        fn lock(&self) -> MutexGuard<'_, Option<Instant>> {
            self.deadline.lock().unwrap_or_else(|e| e.into_inner())
        }

        fn start_timer(&'static self) -> Result<(), ProfilingError> {
            self.timer
                .get_or_init(|| {
                    std::thread::Builder::new()
                        .name("jemalloc-prof-expiry".to_owned())
                        .spawn(move || self.run())
                        .map(drop)
                        .map_err(|e| format!("cannot start the profiling expiry thread: {e}"))
                })
                .clone()
                .map_err(ProfilingError::Failed)
        }

        fn run(&self) {
            let mut deadline = self.lock();
            loop {
                deadline = match *deadline {
                    None => self.wake.wait(deadline).unwrap_or_else(|e| e.into_inner()),
                    Some(at) if Instant::now() >= at => {
                        *deadline = None;
                        match started().and_then(|ctl| Ok(ctl.set_prof_active(false)?)) {
                            Ok(()) => tracing::info!(
                                "tower-jemalloc: heap profiling switched off, as asked with for="
                            ),
                            Err(e) => tracing::warn!(
                                "tower-jemalloc: cannot switch heap profiling off: {e}"
                            ),
                        }
                        deadline
                    }
                    Some(at) => {
                        let wait = at.saturating_duration_since(Instant::now());
                        self.wake
                            .wait_timeout(deadline, wait)
                            .unwrap_or_else(|e| e.into_inner())
                            .0
                    }
                };
            }
        }
    }

    /// One heap dump, parsed: at most `cap` bytes of jemalloc's dump are read.
    fn dump(ctl: &Ctl, cap: u64) -> Result<StackProfile, ProfilingError> {
        let file = ctl.prof_dump()?;
        let size = file
            .metadata()
            .map_err(|e| ProfilingError::Failed(format!("cannot read the dump's size: {e}")))?
            .len();
        if size > cap {
            return Err(ProfilingError::TooLarge { size, cap });
        }
        // `take`: the file cannot grow past the cap while it is read either.
        let reader = BufReader::new(file.take(cap));
        pprof_util::parse_jeheap(reader, mappings::MAPPINGS.as_deref())
            .map_err(|e| ProfilingError::Failed(format!("cannot parse jemalloc's dump: {e:#}")))
    }

    /// `end` minus `start`, per stack: what was allocated and is still held, less what was
    /// freed, between the two dumps. Stacks that did not change are left out.
    fn growth(start: StackProfile, end: StackProfile) -> StackProfile {
        let mut before: HashMap<Vec<usize>, f64> = start
            .stacks
            .into_iter()
            .map(|(stack, _)| (stack.addrs, stack.weight))
            .collect();
        let mut profile = StackProfile {
            mappings: end.mappings,
            ..StackProfile::default()
        };
        for (stack, _) in end.stacks {
            let weight = stack.weight - before.remove(&stack.addrs).unwrap_or(0.0);
            if weight != 0.0 {
                profile.push_stack(
                    WeightedStack {
                        addrs: stack.addrs,
                        weight,
                    },
                    None,
                );
            }
        }
        for (addrs, weight) in before {
            profile.push_stack(
                WeightedStack {
                    addrs,
                    weight: -weight,
                },
                None,
            );
        }
        profile
    }

    /// The live heap now (`window` `None`), or its growth over `window`, in `format`.
    /// Blocks (for the window, and for the dump and its symbolization): run it off the async
    /// workers. `wait` waits the window out, and says `false` when it was given up meanwhile:
    /// the profile is then [`ProfilingError::Abandoned`], without the second dump.
    pub(crate) fn heap_profile(
        format: ProfileFormat,
        window: Option<Duration>,
        cap: u64,
        wait: impl FnOnce(Duration) -> bool,
    ) -> Result<Vec<u8>, ProfilingError> {
        let ctl = started()?;
        let profile = match window {
            None => dump(ctl, cap)?,
            Some(window) => {
                let start = dump(ctl, cap)?;
                if !wait(window) {
                    return Err(ProfilingError::Abandoned);
                }
                growth(start, dump(ctl, cap)?)
            }
        };
        let encoded = encode(profile, format, window);
        // Symbolizing loads the binary's symbols and debug information (about 30 MiB for the
        // example server) into a cache that would otherwise stay for the process's life: in
        // the very heap an operator is examining. Loading them again costs ~0.1 s a profile.
        backtrace::clear_symbol_cache();
        encoded
    }

    fn encode(
        profile: StackProfile,
        format: ProfileFormat,
        window: Option<Duration>,
    ) -> Result<Vec<u8>, ProfilingError> {
        match format {
            ProfileFormat::Pprof => {
                let pprof = profile.to_pprof(("inuse_space", "bytes"), ("space", "bytes"), None);
                with_drop_frames(&pprof, &AllocatorFrames::of_this_build().regex())
                    .map_err(|e| ProfilingError::Failed(format!("cannot encode it: {e}")))
            }
            ProfileFormat::Flamegraph => {
                let mut shown = profile;
                // A flame graph draws sizes: only what grew (or is held) has one.
                shown.stacks.retain(|(stack, _)| stack.weight >= 1.0);
                let mut options = FlamegraphOptions::default();
                options.title = match window {
                    None => "jemalloc heap: bytes held (inuse_space)".to_owned(),
                    Some(window) => format!(
                        "jemalloc heap: growth over {} s (inuse_space)",
                        window.as_secs()
                    ),
                };
                options.count_name = "bytes".to_owned();
                let frames = AllocatorFrames::of_this_build();
                let folded = fold(&shown, |addr| symbolize(addr, &frames));
                let mut svg = Vec::new();
                inferno::flamegraph::from_lines(
                    &mut options,
                    folded.iter().map(String::as_str),
                    &mut svg,
                )
                .map_err(|e| ProfilingError::Failed(format!("cannot draw it: {e:#}")))?;
                Ok(svg)
            }
        }
    }

    /// One pattern of [`AllocatorFrames`]: a function's whole name, or the start of names.
    #[derive(Debug, Clone, Copy)]
    enum Frame {
        Name(&'static str),
        Prefix(&'static str),
    }

    /// jemalloc's functions in a build with the `_rjem_` prefix: all of them carry it
    /// (internal ones `_rjem_je_`).
    const PREFIXED_JEMALLOC: &[Frame] = &[Frame::Prefix("_rjem_")];

    /// jemalloc's functions in an unprefixed build: internal ones `je_`, and the public
    /// allocation functions a sampled allocation enters through.
    const UNPREFIXED_JEMALLOC: &[Frame] = &[
        Frame::Prefix("je_"),
        Frame::Name("malloc"),
        Frame::Name("calloc"),
        Frame::Name("realloc"),
        Frame::Name("posix_memalign"),
        Frame::Name("aligned_alloc"),
        Frame::Name("mallocx"),
        Frame::Name("rallocx"),
    ];

    /// The rest of the allocator's frames, in any build: jemalloc's stack capture (a static
    /// function, without the prefix), Rust's global-allocator shims, the allocators'
    /// `GlobalAlloc` impls, and the `alloc` crate's allocation plumbing.
    const RUST_ALLOCATOR: &[Frame] = &[
        Frame::Name("prof_backtrace_impl"),
        Frame::Name("__rust_alloc"),
        Frame::Name("__rust_alloc_zeroed"),
        Frame::Name("__rust_realloc"),
        Frame::Prefix("__rdl_"),
        Frame::Prefix("<tikv_jemallocator::Jemalloc as "),
        Frame::Prefix("<tower_jemalloc::allocator::Jemalloc as "),
        Frame::Prefix("alloc::alloc::"),
        Frame::Prefix("alloc::raw_vec::"),
    ];

    /// The allocator's own frames at the leaf of every sampled stack, the one list both
    /// formats use. The pprof output names them in its `drop_frames` (as a regular
    /// expression), which `go tool pprof` (as for C++ heap profiles) uses to cut them and
    /// everything they call, so that a stack's bytes are attributed, flat, to the code that
    /// allocated, not to `prof_backtrace_impl`. The flame graph is cut the same way before it
    /// is drawn ([`fold`]).
    #[derive(Debug)]
    struct AllocatorFrames(Vec<Frame>);

    impl AllocatorFrames {
        /// The frames of this build's jemalloc (prefixed or not) and of Rust's allocator.
        fn of_this_build() -> Self {
            Self::of(crate::jemalloc::options::OptionNames::of_this_build().prefixed())
        }

        fn of(prefixed: bool) -> Self {
            let jemalloc = if prefixed {
                PREFIXED_JEMALLOC
            } else {
                UNPREFIXED_JEMALLOC
            };
            Self(jemalloc.iter().chain(RUST_ALLOCATOR).copied().collect())
        }

        /// The `drop_frames` regular expression: pprof anchors it (`^(…)$`).
        fn regex(&self) -> String {
            let escape = |text: &str| {
                text.chars().fold(String::new(), |mut out, c| {
                    if "\\.+*?()|[]{}^$".contains(c) {
                        out.push('\\');
                    }
                    out.push(c);
                    out
                })
            };
            let alternatives: Vec<String> = self
                .0
                .iter()
                .map(|frame| match frame {
                    Frame::Name(name) => escape(name),
                    Frame::Prefix(prefix) => escape(prefix) + ".*",
                })
                .collect();
            alternatives.join("|")
        }

        /// Whether `function` is one of them, as pprof matches `drop_frames`: against the
        /// whole name, cut at its first `(` (pprof's simplification of C++ names).
        fn matches(&self, function: &str) -> bool {
            let function = function.split('(').next().unwrap_or(function);
            self.0.iter().any(|frame| match frame {
                Frame::Name(name) => function == *name,
                Frame::Prefix(prefix) => function.starts_with(prefix),
            })
        }
    }

    /// One sampled address, symbolized as the pprof output is (`pprof_util`: the address
    /// before the return address, names demangled without their hash), with pprof's
    /// `drop_frames` applied to it.
    #[derive(Debug, Default, Clone, PartialEq)]
    struct Location {
        /// Its functions, the innermost inlined one first. When an allocator frame is inlined
        /// into application code, only the application's frames (those outside the outermost
        /// allocator frame) are left.
        names: Vec<String>,
        /// Its outermost function is an allocator frame: where a stack is cut here, the
        /// location goes too.
        dropped: bool,
        /// It holds an allocator frame: where a stack is cut here, nothing it calls is kept.
        cuts_beneath: bool,
    }

    impl Location {
        /// What pprof's `Prune` does to a location with `names` (innermost first).
        fn new(mut names: Vec<String>, frames: &AllocatorFrames) -> Self {
            let Some(outermost) = names.iter().rposition(|name| frames.matches(name)) else {
                return Self {
                    names,
                    ..Self::default()
                };
            };
            let dropped = outermost == names.len() - 1;
            if !dropped {
                names.drain(..=outermost);
            }
            Self {
                names,
                dropped,
                cuts_beneath: true,
            }
        }
    }

    /// Symbolizes one return address of a sampled stack.
    fn symbolize(addr: usize, frames: &AllocatorFrames) -> Location {
        let mut names = Vec::new();
        backtrace::resolve(addr.wrapping_sub(1) as *mut std::ffi::c_void, |symbol| {
            if let Some(name) = symbol.name() {
                names.push(format!("{name:#}"));
            }
        });
        if names.is_empty() {
            names.push(format!("{addr:#x}"));
        }
        Location::new(names, frames)
    }

    /// The stacks of `profile` as inferno's folded lines (`root;…;leaf bytes`), cut where
    /// pprof's `drop_frames` cuts them: scanning from the root, at the first location with an
    /// allocator frame after the first one without (so a stack is never cut away whole).
    /// Each address is symbolized once, by `locate`.
    fn fold(profile: &StackProfile, mut locate: impl FnMut(usize) -> Location) -> Vec<String> {
        let mut locations: HashMap<usize, Location> = HashMap::new();
        let mut weights: HashMap<Vec<String>, i64> = HashMap::new();
        for (stack, _) in &profile.stacks {
            // `addrs` run from the root to the leaf.
            let mut kept: Vec<&Location> = Vec::with_capacity(stack.addrs.len());
            let mut found_user = false;
            for &addr in &stack.addrs {
                locations.entry(addr).or_insert_with(|| locate(addr));
            }
            for addr in &stack.addrs {
                let location = &locations[addr];
                if !location.cuts_beneath {
                    found_user = true;
                } else if found_user {
                    if !location.dropped {
                        kept.push(location);
                    }
                    break;
                }
                kept.push(location);
            }
            let frames: Vec<String> = kept
                .iter()
                .flat_map(|location| location.names.iter().rev().cloned())
                .collect();
            *weights.entry(frames).or_default() += stack.weight.trunc() as i64;
        }
        let mut lines: Vec<String> = weights
            .into_iter()
            .map(|(frames, weight)| format!("{} {weight}", frames.join(";")))
            .collect();
        lines.sort();
        lines
    }

    /// `gzipped`, a gzipped pprof `Profile`, with `drop_frames` set to `regex`. The message is
    /// extended, not rewritten: protobuf merges a field appended to a message, so `regex` goes
    /// at the end of the string table (field 6) and its index in `drop_frames` (field 7).
    fn with_drop_frames(gzipped: &[u8], regex: &str) -> std::io::Result<Vec<u8>> {
        use flate2::{read::GzDecoder, write::GzEncoder, Compression};
        use std::io::Write;
        let mut message = Vec::new();
        GzDecoder::new(gzipped).read_to_end(&mut message)?;
        let strings = count_field(&message, 6)?;
        push_varint(&mut message, 6 << 3 | 2);
        push_varint(&mut message, regex.len() as u64);
        message.extend_from_slice(regex.as_bytes());
        push_varint(&mut message, 7 << 3);
        push_varint(&mut message, strings);
        let mut out = GzEncoder::new(Vec::new(), Compression::default());
        out.write_all(&message)?;
        out.finish()
    }

    /// How many times top-level field `field` occurs in the protobuf `message`.
    fn count_field(message: &[u8], field: u64) -> std::io::Result<u64> {
        let malformed = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed pprof");
        let (mut at, mut count) = (0, 0);
        while at < message.len() {
            let tag = read_varint(message, &mut at).ok_or_else(malformed)?;
            let skip = match tag & 7 {
                0 => read_varint(message, &mut at).map(|_| 0),
                1 => Some(8),
                2 => read_varint(message, &mut at).and_then(|len| usize::try_from(len).ok()),
                5 => Some(4),
                _ => None,
            }
            .ok_or_else(malformed)?;
            at = at
                .checked_add(skip)
                .filter(|&end| end <= message.len())
                .ok_or_else(malformed)?;
            count += u64::from(tag >> 3 == field);
        }
        Ok(count)
    }

    fn read_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *bytes.get(*at)?;
            *at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn push_varint(out: &mut Vec<u8>, mut value: u64) {
        while value >= 0x80 {
            out.push(value as u8 | 0x80);
            value >>= 7;
        }
        out.push(value as u8);
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn drop_frames_names_the_builds_allocator_frames() {
            assert_eq!(
                AllocatorFrames::of(true).regex(),
                "_rjem_.*|prof_backtrace_impl|__rust_alloc|__rust_alloc_zeroed|__rust_realloc\
                 |__rdl_.*|<tikv_jemallocator::Jemalloc as .*\
                 |<tower_jemalloc::allocator::Jemalloc as .*|alloc::alloc::.*|alloc::raw_vec::.*"
            );
            let unprefixed = AllocatorFrames::of(false);
            assert!(unprefixed.regex().starts_with("je_.*|malloc|calloc|"));
            assert!(unprefixed.matches("je_prof_backtrace") && unprefixed.matches("malloc"));
            assert!(!unprefixed.matches("_rjem_malloc") && !unprefixed.matches("malloc_trim"));
            let prefixed = AllocatorFrames::of(true);
            assert!(prefixed.matches("_rjem_je_prof_backtrace"));
            assert!(prefixed.matches("alloc::raw_vec::RawVecInner<A>::try_allocate_in"));
            assert!(!prefixed.matches("malloc") && !prefixed.matches("app::alloc::alloc::x"));
        }

        /// Folds stacks of made-up addresses whose "symbols" are given per address.
        fn folded(stacks: &[&[usize]], symbols: &[(usize, &[&str])]) -> Vec<String> {
            let frames = AllocatorFrames::of(true);
            let mut profile = StackProfile::default();
            for addrs in stacks {
                let stack = WeightedStack {
                    addrs: addrs.to_vec(),
                    weight: 1000.0,
                };
                profile.push_stack(stack, None);
            }
            fold(&profile, |addr| {
                let (_, names) = symbols.iter().find(|(a, _)| *a == addr).unwrap();
                Location::new(names.iter().map(|n| n.to_string()).collect(), &frames)
            })
        }

        #[test]
        fn the_flame_graph_is_cut_where_drop_frames_cuts() {
            let symbols: &[(usize, &[&str])] = &[
                (1, &["main"]),
                (2, &["app::leak"]),
                (3, &["alloc::raw_vec::RawVec<T>::with_capacity"]),
                (4, &["__rust_alloc"]),
                (5, &["_rjem_malloc"]),
                (6, &["prof_backtrace_impl"]),
                // Allocation plumbing inlined into the application's function.
                (
                    7,
                    &[
                        "alloc::raw_vec::RawVecInner::try_allocate_in",
                        "app::inlined",
                    ],
                ),
                (8, &["_rjem_start"]),
            ];
            assert_eq!(
                folded(&[&[1, 2, 3, 4, 5, 6]], symbols),
                ["main;app::leak 1000"]
            );
            // Only the application's frames of an inlined location are kept.
            assert_eq!(
                folded(&[&[1, 7, 4, 5, 6], &[1, 2, 5]], symbols),
                ["main;app::inlined 1000", "main;app::leak 1000"]
            );
            // Nothing is cut before the first application frame from the root.
            assert_eq!(folded(&[&[8, 1, 5, 6]], symbols), ["_rjem_start;main 1000"]);
        }

        #[test]
        fn drop_frames_is_appended_after_the_string_table() {
            let mut profile = StackProfile::default();
            profile.push_stack(
                WeightedStack {
                    addrs: vec![1, 2],
                    weight: 4096.0,
                },
                None,
            );
            let pprof = profile.to_pprof(("inuse_space", "bytes"), ("space", "bytes"), None);
            let mut plain = Vec::new();
            flate2::read::GzDecoder::new(&pprof[..])
                .read_to_end(&mut plain)
                .unwrap();
            let strings = count_field(&plain, 6).unwrap();
            assert!(strings >= 4, "\"\", inuse_space, space and bytes at least");

            let extended = with_drop_frames(&pprof, "x|y").unwrap();
            let mut message = Vec::new();
            flate2::read::GzDecoder::new(&extended[..])
                .read_to_end(&mut message)
                .unwrap();
            assert_eq!(
                &message[..plain.len()],
                &plain[..],
                "the profile is kept as it was"
            );
            let mut tail = vec![6 << 3 | 2, 3];
            tail.extend_from_slice(b"x|y");
            tail.extend_from_slice(&[7 << 3, strings as u8]);
            assert_eq!(&message[plain.len()..], &tail[..]);
            assert_eq!(count_field(&message, 6).unwrap(), strings + 1);
            assert!(count_field(&message[..3], 6).is_err(), "cut short");
        }

        fn profile(stacks: &[(&[usize], f64)]) -> StackProfile {
            let mut profile = StackProfile::default();
            for (addrs, weight) in stacks {
                let stack = WeightedStack {
                    addrs: addrs.to_vec(),
                    weight: *weight,
                };
                profile.push_stack(stack, None);
            }
            profile
        }

        #[test]
        fn growth_is_end_minus_start_per_stack() {
            let start = profile(&[(&[1, 2], 100.0), (&[3], 50.0), (&[4], 7.0)]);
            let end = profile(&[(&[1, 2], 160.0), (&[3], 50.0), (&[5], 30.0)]);
            let mut grown: Vec<(Vec<usize>, f64)> = growth(start, end)
                .stacks
                .into_iter()
                .map(|(stack, _)| (stack.addrs, stack.weight))
                .collect();
            grown.sort_by(|a, b| a.0.cmp(&b.0));
            assert_eq!(
                grown,
                [(vec![1, 2], 60.0), (vec![4], -7.0), (vec![5], 30.0)]
            );
        }
    }
}

#[cfg(not(profiling))]
mod imp {
    use super::{ProfileFormat, ProfilingError, ProfilingStatus};
    use std::time::Duration;

    /// jemalloc's own answer first (not compiled in: 501; not the global allocator: 503),
    /// then the profiler's.
    fn not_compiled() -> ProfilingError {
        match crate::jemalloc::ctl::ctl() {
            Err(e) => ProfilingError::Jemalloc(e),
            Ok(_) => ProfilingError::NotCompiled,
        }
    }

    pub(crate) fn status() -> Result<ProfilingStatus, ProfilingError> {
        Err(not_compiled())
    }

    pub(crate) fn ready(_: &str) -> Result<(), ProfilingError> {
        Err(not_compiled())
    }

    pub(crate) fn set_active(
        _: bool,
        _: Option<Duration>,
    ) -> Result<(ProfilingStatus, ProfilingStatus), ProfilingError> {
        Err(not_compiled())
    }

    pub(crate) fn set_sampling(
        _: u32,
    ) -> Result<(ProfilingStatus, ProfilingStatus), ProfilingError> {
        Err(not_compiled())
    }

    pub(crate) fn heap_profile(
        _: ProfileFormat,
        _: Option<Duration>,
        _: u64,
        _: impl FnOnce(Duration) -> bool,
    ) -> Result<Vec<u8>, ProfilingError> {
        Err(not_compiled())
    }
}
