//! `GET|HEAD /metrics`: the Prometheus text exposition of the layer's registry.
//!
//! - **Coalescing**: a scrape that arrives while a render is running waits for that render
//!   instead of starting another, so scrapes in flight together cost one render (and one
//!   jemalloc epoch advance). A scrape never gets a render that had finished before it
//!   arrived (it joins the one in progress or starts one), unless a reuse window is configured:
//!   then a render that finished less than that long ago answers it too, which bounds renders
//!   to about one per window under a scrape storm.
//! - **Off the workers**: on a tokio runtime the render (gathering the OpenTelemetry SDK, which
//!   runs every observable callback, then encoding) runs on a thread of its own, never behind
//!   the shared blocking pool's queue (stats dumps, purges, the application's tasks); outside
//!   a runtime it runs inline. A collector that panics gets its scrape a 500, and the next scrape renders
//!   afresh.
//! - **gzip**: when `Accept-Encoding` allows gzip (Prometheus always sends it), the body is
//!   gzip-compressed once per render and shared; `Vary: Accept-Encoding` is always set. With
//!   gzip on, every render is compressed on its own thread, whoever started it, so a scrape
//!   that joins a render never compresses on an async worker.
//! - **In-flight limit**: beyond the configured number of concurrent scrapes (default 1024), a
//!   scrape gets a 503 with `Retry-After: 1` at once. Waiting on a shared render costs almost
//!   nothing, so the limit only bounds the memory that waiting scrapes hold.
//! - **Deadline**: a render can block (an observable callback of the application waiting on a
//!   lock). A scrape waits at most Prometheus' `X-Prometheus-Scrape-Timeout-Seconds` minus
//!   half a second (the margin of blackbox_exporter's `--timeout-offset`; at most half the
//!   timeout), so that Prometheus receives the answer before it gives up; without the header,
//!   the builder's `job_deadline` (default 30 s). Past it: 503 with `Retry-After` and a reason
//!   naming the render and how long it has run. The render keeps its place: later scrapes join
//!   it (and time out in turn), never a second render thread beside a stuck one, and the next
//!   scrape after it ends renders afresh. A header that is not a positive number of seconds is
//!   a 400; values above a day count as a day. Outside a tokio runtime the render runs inline
//!   and no deadline applies.
//!
//! The query string is not read, nor checked: Prometheus's scrape `params` may add names of
//! its own, even repeated ones, and they change nothing.
//!
//! A stuck render cannot report itself on `/metrics`: `…_jemalloc_layer_jobs_stuck` shows it
//! on no collection of the same meter provider while a callback blocks.
//! `…_jemalloc_layer_jobs_timeouts_total{job="metrics_render"}` counts the scrapes that timed
//! out, on the first render that succeeds afterwards, and a warning is logged when it happens.
//!
//! Order of checks after admission: the scrape timeout header (400), in-flight limit (503),
//! then the render.

use super::handler::{Context, Handler};
use super::job::{Flight, Job, JobKind};
use super::query::Query;
use super::response::{self, Answer};
use crate::telemetry::exposition::{Render, Renderer, CONTENT_TYPE};
use http::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT_ENCODING, CONTENT_ENCODING, VARY};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The metrics endpoint of one layer.
pub(crate) struct Metrics {
    renderer: Arc<Renderer>,
    renders: Arc<Flight<Rendered>>,
    gzip: bool,
    limit: usize,
    in_flight: Arc<AtomicUsize>,
}

/// The outcome of one render, shared by every scrape that waited for it.
type Rendered = Result<Render, String>;

/// What a scrape asks for.
pub(crate) struct Scrape {
    head: bool,
    gzip: bool,
    /// Whether the answer depends on `Accept-Encoding` (gzip is on).
    varies: bool,
    /// How long it waits for the render, when Prometheus says.
    deadline: Option<Duration>,
}

/// The header in which Prometheus sends its scrape timeout, in seconds (`10`, `0.5`).
const SCRAPE_TIMEOUT: HeaderName = HeaderName::from_static("x-prometheus-scrape-timeout-seconds");

