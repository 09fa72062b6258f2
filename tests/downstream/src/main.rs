//! What a user of tower-jemalloc can do with it alone (plus serde_json):
//!
//! 1. record a counter of their own through the re-exported `opentelemetry` and see it in the
//!    layer's registry, through the re-exported `prometheus`;
//! 2. read a purge answer into `PurgeReport` with serde: from the example server when an
//!    address is given (`downstream 127.0.0.1:9070`), from a sample answer otherwise.
//!
//! Exits 0 when both work, 1 with the reason otherwise.

use std::io::{Read, Write};
use tower_jemalloc::opentelemetry::metrics::MeterProvider;
use tower_jemalloc::{JemallocLayer, PurgeReport};

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

fn main() {
    if let Err(reason) = run() {
        eprintln!("downstream: {reason}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    // 1. Our own counter, on the layer's provider, exported with the layer's namespace.
    let layer = JemallocLayer::builder()
        .namespace("shop")
        .build()
        .map_err(|e| e.to_string())?;
    let meter = layer.meter_provider().ok_or("no provider")?.meter("shop");
    meter.u64_counter("orders").build().add(3, &[]);
    let families = layer.registry().gather();
    let orders = families
        .iter()
        .find(|family| family.name() == "shop_orders_total")
        .ok_or("shop_orders_total is not in the layer's registry")?;
    let value = orders.get_metric()[0].get_counter().get_value();
    if value != 3.0 {
        return Err(format!("shop_orders_total is {value}, not 3"));
    }
    println!("own counter: shop_orders_total = {value}");

    // 2. A purge answer, read back with serde.
    let body = match std::env::args().nth(1) {
        Some(addr) => post(&addr, "/debug/jemalloc/purge")?,
        None => SAMPLE.to_owned(),
    };
    let report: PurgeReport =
        serde_json::from_str(&body).map_err(|e| format!("not a PurgeReport ({e}): {body}"))?;
    println!(
        "purge report: mode {}, {} arenas, released {} bytes in {:?}",
        report.mode.as_str(),
        report.arenas_purged,
        report.released_bytes(),
        report.duration
    );
    // The OS's view, where the server could read it (Linux): named fields, not a tuple.
    if let Some(os) = report.os {
        println!(
            "process RSS: {} bytes before, {} after, {} released",
            os.before.rss,
            os.after.rss,
            os.rss_released()
        );
    }
    Ok(())
}

/// The purge answer of the README.
const SAMPLE: &str = r#"{"before":{"allocated":2148120,"active":2473984,"metadata":22080944,"mapped":583536640,"retained":60289024,"resident":565649408,"dirty":541216768,"muzzy":0},"after":{"allocated":2148120,"active":2473984,"metadata":22080944,"mapped":42319872,"retained":601505792,"resident":24432640,"dirty":0,"muzzy":0},"arenas_purged":9,"released_bytes":541216768,"duration_seconds":0.070112803,"mode":"purge","os":{"before":{"rss":580000000,"lazy_free":0},"after":{"rss":39000000,"lazy_free":0}}}"#;

/// `POST path` over HTTP/1.1 to `addr` with nothing but std, and the body of a 200 answer.
fn post(addr: &str, path: &str) -> Result<String, String> {
    let mut stream = std::net::TcpStream::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| e.to_string())?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or("no end of headers in the answer")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("POST {path}: {head}"));
    }
    Ok(body.to_owned())
}
