//! `POST /demo/work?mib=N&ms=T`: a request that needs memory for a while, as a real handler
//! would. It allocates N MiB, writes every byte (so every page is faulted in and counts in
//! RSS), holds the memory T milliseconds, frees it and answers `{"mib":N,"ms":T}`.
//!
//! Many may run at once, within bounds that keep one client from taking the machine:
//!
//! - `mib` from 1 to [`MAX_MIB`] (1024), required; `ms` from 0 to [`MAX_MS`] (60000), 0 when
//!   left out; any other parameter, a repeated one or a value out of range: 400 with the reason.
//! - At most [`MAX_RUNNING`] (64) at once, and at most [`MAX_HELD_MIB`] (4096) MiB held by all
//!   of them together: beyond either, 429 with `Retry-After: 1` and the reason, at once (the
//!   request does not wait for a slot).
//!
//! Allocating and writing happen on tokio's blocking pool, and the hold is a `tokio::time`
//! sleep, so no async worker is blocked: a server with two workers keeps answering `/metrics`
//! while 64 of these hold memory. The memory is freed on the blocking pool too (with
//! `dirty_decay_ms=0` a free gives pages back to the OS, one system call per block). A client
//! that goes away while its request holds memory frees it then, on the worker that drops the
//! request.
//!
//! The example server mounts it behind the same loopback-or-token guard as the other `/demo/*`
//! routes (`loopback.rs`).

use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::StatusCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// The most one request allocates, in MiB.
pub const MAX_MIB: u32 = 1024;
/// The longest one request holds its memory, in milliseconds.
pub const MAX_MS: u64 = 60_000;
/// How many requests may run at once.
pub const MAX_RUNNING: u32 = 64;
/// How many MiB all running requests may hold together.
pub const MAX_HELD_MIB: u32 = 4096;

const MIB: usize = 1024 * 1024;

/// The bounds shared by every `/demo/work` request of one server.
#[derive(Clone)]
pub struct Work {
    running: Arc<Semaphore>,
    held: Arc<Semaphore>,
    max_running: u32,
    max_held_mib: u32,
}

impl Default for Work {
    fn default() -> Self {
        Self::with_limits(MAX_RUNNING, MAX_HELD_MIB)
    }
}

impl Work {
    /// At most `max_running` requests at once, holding at most `max_held_mib` MiB together
    /// (the server uses [`MAX_RUNNING`] and [`MAX_HELD_MIB`]; tests use smaller bounds).
    pub fn with_limits(max_running: u32, max_held_mib: u32) -> Self {
        Self {
            running: Arc::new(Semaphore::new(max_running as usize)),
            held: Arc::new(Semaphore::new(max_held_mib as usize)),
            max_running,
            max_held_mib,
        }
    }

    /// How many requests run now.
    pub fn running(&self) -> u32 {
        self.max_running - self.running.available_permits() as u32
    }

    /// How many MiB running requests hold (or are allocating) now.
    pub fn held_mib(&self) -> u32 {
        self.max_held_mib - self.held.available_permits() as u32
    }
}

/// The route, `POST /demo/work`, with its bounds as state.
pub fn router(work: Work) -> Router {
    Router::new()
        .route("/demo/work", post(work_handler))
        .with_state(work)
}

/// What a request asks for.
#[derive(Debug, PartialEq)]
pub struct Order {
    pub mib: u32,
    pub ms: u64,
}

/// Parses `mib=N&ms=T` (in any order; `ms` optional), or says what is wrong in one line.
pub fn parse_order(query: Option<&str>) -> Result<Order, String> {
    let (mut mib, mut ms) = (None, None);
    for pair in query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match name {
            "mib" => &mut mib,
            "ms" => &mut ms,
            _ => {
                return Err(format!(
                    "unknown query parameter {name:?}: /demo/work takes mib and ms"
                ))
            }
        };
        if slot.replace(value).is_some() {
            return Err(format!("query parameter {name} given twice"));
        }
    }
    let mib = mib.ok_or(format!(
        "missing query parameter mib (1 to {MAX_MIB}): how many MiB to allocate"
    ))?;
    let mib = match mib.parse::<u32>() {
        Ok(n) if (1..=MAX_MIB).contains(&n) => n,
        _ => {
            return Err(format!(
                "mib must be an integer from 1 to {MAX_MIB}, got {mib:?}"
            ))
        }
    };
    let ms = match ms.map(str::parse::<u64>) {
        None => 0,
        Some(Ok(n)) if n <= MAX_MS => n,
        Some(_) => {
            return Err(format!(
                "ms must be an integer from 0 to {MAX_MS}, got {:?}",
                ms.unwrap_or_default()
            ))
        }
    };
    Ok(Order { mib, ms })
}

fn answer(status: StatusCode, reason: String) -> Response {
    (status, reason + "\n").into_response()
}

fn too_many(reason: String) -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(RETRY_AFTER, "1")],
        reason + "\n",
    )
        .into_response()
}

/// `POST /demo/work?mib=N&ms=T` (module docs).
pub async fn work_handler(State(work): State<Work>, RawQuery(query): RawQuery) -> Response {
    let Order { mib, ms } = match parse_order(query.as_deref()) {
        Ok(order) => order,
        Err(reason) => return answer(StatusCode::BAD_REQUEST, reason),
    };
    let Ok(_running) = work.running.clone().try_acquire_owned() else {
        return too_many(format!(
            "{} /demo/work requests are running: at most {} at once",
            work.max_running, work.max_running
        ));
    };
    let Ok(_held) = work.held.clone().try_acquire_many_owned(mib) else {
        return too_many(format!(
            "running /demo/work requests hold {} MiB: at most {} MiB in all, {mib} more asked",
            work.held_mib(),
            work.max_held_mib
        ));
    };
    let blocks = match tokio::task::spawn_blocking(move || allocate(mib)).await {
        Ok(blocks) => blocks,
        Err(e) => {
            return answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("allocating {mib} MiB failed: {e}"),
            )
        }
    };
    tokio::time::sleep(Duration::from_millis(ms)).await;
    // Freed before the permits (dropped at the end of the function) are given back.
    let _ = tokio::task::spawn_blocking(move || drop(std::hint::black_box(blocks))).await;
    (
        [(CONTENT_TYPE, "application/json")],
        format!("{{\"mib\":{mib},\"ms\":{ms}}}\n"),
    )
        .into_response()
}

/// `mib` blocks of 1 MiB, every byte written.
fn allocate(mib: u32) -> Vec<Box<[u8]>> {
    (0..mib)
        .map(|i| std::hint::black_box(vec![i as u8 | 1; MIB].into_boxed_slice()))
        .collect()
}
