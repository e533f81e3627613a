//! ShardSeal's cryptographic core: secret types, encrypted shards, envelopes sealed to a
//! public key, signatures and signed manifests, and the model owner's key store.
//!
//! ```text
//!  model owner                      key broker                  function (stage i)
//!  ───────────                      ──────────                  ──────────────────
//!  OwnerKeyStore (signing key,      stage keypairs              attests, then gets
//!    shard keys sealed at rest)     (RecipientPrivateKey)       seal_key_release ─┐
//!  seal_shard ── shard file ──────────────────────────────────▶ ShardOpener      │
//!  ModelManifest::sign ─▶ SignedManifest ─▶ verify                 ◀──────────────┘
//!                                                               open_activation /
//!  client: seal_activation(stage 0 key) ─▶ … ─▶ seal_activation(client key)
//! ```
//!
//! - secrets: [`SecretBytes`], [`ShardKey`], [`MasterKey`], [`ShardKeys`], and the private
//!   keys below: redacted `Debug`, wiped on drop, constant-time equality, and an explicit
//!   `expose_secret` where bytes must leave (under a seal).
//! - shards: AES-256-GCM in STREAM-style chunks ([`ShardSealer`], [`ShardOpener`],
//!   [`seal_shard`], [`open_shard`]), bound to a [`ShardBinding`] (model, version, stage).
//! - envelopes: HPKE (RFC 9180, X25519 / HKDF-SHA256 / AES-256-GCM) to a
//!   [`RecipientPublicKey`], bound to an [`ActivationContext`] or [`KeyReleaseContext`]
//!   ([`seal_activation`], [`seal_key_release`], and the general [`seal_to`] /
//!   [`seal_bulk_to`]).
//! - signatures: Ed25519 ([`SigningKey`], [`VerifyingKey`], [`Signature`]) and
//!   [`Signed<T>`], with [`SignedManifest`] for the [`ModelManifest`].
//! - [`OwnerKeyStore`], and [`atomic_write`] / [`atomic_create`] for files that must never
//!   be half-written.
//! - [`broker`]: the key broker service ([`broker::KeyBroker`]) and the model owner's
//!   client for it ([`broker::owner`]).
//!
//! Every failure is one [`Error`], except in [`broker`], whose service failures are one
//! [`broker::BrokerError`] that maps to a gRPC status.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

#[macro_use]
mod public_key;

pub mod broker;
mod error;
mod keystore;
mod manifest;
mod pipeline;
mod seal;
mod secret;
mod shard;
mod signing;

pub use error::Error;
pub use keystore::{KEY_DIR_MODE, KEY_FILE_MODE, OwnerKeyStore, atomic_create, atomic_write};
pub use manifest::{
    MAX_SHARD_FILE_LEN, MAX_STAGES, MAX_TENSOR_NAME_LEN, MAX_TENSOR_RANK, ModelManifest,
    SignedManifest, StageEntry, TensorSpec,
};
pub use pipeline::{FunctionToken, PipelineManifest, from_blob, to_blob, verify_pipeline};
pub use seal::{
    ActivationContext, ContextEncoder, Direction, KeyReleaseContext, PUBLIC_KEY_LEN,
    RecipientPrivateKey, RecipientPublicKey, RequestId, Sealed, TAG_LEN, open_activation,
    open_key_release, open_sealed, open_sealed_bulk, seal_activation, seal_activation_in_place,
    seal_bulk_in_place, seal_bulk_to, seal_key_release, seal_to,
};
pub use secret::{MasterKey, SecretBytes, ShardKey, ShardKeys};
pub use shard::{
    ChunkOpener, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, PlaintextChunk,
    SHARD_FORMAT_VERSION, SealedChunk, SealedShardInfo, ShardBinding, ShardGatherer, ShardHeader,
    ShardOpener, ShardSealer, ShardStats, open_shard, seal_shard, sealed_shard_len,
};
pub use shardseal_proto::tensor::DType;
pub use signing::{
    MAX_SIGNED_LEN, SIGNATURE_LEN, Signature, Signed, SignedPayload, SigningKey, VERIFYING_KEY_LEN,
    VerifyingKey,
};
