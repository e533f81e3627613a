//! `WipeOnFree::map_large_blocks` (a function's `--load-memory lean`): large blocks are
//! mapped each on its own and handed back to the system when freed (but for the last
//! 16 MiB freed, kept wiped for reuse until mapping stops), small ones stay on the heap,
//! contents survive every move between the two, and blocks mapped before mapping stops
//! are still freed as mapped blocks afterwards. The switch is process-wide,
//! so this binary holds this one test.

mod common;

use common::{MIB, filled, grow_into_a_mapped_block_and_back, holds_pattern, pattern, resident};
use shardseal_function::WipeOnFree;

#[global_allocator]
static ALLOCATOR: WipeOnFree = WipeOnFree;

#[test]
fn large_blocks_are_mapped_while_on_and_handed_back_when_freed() {
    let before = filled(MIB);
    assert!(!WipeOnFree::is_mapped_block(before.as_ptr()));

    WipeOnFree::map_large_blocks().unwrap();
    assert!(
        WipeOnFree::map_large_blocks().is_err(),
        "the range is reserved once"
    );

    // Large blocks are mapped; small ones are not.
    let small = filled(1000);
    assert!(!WipeOnFree::is_mapped_block(small.as_ptr()));
    let zeroed = vec![0u8; 3 * MIB];
    assert!(WipeOnFree::is_mapped_block(zeroed.as_ptr()));
    assert!(zeroed.iter().all(|b| *b == 0));

    // Freeing a mapped block hands its pages back at once.
    let big = filled(64 * MIB);
    assert!(WipeOnFree::is_mapped_block(big.as_ptr()));
    assert!(holds_pattern(&big));
    let with_big = resident();
    drop(big);
    let without_big = resident();
    assert!(
        with_big - without_big >= 48 * MIB,
        "freeing 64 MiB gave back {} bytes",
        with_big.saturating_sub(without_big)
    );

    // Growing from the heap into a mapped block and shrinking back keeps the contents.
    grow_into_a_mapped_block_and_back(WipeOnFree::is_mapped_block);

    // An alignment beyond a page comes from the heap.
    #[repr(C, align(16384))]
    struct Aligned([u8; 16384]);
    let aligned: Vec<Aligned> = (0..64).map(|_| Aligned([7; 16384])).collect();
    assert!(!WipeOnFree::is_mapped_block(aligned.as_ptr().cast()));
    assert_eq!(aligned.as_ptr() as usize % 16384, 0);
    assert!(aligned.iter().all(|a| a.0.iter().all(|b| *b == 7)));

    // Threads map blocks of their own.
    let blocks: Vec<Vec<u8>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4).map(|_| scope.spawn(|| filled(2 * MIB))).collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    for block in &blocks {
        assert!(WipeOnFree::is_mapped_block(block.as_ptr()));
        assert!(holds_pattern(block));
    }
    let mut starts: Vec<usize> = blocks.iter().map(|b| b.as_ptr() as usize).collect();
    starts.sort_unstable();
    assert!(
        starts.windows(2).all(|w| w[1] - w[0] >= 2 * MIB),
        "blocks overlap"
    );
    let mapped = WipeOnFree::mapped_block_count();
    assert!(mapped >= 8, "{mapped} blocks mapped");

    // Freed blocks are kept for the next of their size, wiped, but no more than 16 MiB of
    // them: freeing 48 MiB in blocks of 1 MiB gives at least 32 back at once.
    let many: Vec<Vec<u8>> = (0..48).map(|_| filled(MIB)).collect();
    assert!(many.iter().all(|b| WipeOnFree::is_mapped_block(b.as_ptr())));
    let with_many = resident();
    drop(many);
    let kept_back = with_many.saturating_sub(resident());
    assert!(
        kept_back >= 30 * MIB,
        "freeing 48 MiB gave back {kept_back} bytes"
    );
    let reused = WipeOnFree::reused_block_count();
    let again = vec![0u8; MIB];
    assert!(WipeOnFree::is_mapped_block(again.as_ptr()));
    assert!(again.iter().all(|b| *b == 0));
    assert_eq!(WipeOnFree::reused_block_count(), reused + 1);
    let mapped = WipeOnFree::mapped_block_count();

    // Once mapping stops, the kept blocks go back, large blocks come from the heap again,
    // and a block mapped before is still read, grown and freed as a mapped one.
    let mut old = filled(2 * MIB);
    assert!(WipeOnFree::is_mapped_block(old.as_ptr()));
    let with_kept = resident();
    WipeOnFree::stop_mapping_large_blocks();
    let handed_back = with_kept.saturating_sub(resident());
    assert!(
        handed_back >= 12 * MIB,
        "stopping gave back {handed_back} bytes"
    );
    let after = filled(2 * MIB);
    assert!(!WipeOnFree::is_mapped_block(after.as_ptr()));
    assert!(holds_pattern(&old));
    old.extend((old.len()..3 * MIB).map(pattern));
    assert!(!WipeOnFree::is_mapped_block(old.as_ptr()));
    assert!(holds_pattern(&old));
    assert_eq!(WipeOnFree::mapped_block_count(), mapped + 1);
    drop((old, after, again, blocks, before, small, zeroed));
}
