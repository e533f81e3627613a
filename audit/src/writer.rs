//! The append side: one writer per log directory, crash recovery on open, periodic signed
//! checkpoints, fsync policy and rotation.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Write};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::checkpoint::{Checkpoint, CheckpointSigner, EntryHash, PublicKey};
use crate::error::{EntryLocation, Error, Result, TamperKind};
use crate::event::AuditEvent;
use crate::reader::{segment_name, segments};
use crate::record::{self, BodyRef, ChainChecker, Genesis, Line, LineReader};
use crate::timestamp::Timestamp;

/// When the writer forces entries to stable storage (`fdatasync`).
///
/// Whatever the policy, [`AuditWriter::append`] returns only after the entry was handed to the
/// operating system in one `write`, so a crash of the *process* never loses an acknowledged
/// entry; the policy decides what a crash of the *machine* (power loss, kernel panic) may lose.
/// Checkpoints, rotation, [`AuditWriter::sync`] and [`AuditWriter::close`] always fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FsyncPolicy {
    /// Fsync every entry before `append` returns: nothing acknowledged is ever lost. The
    /// default, and the right policy for the broker's security decisions (key releases,
    /// denials).
    Always,
    /// Fsync every `n` entries: a machine crash loses at most the last `n - 1` acknowledged
    /// entries (and never corrupts earlier ones).
    Every(NonZeroU32),
    /// Fsync only with each checkpoint: a machine crash loses at most the entries since the
    /// last checkpoint. For high-volume, low-stakes entries (per-request metadata).
    OnCheckpoint,
}

/// How a writer checkpoints, syncs and rotates.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WriterOptions {
    /// When entries reach stable storage.
    pub fsync: FsyncPolicy,
    /// Write a signed checkpoint after this many events (0: only on rotation, close and
    /// explicit [`AuditWriter::checkpoint`]).
    pub checkpoint_every: u64,
    /// Start a new file once the current one holds at least this many bytes.
    pub max_file_bytes: u64,
    /// Start a new file once the current one holds this many entries.
    pub max_file_entries: u64,
}

impl Default for WriterOptions {
    /// Fsync every entry, a checkpoint every 1000 events, a new file every 64 MiB.
    fn default() -> Self {
        Self {
            fsync: FsyncPolicy::Always,
            checkpoint_every: 1000,
            max_file_bytes: 64 << 20,
            max_file_entries: u64::MAX,
        }
    }
}

impl WriterOptions {
    /// Sets the fsync policy.
    pub fn with_fsync(mut self, fsync: FsyncPolicy) -> Self {
        self.fsync = fsync;
        self
    }

    /// Sets how many events go between automatic checkpoints (0: none).
    pub fn with_checkpoint_every(mut self, events: u64) -> Self {
        self.checkpoint_every = events;
        self
    }

    /// Sets the size at which a file is rotated.
    pub fn with_max_file_bytes(mut self, bytes: u64) -> Self {
        self.max_file_bytes = bytes;
        self
    }

    /// Sets the number of entries at which a file is rotated.
    pub fn with_max_file_entries(mut self, entries: u64) -> Self {
        self.max_file_entries = entries;
        self
    }
}

/// Appends events to a log directory (`audit-000001.log`, `audit-000002.log`, ...).
///
/// Thread-safe: a mutex inside serialises appends, so the broker shares one writer (in an
/// `Arc`) between its tasks. Only one writer may have a directory open at a time, since two
/// would fork the chain: the writer holds an exclusive lock on `writer.lock` in the directory,
/// and a second [`AuditWriter::open`] gets [`Error::LogInUse`].
///
/// After any I/O error the writer refuses further appends ([`Error::WriterBroken`]): the file's
/// tail is in an unknown state until [`AuditWriter::open`] recovers it.
pub struct AuditWriter {
    state: Mutex<WriterState>,
}

