//! Enclave-style hardening of the function process, applied before it asks for a key.
//!
//! - `PR_SET_DUMPABLE=0`: no core dump of this process, and no `ptrace` attach or
//!   `/proc/<pid>/mem` read by other processes of the same user (root can still).
//! - `RLIMIT_CORE=0`: belt and braces against a core file should dumpable be reset.
//!
//! Freed memory is wiped by [`WipeOnFree`](crate::WipeOnFree), the function binary's
//! global allocator, so decrypted weights and activations do not linger in freed pages.

use crate::Error;

/// Makes the process non-dumpable and disables core files.
pub fn harden_process() -> Result<(), Error> {
    nix::sys::prctl::set_dumpable(false)
        .map_err(|e| Error::Hardening(format!("PR_SET_DUMPABLE: {e}")))?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0)
        .map_err(|e| Error::Hardening(format!("RLIMIT_CORE: {e}")))?;
    tracing::info!(
        dumpable = is_dumpable(),
        "process hardened: no core dump, no ptrace by peers"
    );
    Ok(())
}

/// Whether the process is currently dumpable (for tests and the readiness report).
pub fn is_dumpable() -> bool {
    nix::sys::prctl::get_dumpable().unwrap_or(true)
}
