//! Per-function memory limits, enforced by the kernel, not by the function.
//!
//! Like a serverless platform's memory size, the limit is set by whoever starts the
//! function. Two mechanisms, the first that works:
//!
//! 1. **cgroup v2 `memory.max`**: each replica gets its own cgroup under the coordinator's
//!    (`shardseal-fn-<replica>`), when the unified hierarchy is mounted, has the memory
//!    controller, and the coordinator may create cgroups there (a delegated subtree, e.g.
//!    under `systemd-run --user -p Delegate=yes`, or a container with a private cgroup
//!    namespace). It counts what the function really uses (resident memory and page cache)
//!    and an excess is met by reclaim, then the OOM killer.
//! 2. **`RLIMIT_DATA`**, set in the child between `fork` and `exec`: the kernel refuses any
//!    heap or private anonymous mapping beyond the limit, so an allocation fails (and the
//!    function aborts) instead of growing past it. It is used rather than `RLIMIT_AS` on
//!    purpose: `RLIMIT_AS` counts address space, including the executable's own mapping
//!    (hundreds of MiB for a debug build), thread stacks and the allocator's reserved but
//!    unused arenas, so a 256 MiB `RLIMIT_AS` refuses a function long before it holds
//!    256 MiB, while `RLIMIT_DATA` counts the memory the weights and activations occupy.
//!
//! The same figure feeds the planner (`shardseal plan --memory-limit`), which cuts a model
//! so that every stage fits its function.

use std::path::{Path, PathBuf};

use tokio::process::Command;

/// How a [`MemoryLimit`] is enforced on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enforcement {
    /// A cgroup v2 per replica, created under this directory.
    Cgroup2(PathBuf),
    /// `RLIMIT_DATA` in the function process.
    RlimitData,
}

/// A memory limit for every function this platform starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLimit {
    bytes: u64,
    enforcement: Enforcement,
}

impl MemoryLimit {
    /// A limit of `bytes` per function, enforced by the best mechanism available here.
    pub fn new(bytes: u64) -> Self {
        let enforcement = delegated_cgroup2().map_or(Enforcement::RlimitData, Enforcement::Cgroup2);
        Self { bytes, enforcement }
    }

    /// A limit of `bytes` per function, enforced with `RLIMIT_DATA` even where cgroups
    /// would work.
    pub fn rlimit_only(bytes: u64) -> Self {
        Self {
            bytes,
            enforcement: Enforcement::RlimitData,
        }
    }

    /// The limit, in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// How it is enforced.
    pub fn enforcement(&self) -> &Enforcement {
        &self.enforcement
    }

    /// Arranges for `command`'s process to start under the limit (the rlimit mechanism;
    /// the cgroup one acts after spawn, in [`MemoryLimit::confine`]).
    pub(crate) fn prepare(&self, command: &mut Command) {
        if self.enforcement != Enforcement::RlimitData {
            return;
        }
        let bytes = self.bytes;
        // SAFETY: the closure runs in the child between fork and exec, where only
        // async-signal-safe operations are allowed. It makes one `setrlimit` system call
        // (async-signal-safe), allocates nothing, takes no lock, and touches only a
        // copied integer.
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(move || {
                nix::sys::resource::setrlimit(
                    nix::sys::resource::Resource::RLIMIT_DATA,
                    bytes,
                    bytes,
                )
                .map_err(std::io::Error::from)
            });
        }
    }

    /// Moves the process `pid` of replica `replica_id` into a cgroup of its own with
    /// `memory.max` set (the cgroup mechanism); returns the cgroup to remove when the
    /// replica stops.
    pub(crate) fn confine(&self, replica_id: u64, pid: u32) -> std::io::Result<Option<PathBuf>> {
        let Enforcement::Cgroup2(parent) = &self.enforcement else {
            return Ok(None);
        };
        let cgroup = parent.join(format!("shardseal-fn-{replica_id}"));
        std::fs::create_dir_all(&cgroup)?;
        std::fs::write(cgroup.join("memory.max"), self.bytes.to_string())?;
        // No swap either, where the kernel offers the knob: the limit is on memory.
        let _ = std::fs::write(cgroup.join("memory.swap.max"), "0");
        std::fs::write(cgroup.join("cgroup.procs"), pid.to_string())?;
        Ok(Some(cgroup))
    }
}

/// Removes a replica's cgroup once its process has exited (best effort: a cgroup with a
/// process left in it cannot be removed, and is then left for the operator).
pub(crate) fn release(cgroup: &Path) {
    if let Err(e) = std::fs::remove_dir(cgroup) {
        tracing::warn!(cgroup = %cgroup.display(), error = %e, "function cgroup not removed");
    }
}

/// The coordinator's own cgroup v2 directory, if the unified hierarchy is mounted, offers
/// the memory controller to children, and lets this process create a child (probed by
/// creating and removing one).
fn delegated_cgroup2() -> Option<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let relative = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = root.join(relative.trim_start_matches('/'));
    let controllers = std::fs::read_to_string(dir.join("cgroup.subtree_control")).ok()?;
    if !controllers.split_whitespace().any(|c| c == "memory") {
        return None;
    }
    let probe = dir.join(format!("shardseal-probe-{}", std::process::id()));
    std::fs::create_dir(&probe).ok()?;
    let usable = probe.join("memory.max").exists();
    let _ = std::fs::remove_dir(&probe);
    usable.then_some(dir)
}
