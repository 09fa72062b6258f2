//! What every example shares: its flags (`--addr`, `--namespace`, `--purge-token` and the
//! example's own), building the layer from them, binding the listener, and printing without
//! panicking. Included by each example with `#[path = "common/mod.rs"] mod common;`.
#![allow(dead_code)]

pub mod loopback;
pub mod serve;
pub mod work;

use std::collections::HashMap;
use std::fmt::Display;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use tower_jemalloc::{Endpoint, JemallocLayer, JemallocLayerBuilder, MemoryLimit};

/// An example-specific flag: name (`--interval`), value name, help. A flag with an empty value
/// name is a switch that takes no value (`--shed-requests`): given, its value is `"true"`.
pub type Flag = (&'static str, &'static str, &'static str);

/// The example server's memory flags: `--memory-limit SIZE|none` and `--shed-requests`
/// ([`Args::memory_flags`]).
pub const MEMORY_FLAGS: &[Flag] = &[
    (
        "--memory-limit",
        "SIZE",
        "keep the process under SIZE, giving jemalloc's cached pages back\
         \n                       above 90 % of it: bytes, KiB/MiB/GiB (320MiB), a percentage of\
         \n                       the cgroup's or the machine's memory (90%), or none (default)",
    ),
    (
        "--shed-requests",
        "",
        "answer forwarded requests 503 (Retry-After: 1) while memory stays\
         \n                       over the limit, except DELETE /demo/leak, which frees memory;\
         \n                       /metrics and the debug endpoints always answer",
    ),
];

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
    /// The debug endpoints (purge, and stats, config, heap, profiling and the page, which
    /// follow purge's rules) are closed until they have an access rule. With a token they require it; without
    /// one they are opened to anyone only when the example listens on a loopback address, where
    /// only this machine can reach them (and then answer only requests addressed to an IP or
    /// `localhost`, never a browser's cross-site write, so no website can use them through a
    /// browser on this machine). On any other address without a token the example refuses to
    /// start ([`refusal`](Self::refusal)).
    pub fn builder(&self) -> JemallocLayerBuilder {
        let mut builder = JemallocLayer::builder();
        if let Some(namespace) = &self.namespace {
            builder = builder.namespace(namespace);
        }
        if let Some(reason) = self.refusal() {
            fail(2, reason);
        }
        match &self.purge_token {
            Some(token) => builder = builder.bearer_token(Endpoint::Purge, token),
            None => builder = builder.allow_anonymous(Endpoint::Purge),
        }
        builder
    }

    /// Why the example will not start with these arguments: a non-loopback address without a
    /// token would open every debug endpoint to anyone who reaches it.
    pub fn refusal(&self) -> Option<String> {
        (self.purge_token.is_none() && !self.addr.ip().is_loopback()).then(|| {
            format!(
                "{} is not a loopback address: set --purge-token TOKEN (or PURGE_TOKEN) so that \
                 the debug endpoints, {}, are not open to anyone who reaches it",
                self.addr,
                guarded_endpoints()
            )
        })
    }

    /// `builder` with the memory limit of `--memory-limit` (none when absent or `none`) and
    /// shedding when `--shed-requests` is given, or the reason the limit is not valid.
    /// Requests that free memory ([`frees_memory`]: `DELETE /demo/leak`) are never shed, or a
    /// server over its limit because of what `/demo/leak` keeps could not be brought back.
    /// Shedding without a limit is accepted: a limit may come later, at run time
    /// (`PUT /debug/jemalloc/config?memory_limit=320MiB`).
    pub fn memory_flags(
        &self,
        mut builder: JemallocLayerBuilder,
    ) -> Result<JemallocLayerBuilder, String> {
        match self.extra("--memory-limit") {
            None | Some("none") => {}
            Some(size) => {
                let limit: MemoryLimit = size
                    .parse()
                    .map_err(|e| format!("--memory-limit: {e}; or none"))?;
                builder = builder.memory_limit(limit);
            }
        }
        if self.extra("--shed-requests").is_some() {
            builder = builder
                .shed_requests(true)
                .shed_when(|request| !frees_memory(request));
        }
        Ok(builder)
    }

    /// What the memory flags set, in a line for the banner.
    pub fn memory_summary(&self) -> String {
        let shedding = if self.extra("--shed-requests").is_some() {
            "forwarded requests shed while over it"
        } else {
            "no shedding (--shed-requests)"
        };
        match self.extra("--memory-limit") {
            None | Some("none") => format!(
                "no memory limit (--memory-limit SIZE, or PUT /debug/jemalloc/config?memory_limit=SIZE); {shedding}"
            ),
            Some(size) => format!(
                "memory limit {size}: cached pages given back above 90 % of it; {shedding}"
            ),
        }
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

    /// The curl line for a purge of the server bound to `addr`, with the token header when one
    /// is required.
    pub fn purge_command(&self, addr: SocketAddr) -> String {
        let addr = reachable(addr);
        match self.purge_token {
            Some(_) => format!(
                "curl -s -X POST -H \"Authorization: Bearer $PURGE_TOKEN\" http://{addr}/debug/jemalloc/purge"
            ),
            None => format!("curl -s -X POST http://{addr}/debug/jemalloc/purge"),
        }
    }
}

/// Whether `request` frees memory (`DELETE /demo/leak`): shedding lets it through.
pub fn frees_memory(request: &http::request::Parts) -> bool {
    request.method == http::Method::DELETE && request.uri.path() == "/demo/leak"
}

/// The endpoints an access rule guards (every one but `/metrics`), as `name (path)`.
pub fn guarded_endpoints() -> String {
    Endpoint::ALL
        .iter()
        .filter(|endpoint| **endpoint != Endpoint::Metrics)
        .map(|endpoint| format!("{} ({})", endpoint.name(), endpoint.default_path()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The address to reach a server bound to `bound` at: the same, except that an unspecified
/// address (`0.0.0.0`, `[::]`, every address of the machine) is reached through loopback.
pub fn reachable(bound: SocketAddr) -> SocketAddr {
    match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, bound.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, bound.port()).into(),
        _ => bound,
    }
}

/// The first line an example prints: `listening on http://…` with a URL that works from this
/// machine, and what it is bound to when that is every address.
pub fn listening(bound: SocketAddr) -> String {
    let url = reachable(bound);
    if url == bound {
        format!("listening on http://{url}")
    } else {
        let every = if bound.is_ipv4() { "IPv4" } else { "IPv6" };
        format!(
            "listening on http://{url} (bound to {bound}: every {every} address of this machine)"
        )
    }
}

/// Writes `text` and a newline to `out`, ignoring failure: an example whose output was piped
/// into `head`, or closed, keeps serving instead of panicking as `println!` would on EPIPE.
pub fn say_to(out: &mut impl Write, text: impl Display) {
    let _ = writeln!(out, "{text}");
}

/// [`say_to`] standard output.
pub fn say(text: impl Display) {
    say_to(&mut std::io::stdout().lock(), text);
}

/// Prints `error: …` (standard error) and exits with `code`.
pub fn fail(code: i32, message: impl Display) -> ! {
    say_to(
        &mut std::io::stderr().lock(),
        format_args!("error: {message}"),
    );
    std::process::exit(code)
}

/// Parses the process's arguments for example `program`, listening on 127.0.0.1:`port` by
/// default. `--help` prints the usage and exits 0; a bad argument prints it and exits 2.
pub fn parse(program: &str, port: u16, flags: &[Flag]) -> Args {
    parse_with_notes(program, port, flags, "")
}

/// [`parse`], with `notes` (lines of the example's own) at the end of its usage.
pub fn parse_with_notes(program: &str, port: u16, flags: &[Flag], notes: &str) -> Args {
    let mut usage =
        format!("usage: {program} [--addr HOST:PORT] [--namespace NAME] [--purge-token TOKEN]");
    for (name, value, _) in flags {
        usage.push_str(&format!(" [{}]", format!("{name} {value}").trim_end()));
    }
    usage.push_str(&format!(
        "\n  --addr HOST:PORT     address to listen on, an IP or a host name (default 127.0.0.1:{port})\
         \n  --namespace NAME     prefix of every exported metric name (default: none)\
         \n  --purge-token TOKEN  require `Authorization: Bearer TOKEN` on the debug endpoints\
         \n                       ({})\
         \n                       (default: the PURGE_TOKEN environment variable; unset: they\
         \n                       are open on a loopback address, and refused on any other)",
        Endpoint::ALL
            .iter()
            .filter(|endpoint| **endpoint != Endpoint::Metrics)
            .map(|endpoint| endpoint.name())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    for (name, value, help) in flags {
        let flag = format!("{name} {value}");
        usage.push_str(&format!("\n  {:<19}  {help}", flag.trim_end()));
    }
    if !notes.is_empty() {
        usage.push_str(&format!("\n\n{notes}"));
    }
    parse_from(std::env::args().skip(1), port, flags).unwrap_or_else(|e| {
        if e.is_empty() {
            say(&usage);
            std::process::exit(0);
        }
        fail(2, format_args!("{e}\n{usage}"))
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

/// Parses `it` (the arguments after the program's name). `Err("")` means `--help`.
pub fn parse_from(
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
                Some((name, "", _)) => {
                    args.extra.insert(name, "true".to_owned());
                }
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
