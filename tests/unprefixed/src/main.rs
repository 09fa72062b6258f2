//! Issue 18's regression test: heap profiling active, with jemalloc as the C `malloc` too.
//!
//! glibc's `pthread_getattr_np` allocates (the thread's CPU set; on the main thread, the
//! buffers that read `/proc/self/maps`) while it holds the thread's own lock. When jemalloc is
//! the C `malloc` as well (tikv-jemalloc-sys' `unprefixed_malloc_on_supported_platforms`, the
//! set-up jemalloc_pprof recommends), jemalloc may sample that allocation, and anything its
//! sampling hook calls runs under that lock. A walk of sampled stacks that asks glibc for the
//! thread's stack bounds (the layer's own walk did, until it was removed) calls
//! `pthread_getattr_np` again there, and the thread waits for itself for ever.
//!
//! The program, in the configuration users run:
//!
//! 1. checks that glibc's allocations really reach jemalloc: the process's `malloc` is
//!    jemalloc's, and `pthread_getattr_np` on a thread of its own raises that thread's
//!    `thread.allocated`;
//! 2. builds a [`JemallocLayer`] with its defaults and the debug endpoints open (so the heap
//!    profile endpoint is built, as the removed walk was installed then), checks through the
//!    service that profiling is active at the smallest interval the profiling endpoint
//!    accepts (2^12 bytes, started so through `malloc_conf` below), and fetches one heap
//!    profile;
//! 3. starts [`THREADS`] threads, [`BATCH`] at a time, each of which calls
//!    `pthread_getattr_np` on itself [`CALLS`] times before anything else, then allocates.
//!
//! It prints one line (threads finished, seconds) and exits 0; on a failed check it exits 1
//! with the reason. A hang is caught by `run`, which bounds the program in time.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use std::convert::Infallible;
use std::ffi::c_void;
use std::hint::black_box;
use std::mem::MaybeUninit;
use std::time::Instant;
use tower::{Layer, ServiceExt};
use tower_jemalloc::{Endpoint, JemallocLayer, ProfilingStatus};

#[global_allocator]
static GLOBAL: tower_jemalloc::allocator::Jemalloc = tower_jemalloc::allocator::Jemalloc;

/// jemalloc's options, read once at start-up: the profiler started and active, sampling every
/// 2^12 bytes on average, the smallest interval `PUT /debug/jemalloc/profiling?lg_sample=N`
/// accepts (so the most samples the layer lets anyone ask for). Unprefixed, jemalloc reads
/// `malloc_conf` (and the environment variable `MALLOC_CONF`, which `run` clears).
#[export_name = "malloc_conf"]
static MALLOC_CONF: &[u8] = b"prof:true,prof_active:true,lg_prof_sample:12\0";

/// The sample interval of [`MALLOC_CONF`], as 2^N bytes.
const LG_SAMPLE: u32 = 12;

/// Threads started in all.
const THREADS: usize = 2_000;

/// Threads alive at once.
const BATCH: usize = 50;

/// `pthread_getattr_np` calls per thread, before it allocates anything itself. On a thread
/// other than the main one each call allocates the thread's CPU set, grown until the kernel
/// takes it (224 bytes in all on the development machine), so about ten samples a thread at
/// 4 KiB; the first sampled thread of the removed walk never came back.
const CALLS: usize = 200;

