//! Large blocks mapped each on its own while a shard loads, for `--load-memory lean`.
//!
//! tract's optimisation copies most weights once or twice (axis changes, folded
//! constants, packing) and frees each old form only when a whole pass ends. From the one
//! heap the fast load uses, those freed blocks rarely fit the next copy, so the heap grows
//! to about twice the shard before the load ends. Mapped on its own, a freed block goes
//! back to the system at once, and the peak stays near what is live.
//!
//! The blocks come from one address range reserved at start-up ([`reserve`]), never
//! reused: [`contains`] then tells the allocator, from the address alone, whether a block
//! is one of these, even after mapping stopped ([`stop`]) once the shard is loaded (while
//! serving, mapping each activation anew would fault it in on every request). A freed
//! block's pages are replaced by an inaccessible mapping, so the range stays this module's.
//!
//! A block released here is not wiped first: its pages leave the process at once (no core
//! dump or later read of this process reaches them), and Linux zeroes a page before it
//! gives it to any process.

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

/// Stops mapping new blocks; the blocks mapped so far stay until freed.
pub(crate) fn stop() {
    MAPPING.store(false, Ordering::Release);
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
    let start = NEXT.fetch_add(len, Ordering::Relaxed);
    let end = END.load(Ordering::Relaxed);
    if start.checked_add(len).is_none_or(|stop| stop > end) {
        // Used up: every later large block comes from the heap.
        stop();
        return None;
    }
    // SAFETY: [start, start + len) lies in the range reserved above, and `fetch_add` gave
    // it to this call alone, so MAP_FIXED replaces only this module's inaccessible pages.
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

/// How many blocks [`map`] has mapped so far.
pub(crate) fn mapped_count() -> usize {
    MAPPED.load(Ordering::Relaxed)
}

/// Gives a block mapped by [`map`] back to the system, keeping its addresses reserved.
///
/// # Safety
/// `ptr` came from [`map`] with this `size`, and nothing uses the block any more.
#[allow(unsafe_code)]
pub(crate) unsafe fn release(ptr: *mut u8, size: usize) {
    let page = PAGE.load(Ordering::Relaxed);
    let len = size.next_multiple_of(page);
    // SAFETY: the caller's block, page-aligned by `map`; MAP_FIXED swaps its pages for an
    // inaccessible mapping that holds no memory.
    #[allow(unsafe_code)]
    unsafe {
        let replaced = libc::mmap(
            ptr.cast(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        );
        if replaced == libc::MAP_FAILED {
            // Still drop the pages; the range stays mapped (and this module's) either way.
            libc::madvise(ptr.cast(), len, libc::MADV_DONTNEED);
        }
    }
}
