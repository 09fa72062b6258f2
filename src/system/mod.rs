//! What the operating system says of the process: its memory (RSS, virtual size, pages
//! released lazily) and the memory of the cgroup it runs in. Knows nothing of jemalloc or HTTP.

mod process;

pub use process::ProcessMemory;
pub(crate) use process::{CgroupMemory, ProcessUsage};