fn main() {
    if let Err(reason) = run() {
        eprintln!("unprefixed: {reason}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    step("checking that jemalloc is the C malloc");
    let per_call = glibc_allocates_through_jemalloc()?;

    step("building the layer, reading the profiler's state, fetching a heap profile");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| format!("cannot start a tokio runtime: {e}"))?;
    runtime.block_on(check_the_layer())?;

    step(&format!(
        "starting {THREADS} threads, {BATCH} at a time, {CALLS} pthread_getattr_np calls each"
    ));
    let start = Instant::now();
    let mut finished = 0;
    while finished < THREADS {
        let batch: Vec<_> = (0..BATCH.min(THREADS - finished))
            .map(|_| std::thread::Builder::new().spawn(worker))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        for handle in batch {
            handle
                .join()
                .map_err(|_| "a thread panicked".to_owned())??;
            finished += 1;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let sampled = (THREADS * CALLS) as u64 * per_call;
    println!(
        "unprefixed: {finished} threads finished in {seconds:.2} s, with profiling active every \
         {} bytes; glibc allocated {per_call} bytes per pthread_getattr_np call through \
         jemalloc, so ~{} samples expected inside those calls",
        1u64 << LG_SAMPLE,
        sampled >> LG_SAMPLE
    );
    Ok(())
}

/// What the program is doing, on stderr: the last one says where it was if it hangs.
fn step(what: &str) {
    eprintln!("unprefixed: {what}");
}

/// One thread's work: asks glibc for its own stack [`CALLS`] times, then allocates.
fn worker() -> Result<(), String> {
    for _ in 0..CALLS {
        own_stack_size()?;
    }
    let blocks: Vec<Vec<u8>> = (0..16).map(|i| vec![i; 512]).collect();
    black_box(blocks);
    Ok(())
}

/// The size of this thread's stack, asked of glibc through `pthread_getattr_np`, as the
/// removed walk did for a thread whose bounds it had not cached.
fn own_stack_size() -> Result<usize, String> {
    let mut attr = MaybeUninit::<libc::pthread_attr_t>::uninit();
    let mut low: *mut c_void = std::ptr::null_mut();
    let mut size: libc::size_t = 0;
    // SAFETY: `pthread_getattr_np` initializes `attr` for the calling thread when it returns
    // 0; it is then read once and destroyed, and never used after.
    #[allow(unsafe_code)]
    let code = unsafe {
        let code = libc::pthread_getattr_np(libc::pthread_self(), attr.as_mut_ptr());
        if code != 0 {
            return Err(format!("pthread_getattr_np returned {code}"));
        }
        let code = libc::pthread_attr_getstack(attr.as_ptr(), &mut low, &mut size);
        libc::pthread_attr_destroy(attr.as_mut_ptr());
        code
    };
    match code {
        0 if size > 0 => Ok(size),
        _ => Err(format!(
            "pthread_attr_getstack returned {code} (size {size})"
        )),
    }
}

/// Checks that glibc's allocations go through jemalloc; returns the bytes jemalloc counts for
/// one `pthread_getattr_np` call on a thread other than the main one.
fn glibc_allocates_through_jemalloc() -> Result<u64, String> {
    // The symbol the dynamic linker binds glibc's own `malloc` calls to.
    // SAFETY: a C string literal; `dlsym` only reads it.
    #[allow(unsafe_code)]
    let bound = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"malloc".as_ptr()) } as usize;
    let jemalloc = tikv_jemalloc_sys::malloc as *const () as usize;
    if bound != jemalloc {
        return Err(format!(
            "the process's malloc ({bound:#x}) is not jemalloc's ({jemalloc:#x}): is \
             tikv-jemalloc-sys' unprefixed_malloc_on_supported_platforms on?"
        ));
    }
    let measured = std::thread::spawn(|| -> Result<u64, String> {
        let allocated = tikv_jemalloc_ctl::thread::allocatedp::mib()
            .and_then(|mib| mib.read())
            .map_err(|e| format!("thread.allocatedp: {e}"))?;
        const ROUNDS: u64 = 64;
        let before = allocated.get();
        for _ in 0..ROUNDS {
            own_stack_size()?;
        }
        Ok((allocated.get() - before) / ROUNDS)
    })
    .join()
    .map_err(|_| "the checking thread panicked".to_owned())??;
    if measured == 0 {
        return Err(
            "pthread_getattr_np allocated nothing through jemalloc: this glibc does not \
             allocate there, or not through the process's malloc; the test would prove nothing"
                .to_owned(),
        );
    }
    Ok(measured)
}

/// The layer with its defaults and the debug endpoints open: profiling must be active at
/// 2^[`LG_SAMPLE`] bytes, and a heap profile must come back.
async fn check_the_layer() -> Result<(), String> {
    let layer = JemallocLayer::builder()
        .allow_anonymous(Endpoint::Purge)
        .build()
        .map_err(|e| format!("cannot build the layer: {e}"))?;
    let app = tower::service_fn(|_: http::Request<Empty<Bytes>>| async {
        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"app"))))
    });
    let service = layer.layer(app);

    let (status, body) = get(service.clone(), "/debug/jemalloc/profiling").await?;
    let text = String::from_utf8_lossy(&body);
    if status != http::StatusCode::OK {
        return Err(format!("the profiling endpoint answered {status}: {text}"));
    }
    let state: ProfilingStatus = serde_json::from_slice(&body)
        .map_err(|e| format!("not a ProfilingStatus ({e}): {text}"))?;
    if !(state.available && state.active && state.lg_sample == Some(LG_SAMPLE)) {
        return Err(format!(
            "profiling is not active every 2^{LG_SAMPLE} bytes, malloc_conf was not read: {text}"
        ));
    }

    let (status, body) = get(service, "/debug/pprof/heap").await?;
    if status != http::StatusCode::OK || !body.starts_with(&[0x1f, 0x8b]) {
        return Err(format!(
            "the heap profile endpoint answered {status} without a gzipped profile: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    Ok(())
}

/// `GET path` through `service`: the status and the whole body.
async fn get<S, B>(service: S, path: &str) -> Result<(http::StatusCode, Bytes), String>
where
    S: tower::Service<http::Request<Empty<Bytes>>, Response = http::Response<B>>,
    S::Error: std::fmt::Display,
    B: http_body::Body,
    B::Error: std::fmt::Display,
{
    let request = http::Request::get(path)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let response = service
        .oneshot(request)
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("GET {path}: reading the body: {e}"))?
        .to_bytes();
    Ok((status, body))
}
