//! Large blocks mapped each on its own while a shard loads (`--load-memory lean`), and
//! while a stage serves (`--serve-memory mapped`).
//!
//! tract's optimisation copies most weights once or twice (axis changes, folded
//! constants, packing) and frees each old form only when a whole pass ends. From the one
//! heap the fast load uses, those freed blocks rarely fit the next copy, so the heap grows
//! to about twice the shard before the load ends. Mapped on its own, a freed block goes
//! back to the system at once, and the peak stays near what is live.
//!
//! The blocks come from one address range reserved at start-up ([`reserve`]), whose
//! addresses serve nothing else: [`contains`] then tells the allocator, from the address
//! alone, whether a block is one of these, even after mapping stopped ([`stop`]) once the
//! shard is loaded, when a stage serves from the heap. A freed block's pages are replaced
//! by an inaccessible mapping, so the range stays this module's.
//!
//! A block released here is not wiped first: its pages leave the process at once (no core
//! dump or later read of this process reaches them), and Linux zeroes a page before it
//! gives it to any process.
//!
//! Every fresh block is faulted in page by page and zeroed by the kernel, and a load frees
//! and maps again far more than it keeps: ResNet-50's 98 MB shard mapped 809 MiB in 824
//! blocks (the store's pieces, the gathered and decrypted chunks, each form tract makes of
//! the weights). So the most recently freed blocks, up to [`KEPT_BYTES`] in all, are kept
//! mapped, wiped, for the next block of their size ([`Kept`]); replayed on that load's
//! allocations, that nearly halves the memory faulted in (809 → 432 MiB) for at most
//! [`KEPT_BYTES`] more at the peak. Kept blocks are handed back once mapping
//! stops ([`stop`]).
//!
//! Serving with blocks mapped ([`serve`]) keeps what a stage frees differently: every
//! inference asks for the same sizes (its activations and scratch), round after round,
//! so the first blocks freed are kept, up to a bound, and a block freed beyond it goes
//! back to the system instead of displacing one kept (kept most recently freed, as a load
//! keeps them, the cycle of an inference's sizes outruns the bound and nearly every block
//! is faulted in anew). Serving maps and frees far more than any reserved range holds, so
//! the addresses of a block handed back are remembered for the next block of their length
//! ([`Kept::idle`]) instead of taken afresh from the range.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Blocks of at least this size are mapped while mapping is on. Smaller ones (names,
/// shapes, small tensors) stay on the heap, where mapping would cost a page each.
const LARGE_BLOCK: usize = 256 << 10;

/// Address space reserved for mapped blocks (64 GiB, none of it memory until used).
/// Once used up, large blocks come from the heap again.
pub(crate) const RESERVED_BYTES: usize = 64 << 30;

static BASE: AtomicUsize = AtomicUsize::new(0);
static END: AtomicUsize = AtomicUsize::new(0);
static NEXT: AtomicUsize = AtomicUsize::new(0);
static PAGE: AtomicUsize = AtomicUsize::new(4096);
static MAPPING: AtomicBool = AtomicBool::new(false);
static MAPPED: AtomicUsize = AtomicUsize::new(0);
static REUSED: AtomicUsize = AtomicUsize::new(0);

/// Freed blocks kept for reuse while a shard loads, in all at most this many bytes
/// (16 MiB: within the 64 MiB a stage's memory target allows beyond its shard).
pub(crate) const KEPT_BYTES: usize = 16 << 20;

/// The bound on kept blocks in effect: [`KEPT_BYTES`] while loading, [`serve`]'s while
/// serving.
static KEPT_LIMIT: AtomicUsize = AtomicUsize::new(KEPT_BYTES);

/// Whether the stage serves with blocks mapped ([`serve`]): kept blocks stay until reused,
/// and handed-back addresses are reused.
static SERVING: AtomicBool = AtomicBool::new(false);

/// Room for this many kept blocks, and as many idle ranges (the smallest mapped block is
/// 256 KiB, so 256 hold 64 MiB of them).
const KEPT_SLOTS: usize = 256;

