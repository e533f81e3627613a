//! ShardSeal's tamper-evident audit log: hash-chained entries with signed checkpoints.
//!
//! The key broker and the coordinator each keep one log. They record *what happened*: models
//! registered, rotated and revoked, attestations accepted or denied (with reason, measurement
//! and stage), keys released, manifests served, and per-request metadata (request id, model,
//! stages, sizes, durations, outcome). They never record a key, a weight or a tensor value:
//! [`AuditEvent`] has no byte-blob field, keys appear only as [`KeyFingerprint`]s, and free
//! text ([`Reason`]) is bounded and meant for people.
//!
//! ```text
//!  broker / coordinator ──append(event)──▶ AuditWriter ──▶ dir/audit-000001.log
//!                                             │  signs      dir/audit-000002.log  (rotated)
//!                                             ▼             ...
//!                          checkpoint_to(path) ──▶ checkpoint file kept elsewhere
//!
//!  `shardseal audit verify dir --checkpoint file --key PUB`  ──▶ verify()
//!  `shardseal audit show dir --kind key_released --json`     ──▶ LogReader + RecordFilter
//! ```
//!
//! # Format
//!
//! A log is a directory of files `audit-000001.log`, `audit-000002.log`, ... holding one chain.
//! Each file is JSON lines, one entry per line, members in this order:
//!
//! ```text
//! {"seq":7,"time":1738324800250,"prev":"<64 hex>","event":{"kind":"key_released",...},"hash":"<64 hex>"}
//! ```
//!
//! - `seq` counts entries from 0 across all files; `time` is unix milliseconds (informative
//!   only: clocks go backwards, so verification does not order by it).
//! - `prev` is the `hash` of the entry before (64 zeros for entry 0).
//! - exactly one of `genesis`, `event` or `checkpoint`:
//!   - entry 0 is the **genesis** entry, `{"format":1,"writer":"<public key hex>"}`, naming the
//!     Ed25519 key that signs the chain's checkpoints;
//!   - an **event** is an [`AuditEvent`], tagged by `kind`;
//!   - a **checkpoint** at seq `s` is `{"count":s,"head":<prev>,"signer":..,"signature":..}`:
//!     the writer's signature over `"shardseal-audit/checkpoint/v1\0" ‖ count (u64 BE) ‖ head`,
//!     i.e. over "entries `0..s` exist and end in `head`".
//! - `hash` = SHA-256(`"shardseal-audit/entry/v1\n"` ‖ the line's JSON object *without* its
//!   `hash` member), byte for byte as written: the line with its final `,"hash":"…"` member
//!   removed and `}` closing it. Hex is lower case everywhere, so every entry has exactly one
//!   valid spelling. Nothing is canonicalised: the stored bytes are what is hashed.
//!
//! Checkpoints are written every [`WriterOptions::checkpoint_every`] events (1000 by default),
//! before each rotation, and on close. [`AuditWriter::checkpoint_to`] also exports one to a file
//! (`{"format":"shardseal-audit-checkpoint/v1","count":..,"head":..,"signer":..,"signature":..}`)
//! that an operator keeps somewhere the log's host cannot write.
//!
//! One writer per directory: [`AuditWriter`] holds an exclusive `flock` on `writer.lock` there
//! (released by the kernel if the process dies), so a second writer cannot fork the chain.
//!
//! Rotation: once a file reaches [`WriterOptions::max_file_bytes`] (64 MiB) or
//! [`WriterOptions::max_file_entries`], the writer ends it with a checkpoint and continues the
//! chain in the next file: the next file's first entry links to the last entry of the one
//! before, so a missing, reordered or substituted file breaks the chain like a missing entry.
//!
//! # Durability
//!
//! [`AuditWriter::append`] encodes the whole line first and hands it to the kernel in one
//! `write`; it returns only after that (and, under [`FsyncPolicy::Always`], the default, after
//! `fdatasync`). So a process crash never loses an acknowledged entry, and a machine crash
//! loses nothing under `Always`, at most `n - 1` entries under `Every(n)`, and at most the
//! entries since the last checkpoint under `OnCheckpoint`. Checkpoints, rotation, `sync`,
//! `close` and `checkpoint_to` always fsync (the log before the exported checkpoint, so an
//! exported checkpoint never covers an entry that could still be lost); new files and renamed
//! checkpoint files have their directory fsynced too.
//!
//! A crash mid-write can leave one incomplete last line (no newline). It was never
//! acknowledged, so [`AuditWriter::open`] cuts it off and continues from the last good entry;
//! [`verify`] ignores it and reports its size, so it never breaks verification of what came
//! before. Any *other* inconsistency found on open is refused: the writer does not extend a log
//! it cannot vouch for.
//!
//! # What verification proves, and what it does not
//!
//! [`verify`] recomputes every hash, checks every link and sequence number across files, checks
//! that the chain starts at its genesis entry, and checks every checkpoint's signature against
//! the writer key. It names the first bad entry (file, line, seq) and says what is wrong
//! ([`TamperKind`]): an edit (hash mismatch), a deletion, reorder or insertion (out of
//! sequence or broken link), a forged or altered checkpoint (bad signature, unknown signer,
//! checkpoint mismatch), a missing start, or, against an external checkpoint, a cut tail.
//!
//! It does **not** prove:
//! - **Authorship, unless the key is pinned.** Without `--key` / [`VerifyOptions::trusted_key`]
//!   the writer key is read from the log itself: someone who rewrites the whole log with a key
//!   of their own produces a consistent log. Pin the broker's identity key.
//! - **That the tail is complete, without an external checkpoint.** Cutting entries off the end
//!   (together with any checkpoint among them) leaves a shorter, valid chain. Only a checkpoint
//!   kept elsewhere ([`VerifyOptions::checkpoint_file`]) detects it.
//! - **Anything about entries after the last checkpoint** beyond their consistency: they are
//!   hash-chained but not yet signed, so anyone able to write the file can replace them
//!   ([`VerifyReport::unsigned_events`] says how many there are).
//! - **Honesty of the writer.** The writer holds the signing key: it (or whoever steals the
//!   key) can rewrite history and re-sign it, up to the last checkpoint exported elsewhere.
//!   Export checkpoints often to a place the writer cannot change.
//! - **That events are of known kinds.** Verification checks integrity, not the event schema,
//!   so a log from a newer writer still verifies; [`LogReader`] shows unknown kinds as such.
//!
//! # Speed
//!
//! Verification streams each file through one reused buffer, hashes each line's bytes and
//! parses only `seq`, `prev` and the record type (events are skipped unparsed; checkpoints,
//! one in a thousand by default, are parsed and their signatures checked).
//! `cargo run --release -p shardseal-audit --example verify_million` writes 1,000,000 events
//! (376 MiB in 6 files, fsync relaxed to once per checkpoint for the generation only) and
//! verifies the 1,001,005 entries in **0.8 s** (0.81 to 0.85 s over three runs: about 1.2
//! million entries, 450 MiB per second) on the 2-core development machine while it was shared
//! with other builds.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod checkpoint;
mod error;
mod event;
mod reader;
mod record;
mod timestamp;
mod verify;
mod writer;

pub use checkpoint::{
    Checkpoint, CheckpointSigner, Ed25519Signer, EntryHash, PublicKey, Signature, SigningSeed,
};
pub use error::{EntryLocation, Error, Result, TamperKind};
pub use event::{
    AuditEvent, EventKind, KeyFingerprint, MAX_REASON_CHARS, MAX_REQUEST_ID_HEX, Outcome, Reason,
    RequestId, TeeName,
};
pub use reader::{LogEntry, LogReader, RecordFilter, log_files, segment_name};
pub use record::{Genesis, Record, RecordBody};
pub use timestamp::Timestamp;
pub use verify::{VerifyOptions, VerifyReport, verify};
pub use writer::{AuditWriter, FsyncPolicy, WriterOptions};
