//! P1 (micro): what the layer adds to a forwarded request's `call`, measured against the same
//! inner service without it. The inner service answers at once, so the difference is the
//! layer's own cost: the path comparisons and the future/body wrapping.
//!
//! `cargo bench --bench passthrough` times one `call`, polled to completion; the request is
//! built and the response dropped outside the timed part, so the figure is the call alone.
//!
//! Timings of a few tens of nanoseconds move by more than the layer's cost from one build or
//! run to the next, so the bench also counts instructions, which do not:
//!
//! ```sh
//! cargo bench --bench passthrough --no-run   # prints the bench binary's path
//! PASSTHROUGH_COUNT=with valgrind --tool=callgrind --toggle-collect='*calls_in_a_row*' <binary>
//! PASSTHROUGH_COUNT=without valgrind --tool=callgrind --toggle-collect='*calls_in_a_row*' <binary>
//! PASSTHROUGH_COUNT=governor valgrind --tool=callgrind --toggle-collect='*calls_in_a_row*' <binary>
//! ```
//!
//! (`governor`: the layer with a memory limit set and shedding on, never reached.)
//!
//! Each run makes [`COUNTED_CALLS`] calls inside `calls_in_a_row`; the difference of the two
//! `Collected` totals divided by that is the instructions the layer adds per forwarded call.
//! The responses are kept, and dropped after the counted part, so their bodies are never
//! polled.
//!
//! Bytes per request (`per_route_allocation`) are recorded when a response's body drops, and
//! each poll of the body is counted, so their cost is measured on whole requests instead:
//! `requests_in_a_row` calls, polls the response's body to its end and drops the response,
//! [`COUNTED_CALLS`] times, inside the counted part. The inner service's body yields
//! `PASSTHROUGH_FRAMES` data frames (default 1), so a request's body is polled that many times
//! plus one:
//!
//! ```sh
//! PASSTHROUGH_COUNT=requests-without valgrind --tool=callgrind --toggle-collect='*requests_in_a_row*' <binary>
//! PASSTHROUGH_COUNT=requests-with    valgrind --tool=callgrind --toggle-collect='*requests_in_a_row*' <binary>
//! PASSTHROUGH_COUNT=accounting       valgrind --tool=callgrind --toggle-collect='*requests_in_a_row*' <binary>
//! PASSTHROUGH_COUNT=accounting PASSTHROUGH_FRAMES=64 valgrind --tool=callgrind --toggle-collect='*requests_in_a_row*' <binary>
//! ```
//!
//! (`requests-with`: the layer as built by default, bytes per request off; `accounting`: the
//! same with `per_route_allocation(true)`, requests unmatched; `accounting-routed`: the same
//! with `route_from` naming every request's route.) `accounting` minus `requests-with`,
//! divided by [`COUNTED_CALLS`], is what counting a request's bytes adds to it, the record
//! included; the same difference at two frame counts, divided by the difference in polls, is
//! what it adds to one poll of the body.

use bytes::Bytes;
use criterion::{BatchSize, Criterion};
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::Full;
use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use tower::{Layer, Service};
use tower_jemalloc::JemallocLayer;

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

/// Calls made in a counting run (`PASSTHROUGH_COUNT`).
const COUNTED_CALLS: usize = 10_000;

/// Calls `service` once and polls the future to completion (it is always ready at once).
#[inline(always)]
fn call_once<S>(service: &mut S, request: Request<Full<Bytes>>) -> S::Response
where
    S: Service<Request<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    assert!(service.poll_ready(&mut cx).is_ready());
    let mut future = pin!(service.call(request));
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(response) => response.unwrap(),
        Poll::Pending => unreachable!("the inner service answers at once"),
    }
}

fn request() -> Request<Full<Bytes>> {
    Request::get("/api/v1/items?page=2")
        .header("accept", "application/json")
        .body(Full::default())
        .unwrap()
}

/// The inner service: answers at once. Its `call` is kept out of line, as a real router's is,
/// so that both variants call the same function and differ only by the layer.
#[derive(Clone, Copy)]
struct Answer;

impl Service<Request<Full<Bytes>>> for Answer {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    #[inline(never)]
    fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
        drop(request);
        ready(Ok(Response::new(Full::new(Bytes::from_static(b"ok")))))
    }
}

/// An inner service that answers at once with a body of `frames` static data frames (no
/// allocation, so that the bodies' polls cost the same whatever counts them).
#[derive(Clone, Copy)]
struct Chunked {
    frames: usize,
}

/// The body of [`Chunked`]'s responses.
struct Chunks {
    left: usize,
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    #[inline(never)]
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        self.left -= 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"chunk")))))
    }
}