struct WriterState {
    dir: PathBuf,
    /// Holds the directory's writer lock for as long as the writer lives.
    _lock: File,
    signer: Box<dyn CheckpointSigner>,
    writer_key: PublicKey,
    options: WriterOptions,
    file: File,
    file_path: PathBuf,
    file_index: u32,
    file_bytes: u64,
    file_entries: u64,
    next_seq: u64,
    head: EntryHash,
    events_since_checkpoint: u64,
    unsynced_entries: u64,
    /// The last entry, if it is a checkpoint: a second checkpoint of the same head is useless.
    trailing_checkpoint: Option<Checkpoint>,
    recovered_torn_bytes: u64,
    broken: bool,
    closed: bool,
}

impl std::fmt::Debug for AuditWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("AuditWriter")
            .field("file", &state.file_path)
            .field("next_seq", &state.next_seq)
            .field("writer_key", &state.writer_key)
            .finish_non_exhaustive()
    }
}

impl AuditWriter {
    /// Opens (or creates) the log directory `dir` for appending, signing checkpoints with
    /// `signer`.
    ///
    /// A new log starts with a genesis entry naming the signer's public key. An existing log is
    /// recovered: its newest file is checked entry by entry (hashes, links, checkpoint
    /// signatures) and linked to the last entry of the file before it; an incomplete last line
    /// (a write cut short by a crash, never acknowledged) is cut off; and the chain continues
    /// from the last good entry. Any other inconsistency is refused as [`Error::Tampered`]:
    /// the writer does not append to a log it cannot vouch for (move it aside and start anew).
    /// A log started by another key is refused with [`Error::SignerMismatch`].
    pub fn open(
        dir: impl AsRef<Path>,
        signer: impl CheckpointSigner + 'static,
        options: WriterOptions,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let lock = lock_dir(dir)?;
        let writer_key = PublicKey(signer.public_key());
        let existing = segments(dir)?;
        let Some((last_index, last_path)) = existing.last().cloned() else {
            let (file, file_path) = create_segment(dir, 1)?;
            let mut state =
                WriterState::new(dir, lock, Box::new(signer), options, (file, file_path), 1);
            state.guard(WriterState::write_genesis)?;
            return Ok(Self::from_state(state));
        };

        let mut checker = resume_point(&existing, writer_key)?;

        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&last_path)
            .map_err(|e| Error::io(&last_path, e))?;
        let mut lines = LineReader::new(BufReader::with_capacity(1 << 20, &file));
        let mut torn_bytes = 0;
        loop {
            let at = |line| EntryLocation {
                file: last_path.clone(),
                line,
                seq: checker.next_seq,
            };
            match lines.next_line().map_err(|e| Error::io(&last_path, e))? {
                Line::End => break,
                Line::Torn(bytes) => {
                    torn_bytes = bytes;
                    break;
                }
                Line::TooLong => {
                    return Err(Error::Tampered {
                        at: at(lines.line_number),
                        kind: TamperKind::Malformed("a line longer than 1 MiB".into()),
                    });
                }
                Line::Complete => {
                    let at = at(lines.line_number);
                    checker
                        .check(lines.line())
                        .map_err(|kind| Error::Tampered { at, kind })?;
                }
            }
        }
        let (file_bytes, file_entries) = (lines.complete_bytes, lines.line_number);
        let file_entries = file_entries - u64::from(torn_bytes > 0);
        drop(lines);
        if let Some(genesis_writer) = checker.writer
            && genesis_writer != writer_key
        {
            return Err(signer_mismatch(genesis_writer, writer_key));
        }
        if torn_bytes > 0 {
            // Never acknowledged: append returns only after the whole line was written.
            file.set_len(file_bytes)
                .and_then(|()| file.sync_data())
                .map_err(|e| Error::io(&last_path, e))?;
            tracing::warn!(
                file = %last_path.display(),
                bytes = torn_bytes,
                "audit log: dropped an incomplete last entry left by a crash"
            );
        }

