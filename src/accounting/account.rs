//! One request's account: the bytes counted while its future and body were polled, the bytes
//! work it handed to other threads brought in, and its route.

use super::ledger::{Ledger, SeriesKey, UNMATCHED};
use crate::jemalloc::thread::ThreadTotals;
use http::StatusCode;
use pin_project_lite::pin_project;
use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

/// Bytes counted on the threads that polled a request, summed over its polls.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Tally {
    allocated: u64,
    freed: u64,
}

impl Tally {
    /// Runs `f`, counting what the calling thread allocates and frees meanwhile: two readings
    /// of the thread's totals, two plain loads each. For work handed to other threads
    /// ([`RequestAccount::in_scope`], [`Instrumented`]). The request's own polls read the
    /// totals around the poll instead: its future with [`ThreadTotals::now`] and
    /// [`add_since`](Self::add_since), its body, polled many times, with
    /// [`open`](Self::open). Through this closure the compiler moved each poll's result once
    /// more (14 instructions for a body's frame, as many as the readings themselves).
    #[inline(always)]
    pub(crate) fn measure<R>(&mut self, f: impl FnOnce() -> R) -> R {
        let before = ThreadTotals::now();
        let result = f();
        self.add_since(before);
        result
    }

    /// Adds what the calling thread allocated and freed since `before`.
    #[inline(always)]
    pub(crate) fn add_since(&mut self, before: ThreadTotals) {
        let now = ThreadTotals::now();
        self.allocated = self
            .allocated
            .wrapping_add(now.allocated.wrapping_sub(before.allocated));
        self.freed = self
            .freed
            .wrapping_add(now.freed.wrapping_sub(before.freed));
    }

    /// Starts counting what the calling thread allocates and frees, until the guard drops
    /// (when unwinding too); `None` on a thread that has not read its totals yet (call
    /// [`ThreadTotals::now`] once, out of line, then again). The reading is folded into the
    /// tally at once rather than held across the work, and this makes no call: nothing
    /// stays in registers across the poll the guard spans.
    #[inline(always)]
    pub(crate) fn open(&mut self) -> Option<Measuring<'_>> {
        let reading = ThreadTotals::known();
        if reading.known == 0 {
            return None;
        }
        let now = reading.totals;
        self.allocated = self.allocated.wrapping_sub(now.allocated);
        self.freed = self.freed.wrapping_sub(now.freed);
        Some(Measuring { tally: self })
    }

    /// Counts `bytes` as freed: data handed to the server, which frees it after writing it,
    /// outside any poll the layer sees.
    #[inline]
    pub(crate) fn hand_over(&mut self, bytes: u64) {
        self.freed = self.freed.wrapping_add(bytes);
    }
}

/// A tally counting: see [`Tally::open`].
pub(crate) struct Measuring<'a> {
    tally: &'a mut Tally,
}

impl Drop for Measuring<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        let now = ThreadTotals::now();
        self.tally.allocated = self.tally.allocated.wrapping_add(now.allocated);
        self.tally.freed = self.tally.freed.wrapping_add(now.freed);
    }
}

/// No route set by [`RequestAccount::set_route`].
const NO_ROUTE: u32 = u32::MAX;

