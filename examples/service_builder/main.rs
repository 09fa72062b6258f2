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

use std::net::SocketAddr;
use std::time::Duration;
use tower_jemalloc::JemallocLayer;

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

const USAGE: &str = "usage: service_builder [--addr HOST:PORT] [--namespace NAME]
  --addr HOST:PORT  address to listen on (default 127.0.0.1:9073)
  --namespace NAME  prefix of every exported metric name (default: none)";

/// The deadline of the application's own handlers (not of scrapes or purges).
const HANDLER_TIMEOUT: Duration = Duration::from_secs(5);

struct Args {
    addr: SocketAddr,
    namespace: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: SocketAddr::from(([127, 0, 0, 1], 9073)),
        namespace: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match flag.as_str() {
            "--addr" => {
                let addr = value("--addr")?;
                args.addr = addr
                    .parse()
                    .map_err(|e| format!("--addr {addr:?}: {e} (expected HOST:PORT)"))?;
            }
            "--namespace" => args.namespace = Some(value("--namespace")?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("error: {e}\n{USAGE}");
        std::process::exit(2);
    });

    let mut builder = JemallocLayer::builder();
    if let Some(namespace) = &args.namespace {
        builder = builder.namespace(namespace);
    }
    let layer = builder.build().unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(2);
    });
    let service = app::stack(
        layer,
        HANDLER_TIMEOUT,
        app::AccessLog::new(|line| println!("{line}")),
    );

    let listener = match tokio::net::TcpListener::bind(args.addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", args.addr);
            std::process::exit(1);
        }
    };
    let addr = listener
        .local_addr()
        .expect("bound listener has an address");
    println!("listening on http://{addr}");
    println!("  curl -s --compressed http://{addr}/");
    println!("  curl -s http://{addr}/metrics | grep jemalloc");
    println!("  curl -s -X POST http://{addr}/debug/jemalloc/purge");
    println!("  curl -s http://{addr}/slow   # 408 after {HANDLER_TIMEOUT:?}");

    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        println!("shutting down");
    };
    app::serve(listener, service, shutdown, Duration::from_secs(10)).await;
}
