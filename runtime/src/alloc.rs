//! An instrumented global allocator: live and peak bytes per *tag* (a pipeline device, or a
//! device's host pool), for measuring what each device of the CPU pipeline really holds.
//!
//! # Use
//!
//! A binary (or a test crate) installs it with
//! `#[global_allocator] static A: cleave_runtime::alloc::CountingAlloc = CountingAlloc;`
//! (`cleave` and `cleave-runner` do). Nothing is counted until a thread sets a tag
//! ([`TagGuard`]): the pipeline executor, when asked to measure
//! ([`crate::pipeline::PipelineOptions::measure_memory`]), reserves one tag per device and one
//! per device's host pool ([`TagBlock`]), and its threads set them around every allocation of
//! tensor data (parameters, accumulators, the plans' buffers, outputs, received values, reloads,
//! and everything a kernel allocates while it runs). Bookkeeping (maps, names, the timeline) runs
//! untagged: on an accelerator it would live in host memory.
//!
//! # How a buffer is charged
//!
//! Every allocation carries a 16-byte header (more when the alignment is larger) just before the
//! pointer handed out, holding the tag it is charged to, that tag's *generation*, and its size.
//! Reserving a tag ([`TagBlock::reserve`]) starts a new generation: a block still charged to an
//! earlier measurement's tag when that measurement ended (a thread-local cache of the GEMM
//! library, say) is *stale*, and freeing, growing or moving it no longer touches the tag's
//! counts, so measurements that reuse a tag, one after another or in concurrent tests of one
//! process, never see each other's blocks. A free reads the header, so
//! a buffer allocated on one device and freed on another (a value sent downstream, freed by its
//! consumer) is discharged from the tag it was charged to. A buffer that changes hands is moved
//! with [`retag`] (the executor re-charges a received value to the receiving device, and the
//! plans' buffers, compiled on the main thread, to their device at the start of a step).
//!
//! # Cost when not measuring
//!
//! Untagged allocations pay a thread-local read and the header write; no atomic operation is
//! touched (measured in BENCHMARKS.md, "Instrumented allocator").

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Number of tags (tag 0 is "not counted").
pub const MAX_TAGS: usize = 64;

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
/// Live and peak bytes of each tag, in the low [`BYTE_BITS`] bits, and the tag's generation in the
/// high bits, so that checking a block's generation and updating a count is one atomic step.
static LIVE: [AtomicU64; MAX_TAGS] = [ZERO; MAX_TAGS];
static PEAK: [AtomicU64; MAX_TAGS] = [ZERO; MAX_TAGS];

/// Bits of a count word that hold bytes (256 TiB); the other 16 hold the generation.
const BYTE_BITS: u32 = 48;
const BYTES: u64 = (1 << BYTE_BITS) - 1;
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// While set, every allocation and reallocation of every thread is counted in [`ALLOCATIONS`].
static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static IN_USE: Mutex<u64> = Mutex::new(1);

thread_local! {
    static TAG: Cell<u32> = const { Cell::new(0) };
}

/// The counting allocator (a header in front of every block of [`System`]'s).
pub struct CountingAlloc;

const HEADER: usize = 16;

fn header_size(align: usize) -> usize {
    align.max(HEADER)
}

/// A header's tag word: the tag in the low 32 bits, its current generation above (0 for tag 0,
/// "not counted").
fn stamp(tag: u32) -> u64 {
    if tag == 0 {
        0
    } else {
        tag as u64 | (LIVE[tag as usize].load(Ordering::Relaxed) >> BYTE_BITS) << 32
    }
}

/// Applies `f` to the bytes of `counts[tag]` if the count is still of the generation of `word`
/// (a header's tag word); returns the new count word, or `None` for tag 0 or a stale block.
fn update(counts: &[AtomicU64], word: u64, f: impl Fn(u64) -> Option<u64>) -> Option<u64> {
    let tag = word as u32 as usize;
    if tag == 0 {
        return None;
    }
    let generation = word >> 32;
    let mut cur = counts[tag].load(Ordering::Relaxed);
    loop {
        if cur >> BYTE_BITS != generation {
            return None;
        }
        let new = (generation << BYTE_BITS) | (f(cur & BYTES)? & BYTES);
        match counts[tag].compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return Some(new),
            Err(x) => cur = x,
        }
    }
}

fn charge(word: u64, bytes: u64) {
    if let Some(now) = update(&LIVE, word, |live| Some(live + bytes)) {
        let now = now & BYTES;
        update(&PEAK, word, |peak| (now > peak).then_some(now));
    }
}

fn discharge(word: u64, bytes: u64) {
    update(&LIVE, word, |live| Some(live.saturating_sub(bytes)));
}

/// # Safety
/// `user` must be a pointer this allocator handed out.
unsafe fn header(user: *const u8) -> (*mut u64, *mut u64) {
    let tag = user.sub(8) as *mut u64;
    let size = user.sub(16) as *mut u64;
    (tag, size)
}

// SAFETY: every block is one of System's, `header_size` bytes larger and with the same alignment;
// the pointer handed out is `header_size` bytes in, so it keeps the alignment, and the header
// lies inside the block.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.alloc_with(layout, false)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.alloc_with(layout, true)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let h = header_size(layout.align());
        let (tag, size) = header(ptr);
        discharge(*tag, *size);
        System.dealloc(
            ptr.sub(h),
            Layout::from_size_align_unchecked(layout.size() + h, layout.align()),
        );
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let h = header_size(layout.align());
        let (tag, _) = header(ptr);
        let old_tag = *tag;
        let base = System.realloc(
            ptr.sub(h),
            Layout::from_size_align_unchecked(layout.size() + h, layout.align()),
            new_size + h,
        );
        if base.is_null() {
            return base;
        }
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        let user = base.add(h);
        let (tag, size) = header(user);
        // The block stays charged to its tag, at its new size.
        discharge(old_tag, *size);
        *size = new_size as u64;
        charge(old_tag, new_size as u64);
        *tag = old_tag;
        user
    }
}

