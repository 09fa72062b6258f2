//! `GET|HEAD /debug/jemalloc/stats`: jemalloc's own statistics dump (`malloc_stats_print`),
//! with a [`StatsSummary`] that says what the figures mean and what to do about them.
//!
//! - JSON by default (`application/json`):
//!   `{"summary": {…}, "detail": "full"|"compact", "stats": <malloc_stats_print JSON>}`.
//! - Plain text with `?format=text`: `malloc_stats_print`'s text output as it is.
//! - The dump is capped (default 4 MiB). A JSON dump over the cap is retried without per-arena,
//!   bin, large-class and mutex details (`"detail": "compact"`); still over the cap, the answer
//!   is a 500 naming the cap. A text dump is cut at the cap with a last line saying so.
//!
//! The dump walks every arena under jemalloc's locks and builds up to the cap in memory, so it
//! is bounded: it runs on a thread of its own, off the async workers; at most one dump per
//! format runs at a time and requests that arrive meanwhile share its result; a finished dump
//! answers new requests for a reuse window (default 1 s), so a flood costs at most one dump
//! per format per second and the memory held is at most one capped dump per format. `HEAD`
//! answers from a dump in progress or held, and otherwise without running one (no
//! `Content-Length` then).
//!
//! At most 10 answers per second (other than `HEAD`; `stats_rate_limit`) are given: beyond,
//! 429 with `Retry-After`. Serving dumps of a few MiB by the thousand would take the CPU and
//! bandwidth of the application and of `/metrics`.
//!
//! A request waits for its dump at most the builder's `job_deadline` (default 30 s): past it,
//! a 503 naming the dump and how long it has run; the dump keeps its place, so later requests
//! join it rather than start another.
//!
//! Order of checks after admission: parameters (an unknown or repeated name, a bad format:
//! 400), jemalloc availability (501/503), rate (429).

use super::handler::{Context, Handler};
use super::job::{Flight, Job, JobKind};
use super::query::Query;
use super::rate::Rate;
use super::response::{self, Answer};
use crate::accounting::ledger::Ledger;
use crate::accounting::route_hints;
use crate::governor::{Governor, HoldsShedding};
use crate::jemalloc::ctl::{Ctl, PrintOptions};
use crate::jemalloc::dump::dump;
use crate::jemalloc::summary::{governor_hints, GovernorFacts};
use crate::jemalloc::{JemallocError, StatsSummary};
use bytes::Bytes;
use http::header::HeaderValue;
use http::request::Parts;
use http::{Method, StatusCode};
use opentelemetry::metrics::Counter;
use opentelemetry::KeyValue;
use serde::Serialize;
use serde_json::value::RawValue;
use std::sync::Arc;

/// The stats endpoint of one layer.
pub(crate) struct Stats {
    max_bytes: usize,
    json: Arc<Flight<Dumped>>,
    text: Arc<Flight<Dumped>>,
    /// `jemalloc.stats.dumps` (attribute `format`), exported as `…_jemalloc_stats_dumps_total`:
    /// how many dumps ran, so that an operator sees a flood cost at most one per window.
    dumps: Counter<u64>,
    /// Answers per second, other than `HEAD`.
    rate: Rate,
    governor: Arc<Governor>,
    /// The layer's shared state, which holds its shedding switch (weak: it holds this).
    shedding: std::sync::Weak<dyn HoldsShedding>,
    /// Bytes per route, for the hints naming the routes that allocate most.
    ledger: Option<Arc<Ledger>>,
}

/// What a stats request asks for.
pub(crate) struct Request {
    head: bool,
    format: Format,
}

#[derive(Clone, Copy)]
enum Format {
    Json,
    Text,
}

impl Format {
    fn attribute(self) -> KeyValue {
        KeyValue::new(
            "format",
            match self {
                Self::Json => "json",
                Self::Text => "text",
            },
        )
    }

    fn content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Text => "text/plain; charset=utf-8",
        }
    }
}

/// A finished dump.
pub(crate) enum Dumped {
    Json(Bytes),
    Text(Bytes),
    /// Over the cap even without per-arena details.
    OverCap(usize),
    Failed(JemallocError),
}

/// The JSON body.
#[derive(Serialize)]
struct Body<'a> {
    summary: StatsSummary,
    detail: &'static str,
    stats: &'a RawValue,
}

