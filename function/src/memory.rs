//! Keeping a function's resident memory close to its shard's size.
//!
//! Loading holds several forms of the weights in turn (decrypted chunks, the decoded
//! protobuf, tract's tensors, the optimised model's packed weights). Each form is freed as
//! soon as the next exists (see `StageEngine::load_shard`), but glibc's malloc keeps freed
//! blocks in its heap for reuse unless they were mapped on their own, so freeing would not
//! lower the resident size. While loading, blocks of 256 KiB or more are therefore mapped
//! on their own and unmapped when freed; once loaded, the threshold goes back up (so
//! inference reuses heap blocks instead of mapping each activation) and the free heap
//! memory is returned to the system.
//!
//! Measured on a ResNet-50 stage (a 90.6 MB shard) in `shardseal demo`: peak RSS at ready
//! 139 MB with this, 205 to 227 MB without it, and no load-time difference visible above
//! the noise of a shared machine.
//!
//! Every freed block is still wiped first, by [`crate::WipeOnFree`] in the function
//! binaries: unmapping returns wiped pages.

/// Blocks at least this large get their own mapping while the shard loads.
const LOADING_MMAP_THRESHOLD: libc::c_int = 256 << 10;
/// glibc's own upper bound for its dynamic threshold on 64-bit systems (32 MiB).
const SERVING_MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// Maps large blocks on their own, so freeing them returns memory at once.
pub(crate) fn map_large_blocks_while_loading() {
    // SAFETY: mallopt only changes a malloc tuning parameter; it takes no pointer and is
    // safe to call at any time from any thread.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, LOADING_MMAP_THRESHOLD);
    }
}

/// Raises the mapping threshold back for serving and returns free heap memory (every
/// arena) to the system.
pub(crate) fn release_free_memory() {
    // SAFETY: as above for mallopt; malloc_trim only releases memory malloc holds free
    // (no live block is touched) and takes no pointer.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, SERVING_MMAP_THRESHOLD);
        libc::malloc_trim(0);
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
