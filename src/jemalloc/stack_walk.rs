//! A faster stack walk for the allocations jemalloc samples (x86_64 Linux with glibc).
//!
//! Each sampled allocation records its stack. jemalloc walks it with libgcc's unwinder, which
//! finds and interprets the DWARF call-frame information of every frame anew, each time: about
//! 13–17 µs for the 40-odd frames of a request handler under tokio and hyper, paid once per
//! 512 KiB allocated while profiling is active. When the layer is built with the heap profile
//! endpoint and jemalloc's profiler started, [`install`] replaces that walk, through jemalloc's
//! `experimental.hooks.prof_backtrace`, by one with `framehop`, which keeps the unwind rule of
//! each code address it met in caches the threads share (about 400 KiB at most): a frame it
//! has seen before costs a lookup and one read of the stack.
//!
//! What keeps it safe to run inside the allocator:
//! - It reads only the current thread's stack, between the walk's own stack pointer and the top
//!   of the stack (`pthread_getattr_np`): a wrong rule could give a wrong frame, never a read
//!   of unmapped memory.
//! - It allocates only when a set of caches is first used and when the loaded libraries
//!   changed (their list); jemalloc allows that: allocations made while it walks a stack are
//!   not sampled and do not come back here.
//! - It never waits for a lock of its own: another thread may be inside `dl_iterate_phdr`
//!   (whose lock a rebuild of the list of libraries takes) and allocate there. When the list
//!   or every set of caches is in use, it does not wait.
//! - Whenever it cannot finish a walk (a read out of those bounds, a rule it cannot follow, the
//!   list of libraries in use by a rebuild, every set of caches in use, a thread being torn
//!   down), it hands the sample to jemalloc's own walk, kept when it installed itself.
//!
//! The frames are the ones libgcc's walk gives (a unit test compares the two).
//!
//! The frames recorded are those of jemalloc's own walk: return addresses, from the caller of
//! the walk (jemalloc's `prof_backtrace`) to the root of the thread, at most `opt.prof_bt_max`.

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{FrameAddress, Module, ModuleSectionInfo, Unwinder};
use std::cell::Cell;
use std::ffi::{c_int, c_uint, c_void};
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError, RwLock, TryLockError};

/// jemalloc's `prof_backtrace_hook_t`: fills `vec` with at most `max` return addresses and
/// writes their number to `len`.
pub(crate) type BacktraceHook = unsafe extern "C" fn(*mut *mut c_void, *mut c_uint, c_uint);

/// Section data: the loaded module's own mapped memory, for the life of the process.
type Mapped = &'static [u8];

/// jemalloc's own walk, kept when [`install`] put [`walk`] in its place.
static PREVIOUS: OnceLock<BacktraceHook> = OnceLock::new();

/// The loaded modules (executable, shared libraries, vDSO) and their unwind information.
static LISTING: RwLock<Option<Listing>> = RwLock::new(None);

/// The unwind rules met so far, shared by the threads: [`POOL`] sets of [`WAYS`] caches,
/// each set taken by one walk at a time. A walk that finds every set taken (as many walks at
/// once) hands its sample to jemalloc's walk.
static CACHES: [Mutex<Option<Box<Rules>>>; POOL] = [const { Mutex::new(None) }; POOL];

/// Sets of caches: walks at the same moment on different threads.
const POOL: usize = 4;

/// Caches per set. One of framehop's caches has 509 entries, one per address modulo 509, so
/// two of the 40-odd addresses of a stack often share an entry and keep evicting each other
/// (a fifth of the frames in a test); spreading addresses over 8 of them makes that rare.
/// About 12 KiB each: 8 × 4 ≈ 400 KiB at most for the process, whatever its threads.
const WAYS: usize = 8;

/// One set of caches, an address's cache chosen by the address.
struct Rules([CacheX86_64; WAYS]);