        let mut state = WriterState::new(
            dir,
            lock,
            Box::new(signer),
            options,
            (file, last_path),
            last_index,
        );
        state.recovered_torn_bytes = torn_bytes;
        state.file_bytes = file_bytes;
        state.file_entries = file_entries;
        if checker.next_seq == 0 {
            // The only file holds no complete entry: the crash came before the genesis entry
            // was fully written.
            state.guard(WriterState::write_genesis)?;
        } else {
            state.next_seq = checker.next_seq;
            state.head = checker.head();
            state.events_since_checkpoint = checker.events - checker.signed_events;
            state.trailing_checkpoint = checker.trailing_checkpoint;
        }
        Ok(Self::from_state(state))
    }

    fn from_state(state: WriterState) -> Self {
        Self {
            state: Mutex::new(state),
        }
    }

    /// A poisoned lock means a panic interrupted a write: treat the writer as broken.
    fn lock(&self) -> MutexGuard<'_, WriterState> {
        self.state.lock().unwrap_or_else(|poisoned| {
            let mut state = poisoned.into_inner();
            state.broken = true;
            state
        })
    }

    /// Appends `event` and returns its sequence number, once it is written (and fsynced, under
    /// [`FsyncPolicy::Always`]). May first rotate to a new file, and may then write a
    /// checkpoint.
    pub fn append(&self, event: &AuditEvent) -> Result<u64> {
        self.lock()
            .guard(|state| state.append_events(std::slice::from_ref(event)))
            .map(|seqs| seqs[0])
    }

    /// Appends `events` in order, with no other append between them (only a checkpoint, when
    /// one falls due), and returns their sequence numbers once all are written and, under
    /// [`FsyncPolicy::Always`], fsynced: one fsync for all of them, where appending them one
    /// by one costs one each. A crash may keep any prefix of them, as it would one by one.
    pub fn append_all(&self, events: &[AuditEvent]) -> Result<Vec<u64>> {
        self.lock().guard(|state| state.append_events(events))
    }

    /// Writes a signed checkpoint of everything so far (unless the last entry already is one),
    /// fsyncs, and returns it.
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        self.lock().guard(WriterState::write_checkpoint)
    }

    /// Like [`AuditWriter::checkpoint`], and also writes the checkpoint to `path` (atomically,
    /// durably) for an operator to keep away from the log: verification against it detects a
    /// cut tail.
    pub fn checkpoint_to(&self, path: impl AsRef<Path>) -> Result<Checkpoint> {
        let checkpoint = self.checkpoint()?;
        checkpoint.write_to(path.as_ref())?;
        Ok(checkpoint)
    }

    /// Forces every entry written so far to stable storage.
    pub fn sync(&self) -> Result<()> {
        self.lock().guard(WriterState::sync)
    }

    /// Writes a final checkpoint, fsyncs and closes. (Dropping a writer does the same, but
    /// cannot report a failure.)
    pub fn close(self) -> Result<Checkpoint> {
        let mut state = self.lock();
        let checkpoint = state.guard(WriterState::write_checkpoint)?;
        state.closed = true;
        Ok(checkpoint)
    }

    /// The sequence number the next entry will get.
    pub fn next_seq(&self) -> u64 {
        self.lock().next_seq
    }

    /// The hash of the last entry written.
    pub fn head(&self) -> EntryHash {
        self.lock().head
    }

    /// The key that signs this log's checkpoints.
    pub fn writer_key(&self) -> PublicKey {
        self.lock().writer_key
    }

    /// The file being appended to.
    pub fn current_file(&self) -> PathBuf {
        self.lock().file_path.clone()
    }

    /// Bytes of an incomplete last entry that [`AuditWriter::open`] cut off (0 if none).
    pub fn recovered_torn_bytes(&self) -> u64 {
        self.lock().recovered_torn_bytes
    }
}

impl Drop for AuditWriter {
    fn drop(&mut self) {
        let mut state = self.lock();
        if !state.closed && !state.broken {
            // Best effort: a failure here is reported by the next open (if at all).
            let _ = state.guard(WriterState::write_checkpoint);
        }
    }
}

impl WriterState {
    fn new(
        dir: &Path,
        lock: File,
        signer: Box<dyn CheckpointSigner>,
        options: WriterOptions,
        (file, file_path): (File, PathBuf),
        file_index: u32,
    ) -> Self {
        let writer_key = PublicKey(signer.public_key());
        Self {
            dir: dir.to_path_buf(),
            _lock: lock,
            file_path,
            signer,
            writer_key,
            options,
            file,
            file_index,
            file_bytes: 0,
            file_entries: 0,
            next_seq: 0,
            head: EntryHash([0; 32]),
            events_since_checkpoint: 0,
            unsynced_entries: 0,
            trailing_checkpoint: None,
            recovered_torn_bytes: 0,
            broken: false,
            closed: false,
        }
    }

