//! Verification: the whole chain, across files, against its signatures and optionally against
//! a checkpoint kept elsewhere.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use crate::checkpoint::{Checkpoint, EntryHash, PublicKey};
use crate::error::{EntryLocation, Error, Result, TamperKind};
use crate::record::{ChainChecker, Line, LineReader};

/// What to verify a log against, beyond its own contents.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// A checkpoint file kept away from the log ([`crate::AuditWriter::checkpoint_to`]): the
    /// log must still hold every entry it covers, unchanged.
    pub checkpoint_file: Option<PathBuf>,
    /// The writer key to trust. Without it, the key named by the log's own genesis entry is
    /// used, which proves consistency but not authorship.
    pub trusted_key: Option<PublicKey>,
}

impl VerifyOptions {
    /// Verify against the checkpoint file at `path`.
    pub fn with_checkpoint_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.checkpoint_file = Some(path.into());
        self
    }

    /// Trust only `key` as the log's writer.
    pub fn with_trusted_key(mut self, key: PublicKey) -> Self {
        self.trusted_key = Some(key);
        self
    }
}

/// What a successful verification established.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Files read.
    pub files: usize,
    /// Entries in the chain (genesis, events and checkpoints).
    pub entries: u64,
    /// Events among them.
    pub events: u64,
    /// Checkpoints among them, all with valid signatures.
    pub checkpoints: u64,
    /// The writer key every signature was checked against.
    pub writer: PublicKey,
    /// Whether that key was pinned by the caller (otherwise it was read from the log).
    pub key_pinned: bool,
    /// Entries covered by a valid signature (the furthest checkpoint, in the log or external).
    pub signed_entries: u64,
    /// Events after the furthest checkpoint: consistent, but signed by nobody yet.
    pub unsigned_events: u64,
    /// The entries covered by the external checkpoint, if one was given.
    pub external_checkpoint: Option<u64>,
    /// The hash of the last entry.
    pub head: EntryHash,
    /// Bytes of an incomplete final line (a write cut short by a crash, never acknowledged),
    /// ignored.
    pub torn_tail_bytes: u64,
}

/// Verifies the chain held by `files` (in order; see [`crate::log_files`]).
///
/// Every line's hash is recomputed from its bytes, every entry must carry the next sequence
/// number and the previous entry's hash, the chain must start with its genesis entry, and every
/// checkpoint must be signed by the writer key and match the entries it covers. With a
/// checkpoint file, the log must also still hold exactly the entries that checkpoint covers.
/// The first failure is returned as [`Error::Tampered`] naming the entry, or
/// [`Error::CheckpointRejected`] for a bad checkpoint file.
pub fn verify(files: &[PathBuf], options: &VerifyOptions) -> Result<VerifyReport> {
    if files.is_empty() {
        return Err(Error::NoLogFiles {
            path: PathBuf::new(),
        });
    }
    let external = match &options.checkpoint_file {
        Some(path) => Some((path.as_path(), read_external(path, options.trusted_key)?)),
        None => None,
    };
    let mut checker = ChainChecker::from_genesis(options.trusted_key);
    // The last good entry, as (file index, line, seq): a location is only built on failure,
    // so the loop allocates nothing per entry.
    let mut last = (0, 1, 0);
    let mut external_events = None;
    let mut torn_tail_bytes = 0;
    for (index, path) in files.iter().enumerate() {
        let is_last_file = index + 1 == files.len();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut lines = LineReader::new(BufReader::with_capacity(1 << 20, file));
        loop {
            let step = lines.next_line().map_err(|e| Error::io(path, e))?;
            let (line, seq) = (lines.line_number, checker.next_seq);
            let tampered = |kind| Error::Tampered {
                at: EntryLocation {
                    file: path.clone(),
                    line,
                    seq,
                },
                kind,
            };
            match step {
                Line::End => break,
                Line::Torn(bytes) if is_last_file => {
                    torn_tail_bytes = bytes;
                    break;
                }
                Line::Torn(_) => {
                    return Err(tampered(TamperKind::Malformed(
                        "an incomplete line at the end of a file that is not the newest".into(),
                    )));
                }
                Line::TooLong => {
                    return Err(tampered(TamperKind::Malformed(
                        "a line longer than 1 MiB".into(),
                    )));
                }
                Line::Complete => {}
            }
            checker.check(lines.line()).map_err(tampered)?;
            if let Some((checkpoint_path, checkpoint)) = &external {
                if checker.next_seq == 1 && checker.writer != Some(checkpoint.signer) {
                    return Err(Error::CheckpointRejected {
                        path: checkpoint_path.to_path_buf(),
                        kind: TamperKind::UnknownSigner {
                            found: checkpoint.signer.to_string(),
                        },
                    });
                }
                if checker.next_seq == checkpoint.count {
                    if checker.head() != checkpoint.head {
                        return Err(tampered(TamperKind::CheckpointMismatch));
                    }
                    external_events = Some(checker.events);
                }
            }
            last = (index, line, seq);
        }
    }
    let last = EntryLocation {
        file: files[last.0].clone(),
        line: last.1,
        seq: last.2,
    };
    let Some(writer) = checker.writer else {
        return Err(Error::Tampered {
            at: last,
            kind: TamperKind::MissingGenesis,
        });
    };
    if let Some((_, checkpoint)) = &external
        && checker.next_seq < checkpoint.count
    {
        return Err(Error::Tampered {
            at: last,
            kind: TamperKind::Truncated {
                checkpoint_count: checkpoint.count,
                log_count: checker.next_seq,
            },
        });
    }
    let external_count = external.as_ref().map(|(_, checkpoint)| checkpoint.count);
    let signed_events = checker.signed_events.max(external_events.unwrap_or(0));
    Ok(VerifyReport {
        files: files.len(),
        entries: checker.next_seq,
        events: checker.events,
        checkpoints: checker.checkpoints,
        writer,
        key_pinned: options.trusted_key.is_some(),
        signed_entries: checker.signed_count.max(external_count.unwrap_or(0)),
        unsigned_events: checker.events - signed_events,
        external_checkpoint: external_count,
        head: checker.head(),
        torn_tail_bytes,
    })
}

/// Reads a checkpoint file and checks what can be checked before reading the log: its
/// signature, and its signer when a key is pinned.
fn read_external(path: &Path, trusted_key: Option<PublicKey>) -> Result<Checkpoint> {
    let checkpoint = Checkpoint::read_from(path)?;
    let rejected = |kind| Error::CheckpointRejected {
        path: path.to_path_buf(),
        kind,
    };
    if !checkpoint.signature_is_valid() {
        return Err(rejected(TamperKind::BadSignature));
    }
    if trusted_key.is_some_and(|key| key != checkpoint.signer) {
        return Err(rejected(TamperKind::UnknownSigner {
            found: checkpoint.signer.to_string(),
        }));
    }
    Ok(checkpoint)
}