impl Rules {
    fn new() -> Box<Self> {
        Box::new(Self(std::array::from_fn(|_| CacheX86_64::new())))
    }

    /// The cache for `address`: the next bits above those framehop indexes a cache by.
    fn cache(&mut self, address: u64) -> &mut CacheX86_64 {
        &mut self.0[(address / 509 % WAYS as u64) as usize]
    }
}

thread_local! {
    /// This thread's stack, `[low, high)`; `(0, 0)` until first asked.
    static STACK: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// Puts [`walk`] in place of jemalloc's stack walk, once per process. `swap` exchanges the
/// hook (`experimental.hooks.prof_backtrace`) and returns the previous one; when it fails,
/// jemalloc's walk stays and a later call tries again.
pub(crate) fn install<E>(
    swap: impl FnOnce(BacktraceHook) -> Result<BacktraceHook, E>,
) -> Result<(), E> {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    if INSTALLED.get().is_some() {
        return Ok(());
    }
    // List the modules first, outside the allocator's path.
    refresh();
    let previous = swap(walk)?;
    if previous as usize != walk as BacktraceHook as usize {
        let _ = PREVIOUS.set(previous);
    }
    let _ = INSTALLED.set(());
    Ok(())
}

/// jemalloc calls this for each sampled allocation, with room for `max` frames in `vec`.
///
/// Kept out of line: the registers it reads describe its own frame, whose caller is jemalloc's
/// `prof_backtrace`; everything it calls runs below that frame and leaves it intact.
#[inline(never)]
#[allow(unsafe_code)]
unsafe extern "C" fn walk(vec: *mut *mut c_void, len: *mut c_uint, max: c_uint) {
    let (pc, sp, bp): (u64, u64, u64);
    // SAFETY: copies the instruction pointer, the stack pointer and the frame pointer into
    // three registers; touches no memory, no stack and no flags.
    #[allow(unsafe_code)]
    unsafe {
        std::arch::asm!(
            "lea {pc}, [rip]",
            "mov {sp}, rsp",
            "mov {bp}, rbp",
            pc = out(reg) pc,
            sp = out(reg) sp,
            bp = out(reg) bp,
            options(nomem, nostack, preserves_flags),
        );
    }
    // SAFETY: jemalloc passes `vec` with room for `max` pointers (`prof_bt_t`'s vector of
    // `opt.prof_bt_max` entries), written by nobody else while it waits for this call.
    #[allow(unsafe_code)]
    let frames = unsafe { std::slice::from_raw_parts_mut(vec, max as usize) };
    // No panic may cross into C; none is expected, and one would mean jemalloc's walk instead.
    let walked = std::panic::catch_unwind(AssertUnwindSafe(|| {
        walk_from(UnwindRegsX86_64::new(pc, sp, bp), frames)
    }));
    match walked {
        Ok(Some(count)) => {
            // SAFETY: `len` is the `prof_bt_t`'s length, for this call to write.
            #[allow(unsafe_code)]
            unsafe {
                *len = count as c_uint;
            }
        }
        _ => {
            if let Some(previous) = PREVIOUS.get() {
                // SAFETY: jemalloc's own walk, called with the arguments jemalloc gave us.
                #[allow(unsafe_code)]
                unsafe {
                    previous(vec, len, max)
                }
            } else {
                // SAFETY: as above.
                #[allow(unsafe_code)]
                unsafe {
                    *len = 0;
                }
            }
        }
    }
}

/// Walks the stack from `regs`, the registers of a frame of this thread still live, into
/// `frames`, the frame of `regs` itself left out. `None`: this walk could not finish.
fn walk_from(regs: UnwindRegsX86_64, frames: &mut [*mut c_void]) -> Option<usize> {
    let (pc, sp) = (regs.ip(), regs.sp());
    let (_, high) = stack_bounds().filter(|(low, high)| (*low..*high).contains(&sp))?;
    // Only the part of the stack above `sp` holds the callers' frames, all of it mapped.
    let mut read = |address: u64| -> Result<u64, ()> {
        if address >= sp && address.checked_add(8).is_some_and(|end| end <= high) {
            // SAFETY: `[sp, high)` is this thread's stack in use: mapped and readable; the
            // frames above `sp` are not written while this walk runs below them.
            #[allow(unsafe_code)]
            Ok(unsafe { (address as *const u64).read_unaligned() })
        } else {
            Err(())
        }
    };
    with_listing(|listing| {
        let mut rules = take_rules(sp)?;
        let rules = rules.get_or_insert_with(Rules::new);
        let unwinder = &listing.unwinder;
        let mut regs = regs;
        // The first frame is this walk's own; the frames recorded are its callers'.
        let mut address = FrameAddress::from_instruction_pointer(pc);
        let mut count = 0;
        while count < frames.len() {
            let cache = rules.cache(address.address_for_lookup());
            match unwinder.unwind_frame(address, &mut regs, cache, &mut read) {
                // A null return address ends a stack, as in jemalloc's walk.
                Ok(Some(0)) | Ok(None) => break,
                Ok(Some(return_address)) => {
                    frames[count] = return_address as usize as *mut c_void;
                    count += 1;
                    address = FrameAddress::from_return_address(return_address)?;
                }
                Err(_) => return None,
            }
        }
        Some(count)
    })
}

/// A free set of caches, trying first the one `sp` (this thread's stack) points at.
fn take_rules(sp: u64) -> Option<MutexGuard<'static, Option<Box<Rules>>>> {
    let first = (sp >> 21) as usize;
    (0..POOL).find_map(|i| match CACHES[(first + i) % POOL].try_lock() {
        Ok(rules) => Some(rules),
        Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    })
}

