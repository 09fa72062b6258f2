//! `GET /debug/jemalloc/stats`: jemalloc's own statistics dump (`malloc_stats_print`), with a
//! summary that says what the figures mean and what to do about them, in the spirit of Redis's
//! `MEMORY DOCTOR`.
//!
//! - JSON by default (`application/json`):
//!   `{"summary": {…}, "detail": "full"|"compact", "stats": <malloc_stats_print JSON>}`.
//! - Plain text with `?format=text`: `malloc_stats_print`'s text output as it is.
//! - The dump is capped (default 4 MiB). A JSON dump over the cap is retried without per-arena,
//!   bin, large-class and mutex details (`"detail": "compact"`); still over the cap, the answer
//!   is a 500 naming the cap. A text dump is cut at the cap with a last line saying so.
//!
//! The dump walks every arena under jemalloc's locks, so it runs off the async workers.

use crate::access::{admit, Access};
use crate::ctl::{Ctl, Settings};
use crate::future::ResponseFuture;
use crate::response;
use crate::stats::{JemallocError, JemallocStats};
use bytes::Bytes;
use http::request::Parts;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use std::fmt::Write;

/// The default cap on the size of a stats dump.
pub const DEFAULT_STATS_MAX_BYTES: usize = 4 * 1024 * 1024;

/// The stats endpoint of one layer.
#[derive(Debug)]
pub(crate) struct StatsEndpoint {
    pub(crate) path: Box<str>,
    pub(crate) access: Access,
    pub(crate) max_bytes: usize,
}

#[derive(Clone, Copy)]
enum Format {
    Json,
    Text,
}

impl StatsEndpoint {
    /// Answers a request on the stats path. Order of checks: method (405), access (401/403),
    /// format (400), jemalloc availability (501/503); then the dump runs off the workers.
    pub(crate) fn respond<F>(&self, parts: &Parts) -> ResponseFuture<F> {
        let methods = [Method::GET, Method::HEAD];
        if let Some(refusal) = admit(parts, methods, "GET, HEAD", &self.path, &self.access) {
            return ResponseFuture::local(refusal);
        }
        let head = parts.method == Method::HEAD;
        let format = match crate::query::param(parts.uri.query(), "format") {
            None | Some("json") => Format::Json,
            Some("text") => Format::Text,
            Some(other) => {
                return ResponseFuture::local(response::text(
                    StatusCode::BAD_REQUEST,
                    format_args!(
                        "unknown format {other:?}: use format=json (the default) or format=text"
                    ),
                ))
            }
        };
        let ctl = match crate::ctl::ctl() {
            Ok(ctl) => ctl,
            Err(e) => return ResponseFuture::local(e.to_response()),
        };
        let max_bytes = self.max_bytes;
        let (sender, mut receiver) = tokio::sync::oneshot::channel();
        crate::blocking::run(move || {
            let mut answer = match format {
                Format::Json => json_dump(ctl, max_bytes),
                Format::Text => text_dump(ctl, max_bytes),
            }
            .unwrap_or_else(|e| e.to_response());
            if head {
                *answer.body_mut() = Full::default();
            }
            let _ = sender.send(answer);
        });
        match receiver.try_recv() {
            // Ran inline (no tokio runtime).
            Ok(answer) => ResponseFuture::local(answer),
            Err(_) => ResponseFuture::pending(async move {
                receiver.await.unwrap_or_else(|_| {
                    response::text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the stats dump ended without a result",
                    )
                })
            }),
        }
    }
}

fn json_dump(ctl: &Ctl, max_bytes: usize) -> Result<Response<Full<Bytes>>, JemallocError> {
    let settings = ctl.settings()?;
    let stats = ctl.snapshot()?;
    let mut detail = "full";
    let mut dump = ctl.stats_print(true, false, max_bytes)?;
    if dump.truncated {
        detail = "compact";
        dump = ctl.stats_print(true, true, max_bytes)?;
    }
    if dump.truncated {
        return Ok(response::text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format_args!(
                "the jemalloc stats dump exceeds the cap of {max_bytes} bytes even without \
                 per-arena details; raise it with stats_max_bytes"
            ),
        ));
    }
    let dump = String::from_utf8_lossy(&dump.text);
    let mut out = String::with_capacity(dump.len() + 2048);
    out.push_str("{\"summary\":");
    write_summary(&mut out, &settings, &stats);
    let _ = write!(out, ",\"detail\":\"{detail}\",\"stats\":");
    out.push_str(dump.trim_end());
    out.push('}');
    Ok(response::json(out))
}

fn text_dump(ctl: &Ctl, max_bytes: usize) -> Result<Response<Full<Bytes>>, JemallocError> {
    let dump = ctl.stats_print(false, false, max_bytes)?;
    let mut text = dump.text;
    if dump.truncated {
        text.extend_from_slice(
            format!(
                "\n[truncated at {max_bytes} bytes: raise stats_max_bytes, or use format=json]\n"
            )
            .as_bytes(),
        );
    }
    let mut answer = response::text(StatusCode::OK, "");
    *answer.body_mut() = Full::new(Bytes::from(text));
    Ok(answer)
}

const MIB: f64 = 1024.0 * 1024.0;

