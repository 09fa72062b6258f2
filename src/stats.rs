//! Reading jemalloc's statistics: [`JemallocStats`] and [`JemallocError`].
//!
//! Every figure comes from one snapshot: jemalloc caches its statistics and only refreshes them
//! when the `epoch` is advanced, so a reader advances it once and then reads every key. MIBs
//! (the pre-resolved numeric form of a mallctl name) are resolved once per process and reused.

use std::fmt;

/// One consistent snapshot of jemalloc's global statistics, in bytes.
///
/// All fields are read after a single `epoch` advance, so they describe the same moment.
/// See the crate's README for what each figure means and how they relate
/// (`allocated ≤ active ≤ resident ≤ mapped`, roughly).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JemallocStats {
    /// `stats.allocated`: bytes allocated by the application.
    pub allocated: u64,
    /// `stats.active`: bytes in active pages (a multiple of the page size).
    pub active: u64,
    /// `stats.metadata`: bytes dedicated to jemalloc's own metadata.
    pub metadata: u64,
    /// `stats.mapped`: bytes in chunks mapped for the application.
    pub mapped: u64,
    /// `stats.retained`: bytes in virtual memory mappings retained, not returned to the OS.
    pub retained: u64,
    /// `stats.resident`: maximum bytes in physically resident data pages.
    pub resident: u64,
    /// `stats.arenas.<all>.pdirty` × `arenas.page`: unused dirty pages a purge would release.
    pub dirty: u64,
    /// `stats.arenas.<all>.pmuzzy` × `arenas.page`: unused pages already advised to the OS
    /// (`MADV_FREE`) that the kernel has not reclaimed yet.
    pub muzzy: u64,
}

impl JemallocStats {
    /// The field names, in the order used by [`JemallocStats::values`] and the JSON reports.
    pub const FIELDS: [&'static str; 8] = [
        "allocated",
        "active",
        "metadata",
        "mapped",
        "retained",
        "resident",
        "dirty",
        "muzzy",
    ];

    /// Advances jemalloc's epoch once and reads a fresh snapshot.
    ///
    /// # Errors
    ///
    /// [`JemallocError::Unsupported`] when the crate was built without jemalloc,
    /// [`JemallocError::NotGlobalAllocator`] when jemalloc is not the process's
    /// `#[global_allocator]` (the figures would be near zero and misleading), and
    /// [`JemallocError::Mallctl`] when a mallctl call fails.
    pub fn read() -> Result<Self, JemallocError> {
        crate::ctl::ctl()?.snapshot()
    }

    /// The values in the order of [`JemallocStats::FIELDS`].
    pub fn values(&self) -> [u64; 8] {
        [
            self.allocated,
            self.active,
            self.metadata,
            self.mapped,
            self.retained,
            self.resident,
            self.dirty,
            self.muzzy,
        ]
    }

    /// This snapshot as a flat JSON object of integers: `{"allocated":1,"active":2,…}`.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(192);
        self.write_json(&mut out);
        out
    }

    /// Appends this snapshot as a flat JSON object (`{"allocated":1,…}`) to `out`.
    pub(crate) fn write_json(&self, out: &mut String) {
        use fmt::Write;
        out.push('{');
        for (i, (name, value)) in Self::FIELDS.iter().zip(self.values()).enumerate() {
            if i > 0 {
                out.push(',');
            }
            // Writing to a String cannot fail.
            let _ = write!(out, "\"{name}\":{value}");
        }
        out.push('}');
    }
}

/// Why jemalloc's statistics or controls cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JemallocError {
    /// The crate was compiled without jemalloc: the `jemalloc` feature is off, or the target
    /// (MSVC) cannot build it.
    Unsupported,
    /// jemalloc is linked, but it is not the process's `#[global_allocator]`: its statistics
    /// would only describe the few allocations made through it, not the process.
    NotGlobalAllocator,
    /// A mallctl call failed.
    Mallctl {
        /// The mallctl key, e.g. `arena.4096.purge`.
        key: &'static str,
        /// jemalloc's description of the error.
        reason: String,
    },
}

impl fmt::Display for JemallocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unsupported => f.write_str(
                "jemalloc is not available in this build (feature `jemalloc` off or unsupported target)",
            ),
            Self::NotGlobalAllocator => f.write_str(
                "jemalloc is not the global allocator of this process (set #[global_allocator] to tikv_jemallocator::Jemalloc)",
            ),
            Self::Mallctl { key, reason } => write!(f, "mallctl `{key}` failed: {reason}"),
        }
    }
}

impl std::error::Error for JemallocError {}

impl JemallocError {
    /// The HTTP answer for this error: 501 when jemalloc is not compiled in, 503 when it is
    /// not the global allocator, 500 when a mallctl call failed; the reason as plain text.
    pub(crate) fn to_response(&self) -> http::Response<http_body_util::Full<bytes::Bytes>> {
        let status = match self {
            Self::Unsupported => http::StatusCode::NOT_IMPLEMENTED,
            Self::NotGlobalAllocator => http::StatusCode::SERVICE_UNAVAILABLE,
            Self::Mallctl { .. } => http::StatusCode::INTERNAL_SERVER_ERROR,
        };
        crate::response::text(status, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_every_field_in_order() {
        let stats = JemallocStats {
            allocated: 1,
            active: 2,
            metadata: 3,
            mapped: 4,
            retained: 5,
            resident: 6,
            dirty: 7,
            muzzy: 8,
        };
        assert_eq!(
            stats.to_json(),
            r#"{"allocated":1,"active":2,"metadata":3,"mapped":4,"retained":5,"resident":6,"dirty":7,"muzzy":8}"#
        );
    }

    #[test]
    fn errors_name_the_key() {
        let err = JemallocError::Mallctl {
            key: "arena.4096.purge",
            reason: "boom".into(),
        };
        assert_eq!(err.to_string(), "mallctl `arena.4096.purge` failed: boom");
    }
}
