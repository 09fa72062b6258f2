//! Sets `cfg(jemalloc)` when jemalloc is compiled in: the `jemalloc` feature is on and the
//! target is not MSVC (where jemalloc does not build); and `cfg(profiling)` when its heap
//! profiler is compiled in too (the `profiling` feature), and `cfg(stack_walk)` when the
//! faster walk of sampled stacks is too (x86_64 Linux with glibc).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(jemalloc)");
    println!("cargo::rustc-check-cfg=cfg(profiling)");
    println!("cargo::rustc-check-cfg=cfg(stack_walk)");
    let feature = std::env::var_os("CARGO_FEATURE_JEMALLOC").is_some();
    let msvc = std::env::var("CARGO_CFG_TARGET_ENV").is_ok_and(|env| env == "msvc");
    if feature && !msvc {
        println!("cargo::rustc-cfg=jemalloc");
        if std::env::var_os("CARGO_FEATURE_PROFILING").is_some() {
            println!("cargo::rustc-cfg=profiling");
            let target = |key: &str, value: &str| std::env::var(key).is_ok_and(|v| v == value);
            if target("CARGO_CFG_TARGET_OS", "linux")
                && target("CARGO_CFG_TARGET_ARCH", "x86_64")
                && target("CARGO_CFG_TARGET_ENV", "gnu")
            {
                println!("cargo::rustc-cfg=stack_walk");
            }
        }
    }
}
