//! The calling thread's running totals of bytes allocated and freed (`thread.allocatedp`,
//! `thread.deallocatedp`).
//!
//! jemalloc keeps both totals in its per-thread state and updates them on every allocation
//! and free, its fast paths included; the mallctls give a pointer to each, read once per
//! thread and kept here, so that a reading is two plain loads. The totals count the size
//! class jemalloc serves (64 bytes asked for a `Vec<u8>` of 60), and only what jemalloc
//! serves: when jemalloc is linked but is not the global allocator, they stay at zero.

/// Bytes the calling thread allocated and freed since it started, as jemalloc counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ThreadTotals {
    pub(crate) allocated: u64,
    pub(crate) freed: u64,
}

impl ThreadTotals {
    /// The calling thread's totals now; zeros where jemalloc cannot say (not compiled in, or
    /// the mallctls failed, which is logged once).
    #[inline(always)]
    pub(crate) fn now() -> Self {
        imp::now()
    }

    /// The calling thread's totals if it knows its pointers already (its first reading:
    /// call [`now`](Self::now) then). Never calls anything, so that a caller reading around
    /// a poll saves no register for a call it does not make.
    #[inline(always)]
    pub(crate) fn known() -> Known {
        imp::known()
    }
}

/// A reading by [`ThreadTotals::known`]. `known` is a byte rather than a `bool` or an
/// `Option`: a type without a niche comes out of `LocalKey::with` without a test of its own,
/// so the caller's test is the thread-local state's (measured: 2 instructions a reading).
#[derive(Clone, Copy)]
pub(crate) struct Known {
    /// 1 when the thread knows its pointers, 0 when not.
    pub(crate) known: u8,
    pub(crate) totals: ThreadTotals,
}

#[cfg(jemalloc)]
mod imp {
    use super::ThreadTotals;
    use std::cell::Cell;
    use tikv_jemalloc_ctl::thread::{allocatedp, deallocatedp, ThreadLocal};

    thread_local! {
        // `const` and without `Drop`: an access is one load relative to the thread pointer,
        // with no lazy registration. Both pointers are set together, by the first reading.
        static POINTERS: Cell<Option<(ThreadLocal<u64>, ThreadLocal<u64>)>> = const { Cell::new(None) };
        /// The mallctls failed on this thread: zeros, without asking again.
        static FAILED: Cell<bool> = const { Cell::new(false) };
    }

    // `now` and `known` match the same state each their own way on purpose: `now` written as
    // `known` plus a test of its byte cost 4 instructions more a body poll (the second
    // reading) and 19 a request, counted by the passthrough bench.
    #[inline(always)]
    pub(super) fn now() -> ThreadTotals {
        POINTERS.with(|pointers| match pointers.get() {
            Some((allocated, freed)) => ThreadTotals {
                allocated: allocated.get(),
                freed: freed.get(),
            },
            None => not_read(),
        })
    }

    #[inline(always)]
    pub(super) fn known() -> super::Known {
        POINTERS.with(|pointers| match pointers.get() {
            Some((allocated, freed)) => super::Known {
                known: 1,
                totals: ThreadTotals {
                    allocated: allocated.get(),
                    freed: freed.get(),
                },
            },
            None => super::Known {
                known: 0,
                totals: ThreadTotals::default(),
            },
        })
    }

    /// A reading on a thread whose pointers are not read: zeros where the mallctls failed,
    /// the first reading otherwise.
    #[cold]
    #[inline(never)]
    fn not_read() -> ThreadTotals {
        if FAILED.with(Cell::get) {
            return ThreadTotals::default();
        }
        first_reading()
    }

    /// The first reading on a thread: asks jemalloc for the pointers, then reads through them.
    fn first_reading() -> ThreadTotals {
        let (allocated, freed) = match (allocatedp::read(), deallocatedp::read()) {
            (Ok(allocated), Ok(freed)) => (allocated, freed),
            (Err(e), _) | (_, Err(e)) => {
                static LOGGED: std::sync::Once = std::sync::Once::new();
                LOGGED.call_once(|| {
                    tracing::warn!(
                        "tower-jemalloc: thread.allocatedp cannot be read ({e}); \
                         bytes allocated per request are counted as zero"
                    );
                });
                FAILED.with(|failed| failed.set(true));
                return ThreadTotals::default();
            }
        };
        POINTERS.with(|cell| cell.set(Some((allocated, freed))));
        ThreadTotals {
            allocated: allocated.get(),
            freed: freed.get(),
        }
    }
}

#[cfg(not(jemalloc))]
mod imp {
    use super::ThreadTotals;

    #[inline(always)]
    pub(super) fn now() -> ThreadTotals {
        ThreadTotals::default()
    }

    #[inline(always)]
    pub(super) fn known() -> super::Known {
        super::Known {
            known: 1,
            totals: ThreadTotals::default(),
        }
    }
}
