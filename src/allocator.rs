//! The jemalloc global allocator, this crate's own type in every build, so that the allocator
//! and the statistics this crate reads come from the same jemalloc build:
//!
//! ```
//! #[global_allocator]
//! static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;
//! ```
//!
//! Only with the `jemalloc` feature (on by default) on targets other than MSVC.
//!
//! It is tikv-jemallocator's allocator but for one kind of free, and only where jemalloc is
//! built with its heap profiler (the `profiling` feature). Such a jemalloc places each sampled
//! object at the start of a page, and its sized free (`sdallocx`, which tikv-jemallocator calls
//! for every `dealloc`) tells a sampled object by that alignment alone: every page-aligned
//! pointer leaves the fast path for a slower one that looks the object up, whether profiling
//! is started, active or neither. Small objects are page-aligned often (every object of the
//! 4 KiB class, every other one of the 2 KiB class, …), and a thread's cache hands the same
//! address back again and again, so a request path can pay that on every request: 7 more frees
//! a request on the slow path, +4.5 % of the instructions of the example server's trivial
//! request (BENCHMARKS.md, "Heap profiling").
//!
//! With the profiler built in, this allocator frees those objects — small (≤ 4 KiB) and
//! page-aligned — with jemalloc's unsized free, whose fast path looks the object up in its
//! radix-tree cache and takes sampled objects out of the fast path by that lookup, not by
//! alignment; every other free is tikv-jemallocator's. Both are jemalloc's own frees, valid for
//! any object it allocated. Without the profiler the test is compiled out and every method is
//! tikv-jemallocator's.
//!
//! The type is the same whether the `profiling` feature is on or not, so that enabling it
//! anywhere in a dependency graph changes no type (features are additive).

use std::alloc::{GlobalAlloc, Layout};

/// The largest size jemalloc's sized free keeps on its fast path (`SC_LOOKUP_MAXCLASS`):
/// larger objects take the slower path anyway, with or without the profiler.
const LOOKUP_MAX: usize = 4096;

/// The alignment of a sampled object: a page (jemalloc's `PAGE`, 4 KiB on the targets where
/// this feature builds by default; a larger page only makes the test catch fewer objects).
const PAGE: usize = 4096;

/// jemalloc as the global allocator: the same as `tikv_jemallocator::Jemalloc`, with the
/// frees of small page-aligned objects kept off the slow path of a jemalloc built with its
/// profiler (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct Jemalloc;

// SAFETY: every method hands its arguments to tikv-jemallocator's implementation, which
// upholds `GlobalAlloc`'s contract, except `dealloc` for small page-aligned objects, which
// calls jemalloc's `free` on a pointer jemalloc allocated and that is freed once, as the
// contract of `dealloc` guarantees; `free` needs neither the size nor the alignment.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Jemalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees, passed on.
        unsafe { tikv_jemallocator::Jemalloc.alloc(layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        unsafe { tikv_jemallocator::Jemalloc.alloc_zeroed(layout) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if cfg!(profiling) && (ptr as usize) & (PAGE - 1) == 0 && layout.size() <= LOOKUP_MAX {
            // SAFETY: the caller's guarantees: `ptr` was allocated by jemalloc (through this
            // allocator) and is freed once, by this call.
            unsafe { free_unsized(ptr) }
        } else {
            // SAFETY: the caller's guarantees, passed on.
            unsafe { tikv_jemallocator::Jemalloc.dealloc(ptr, layout) }
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        unsafe { tikv_jemallocator::Jemalloc.realloc(ptr, layout, new_size) }
    }
}

/// jemalloc's unsized free. Out of line and cold: a few frees in a hundred come here, and
/// every `dealloc` in the program is inlined with the test in front of it.
///
/// # Safety
///
/// `ptr` was allocated by jemalloc and is not used after this call.
#[cold]
#[inline(never)]
#[allow(unsafe_code)]
unsafe fn free_unsized(ptr: *mut u8) {
    // SAFETY: the caller's guarantee; jemalloc's `free` takes any pointer it allocated.
    unsafe { tikv_jemalloc_sys::free(ptr.cast()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes this thread has freed, as jemalloc counts them.
    fn freed() -> u64 {
        tikv_jemalloc_ctl::thread::deallocatedp::mib()
            .and_then(|mib| mib.read())
            .expect("thread.deallocatedp")
            .get()
    }

    /// Allocates with `layout` through [`Jemalloc`], writes to it, frees it: jemalloc counts
    /// exactly its usable size freed on this thread. Returns whether it was page-aligned.
    fn round_trip(layout: Layout) -> bool {
        // SAFETY: a non-zero size; the pointer is checked, written within its size, and
        // freed once with the layout it was allocated with.
        #[allow(unsafe_code)]
        unsafe {
            let ptr = Jemalloc.alloc(layout);
            assert!(!ptr.is_null());
            ptr.write_bytes(0xa5, layout.size());
            let usable = tikv_jemalloc_sys::malloc_usable_size(ptr.cast()) as u64;
            let before = freed();
            Jemalloc.dealloc(ptr, layout);
            assert_eq!(freed() - before, usable, "{layout:?}");
            (ptr as usize) & (PAGE - 1) == 0
        }
    }

    #[test]
    fn frees_every_kind_of_object_exactly() {
        // The 4 KiB class: every object page-aligned, freed by the unsized free.
        assert!(round_trip(Layout::from_size_align(4096, 8).unwrap()));
        // Over-aligned to a page, and smaller than a page.
        assert!(round_trip(Layout::from_size_align(64, 4096).unwrap()));
        // Larger than a page, or small and (almost always) not page-aligned: tikv-jemallocator's
        // sized free.
        round_trip(Layout::from_size_align(64 * 1024, 8).unwrap());
        round_trip(Layout::from_size_align(24, 8).unwrap());
    }
}
