//! Giving unused pages back to the OS by amount rather than all at once: the arenas holding the
//! most unused pages first, each decayed (`arena.<i>.decay`), then purged (`arena.<i>.purge`)
//! if that was not enough, until the amount asked for has been given back.
//!
//! A purge of all arenas ([`purge`](super::purge)) empties every arena, and every page the
//! application then needs again must be faulted back in. A memory governor that only needs to
//! get back under a high-water mark asks for what it needs instead: most often the one arena
//! that a burst of frees left full of dirty pages covers it.
//!
//! "Unused" is what jemalloc counts in `stats.arenas.<i>.pdirty` (dirty pages: freed, still
//! resident) and `stats.arenas.<i>.pmuzzy` (muzzy pages: advised to the OS with `MADV_FREE`,
//! still counted by the kernel until it needs them), times the page size. What is given back
//! is measured as the drop of an arena's dirty + muzzy bytes across the calls on it, read after
//! an epoch advance: pages other threads free into or reuse from that arena in the meantime
//! move the figure too, so it is jemalloc's account, not the kernel's.

use super::ctl::{ArenaFigures, ArenasControl, Ctl};
use super::JemallocError;

/// What [`give_back`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GivenBack {
    /// Bytes of dirty and muzzy pages given back to the OS, as jemalloc counts them.
    pub(crate) bytes: u64,
    /// Bytes of dirty and muzzy pages still held by all arenas afterwards.
    pub(crate) left: u64,
}

/// Bytes of dirty and muzzy pages all arenas hold now: the most [`give_back`] could return.
/// One epoch advance.
///
/// # Errors
///
/// [`JemallocError::Mallctl`] when the epoch advance or a read fails.
pub(crate) fn reclaimable(ctl: &Ctl) -> Result<u64, JemallocError> {
    let stats = ctl.snapshot()?;
    Ok(stats.dirty + stats.muzzy)
}

/// Gives at least `bytes` of dirty and muzzy pages back to the OS, or all there are.
///
/// Takes the arenas holding the most dirty + muzzy bytes first; for each, asks jemalloc to
/// decay it (`arena.<i>.decay`: the pages whose decay time has passed), then, if still short,
/// to purge it (`arena.<i>.purge`: all its unused pages), and stops as soon as `bytes` have
/// been given back. A purge takes a whole arena, so the answer may exceed `bytes`. With
/// `bytes == 0` no arena is touched.
///
/// `arena.<i>.decay` returns only the pages whose decay time has passed since jemalloc last
/// looked at the arena: right after a burst of frees (or with a decay time of -1) it returns
/// nothing and the purge does the work. Blocks the calling thread for as long as the purges take
/// (milliseconds per hundred MiB): call it from a thread of its own, not an async worker.
///
/// # Errors
///
/// [`JemallocError::Mallctl`] when a mallctl call fails; what was given back before it is not
/// reported.
pub(crate) fn give_back(ctl: &Ctl, bytes: u64) -> Result<GivenBack, JemallocError> {
    let mut given = 0;
    if bytes > 0 {
        ctl.advance_epoch()?;
        'arenas: for (arena, mut held) in largest_first(&ctl.arena_figures()?) {
            for control in [ArenasControl::Decay, ArenasControl::Purge] {
                if held == 0 {
                    continue 'arenas;
                }
                ctl.arena_control(arena, control)?;
                ctl.advance_epoch()?;
                let (dirty, muzzy) = ctl.arena_unused(arena)?;
                let now = dirty + muzzy;
                given += held.saturating_sub(now);
                held = now;
                if given >= bytes {
                    break 'arenas;
                }
            }
        }
    }
    Ok(GivenBack {
        bytes: given,
        left: reclaimable(ctl)?,
    })
}

