//! The endpoints the layer answers itself, and the one pipeline every intercepted request
//! goes through:
//!
//! 1. **admit**: the method (405 with `Allow`), then access, whoever the endpoint is: a
//!    cross-origin write from a browser or, for anonymous access, a `Host` that is not an IP
//!    or `localhost` (403), then the rule itself (401 with `WWW-Authenticate: Bearer`, or
//!    403), see [`access`];
//! 2. **parameters**: the query string checked against the names the endpoint accepts, each
//!    at most once ([`Query::check`]: 400 naming them, or naming the one given twice), then
//!    read from it and the headers ([`Handler::params`]: 400 with a reason naming what is
//!    allowed; numbers are digits without a sign unless a negative one means something);
//! 3. **availability and start**: jemalloc usable (501/503), a slot free (409, 429 or 503 with
//!    `Retry-After`), then the job starts off the async workers or joins the one in progress,
//!    [`Handler::start`];
//! 4. **answer**, when the job reports, [`Handler::answer`]; a job that ended without a result
//!    gets the one fallback, a 500 naming the endpoint, and a request whose deadline passes
//!    first gets a 503 naming the job and how long it has run (`job`'s "Deadlines").
//!
//! An endpoint is one file with a [`Handler`] and one line in the `endpoints!` table below.

// A refusal is the answer itself (`Err(response)`): it is built once per intercepted request
// and moved straight into the reply, so boxing it would only add an allocation.
#![allow(clippy::result_large_err)]

mod access;
mod config;
mod handler;
mod heap;
mod job;
mod metrics;
mod page;
mod profiling;
mod purge;
mod query;
mod rate;
mod request_body;
mod response;
mod settings;
mod stats;
mod timer;

pub(crate) use access::{validate_token, Access, Predicate};
pub(crate) use handler::Context;
pub(crate) use job::JobTelemetry;
pub(crate) use request_body::{discard, MAX_DISCARDED_BODY};
pub(crate) use response::{shed_answer, Reply};
pub(crate) use settings::Settings;
pub use settings::{
    DEFAULT_HEAP_PROFILE_MAX_BYTES, DEFAULT_JOB_DEADLINE, DEFAULT_MAX_CONCURRENT_SCRAPES,
    DEFAULT_PURGE_COOLDOWN, DEFAULT_STATS_MAX_BYTES, DEFAULT_STATS_RATE_LIMIT,
    DEFAULT_STATS_REUSE_WINDOW,
};

use crate::telemetry::exposition::ZeroHistogram;
use handler::{Handler, Respond};
use http::request::Parts;
use http::Method;
use query::Query;
use std::fmt;

macro_rules! endpoints {
    ($(
        $(#[doc = $doc:literal])*
        $variant:ident => $name:literal, $path:literal, $handler:ty
            $(, access from $access_from:ident)?;
    )*) => {
        /// One of the endpoints the layer answers itself, to configure with the builder's
        /// generic methods ([`path`](crate::JemallocLayerBuilder::path),
        /// [`without`](crate::JemallocLayerBuilder::without),
        /// [`bearer_token`](crate::JemallocLayerBuilder::bearer_token),
        /// [`authorize`](crate::JemallocLayerBuilder::authorize),
        /// [`allow_anonymous`](crate::JemallocLayerBuilder::allow_anonymous)).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Endpoint {
            $( $(#[doc = $doc])* $variant, )*
        }

        impl Endpoint {
            /// Every endpoint, in the order the layer matches paths.
            pub const ALL: &'static [Endpoint] = &[$(Self::$variant),*];

            /// Its name in messages and errors: `"metrics"`, `"purge"`, `"stats"`, `"config"`,
            /// `"heap"`, `"profiling"`, `"page"`.
            pub fn name(self) -> &'static str {
                match self { $(Self::$variant => $name,)* }
            }

            /// The path it answers unless configured otherwise with
            /// [`path`](crate::JemallocLayerBuilder::path): `"/metrics"`,
            /// `"/debug/jemalloc/purge"`, ….
            pub const fn default_path(self) -> &'static str {
                match self { $(Self::$variant => $path,)* }
            }

            /// Whose access rules it follows when it has none of its own.
            pub(crate) fn access_from(self) -> Option<Endpoint> {
                match self { $(Self::$variant => None $(.or(Some(Self::$access_from)))?,)* }
            }

            /// The methods it answers, and them as an `Allow` header.
            fn methods(self) -> (&'static [Method], &'static str) {
                match self {
                    $(Self::$variant => (<$handler as Handler>::METHODS, <$handler as Handler>::ALLOW),)*
                }
            }

            /// Whether it answers anyone until access rules are set (only `/metrics`).
            pub(crate) fn open_by_default(self) -> bool {
                match self { $(Self::$variant => <$handler as Handler>::OPEN,)* }
            }

            /// The query parameter names it accepts (`None`: not checked).
            fn params(self) -> Option<&'static [&'static str]> {
                match self { $(Self::$variant => <$handler as Handler>::PARAMS,)* }
            }

            /// The histograms of its telemetry written at zero until measured.
            pub(crate) fn zero_histograms(self) -> &'static [ZeroHistogram] {
                match self { $(Self::$variant => <$handler as Handler>::ZERO_HISTOGRAMS,)* }
            }

            fn handler(self, context: &Context<'_>) -> Box<dyn Respond> {
                match self { $(Self::$variant => Box::new(<$handler as Handler>::new(context)),)* }
            }
        }
    };
}

