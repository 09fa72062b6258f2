//! Sets `cfg(jemalloc)` when jemalloc is compiled in: the `jemalloc` feature is on and the
//! target is not MSVC (where jemalloc does not build); and `cfg(profiling)` when its heap
//! profiler is compiled in too (the `profiling` feature).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(jemalloc)");
    println!("cargo::rustc-check-cfg=cfg(profiling)");
    let feature = std::env::var_os("CARGO_FEATURE_JEMALLOC").is_some();
    let msvc = std::env::var("CARGO_CFG_TARGET_ENV").is_ok_and(|env| env == "msvc");
    if feature && !msvc {
        println!("cargo::rustc-cfg=jemalloc");
        if std::env::var_os("CARGO_FEATURE_PROFILING").is_some() {
            println!("cargo::rustc-cfg=profiling");
        }
    }
}