/// This thread's stack, `[low, high)`, asked of glibc once per thread.
fn stack_bounds() -> Option<(u64, u64)> {
    STACK
        .try_with(|bounds| {
            if bounds.get().1 == 0 {
                bounds.set(query_stack_bounds()?);
            }
            Some(bounds.get())
        })
        .ok()
        .flatten()
}

fn query_stack_bounds() -> Option<(u64, u64)> {
    let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
    // SAFETY: `pthread_getattr_np` initializes `attr` for the calling thread when it returns
    // 0, after which it is read once and destroyed.
    #[allow(unsafe_code)]
    unsafe {
        if libc::pthread_getattr_np(libc::pthread_self(), attr.as_mut_ptr()) != 0 {
            return None;
        }
        let mut low: *mut c_void = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        let code = libc::pthread_attr_getstack(attr.as_ptr(), &mut low, &mut size);
        libc::pthread_attr_destroy(attr.as_mut_ptr());
        if code != 0 || size == 0 {
            return None;
        }
        let low = low as u64;
        Some((low, low.checked_add(size as u64)?))
    }
}

/// The modules loaded in the process and their unwind information, as of `generation`.
struct Listing {
    /// glibc's counts of libraries loaded and unloaded when the list was made.
    generation: (u64, u64),
    unwinder: UnwinderX86_64<Mapped>,
}

