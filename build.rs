//! Sets `cfg(jemalloc)` when jemalloc is compiled in: the `jemalloc` feature is on and the
//! target is not MSVC (where jemalloc does not build); and `cfg(profiling)` when its heap
//! profiler is compiled in too (the `profiling` feature).
//!
//! Sets `cfg(fault_injection)`, the seam this crate's own tests use to make mallctl calls
//! fail, only when `TOWER_JEMALLOC_FAULT_INJECTION=1` is in the build's environment. The
//! repository's `.cargo/config.toml` sets it for every cargo command run inside the
//! repository; cargo reads that file from the directory it is invoked in, never from a
//! dependency's, so no crate that depends on this one can switch the seam on (see
//! `Cargo.toml`).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(jemalloc)");
    println!("cargo::rustc-check-cfg=cfg(profiling)");
    println!("cargo::rustc-check-cfg=cfg(fault_injection)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=TOWER_JEMALLOC_FAULT_INJECTION");
    let feature = std::env::var_os("CARGO_FEATURE_JEMALLOC").is_some();
    let msvc = std::env::var("CARGO_CFG_TARGET_ENV").is_ok_and(|env| env == "msvc");
    if feature && !msvc {
        println!("cargo::rustc-cfg=jemalloc");
        if std::env::var_os("CARGO_FEATURE_PROFILING").is_some() {
            println!("cargo::rustc-cfg=profiling");
        }
    }
    if std::env::var_os("TOWER_JEMALLOC_FAULT_INJECTION").is_some_and(|value| value == "1") {
        println!("cargo::rustc-cfg=fault_injection");
    }
}
