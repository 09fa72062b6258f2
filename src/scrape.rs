//! The `/metrics` endpoint: renders the Prometheus registry, shares one render between
//! concurrent scrapes, keeps renders off the async workers, gzips when the client accepts it,
//! and bounds how many scrapes are in flight.
//!
//! - **Coalescing**: a scrape that arrives while a render is running waits for that render
//!   instead of starting another, so scrapes in flight together cost one render (and one
//!   jemalloc epoch advance). A scrape never gets a render that had finished before it
//!   arrived (it joins the one in progress or starts one), unless a reuse window is configured:
//!   then a render that finished less than that long ago answers it too, which bounds renders
//!   to about one per window under a scrape storm.
//! - **Off the workers**: on a tokio runtime the render (gathering the OpenTelemetry SDK, which
//!   runs every observable callback, then encoding) runs on the blocking pool; outside one it
//!   runs inline.
//! - **gzip**: when `Accept-Encoding` allows gzip (Prometheus always sends it), the body is
//!   gzip-compressed once per render and shared; `Vary: Accept-Encoding` is always set.
//! - **In-flight limit**: beyond the configured number of concurrent scrapes, a scrape gets a
//!   503 with `Retry-After: 1` at once.

use crate::access::{admit, Access};
use crate::future::ResponseFuture;
use crate::response;
use bytes::Bytes;
use http::header::{
    HeaderMap, HeaderValue, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE,
    RETRY_AFTER, VARY,
};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The default number of scrapes that may be in flight at once.
pub const DEFAULT_MAX_CONCURRENT_SCRAPES: usize = 16;

/// The metrics endpoint of one layer.
pub(crate) struct MetricsEndpoint {
    pub(crate) path: Box<str>,
    pub(crate) access: Access,
    pub(crate) scrapes: Arc<Scrapes>,
}

/// Render state shared by every scrape of one layer.
pub(crate) struct Scrapes {
    registry: prometheus::Registry,
    gzip: bool,
    limit: usize,
    /// A render that finished less than this long ago answers new scrapes too.
    reuse_window: Duration,
    in_flight: AtomicUsize,
    /// The size of the last render, to size the next one's buffer.
    last_len: AtomicUsize,
    /// The render in progress, if any: its generation and a receiver for its result.
    current: Mutex<Current>,
}

#[derive(Default)]
struct Current {
    generation: u64,
    running: Option<watch::Receiver<Option<Rendered>>>,
    /// The last finished render and when it finished, kept only with a reuse window.
    last: Option<(Instant, Rendered)>,
}

/// The outcome of one render, shared by every scrape that waited for it.
type Rendered = Arc<Result<Render, String>>;

struct Render {
    text: Bytes,
    gzip: OnceLock<Bytes>,
}

impl Render {
    fn gzip(&self) -> &Bytes {
        self.gzip.get_or_init(|| gzip(&self.text))
    }
}

impl Scrapes {
    pub(crate) fn new(
        registry: prometheus::Registry,
        gzip: bool,
        limit: usize,
        reuse_window: Duration,
    ) -> Self {
        Self {
            registry,
            gzip,
            limit,
            reuse_window,
            in_flight: AtomicUsize::new(0),
            last_len: AtomicUsize::new(0),
            current: Mutex::default(),
        }
    }
}

impl MetricsEndpoint {
    /// Answers a request on the metrics path. Order of checks: method (405), access
    /// (401/403), in-flight limit (503), then the render.
    pub(crate) fn respond<F>(&self, parts: &Parts) -> ResponseFuture<F> {
        let methods = [Method::GET, Method::HEAD];
        if let Some(refusal) = admit(parts, methods, "GET, HEAD", &self.path, &self.access) {
            return ResponseFuture::local(refusal);
        }
        let head = parts.method == Method::HEAD;
        let Some(slot) = InFlight::acquire(&self.scrapes) else {
            let mut answer = response::text(
                StatusCode::SERVICE_UNAVAILABLE,
                format_args!(
                    "too many concurrent scrapes (limit {}); retry shortly",
                    self.scrapes.limit
                ),
            );
            answer
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            return ResponseFuture::local(answer);
        };
        let gzip = self.scrapes.gzip && accepts_gzip(&parts.headers);
        let mut receiver = Scrapes::subscribe(&self.scrapes, gzip);
        let varies = self.scrapes.gzip;

        // Already rendered (inline, outside a tokio runtime): answer without a future.
        if let Some(rendered) = receiver.borrow_and_update().clone() {
            return ResponseFuture::local(answer(&rendered, head, gzip, varies));
        }
        ResponseFuture::pending(async move {
            let _slot = slot;
            match receiver.wait_for(Option::is_some).await {
                Ok(rendered) => {
                    let rendered = rendered.clone().expect("waited for Some");
                    answer(&rendered, head, gzip, varies)
                }
                // The render job ended without a result: it panicked.
                Err(_) => response::text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "rendering the metrics failed unexpectedly",
                ),
            }
        })
    }
}

