//! The instrumented allocator: a block is charged to the tag of the thread that allocated it and
//! discharged from that tag wherever it is freed; `retag` moves it; reallocation keeps the tag;
//! a tag block is never handed out twice at once.

use cleave_runtime::alloc::{self, CountingAlloc, TagBlock, TagGuard};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

#[test]
fn charges_follow_the_block_across_threads() {
    let block = TagBlock::reserve(2).expect("free tags");
    let (a, b) = (block.tag(0), block.tag(1));
    assert_eq!((alloc::live(a), alloc::live(b)), (0, 0));
    // Allocated on a thread tagged `a`, freed on an untagged thread.
    let v = std::thread::scope(|s| {
        s.spawn(|| {
            let _g = TagGuard::new(a);
            vec![1.0f32; 1000]
        })
        .join()
        .unwrap()
    });
    assert_eq!(alloc::live(a), 4000);
    assert_eq!(alloc::peak(a), 4000);
    // Reallocation keeps the tag at the new size.
    let mut v = v;
    v.reserve_exact(1000);
    assert_eq!(alloc::live(a), 4 * v.capacity() as u64);
    v.shrink_to_fit();
    assert_eq!(alloc::live(a), 4000);
    // Retagged to `b` (a value handed to another device).
    alloc::retag_vec(&v, b);
    assert_eq!((alloc::live(a), alloc::live(b)), (0, 4000));
    std::thread::spawn(move || drop(v)).join().unwrap();
    assert_eq!(alloc::live(b), 0);
    assert!(alloc::peak(b) >= 4000);
    alloc::reset_peak(b);
    assert_eq!(alloc::peak(b), 0);
    // Untagged allocations are not counted.
    let w = vec![0u8; 1 << 20];
    assert_eq!((alloc::live(a), alloc::live(b)), (0, 0));
    drop(w);
}

#[test]
fn over_aligned_blocks_keep_their_alignment() {
    let block = TagBlock::reserve(1).expect("free tags");
    let t = block.tag(0);
    let _g = TagGuard::new(t);
    #[repr(align(64))]
    struct Wide([u8; 64]);
    let v: Vec<Wide> = (0..3).map(|_| Wide([7; 64])).collect();
    assert_eq!(v.as_ptr() as usize % 64, 0);
    assert_eq!(v[2].0[63], 7);
    assert_eq!(alloc::live(t), 192);
    drop(v);
    assert_eq!(alloc::live(t), 0);
}

#[test]
fn tag_blocks_do_not_overlap() {
    let x = TagBlock::reserve(8).unwrap();
    let y = TagBlock::reserve(8).unwrap();
    let xs: Vec<u32> = (0..8).map(|i| x.tag(i)).collect();
    assert!((0..8).all(|i| !xs.contains(&y.tag(i))));
    assert!(xs.iter().all(|&t| t != 0));
}
