//! P1 (micro): what the layer adds to a forwarded request's `call`, measured against the same
//! inner service without it. The inner service answers at once, so the difference is the
//! layer's own cost: the path comparisons and the future/body wrapping.
//!
//! `cargo bench --bench passthrough`

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use http_body_util::Full;
use std::convert::Infallible;
use std::future::{ready, Future};
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use tower::{Layer, Service};
use tower_jemalloc::JemallocLayer;

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

/// Calls `service` once and polls the future to completion (it is always ready at once).
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

fn passthrough(c: &mut Criterion) {
    let inner = tower::service_fn(|_req: Request<Full<Bytes>>| {
        ready(Ok::<_, Infallible>(Response::new(Full::new(
            Bytes::from_static(b"ok"),
        ))))
    });
    let mut bare = inner;
    let mut layered = JemallocLayer::builder().build().unwrap().layer(inner);
    let request = || {
        Request::get("/api/v1/items?page=2")
            .header("accept", "application/json")
            .body(Full::default())
            .unwrap()
    };

    let mut group = c.benchmark_group("passthrough");
    group.bench_function("without layer", |b| {
        b.iter(|| black_box(call_once(&mut bare, black_box(request()))))
    });
    group.bench_function("with layer", |b| {
        b.iter(|| black_box(call_once(&mut layered, black_box(request()))))
    });
    group.finish();
}

criterion_group!(benches, passthrough);
criterion_main!(benches);
