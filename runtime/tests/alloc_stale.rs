//! The instrumented allocator across measurements that reuse a tag (its own test binary, so no
//! other test reserves tags meanwhile): a block still charged to a tag when its measurement ends
//! is stale for the next measurement of that tag, and freeing, growing or moving it does not touch
//! the new counts (before generations, freeing one wrapped the next measurement's live bytes).

use cleave_runtime::alloc::{self, CountingAlloc, TagBlock, TagGuard};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

#[test]
fn blocks_of_an_ended_measurement_are_not_counted_by_the_next() {
    let first = TagBlock::reserve(1).expect("free tags");
    let t = first.tag(0);
    // Two blocks outlive the first measurement, as a GEMM library's thread-local cache does.
    let (mut grown, freed) = {
        let _g = TagGuard::new(t);
        (vec![0u8; 1000], vec![0u8; 3000])
    };
    assert_eq!(alloc::live(t), 4000);
    drop(first);

    let second = TagBlock::reserve(1).expect("free tags");
    assert_eq!(second.tag(0), t, "the lowest free tag is reused");
    let _g = TagGuard::new(t);
    let fresh = vec![0u8; 500];
    assert_eq!((alloc::live(t), alloc::peak(t)), (500, 500));
    // Freeing, growing and shrinking the stale blocks leave the counts alone.
    drop(freed);
    grown.reserve_exact(9000);
    grown.shrink_to_fit();
    assert_eq!((alloc::live(t), alloc::peak(t)), (500, 500));
    // Moving a stale block to the tag charges it from then on.
    alloc::retag_vec(&grown, t);
    assert_eq!(alloc::live(t), 500 + grown.capacity() as u64);
    drop(grown);
    drop(fresh);
    assert_eq!(alloc::live(t), 0);
}