impl Service<Request<Full<Bytes>>> for Chunked {
    type Response = Response<Chunks>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    #[inline(never)]
    fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
        drop(request);
        ready(Ok(Response::new(Chunks { left: self.frames })))
    }
}

fn passthrough(c: &mut Criterion) {
    let mut bare = Answer;
    let mut layered = JemallocLayer::builder().build().unwrap().layer(Answer);

    let mut group = c.benchmark_group("passthrough");
    group.bench_function("without layer", |b| {
        b.iter_batched(
            request,
            |req| call_once(&mut bare, req),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("with layer", |b| {
        b.iter_batched(
            request,
            |req| call_once(&mut layered, req),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// The counted part of a counting run: `requests.len()` calls, responses kept until the end
/// so that dropping them is not counted either.
#[inline(never)]
fn calls_in_a_row<S>(
    service: &mut S,
    requests: Vec<Request<Full<Bytes>>>,
    responses: &mut Vec<S::Response>,
) where
    S: Service<Request<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    for request in requests {
        responses.push(call_once(service, black_box(request)));
    }
}

/// The counted part of a whole-request run: `requests.len()` calls, each response's body
/// polled to its end and the response dropped, so that what happens when a body ends and
/// drops is counted too.
#[inline(never)]
fn requests_in_a_row<S, B>(service: &mut S, requests: Vec<Request<Full<Bytes>>>)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    for request in requests {
        let response = call_once(service, black_box(request));
        let mut body = pin!(response.into_body());
        loop {
            match body.as_mut().poll_frame(&mut cx) {
                Poll::Ready(Some(frame)) => drop(black_box(frame.unwrap())),
                Poll::Ready(None) => break,
                Poll::Pending => unreachable!("the body is always ready"),
            }
        }
    }
}

fn count_requests(mode: &str) {
    fn run<S, B>(mut service: S)
    where
        S: Service<Request<Full<Bytes>>, Response = Response<B>>,
        S::Error: std::fmt::Debug,
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Debug,
    {
        let requests: Vec<_> = (0..COUNTED_CALLS).map(|_| request()).collect();
        requests_in_a_row(&mut service, requests);
    }
    let frames = std::env::var("PASSTHROUGH_FRAMES")
        .map(|n| n.parse().expect("PASSTHROUGH_FRAMES is a number of frames"))
        .unwrap_or(1);
    let inner = Chunked { frames };
    let builder = JemallocLayer::builder;
    match mode {
        "requests-without" => run(inner),
        "requests-with" => run(builder().build().unwrap().layer(inner)),
        "accounting" => run(builder()
            .per_route_allocation(true)
            .build()
            .unwrap()
            .layer(inner)),
        "accounting-routed" => run(builder()
            .per_route_allocation(true)
            .route_from(|_| Some("/api/v1/items"))
            .build()
            .unwrap()
            .layer(inner)),
        _ => unreachable!("checked by the caller"),
    }
    println!("{COUNTED_CALLS} requests ({mode}), {frames} frames each");
}

fn count(mode: &str) {
    if matches!(
        mode,
        "requests-without" | "requests-with" | "accounting" | "accounting-routed"
    ) {
        return count_requests(mode);
    }
    fn run<S>(mut service: S)
    where
        S: Service<Request<Full<Bytes>>>,
        S::Error: std::fmt::Debug,
    {
        let requests: Vec<_> = (0..COUNTED_CALLS).map(|_| request()).collect();
        let mut responses = Vec::with_capacity(COUNTED_CALLS);
        calls_in_a_row(&mut service, requests, &mut responses);
        black_box(responses);
    }
    match mode {
        "with" => run(JemallocLayer::builder().build().unwrap().layer(Answer)),
        "without" => run(Answer),
        // The memory governor running, with a limit far above this process's use (never
        // shedding, polling at its slowest): what a forwarded call pays for the shedding check.
        "governor" => run(JemallocLayer::builder()
            .memory_limit(tower_jemalloc::MemoryLimit::Bytes(1 << 40))
            .shed_requests(true)
            .build()
            .unwrap()
            .layer(Answer)),
        other => panic!(
            "PASSTHROUGH_COUNT is `with`, `without`, `governor`, `requests-without`, \
             `requests-with`, `accounting` or `accounting-routed`, not `{other}`"
        ),
    }
    println!("{COUNTED_CALLS} calls {mode} the layer");
}

fn main() {
    if let Ok(mode) = std::env::var("PASSTHROUGH_COUNT") {
        count(&mode);
        return;
    }
    let mut criterion = Criterion::default().configure_from_args();
    passthrough(&mut criterion);
    criterion.final_summary();
}