/// Runs `f` with the list of modules, rebuilt first if libraries were loaded or unloaded since.
/// `None` when another thread is rebuilding it: this never waits.
fn with_listing<T>(f: impl FnOnce(&Listing) -> Option<T>) -> Option<T> {
    let generation = loaded_generation();
    {
        // Not `read`: a rebuild in progress waits for `dl_iterate_phdr`'s lock, which the
        // caller may hold (an allocation in a `dl_iterate_phdr` callback).
        let listing = match LISTING.try_read() {
            Ok(listing) => listing,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        if let Some(listing) = listing.as_ref().filter(|l| l.generation == generation) {
            return f(listing);
        }
    }
    let mut listing = match LISTING.try_write() {
        Ok(listing) => listing,
        Err(TryLockError::Poisoned(e)) => e.into_inner(),
        Err(TryLockError::WouldBlock) => return None,
    };
    *listing = Some(Listing::now());
    f(listing.as_ref()?)
}

/// Rebuilds the list of modules.
fn refresh() {
    let listing = Listing::now();
    *LISTING.write().unwrap_or_else(PoisonError::into_inner) = Some(listing);
}

/// glibc's counts of libraries loaded and unloaded so far (`dlpi_adds`, `dlpi_subs`): they
/// change exactly when the list of modules does.
fn loaded_generation() -> (u64, u64) {
    #[allow(unsafe_code)]
    unsafe extern "C" fn first(
        info: *mut libc::dl_phdr_info,
        _: libc::size_t,
        out: *mut c_void,
    ) -> c_int {
        // SAFETY: glibc passes a valid `info` for the call; `out` is the `(u64, u64)` below.
        #[allow(unsafe_code)]
        unsafe {
            *out.cast::<(u64, u64)>() = ((*info).dlpi_adds, (*info).dlpi_subs);
        }
        1 // The counts are the same in every entry: stop at the first.
    }
    let mut generation = (0u64, 0u64);
    // SAFETY: `first` writes only through the pointer to `generation`, alive for the call.
    #[allow(unsafe_code)]
    unsafe {
        libc::dl_iterate_phdr(Some(first), (&raw mut generation).cast());
    }
    generation
}

impl Listing {
    /// The modules loaded now.
    fn now() -> Self {
        struct Collect {
            generation: (u64, u64),
            modules: Vec<Module<Mapped>>,
        }
        #[allow(unsafe_code)]
        unsafe extern "C" fn each(
            info: *mut libc::dl_phdr_info,
            _: libc::size_t,
            out: *mut c_void,
        ) -> c_int {
            // SAFETY: glibc passes a valid `info`, whose program headers stay mapped while the
            // module is loaded; `out` is the `Collect` below.
            #[allow(unsafe_code)]
            let (info, collect) = unsafe { (&*info, &mut *out.cast::<Collect>()) };
            collect.generation = (info.dlpi_adds, info.dlpi_subs);
            // SAFETY: `dlpi_phdr` points to `dlpi_phnum` program headers.
            #[allow(unsafe_code)]
            let headers =
                unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) };
            if let Some(module) = module(info.dlpi_addr, headers) {
                collect.modules.push(module);
            }
            0
        }
        let mut collect = Collect {
            generation: (0, 0),
            modules: Vec::new(),
        };
        // SAFETY: `each` writes only through the pointer to `collect`, alive for the call.
        #[allow(unsafe_code)]
        unsafe {
            libc::dl_iterate_phdr(Some(each), (&raw mut collect).cast());
        }
        let mut unwinder = UnwinderX86_64::new();
        for module in collect.modules {
            unwinder.add_module(module);
        }
        Self {
            generation: collect.generation,
            unwinder,
        }
    }
}