/// How much sooner than Prometheus' timeout a scrape is answered, so that Prometheus receives
/// the 503 (which has to cross the network) before it gives up: blackbox_exporter's default
/// `--timeout-offset`. Never more than half the timeout.
const SCRAPE_MARGIN: Duration = Duration::from_millis(500);

/// The longest scrape timeout taken from the header; a larger one counts as this.
const MAX_SCRAPE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

impl Handler for Metrics {
    const METHODS: &'static [Method] = &[Method::GET, Method::HEAD];
    const ALLOW: &'static str = "GET, HEAD";
    const OPEN: bool = true;
    const PARAMS: Option<&'static [&'static str]> = None;
    type Params = Scrape;
    type Output = Rendered;

    fn new(context: &Context<'_>) -> Self {
        let settings = context.settings;
        Self {
            renderer: Arc::new(Renderer::new(
                context.registry.clone(),
                context.zero_histograms.to_vec(),
            )),
            renders: Arc::new(Flight::new(
                context.runner(JobKind::Render),
                settings.scrape_reuse_window,
            )),
            gzip: settings.gzip,
            limit: settings.max_concurrent_scrapes,
            in_flight: Arc::default(),
        }
    }

    fn params(&self, parts: &Parts, _: Query<'_>) -> Result<Scrape, Answer> {
        Ok(Scrape {
            head: parts.method == Method::HEAD,
            gzip: self.gzip && accepts_gzip(&parts.headers),
            varies: self.gzip,
            deadline: scrape_deadline(&parts.headers)?,
        })
    }

    fn start(&self, scrape: &Scrape) -> Result<Job<Rendered>, Answer> {
        let Some(slot) = InFlight::acquire(&self.in_flight, self.limit) else {
            return Err(response::retry_after(
                StatusCode::SERVICE_UNAVAILABLE,
                Duration::from_secs(1),
                format_args!(
                    "too many concurrent scrapes (limit {}); retry shortly",
                    self.limit
                ),
            ));
        };
        let renderer = Arc::clone(&self.renderer);
        let gzip = self.gzip;
        let job = self.renders.join_or_start(move || {
            // A collector the application registered may panic; the scrape still gets an
            // answer (500) and the next scrape starts a fresh render.
            let rendered =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| renderer.render()))
                    .unwrap_or_else(|_| Err("rendering the metrics panicked".to_owned()));
            // Compress here, off the workers, for every scrape that will want it.
            if let (Ok(render), true) = (&rendered, gzip) {
                render.gzip();
            }
            rendered
        })?;
        let job = job.holding(slot);
        Ok(match scrape.deadline {
            Some(deadline) => job.waiting_at_most(deadline),
            None => job,
        })
    }

    fn answer(rendered: &Rendered, scrape: &Scrape) -> Answer {
        let render = match rendered {
            Ok(render) => render,
            Err(reason) => return response::text(StatusCode::INTERNAL_SERVER_ERROR, reason),
        };
        let body = if scrape.gzip {
            render.gzip()
        } else {
            render.text()
        };
        let mut answer = Response::new(Full::new(body.clone()));
        let headers = answer.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static(CONTENT_TYPE),
        );
        if scrape.varies {
            headers.insert(VARY, HeaderValue::from_static("accept-encoding"));
        }
        if scrape.gzip {
            headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        if scrape.head {
            return response::without_body(answer);
        }
        answer
    }
}

/// Counts a scrape as in flight until dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn acquire(count: &Arc<AtomicUsize>, limit: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(Arc::clone(count)))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long a scrape waits for its render, from Prometheus' scrape timeout header: the
/// timeout minus [`SCRAPE_MARGIN`], at least half of it. `None` without the header; a 400 when
/// it is not a positive number of seconds.
fn scrape_deadline(headers: &HeaderMap) -> Result<Option<Duration>, Answer> {
    let Some(value) = headers.get(SCRAPE_TIMEOUT) else {
        return Ok(None);
    };
    let timeout = value
        .to_str()
        .ok()
        .and_then(|text| text.trim().parse::<f64>().ok())
        .filter(|seconds| seconds.is_finite() && *seconds > 0.0)
        .ok_or_else(|| {
            response::text(
                StatusCode::BAD_REQUEST,
                format_args!(
                    "X-Prometheus-Scrape-Timeout-Seconds must be a positive number of seconds, \
                     got {value:?}"
                ),
            )
        })?;
    let timeout = Duration::try_from_secs_f64(timeout)
        .unwrap_or(MAX_SCRAPE_TIMEOUT)
        .min(MAX_SCRAPE_TIMEOUT);
    Ok(Some(timeout.saturating_sub(SCRAPE_MARGIN).max(timeout / 2)))
}

