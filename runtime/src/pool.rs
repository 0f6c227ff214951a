//! A persistent pool of worker threads for splitting one large GEMM across cores.
//!
//! At the sizes of a small training step (a 64×784×256 product takes about 100 µs) spawning
//! threads, or a library's own per-call thread start, costs as much as it saves. This pool starts
//! its workers once (on first use) and keeps them: after a job a worker spins for a while on an
//! atomic epoch (so the next product of the same step finds it awake, with no system call), then
//! sleeps on a condition variable.
//!
//! A job is a closure over part indices `0..parts`; the caller runs parts too, and returns when
//! every part has finished. Only one caller uses the pool at a time: if it is busy (for example
//! two pipeline stage workers running GEMMs at once) [`Pool::run`] runs every part on the calling
//! thread. Parts must write disjoint memory.
//!
//! The number of threads is `CLEAVE_THREADS` if set (1: no workers, every job runs on the
//! caller), else the machine's available parallelism. A split needs cores that are actually
//! free: on the shared 2-core development machine with other builds running (load 7–11) it
//! measured no gain (the MLP step 0.429 ms with 1 thread against 0.432 ms with 2), while on the
//! quiet machine 2 threads took the MLP step from 0.37 to 0.29 ms (BENCHMARKS.md, issue 5
//! follow-up), the thread count the PyTorch and JAX baselines use too.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};

/// A buffer pointer that the parts of one job share: they read it, and each writes its own
/// disjoint elements (split GEMMs, row kernels).
#[derive(Clone, Copy)]
pub(crate) struct SharedPtr<T>(pub *mut T);

// SAFETY: the parts of a job read shared inputs and write disjoint elements.
unsafe impl<T> Sync for SharedPtr<T> {}
unsafe impl<T> Send for SharedPtr<T> {}

impl<T> SharedPtr<T> {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    pub(crate) fn get(self) -> *mut T {
        self.0
    }

    /// Rows `lo..hi` (of `len` elements) of an input.
    ///
    /// # Safety
    /// The rows must be in the buffer, and nothing may write them meanwhile.
    pub(crate) unsafe fn rows(&self, len: usize, lo: usize, hi: usize) -> &[T] {
        std::slice::from_raw_parts(self.0.add(lo * len), (hi - lo) * len)
    }

    /// Rows `lo..hi` (of `len` elements) to write.
    ///
    /// # Safety
    /// The rows must be in the buffer, and no other part may touch them meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn rows_mut(&self, len: usize, lo: usize, hi: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(lo * len), (hi - lo) * len)
    }
}

/// Spin iterations of an idle worker before it sleeps (a few hundred microseconds).
const SPIN: u32 = 1 << 16;

/// The job a caller posted: a type-erased `&(dyn Fn(usize) + Sync)` and how many parts are left
/// to claim.
struct Slot {
    epoch: u64,
    job: Option<JobRef>,
    next: usize,
    parts: usize,
}

#[derive(Clone, Copy)]
struct JobRef(*const (dyn Fn(usize) + Sync));

// SAFETY: the pointee is `Sync`, and `Pool::run` keeps it alive until every part has finished.
unsafe impl Send for JobRef {}

struct Shared {
    slot: Mutex<Slot>,
    wake: Condvar,
    /// Bumped (under `slot`'s lock) when a job is posted; workers spin on it.
    epoch: AtomicU64,
    /// Parts claimed but not finished, plus parts not yet claimed.
    pending: AtomicUsize,
}

/// The pool (see the module docs).
pub(crate) struct Pool {
    shared: &'static Shared,
    threads: usize,
    /// Held by the one caller using the pool.
    busy: Mutex<()>,
}

