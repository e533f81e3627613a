//! The key broker (`shardseal broker`): the only ShardSeal service that holds shard keys
//! and stage private keys, and releases them only to functions that attested.
//!
//! ```text
//!  model owner ── RegisterModel / RotateModel / Revoke ──▶ ┌──────────────┐
//!    (OwnerAuth signature; shard keys HPKE-sealed          │  KeyBroker   │ state folder:
//!     to the broker's sealing key)                         │              │  keys, models
//!                                                          │ release      │  (sealed at rest),
//!  function ── GetNonce ─▶ quote (agent) ─▶ Attest ──────▶ │ policy +     │  audit log
//!    ◀── KeyRelease sealed to its ephemeral key + token ── │ platform     │
//!                                                          │ roots        │
//!  client ── GetPipelineManifest (via coordinator) ──────▶ └──────────────┘
//!    ◀── PipelineManifest signed by the identity key
//! ```
//!
//! - **Identity.** On first start the broker creates an Ed25519 identity key (signs
//!   pipeline manifests, function tokens and audit checkpoints; its public half is written
//!   to `<state>/broker.pub` for others to pin) and an X25519 sealing key (owners seal
//!   shard keys to it). `GetBrokerInfo` returns both public keys.
//! - **Owner API.** Every call carries an `OwnerAuth` ([`authorize`]): a signature by a key
//!   listed in [`BrokerConfig::owner_keys`] over the method, the request's digest, a
//!   timestamp (within 5 minutes) and a single-use request nonce. A model belongs to the
//!   owner who registered it. A registration's manifest must be signed by the calling
//!   owner; its shard keys must open for that model version and be one per stage; its
//!   [`OwnerReleasePolicy`] must list every stage. The broker generates one stage keypair
//!   per stage, writes everything to the state folder, and only then acknowledges.
//! - **Function API.** `GetNonce`, then `Attest(evidence, nonce, ephemeral key, model,
//!   stage)`: the evidence must bind `ReportData::bind(ephemeral key, nonce)`, be signed by
//!   a trusted platform root (from the broker's configuration, never from the owner), and
//!   measure code the model's policy allows for that stage and has not revoked; the nonce
//!   must be fresh (each nonce answers one attempt). The reply is a `KeyRelease` (shard
//!   key, stage private key, next stage's public key, owner-signed manifest, token) sealed
//!   with [`seal_key_release`](crate::seal_key_release) to the ephemeral key under
//!   `KeyReleaseContext { broker_id: hex(identity key), nonce, model, stage }`, and a
//!   [`FunctionToken`](crate::FunctionToken) signed by the identity key (15 minutes).
//! - **Client API.** `GetPipelineManifest(model)`: the current version's
//!   [`PipelineManifest`](crate::PipelineManifest), signed by the identity key; clients
//!   check it with [`verify_pipeline`](crate::verify_pipeline).
//! - **Audit.** Every decision (register, rotate, revoke, attest accepted, attest denied
//!   with its reason, key released, manifest served) is appended to the `shardseal-audit`
//!   log in `<state>/audit`, fsynced before the reply; never a key. The broker releases
//!   nothing it could not record.
//!
//! Refusals reach peers as precise gRPC codes with short, safe messages; see
//! [`BrokerError::code`] for the table.
//!
//! # State folder
//!
//! ```text
//! <state>/                       0700
//!   identity.key                 0600  Ed25519 seed (identity)
//!   sealing.key                  0600  X25519 private key (owners seal shard keys to it)
//!   master.key                   0600  AES-256 key: seals every model secret below at rest
//!   broker.pub                   0644  the identity public key (hex), for others to pin
//!   index.json                   0600  per model: owner, current version, versions, revocations
//!   models/<model>/v<N>.json     0600  signed manifest, release policy, stage public keys,
//!                                      shard keys and stage private keys (AES-256-GCM under
//!                                      the master key, AAD naming what, which model, which
//!                                      version)
//!   audit/                             the audit log
//! ```
//!
//! A registration writes its version file, then the index, each atomically (temporary
//! file, fsync, rename, fsync of the folder), and is acknowledged only after both and the
//! audit entry: `kill -9` at any instant loses no acknowledged registration, and a restart
//! serves the same keys. A version file the index does not name (the broker died between
//! the two writes, before acknowledging) is ignored and replaced if the version is
//! registered again. If a write fails (disk full, read-only file system, a file in the
//! way), the call is refused with `UNAVAILABLE` and a message naming the problem, and the
//! broker reloads its files so memory matches them; keys registered before keep being
//! released. Only if that reload fails too are owner calls refused until a restart
//! ([`BrokerError::StateUnsettled`]).
//!
//! The replay cache of owner calls lives in memory: after a restart, a call captured in
//! the last 5 minutes could be replayed once, which is harmless because every owner call
//! is idempotent or refused a second time (a registration is `ALREADY_EXISTS`, a rotation
//! `FAILED_PRECONDITION`, a revocation changes nothing).
//!
//! The owner's side is [`owner`]: [`owner::register`], [`owner::rotate`],
//! [`owner::revoke`], or an [`owner::OwnerClient`] for several calls.

mod auth;
mod config;
mod error;
pub mod owner;
mod policy;
mod service;
mod store;

pub use auth::{
    DEFAULT_OWNER_AUTH_WINDOW, OwnerMethod, OwnerRequest, REQUEST_NONCE_LEN, authorize,
    unix_millis_now,
};
pub use config::{
    BrokerConfig, DEFAULT_MAX_CONCURRENT_ATTESTATIONS, DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_TOKEN_LIFETIME,
};
pub use error::BrokerError;
pub use policy::{
    MAX_MEASUREMENTS_PER_STAGE, MAX_POLICY_LEN, OwnerReleasePolicy, StageMeasurements,
};
pub use service::KeyBroker;
pub use store::BROKER_PUB_FILE;