endpoints! {
    /// `GET|HEAD /metrics`: the Prometheus text exposition.
    Metrics => "metrics", "/metrics", metrics::Metrics;
    /// `POST|PUT /debug/jemalloc/purge`: returns unused pages to the OS.
    Purge => "purge", "/debug/jemalloc/purge", purge::Purge;
    /// `GET|HEAD /debug/jemalloc/stats`: `malloc_stats_print` with a summary.
    Stats => "stats", "/debug/jemalloc/stats", stats::Stats,
        access from Purge;
    /// `GET|HEAD|PUT /debug/jemalloc/config`: background threads and decay times, read and
    /// changed at run time.
    Config => "config", "/debug/jemalloc/config", config::Config,
        access from Purge;
    /// `GET /debug/pprof/heap`: the heap profile, pprof or a flame graph (feature `profiling`).
    Heap => "heap", "/debug/pprof/heap", heap::Heap,
        access from Purge;
    /// `GET|PUT /debug/jemalloc/profiling`: the heap profiler's state, and switching it.
    Profiling => "profiling", "/debug/jemalloc/profiling",
        profiling::Profiling, access from Purge;
    /// `GET|HEAD /debug/jemalloc/`: a page for people, the figures at a glance, a chart of
    /// the last minutes and the other endpoints' actions (JSON with `?format=json`).
    Page => "page", "/debug/jemalloc/", page::Page, access from Purge;
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One intercepted path: who may use it and what answers it.
pub(crate) struct Route {
    endpoint: Endpoint,
    path: Box<str>,
    access: Access,
    methods: &'static [Method],
    allow: &'static str,
    params: Option<&'static [&'static str]>,
    handler: Box<dyn Respond>,
}

impl Route {
    /// The route of `endpoint` on `path`, its handler built from `context`.
    pub(crate) fn new(
        endpoint: Endpoint,
        path: Box<str>,
        access: Access,
        context: &Context<'_>,
    ) -> Self {
        let (methods, allow) = endpoint.methods();
        Self {
            endpoint,
            path,
            access,
            methods,
            allow,
            params: endpoint.params(),
            handler: endpoint.handler(context),
        }
    }

    /// Answers a request on this route: admission (method, access), the parameter names
    /// (unknown or repeated: 400), then the handler's pipeline.
    pub(crate) fn respond(&self, parts: &Parts) -> Reply {
        if !self.methods.contains(&parts.method) {
            return Reply::Now(response::method_not_allowed(self.allow, &self.path));
        }
        if let Some(refusal) = self.access.refusal(parts) {
            return Reply::Now(self.handler.refused(parts, refusal));
        }
        match Query::check(parts.uri.query(), self.params, &self.path) {
            Ok(query) => self.handler.respond(self.endpoint.name(), parts, query),
            Err(refusal) => Reply::Now(refusal),
        }
    }
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field("endpoint", &self.endpoint)
            .field("path", &self.path)
            .field("access", &self.access)
            .finish()
    }
}

/// Every route of one layer, matched by exact path.
#[derive(Debug)]
pub(crate) struct Routes {
    routes: Box<[Route]>,
    /// Bit `n` is set when some route's path is `n` bytes long (bit 63: 63 or more). Most
    /// forwarded requests have a path of another length and are told apart with one test.
    lengths: u64,
}

impl Routes {
    pub(crate) fn new(routes: Vec<Route>) -> Self {
        let lengths = routes
            .iter()
            .fold(0, |lengths, route| lengths | length_bit(&route.path));
        Self {
            routes: routes.into_boxed_slice(),
            lengths,
        }
    }

    /// The index of the route answering `path`, if any: paths match exactly.
    #[inline]
    pub(crate) fn find(&self, path: &str) -> Option<usize> {
        if self.lengths & length_bit(path) == 0 {
            return None;
        }
        self.routes.iter().position(|route| *route.path == *path)
    }

    /// The route at `index`, as [`find`](Self::find) gave it.
    pub(crate) fn route(&self, index: usize) -> &Route {
        &self.routes[index]
    }

    /// The path `endpoint` answers, if it is on.
    pub(crate) fn path(&self, endpoint: Endpoint) -> Option<&str> {
        self.routes
            .iter()
            .find(|route| route.endpoint == endpoint)
            .map(|route| &*route.path)
    }
}

#[inline]
fn length_bit(path: &str) -> u64 {
    1 << path.len().min(63)
}