impl Scrapes {
    /// Joins the render in progress, or starts one.
    fn subscribe(this: &Arc<Self>, gzip: bool) -> watch::Receiver<Option<Rendered>> {
        let (sender, generation) = {
            let mut current = this.current.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(running) = &current.running {
                return running.clone();
            }
            if let Some((finished, rendered)) = &current.last {
                if finished.elapsed() < this.reuse_window {
                    return watch::channel(Some(Arc::clone(rendered))).1;
                }
            }
            let (sender, receiver) = watch::channel(None);
            current.generation += 1;
            current.running = Some(receiver);
            (sender, current.generation)
        };
        let receiver = sender.subscribe();
        let scrapes = Arc::clone(this);
        let job = move || {
            // A collector the application registered may panic; the scrape still gets an
            // answer (500) and the next scrape starts a fresh render.
            let rendered =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scrapes.render(gzip)))
                    .unwrap_or_else(|_| Err("rendering the metrics panicked".to_owned()));
            let rendered = Arc::new(rendered);
            // Stop accepting joiners before publishing: a scrape that arrives once the render
            // is finished must not get a render that finished before it arrived, so it starts a render
            // of its own.
            {
                let mut current = scrapes.current.lock().unwrap_or_else(|e| e.into_inner());
                if current.generation == generation {
                    current.running = None;
                    if !scrapes.reuse_window.is_zero() {
                        current.last = Some((Instant::now(), Arc::clone(&rendered)));
                    }
                }
            }
            sender.send_replace(Some(rendered));
        };
        crate::blocking::run(job);
        receiver
    }

    /// Gathers and encodes the registry (and gzips it when the scrape that started the render
    /// wants gzip). Blocking.
    fn render(&self, gzip: bool) -> Result<Render, String> {
        let families = self.registry.gather();
        // Size the buffer from the last render, so a large exposition is not regrown (and
        // copied) a dozen times on every scrape.
        let last = self.last_len.load(Ordering::Relaxed);
        let mut text = String::with_capacity((last + last / 8).max(4096));
        crate::encode::encode(&families, &mut text)
            .map_err(|e| format!("cannot encode metrics: {e}"))?;
        self.last_len.store(text.len(), Ordering::Relaxed);
        let text = Bytes::from(text);
        let render = Render {
            text,
            gzip: OnceLock::new(),
        };
        if gzip {
            render.gzip();
        }
        Ok(render)
    }
}

/// The HTTP answer for a render.
fn answer(rendered: &Rendered, head: bool, gzip: bool, varies: bool) -> Response<Full<Bytes>> {
    let render = match rendered.as_ref() {
        Ok(render) => render,
        Err(reason) => return response::text(StatusCode::INTERNAL_SERVER_ERROR, reason),
    };
    let body = if gzip { render.gzip() } else { &render.text };
    let length = body.len();
    let mut answer = Response::new(Full::new(if head { Bytes::new() } else { body.clone() }));
    let headers = answer.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(prometheus::TEXT_FORMAT),
    );
    if varies {
        headers.insert(VARY, HeaderValue::from_static("accept-encoding"));
    }
    if gzip {
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    if head {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
    }
    answer
}

/// Counts a scrape as in flight until dropped.
struct InFlight(Arc<Scrapes>);

impl InFlight {
    fn acquire(scrapes: &Arc<Scrapes>) -> Option<Self> {
        scrapes
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < scrapes.limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(Arc::clone(scrapes)))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
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

/// gzip at the default level: a 100 KiB exposition compresses about 10× in about a
/// millisecond.
fn gzip(text: &[u8]) -> Bytes {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(text.len() / 6),
        flate2::Compression::default(),
    );
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(text);
    Bytes::from(encoder.finish().unwrap_or_default())
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
    fn gzip_round_trips() {
        use std::io::Read;
        let text = b"metric_a 1\nmetric_b 2\n".repeat(100);
        let compressed = gzip(&text);
        assert!(compressed.len() < text.len() / 5);
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&compressed[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, text);
    }
}
