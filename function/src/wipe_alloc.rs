//! A global allocator that wipes every block before it is returned to the system.
//!
//! Decrypted weights live inside tract's own tensors and activations pass through many
//! intermediate buffers that no `Zeroizing` wrapper can reach. Wiping at the allocator
//! catches all of them: nothing freed by this process keeps plaintext.
//!
//! The cost is one `memset` per freed byte (and a copy on `realloc`, which may no longer
//! grow in place); `cargo run --release -p shardseal-function --example wipe_cost` prints
//! it for this machine.

use std::alloc::{GlobalAlloc, Layout, System};

/// [`System`], wiping each block on free.
pub struct WipeOnFree;

// SAFETY: every method forwards to `System` with the caller's layout, as the `GlobalAlloc`
// contract requires; the only addition is writing zeros over memory the caller owns and
// is giving back, before it is freed.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for WipeOnFree {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` is a live block of `layout.size()` bytes owned by the caller.
        unsafe {
            std::ptr::write_bytes(ptr, 0, layout.size());
            // The pointer escapes, so the compiler cannot drop the stores as dead.
            std::hint::black_box(ptr);
            System.dealloc(ptr, layout);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the new layout is valid (same alignment, size checked by the caller per
        // the `realloc` contract); the old block is copied, then wiped and freed.
        unsafe {
            let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
            let new = System.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}
