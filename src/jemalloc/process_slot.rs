//! [`ProcessSlot`]: work that runs one at a time in the whole process (a purge, a change of
//! settings), whatever the number of layers.

use std::sync::atomic::{AtomicBool, Ordering};

/// A process-wide flag held while one piece of work runs; released when dropped, also when the
/// work panics or is dropped unrun.
#[derive(Debug)]
pub(crate) struct ProcessSlot(&'static AtomicBool);

impl ProcessSlot {
    /// Takes `flag`, or `None` when it is already taken.
    pub(crate) fn take(flag: &'static AtomicBool) -> Option<Self> {
        flag.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| Self(flag))
    }
}

impl Drop for ProcessSlot {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_until_dropped() {
        static FLAG: AtomicBool = AtomicBool::new(false);
        let first = ProcessSlot::take(&FLAG).expect("free at first");
        assert!(ProcessSlot::take(&FLAG).is_none());
        drop(first);
        assert!(ProcessSlot::take(&FLAG).is_some());
    }
}
