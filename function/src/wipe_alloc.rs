//! A global allocator that wipes every block before it is returned to the system.
//!
//! Decrypted weights live inside tract's own tensors and activations pass through many
//! intermediate buffers that no `Zeroizing` wrapper can reach. Wiping at the allocator
//! catches all of them: nothing freed by this process keeps plaintext.
//!
//! The cost is one `memset` per freed byte (and a copy on `realloc`, which may no longer
//! grow in place): 2.2 % of a ResNet-50 stage's CPU under load (`perf`, BENCHMARKS.md).
//!
//! A function that loads with `--load-memory lean` maps large blocks each on its own while
//! it loads (`mapped_blocks`); freeing one hands its pages back to the system, or keeps it,
//! wiped, among the few most recently freed for reuse. One that serves with
//! `--serve-memory mapped` does so while it serves, keeping the first freed instead.
//!
//! One executable serves every role, so a process whose memory holds no secret of anyone's
//! turns wiping off for itself ([`WipeOnFree::stop_in_this_process`]): the coordinator
//! does, and so relays sealed activations without a memset and a copy per buffer.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::mapped_blocks;

/// [`System`], wiping each block on free.
pub struct WipeOnFree;

/// Whether this process wipes what it frees: yes, unless it said otherwise.
static WIPING: AtomicBool = AtomicBool::new(true);

thread_local! {
    /// Set while [`WipeOnFree::free_unwiped`] drops a value on this thread. A const-
    /// initialised `Cell<bool>` needs no allocation and no destructor, so the allocator
    /// may read it.
    static SKIP_WIPE: Cell<bool> = const { Cell::new(false) };
}

impl WipeOnFree {
    /// Drops `value` without wiping the memory it frees. Only for values that never held
    /// a secret (ciphertext as it arrives from the store) or that wiped themselves on drop
    /// (a `SecretBytes`): wiping them again costs a memset per byte for nothing.
    pub fn free_unwiped<T>(value: T) {
        struct Restore;
        impl Drop for Restore {
            fn drop(&mut self) {
                SKIP_WIPE.with(|skip| skip.set(false));
            }
        }
        SKIP_WIPE.with(|skip| skip.set(true));
        let _restore = Restore;
        drop(value);
    }

    /// Stops wiping freed memory for the rest of this process's life, and lets `realloc`
    /// grow blocks in place again.
    ///
    /// Only for a process that never holds a key or a plaintext of anyone's: the
    /// coordinator, which routes activations sealed to the stages and sees only what it
    /// also logs (model, request id, sizes). Its memory is the platform's to read in
    /// ShardSeal's threat model, so wiping it would hide nothing; what its TLS handshakes
    /// derive, rustls wipes itself.
    pub fn stop_in_this_process() {
        WIPING.store(false, Ordering::Relaxed);
    }

    /// Maps each block of 256 KiB or more on its own from now on, so that freeing it hands
    /// its pages straight back to the system (a function's `--load-memory lean`, while it
    /// loads). Fails if the address range for them cannot be reserved, or was already.
    pub fn map_large_blocks() -> std::io::Result<()> {
        mapped_blocks::reserve(mapped_blocks::RESERVED_BYTES)
    }

    /// Maps each block of 256 KiB or more on its own from now on while a stage serves (a
    /// function's `--serve-memory mapped`), reserving the address range first unless a
    /// lean load did: the first freed, up to `kept_bytes`, are kept wiped for the next
    /// block of their size, the rest handed back to the system. Fails, mapping nothing,
    /// if the range cannot be reserved.
    pub fn serve_large_blocks_mapped(kept_bytes: usize) -> std::io::Result<()> {
        mapped_blocks::serve(kept_bytes)
    }

    /// Takes large blocks from the heap again and hands back the freed ones kept for
    /// reuse; those still in use are released when freed.
    pub fn stop_mapping_large_blocks() {
        mapped_blocks::stop();
    }

    /// How many blocks [`WipeOnFree::map_large_blocks`] has had mapped fresh so far.
    pub fn mapped_block_count() -> usize {
        mapped_blocks::mapped_count()
    }

    /// How many large blocks were handed out again, wiped, from those freed while mapping
    /// was on, instead of mapped fresh.
    pub fn reused_block_count() -> usize {
        mapped_blocks::reused_count()
    }

    /// Whether `ptr` points into a block mapped by [`WipeOnFree::map_large_blocks`].
    pub fn is_mapped_block(ptr: *const u8) -> bool {
        mapped_blocks::contains(ptr)
    }

    fn wiping() -> bool {
        WIPING.load(Ordering::Relaxed) && !SKIP_WIPE.try_with(Cell::get).unwrap_or(false)
    }
}

// SAFETY: every method forwards to `System` with the caller's layout, as the `GlobalAlloc`
// contract requires, or, for a large block while a lean load maps them, to
// `mapped_blocks` (zeroed pages of at least the size, fresh or wiped, aligned to a page,
// which is at least the layout's alignment; freed there by address). The only other
// addition is writing zeros over memory the caller owns and is giving back, before it is
// freed.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for WipeOnFree {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if let Some(block) = mapped_blocks::map(layout.size(), layout.align()) {
            return block;
        }
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // Mapped blocks are zero: fresh pages, or wiped when kept.
        if let Some(block) = mapped_blocks::map(layout.size(), layout.align()) {
            return block;
        }
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if mapped_blocks::contains(ptr) {
            // SAFETY: a block `map` gave out with this size, now the allocator's again.
            // `release` wipes it if it keeps it; otherwise its pages leave the process.
            unsafe { mapped_blocks::release(ptr, layout.size()) };
            return;
        }
        // SAFETY: `ptr` is a live block of `layout.size()` bytes owned by the caller.
        unsafe {
            if Self::wiping() {
                std::ptr::write_bytes(ptr, 0, layout.size());
                // The pointer escapes, so the compiler cannot drop the stores as dead.
                std::hint::black_box(ptr);
            }
            System.dealloc(ptr, layout);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let mapped = mapped_blocks::contains(ptr) || mapped_blocks::maps(new_size);
        if !mapped && !Self::wiping() {
            // SAFETY: forwarded unchanged; the block came from `System`.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // A block this process wipes, or one moving to or from a mapped block: copied into a
        // new block (`alloc` chooses the side), the old one then wiped or released by
        // `dealloc`.
        // SAFETY: the new layout is valid (same alignment, size checked by the caller per
        // the `realloc` contract); the old block is copied, then freed.
        unsafe {
            let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}
