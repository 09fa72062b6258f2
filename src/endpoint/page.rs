//! `GET|HEAD /debug/jemalloc/`: a page for people, the process's memory at a glance in a
//! browser, and the actions the other endpoints offer, without Prometheus, Grafana or `jq`.
//!
//! - **HTML** by default (`text/html`): one self-contained answer, its CSS, JavaScript and
//!   SVG inline, no external URL, font or CDN (it works in an air-gapped cluster; its
//!   `Content-Security-Policy` lets it load nothing from anywhere, and connect to its own
//!   origin only). Its size: about 32 KB with a full history and every figure in the hundreds
//!   of MiB (16 KB of CSS and script, the rest figures and the embedded data; the shell that
//!   asks for a token, 16 KB), not compressed by the layer. It shows:
//!   - the allocator's figures from the one figures table (`resident`, `dirty`, `allocated`,
//!     `active`, `muzzy`, `metadata`, then the rest), the process's RSS and the memory limit
//!     (the governor's, else the cgroup's), each with a line saying what it means, rendered on
//!     the server (readable without JavaScript). Each figure's element carries
//!     `data-figure="<name>"` and `data-bytes="<bytes>"` (empty when not known) for scripts
//!     and tests;
//!   - the doctor's hints (the stats endpoint's summary, with the governor's), the memory
//!     governor's state and what it gave back (its usage and bytes given back with
//!     `data-figure="governor_usage"` and `"given_back"`), and the top routes by bytes allocated and kept
//!     (`routes`, `null` while per-route figures are off);
//!   - with JavaScript: a chart of `resident`, `dirty`, RSS and the limit over the last six
//!     minutes (the process's [`History`]), updated every 2 s; gentle purge and purge (after a
//!     confirmation), the run-time settings (background threads, decay times, memory limit)
//!     as a form, heap profiling on for a chosen time, a heap profile to download and its
//!     flame graph shown inline. Each action calls the endpoint that does it (purge, config,
//!     profiling, heap) with `fetch`, under that endpoint's own access rules and the layer's
//!     cross-origin and rebinding protections; an action whose endpoint is off is not offered.
//!     Heap profiling needs the `profiling` feature: without it the page says so.
//! - **JSON** with `?format=json` (or `Accept: application/json`): what the page shows, which
//!   its script polls: `{"at_ms", "version", "figures": [{"name","label","bytes","meaning"}],
//!   "hints", "governor", "history": {"interval_ms","capacity","at_ms":[…],"resident":[…],
//!   "dirty":[…],"rss":[…],"limit":[…]}, "routes", "endpoints": {"purge": "/debug/…", …},
//!   "profiling"}`: about 13 KB with a full history, so an open page costs about 6 KB/s.
//!
//! Reading the figures is a few mallctl reads and two small `/proc` files, on a thread of its
//! own like the other endpoints' jobs; one read runs at a time, requests that arrive
//! meanwhile share it, and a finished read answers new requests for one second. So a page
//! polling every 2 s (or many of them) costs at most one read a second, and is never refused
//! by the stats endpoint's rate limit, which it does not use.
//!
//! # Access
//!
//! Closed by default like every debug endpoint; it follows the purge endpoint's access rules
//! unless it has its own (it shows what the stats endpoint shows and offers a purge). What a
//! request without the access rule gets, and never a figure:
//!
//! - no rule configured: 403 and a one-line reason naming the builder methods that open it;
//! - a bearer token configured, none or a wrong one sent: 401 with `WWW-Authenticate: Bearer`;
//!   a `GET` for HTML gets the page's shell as the 401's body: no figure, hint or path, only
//!   a form that asks for the token once, keeps it in the tab's `sessionStorage` and sends it
//!   as `Authorization: Bearer` on the page's own requests. The token is never put in a URL,
//!   and one in the query string is not read (the access check reads only the header);
//! - a predicate refusing: 403 with a one-line reason;
//! - anonymous access (`allow_anonymous`) addressed to a host name: 403 (DNS rebinding).
//!
//! Order of checks after admission: parameters (an unknown or repeated name, a bad format:
//! 400), jemalloc availability (501/503); then the read.

use super::handler::{Context, Handler};
use super::job::{Flight, Job, JobKind};
use super::query::Query;
use super::response::{self, Answer};
use super::Endpoint;
use crate::accounting::ledger::Ledger;
use crate::accounting::route_hints;
use crate::accounting::RouteFigures as RouteRow;
use crate::governor::{Governor, HoldsShedding, Pressure};
use crate::history::{self, History, Sample, CAPACITY, INTERVAL};
use crate::jemalloc::figures::FIGURES;
use crate::jemalloc::summary::{governor_hints, GovernorFacts};
use crate::jemalloc::{JemallocError, ProfilingStatus, StatsSummary};
use crate::system::ProcessUsage;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, ACCEPT, CACHE_CONTROL};
use http::request::Parts;
use http::{Method, StatusCode};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

/// The page endpoint of one layer.
pub(crate) struct Page {
    reads: Arc<Flight<Read>>,
    governor: Arc<Governor>,
    shedding: Weak<dyn HoldsShedding>,
    /// The process's history; `None` when jemalloc is not usable here.
    history: Option<Arc<History>>,
    /// The paths of the layer's endpoints that are on, by name.
    endpoints: Arc<BTreeMap<&'static str, String>>,
    /// Bytes per route, when the layer counts them.
    ledger: Option<Arc<Ledger>>,
}

/// What a page request asks for.
pub(crate) struct Request {
    head: bool,
    format: Format,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Html,
    Json,
}

/// One read of the figures, shared by the requests that wait for it; each format is rendered
/// once, by the first request that asks for it.
pub(crate) struct Read {
    data: Result<PageData, JemallocError>,
    html: OnceLock<Bytes>,
    json: OnceLock<Bytes>,
}