impl Pool {
    /// The process-wide pool.
    pub(crate) fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| {
            let threads = std::env::var("CLEAVE_THREADS")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
                })
                .clamp(1, 64);
            Pool::new(threads)
        })
    }

    fn new(threads: usize) -> Pool {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            slot: Mutex::new(Slot {
                epoch: 0,
                job: None,
                next: 0,
                parts: 0,
            }),
            wake: Condvar::new(),
            epoch: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
        }));
        for i in 1..threads {
            let spawned = std::thread::Builder::new()
                .name(format!("cleave-gemm-{i}"))
                .spawn(move || worker(shared));
            if spawned.is_err() {
                // Fewer workers only means less splitting: the caller runs unclaimed parts.
                return Pool {
                    shared,
                    threads: i,
                    busy: Mutex::new(()),
                };
            }
        }
        Pool {
            shared,
            threads,
            busy: Mutex::new(()),
        }
    }

    /// Threads a job can use (workers plus the caller).
    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(0) … f(parts-1)`, on the workers and the caller, and returns when all are done.
    pub(crate) fn run(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        // A thread whose allocations are being measured (an allocator tag is set: a pipeline
        // device, or the plan's kernel-scratch measurement) runs every part itself, so that all
        // the scratch its kernels allocate is charged to it, the same every run. Shared out, the
        // workers' allocations would go uncounted, and which parts the caller ran, and so what
        // it measured, would vary from run to run.
        if crate::alloc::current_tag() != 0 {
            (0..parts).for_each(f);
            return;
        }
        let guard = match self.busy.try_lock() {
            Ok(g) if self.threads > 1 && parts > 1 => g,
            _ => {
                (0..parts).for_each(f);
                return;
            }
        };
        let sh = self.shared;
        sh.pending.store(parts, Ordering::SeqCst);
        {
            let mut slot = sh.slot.lock().unwrap_or_else(|e| e.into_inner());
            slot.epoch += 1;
            // SAFETY (lifetime erasure): the job is cleared below before `f` goes out of scope,
            // and no part runs after `pending` reaches zero.
            let erased: *const (dyn Fn(usize) + Sync + '_) = f;
            slot.job = Some(JobRef(unsafe {
                std::mem::transmute::<
                    *const (dyn Fn(usize) + Sync + '_),
                    *const (dyn Fn(usize) + Sync + 'static),
                >(erased)
            }));
            slot.next = 0;
            slot.parts = parts;
            sh.epoch.store(slot.epoch, Ordering::Release);
        }
        sh.wake.notify_all();
        // The caller claims parts like a worker (of its own job: it is posted until all are done).
        while let Some((_, i)) = claim(sh) {
            f(i);
            sh.pending.fetch_sub(1, Ordering::AcqRel);
        }
        while sh.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        sh.slot.lock().unwrap_or_else(|e| e.into_inner()).job = None;
        drop(guard);
    }
}

/// Claims the next unclaimed part of the posted job, with that job: a worker finishing a part
/// of one job may claim a part of the next one, which it must run with the next job's closure.
fn claim(sh: &Shared) -> Option<(JobRef, usize)> {
    let mut slot = sh.slot.lock().unwrap_or_else(|e| e.into_inner());
    match slot.job {
        Some(job) if slot.next < slot.parts => {
            slot.next += 1;
            Some((job, slot.next - 1))
        }
        _ => None,
    }
}

fn worker(sh: &'static Shared) {
    let mut seen = 0u64;
    loop {
        // Spin, then sleep, until a job newer than the last one seen is posted.
        let mut spins = 0u32;
        while sh.epoch.load(Ordering::Acquire) == seen {
            if spins < SPIN {
                spins += 1;
                std::hint::spin_loop();
            } else {
                let slot = sh.slot.lock().unwrap_or_else(|e| e.into_inner());
                let _slot = sh
                    .wake
                    .wait_while(slot, |s| s.epoch == seen)
                    .unwrap_or_else(|e| e.into_inner());
            }
        }
        let job = {
            let mut slot = sh.slot.lock().unwrap_or_else(|e| e.into_inner());
            seen = slot.epoch;
            match slot.job {
                Some(job) if slot.next < slot.parts => {
                    slot.next += 1;
                    Some((job, slot.next - 1))
                }
                _ => None,
            }
        };
        let mut part = job;
        while let Some((job, i)) = part {
            // SAFETY: the job stays alive until `pending` is zero, which needs this part.
            unsafe { (*job.0)(i) };
            sh.pending.fetch_sub(1, Ordering::AcqRel);
            part = claim(sh);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_part_runs_once() {
        let pool = Pool::new(3);
        for parts in [0, 1, 2, 3, 7, 64] {
            let hits: Vec<AtomicU32> = (0..parts).map(|_| AtomicU32::new(0)).collect();
            for _ in 0..50 {
                pool.run(parts, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
            }
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 50));
        }
    }

    #[test]
    fn back_to_back_jobs_run_their_own_closures() {
        // A worker that finishes a part of one job may claim a part of the next: it must run
        // that part with the next job's closure. Two jobs alternate, each counting its own
        // parts; a part run with the other job's closure shows in the wrong counter.
        let pool = Pool::new(2);
        let (a, b) = (AtomicU32::new(0), AtomicU32::new(0));
        let count_a = |_: usize| {
            a.fetch_add(1, Ordering::Relaxed);
        };
        let count_b = |_: usize| {
            b.fetch_add(1, Ordering::Relaxed);
        };
        for _ in 0..50_000 {
            pool.run(2, &count_a);
            pool.run(3, &count_b);
        }
        assert_eq!(a.load(Ordering::Relaxed), 2 * 50_000);
        assert_eq!(b.load(Ordering::Relaxed), 3 * 50_000);
    }

    #[test]
    fn concurrent_callers_fall_back_to_their_own_thread() {
        let pool = Pool::global();
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    let sum = AtomicU32::new(0);
                    for _ in 0..100 {
                        pool.run(4, &|i| {
                            sum.fetch_add(i as u32 + 1, Ordering::Relaxed);
                        });
                    }
                    assert_eq!(sum.load(Ordering::Relaxed), 1000);
                });
            }
        });
    }
}
