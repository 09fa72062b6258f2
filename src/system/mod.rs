//! What the operating system says of the process: its memory (RSS, virtual size, pages
//! released lazily), the memory of the cgroup it runs in, and the limit it must stay under.
//! Knows nothing of jemalloc or HTTP.
//!
//! - [`process`]: the process's own memory.
//! - [`cgroup`]: its memory cgroup (v2, or v1's `memory` controller): where, usage, limit.
//! - [`limit`]: the limit the process must stay under and its usage by the same measure.

mod cgroup;
// The memory governor (`src/governor/`) is what uses this module.
#[allow(dead_code)]
pub(crate) mod limit;
mod process;

pub(crate) use cgroup::CgroupMemory;
pub use process::ProcessMemory;
pub(crate) use process::ProcessUsage;
