//! Attestation for ShardSeal: evidence, the verifier seam, release policy, and the
//! software TEE backend.
//!
//! A function gets its stage's keys only after it proves which code it runs. The proof is
//! [`Evidence`]: a TEE-signed [`Quote`] of `{tee, measurement, report data}`. The function
//! puts [`ReportData::bind`]`(ephemeral public key, broker nonce)` in it, so the evidence
//! names the one key the broker may seal to and the one attestation it answers. The broker
//! then
//!
//! 1. recomputes the report data from the key it will seal to and the nonce it issued,
//! 2. verifies the evidence with the [`Verifier`] for its TEE kind (signature chained to a
//!    pinned platform root, report data equal) — [`ReleasePolicy::appraise`] picks it,
//! 3. checks the measurement against the [`ReleasePolicy`] for the model and stage
//!    (allowed, not revoked),
//! 4. consumes the nonce in its [`NonceRegistry`] (single use, 30 s lifetime by default).
//!
//! Any failure is one precise [`AttestationError`].
//!
//! ```text
//! function                    quoting agent                      broker
//!    │ ◀──────────────────── nonce ───────────────────────────────── │ NonceRegistry::issue
//!    │ ephemeral key k                                                │
//!    │ ── bind(k, nonce) ──▶ │ measures the caller itself             │
//!    │ ◀──── evidence ────── │ signs with the platform key            │
//!    │ ── evidence, k, nonce ───────────────────────────────────────▶ │ appraise + consume
//!    │ ◀──────────────────── keys sealed to k ─────────────────────── │
//! ```
//!
//! # The software TEE, and what it does not protect against
//!
//! One backend is real here, the software TEE ([`QuotingAgent`], [`SoftwareTeeVerifier`]).
//! Its quoting agent is a separate process (`shardseal quoting-agent`) that plays the part
//! of the CPU: it holds the platform signing key (Ed25519) and, for each caller on its Unix
//! socket, takes the caller's pid from the kernel (`SO_PEERCRED`) and hashes
//! `/proc/<pid>/exe` itself.
//!
//! It protects against:
//! - **a process claiming another binary's measurement**: the request carries no
//!   measurement, only report data; the agent measures whoever connected. A caller that
//!   exits (its pid then reused) or executes another program after the agent picked up the
//!   connection and before it signs is refused ([`AttestationError::CallerChanged`]), and
//!   so is a traced one ([`AttestationError::CallerTraced`]);
//! - **replay**: each quote binds a single-use, short-lived broker nonce;
//! - **key substitution**: each quote binds the one ephemeral public key the broker will
//!   seal to, so keys reach only the process that asked for the quote;
//! - **forged or altered evidence**: the signature must verify under a pinned root, and
//!   decoding untrusted bytes never panics.
//!
//! It does **not** protect against anyone who controls the host, and it is not a security
//! boundary against the host operator:
//! - **root** can read the agent's key file and sign any quote, ptrace the function or read
//!   its memory, load a kernel module, or fake `/proc`;
//! - **the agent's own user** can read the key file: run the agent under a dedicated user
//!   (with `CAP_SYS_PTRACE`, which it needs to measure functions that made themselves
//!   non-dumpable) and give functions the socket, not the key;
//! - **whoever launches the function** decides what runs inside it without changing the
//!   executable: `LD_PRELOAD` and other environment, a debugger attached from the first
//!   instruction, or a process that `execve`s an allowed binary while a forked copy keeps
//!   the socket and reads the answer. The agent measures the executable file, not the
//!   process's memory or libraries;
//! - it measures the executable only: not the shared libraries it loads, its arguments or
//!   its configuration;
//! - a caller that exits after `connect` and before the agent picks up the connection can
//!   have its pid reused by another process before the agent looks (closing that needs
//!   pidfds from `SO_PEERPIDFD`, Linux 6.5+, not used yet).
//!
//! A hardware TEE closes these gaps because its report data is set from inside memory the
//! host cannot read or change. The software TEE is a faithful simulation of that protocol
//! for development and CI, so that everything above it runs the real flow.
//!
//! # Hardware backends
//!
//! [`TeeKind`] names AMD SEV-SNP, Intel TDX and Intel SGX (DCAP); their verifiers will
//! implement [`Verifier`] behind opt-in cargo features. None is implemented yet: evidence of
//! those kinds is refused with [`AttestationError::BackendNotBuilt`].
#![forbid(unsafe_code)]

mod error;
mod evidence;
mod ids;
mod nonce;
mod policy;
mod software;
mod verifier;

pub use error::AttestationError;
pub use evidence::{
    Evidence, MAX_EVIDENCE_LEN, QUOTE_LEN, Quote, ReportData, TeeKind, VerifiedQuote,
};
pub use ids::{
    InvalidId, InvalidMeasurement, MAX_MODEL_ID_LEN, Measurement, ModelId, ModelVersion,
    StageIndex, hex32,
};
pub use nonce::{
    Clock, DEFAULT_MAX_OUTSTANDING_NONCES, DEFAULT_NONCE_LIFETIME, ManualClock, Nonce,
    NonceRegistry, SystemClock,
};
pub use policy::{ReleasePolicy, StageRule, TrustedRoots};
pub use software::{
    AgentSocket, DEFAULT_AGENT_MAX_CONNECTIONS, DEFAULT_AGENT_REQUEST_TIMEOUT,
    InvalidPlatformPublicKey, KeyOrigin, PlatformKey, PlatformPublicKey, QUOTE_REQUEST_TIMEOUT,
    QuotingAgent, SoftwareTeeVerifier, bind_agent_socket, measure_executable, public_key_path,
    request_quote,
};
pub use verifier::Verifier;