static KEPT: Mutex<Kept> = Mutex::new(Kept::new());

/// Freed blocks kept mapped and wiped, and, while serving, the addresses of blocks handed
/// back, each oldest first. Plain arrays under a lock: the allocator calls in here, so
/// nothing in it may allocate.
struct Kept {
    blocks: Ranges,
    bytes: usize,
    /// Ranges whose pages went back to the system (inaccessible, still this module's),
    /// for the next block of their length to be mapped at.
    idle: Ranges,
}

/// Up to [`KEPT_SLOTS`] (address, length) pairs, oldest first.
struct Ranges {
    ranges: [(usize, usize); KEPT_SLOTS],
    count: usize,
}

impl Ranges {
    const fn new() -> Self {
        Self {
            ranges: [(0, 0); KEPT_SLOTS],
            count: 0,
        }
    }

    fn is_full(&self) -> bool {
        self.count == KEPT_SLOTS
    }

    /// Takes the most recent range of exactly `len` bytes. (Exactly: a block is freed with
    /// its caller's size, so a larger one would be freed short of its end.)
    fn take(&mut self, len: usize) -> Option<usize> {
        let index = self.ranges[..self.count]
            .iter()
            .rposition(|&(_, held)| held == len)?;
        Some(self.remove(index).0)
    }

    fn remove(&mut self, index: usize) -> (usize, usize) {
        let range = self.ranges[index];
        self.ranges.copy_within(index + 1..self.count, index);
        self.count -= 1;
        range
    }

    /// Adds a range; the caller made room.
    fn push(&mut self, addr: usize, len: usize) {
        self.ranges[self.count] = (addr, len);
        self.count += 1;
    }
}

impl Kept {
    const fn new() -> Self {
        Self {
            blocks: Ranges::new(),
            bytes: 0,
            idle: Ranges::new(),
        }
    }

    /// Takes the most recently kept block of exactly `len` bytes.
    fn take(&mut self, len: usize) -> Option<usize> {
        let addr = self.blocks.take(len)?;
        self.bytes -= len;
        Some(addr)
    }

    fn remove_oldest(&mut self) -> (usize, usize) {
        let block = self.blocks.remove(0);
        self.bytes -= block.1;
        block
    }

    /// Whether a block of `len` bytes fits beside those kept.
    fn has_room(&self, len: usize) -> bool {
        !self.blocks.is_full() && self.bytes + len <= KEPT_LIMIT.load(Ordering::Relaxed)
    }

    /// Whether [`Kept::keep`] would keep a block of `len` bytes: while a shard loads,
    /// always; while serving, if it fits.
    fn may_keep(&self, len: usize) -> bool {
        !SERVING.load(Ordering::Relaxed) || self.has_room(len)
    }

    /// Keeps a block if it may ([`Kept::may_keep`]), giving the oldest back to the system
    /// while there is no room for it (which happens only while a shard loads).
    fn keep(&mut self, addr: usize, len: usize) -> bool {
        if !self.may_keep(len) {
            return false;
        }
        while !self.has_room(len) {
            let (old, old_len) = self.remove_oldest();
            unmap(old, old_len);
        }
        self.blocks.push(addr, len);
        self.bytes += len;
        true
    }

    /// Remembers the addresses of a block handed back, forgetting the oldest if there is
    /// no room (its addresses then stay unused).
    fn idle(&mut self, addr: usize, len: usize) {
        if self.idle.is_full() {
            self.idle.remove(0);
        }
        self.idle.push(addr, len);
    }

    /// Gives every kept block back to the system.
    fn clear(&mut self) {
        while self.blocks.count > 0 {
            let (addr, len) = self.remove_oldest();
            unmap(addr, len);
        }
    }
}

/// The kept blocks, even if a thread panicked while holding them (nothing in [`Kept`]
/// panics between two consistent states).
fn kept() -> std::sync::MutexGuard<'static, Kept> {
    KEPT.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reserves `bytes` of address space and starts mapping large blocks in it. Once per