    /// Runs `operation` unless the writer is broken, and marks it broken if the operation fails
    /// on I/O (the file's tail is then unknown).
    fn guard<T>(&mut self, operation: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if self.broken {
            return Err(Error::WriterBroken);
        }
        let result = operation(self);
        if matches!(result, Err(Error::Io { .. })) {
            self.broken = true;
        }
        result
    }

    fn write_genesis(&mut self) -> Result<()> {
        let genesis = Genesis {
            format: 1,
            writer: self.writer_key,
        };
        self.write_record(BodyRef::Genesis(&genesis))?;
        self.sync()?;
        sync_parent_dir(&self.file_path)
    }

    fn append_events(&mut self, events: &[AuditEvent]) -> Result<Vec<u64>> {
        let seqs = events
            .iter()
            .map(|event| self.write_event(event))
            .collect::<Result<Vec<_>>>()?;
        // A checkpoint written meanwhile synced everything before it.
        match self.options.fsync {
            FsyncPolicy::Always => self.sync()?,
            FsyncPolicy::Every(n) if self.unsynced_entries >= u64::from(n.get()) => {
                self.sync()?;
            }
            FsyncPolicy::Every(_) | FsyncPolicy::OnCheckpoint => {}
        }
        Ok(seqs)
    }

    /// Writes one event (first rotating, then checkpointing, when due), unsynced unless a
    /// checkpoint was written.
    fn write_event(&mut self, event: &AuditEvent) -> Result<u64> {
        if self.file_entries > 0
            && (self.file_bytes >= self.options.max_file_bytes
                || self.file_entries >= self.options.max_file_entries)
        {
            self.rotate()?;
        }
        let seq = self.write_record(BodyRef::Event(event))?;
        self.trailing_checkpoint = None;
        self.events_since_checkpoint += 1;
        if self.options.checkpoint_every > 0
            && self.events_since_checkpoint >= self.options.checkpoint_every
        {
            self.write_checkpoint()?;
        }
        Ok(seq)
    }

    /// Encodes first, then writes the whole line in one call: a failure to encode leaves the
    /// file untouched, and a crash mid-write leaves at most one incomplete last line.
    fn write_record(&mut self, body: BodyRef<'_>) -> Result<u64> {
        let (line, hash) = record::encode(self.next_seq, Timestamp::now(), &self.head, body)?;
        self.file
            .write_all(&line)
            .map_err(|e| Error::io(&self.file_path, e))?;
        let seq = self.next_seq;
        self.file_bytes += line.len() as u64;
        self.file_entries += 1;
        self.next_seq += 1;
        self.head = hash;
        self.unsynced_entries += 1;
        Ok(seq)
    }

    fn write_checkpoint(&mut self) -> Result<Checkpoint> {
        if let Some(checkpoint) = &self.trailing_checkpoint {
            let checkpoint = checkpoint.clone();
            self.sync()?;
            return Ok(checkpoint);
        }
        let checkpoint = Checkpoint::sign(self.next_seq, self.head, self.signer.as_ref());
        self.write_record(BodyRef::Checkpoint(&checkpoint))?;
        self.sync()?;
        self.events_since_checkpoint = 0;
        self.trailing_checkpoint = Some(checkpoint.clone());
        Ok(checkpoint)
    }

    fn sync(&mut self) -> Result<()> {
        if self.unsynced_entries > 0 {
            self.file
                .sync_data()
                .map_err(|e| Error::io(&self.file_path, e))?;
            self.unsynced_entries = 0;
        }
        Ok(())
    }

    /// Closes the current file with a checkpoint and continues the chain in the next one.
    fn rotate(&mut self) -> Result<()> {
        self.write_checkpoint()?;
        let index = self.file_index + 1;
        let (file, file_path) = create_segment(&self.dir, index)?;
        self.file = file;
        self.file_path = file_path;
        self.file_index = index;
        self.file_bytes = 0;
        self.file_entries = 0;
        Ok(())
    }
}

