//! Keeping a function's resident memory close to its shard's size, and its cold start short.
//!
//! Loading holds several forms of the weights in turn (decrypted chunks, tract's tensors,
//! the optimised model's packed weights). Each form is freed as soon as the next exists
//! (see `StageEngine::load_shard`), and every page a fresh process touches for the first
//! time costs a page fault (decoding ResNet-50's 98 MB into new memory took 58 ms in a
//! fresh process, most of it faults, where the same copy into used memory is a few
//! milliseconds). So while
//! it loads, a function keeps the memory it frees in one heap for the next form to reuse
//! ([`prepare_malloc`]): one malloc arena for every thread (the chunks are gathered on the
//! async runtime, the shard is loaded on a blocking thread; with an arena per thread the
//! chunks' memory went back to the one the loader does not use), blocks of up to 32 MiB
//! from the heap instead of mapped on their own (a freed mapping is gone), and no trimming
//! until the shard is loaded. Once loaded, the free memory goes back to the system
//! ([`release_free_memory`]).
//!
//! Measured on ResNet-50 (`shardseal bench --stages N`, this and the previous build side
//! by side, two rounds each): spawn to ready of the whole model 385–411 → 305–323 ms
//! (load 62–65 → 25 ms), of the large stage of 2 323–332 → 260–269 ms, of the largest of 4
//! 264–295 → 202–211 ms; the 8-stage cut's middle stages 1.06–1.31 → 0.87–1.06 of a
//! fresh-process plain load. Peak memory: the whole model 256–265 → 226–244 MiB, the first
//! stage of 2 167–181 → 108–120 MiB, but the large stage of 2 177–185 → 204–210 MiB (its
//! heap now grows to the load's largest extent before it is trimmed).
//!
//! Serving holds one set of activations per inference in flight (at most one per core,
//! `StageService`). By default (`--serve-memory mapped`, [`ServeMemory::Mapped`]) each
//! block of 256 KiB or more is mapped on its own while serving too; the first of them
//! freed, up to 80 MiB ([`SERVING_KEPT_BYTES`]), are kept, wiped, for the next block of
//! their size, and the rest handed back: a stage asks for the same sizes every request,
//! and the peak stays near the live tensors plus that bound. `--serve-memory heap`
//! ([`ServeMemory::Heap`]) draws them from the one arena instead, which keeps freed blocks
//! up to 64 MiB at the top of the heap (the trim threshold glibc itself moves to when its
//! mapping threshold reaches 32 MiB);
//! two inferences at once interleave their blocks there, and the heap grows far beyond
//! what they hold live, by an amount that varies from run to run (ResNet-50: the whole
//! model 43 to 102 MiB over its loaded size, the first stage of 2 71 to 151). Measured
//! side by side in BENCHMARKS.md ("Serving with large blocks mapped").
//!
//! The one heap is what the fast load costs in memory: tract's optimisation copies most
//! weights (axis changes, folded constants, packing) and frees the old forms only as each
//! pass ends, and the blocks it frees rarely fit its next copies, so the heap peaks near
//! twice the shard. `--load-memory lean` ([`LoadMemory::Lean`]) maps each block of 256 KiB
//! or more on its own while the shard loads, and hands its pages back soon after it is
//! freed (`mapped_blocks` keeps the last 16 MiB freed for reuse): the peak stays near what
//! is live, and every block not reused is faulted in page by page, so the cold start is
//! longer. Serving is the same in both (mapping stops once the shard is loaded). By
//! default (`--load-memory auto`) a function loads lean when its shard is large enough for
//! the fast load's peak to matter ([`LEAN_FROM_BYTES`]) and fast otherwise. Measured side
//! by side on ResNet-50 in BENCHMARKS.md ("Loading lean").
//!
//! Every freed block is still wiped first, by [`crate::WipeOnFree`] in the function
//! binaries, but for the blocks a lean load hands back to the system (their pages leave
//! the process; see `mapped_blocks`).

/// glibc's own upper bound for its dynamic mapping threshold on 64-bit systems (32 MiB):
/// blocks up to this size come from the heap instead of being mapped each on its own.
const HEAP_BLOCK_LIMIT: libc::c_int = 32 << 20;

/// Free memory at the top of the heap kept while a shard loads: all of it (1 GiB).
const LOADING_TRIM_THRESHOLD: libc::c_int = 1 << 30;

