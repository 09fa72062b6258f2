//! [`Slot`]: work that runs one at a time in the whole process (a purge, a change of settings),
//! whatever the number of layers.

use std::sync::atomic::{AtomicBool, Ordering};

/// A process-wide flag held while one piece of work runs; released when dropped, also when the
/// work panics or is dropped unrun.
#[derive(Debug)]
pub(crate) struct Slot(&'static AtomicBool);

impl Slot {
    /// Takes `flag`, or `None` when it is already taken.
    pub(crate) fn take(flag: &'static AtomicBool) -> Option<Self> {
        flag.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| Self(flag))
    }
}

impl Drop for Slot {
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
        let first = Slot::take(&FLAG).expect("free at first");
        assert!(Slot::take(&FLAG).is_none());
        drop(first);
        assert!(Slot::take(&FLAG).is_some());
    }
}
