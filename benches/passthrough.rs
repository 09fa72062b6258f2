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

use bytes::Bytes;
use criterion::{BatchSize, Criterion};
use http::{Request, Response};
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

fn count(mode: &str) {
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
        other => panic!("PASSTHROUGH_COUNT is `with`, `without` or `governor`, not `{other}`"),
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