/// The `summary` object: configuration, current figures, ratios and plain-language hints.
fn write_summary(out: &mut String, settings: &Settings, stats: &JemallocStats) {
    let environment = std::env::var("_RJEM_MALLOC_CONF")
        .or_else(|_| std::env::var("MALLOC_CONF"))
        .ok();
    out.push_str("{\"version\":");
    push_json_string(out, settings.version);
    let _ = write!(
        out,
        ",\"background_thread\":{{\"enabled_at_start\":{},\"running\":{}}},\
         \"dirty_decay_ms\":{},\"muzzy_decay_ms\":{},\"arenas\":{},\"malloc_conf\":{{\"compiled\":",
        settings.opt_background_thread,
        settings.background_threads_running,
        settings.dirty_decay_ms,
        settings.muzzy_decay_ms,
        settings.narenas,
    );
    push_json_string(out, settings.malloc_conf_compiled);
    out.push_str(",\"environment\":");
    match &environment {
        Some(conf) => push_json_string(out, conf),
        None => out.push_str("null"),
    }
    out.push_str("},\"stats\":");
    stats.write_json(out);
    out.push_str(",\"ratios\":{\"active_to_allocated\":");
    push_ratio(out, stats.active, stats.allocated);
    out.push_str(",\"resident_to_active\":");
    push_ratio(out, stats.resident, stats.active);
    out.push_str("},\"hints\":[");
    for (i, hint) in hints(settings, stats).iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_string(out, hint);
    }
    out.push_str("]}");
}

fn push_ratio(out: &mut String, numerator: u64, denominator: u64) {
    if denominator == 0 {
        out.push_str("null");
    } else {
        let _ = write!(out, "{:.4}", numerator as f64 / denominator as f64);
    }
}

/// What the figures suggest, in plain language.
fn hints(settings: &Settings, stats: &JemallocStats) -> Vec<String> {
    let mut hints = Vec::new();
    let mib = |bytes: u64| bytes as f64 / MIB;
    if !settings.background_threads_running {
        hints.push(
            "Background threads are off: freed memory goes back to the OS only when allocation \
             activity drives decay, so an idle process keeps its dirty pages. Enable them with \
             background_thread:true in _RJEM_MALLOC_CONF / MALLOC_CONF."
                .to_owned(),
        );
    }
    if settings.dirty_decay_ms < 0 {
        hints.push(
            "dirty_decay_ms is -1: dirty pages are never returned on their own, only by a purge."
                .to_owned(),
        );
    }
    if stats.retained > 0 {
        hints.push(format!(
            "retained ({:.1} MiB) is virtual address space jemalloc keeps for reuse; it is not \
             in RSS and costs no physical memory.",
            mib(stats.retained)
        ));
    }
    if stats.resident > 0 && stats.dirty > stats.resident / 4 && stats.dirty > 64 << 20 {
        hints.push(format!(
            "{:.1} MiB of dirty pages ({:.0}% of resident) are freed memory jemalloc still \
             holds: a purge returns them now; a lower dirty_decay_ms returns them sooner.",
            mib(stats.dirty),
            100.0 * stats.dirty as f64 / stats.resident as f64
        ));
    }
    if stats.muzzy > 0 {
        hints.push(format!(
            "{:.1} MiB of muzzy pages were released lazily (MADV_FREE): they may still count \
             in RSS until the kernel needs the memory.",
            mib(stats.muzzy)
        ));
    }
    if stats.allocated > 64 << 20 && stats.active as f64 > 1.5 * stats.allocated as f64 {
        hints.push(format!(
            "active is {:.2}x allocated: memory is fragmented inside pages (many partly used \
             slabs). A purge does not help; look at allocation patterns or size classes.",
            stats.active as f64 / stats.allocated as f64
        ));
    }
    hints
}

/// Appends `s` as a JSON string literal.
fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(background: bool, dirty_decay_ms: i64) -> Settings {
        Settings {
            version: "5.3.0",
            opt_background_thread: background,
            background_threads_running: background,
            dirty_decay_ms,
            muzzy_decay_ms: 0,
            narenas: 4,
            malloc_conf_compiled: "",
        }
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut out = String::new();
        push_json_string(&mut out, "a\"b\\c\nd\u{1}é");
        assert_eq!(out, r#""a\"b\\c\nd\u0001é""#);
    }

    #[test]
    fn hints_follow_the_figures() {
        const MIB: u64 = 1 << 20;
        let calm = JemallocStats {
            allocated: 100 * MIB,
            active: 110 * MIB,
            resident: 130 * MIB,
            ..JemallocStats::default()
        };
        assert!(hints(&settings(true, 10_000), &calm).is_empty());

        let hints = hints(
            &settings(false, -1),
            &JemallocStats {
                allocated: 100 * MIB,
                active: 200 * MIB,
                resident: 800 * MIB,
                retained: 50 * MIB,
                dirty: 500 * MIB,
                muzzy: 10 * MIB,
                ..JemallocStats::default()
            },
        );
        let all = hints.join("\n");
        assert_eq!(hints.len(), 6, "{all}");
        for expected in [
            "Background threads are off",
            "dirty_decay_ms is -1",
            "retained (50.0 MiB) is virtual address space",
            "500.0 MiB of dirty pages (62% of resident)",
            "10.0 MiB of muzzy pages",
            "active is 2.00x allocated",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
    }

    #[test]
    fn summary_is_valid_json_with_null_ratios_when_empty() {
        let mut out = String::new();
        write_summary(&mut out, &settings(true, 10_000), &JemallocStats::default());
        assert!(
            out.contains(r#""ratios":{"active_to_allocated":null,"resident_to_active":null}"#),
            "{out}"
        );
        assert!(out.starts_with(r#"{"version":"5.3.0","background_thread":{"enabled_at_start":true,"running":true},"dirty_decay_ms":10000,"muzzy_decay_ms":0,"arenas":4,"malloc_conf":{"compiled":"","#), "{out}");
    }
}
