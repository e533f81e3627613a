//! Keeping a function's resident memory close to its shard's size.
//!
//! Loading holds several forms of the weights in turn (decrypted chunks, the decoded
//! protobuf, tract's tensors, the optimised model's packed weights). Each form is freed as
//! soon as the next exists (see `StageEngine::load_shard`); once loaded, the free heap
//! memory of every arena goes back to the system ([`release_free_memory`]).
//!
//! Serving holds one set of activations per inference in flight. A function runs at most
//! as many inferences at once as it has cores (`StageService`), and glibc's malloc gets one
//! arena more than that ([`limit_malloc_arenas`], set before the first thread starts): by
//! default it creates up to eight per core, one per thread that allocates while the others
//! hold theirs, and each keeps the activations' freed blocks for reuse.
//!
//! An earlier version mapped every block of 256 KiB or more on its own while loading, so
//! that freeing returned it at once. On ResNet-50 (`shardseal bench`, same machine, same
//! hour) it doubled tract's load and optimisation in the function (152 + 401 ms against
//! 94 + 208 ms; a plain load in the bench process took 60 + 202 ms) for no lower peak: each
//! mapped block was faulted in page by page, wiped on free, and unmapped.
//!
//! Every freed block is still wiped first, by [`crate::WipeOnFree`] in the function
//! binaries.

/// glibc's own upper bound for its dynamic mapping threshold on 64-bit systems (32 MiB):
/// activations up to this size are reused from the heap instead of mapped per request.
const SERVING_MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// Caps malloc's arenas at `arenas` (at least 1), so that freed activation blocks are
/// shared by the threads that run inferences instead of kept per thread.
pub(crate) fn limit_malloc_arenas(arenas: usize) {
    let arenas = libc::c_int::try_from(arenas.max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only changes a malloc tuning parameter; it takes no pointer and is
    // safe to call at any time from any thread.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
}

/// Fixes the mapping threshold for serving and returns free heap memory (every arena) to
/// the system.
pub(crate) fn release_free_memory() {
    // SAFETY: as above for mallopt; malloc_trim only releases memory malloc holds free
    // (no live block is touched) and takes no pointer.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, SERVING_MMAP_THRESHOLD);
        libc::malloc_trim(0);
    }
}

/// Free heap memory a relaying process keeps for reuse before giving any back (128 MiB).
const RELAY_TRIM_THRESHOLD: libc::c_int = 128 << 20;

/// Has malloc keep the blocks this process frees for the next ones, for a process that
/// relays large messages (the coordinator): each request's buffers, up to 32 MiB, then come
/// from the heap already faulted in, instead of being mapped, faulted in page by page and
/// unmapped per request (with glibc's defaults, `perf` put a fifth of the coordinator's CPU
/// in page faults and `madvise` while it relayed ResNet-50's activations). The
/// cost is that the heap stays at its peak, which the coordinator's `--max-in-flight`
/// bounds.
pub fn keep_freed_memory_for_reuse() {
    // SAFETY: as in `limit_malloc_arenas`.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, SERVING_MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, RELAY_TRIM_THRESHOLD);
    }
}

/// This process's peak resident set size (`VmHWM` in `/proc/self/status`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_kib_field(&status, "VmHWM:")
}

fn parse_kib_field(status: &str, field: &str) -> Option<u64> {
    let value = status.lines().find_map(|line| line.strip_prefix(field))?;
    let kib: u64 = value.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_hwm_is_read_in_bytes() {
        let status = "Name:\tx\nVmPeak:\t  2000 kB\nVmHWM:\t  1234 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_kib_field(status, "VmHWM:"), Some(1234 * 1024));
        assert_eq!(parse_kib_field("Name:\tx\n", "VmHWM:"), None);
        assert!(peak_rss_bytes().is_some_and(|b| b > 0));
    }
}
