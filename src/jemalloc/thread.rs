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
}

#[cfg(jemalloc)]
mod imp {
    use super::ThreadTotals;
    use std::cell::Cell;
    use tikv_jemalloc_ctl::thread::{allocatedp, deallocatedp, ThreadLocal};

    /// This thread's pointers into jemalloc's per-thread state.
    #[derive(Clone, Copy)]
    enum Pointers {
        /// Not asked for yet on this thread.
        Unread,
        Read {
            allocated: ThreadLocal<u64>,
            freed: ThreadLocal<u64>,
        },
        /// The mallctls failed on this thread: zeros, without asking again.
        Failed,
    }

    thread_local! {
        // `const` and without `Drop`: an access is one load relative to the thread pointer,
        // with no lazy registration.
        static POINTERS: Cell<Pointers> = const { Cell::new(Pointers::Unread) };
    }

    #[inline(always)]
    pub(super) fn now() -> ThreadTotals {
        match POINTERS.with(Cell::get) {
            Pointers::Read { allocated, freed } => ThreadTotals {
                allocated: allocated.get(),
                freed: freed.get(),
            },
            Pointers::Unread => first_reading(),
            Pointers::Failed => ThreadTotals::default(),
        }
    }

    /// The first reading on a thread: asks jemalloc for the pointers, then reads through them.
    #[cold]
    #[inline(never)]
    fn first_reading() -> ThreadTotals {
        let pointers = match (allocatedp::read(), deallocatedp::read()) {
            (Ok(allocated), Ok(freed)) => Pointers::Read { allocated, freed },
            (Err(e), _) | (_, Err(e)) => {
                static LOGGED: std::sync::Once = std::sync::Once::new();
                LOGGED.call_once(|| {
                    tracing::warn!(
                        "tower-jemalloc: thread.allocatedp cannot be read ({e}); \
                         bytes allocated per request are counted as zero"
                    );
                });
                Pointers::Failed
            }
        };
        POINTERS.with(|cell| cell.set(pointers));
        match pointers {
            Pointers::Read { allocated, freed } => ThreadTotals {
                allocated: allocated.get(),
                freed: freed.get(),
            },
            _ => ThreadTotals::default(),
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
}