/// The module loaded at `bias` with the program headers `headers`, if it has an
/// `.eh_frame_hdr` (`PT_GNU_EH_FRAME`) that points to its `.eh_frame`.
fn module(bias: u64, headers: &[libc::Elf64_Phdr]) -> Option<Module<Mapped>> {
    let loads = || headers.iter().filter(|h| h.p_type == libc::PT_LOAD);
    let start = loads().map(|h| h.p_vaddr).min()?;
    let end = loads().map(|h| h.p_vaddr + h.p_memsz).max()?;
    let hdr = headers.iter().find(|h| h.p_type == libc::PT_GNU_EH_FRAME)?;
    // The segment holding `svma`, up to its end: everything in it is mapped.
    let segment_from = |svma: u64| {
        loads()
            .find(|h| (h.p_vaddr..h.p_vaddr + h.p_memsz).contains(&svma))
            .map(|h| svma..h.p_vaddr + h.p_memsz)
    };
    // SAFETY (both `mapped`): the ranges lie inside the module's loaded segments, mapped and
    // readable while it stays loaded.
    let mapped = |svma: &Range<u64>| -> Mapped {
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(
                (bias + svma.start) as *const u8,
                (svma.end - svma.start) as usize,
            )
        }
    };
    let hdr_svma = hdr.p_vaddr..hdr.p_vaddr + hdr.p_memsz;
    segment_from(hdr.p_vaddr).filter(|s| s.end >= hdr_svma.end)?;
    let hdr_data = mapped(&hdr_svma);
    let eh_frame_start = eh_frame_address(hdr_data, hdr_svma.start)?;
    let eh_frame_svma = segment_from(eh_frame_start)?;
    let eh_frame_data = mapped(&eh_frame_svma);
    let text = loads()
        .find(|h| h.p_flags & libc::PF_X != 0)
        .map(|h| h.p_vaddr..h.p_vaddr + h.p_memsz);
    Some(Module::new(
        String::new(),
        bias + start..bias + end,
        bias,
        Sections {
            eh_frame_hdr: (hdr_svma, hdr_data),
            eh_frame: (eh_frame_svma, eh_frame_data),
            text,
        },
    ))
}

/// Where `.eh_frame` starts (as stated in the module), read from the `.eh_frame_hdr` at
/// `hdr_svma`: its `eh_frame_ptr`, in the encodings linkers write.
fn eh_frame_address(hdr: &[u8], hdr_svma: u64) -> Option<u64> {
    const ABSPTR: u8 = 0x00;
    const UDATA4: u8 = 0x03;
    const UDATA8: u8 = 0x04;
    const SDATA4: u8 = 0x0b;
    const SDATA8: u8 = 0x0c;
    const PCREL: u8 = 0x10;
    const DATAREL: u8 = 0x30;
    let (&version, rest) = hdr.split_first()?;
    let (&encoding, rest) = rest.split_first()?;
    if version != 1 {
        return None;
    }
    let field = rest.get(2..)?; // after fde_count_enc and table_enc
    let value = match encoding & 0x0f {
        UDATA4 => u64::from(u32::from_le_bytes(field.get(..4)?.try_into().ok()?)),
        SDATA4 => i64::from(i32::from_le_bytes(field.get(..4)?.try_into().ok()?)) as u64,
        ABSPTR | UDATA8 | SDATA8 => u64::from_le_bytes(field.get(..8)?.try_into().ok()?),
        _ => return None,
    };
    match encoding & 0x70 {
        0 => Some(value),
        // Relative to the field itself, 4 bytes into the header.
        PCREL => Some(hdr_svma.wrapping_add(4).wrapping_add(value)),
        // Relative to the start of `.eh_frame_hdr`.
        DATAREL => Some(hdr_svma.wrapping_add(value)),
        _ => None,
    }
}

/// A loaded module's unwind sections, as framehop asks for them.
struct Sections {
    eh_frame_hdr: (Range<u64>, Mapped),
    eh_frame: (Range<u64>, Mapped),
    /// The executable segment, for the rare CFI that addresses relative to `.text`.
    text: Option<Range<u64>>,
}

impl ModuleSectionInfo<Mapped> for Sections {
    fn base_svma(&self) -> u64 {
        0 // ELF
    }

    fn section_svma_range(&mut self, name: &[u8]) -> Option<Range<u64>> {
        match name {
            b".eh_frame_hdr" => Some(self.eh_frame_hdr.0.clone()),
            b".eh_frame" => Some(self.eh_frame.0.clone()),
            b".text" => self.text.clone(),
            _ => None,
        }
    }