/// Whether `Accept-Encoding` allows gzip: a `gzip` (or `x-gzip`) entry with a non-zero
/// quality, or else a `*` entry with a non-zero quality.
fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut gzip = None;
    let mut any = None;
    for value in headers.get_all(ACCEPT_ENCODING) {
        let Ok(value) = value.to_str() else { continue };
        for entry in value.split(',') {
            let mut fields = entry.split(';');
            let coding = fields.next().unwrap_or("").trim();
            let quality = fields
                .filter_map(|p| {
                    let (key, value) = p.split_once('=')?;
                    key.trim()
                        .eq_ignore_ascii_case("q")
                        .then(|| value.trim().parse::<f32>().unwrap_or(0.0))
                })
                .next()
                .unwrap_or(1.0);
            if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
                gzip = Some(quality > 0.0);
            } else if coding == "*" {
                any = Some(quality > 0.0);
            }
        }
    }
    gzip.or(any).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    #[test]
    fn accept_encoding_negotiation() {
        assert!(accepts_gzip(&headers(&["gzip"])));
        assert!(accepts_gzip(&headers(&["deflate, GZIP;q=0.5"])));
        assert!(accepts_gzip(&headers(&["x-gzip"])));
        assert!(accepts_gzip(&headers(&["*"])));
        assert!(accepts_gzip(&headers(&["br", "gzip"])));
        assert!(!accepts_gzip(&headers(&[])));
        assert!(!accepts_gzip(&headers(&["identity"])));
        assert!(!accepts_gzip(&headers(&["br, deflate"])));
        assert!(!accepts_gzip(&headers(&["gzip;q=0"])));
        assert!(!accepts_gzip(&headers(&["*, gzip;q=0"])));
        assert!(!accepts_gzip(&headers(&["*;q=0"])));
        assert!(!accepts_gzip(&headers(&["gzip;q=bogus"])));
    }

    #[test]
    fn the_scrape_deadline_comes_before_prometheus_gives_up() {
        let deadline = |value: &str| {
            let mut map = HeaderMap::new();
            map.insert(SCRAPE_TIMEOUT, HeaderValue::from_str(value).unwrap());
            scrape_deadline(&map)
        };
        let ms = |ms| Some(Some(Duration::from_millis(ms)));
        assert!(matches!(scrape_deadline(&HeaderMap::new()), Ok(None)));
        assert_eq!(deadline("10").ok(), ms(9_500));
        assert_eq!(deadline("1").ok(), ms(500));
        assert_eq!(deadline("0.5").ok(), ms(250));
        assert_eq!(deadline(" 2.5 ").ok(), ms(2_000));
        assert_eq!(
            deadline("1e300").ok(),
            Some(Some(MAX_SCRAPE_TIMEOUT - SCRAPE_MARGIN))
        );
        for bad in ["0", "-1", "", "ten", "NaN", "inf", "1s"] {
            let refusal = deadline(bad).expect_err(bad);
            assert_eq!(refusal.status(), StatusCode::BAD_REQUEST, "{bad:?}");
        }
    }

    #[test]
    fn in_flight_slots_are_bounded_and_returned() {
        let count = Arc::new(AtomicUsize::new(0));
        let first = InFlight::acquire(&count, 1).unwrap();
        assert!(InFlight::acquire(&count, 1).is_none());
        drop(first);
        assert!(InFlight::acquire(&count, 1).is_some());
    }
}
