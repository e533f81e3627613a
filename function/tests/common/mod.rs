//! What the allocator tests share: blocks filled with a pattern that shows any byte moved
//! or lost, and this process's resident memory.

pub const MIB: usize = 1 << 20;

pub fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

pub fn filled(len: usize) -> Vec<u8> {
    (0..len).map(pattern).collect()
}

pub fn holds_pattern(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().all(|(i, b)| *b == pattern(i))
}

/// This process's resident memory (`VmRSS`), in bytes.
pub fn resident() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// Grows a block from the heap into a mapped one and shrinks it back, checking that it
/// moved each way and kept its contents.
pub fn grow_into_a_mapped_block_and_back(is_mapped: fn(*const u8) -> bool) {
    let mut grown = filled(1000);
    while grown.len() < 4 * MIB {
        let n = grown.len();
        grown.extend((n..2 * n).map(pattern));
    }
    assert!(is_mapped(grown.as_ptr()));
    assert!(holds_pattern(&grown));
    grown.truncate(100);
    grown.shrink_to_fit();
    assert!(!is_mapped(grown.as_ptr()));
    assert!(holds_pattern(&grown));
}
