//! [`JemallocError`]: why jemalloc's statistics or controls cannot be used.

/// Why jemalloc's statistics or controls cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JemallocError {
    /// The crate was compiled without jemalloc: the `jemalloc` feature is off, or the target
    /// (MSVC) cannot build it.
    #[error(
        "jemalloc is not available in this build (feature `jemalloc` off or unsupported target)"
    )]
    Unsupported,
    /// jemalloc is linked, but it is not the process's `#[global_allocator]`: its statistics
    /// would only describe the few allocations made through it, not the process.
    #[error(
        "jemalloc is not the global allocator of this process (set #[global_allocator] to tikv_jemallocator::Jemalloc)"
    )]
    NotGlobalAllocator,
    /// A mallctl call failed.
    #[error("mallctl `{key}` failed: {reason}")]
    Mallctl {
        /// The mallctl key, e.g. `arena.4096.purge`.
        key: &'static str,
        /// jemalloc's description of the error.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_key() {
        let err = JemallocError::Mallctl {
            key: "arena.4096.purge",
            reason: "boom".into(),
        };
        assert_eq!(err.to_string(), "mallctl `arena.4096.purge` failed: boom");
    }
}
