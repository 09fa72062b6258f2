//! What having the heap profiler compiled in costs allocation-heavy work while it is inactive,
//! counted in instructions (which repeat exactly for a given binary): the same loop, built
//! without and with `--features profiling`, run under callgrind.
//!
//! ```text
//! cargo bench --bench allocations --no-run                          # prints the binary
//! valgrind --tool=callgrind --toggle-collect='*records_in_a_row*' <binary>
//! cargo bench --bench allocations --no-run --features profiling     # another binary
//! _RJEM_MALLOC_CONF=prof:true,prof_active:false \
//!     valgrind --tool=callgrind --toggle-collect='*records_in_a_row*' <binary>
//! ```
//!
//! Without valgrind it prints the wall-clock time per call, to compare roughly.
//!
//! The cost of sampling, per sample: the same with `prof:true,prof_active:true` (jemalloc walks
//! each sampled stack with libgcc's unwinder).

use std::hint::black_box;
use std::time::Instant;

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

#[path = "loopback/records.rs"]
mod records;

/// Calls of `records` in a counting run.
const CALLS: usize = 1_000;

#[inline(never)]
fn records_in_a_row(calls: usize) {
    for _ in 0..calls {
        black_box(records::records());
    }
}

fn main() {
    use tikv_jemalloc_ctl::{Access, AsName};
    let prof: Result<bool, _> = b"opt.prof\0".name().read();
    let active: Result<bool, _> = b"prof.active\0".name().read();
    println!(
        "profiling compiled in: {}; opt.prof: {prof:?}; prof.active: {active:?}",
        cfg!(feature = "profiling")
    );
    records_in_a_row(10); // warm up
    let start = Instant::now();
    records_in_a_row(CALLS);
    println!(
        "{CALLS} calls of records(): {:.1} µs per call",
        start.elapsed().as_secs_f64() * 1e6 / CALLS as f64
    );
}