/// The account of one forwarded request, while the layer counts the bytes each request
/// allocates ([`per_route_allocation`](crate::JemallocLayerBuilder::per_route_allocation)).
///
/// [`RequestAccount::current`] gives it to the code the request runs (the inner service's
/// `call` and every poll of its future: the handler, and the middleware inside the layer),
/// on whichever thread polls it, for two things:
///
/// - **Work on other threads.** The layer counts what the threads polling the request's
///   future and body allocate, so work a handler moves to `spawn_blocking`, a thread pool or
///   another task is not seen. Run it inside [`in_scope`](Self::in_scope) (a closure) or
///   [`instrument`](Self::instrument) (a future) and its bytes are added to the request's.
///   Only what such work does before the request's response body ends counts: the request is
///   recorded then. Do not use them for work that runs inside the request's own polls (it
///   would be counted twice).
/// - **The route.** [`set_route`](Self::set_route) names the request's `http.route`;
///   [`RouteLayer`](crate::RouteLayer) does it for axum's matched route template.
///
/// It is found through the thread rather than the request's extensions: inserting into them
/// costs every request a map of its own (about 500 instructions, a fifth of the whole
/// budget), and the thread is where the polls are. Cloning it is cheap (one reference
/// count); it is `Send + Sync`.
///
/// ```
/// use tower_jemalloc::RequestAccount;
///
/// async fn handler() -> usize {
///     let account = RequestAccount::current();
///     let work = || vec![0u8; 1 << 20].len();
///     tokio::task::spawn_blocking(move || match account {
///         Some(account) => account.in_scope(work),
///         None => work(), // bytes per route are off
///     })
///     .await
///     .unwrap()
/// }
/// # drop(handler);
/// ```
#[derive(Clone)]
pub struct RequestAccount {
    state: Arc<State>,
}

struct State {
    ledger: Arc<Ledger>,
    route: AtomicU32,
    away_allocated: AtomicU64,
    away_freed: AtomicU64,
}

impl std::fmt::Debug for RequestAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestAccount")
            .field("away_allocated", &self.state.away_allocated.load(Relaxed))
            .field("away_freed", &self.state.away_freed.load(Relaxed))
            .finish_non_exhaustive()
    }
}

impl RequestAccount {
    pub(crate) fn new(ledger: Arc<Ledger>) -> Self {
        Self {
            state: Arc::new(State {
                ledger,
                route: AtomicU32::new(NO_ROUTE),
                away_allocated: AtomicU64::new(0),
                away_freed: AtomicU64::new(0),
            }),
        }
    }

    /// The account of the request whose code is running on this thread: inside the inner
    /// service's `call` or a poll of its future (and inside [`in_scope`](Self::in_scope) and
    /// [`instrument`](Self::instrument)); `None` elsewhere, and when the layer does not count
    /// bytes per route.
    pub fn current() -> Option<RequestAccount> {
        CURRENT.with(|current| {
            let account = current.take();
            current.set(account.clone());
            account
        })
    }

    /// Makes this account the thread's current one until the guard drops (which restores
    /// the one before, even when unwinding).
    #[inline]
    pub(crate) fn enter(&self) -> Entered {
        Entered {
            previous: CURRENT.replace(Some(self.clone())),
        }
    }

    /// Names the request's route (`http.route`): a route template such as `/users/{id}`,
    /// never a raw path with ids in it. Past the layer's cap on distinct routes
    /// ([`max_routes`](crate::JemallocLayerBuilder::max_routes)) a new name is recorded as
    /// [`OTHER_ROUTE`](crate::OTHER_ROUTE). The last name set wins.
    pub fn set_route(&self, route: &str) {
        let id = self.state.ledger.route_id(route);
        self.state.route.store(id, Relaxed);
    }

    /// Runs `f` on the calling thread and adds what it allocates and frees to the request's
    /// bytes: for work a handler moves to `spawn_blocking` or a thread of its own.
    pub fn in_scope<R>(&self, f: impl FnOnce() -> R) -> R {
        let mut tally = Tally::default();
        let result = {
            let _entered = self.enter();
            tally.measure(f)
        };
        self.add(tally);
        result
    }

    /// Wraps `future` so that what each of its polls allocates and frees is added to the
    /// request's bytes: for work a handler spawns as a task of its own.
    pub fn instrument<F: Future>(&self, future: F) -> Instrumented<F> {
        Instrumented {
            future,
            account: self.clone(),
        }
    }

    fn add(&self, tally: Tally) {
        self.state
            .away_allocated
            .fetch_add(tally.allocated, Relaxed);
        self.state.away_freed.fetch_add(tally.freed, Relaxed);
    }
}

thread_local! {
    /// The account of the request whose code runs on this thread now.
    static CURRENT: Cell<Option<RequestAccount>> = const { Cell::new(None) };
}