/// process; a second call fails.
pub(crate) fn reserve(bytes: usize) -> std::io::Result<()> {
    if BASE.load(Ordering::Acquire) != 0 {
        return Err(std::io::Error::other("the block range is already reserved"));
    }
    // SAFETY: sysconf reads a constant of the system.
    #[allow(unsafe_code)]
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096);
    let bytes = bytes.next_multiple_of(page);
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing: it touches
    // no memory of this process. PROT_NONE and MAP_NORESERVE make it address space only.
    #[allow(unsafe_code)]
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let base = base as usize;
    PAGE.store(page, Ordering::Relaxed);
    NEXT.store(base, Ordering::Relaxed);
    END.store(base + bytes, Ordering::Relaxed);
    BASE.store(base, Ordering::Release);
    MAPPING.store(true, Ordering::Release);
    Ok(())
}

/// Stops mapping new blocks and gives the kept ones back; the blocks in use stay until
/// freed. A stage that served with blocks mapped stops serving so: the ranges handed back
/// are forgotten (they stay inaccessible, as nothing maps any more), and so are those of
/// the blocks freed from now on.
pub(crate) fn stop() {
    MAPPING.store(false, Ordering::Release);
    SERVING.store(false, Ordering::Relaxed);
    let mut kept = kept();
    kept.clear();
    kept.idle.count = 0;
}

/// Serves with large blocks mapped from now on (reserving the range first if no lean
/// load did): the blocks kept from the load go back to the system (a stage's inferences
/// ask for other sizes), then the first blocks freed are kept, wiped, up to `kept_bytes`
/// in all, each until a block of its length is asked for, and the addresses of those
/// handed back beyond it are reused. Fails, mapping nothing, if the range cannot be
/// reserved.
pub(crate) fn serve(kept_bytes: usize) -> std::io::Result<()> {
    if BASE.load(Ordering::Acquire) == 0 {
        reserve(RESERVED_BYTES)?;
    }
    let mut kept = kept();
    kept.clear();
    KEPT_LIMIT.store(kept_bytes, Ordering::Relaxed);
    SERVING.store(true, Ordering::Relaxed);
    MAPPING.store(true, Ordering::Release);
    Ok(())
}

/// Whether a new block of `size` bytes would be mapped (alignment aside): mapping is on
/// and the block is large.
pub(crate) fn maps(size: usize) -> bool {
    MAPPING.load(Ordering::Acquire) && size >= LARGE_BLOCK
}

/// Whether `ptr` lies in the reserved range (so was mapped here).
pub(crate) fn contains(ptr: *const u8) -> bool {
    let addr = ptr as usize;
    let base = BASE.load(Ordering::Acquire);
    base != 0 && addr >= base && addr < END.load(Ordering::Relaxed)
}

/// Maps a fresh, zeroed block of `size` bytes aligned to `align`, or `None` if mapping is
/// off, the block is small, the alignment exceeds a page, the range is used up, or the
/// system refuses: the caller then takes the block from the heap.
pub(crate) fn map(size: usize, align: usize) -> Option<*mut u8> {
    let page = PAGE.load(Ordering::Relaxed);
    if !maps(size) || align > page {
        return None;
    }
    let len = size.checked_next_multiple_of(page)?;
    let idle = {
        let mut kept = kept();
        if let Some(block) = kept.take(len) {
            REUSED.fetch_add(1, Ordering::Relaxed);
            return Some(block as *mut u8);
        }
        kept.idle.take(len)
    };
    let start = match idle {
        Some(start) => start,
        None => {
            let start = NEXT.fetch_add(len, Ordering::Relaxed);
            let end = END.load(Ordering::Relaxed);
            if start.checked_add(len).is_none_or(|stop| stop > end) {
                // Used up: every later large block comes from the heap, and the kept ones,
                // which only `map` could hand out again, go back now.
                stop();
                return None;
            }
            start
        }
    };
    // SAFETY: [start, start + len) lies in the range reserved above, and `fetch_add` or
    // the idle ranges (each a block handed back, taken out under the lock) gave it to this
    // call alone, so MAP_FIXED replaces only this module's inaccessible pages.
    #[allow(unsafe_code)]
    let block = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if block == libc::MAP_FAILED {
        return None;
    }
    MAPPED.fetch_add(1, Ordering::Relaxed);
    Some(block.cast())
}