/// Everything the page shows: its JSON answer.
#[derive(Serialize)]
struct PageData {
    /// When the figures were read, in milliseconds since the Unix epoch.
    at_ms: u64,
    /// jemalloc's version.
    version: String,
    figures: Vec<FigureView>,
    hints: Vec<String>,
    governor: GovernorView,
    history: HistoryView,
    /// Per-route figures; `null` while they are off.
    routes: Option<Vec<RouteRow>>,
    /// The paths of the endpoints the page's script calls, by name (absent: off).
    endpoints: BTreeMap<&'static str, String>,
    profiling: ProfilingView,
}

/// One figure as the page shows it.
#[derive(Serialize)]
struct FigureView {
    name: &'static str,
    label: String,
    /// `None` when not known (RSS off Linux) or not set (no limit).
    bytes: Option<u64>,
    meaning: String,
}

/// The memory governor's state.
#[derive(Serialize)]
struct GovernorView {
    /// The limit it keeps the process under, if one is set.
    limit: Option<u64>,
    /// Where the limit came from (`"explicit"`, `"cgroup v2 memory.max"`, …).
    limit_source: Option<&'static str>,
    /// The usage it last read.
    usage: Option<u64>,
    /// `"ok"`, `"near"` or `"over"`.
    pressure: &'static str,
    /// Over the limit with nothing left to give back.
    unreclaimable: bool,
    /// Bytes it gave back since the process started, and in how many runs.
    given_back_bytes: u64,
    runs: u64,
    /// Whether this layer sheds forwarded requests while over the limit, does now, and how
    /// many it shed.
    shed_requests: bool,
    shedding: bool,
    shed: u64,
}

/// The history as columns, oldest first.
#[derive(Serialize, Default)]
struct HistoryView {
    interval_ms: u64,
    capacity: usize,
    at_ms: Vec<u64>,
    resident: Vec<u64>,
    dirty: Vec<u64>,
    rss: Vec<u64>,
    limit: Vec<u64>,
}

impl HistoryView {
    fn new(samples: &[Sample]) -> Self {
        let column = |field: fn(&Sample) -> u64| samples.iter().map(field).collect();
        Self {
            interval_ms: INTERVAL.as_millis() as u64,
            capacity: CAPACITY,
            at_ms: column(|s| s.at_ms),
            resident: column(|s| s.resident),
            dirty: column(|s| s.dirty),
            rss: column(|s| s.rss),
            limit: column(|s| s.limit),
        }
    }
}

/// The heap profiler, for the page's profiling section.
#[derive(Serialize)]
struct ProfilingView {
    /// This build has the profiler (the `profiling` feature).
    built: bool,
    /// Its state, when it can be read.
    status: Option<ProfilingStatus>,
    /// Why it cannot, otherwise.
    reason: Option<String>,
}

/// The routes shown in the page's "Top routes" tables: the ten that allocated the most and
/// the ten that kept the most (at most 20 rows, whatever the number of routes).
fn top_routes(ledger: &Ledger) -> Vec<RouteRow> {
    const SHOWN: usize = 10;
    let all = ledger.top_routes(usize::MAX);
    let mut by_kept: Vec<&RouteRow> = all.iter().collect();
    by_kept.sort_by_key(|row| std::cmp::Reverse(row.kept_bytes));
    let mut shown: Vec<RouteRow> = all.iter().take(SHOWN).cloned().collect();
    for row in by_kept.into_iter().take(SHOWN) {
        if !shown.contains(row) {
            shown.push(row.clone());
        }
    }
    shown
}

/// The allocator figures shown first, before the process's RSS and the limit (the four the
/// chart shows); then [`THEN`]; then every other figure of the table.
const FIRST: [&str; 2] = ["resident", "dirty"];
const THEN: [&str; 4] = ["allocated", "active", "muzzy", "metadata"];

/// The endpoints whose paths the page's script calls.
const CALLED: [Endpoint; 6] = [
    Endpoint::Metrics,
    Endpoint::Purge,
    Endpoint::Stats,
    Endpoint::Config,
    Endpoint::Heap,
    Endpoint::Profiling,
];

