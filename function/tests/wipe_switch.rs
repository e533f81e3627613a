//! `WipeOnFree` reallocates blocks two ways: by copying and wiping the old block (while the
//! process wipes) and in place through the system allocator (once it stopped, as the
//! coordinator does). Both must keep a block's contents through every size class: small
//! heap blocks, blocks past glibc's mapping threshold, and a shrink. The switch is
//! process-wide and one-way, so this binary holds this one test.

// Calling a `GlobalAlloc` directly is unsafe by signature; each call says why it is sound.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};

use shardseal_function::WipeOnFree;

#[global_allocator]
static ALLOCATOR: WipeOnFree = WipeOnFree;

/// Fills a block, grows it from 1 KiB to 64 MiB and shrinks it back, checking its
/// contents after each step.
fn grow_and_shrink_keep_contents() {
    let pattern = |i: usize| (i % 251) as u8;
    let align = 16;
    let mut size = 1 << 10;
    let layout = Layout::from_size_align(size, align).unwrap();
    // SAFETY: a non-zero size and a valid layout; every block is freed below.
    let mut block = unsafe { ALLOCATOR.alloc(layout) };
    assert!(!block.is_null());
    // SAFETY: `block` holds `size` writable bytes.
    unsafe { (0..size).for_each(|i| block.add(i).write(pattern(i))) };
    for new_size in [4 << 10, 300 << 10, 8 << 20, 64 << 20, 100 << 10] {
        let old = Layout::from_size_align(size, align).unwrap();
        // SAFETY: `block` was allocated with `old`; `new_size` is non-zero.
        block = unsafe { ALLOCATOR.realloc(block, old, new_size) };
        assert!(!block.is_null(), "realloc to {new_size} failed");
        let kept = size.min(new_size);
        // SAFETY: `block` holds at least `kept` initialised bytes.
        let contents = unsafe { std::slice::from_raw_parts(block, kept) };
        assert!(
            contents.iter().enumerate().all(|(i, b)| *b == pattern(i)),
            "{size} -> {new_size}: contents changed"
        );
        // SAFETY: `block` holds `new_size` writable bytes.
        unsafe { (kept..new_size).for_each(|i| block.add(i).write(pattern(i))) };
        size = new_size;
    }
    // SAFETY: `block` was last reallocated to `size` bytes.
    unsafe { ALLOCATOR.dealloc(block, Layout::from_size_align(size, align).unwrap()) };

    // And through the global allocator, as collections use it.
    let mut v: Vec<u8> = (0..1000).map(pattern).collect();
    for _ in 0..16 {
        let n = v.len();
        v.extend((n..2 * n).map(pattern));
    }
    assert!(v.iter().enumerate().all(|(i, b)| *b == pattern(i)));
}

#[test]
fn realloc_keeps_contents_whether_or_not_the_process_wipes() {
    grow_and_shrink_keep_contents();
    WipeOnFree::stop_in_this_process();
    grow_and_shrink_keep_contents();
}
