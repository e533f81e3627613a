//! `WipeOnFree::serve_large_blocks_mapped` (a function's `--serve-memory mapped`): large
//! blocks are mapped each on its own, the first freed kept, wiped, up to the bound for the
//! next block of their size, the rest handed back to the system with their addresses
//! reused, and contents survive every move. The switch is process-wide, so this binary
//! holds this one test.

mod common;

use common::{MIB, filled, grow_into_a_mapped_block_and_back, holds_pattern, resident};
use shardseal_function::WipeOnFree;

#[global_allocator]
static ALLOCATOR: WipeOnFree = WipeOnFree;

#[test]
fn serving_keeps_the_first_blocks_freed_and_hands_the_rest_back_at_the_same_addresses() {
    let from_heap = filled(2 * MIB);
    WipeOnFree::serve_large_blocks_mapped(8 * MIB).unwrap();
    assert!(!WipeOnFree::is_mapped_block(from_heap.as_ptr()));

    // Two "inferences" of the same sizes, one after the other: 24 blocks of 1 MiB each.
    let first: Vec<Vec<u8>> = (0..24).map(|_| filled(MIB)).collect();
    assert!(
        first
            .iter()
            .all(|b| WipeOnFree::is_mapped_block(b.as_ptr()))
    );
    assert!(first.iter().all(|b| holds_pattern(b)));
    let addresses = |blocks: &[Vec<u8>]| -> Vec<usize> {
        let mut a: Vec<usize> = blocks.iter().map(|b| b.as_ptr() as usize).collect();
        a.sort_unstable();
        a
    };
    let first_addresses = addresses(&first);
    let with_first = resident();
    drop(first);
    // 8 MiB kept, 16 handed back at once.
    let handed_back = with_first.saturating_sub(resident());
    assert!(
        (12 * MIB..=17 * MIB).contains(&handed_back),
        "freeing 24 MiB with 8 kept gave back {handed_back} bytes"
    );

    let (mapped, reused) = (
        WipeOnFree::mapped_block_count(),
        WipeOnFree::reused_block_count(),
    );
    let second: Vec<Vec<u8>> = (0..24).map(|_| vec![0u8; MIB]).collect();
    // The kept blocks come back wiped, the others fresh from the system: all zero, and
    // all at the addresses of the first round.
    assert!(second.iter().all(|b| b.iter().all(|x| *x == 0)));
    assert_eq!(
        addresses(&second),
        first_addresses,
        "no new addresses taken"
    );
    assert_eq!(WipeOnFree::reused_block_count(), reused + 8);
    assert_eq!(WipeOnFree::mapped_block_count(), mapped + 16);
    drop(second);

    // Another size takes new addresses; a block grown across the threshold and shrunk back
    // keeps its contents.
    let other = filled(3 * MIB);
    assert!(WipeOnFree::is_mapped_block(other.as_ptr()));
    assert!(!first_addresses.contains(&(other.as_ptr() as usize)));
    grow_into_a_mapped_block_and_back(WipeOnFree::is_mapped_block);

    // Threads share the kept blocks and the addresses handed back.
    let blocks: Vec<Vec<u8>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4).map(|_| scope.spawn(|| filled(MIB))).collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    for block in &blocks {
        assert!(WipeOnFree::is_mapped_block(block.as_ptr()));
        assert!(holds_pattern(block));
        assert!(first_addresses.contains(&(block.as_ptr() as usize)));
    }
    assert!(holds_pattern(&from_heap));
}