/// Free memory at the top of the heap kept while serving (64 MiB): twice the mapping
/// threshold, as glibc sets it when it raises the threshold itself.
const SERVING_TRIM_THRESHOLD: libc::c_int = 2 * HEAP_BLOCK_LIMIT;

fn mallopt(param: libc::c_int, value: libc::c_int) {
    // SAFETY: mallopt only changes a malloc tuning parameter; it takes no pointer and is
    // safe to call at any time from any thread.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(param, value);
    }
}

/// How a function spends memory while it loads its shard (`--load-memory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LoadMemory {
    /// [`LoadMemory::Lean`] for a shard of [`LEAN_FROM_BYTES`] or more (by the size the
    /// signed manifest gives), [`LoadMemory::Fast`] for a smaller one.
    #[default]
    Auto,
    /// Freed blocks stay in one heap for the next form of the weights to reuse: the
    /// shortest cold start, a peak near twice the shard.
    Fast,
    /// Large blocks mapped each on its own and handed back when freed (but for the last
    /// few, kept for reuse): a peak near the live weights, a longer cold start (blocks
    /// not reused are faulted in anew).
    Lean,
}

/// Shows the name `--load-memory` takes, as logged.
impl std::fmt::Display for LoadMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write_value_name(self, f)
    }
}

/// The shard size from which `--load-memory auto` loads lean (32 MiB of plaintext).
///
/// A fast load peaks near twice the shard plus 30 to 40 MiB (ResNet-50's stages), which
/// passes ShardSeal's memory target of 1.5 × shard + 64 MiB from about 55 MiB up. A lean
/// load stays within it, and on large shards costs no cold start (86 and 98 MB shards: 0.87
/// to 0.96 of a plain tract load in a fresh process), but on small ones its mapping weighs
/// more than it saves (1.2 to 1.5 of a fresh plain load for shards of 1 to 11 MiB, where
/// the fast load peaks well within the target). Measured in BENCHMARKS.md ("Loading lean").
pub const LEAN_FROM_BYTES: u64 = 32 << 20;

/// Sets malloc up for loading a shard: one arena, blocks up to 32 MiB from the heap, no
/// trimming; for a lean load, large blocks mapped on their own (see [`start_lean`]).
/// Returns the mode in effect, or `Auto` still to be decided by [`decide`] once the
/// shard's size is known. Call before any other thread exists (arenas are made as threads
/// first allocate).
pub(crate) fn prepare_malloc(mode: LoadMemory) -> LoadMemory {
    mallopt(libc::M_ARENA_MAX, 1);
    mallopt(libc::M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT);
    mallopt(libc::M_TRIM_THRESHOLD, LOADING_TRIM_THRESHOLD);
    match mode {
        LoadMemory::Lean => start_lean(),
        other => other,
    }
}

/// The mode a shard of `shard_bytes` loads in: `Auto` decided by the size (and lean
/// started if so, see [`start_lean`]), the others as they are.
pub(crate) fn decide(mode: LoadMemory, shard_bytes: u64) -> LoadMemory {
    match (mode, choose(mode, shard_bytes)) {
        (LoadMemory::Auto, LoadMemory::Lean) => start_lean(),
        (_, chosen) => chosen,
    }
}

/// [`decide`]'s choice, without starting anything.
fn choose(mode: LoadMemory, shard_bytes: u64) -> LoadMemory {
    match mode {
        LoadMemory::Auto if shard_bytes >= LEAN_FROM_BYTES => LoadMemory::Lean,
        LoadMemory::Auto => LoadMemory::Fast,
        other => other,
    }
}

/// Starts mapping large blocks on their own. If the address range for them cannot be
/// reserved (under `ulimit -v`, say), says so and returns `Fast`: the load goes on fast.
fn start_lean() -> LoadMemory {
    match crate::WipeOnFree::map_large_blocks() {
        Ok(()) => LoadMemory::Lean,
        Err(error) => {
            tracing::warn!(%error, "cannot reserve address space for a lean load; loading fast");
            LoadMemory::Fast
        }
    }
}

/// How a function spends memory on its inferences (`--serve-memory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ServeMemory {
    /// Blocks of 256 KiB or more mapped each on its own, the first [`SERVING_KEPT_BYTES`]
    /// of them freed kept for reuse, the rest handed back: a peak near the live tensors
    /// plus that bound.
    #[default]
    Mapped,
    /// Activations come from the one heap, which keeps what they free for reuse: a peak
    /// well above the live tensors when inferences overlap, varying from run to run.
    Heap,
}