/// How many blocks [`map`] has mapped fresh so far.
pub(crate) fn mapped_count() -> usize {
    MAPPED.load(Ordering::Relaxed)
}

/// How many blocks [`map`] has handed out again from the kept ones so far.
pub(crate) fn reused_count() -> usize {
    REUSED.load(Ordering::Relaxed)
}

/// Frees a block mapped by [`map`]: while mapping is on, keeps it, wiped, for a later
/// block of its size if [`Kept`] may; otherwise gives it back to the system, keeping its
/// addresses reserved (and, while serving, for the next block of its length).
///
/// # Safety
/// `ptr` came from [`map`] with this `size`, and nothing uses the block any more.
#[allow(unsafe_code)]
pub(crate) unsafe fn release(ptr: *mut u8, size: usize) {
    let page = PAGE.load(Ordering::Relaxed);
    let len = size.next_multiple_of(page);
    // Asked first, so that a block serving cannot keep goes back without a wipe it does
    // not need (its pages leave the process).
    if MAPPING.load(Ordering::Acquire)
        && len <= KEPT_LIMIT.load(Ordering::Relaxed)
        && kept().may_keep(len)
    {
        // SAFETY: the caller's block of `size` bytes, no longer used. Past `size` it is
        // still zero: fresh from the kernel, or wiped whole before it was kept.
        unsafe { std::ptr::write_bytes(ptr, 0, size) };
        std::hint::black_box(ptr);
        let mut kept = kept();
        // Checked again under the lock: `stop` clears the kept blocks after it turns
        // mapping off, so none is kept after that.
        if MAPPING.load(Ordering::Acquire) && kept.keep(ptr as usize, len) {
            return;
        }
    }
    unmap(ptr as usize, len);
    // Offered for reuse only once inaccessible: `map` maps whatever it takes afresh.
    if SERVING.load(Ordering::Relaxed) {
        kept().idle(ptr as usize, len);
    }
}