/// The arenas holding dirty or muzzy pages, as `(arena, dirty + muzzy bytes)`, the largest
/// first (the lower index first on a tie, so the order is stable).
fn largest_first(arenas: &[ArenaFigures]) -> Vec<(u32, u64)> {
    let mut held: Vec<(u32, u64)> = arenas
        .iter()
        .map(|figures| (figures.arena, figures.dirty + figures.muzzy))
        .filter(|&(_, held)| held > 0)
        .collect();
    held.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    held
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arena(arena: u32, dirty: u64, muzzy: u64) -> ArenaFigures {
        ArenaFigures {
            arena,
            resident: 1 << 30,
            dirty,
            muzzy,
            threads: 1,
        }
    }

    #[test]
    fn arenas_holding_the_most_come_first() {
        let arenas = [
            arena(0, 10, 0),
            arena(1, 0, 0),
            arena(2, 5, 30),
            arena(3, 40, 0),
            arena(4, 0, 35),
        ];
        assert_eq!(largest_first(&arenas), [(3, 40), (2, 35), (4, 35), (0, 10)]);
        assert_eq!(largest_first(&[arena(7, 0, 0)]), []);
        assert_eq!(largest_first(&[]), []);
    }

    #[cfg(jemalloc)]
    mod real {
        use super::super::*;
        use crate::jemalloc::ctl::{ctl, Write};
        use std::sync::Mutex;
        use tikv_jemalloc_ctl::{Access, AsName};

        const MIB: u64 = 1 << 20;

        /// The tests below take turns: each fills the one test arena and measures it.
        static SERIAL: Mutex<()> = Mutex::new(());

        /// An arena of the tests' own whose dirty pages decay after `dirty_decay_ms` (-1:
        /// never), muzzy pages at once. Nothing else allocates in it, and without background
        /// threads jemalloc decays an arena only when it is used or asked to: only the calls
        /// under test change what it holds. One arena per decay time, created once. Test
        /// set-up only: the crate itself never creates arenas.
        fn test_arena(dirty_decay_ms: isize) -> u32 {
            static ARENAS: Mutex<Vec<(isize, u32)>> = Mutex::new(Vec::new());
            let mut arenas = ARENAS.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(&(_, arena)) = arenas.iter().find(|(ms, _)| *ms == dirty_decay_ms) {
                return arena;
            }
            let arena: u32 = b"arenas.create\0".name().read().expect("arenas.create");
            let ctl = ctl().unwrap();
            ctl.write(Write::DirtyDecay(arena, dirty_decay_ms)).unwrap();
            ctl.write(Write::MuzzyDecay(arena, 0)).unwrap();
            arenas.push((dirty_decay_ms, arena));
            arena
        }

        /// A thread bound to a test arena that has allocated, touched and freed blocks of
        /// 1 MiB, and stays alive until dropped: jemalloc purges an arena when the last thread
        /// bound to it exits, which would leave nothing to give back.
        struct DirtyArena {
            arena: u32,
            /// The arena's dirty + muzzy bytes once the blocks were freed.
            filled: u64,
            release: Option<std::sync::mpsc::Sender<()>>,
            thread: Option<std::thread::JoinHandle<()>>,
        }

        impl DirtyArena {
            fn new(mib: usize, dirty_decay_ms: isize) -> Self {
                let arena = test_arena(dirty_decay_ms);
                let (freed_tx, freed) = std::sync::mpsc::channel();
                let (release, release_rx) = std::sync::mpsc::channel::<()>();
                let thread = std::thread::spawn(move || {
                    b"thread.arena\0".name().write(arena).expect("thread.arena");
                    let blocks: Vec<Vec<u8>> =
                        (0..mib).map(|_| vec![0xA5u8; MIB as usize]).collect();
                    std::hint::black_box(&blocks);
                    drop(blocks);
                    freed_tx.send(()).unwrap();
                    // Until the test is done (or gone).
                    let _ = release_rx.recv_timeout(std::time::Duration::from_secs(60));
                });
                freed
                    .recv_timeout(std::time::Duration::from_secs(60))
                    .expect("the filling thread frees its blocks");
                Self {
                    arena,
                    filled: held(arena),
                    release: Some(release),
                    thread: Some(thread),
                }
            }
        }

        impl Drop for DirtyArena {
            fn drop(&mut self) {
                drop(self.release.take());
                if let Some(thread) = self.thread.take() {
                    let _ = thread.join();
                }
            }
        }

        /// The arena's dirty + muzzy bytes now.
        fn held(arena: u32) -> u64 {
            let ctl = ctl().unwrap();
            ctl.advance_epoch().unwrap();
            let (dirty, muzzy) = ctl.arena_unused(arena).unwrap();
            dirty + muzzy
        }

        #[test]
        fn gives_back_at_least_what_was_asked_the_largest_arena_first() {
            let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
            let ctl = ctl().unwrap();
            // Pages that never decay: only a purge gives them back.
            let dirty = DirtyArena::new(64, -1);
            let (arena, filled) = (dirty.arena, dirty.filled);
            assert!(filled >= 60 * MIB, "the test arena holds {filled} bytes");
            let before = reclaimable(ctl).unwrap();
            assert!(before >= filled, "{before} < {filled}");

            let given = give_back(ctl, 16 * MIB).unwrap();
            assert!(given.bytes >= 16 * MIB, "{given:?}");
            // The test arena held the most: it went first, decayed (nothing due), then
            // purged whole.
            assert_eq!(held(arena), 0);
            assert!(given.bytes >= filled, "{given:?} vs {filled}");
            let after = reclaimable(ctl).unwrap();
            assert!(
                after + 16 * MIB <= before,
                "reclaimable {before} -> {after}"
            );
            assert!(given.left < before, "{given:?} vs {before}");
        }

        #[test]
        fn asking_for_more_than_there_is_gives_back_all_there_is() {
            let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
            let ctl = ctl().unwrap();
            let dirty = DirtyArena::new(8, -1);
            let (arena, filled) = (dirty.arena, dirty.filled);
            assert!(filled >= 8 * MIB, "the test arena holds {filled} bytes");
            let given = give_back(ctl, u64::MAX).unwrap();
            assert!(given.bytes >= filled, "{given:?} vs {filled}");
            assert_eq!(held(arena), 0);
        }

        #[test]
        fn giving_back_nothing_touches_no_arena() {
            let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
            let ctl = ctl().unwrap();
            // Pages past their decay time: any decay or purge call would give them back. A
            // first decay call only enters the freed pages in jemalloc's decay backlog (it
            // gives nothing back yet); 1 ms later they are due.
            let dirty = DirtyArena::new(8, 1);
            let arena = dirty.arena;
            ctl.arena_control(arena, ArenasControl::Decay).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            let filled = held(arena);
            assert!(filled >= 8 * MIB, "the test arena holds {filled} bytes");
            let given = give_back(ctl, 0).unwrap();
            assert_eq!(given.bytes, 0);
            assert!(given.left >= filled, "{given:?}");
            assert_eq!(held(arena), filled);
        }
    }
}