/// While alive, an account is the thread's current one: see [`RequestAccount::enter`].
pub(crate) struct Entered {
    previous: Option<RequestAccount>,
}

impl Drop for Entered {
    #[inline]
    fn drop(&mut self) {
        let _ours = CURRENT.replace(self.previous.take());
    }
}

pin_project! {
    /// A future whose polls count toward a request's bytes, from
    /// [`RequestAccount::instrument`].
    #[derive(Debug)]
    pub struct Instrumented<F> {
        #[pin]
        future: F,
        account: RequestAccount,
    }
}

impl<F: Future> Future for Instrumented<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let mut tally = Tally::default();
        let poll = {
            let _entered = this.account.enter();
            tally.measure(|| this.future.poll(cx))
        };
        this.account.add(tally);
        poll
    }
}

/// Records a request when it ends: what its polls counted, what work elsewhere added, under
/// its method, route and status. Moves from the request's future to its response body, and
/// records when dropped, so that a request that fails or goes away is recorded too (without
/// a status).
#[derive(Debug)]
pub(crate) struct Recorder {
    pub(crate) tally: Tally,
    account: RequestAccount,
    method: u8,
    status: u16,
    /// The route the builder's `route_from` named, kept only if the application answers the
    /// request as one it knows (see [`respond`](Self::respond)). Not a route id yet: a name
    /// counts against the cap on routes only once such an answer confirms it.
    provisional: Option<Box<str>>,
    /// The readings when the response body's drop started: what dropping it frees counts.
    dropping: Option<ThreadTotals>,
}

impl Recorder {
    pub(crate) fn new(
        account: RequestAccount,
        method: u8,
        provisional: Option<Box<str>>,
        tally: Tally,
    ) -> Self {
        Self {
            tally,
            account,
            method,
            status: 0,
            provisional,
            dropping: None,
        }
    }

    /// The response arrived: its status, and whether the application knew the request. A
    /// route from outside the application's router (`route_from`) becomes the request's
    /// route only when the answer is neither a 404 nor a gRPC `Unimplemented` (tonic's answer
    /// to a method it does not serve), so that requests for unknown paths share
    /// [`UNMATCHED_ROUTE`](crate::UNMATCHED_ROUTE) and cannot use up the cap on routes. A
    /// route set inside the router ([`RequestAccount::set_route`]) wins.
    pub(crate) fn respond(&mut self, status: StatusCode, headers: &http::HeaderMap) {
        self.status = status.as_u16();
        let Some(provisional) = self.provisional.take() else {
            return;
        };
        let state = &self.account.state;
        let unknown = status == StatusCode::NOT_FOUND
            || headers
                .get("grpc-status")
                .is_some_and(|code| code.as_bytes() == b"12");
        if !unknown && state.route.load(Relaxed) == NO_ROUTE {
            let id = state.ledger.route_id(&provisional);
            state.route.store(id, Relaxed);
        }
    }

    /// The request's account.
    pub(crate) fn account(&self) -> &RequestAccount {
        &self.account
    }

    /// The response body's drop is starting: what it frees from here on counts.
    pub(crate) fn dropping(&mut self) {
        self.dropping = Some(ThreadTotals::now());
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if let Some(before) = self.dropping {
            self.tally.add_since(before);
        }
        let state = &self.account.state;
        // Without an answer (the service failed, or the request went away), a route named by
        // `route_from` counts only if the ledger knows it already.
        let route = match (state.route.load(Relaxed), &self.provisional) {
            (NO_ROUTE, Some(name)) => state.ledger.known_route_id(name).unwrap_or(UNMATCHED),
            (NO_ROUTE, None) => UNMATCHED,
            (route, _) => route,
        };
        let key = SeriesKey {
            route,
            method: self.method,
            status: self.status,
        };
        let allocated = self
            .tally
            .allocated
            .wrapping_add(state.away_allocated.load(Relaxed));
        let freed = self
            .tally
            .freed
            .wrapping_add(state.away_freed.load(Relaxed));
        state.ledger.record(key, allocated, freed);
    }
}
