//! [`Handler`]: the steps of one endpoint, and the pipeline that runs them in order after
//! admission (parameters, availability and start, answer).

use super::job::{Job, JobKind, JobTelemetry, Runner};
use super::query::Query;
use super::response::{Answer, Reply};
use super::settings::Settings;
use crate::telemetry::exposition::ZeroHistogram;
use http::request::Parts;
use http::Method;
use opentelemetry::metrics::Meter;

/// What one endpoint does with an admitted request. The pipeline (this module) calls the
/// steps in order and stops at the first refusal.
pub(crate) trait Handler: Send + Sync + Sized + 'static {
    /// The methods it answers; any other gets a 405 naming them.
    const METHODS: &'static [Method];
    /// [`METHODS`](Self::METHODS) as an `Allow` header.
    const ALLOW: &'static str;
    /// Whether it answers anyone until access rules are set. Only `/metrics` is (Prometheus
    /// expects it); every debug endpoint is closed until an access rule is configured.
    const OPEN: bool = false;
    /// The query parameter names it accepts, each at most once; any other name, or one given
    /// twice, is a 400 before [`params`](Self::params) runs. `None`: not checked, and the
    /// handler sees no parameters (`/metrics`, where Prometheus's scrape `params` may add
    /// some).
    const PARAMS: Option<&'static [&'static str]> = Some(&[]);
    /// Histograms of its telemetry that `/metrics` writes at zero until their first
    /// measurement, so that they have series from the start.
    const ZERO_HISTOGRAMS: &'static [ZeroHistogram] = &[];
    /// What a request asks for.
    type Params: Send + 'static;
    /// What the job produces; shared by every request that waited for the same job.
    type Output: Send + Sync + 'static;

    /// Builds the handler from the layer's configuration.
    fn new(context: &Context<'_>) -> Self;
    /// Reads the request's parameters from `query` (already checked: known names, each at
    /// most once) and the headers, or answers why not (400).
    fn params(&self, parts: &Parts, query: Query<'_>) -> Result<Self::Params, Answer>;
    /// Checks availability and starts (or joins) the job; `Err` is the answer given without
    /// one (a refusal, or a `HEAD` that needs no job).
    fn start(&self, params: &Self::Params) -> Result<Job<Self::Output>, Answer>;
    /// The answer for a finished job.
    fn answer(output: &Self::Output, params: &Self::Params) -> Answer;
    /// The answer to a request the access rules refused (`refusal`: their 400, 401 or 403);
    /// as it is unless the endpoint says more without giving anything away (the page's shell
    /// that asks for the token).
    fn refused(_parts: &Parts, refusal: Answer) -> Answer {
        refusal
    }
}

/// What the handlers are built from.
pub(crate) struct Context<'a> {
    pub(crate) registry: &'a prometheus::Registry,
    pub(crate) meter: &'a Meter,
    pub(crate) settings: &'a Settings,
    /// The [`Handler::ZERO_HISTOGRAMS`] of every endpoint the layer serves.
    pub(crate) zero_histograms: &'a [ZeroHistogram],
    /// The layer's telemetry of its jobs, shared by every endpoint.
    pub(crate) jobs: &'a JobTelemetry,
    /// The process's memory governor, and this layer's shedding switch.
    pub(crate) governor: &'a std::sync::Arc<crate::governor::Governor>,
    pub(crate) shedding: &'a std::sync::Weak<dyn crate::governor::HoldsShedding>,
    /// Bytes per route, when the layer counts them.
    pub(crate) ledger: Option<&'a std::sync::Arc<crate::accounting::ledger::Ledger>>,
    /// The path of every endpoint the layer serves.
    pub(crate) paths: &'a [(super::Endpoint, Box<str>)],
}

impl Context<'_> {
    /// Where the jobs of `kind` run, with the layer's job deadline.
    pub(crate) fn runner(&self, kind: JobKind) -> Runner {
        Runner::new(kind, self.settings.job_deadline, self.jobs)
    }
}

/// The pipeline after admission, for one kind of handler.
pub(crate) trait Respond: Send + Sync {
    /// Answers an admitted request whose `query` is checked; `endpoint` names it in the
    /// fallback answer.
    fn respond(&self, endpoint: &'static str, parts: &Parts, query: Query<'_>) -> Reply;
    /// [`Handler::refused`].
    fn refused(&self, parts: &Parts, refusal: Answer) -> Answer;
}

impl<H: Handler> Respond for H {
    fn respond(&self, endpoint: &'static str, parts: &Parts, query: Query<'_>) -> Reply {
        let params = match self.params(parts, query) {
            Ok(params) => params,
            Err(refusal) => return Reply::Now(refusal),
        };
        match self.start(&params) {
            Ok(job) => job.reply(endpoint, move |output| H::answer(output, &params)),
            Err(refusal) => Reply::Now(refusal),
        }
    }

    fn refused(&self, parts: &Parts, refusal: Answer) -> Answer {
        H::refused(parts, refusal)
    }
}
