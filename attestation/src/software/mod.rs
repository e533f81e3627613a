//! The software TEE backend: a platform key, a quoting agent that measures its callers, a
//! client for functions, and the verifier for its evidence.
//!
//! ```text
//!   function process ──connect──▶ quoting agent (holds the platform key)
//!        │  report data (64 B)        │ pid ← SO_PEERCRED
//!        │                            │ measurement ← SHA-256(/proc/<pid>/exe)
//!        ◀────── evidence ─────────── │ sign {tee, measurement, report data}
//!        │
//!        └──▶ broker: SoftwareTeeVerifier (pinned platform key) + ReleasePolicy
//! ```

mod agent;
mod caller;
mod client;
mod platform_key;
mod protocol;
mod verifier;

pub use agent::{
    AgentSocket, DEFAULT_AGENT_MAX_CONNECTIONS, DEFAULT_AGENT_REQUEST_TIMEOUT, QuotingAgent,
    bind_agent_socket,
};
pub use caller::measure_executable;
pub use client::{QUOTE_REQUEST_TIMEOUT, request_quote};
pub use platform_key::{
    InvalidPlatformPublicKey, KeyOrigin, PlatformKey, PlatformPublicKey, public_key_path,
};
pub use verifier::SoftwareTeeVerifier;