    fn section_data(&mut self, name: &[u8]) -> Option<Mapped> {
        match name {
            b".eh_frame_hdr" => Some(self.eh_frame_hdr.1),
            b".eh_frame" => Some(self.eh_frame.1),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frames [`walk`] records from here, and those libgcc's unwinder (through the
    /// `backtrace` crate) records from the same place.
    #[inline(never)]
    fn both_walks() -> (Vec<usize>, Vec<usize>) {
        let mut frames = vec![std::ptr::null_mut(); 128];
        let mut len: c_uint = 0;
        // SAFETY: room for 128 frames, as said.
        #[allow(unsafe_code)]
        unsafe {
            walk(frames.as_mut_ptr(), &mut len, 128);
        }
        let ours = frames[..len as usize].iter().map(|&f| f as usize).collect();
        let mut libgcc = Vec::new();
        // Up to the null address that ends a thread's stack, where jemalloc's walk stops too.
        backtrace::trace(|frame| {
            let ip = frame.ip() as usize;
            if ip != 0 {
                libgcc.push(ip);
            }
            ip != 0
        });
        (ours, libgcc)
    }

    #[inline(never)]
    fn nested(depth: usize) -> (Vec<usize>, Vec<usize>) {
        let walks = if depth == 0 {
            both_walks()
        } else {
            nested(depth - 1)
        };
        std::hint::black_box(walks)
    }

    #[test]
    fn walks_the_stack_libgcc_walks() {
        assert!(
            PREVIOUS.get().is_none(),
            "no fallback in this test: the walk must finish"
        );
        let (ours, libgcc) = nested(20);
        // Our first frame is the return into `both_walks`, where libgcc's differs (it returns
        // from another call); every caller's return address above it is the same.
        assert!(ours.len() > 22, "{} frames: {ours:x?}", ours.len());
        let callers = &ours[1..];
        let at = libgcc
            .iter()
            .position(|&ip| ip == callers[0])
            .unwrap_or_else(|| panic!("{:x} not in libgcc's walk {libgcc:x?}", callers[0]));
        assert_eq!(callers, &libgcc[at..], "ours {ours:x?}\nlibgcc {libgcc:x?}");
    }

    #[test]
    fn stops_at_the_frame_limit() {
        let mut frames = vec![std::ptr::null_mut(); 4];
        let mut len: c_uint = 99;
        // SAFETY: room for 4 frames.
        #[allow(unsafe_code)]
        unsafe {
            walk(frames.as_mut_ptr(), &mut len, 4);
        }
        assert_eq!(len, 4);
        assert!(frames.iter().all(|f| !f.is_null()));
    }

    #[test]
    fn knows_when_libraries_change() {
        let generation = loaded_generation();
        assert!(
            generation.0 >= 1,
            "glibc counts the executable as loaded: {generation:?}"
        );
        assert_eq!(Listing::now().generation, generation);
        // Nothing loaded or unloaded in between: the list made now stays current.
        assert_eq!(loaded_generation(), generation);
    }

    #[test]
    fn reads_eh_frame_ptr_encodings() {
        // version 1, pcrel|sdata4, udata4 count, datarel|sdata4 table, eh_frame_ptr = -0x100.
        let hdr = [1, 0x1b, 0x03, 0x3b, 0x00, 0xff, 0xff, 0xff];
        assert_eq!(eh_frame_address(&hdr, 0x2000), Some(0x2000 + 4 - 0x100));
        // absptr (udata8).
        let mut hdr = vec![1, 0x04, 0x03, 0x3b];
        hdr.extend_from_slice(&0x1234u64.to_le_bytes());
        assert_eq!(eh_frame_address(&hdr, 0x2000), Some(0x1234));
        // Unknown version or encoding: no module rather than a wrong one.
        assert_eq!(eh_frame_address(&[2, 0x1b, 0, 0, 0, 0, 0, 0], 0), None);
        assert_eq!(eh_frame_address(&[1, 0x1f, 0, 0, 0, 0, 0, 0], 0), None);
        assert_eq!(eh_frame_address(&[1, 0x1b, 0, 0], 0), None);
    }
}
