//! Running blocking work (renders, stats dumps) off the async workers.

/// Runs `job` on tokio's blocking pool when called from inside a tokio runtime, and inline
/// otherwise (a caller without a runtime has no workers to protect).
pub(crate) fn run(job: impl FnOnce() + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(job)),
        Err(_) => job(),
    }
}