impl Handler for Page {
    const METHODS: &'static [Method] = &[Method::GET, Method::HEAD];
    const ALLOW: &'static str = "GET, HEAD";
    const PARAMS: Option<&'static [&'static str]> = Some(&["format"]);
    type Params = Request;
    type Output = Read;

    fn new(context: &Context<'_>) -> Self {
        let endpoints = context
            .paths
            .iter()
            .filter(|(endpoint, _)| CALLED.contains(endpoint))
            .map(|(endpoint, path)| (endpoint.name(), path.to_string()))
            .collect();
        // The history samples jemalloc: only where it can be read.
        let history = crate::jemalloc::ctl::ctl()
            .is_ok()
            .then(|| History::process(context.governor))
            .flatten();
        Self {
            reads: Arc::new(Flight::new(
                context.runner(JobKind::PageRead),
                Duration::from_secs(1),
            )),
            governor: Arc::clone(context.governor),
            shedding: Weak::clone(context.shedding),
            history,
            endpoints: Arc::new(endpoints),
            ledger: context.ledger.cloned(),
        }
    }

    fn params(&self, parts: &Parts, query: Query<'_>) -> Result<Request, Answer> {
        let format = match query.get("format") {
            Some("json") => Format::Json,
            Some("html") => Format::Html,
            None if wants_json(parts) => Format::Json,
            None => Format::Html,
            Some(other) => {
                return Err(response::text(
                    StatusCode::BAD_REQUEST,
                    format_args!(
                        "unknown format {other:?}: use format=html (the default) or format=json"
                    ),
                ))
            }
        };
        Ok(Request {
            head: parts.method == Method::HEAD,
            format,
        })
    }

    fn start(&self, _: &Request) -> Result<Job<Read>, Answer> {
        let ctl = crate::jemalloc::ctl::ctl().map_err(|e| response::jemalloc_error(&e))?;
        let governor = Arc::clone(&self.governor);
        let shedding = Weak::clone(&self.shedding);
        let history = self.history.clone();
        let endpoints = Arc::clone(&self.endpoints);
        let ledger = self.ledger.clone();
        self.reads.join_or_start(move || {
            let data = StatsSummary::read(ctl).map(|summary| {
                let samples = history.as_deref().map(History::samples);
                PageData::new(
                    summary,
                    &governor,
                    &shedding,
                    samples.as_deref().unwrap_or_default(),
                    &endpoints,
                    ledger.as_deref(),
                )
            });
            Read {
                data,
                html: OnceLock::new(),
                json: OnceLock::new(),
            }
        })
    }

    fn answer(read: &Read, request: &Request) -> Answer {
        let data = match &read.data {
            Ok(data) => data,
            Err(e) => return response::jemalloc_error(e),
        };
        let answer = match request.format {
            Format::Html => {
                let body = read.html.get_or_init(|| Bytes::from(html(Some(data))));
                html_answer(StatusCode::OK, body.clone())
            }
            Format::Json => {
                let body = read.json.get_or_init(|| {
                    // The crate's own types always serialize.
                    Bytes::from(serde_json::to_vec(data).unwrap_or_default())
                });
                let mut answer = response::with_body(
                    StatusCode::OK,
                    HeaderValue::from_static("application/json"),
                    body.clone(),
                );
                answer
                    .headers_mut()
                    .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                answer
            }
        };
        if request.head {
            return response::without_body(answer);
        }
        answer
    }

    /// A browser's `GET` of the page without the token gets the page's shell with the 401:
    /// no figure, only the form that asks for the token.
    fn refused(parts: &Parts, refusal: Answer) -> Answer {
        let asks_for_html = parts.method == Method::GET
            && !wants_json(parts)
            && !parts.uri.query().is_some_and(|q| q.contains("format=json"));
        if refusal.status() != StatusCode::UNAUTHORIZED || !asks_for_html {
            return refusal;
        }
        let (mut head, _) = refusal.into_parts();
        let shell = html_answer(StatusCode::UNAUTHORIZED, shell());
        head.headers.extend(shell.headers().clone());
        http::Response::from_parts(head, shell.into_body())
    }
}

/// Whether the request's `Accept` asks for JSON first.
fn wants_json(parts: &Parts) -> bool {
    parts
        .headers
        .get(ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .is_some_and(|accept| accept.trim_start().starts_with("application/json"))
}

/// The shell, rendered once per process: it is the same for everyone.
fn shell() -> Bytes {
    static SHELL: OnceLock<Bytes> = OnceLock::new();
    SHELL.get_or_init(|| Bytes::from(html(None))).clone()
}

/// The policy of the HTML answers: nothing loaded from anywhere, requests to this origin
/// only, no framing.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   img-src data: blob:; connect-src 'self'; form-action 'none'; \
                   base-uri 'none'; frame-ancestors 'none'";

fn html_answer(status: StatusCode, body: Bytes) -> Answer {
    let mut answer = response::with_body(
        status,
        HeaderValue::from_static("text/html; charset=utf-8"),
        body,
    );
    let headers = answer.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        HeaderName::from_static("content-security-policy"),
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        HeaderName::from_static("referrer-policy"),
        HeaderValue::from_static("no-referrer"),
    );
    answer
}

impl PageData {
    fn new(
        summary: StatsSummary,
        governor: &Governor,
        shedding: &Weak<dyn HoldsShedding>,
        samples: &[Sample],
        endpoints: &BTreeMap<&'static str, String>,
        ledger: Option<&Ledger>,
    ) -> Self {
        let holder = shedding.upgrade();
        let shedding = holder.as_deref().map(HoldsShedding::shedding);
        let status = governor.status();
        let setting = governor.limit();
        let mut hints = summary.hints;
        hints.extend(governor_hints(&GovernorFacts {
            limit: status.limit(),
            usage: status.usage().unwrap_or(0),
            unreclaimable: status.unreclaimable(),
            shedding: shedding.is_some_and(|s| s.active()),
        }));
        hints.extend(ledger.map(route_hints).unwrap_or_default());
        let stats = summary.stats;
        let mut figures = Vec::with_capacity(FIGURES.len() + 2);
        let jemalloc = |name: &'static str| {
            let figure = FIGURES.iter().find(|figure| figure.name == name)?;
            Some(FigureView {
                name,
                label: label(name),
                bytes: stats.get(name),
                meaning: format!("{}.", figure.help),
            })
        };
        figures.extend(FIRST.iter().filter_map(|name| jemalloc(name)));
        figures.push(FigureView {
            name: "rss",
            label: "Process RSS".to_owned(),
            bytes: ProcessUsage::read().map(|usage| usage.resident),
            meaning: "Resident memory as the kernel counts it: jemalloc's, plus code, \
                      stacks and other allocators."
                .to_owned(),
        });
        let limit = history::limit(governor);
        figures.push(FigureView {
            name: "limit",
            label: "Memory limit".to_owned(),
            bytes: limit,
            meaning: match (&setting, limit) {
                (Some(setting), _) => format!(
                    "The memory_limit ({}): the governor gives cached pages back above \
                     90 % of it.",
                    setting.source
                ),
                (None, Some(_)) => "The cgroup's limit: above it the kernel reclaims, then \
                                    kills the process. No memory_limit is set."
                    .to_owned(),
                (None, None) => "None: no memory_limit is set, and no cgroup limit.".to_owned(),
            },
        });
        figures.extend(THEN.iter().filter_map(|name| jemalloc(name)));
        figures.extend(
            FIGURES
                .iter()
                .filter(|figure| !FIRST.contains(&figure.name) && !THEN.contains(&figure.name))
                .filter_map(|figure| jemalloc(figure.name)),
        );
        let profiling = match crate::jemalloc::profiling::status() {
            Ok(status) => ProfilingView {
                built: cfg!(profiling),
                status: Some(status),
                reason: None,
            },
            Err(e) => ProfilingView {
                built: cfg!(profiling),
                status: None,
                reason: Some(e.to_string()),
            },
        };
        Self {
            at_ms: history::now_ms(),
            version: summary.version,
            figures,
            hints,
            governor: GovernorView {
                limit: status.limit(),
                limit_source: setting.map(|setting| setting.source),
                usage: status.usage(),
                pressure: match status.pressure() {
                    Pressure::Ok => "ok",
                    Pressure::Near => "near",
                    Pressure::Over => "over",
                },
                unreclaimable: status.unreclaimable(),
                given_back_bytes: status.given_back(),
                runs: status.runs(),
                shed_requests: shedding.is_some_and(|s| s.enabled()),
                shedding: shedding.is_some_and(|s| s.active()),
                shed: shedding.map_or(0, |s| s.shed()),
            },
            history: HistoryView::new(samples),
            routes: ledger.map(top_routes),
            endpoints: endpoints.clone(),
            profiling,
        }
    }
}

