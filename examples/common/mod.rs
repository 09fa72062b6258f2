//! What every example shares: its flags (`--addr`, `--namespace`, `--purge-token` and the
//! example's own), building the layer from them, and binding the listener. Included by each
//! example with `#[path = "common/mod.rs"] mod common;`.
#![allow(dead_code)]

pub mod serve;

use std::collections::HashMap;
use std::net::SocketAddr;
use tower_jemalloc::{Endpoint, JemallocLayer, JemallocLayerBuilder};

/// An example-specific flag that takes a value: name (`--interval`), value name, help.
pub type Flag = (&'static str, &'static str, &'static str);

/// The parsed command line.
pub struct Args {
    pub addr: SocketAddr,
    pub namespace: Option<String>,
    /// `--purge-token`, or the `PURGE_TOKEN` environment variable.
    pub purge_token: Option<String>,
    extra: HashMap<&'static str, String>,
}

impl Args {
    /// The value of an example-specific flag, if given.
    pub fn extra(&self, flag: &str) -> Option<&str> {
        self.extra.get(flag).map(String::as_str)
    }

    /// A layer builder with the namespace and purge token from the command line.
    ///
    /// The debug endpoints (purge, and stats, heap and profiling, which follow purge's rules)
    /// are closed until they have an access rule. With a token they require it; without one
    /// they are opened to anyone only when the example listens on a loopback address, where
    /// only this machine can reach them (and then answer only requests addressed to an IP or
    /// `localhost`, never a browser's cross-site write, so no website can use them through a
    /// browser on this machine). On any other address without a token the example refuses to start.
    pub fn builder(&self) -> JemallocLayerBuilder {
        let mut builder = JemallocLayer::builder();
        if let Some(namespace) = &self.namespace {
            builder = builder.namespace(namespace);
        }
        match &self.purge_token {
            Some(token) => builder = builder.bearer_token(Endpoint::Purge, token),
            None if self.addr.ip().is_loopback() => {
                builder = builder.allow_anonymous(Endpoint::Purge);
            }
            None => fail(
                2,
                format_args!(
                    "{} is not a loopback address: set --purge-token TOKEN (or PURGE_TOKEN) so \
                     that the purge and stats endpoints are not open to anyone who reaches it",
                    self.addr
                ),
            ),
        }
        builder
    }

    /// The layer from the command line, or exit 2 with the reason.
    pub fn layer(&self) -> JemallocLayer {
        self.builder().build().unwrap_or_else(|e| fail(2, e))
    }

    /// Binds `--addr`, or exits 1 with the reason.
    pub async fn listen(&self) -> tokio::net::TcpListener {
        tokio::net::TcpListener::bind(self.addr)
            .await
            .unwrap_or_else(|e| fail(1, format_args!("cannot listen on {}: {e}", self.addr)))
    }

    /// The curl line for a purge, with the token header when one is required.
    pub fn purge_command(&self, addr: SocketAddr) -> String {
        match self.purge_token {
            Some(_) => format!(
                "curl -s -X POST -H \"Authorization: Bearer $PURGE_TOKEN\" http://{addr}/debug/jemalloc/purge"
            ),
            None => format!("curl -s -X POST http://{addr}/debug/jemalloc/purge"),
        }
    }
}

/// Prints `error: …` and exits with `code`.
pub fn fail(code: i32, message: impl std::fmt::Display) -> ! {
    eprintln!("error: {message}");
    std::process::exit(code)
}

/// Parses the process's arguments for example `program`, listening on 127.0.0.1:`port` by
/// default. `--help` prints the usage and exits 0; a bad argument prints it and exits 2.
pub fn parse(program: &str, port: u16, flags: &[Flag]) -> Args {
    let mut usage =
        format!("usage: {program} [--addr HOST:PORT] [--namespace NAME] [--purge-token TOKEN]");
    for (name, value, _) in flags {
        usage.push_str(&format!(" [{name} {value}]"));
    }
    usage.push_str(&format!(
        "\n  --addr HOST:PORT     address to listen on, an IP or a host name (default 127.0.0.1:{port})\
         \n  --namespace NAME     prefix of every exported metric name (default: none)\
         \n  --purge-token TOKEN  require `Authorization: Bearer TOKEN` on the purge and stats\
         \n                       endpoints (default: the PURGE_TOKEN environment variable;\
         \n                       unset: open on a loopback address, refused on any other)"
    ));
    for (name, value, help) in flags {
        usage.push_str(&format!("\n  {:<19}  {help}", format!("{name} {value}")));
    }
    parse_from(std::env::args().skip(1), port, flags).unwrap_or_else(|e| {
        if e.is_empty() {
            println!("{usage}");
            std::process::exit(0);
        }
        eprintln!("error: {e}\n{usage}");
        std::process::exit(2);
    })
}

/// `HOST:PORT` with an IP address or a host name (`localhost:9070`), as the first address it
/// resolves to.
fn resolve(addr: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = addr.parse() {
        return Ok(addr);
    }
    let mut resolved = addr
        .to_socket_addrs()
        .map_err(|e| format!("--addr {addr:?}: {e} (expected HOST:PORT, e.g. 127.0.0.1:9070)"))?;
    resolved
        .next()
        .ok_or_else(|| format!("--addr {addr:?}: the host name resolves to no address"))
}

/// `Err("")` means `--help`.
fn parse_from(
    mut it: impl Iterator<Item = String>,
    port: u16,
    flags: &[Flag],
) -> Result<Args, String> {
    let mut args = Args {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        namespace: None,
        purge_token: std::env::var("PURGE_TOKEN").ok().filter(|t| !t.is_empty()),
        extra: HashMap::new(),
    };
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match flag.as_str() {
            "--addr" => args.addr = resolve(&value("--addr")?)?,
            "--namespace" => args.namespace = Some(value("--namespace")?),
            "--purge-token" => args.purge_token = Some(value("--purge-token")?),
            "-h" | "--help" => return Err(String::new()),
            other => match flags.iter().find(|(name, _, _)| *name == other) {
                Some((name, _, _)) => {
                    let v = value(name)?;
                    args.extra.insert(name, v);
                }
                None => return Err(format!("unknown argument {other:?}")),
            },
        }
    }
    Ok(args)
}
