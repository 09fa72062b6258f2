//! Keeping routes that are dangerous to expose (the example server's `/demo/*`, which allocate
//! up to 4 GiB on request) to this machine: they answer loopback peers, and other peers only
//! when the server was given a token and the request carries it as
//! `Authorization: Bearer TOKEN`.
//!
//! The peer is the `ConnectInfo<SocketAddr>` that `serve.rs` puts on every request; a request
//! without one is treated as coming from elsewhere.

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use http::StatusCode;
use std::net::SocketAddr;
use std::sync::Arc;

/// Who may use the guarded routes: loopback peers, and others with the token when one is set.
#[derive(Clone)]
pub struct LoopbackOrToken {
    token: Option<Arc<str>>,
    /// The routes it guards, for the refusal's message (`/demo/*`).
    routes: &'static str,
}

impl LoopbackOrToken {
    /// Guards `routes` (named in refusals) with `token`, if any.
    pub fn new(routes: &'static str, token: Option<&str>) -> Self {
        Self {
            token: token.map(Arc::from),
            routes,
        }
    }

    /// What other peers than loopback need, in a sentence for the banner and `--help`.
    pub fn rule(&self) -> String {
        match self.token {
            None => format!(
                "{} answer loopback peers only (give the server a token, --purge-token or \
                 PURGE_TOKEN, to let others in with it)",
                self.routes
            ),
            Some(_) => format!(
                "{} answer loopback peers, and others that send Authorization: Bearer \
                 $PURGE_TOKEN",
                self.routes
            ),
        }
    }

    /// The refusal of `request`, or `None` when it may go on: 401 with
    /// `WWW-Authenticate: Bearer` when a token is set and the request lacks it, 403 when no
    /// token is set, each with a one-line reason.
    pub fn refusal(&self, request: &Request) -> Option<Response> {
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(peer)| *peer);
        if peer.is_some_and(|peer| peer.ip().to_canonical().is_loopback()) {
            return None;
        }
        let Some(token) = &self.token else {
            let reason = format!(
                "{} allocate up to 4 GiB: they answer loopback peers only, unless the server \
                 is given a token (--purge-token or PURGE_TOKEN) and the request carries it\n",
                self.routes
            );
            return Some((StatusCode::FORBIDDEN, reason).into_response());
        };
        let sent = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        if sent.is_some_and(|sent| same(sent.as_bytes(), token.as_bytes())) {
            return None;
        }
        let reason = format!(
            "{} answer other peers than loopback only with Authorization: Bearer TOKEN \
             (the server's --purge-token)\n",
            self.routes
        );
        Some(
            (
                StatusCode::UNAUTHORIZED,
                [(WWW_AUTHENTICATE, "Bearer")],
                reason,
            )
                .into_response(),
        )
    }
}

/// The middleware (`axum::middleware::from_fn_with_state(guard, loopback_or_token)`, as a
/// `route_layer` of the guarded routes).
pub async fn loopback_or_token(
    State(guard): State<LoopbackOrToken>,
    request: Request,
    next: Next,
) -> Response {
    match guard.refusal(&request) {
        None => next.run(request).await,
        Some(refusal) => refusal,
    }
}

/// Compares the whole of both tokens, whatever byte differs first, so that the time taken
/// does not tell how much of a guess was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}