fn signer_mismatch(log_writer: PublicKey, signer: PublicKey) -> Error {
    Error::SignerMismatch {
        log_writer: log_writer.to_string(),
        signer: signer.to_string(),
    }
}

/// The name of the lock file a writer holds in its log directory.
const LOCK_FILE: &str = "writer.lock";

/// Takes the directory's exclusive writer lock (`flock`), so that a second writer, in this
/// process or another, is refused instead of forking the chain. The lock goes with the file
/// handle, so a crashed writer never leaves it behind.
fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::LogInUse {
            dir: dir.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
    }
}

/// Creates the `index`-th file (refusing to reuse one) and makes its name durable.
fn create_segment(dir: &Path, index: u32) -> Result<(File, PathBuf)> {
    let path = dir.join(segment_name(index));
    let file = OpenOptions::new()
        .append(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    sync_parent_dir(&path)?;
    Ok((file, path))
}

/// Fsyncs the directory holding `path`, so that a new or renamed name survives a machine
/// crash.
pub(crate) fn sync_parent_dir(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| Error::io(parent, e))
}

/// Where the newest file of an existing log continues the chain from: the genesis entry if it
/// is the only file, else the last entry of the file before it (after checking that the log
/// was started by `writer_key`).
fn resume_point(existing: &[(u32, PathBuf)], writer_key: PublicKey) -> Result<ChainChecker> {
    if existing.len() < 2 {
        return Ok(ChainChecker::from_genesis(None));
    }
    let genesis_writer = read_genesis_writer(&existing[0].1)?;
    if genesis_writer != writer_key {
        return Err(signer_mismatch(genesis_writer, writer_key));
    }
    let before_path = &existing[existing.len() - 2].1;
    let at = |line| EntryLocation {
        file: before_path.clone(),
        line,
        seq: 0,
    };
    let (line_number, line) = last_line(before_path)?.ok_or_else(|| Error::Tampered {
        at: at(1),
        kind: TamperKind::Malformed("an empty file before the newest one".into()),
    })?;
    let (seq, hash) = record::inspect(&line).map_err(|kind| Error::Tampered {
        at: at(line_number),
        kind,
    })?;
    Ok(ChainChecker::resume(seq + 1, &hash, writer_key))
}

/// The writer key named by the genesis entry at the start of `path`.
fn read_genesis_writer(path: &Path) -> Result<PublicKey> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut lines = LineReader::new(BufReader::new(file));
    let at = EntryLocation {
        file: path.to_path_buf(),
        line: 1,
        seq: 0,
    };
    let mut checker = ChainChecker::from_genesis(None);
    match lines.next_line().map_err(|e| Error::io(path, e))? {
        Line::Complete => checker
            .check(lines.line())
            .map_err(|kind| Error::Tampered {
                at: at.clone(),
                kind,
            })?,
        _ => {
            return Err(Error::Tampered {
                at,
                kind: TamperKind::MissingGenesis,
            });
        }
    }
    checker.writer.ok_or(Error::Tampered {
        at,
        kind: TamperKind::MissingGenesis,
    })
}

/// The last line of a file that is not the newest (and so must end with a newline), with its
/// line number.
fn last_line(path: &Path) -> Result<Option<(u64, Vec<u8>)>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut lines = LineReader::new(BufReader::with_capacity(1 << 20, file));
    let mut last = None;
    loop {
        let problem = match lines.next_line().map_err(|e| Error::io(path, e))? {
            Line::End => return Ok(last),
            Line::Complete => {
                last = Some((lines.line_number, lines.line().to_vec()));
                continue;
            }
            Line::Torn(_) => "an incomplete line at the end of a file that is not the newest",
            Line::TooLong => "a line longer than 1 MiB",
        };
        return Err(Error::Tampered {
            at: EntryLocation {
                file: path.to_path_buf(),
                line: lines.line_number,
                seq: 0,
            },
            kind: TamperKind::Malformed(problem.into()),
        });
    }
}
