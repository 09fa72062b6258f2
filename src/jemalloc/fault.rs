//! A seam for tests to make mallctl calls fail, so that the error paths (a 500 naming the key)
//! can be exercised against a real jemalloc. It is not part of the public API.
//!
//! The check on the hot path is one relaxed atomic load per mallctl batch.

use crate::jemalloc::JemallocError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static ARMED: AtomicBool = AtomicBool::new(false);
static FAILING_KEY: Mutex<Option<&'static str>> = Mutex::new(None);

/// Fails with a [`JemallocError::Mallctl`] for `key` while a test has armed that key.
pub(crate) fn check(key: &'static str) -> Result<(), JemallocError> {
    if !ARMED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let armed = FAILING_KEY.lock().unwrap_or_else(|e| e.into_inner());
    if *armed == Some(key) {
        return Err(JemallocError::Mallctl {
            key,
            reason: "injected fault".to_owned(),
        });
    }
    Ok(())
}

/// Makes every mallctl call on `key` (`"epoch"` or `"arena.4096.purge"`) fail until
/// [`clear`] is called. For this crate's tests only.
#[doc(hidden)]
pub fn fail_key(key: &'static str) {
    *FAILING_KEY.lock().unwrap_or_else(|e| e.into_inner()) = Some(key);
    ARMED.store(true, Ordering::Relaxed);
}

/// Stops injecting faults. For this crate's tests only.
#[doc(hidden)]
pub fn clear() {
    ARMED.store(false, Ordering::Relaxed);
    *FAILING_KEY.lock().unwrap_or_else(|e| e.into_inner()) = None;
}