/// Replaces a block's pages with an inaccessible mapping that holds no memory, so they
/// leave the process and the addresses stay this module's.
fn unmap(addr: usize, len: usize) {
    // SAFETY: a page-aligned block `map` gave out, which nothing uses any more; MAP_FIXED
    // swaps its pages for an inaccessible mapping that holds no memory.
    #[allow(unsafe_code)]
    unsafe {
        let replaced = libc::mmap(
            addr as *mut libc::c_void,
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        );
        if replaced == libc::MAP_FAILED {
            // Still drop the pages; the range stays mapped (and this module's) either way.
            libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    /// The unit tests' allocator is `System`, so only this test's direct calls map blocks.
    #[test]
    #[allow(unsafe_code)]
    fn freed_blocks_are_kept_wiped_for_their_size_up_to_the_bound_until_stop() {
        reserve(RESERVED_BYTES).unwrap();
        let bytes = |block: *mut u8, len: usize| {
            // SAFETY: a mapped block of at least `len` bytes, read while no one else has it.
            unsafe { std::slice::from_raw_parts(block, len).to_vec() }
        };

        // Freed, wiped, and handed out again for the next block of its size.
        let first = map(MIB, 8).unwrap();
        // SAFETY: the block is ours and `MIB` bytes long.
        unsafe { std::ptr::write_bytes(first, 0xab, MIB) };
        // SAFETY: from `map` with this size, no longer used.
        unsafe { release(first, MIB) };
        let (mapped, reused) = (mapped_count(), reused_count());
        let again = map(MIB - 100, 8).unwrap();
        assert_eq!(again, first, "a block of the same pages is reused");
        assert!(bytes(again, MIB).iter().all(|b| *b == 0), "wiped when kept");
        assert_eq!((mapped_count(), reused_count()), (mapped, reused + 1));

        // Another size is mapped fresh.
        let other = map(2 * MIB, 8).unwrap();
        assert_ne!(other, first);
        assert_eq!(mapped_count(), mapped + 1);

        // Only the most recently freed blocks are kept, at most KEPT_BYTES of them.
        let blocks: Vec<*mut u8> = (0..KEPT_BYTES / MIB + 8)
            .map(|_| map(MIB, 8).unwrap())
            .collect();
        release_all(&blocks);
        {
            let kept = kept();
            assert_eq!(kept.bytes, KEPT_BYTES);
            let newest: Vec<usize> = blocks[8..].iter().map(|&b| b as usize).collect();
            let held: Vec<usize> = kept.blocks.ranges[..kept.blocks.count]
                .iter()
                .map(|b| b.0)
                .collect();
            assert_eq!(held, newest, "the oldest were handed back");
        }

        // Stopping hands every kept block back; later frees are not kept.
        stop();
        assert_eq!(kept().blocks.count, 0);
        // SAFETY: from `map` with these sizes, no longer used.
        unsafe {
            release(again, MIB - 100);
            release(other, 2 * MIB);
        }
        let held = kept();
        assert_eq!((held.blocks.count, held.bytes, held.idle.count), (0, 0, 0));
        drop(held);
        assert!(map(MIB, 8).is_none(), "mapping is off");

        // Serving: the first blocks freed are kept up to the bound, the rest handed back
        // with their addresses remembered, and both handed out again for their length.
        serve(4 * MIB).unwrap();
        let blocks: Vec<*mut u8> = (0..6).map(|_| map(MIB, 8).unwrap()).collect();
        for &block in &blocks {
            // SAFETY: the block is ours and `MIB` bytes long.
            unsafe { std::ptr::write_bytes(block, 0xcd, MIB) };
        }
        release_all(&blocks);
        let addrs = |ranges: &Ranges| -> Vec<usize> {
            ranges.ranges[..ranges.count].iter().map(|r| r.0).collect()
        };
        let as_addrs =
            |blocks: &[*mut u8]| -> Vec<usize> { blocks.iter().map(|&b| b as usize).collect() };
        {
            let kept = kept();
            assert_eq!(
                addrs(&kept.blocks),
                as_addrs(&blocks[..4]),
                "the first kept"
            );
            assert_eq!(kept.bytes, 4 * MIB);
            assert_eq!(addrs(&kept.idle), as_addrs(&blocks[4..]), "the rest idle");
        }
        let (mapped, reused) = (mapped_count(), reused_count());
        let again: Vec<*mut u8> = (0..6).map(|_| map(MIB, 8).unwrap()).collect();
        let mut sorted = as_addrs(&again);
        sorted.sort_unstable();
        let mut expected = as_addrs(&blocks);
        expected.sort_unstable();
        assert_eq!(sorted, expected, "no new addresses taken");
        assert_eq!((mapped_count(), reused_count()), (mapped + 2, reused + 4));
        for &block in &again {
            assert!(
                bytes(block, MIB).iter().all(|b| *b == 0),
                "kept wiped, idle fresh"
            );
        }
        {
            let kept = kept();
            assert_eq!((kept.blocks.count, kept.bytes, kept.idle.count), (0, 0, 0));
        }

        // Stopping while serving: the kept blocks go back, the remembered ranges are
        // forgotten, and blocks freed later are neither kept nor remembered.
        release_all(&again[..5]);
        {
            let kept = kept();
            assert_eq!((kept.blocks.count, kept.idle.count), (4, 1));
        }
        stop();
        {
            let kept = kept();
            assert_eq!((kept.blocks.count, kept.idle.count), (0, 0), "at the stop");
        }
        release_all(&again[5..]);
        let kept = kept();
        assert_eq!((kept.blocks.count, kept.idle.count), (0, 0), "after it");
    }

    /// Releases blocks `map` gave for `MIB` bytes, no longer used.
    #[allow(unsafe_code)]
    fn release_all(blocks: &[*mut u8]) {
        for &block in blocks {
            // SAFETY: each from `map` with this size, no longer used.
            unsafe { release(block, MIB) };
        }
    }
}