impl CountingAlloc {
    #[inline]
    unsafe fn alloc_with(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        let h = header_size(layout.align());
        let full = Layout::from_size_align_unchecked(layout.size() + h, layout.align());
        let base = if zeroed {
            System.alloc_zeroed(full)
        } else {
            System.alloc(full)
        };
        if base.is_null() {
            return base;
        }
        if !INSTALLED.load(Ordering::Relaxed) {
            INSTALLED.store(true, Ordering::Relaxed);
        }
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        let user = base.add(h);
        let t = TAG.try_with(|t| t.get()).unwrap_or(0);
        let (tag, size) = header(user);
        *tag = stamp(t);
        *size = layout.size() as u64;
        charge(*tag, layout.size() as u64);
        user
    }
}

/// Counts every allocation and reallocation of every thread from now until [`stop_counting`]
/// returns the count (one counter per process: for a test or benchmark that owns the process's
/// allocations meanwhile). Costs one relaxed load per allocation when off.
pub fn start_counting() {
    ALLOCATIONS.store(0, Ordering::Relaxed);
    COUNTING.store(true, Ordering::SeqCst);
}

/// Stops counting and returns the number of allocations since [`start_counting`].
pub fn stop_counting() -> u64 {
    COUNTING.store(false, Ordering::SeqCst);
    ALLOCATIONS.load(Ordering::Relaxed)
}

/// Whether [`CountingAlloc`] is this process's global allocator (it has allocated something).
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// The current thread's tag (0: not counted).
pub fn current_tag() -> u32 {
    TAG.with(|t| t.get())
}

/// Sets the thread's tag until dropped, then restores the previous one.
pub struct TagGuard(u32);

impl TagGuard {
    /// Charges this thread's allocations to `tag` (0: not counted) while the guard lives.
    pub fn new(tag: u32) -> TagGuard {
        TagGuard(TAG.with(|t| t.replace(tag)))
    }
}

impl Drop for TagGuard {
    fn drop(&mut self) {
        TAG.with(|t| t.set(self.0));
    }
}

/// Live bytes charged to `tag`.
pub fn live(tag: u32) -> u64 {
    LIVE[tag as usize].load(Ordering::Relaxed) & BYTES
}

/// The most bytes charged to `tag` at once since the last [`reset_peak`].
pub fn peak(tag: u32) -> u64 {
    PEAK[tag as usize].load(Ordering::Relaxed) & BYTES
}

/// Starts a new peak for `tag` at its live bytes.
pub fn reset_peak(tag: u32) {
    let t = tag as usize;
    PEAK[t].store(LIVE[t].load(Ordering::Relaxed), Ordering::Relaxed);
}

/// Moves the buffer at `ptr` (the start of a block of this allocator, or dangling when
/// `bytes` is 0) to `tag`. Does nothing when the allocator is not installed.
///
/// # Safety
/// `ptr` must be a live block this allocator handed out (e.g. a non-empty `Vec`'s pointer with
/// capacity > 0), not freed or moved by another thread meanwhile.
pub unsafe fn retag(ptr: *const u8, tag: u32) {
    let (t, size) = header(ptr);
    let new = stamp(tag);
    if *t != new {
        discharge(*t, *size);
        charge(new, *size);
        *t = new;
    }
}

/// Moves a vector's block to `tag` (nothing for an empty or unallocated vector, or when the
/// allocator is not installed).
pub fn retag_vec<T>(v: &Vec<T>, tag: u32) {
    if installed() && v.capacity() > 0 && std::mem::size_of::<T>() > 0 {
        // SAFETY: a Vec with capacity > 0 owns a block of the global allocator, which is ours.
        unsafe { retag(v.as_ptr() as *const u8, tag) }
    }
}

/// A block of tags reserved for one measurement (one pipeline step), released when dropped, so
/// that concurrent measurements in one process never share a tag.
pub struct TagBlock {
    first: u32,
    len: u32,
}

impl TagBlock {
    /// Reserves `len` consecutive tags (None when fewer are free or the allocator is not
    /// installed). Their live and peak bytes start at 0.
    pub fn reserve(len: usize) -> Option<TagBlock> {
        if !installed() || len == 0 || len >= MAX_TAGS {
            return None;
        }
        let mut used = IN_USE.lock().unwrap_or_else(|p| p.into_inner());
        let mask = (1u64 << len) - 1;
        for first in 1..=(MAX_TAGS - len) {
            if *used & (mask << first) == 0 {
                *used |= mask << first;
                for t in first..first + len {
                    // A new generation at 0 bytes: blocks of the last measurement are stale.
                    let g = ((LIVE[t].load(Ordering::Relaxed) >> BYTE_BITS) + 1) & 0xffff;
                    LIVE[t].store(g << BYTE_BITS, Ordering::Relaxed);
                    PEAK[t].store(g << BYTE_BITS, Ordering::Relaxed);
                }
                return Some(TagBlock {
                    first: first as u32,
                    len: len as u32,
                });
            }
        }
        None
    }

    /// The `i`-th tag of the block.
    pub fn tag(&self, i: usize) -> u32 {
        assert!(i < self.len as usize, "tag {i} of a block of {}", self.len);
        self.first + i as u32
    }
}

impl Drop for TagBlock {
    fn drop(&mut self) {
        let mut used = IN_USE.lock().unwrap_or_else(|p| p.into_inner());
        let mask = ((1u64 << self.len) - 1) << self.first;
        *used &= !mask;
    }
}