impl Handler for Stats {
    const METHODS: &'static [Method] = &[Method::GET, Method::HEAD];
    const ALLOW: &'static str = "GET, HEAD";
    const PARAMS: Option<&'static [&'static str]> = Some(&["format"]);
    type Params = Request;
    type Output = Dumped;

    fn new(context: &Context<'_>) -> Self {
        let window = context.settings.stats_reuse_window;
        let dumps = context
            .meter
            .u64_counter("jemalloc.stats.dumps")
            .with_description("jemalloc stats dumps run by the stats endpoint, by format")
            .build();
        for format in [Format::Json, Format::Text] {
            dumps.add(0, &[format.attribute()]);
        }
        Self {
            max_bytes: context.settings.stats_max_bytes,
            json: Arc::new(Flight::new(context.runner(JobKind::StatsDump), window)),
            text: Arc::new(Flight::new(context.runner(JobKind::StatsDump), window)),
            dumps,
            rate: Rate::new(context.settings.stats_rate_limit),
            governor: Arc::clone(context.governor),
            ledger: context.ledger.cloned(),
            shedding: std::sync::Weak::clone(context.shedding),
        }
    }

    fn params(&self, parts: &Parts, query: Query<'_>) -> Result<Request, Answer> {
        let format = match query.get("format") {
            None | Some("json") => Format::Json,
            Some("text") => Format::Text,
            Some(other) => {
                return Err(response::text(
                    StatusCode::BAD_REQUEST,
                    format_args!(
                        "unknown format {other:?}: use format=json (the default) or format=text"
                    ),
                ))
            }
        };
        Ok(Request {
            head: parts.method == Method::HEAD,
            format,
        })
    }

    fn start(&self, request: &Request) -> Result<Job<Dumped>, Answer> {
        let ctl = crate::jemalloc::ctl::ctl().map_err(|e| response::jemalloc_error(&e))?;
        let (format, max_bytes) = (request.format, self.max_bytes);
        let flight = match format {
            Format::Json => &self.json,
            Format::Text => &self.text,
        };
        if request.head {
            // The headers of a dump in progress or held; otherwise no dump just for them.
            return flight.peek().ok_or_else(|| {
                response::with_body(
                    StatusCode::OK,
                    HeaderValue::from_static(format.content_type()),
                    Bytes::new(),
                )
            });
        }
        let dumps = self.dumps.clone();
        self.rate.acquire().map_err(|wait| {
            response::retry_after(
                StatusCode::TOO_MANY_REQUESTS,
                wait,
                format_args!(
                    "stats answers are limited to {} per second; retry shortly",
                    self.rate.per_second()
                ),
            )
        })?;
        let shedding = self
            .shedding
            .upgrade()
            .is_some_and(|h| h.shedding().active());
        let facts = governor_facts(&self.governor, shedding);
        let route_hints = self.ledger.as_deref().map(route_hints).unwrap_or_default();
        flight.join_or_start(move || {
            dumps.add(1, &[format.attribute()]);
            let dumped = match format {
                Format::Json => json_dump(ctl, max_bytes, facts, route_hints),
                Format::Text => text_dump(ctl, max_bytes),
            };
            dumped.unwrap_or_else(Dumped::Failed)
        })
    }

    fn answer(dumped: &Dumped, request: &Request) -> Answer {
        let answer = match dumped {
            Dumped::Json(body) => response::with_body(
                StatusCode::OK,
                HeaderValue::from_static(Format::Json.content_type()),
                body.clone(),
            ),
            Dumped::Text(body) => response::with_body(
                StatusCode::OK,
                HeaderValue::from_static(Format::Text.content_type()),
                body.clone(),
            ),
            Dumped::OverCap(max_bytes) => response::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format_args!(
                    "the jemalloc stats dump exceeds the cap of {max_bytes} bytes even without \
                     per-arena details; raise it with stats_max_bytes"
                ),
            ),
            Dumped::Failed(e) => response::jemalloc_error(e),
        };
        if request.head {
            return response::without_body(answer);
        }
        answer
    }
}

/// The governor's state as the summary's hints need it.
fn governor_facts(governor: &Governor, shedding: bool) -> GovernorFacts {
    let status = governor.status();
    GovernorFacts {
        limit: status.limit(),
        usage: status.usage().unwrap_or(0),
        unreclaimable: status.unreclaimable(),
        shedding,
    }
}

fn json_dump(
    ctl: &Ctl,
    max_bytes: usize,
    governor: GovernorFacts,
    route_hints: Vec<String>,
) -> Result<Dumped, JemallocError> {
    let mut summary = StatsSummary::read(ctl)?;
    summary.hints.extend(governor_hints(&governor));
    summary.hints.extend(route_hints);
    let mut options = PrintOptions {
        json: true,
        compact: false,
    };
    let mut stats = dump(ctl, options, max_bytes)?;
    if stats.truncated {
        options.compact = true;
        stats = dump(ctl, options, max_bytes)?;
    }
    if stats.truncated {
        return Ok(Dumped::OverCap(max_bytes));
    }
    let text = String::from_utf8_lossy(&stats.text);
    let raw: &RawValue =
        serde_json::from_str(text.trim_end()).map_err(|e| JemallocError::Mallctl {
            key: "malloc_stats_print",
            reason: format!("its JSON does not parse: {e}"),
        })?;
    let body = Body {
        summary,
        detail: if options.compact { "compact" } else { "full" },
        stats: raw,
    };
    serde_json::to_vec(&body)
        .map(|json| Dumped::Json(Bytes::from(json)))
        .map_err(|e| JemallocError::Mallctl {
            key: "malloc_stats_print",
            reason: format!("cannot render the answer: {e}"),
        })
}

fn text_dump(ctl: &Ctl, max_bytes: usize) -> Result<Dumped, JemallocError> {
    let options = PrintOptions {
        json: false,
        compact: false,
    };
    let dumped = dump(ctl, options, max_bytes)?;
    let mut text = dumped.text;
    if dumped.truncated {
        text.extend_from_slice(
            format!(
                "\n[truncated at {max_bytes} bytes: raise stats_max_bytes, or use format=json]\n"
            )
            .as_bytes(),
        );
    }
    Ok(Dumped::Text(Bytes::from(text)))
}
