//! The shard store: where ShardSeal keeps encrypted model shards and signed manifests.
//!
//! The model owner's provisioning puts each stage's encrypted shard and the signed manifest
//! here; a function that has attested and received its shard key streams its shard back and
//! decrypts it chunk by chunk while it downloads. [`ShardStore`] is the seam; behind it, through
//! the `object_store` crate, are a local folder (the default) and S3-compatible object storage
//! (AWS S3, MinIO, Ceph, s3s-fs, ...), chosen by a [`StoreConfig`].
//!
//! ```text
//!  provisioning ── put ciphertext ──▶  ShardStore  ──▶ local folder │ S3 bucket
//!  function     ◀─ get_stream (chunks) ─┘   sees ciphertext, sizes and access patterns only
//! ```
//!
//! # What the store is trusted for: availability only
//!
//! The store sees ciphertext (AES-256-GCM shards), signed manifests, object sizes and who reads
//! what when. It never sees a key: shard keys go from the broker to attested functions only.
//! A store that lies can deny service, but not read or alter a model unnoticed: a function
//! authenticates every shard chunk (a swapped, truncated or reordered shard fails to decrypt)
//! and the manifest's signature. This crate adds what helps diagnosis without being a security
//! boundary: keys cannot climb out of the store ([`StoreKey`]), and a download that delivers
//! more or fewer bytes than announced ends with [`Error::SizeMismatch`].
//!
//! # Key layout
//!
//! Keys are relative paths of `A-Z a-z 0-9 . _ -` components (see [`StoreKey`]):
//!
//! ```text
//! models/<model>/v<version>/manifest.json     signed model manifest   StoreKey::manifest
//! models/<model>/v<version>/stage-<i>.shard   stage i's encrypted shard  StoreKey::shard
//! ```
//!
//! `list("models/<model>/v<version>")` ([`StoreKey::version_prefix`]) finds one version's
//! objects.
//!
//! # Configuring S3
//!
//! In a config file (see [`StoreConfig`] for every field):
//!
//! ```toml
//! backend = "s3"
//! endpoint = "https://minio.internal:9000"   # omit for AWS itself
//! bucket = "shardseal-shards"                 # must exist
//! region = "us-east-1"
//! access_key_id = "..."
//! secret_access_key = "..."
//! ```
//!
//! or as a URL, with the credentials in `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`:
//! `s3://shardseal-shards?endpoint=https://minio.internal:9000&region=us-east-1`. Requests are
//! path-style (`<endpoint>/<bucket>/<key>`) over TLS; `allow_http = true` permits a plain
//! `http://` endpoint, for a loopback test server. The credentials need `GetObject`,
//! `PutObject`, `DeleteObject`, `ListBucket` and the multipart-upload actions on the bucket;
//! a function needs only `GetObject` (and `ListBucket` for `list`).
//!
//! TLS uses rustls with the ring provider, the workspace's only one: opening an S3 store
//! installs ring as the process-wide rustls provider unless one is already installed.
//!
//! ```no_run
//! # async fn example() -> Result<(), shardseal_store::Error> {
//! use futures::TryStreamExt;
//! use shardseal_store::{StoreConfig, StoreKey};
//!
//! let store = StoreConfig::from_url("/var/lib/shardseal/store")?.open()?;
//! let key = StoreKey::new("models/mlp/v2/stage-0.shard")?;
//! let mut shard = store.get_stream(&key).await?;
//! println!("{} bytes", shard.size());
//! while let Some(chunk) = shard.try_next().await? {
//!     // decrypt `chunk` ...
//! #   drop(chunk);
//! }
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod backend;
mod config;
mod error;
mod key;
mod shard_store;

pub use config::{
    ACCESS_KEY_ID_VAR, DEFAULT_LOCAL_DIR, DEFAULT_REGION, SECRET_ACCESS_KEY_VAR, SecretAccessKey,
    StoreConfig,
};
pub use error::{Error, Result};
pub use key::{KeyProblem, MAX_KEY_LEN, StoreKey};
pub use shard_store::{ByteStream, ObjectStream, ShardStore};