/// jemalloc's version without its build suffix: `5.3.1-0-g81034c…` → `5.3.1`.
fn short_version(version: &str) -> &str {
    version.split('-').next().unwrap_or(version)
}

/// A figure's name as a title: `resident` → `Resident`.
fn label(name: &str) -> String {
    let mut chars = name.chars();
    chars
        .next()
        .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
        .unwrap_or_default()
}

/// `bytes` in B, KiB, MiB, GiB or TiB, as the page's script writes it.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `text` escaped for HTML text and quoted attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The page: with `data`, its figures rendered; without, the shell that asks for the token.
fn html(data: Option<&PageData>) -> String {
    let mut page = String::with_capacity(32 * 1024);
    page.push_str(HEAD);
    let mode = if data.is_some() { "figures" } else { "token" };
    let _ = write!(page, "<body data-page=\"{mode}\">");
    let version = data.map_or(String::new(), |d| escape(short_version(&d.version)));
    let _ = write!(
        page,
        "<header><h1>Memory <small>jemalloc {version}</small></h1>\
         <p id=\"status\" role=\"status\">{}</p></header><main>",
        if data.is_some() {
            "Figures as read when the page was served; JavaScript keeps them live."
        } else {
            "A bearer token is needed to see the figures."
        }
    );
    let _ = write!(
        page,
        "<form id=\"token\"{}><label>Bearer token <input type=\"password\" \
         autocomplete=\"off\" required></label> <button>Show figures</button> \
         <span id=\"token-msg\"></span><p class=\"m\">Kept in this tab only \
         (sessionStorage), sent as <code>Authorization: Bearer</code>, never in a URL.</p>\
         </form>",
        if data.is_some() { " hidden" } else { "" }
    );
    page.push_str("<section id=\"glance\"><div id=\"cards\" class=\"cards\">");
    for figure in data.map_or(&[][..], |d| &d.figures) {
        let (bytes, shown) = match figure.bytes {
            Some(bytes) => (bytes.to_string(), human(bytes)),
            None => (String::new(), "none".to_owned()),
        };
        let _ = write!(
            page,
            "<div class=\"card\" data-figure=\"{name}\" data-bytes=\"{bytes}\">\
             <h3>{label}</h3><p class=\"v\">{shown}</p><p class=\"m\">{meaning}</p></div>",
            name = figure.name,
            label = escape(&figure.label),
            meaning = escape(&figure.meaning),
        );
    }
    page.push_str("</div></section>");
    page.push_str(ACTIONS);
    if let Some(data) = data {
        page.push_str(
            "<section id=\"hints-box\"><h2>What the figures suggest</h2><ul id=\"hints\">",
        );
        if data.hints.is_empty() {
            page.push_str("<li>Nothing stands out.</li>");
        }
        for hint in &data.hints {
            let _ = write!(page, "<li>{}</li>", escape(hint));
        }
        page.push_str("</ul></section>");
        let g = &data.governor;
        let _ = write!(
            page,
            "<section id=\"governor-box\"><h2>Memory governor</h2><dl id=\"governor\">\
             <dt>Limit</dt><dd>{limit}</dd>\
             <dt>Usage</dt><dd data-figure=\"governor_usage\" data-bytes=\"{usage_bytes}\">{usage}</dd>\
             <dt>Pressure</dt><dd>{pressure}</dd>\
             <dt>Given back</dt><dd data-figure=\"given_back\" data-bytes=\"{given_bytes}\">{given} in {runs} runs</dd>\
             <dt>Shedding</dt><dd>{shedding}</dd></dl></section>",
            limit = g.limit.map_or("none (memory_limit)".to_owned(), |limit| {
                match g.limit_source {
                    Some(source) => format!("{} ({})", human(limit), escape(source)),
                    None => human(limit),
                }
            }),
            usage_bytes = g.usage.map_or(String::new(), |usage| usage.to_string()),
            usage = g.usage.map_or("none".to_owned(), human),
            pressure = if g.unreclaimable {
                format!("{}, nothing left to give back", g.pressure)
            } else {
                g.pressure.to_owned()
            },
            given_bytes = g.given_back_bytes,
            given = human(g.given_back_bytes),
            runs = g.runs,
            shedding = if g.shedding {
                "shedding now"
            } else if g.shed_requests {
                "on, not shedding"
            } else {
                "off"
            },
        );
        page.push_str("<section id=\"routes-box\"><h2>Top routes</h2><div id=\"routes\">");
        routes_table(&mut page, data.routes.as_deref());
        page.push_str("</div></section>");
    }
    page.push_str(FORMS);
    page.push_str("</main>");
    if let Some(data) = data {
        // The figures again for the script, `<` escaped so that no string can end the
        // element.
        let json = serde_json::to_string(data)
            .unwrap_or_default()
            .replace('<', "\\u003c");
        let _ = write!(
            page,
            "<script type=\"application/json\" id=\"data\">{json}</script>"
        );
    }
    page.push_str(SCRIPT);
    page.push_str("</body></html>\n");
    page
}

