//! Finding a log's files and reading its records as a person or a tool would (no verification:
//! that is [`crate::verify`]).

use std::fs::{self, File};
use std::io::BufReader;
use std::path::{Path, PathBuf};

use shardseal_attestation::ModelId;

use crate::error::{EntryLocation, Error, Result, TamperKind};
use crate::event::EventKind;
use crate::record::{self, Line, LineReader, Record, RecordBody};
use crate::timestamp::Timestamp;

/// The name of the `index`-th file of a log directory (from 1): `audit-000001.log`.
pub fn segment_name(index: u32) -> String {
    format!("audit-{index:06}.log")
}

/// The index of a file named like [`segment_name`] makes, if it is one.
pub(crate) fn segment_index(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("audit-")?.strip_suffix(".log")?;
    if digits.len() < 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A log directory's files as `(index, path)`, oldest first.
pub(crate) fn segments(dir: &Path) -> Result<Vec<(u32, PathBuf)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        if let Some(index) = name.to_str().and_then(segment_index) {
            found.push((index, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The files of the log at `path`, in chain order: a directory's `audit-NNNNNN.log` files by
/// number, or a single file as given.
pub fn log_files(path: &Path) -> Result<Vec<PathBuf>> {
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let files: Vec<PathBuf> = segments(path)?.into_iter().map(|(_, p)| p).collect();
    if files.is_empty() {
        return Err(Error::NoLogFiles {
            path: path.to_path_buf(),
        });
    }
    Ok(files)
}

/// One record as read, with the exact line it was stored as.
#[derive(Debug, Clone)]
pub struct LogEntry {
    /// The parsed record.
    pub record: Record,
    /// The stored line, without its newline (valid JSON: the log format).
    pub line: String,
}

/// Reads the records of one or more log files in order, without verifying them.
///
/// A final line cut short by a crash (no newline at the end of the last file) is skipped and
/// counted in [`LogReader::torn_tail_bytes`]; any other unreadable line is an error, after which
/// the reader yields nothing more.
pub struct LogReader {
    files: std::vec::IntoIter<PathBuf>,
    current: Option<(PathBuf, LineReader<BufReader<File>>)>,
    torn_tail_bytes: u64,
    /// Records returned so far: the chain position of the next one.
    position: u64,
    failed: bool,
}

impl LogReader {
    /// Reads the log at `path` (a file or a log directory).
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self::from_files(log_files(path)?))
    }

    /// Reads the given files in order.
    pub fn from_files(files: Vec<PathBuf>) -> Self {
        Self {
            files: files.into_iter(),
            current: None,
            torn_tail_bytes: 0,
            position: 0,
            failed: false,
        }
    }

    /// Bytes of an incomplete final line skipped so far.
    pub fn torn_tail_bytes(&self) -> u64 {
        self.torn_tail_bytes
    }

    fn next_entry(&mut self) -> Result<Option<LogEntry>> {
        loop {
            let (path, lines) = match &mut self.current {
                Some(current) => current,
                None => {
                    let Some(path) = self.files.next() else {
                        return Ok(None);
                    };
                    let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
                    let lines = LineReader::new(BufReader::with_capacity(1 << 16, file));
                    self.current.insert((path, lines))
                }
            };
            let is_last_file = self.files.len() == 0;
            let kind = match lines.next_line().map_err(|e| Error::io(path, e))? {
                Line::End => {
                    self.current = None;
                    continue;
                }
                Line::Torn(bytes) if is_last_file => {
                    self.torn_tail_bytes += bytes;
                    self.current = None;
                    continue;
                }
                Line::Torn(_) => TamperKind::Malformed(
                    "an incomplete line at the end of a file that is not the newest".into(),
                ),
                Line::TooLong => TamperKind::Malformed("a line longer than 1 MiB".into()),
                Line::Complete => match record::parse_record(lines.line()) {
                    Ok(record) => {
                        let line = String::from_utf8_lossy(lines.line()).into_owned();
                        self.position += 1;
                        return Ok(Some(LogEntry { record, line }));
                    }
                    Err(kind) => kind,
                },
            };
            return Err(Error::Tampered {
                at: EntryLocation {
                    file: path.clone(),
                    line: lines.line_number,
                    seq: self.position,
                },
                kind,
            });
        }
    }
}

impl Iterator for LogReader {
    type Item = Result<LogEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let next = self.next_entry().transpose();
        if matches!(next, Some(Err(_))) {
            self.failed = true;
        }
        next
    }
}

/// Which records to show: all given conditions must hold.
#[derive(Debug, Clone, Default)]
pub struct RecordFilter {
    kind: Option<String>,
    model: Option<ModelId>,
    since: Option<Timestamp>,
}

impl RecordFilter {
    /// Every record.
    pub fn all() -> Self {
        Self::default()
    }

    /// Only records of `kind`: an event kind (`key_released`, ...), `checkpoint` or `genesis`.
    pub fn kind(mut self, kind: &str) -> Result<Self> {
        if kind != "checkpoint" && kind != "genesis" {
            kind.parse::<EventKind>().map_err(|_| {
                let known: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
                Error::invalid(
                    "kind",
                    format!(
                        "{kind:?}; known kinds: {}, checkpoint, genesis",
                        known.join(", ")
                    ),
                )
            })?;
        }
        self.kind = Some(kind.to_owned());
        Ok(self)
    }

    /// Only events about `model`.
    pub fn model(mut self, model: ModelId) -> Self {
        self.model = Some(model);
        self
    }

    /// Only records written at or after `since`.
    pub fn since(mut self, since: Timestamp) -> Self {
        self.since = Some(since);
        self
    }

    /// Whether `record` passes.
    pub fn matches(&self, record: &Record) -> bool {
        if self.since.is_some_and(|since| record.time < since) {
            return false;
        }
        if self
            .kind
            .as_deref()
            .is_some_and(|kind| record.body.kind_name() != kind)
        {
            return false;
        }
        match &self.model {
            None => true,
            Some(model) => {
                matches!(&record.body, RecordBody::Event(event) if event.model() == Some(model))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_parse_back_and_others_do_not() {
        assert_eq!(segment_name(2), "audit-000002.log");
        assert_eq!(segment_index("audit-000002.log"), Some(2));
        assert_eq!(segment_index("audit-1234567.log"), Some(1_234_567));
        for other in [
            "audit-2.log",
            "audit-000002.log.tmp",
            "x-000002.log",
            "audit-00000a.log",
        ] {
            assert_eq!(segment_index(other), None, "{other}");
        }
    }

    #[test]
    fn filter_refuses_unknown_kinds() {
        assert!(RecordFilter::all().kind("key_released").is_ok());
        assert!(RecordFilter::all().kind("checkpoint").is_ok());
        let err = RecordFilter::all().kind("keys").unwrap_err();
        assert!(err.to_string().contains("key_released"), "{err}");
    }
}