/// Shows the name `--serve-memory` takes, as logged.
impl std::fmt::Display for ServeMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write_value_name(self, f)
    }
}

/// Writes the name clap gives `value` on the command line, so logs and flags agree.
fn write_value_name(
    value: &impl clap::ValueEnum,
    f: &mut std::fmt::Formatter<'_>,
) -> std::fmt::Result {
    match value.to_possible_value() {
        Some(name) => f.write_str(name.get_name()),
        None => Ok(()),
    }
}

/// Freed blocks a stage serving with blocks mapped keeps for reuse (80 MiB). Measured on
/// ResNet-50 in one stage, two inferences at a time: kept up to 48 MiB, the function spent
/// 6 % more CPU per request than serving from the heap (blocks faulted in anew), up to
/// 64 MiB 2.5 % more, up to 80 MiB none; its peak was 28, 33 to 38 and 38 to 40 MiB over
/// the loaded model (against 43 to 102 from the heap).
pub const SERVING_KEPT_BYTES: usize = 80 << 20;

/// Once the shard is loaded: sets up serving as `serve` says (large blocks from the heap,
/// or mapped on their own), returns the free heap memory to the system and sets the trim
/// threshold for serving. Returns the mode in effect: `Heap` if the address range for
/// mapped blocks cannot be reserved (under `ulimit -v`, say), which it logs.
pub(crate) fn release_free_memory(serve: ServeMemory) -> ServeMemory {
    let serving = match serve {
        ServeMemory::Heap => ServeMemory::Heap,
        ServeMemory::Mapped => {
            match crate::WipeOnFree::serve_large_blocks_mapped(SERVING_KEPT_BYTES) {
                Ok(()) => ServeMemory::Mapped,
                Err(error) => {
                    tracing::warn!(
                        %error,
                        "cannot reserve address space to serve with blocks mapped; serving from the heap"
                    );
                    ServeMemory::Heap
                }
            }
        }
    };
    if serving == ServeMemory::Heap {
        crate::WipeOnFree::stop_mapping_large_blocks();
    }
    // SAFETY: malloc_trim only releases memory malloc holds free (no live block is
    // touched) and takes no pointer.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
    mallopt(libc::M_TRIM_THRESHOLD, SERVING_TRIM_THRESHOLD);
    serving
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
    mallopt(libc::M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT);
    mallopt(libc::M_TRIM_THRESHOLD, RELAY_TRIM_THRESHOLD);
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
    fn auto_loads_lean_from_32_mib_and_a_set_mode_stays() {
        use LoadMemory::*;
        assert_eq!(choose(Auto, 0), Fast);
        assert_eq!(choose(Auto, LEAN_FROM_BYTES - 1), Fast);
        assert_eq!(choose(Auto, LEAN_FROM_BYTES), Lean);
        assert_eq!(choose(Auto, 1 << 40), Lean);
        for size in [0, LEAN_FROM_BYTES, 1 << 40] {
            assert_eq!(choose(Fast, size), Fast);
            assert_eq!(choose(Lean, size), Lean);
        }
    }

    #[test]
    fn modes_are_logged_by_the_names_their_flags_take() {
        use clap::ValueEnum;
        for mode in LoadMemory::value_variants() {
            assert_eq!(LoadMemory::from_str(&mode.to_string(), false), Ok(*mode));
        }
        for mode in ServeMemory::value_variants() {
            assert_eq!(ServeMemory::from_str(&mode.to_string(), false), Ok(*mode));
        }
        // `shardseal bench` reads these from the functions' logs.
        assert_eq!(LoadMemory::Lean.to_string(), "lean");
        assert_eq!(ServeMemory::Mapped.to_string(), "mapped");
    }

    #[test]
    fn vm_hwm_is_read_in_bytes() {
        let status = "Name:\tx\nVmPeak:\t  2000 kB\nVmHWM:\t  1234 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_kib_field(status, "VmHWM:"), Some(1234 * 1024));
        assert_eq!(parse_kib_field("Name:\tx\n", "VmHWM:"), None);
        assert!(peak_rss_bytes().is_some_and(|b| b > 0));
    }
}