/// The routes allocating the most (ten each), by bytes allocated and by bytes kept, as the
/// page's script renders them too; or what to do while per-route figures are off.
fn routes_table(page: &mut String, routes: Option<&[RouteRow]>) {
    let rows = match routes {
        None => return page.push_str(ROUTES_OFF),
        Some([]) => return page.push_str("<p>No request counted yet.</p>"),
        Some(rows) => rows,
    };
    let by_allocated = |row: &RouteRow| i128::from(row.allocated_bytes);
    let by_kept = |row: &RouteRow| i128::from(row.kept_bytes);
    for (title, key) in [
        (
            "By bytes allocated",
            &by_allocated as &dyn Fn(&RouteRow) -> i128,
        ),
        ("By bytes kept", &by_kept),
    ] {
        let mut sorted: Vec<&RouteRow> = rows.iter().collect();
        sorted.sort_by_key(|row| std::cmp::Reverse(key(row)));
        let _ = write!(
            page,
            "<h3>{title}</h3><table><tr><th>Route</th><th>Requests</th><th>Allocated</th>\
             <th>Kept</th></tr>"
        );
        for row in sorted.into_iter().take(10) {
            let sign = if row.kept_bytes < 0 { "-" } else { "" };
            let _ = write!(
                page,
                "<tr><td>{} {}</td><td>{}</td><td>{}</td><td>{sign}{}</td></tr>",
                escape(&row.method),
                escape(&row.route),
                row.requests,
                human(row.allocated_bytes),
                human(row.kept_bytes.unsigned_abs()),
            );
        }
        page.push_str("</table>");
    }
}

/// What the page says while per-route figures are off.
const ROUTES_OFF: &str = "<p>Per-route figures are off: turn them on with the builder's \
                          <code>per_route_allocation(true)</code> (README, \"Which requests \
                          allocate\").</p>";

