//! The jemalloc layer inside a `tower::ServiceBuilder` stack with tower-http layers on both
//! sides of it; `app.rs` explains what each position means.
//!
//! ```text
//! cargo run --release --example service_builder [-- --addr 127.0.0.1:9073 --namespace NAME]
//! curl -s --compressed http://127.0.0.1:9073/ -D -        # gzip from CompressionLayer
//! curl -s http://127.0.0.1:9073/metrics | grep jemalloc    # logged by the TraceLayer outside
//! curl -s -X POST http://127.0.0.1:9073/debug/jemalloc/purge
//! curl -s http://127.0.0.1:9073/slow -D -                  # 408 after 5 s: the inner timeout
//! ```

mod app;

use std::time::Duration;

#[path = "../common/mod.rs"]
mod common;

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

/// The deadline of the application's own handlers (not of scrapes or purges).
const HANDLER_TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() {
    let args = common::parse("service_builder", 9073, &[]);

    let layer = args.layer();
    let service = app::stack(
        layer,
        HANDLER_TIMEOUT,
        app::AccessLog::new(|line| println!("{line}")),
    );

    let listener = args.listen().await;
    let addr = listener
        .local_addr()
        .expect("bound listener has an address");
    println!("listening on http://{addr}");
    println!("  curl -s --compressed http://{addr}/");
    println!("  curl -s http://{addr}/metrics | grep jemalloc");
    println!("  {}", args.purge_command(addr));
    println!("  curl -s http://{addr}/slow   # 408 after {HANDLER_TIMEOUT:?}");

    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        println!("shutting down");
    };
    common::serve::serve(listener, service, shutdown, Duration::from_secs(10)).await;
}