const HEAD: &str = concat!(
    "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
    "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">",
    "<title>Memory · tower-jemalloc</title><link rel=\"icon\" href=\"data:,\"><style>",
    r#"
:root{--fg:#1d2430;--mute:#5d6878;--bg:#f6f7f9;--card:#fff;--line:#d9dde3;--res:#2563eb;--dirty:#d97706;--rss:#059669;--limit:#dc2626}
*{box-sizing:border-box}body{margin:0;font:15px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header{padding:.8rem 1rem;background:#1d2430;color:#fff}header h1{margin:0;font-size:1.25rem}header small{font-weight:400;opacity:.7;font-size:.8rem}
#status{margin:.2rem 0 0;font-size:.85rem;opacity:.85}main{padding:.8rem;max-width:1100px;margin:auto}
h2{font-size:1.05rem;margin:1.2rem 0 .5rem}section{margin-bottom:.6rem}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(160px,1fr));gap:.6rem}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:.55rem .7rem}
.card h3{margin:0;font-size:.8rem;text-transform:uppercase;letter-spacing:.04em;color:var(--mute)}
.card .v{margin:.1rem 0;font-size:1.45rem;font-weight:650;font-variant-numeric:tabular-nums}
.m{margin:0;font-size:.78rem;color:var(--mute)}
.card[data-figure=resident]{border-left:5px solid var(--res)}.card[data-figure=dirty]{border-left:5px solid var(--dirty)}
.card[data-figure=rss]{border-left:5px solid var(--rss)}.card[data-figure=limit]{border-left:5px solid var(--limit)}
button{font:inherit;padding:.5rem .9rem;border-radius:6px;border:1px solid #1d4ed8;background:#2563eb;color:#fff;cursor:pointer}
button.danger{background:#fff;color:#b91c1c;border-color:#b91c1c}button:disabled{opacity:.45;cursor:default}
#actions{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:.6rem .7rem;margin-top:.7rem;position:sticky;bottom:0;z-index:1;box-shadow:0 -2px 8px #0001}
#actions h2{margin-top:0}#result{margin:.4rem 0 0;font-variant-numeric:tabular-nums}
svg{width:100%;height:auto;background:var(--card);border:1px solid var(--line);border-radius:8px}
.legend span{margin-right:1rem;font-size:.85rem}.legend i{display:inline-block;width:12px;height:3px;vertical-align:middle;margin-right:.3rem}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2rem .8rem;margin:0}dt{color:var(--mute)}dd{margin:0}
table{border-collapse:collapse;width:100%;background:var(--card)}td,th{border:1px solid var(--line);padding:.3rem .5rem;text-align:left}
form label{display:inline-block;margin:.2rem 1rem .4rem 0}input{font:inherit;padding:.3rem;max-width:11rem}
#flame img{max-width:100%;border:1px solid var(--line);margin-top:.5rem;background:#fff}
ul{padding-left:1.2rem}code{font-size:.85em}footer{padding:1rem;color:var(--mute);font-size:.8rem;text-align:center}
.err{color:#b91c1c}
"#,
    "</style></head>"
);

const ACTIONS: &str = r#"<section id="actions"><h2>Give memory back</h2><button id="gentle" type="button" disabled>Gentle purge</button> <button id="purge" type="button" class="danger" disabled>Purge…</button><p id="result" role="status"></p><p class="m">Gentle purge (<code>mode=decay</code>) returns the dirty pages whose decay time has passed; purge returns every unused page at once (it asks first). <noscript>The buttons need JavaScript; without it: <code>curl -X POST …/purge?mode=decay</code>.</noscript></p></section>
<section id="chart-box"><h2>Last minutes</h2><svg id="chart" viewBox="0 0 600 190" role="img" aria-label="resident, dirty, RSS and limit over time"></svg><p class="legend"><span><i style="background:var(--res)"></i>resident</span><span><i style="background:var(--dirty)"></i>dirty</span><span><i style="background:var(--rss)"></i>RSS</span><span><i style="background:var(--limit)"></i>limit</span></p><noscript><p class="m">The chart needs JavaScript.</p></noscript></section>"#;

const FORMS: &str = r#"<section id="settings-box"><h2>Run-time settings</h2><form id="config"><label><input type="checkbox" name="background_thread"> Background threads</label><label>Dirty decay (ms) <input name="dirty_decay_ms" inputmode="numeric"></label><label>Muzzy decay (ms) <input name="muzzy_decay_ms" inputmode="numeric"></label><label>Memory limit <input name="memory_limit" placeholder="320MiB, 90% or none"></label><button disabled>Apply</button><p id="config-result" class="m">Changes go through <code>PUT …/config</code>; only the fields you change are sent.</p></form></section>
<section id="profiling-box"><h2>Heap profiling</h2><div id="profiling"><p class="m">Needs JavaScript and the <code>profiling</code> feature.</p></div><div id="flame"></div></section>
<footer>JSON of this page: <code>?format=json</code>. Every figure's element has <code>data-figure</code> and <code>data-bytes</code>.</footer>"#;

const SCRIPT: &str = concat!(
    "<script>",
    r#"
(()=>{'use strict';
const $=s=>document.querySelector(s),KEY='tower-jemalloc-token',self=location.pathname;
let token=sessionStorage.getItem(KEY),data=null,configured=null,timer=null;
const UNITS=['B','KiB','MiB','GiB','TiB'];
function human(b){if(b==null)return'none';let v=b,u=0;while(v>=1024&&u<4){v/=1024;u++}return u?v.toFixed(1)+' '+UNITS[u]:b+' B'}
function el(tag,text,attrs){const e=document.createElement(tag);if(text!=null)e.textContent=text;for(const k in attrs||{})e.setAttribute(k,attrs[k]);return e}
function say(sel,text,bad){const e=$(sel);e.textContent=text;e.classList.toggle('err',!!bad)}
function askToken(msg){sessionStorage.removeItem(KEY);token=null;$('#token').hidden=false;say('#token-msg',msg||'',true)}
async function api(method,url){const h={};if(token)h.Authorization='Bearer '+token;
 const r=await fetch(url,{method,headers:h,cache:'no-store',credentials:'same-origin'});
 const t=await r.text();if(r.status===401)askToken('The token was refused.');
 if(!r.ok)throw new Error(r.status+' '+t.trim());return t}
function path(name){return data&&data.endpoints[name]}
function cards(d){const box=$('#cards');for(const f of d.figures){let c=box.querySelector('[data-figure='+f.name+']');
 if(!c){c=el('div',null,{class:'card','data-figure':f.name});c.append(el('h3',f.label),el('p','',{class:'v'}),el('p',f.meaning,{class:'m'}));box.append(c)}
 c.dataset.bytes=f.bytes==null?'':String(f.bytes);c.querySelector('.v').textContent=human(f.bytes);c.querySelector('.m').textContent=f.meaning}}
function list(id,items,empty){const ul=el('ul',null,{id});if(!items.length)ul.append(el('li',empty));for(const i of items)ul.append(el('li',i));return ul}
function section(id,title,body){let s=$('#'+id+'-box');if(!s){s=el('section',null,{id:id+'-box'});s.append(el('h2',title));$('#settings-box').before(s)}
 const old=$('#'+id);if(old)old.replaceWith(body);else s.append(body)}
function governor(g){const dl=el('dl',null,{id:'governor'});
 const rows=[['Limit',g.limit==null?'none (memory_limit)':human(g.limit)+(g.limit_source?' ('+g.limit_source+')':'')],['Usage',human(g.usage),'governor_usage',g.usage],['Pressure',g.pressure+(g.unreclaimable?', nothing left to give back':'')],['Given back',human(g.given_back_bytes)+' in '+g.runs+' runs','given_back',g.given_back_bytes],['Shedding',g.shedding?'shedding now ('+g.shed+' shed)':g.shed_requests?'on, not shedding ('+g.shed+' shed)':'off']];
 for(const[k,v,f,b]of rows)dl.append(el('dt',k),el('dd',v,f?{'data-figure':f,'data-bytes':b==null?'':String(b)}:{}));return dl}
function routes(rows){const box=el('div',null,{id:'routes'});
 if(!Array.isArray(rows)||!rows.length){const p=el('p','Per-route figures are off: turn them on with the builder\'s ');p.append(el('code','per_route_allocation(true)'),' (README, "Which requests allocate").');
  if(Array.isArray(rows))p.textContent='No request counted yet.';box.append(p);return box}
 for(const[title,key]of[['By bytes allocated','allocated_bytes'],['By bytes kept','kept_bytes']]){box.append(el('h3',title));const t=el('table');
  const head=el('tr');for(const h of['Route','Requests','Allocated','Kept'])head.append(el('th',h));t.append(head);
  for(const r of[...rows].sort((a,b)=>b[key]-a[key]).slice(0,10)){const tr=el('tr');tr.append(el('td',r.method+' '+r.route),el('td',String(r.requests)),el('td',human(r.allocated_bytes)),el('td',(r.kept_bytes<0?'-':'')+human(Math.abs(r.kept_bytes))));t.append(tr)}
  box.append(t)}return box}
function svg(tag,attrs){const e=document.createElementNS($('#chart').namespaceURI,tag);for(const k in attrs)e.setAttribute(k,attrs[k]);return e}
function chart(d){const h=d.history,now=Object.fromEntries(d.figures.map(f=>[f.name,f.bytes||0]));
 const t=[...h.at_ms,d.at_ms],s={resident:[...h.resident,now.resident],dirty:[...h.dirty,now.dirty],rss:[...h.rss,now.rss],limit:[...h.limit,now.limit]};
 const top=Math.max(1,...s.resident,...s.dirty,...s.rss),lim=now.limit,showLimit=lim>0&&lim<=top*2,max=(showLimit?Math.max(top,lim):top)*1.08;
 const W=600,H=190,L=62,R=8,T=10,B=24,t0=t[0],span=Math.max(1,t[t.length-1]-t0);
 const x=v=>L+(v-t0)/span*(W-L-R),y=v=>T+(1-v/max)*(H-T-B),c=$('#chart');c.replaceChildren();
 for(const f of[0,.5,1]){const v=max*f;c.append(svg('line',{x1:L,x2:W-R,y1:y(v),y2:y(v),stroke:'#e5e7eb'}));const l=svg('text',{x:L-6,y:y(v)+4,'text-anchor':'end','font-size':11,fill:'#5d6878'});l.textContent=human(v);c.append(l)}
 const ago=svg('text',{x:L,y:H-6,'font-size':11,fill:'#5d6878'});ago.textContent=Math.round(span/60000*10)/10+' min ago';c.append(ago);
 const nowl=svg('text',{x:W-R,y:H-6,'text-anchor':'end','font-size':11,fill:'#5d6878'});nowl.textContent='now';c.append(nowl);
 const colors={resident:'var(--res)',dirty:'var(--dirty)',rss:'var(--rss)',limit:'var(--limit)'};
 for(const k of['limit','rss','resident','dirty']){if(k==='limit'&&!showLimit)continue;
  const pts=t.map((v,i)=>x(v).toFixed(1)+','+y(s[k][i]).toFixed(1)).join(' ');
  c.append(svg('polyline',{points:pts,fill:'none',stroke:colors[k],'stroke-width':k==='limit'?1.5:2,'stroke-dasharray':k==='limit'?'6 4':'','data-series':k}))}
 if(lim>0&&!showLimit){const n=svg('text',{x:W-R,y:T+10,'text-anchor':'end','font-size':11,fill:'#dc2626'});n.textContent='limit '+human(lim)+' (off the scale)';c.append(n)}}
function profiling(d){const box=el('div',null,{id:'profiling'}),p=d.profiling,st=p.status;
 if(!p.built){box.append(el('p','This build has no heap profiler: build with the `profiling` feature (README, "Find what holds the memory").'));return box}
 if(!st||!st.available){box.append(el('p',p.reason||'jemalloc was started without its profiler: start it with prof:true (README, "Find what holds the memory").'));return box}
 if(!path('profiling')||!path('heap')){box.append(el('p','The profiling or heap endpoint is off in this layer.'));return box}
 box.append(el('p',st.active?'Sampling now'+(st.switches_off_in_seconds?', switches off in '+st.switches_off_in_seconds+' s':'')+'.':'Not sampling.'));
 const f=el('form',null,{id:'prof-form'}),i=el('input',null,{value:'5m',name:'for',size:5});const l=el('label','Profile for ');l.append(i);
 f.append(l,el('button',st.active?'Restart':'Start'),' ');const stop=el('button','Stop',{type:'button',class:'danger'});stop.disabled=!st.active;f.append(stop);
 f.addEventListener('submit',e=>{e.preventDefault();act(()=>api('PUT',path('profiling')+'?active=true&for='+encodeURIComponent(i.value.trim())),'Profiling on for '+i.value,'#prof-result')});
 stop.addEventListener('click',()=>act(()=>api('PUT',path('profiling')+'?active=false'),'Profiling off','#prof-result'));
 const dl=el('button','Download heap profile',{type:'button'}),fg=el('button','Show flame graph',{type:'button'});dl.disabled=fg.disabled=!st.active;
 dl.addEventListener('click',()=>blob(path('heap'),'heap.pb.gz').catch(e=>say('#prof-result',e.message,true)));
 fg.addEventListener('click',()=>flame().catch(e=>say('#prof-result',e.message,true)));
 box.append(f,el('p'),dl,' ',fg,el('p','',{id:'prof-result',role:'status'}));return box}
async function fetchBlob(url){const h={};if(token)h.Authorization='Bearer '+token;const r=await fetch(url,{headers:h,cache:'no-store'});
 if(!r.ok)throw new Error(r.status+' '+(await r.text()).trim());return r.blob()}
async function blob(url,name){const u=URL.createObjectURL(await fetchBlob(url)),a=el('a',null,{href:u,download:name});document.body.append(a);a.click();a.remove();setTimeout(()=>URL.revokeObjectURL(u),60000)}
async function flame(){const b=await fetchBlob(path('heap')+'?format=flamegraph'),u=URL.createObjectURL(new Blob([b],{type:'image/svg+xml'}));$('#flame').replaceChildren(el('img',null,{src:u,alt:'heap flame graph'}))}
function render(d){data=d;$('#token').hidden=true;document.body.dataset.page='figures';
 cards(d);section('hints','What the figures suggest',list('hints',d.hints,'Nothing stands out.'));
 section('governor','Memory governor',governor(d.governor));section('routes','Top routes',routes(d.routes));
 chart(d);$('#profiling').replaceWith(profiling(d));$('header small').textContent='jemalloc '+d.version.split('-')[0];
 $('#gentle').disabled=$('#purge').disabled=!path('purge');$('#config button').disabled=!path('config');
 if(!configured&&path('config'))loadConfig()}
async function refresh(){clearTimeout(timer);try{render(JSON.parse(await api('GET',self+'?format=json')));say('#status','Live: updated '+new Date().toLocaleTimeString()+', every 2 s.')}
 catch(e){say('#status',e.message,true)}finally{if($('#token').hidden)timer=setTimeout(refresh,document.hidden?10000:2000)}}
async function act(run,done,out){out=out||'#result';say(out,'…');try{const t=await run();let m=done;try{const j=JSON.parse(t);if(j.before&&j.after&&j.before.resident!=null)m+=': resident '+human(j.before.resident)+' → '+human(j.after.resident)+', dirty '+human(j.before.dirty)+' → '+human(j.after.dirty)}catch(_){}
 say(out,m+'.');setTimeout(refresh,1100)}catch(e){say(out,e.message,true)}}
$('#gentle').addEventListener('click',()=>act(()=>api('POST',path('purge')+'?mode=decay'),'Gentle purge done'));
$('#purge').addEventListener('click',()=>{if(confirm('Purge returns every unused page to the operating system at once; allocations may slow down for a moment afterwards. Purge now?'))act(()=>api('POST',path('purge')),'Purge done')});
async function loadConfig(){try{configured=JSON.parse(await api('GET',path('config')));const f=$('#config');f.background_thread.checked=!!configured.background_thread;
 f.dirty_decay_ms.value=configured.dirty_decay_ms;f.muzzy_decay_ms.value=configured.muzzy_decay_ms;f.memory_limit.value=configured.memory_limit==null?'none':configured.memory_limit}
 catch(e){say('#config-result',e.message,true)}}
$('#config').addEventListener('submit',async e=>{e.preventDefault();if(!configured)return;const f=e.target,q=[];
 if(f.background_thread.checked!==!!configured.background_thread)q.push('background_thread='+f.background_thread.checked);
 for(const k of['dirty_decay_ms','muzzy_decay_ms'])if(f[k].value.trim()!==String(configured[k]))q.push(k+'='+encodeURIComponent(f[k].value.trim()));
 const ml=f.memory_limit.value.trim(),was=configured.memory_limit==null?'none':String(configured.memory_limit);if(ml&&ml!==was)q.push('memory_limit='+encodeURIComponent(ml));
 if(!q.length){say('#config-result','Nothing changed.');return}
 try{await api('PUT',path('config')+'?'+q.join('&'));say('#config-result','Applied: '+q.join(', ')+'.');configured=null;loadConfig();refresh()}catch(err){say('#config-result',err.message,true)}});
$('#token').addEventListener('submit',e=>{e.preventDefault();token=$('#token input').value.trim();sessionStorage.setItem(KEY,token);say('#token-msg','');refresh()});
const initial=$('#data');if(initial){render(JSON.parse(initial.textContent));timer=setTimeout(refresh,2000)}else if(token)refresh();else askToken('')
})();
"#,
    "</script>"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(300 << 20), "300.0 MiB");
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            escape("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
        assert_eq!(label("resident"), "Resident");
    }

    /// A page as a busy process serves it: every figure in the hundreds of MiB, a full history,
    /// a few hints.
    fn full_page() -> PageData {
        let big = 734_003_200 + 123_456;
        let samples: Vec<Sample> = (0..CAPACITY as u64)
            .map(|i| Sample {
                at_ms: 1_764_576_000_000 + i * 2000,
                resident: big + i * 4096,
                dirty: big / 3 + i,
                rss: big + 99_999 + i,
                limit: 1 << 30,
            })
            .collect();
        let figure = |name: &'static str| FigureView {
            name,
            label: label(name),
            bytes: Some(big),
            meaning: "x".repeat(60),
        };
        PageData {
            at_ms: 1_764_576_360_000,
            version: "5.3.1-0-g81034ce1f1373e37dc865038e1bc8eeecf559ce8".to_owned(),
            figures: [
                "resident",
                "dirty",
                "rss",
                "limit",
                "allocated",
                "active",
                "muzzy",
            ]
            .into_iter()
            .chain(["metadata", "mapped", "retained"])
            .map(figure)
            .collect(),
            hints: vec!["h".repeat(250); 3],
            governor: GovernorView {
                limit: Some(1 << 30),
                limit_source: Some("explicit"),
                usage: Some(big),
                pressure: "ok",
                unreclaimable: false,
                given_back_bytes: big,
                runs: 12,
                shed_requests: false,
                shedding: false,
                shed: 0,
            },
            history: HistoryView::new(&samples),
            routes: None,
            endpoints: CALLED
                .iter()
                .map(|endpoint| (endpoint.name(), endpoint.default_path().to_owned()))
                .collect(),
            profiling: ProfilingView {
                built: true,
                status: None,
                reason: None,
            },
        }
    }

    #[test]
    fn the_page_stays_small() {
        let data = full_page();
        let html = html(Some(&data));
        let json = serde_json::to_vec(&data).unwrap();
        // The figures the module docs and the README state.
        assert!(html.len() < 40_000, "{} bytes", html.len());
        assert!(json.len() < 16_000, "{} bytes", json.len());
        assert!(shell().len() < 20_000, "{} bytes", shell().len());
        println!(
            "page {} bytes, JSON {} bytes, shell {} bytes",
            html.len(),
            json.len(),
            shell().len()
        );
    }

    #[test]
    fn routes_render_by_bytes_allocated_and_kept() {
        let row = |route: &str, allocated_bytes, kept_bytes| RouteRow {
            method: "GET".to_owned(),
            route: route.to_owned(),
            requests: 3,
            allocated_bytes,
            kept_bytes,
        };
        let mut data = full_page();
        data.routes = Some(vec![
            row("/small", 1024, 4096),
            row("/big<script>", 10 << 20, -2048),
        ]);
        let html = html(Some(&data));
        let tables = &html[html.find("id=\"routes\"").unwrap()..];
        let tables = &tables[..tables.find("</section>").unwrap()];
        let allocated = tables.find("By bytes allocated").unwrap();
        let kept = tables.find("By bytes kept").unwrap();
        let (first, second) = (&tables[allocated..kept], &tables[kept..]);
        assert!(first.find("/big&lt;script&gt;").unwrap() < first.find("/small").unwrap());
        assert!(second.find("/small").unwrap() < second.find("/big&lt;script&gt;").unwrap());
        assert!(second.contains("-2.0 KiB"));
        assert!(!tables.contains("Per-route figures are off"));

        data.routes = Some(Vec::new());
        assert!(html_of(&data).contains("No request counted yet."));
        data.routes = None;
        assert!(html_of(&data).contains("Per-route figures are off"));
    }

    fn html_of(data: &PageData) -> String {
        html(Some(data))
    }

    #[test]
    fn the_shell_shows_no_figure() {
        let shell = html(None);
        assert!(shell.contains("data-page=\"token\""));
        assert!(!shell.contains("data-figure=\""));
        assert!(!shell.contains("id=\"data\""));
        // Both renderings of the routes exist in the script.
        assert!(SCRIPT.contains("per_route_allocation(true)"));
        assert!(SCRIPT.contains("By bytes allocated"));
    }
}
