//! The line format: how a record is encoded and hashed, how a line is read back, and the chain
//! check shared by the writer (on open) and by verification.

use std::io::{self, BufRead};

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, EntryHash, PublicKey};
use crate::error::{Error, Result, TamperKind};
use crate::event::AuditEvent;
use crate::timestamp::Timestamp;

/// Prefix of every entry hash: an entry hash can never collide with another SHA-256 use.
pub(crate) const ENTRY_DOMAIN: &[u8] = b"shardseal-audit/entry/v1\n";

/// The last member of every line, before its 64 hex digits and the closing `"}`.
const HASH_MEMBER: &[u8] = b",\"hash\":\"";

/// `,"hash":"` + 64 hex digits + `"}`: the fixed-size tail of every line.
const HASH_TAIL_LEN: usize = HASH_MEMBER.len() + 64 + 2;

/// The longest line a reader accepts: real entries are well under a kilobyte, and a reader of
/// a hostile file must not buffer gigabytes looking for a newline.
pub(crate) const MAX_LINE_BYTES: usize = 1 << 20;

/// The `prev` of the genesis entry.
const ZERO_HASH_HEX: [u8; 64] = [b'0'; 64];

/// The first entry of every chain: it names the writer key that signs the chain's checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Genesis {
    /// The format version of the log (1).
    pub format: u32,
    /// The writer's Ed25519 public key.
    pub writer: PublicKey,
}

/// What a record holds.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RecordBody {
    /// The chain's first entry.
    Genesis(Genesis),
    /// An audit event.
    Event(AuditEvent),
    /// An event of a kind this build does not know (written by a newer writer); its integrity
    /// is still checked by verification.
    UnknownEvent {
        /// The event's `kind` field, if it had one.
        kind: String,
    },
    /// A signed checkpoint of everything before it.
    Checkpoint(Checkpoint),
}

impl RecordBody {
    /// The record's kind as shown and filtered on: an event kind, `genesis` or `checkpoint`.
    pub fn kind_name(&self) -> &str {
        match self {
            Self::Genesis(_) => "genesis",
            Self::Event(event) => event.kind().as_str(),
            Self::UnknownEvent { kind } => kind,
            Self::Checkpoint(_) => "checkpoint",
        }
    }
}

/// One record of the log, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Its position in the chain, from 0 (the genesis entry).
    pub seq: u64,
    /// When it was written.
    pub time: Timestamp,
    /// What it holds.
    pub body: RecordBody,
}

#[derive(Serialize)]
struct RecordOut<'a> {
    seq: u64,
    time: Timestamp,
    prev: &'a EntryHash,
    #[serde(skip_serializing_if = "Option::is_none")]
    genesis: Option<&'a Genesis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a AuditEvent>,
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint: Option<&'a Checkpoint>,
}

/// What the writer appends.
pub(crate) enum BodyRef<'a> {
    Genesis(&'a Genesis),
    Event(&'a AuditEvent),
    Checkpoint(&'a Checkpoint),
}

/// Encodes one record as a full line (with its newline) and returns the line and its hash.
///
/// The JSON object is written without the hash, hashed with [`ENTRY_DOMAIN`] in front, and the
/// hash is then spliced in as the object's last member.
pub(crate) fn encode(
    seq: u64,
    time: Timestamp,
    prev: &EntryHash,
    body: BodyRef<'_>,
) -> Result<(Vec<u8>, EntryHash)> {
    let mut out = RecordOut {
        seq,
        time,
        prev,
        genesis: None,
        event: None,
        checkpoint: None,
    };
    match body {
        BodyRef::Genesis(genesis) => out.genesis = Some(genesis),
        BodyRef::Event(event) => out.event = Some(event),
        BodyRef::Checkpoint(checkpoint) => out.checkpoint = Some(checkpoint),
    }
    let mut line = serde_json::to_vec(&out).map_err(Error::Encode)?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(ENTRY_DOMAIN);
    context.update(&line);
    let mut hash = EntryHash([0; 32]);
    hash.0.copy_from_slice(context.finish().as_ref());
    // Replace the closing brace with the hash member, then close the object again.
    line.pop();
    line.extend_from_slice(HASH_MEMBER);
    line.extend_from_slice(hex::encode(hash.0).as_bytes());
    line.extend_from_slice(b"\"}\n");
    Ok((line, hash))
}

/// Checks a line's hash against its bytes; returns the stored hash's hex digits.
///
/// Works on bytes before any JSON parsing, so an edit anywhere in the line is reported as an
/// edit, not as whatever parse error it happens to cause.
fn check_hash(line: &[u8]) -> Result<&[u8], TamperKind> {
    let malformed = || {
        TamperKind::Malformed(
            "the line does not end with a \"hash\" member of 64 hex digits".into(),
        )
    };
    let split = line
        .len()
        .checked_sub(HASH_TAIL_LEN)
        .ok_or_else(malformed)?;
    let (object, tail) = line.split_at(split);
    if !tail.starts_with(HASH_MEMBER) || !tail.ends_with(b"\"}") {
        return Err(malformed());
    }
    let stored = &tail[HASH_MEMBER.len()..HASH_MEMBER.len() + 64];
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(ENTRY_DOMAIN);
    context.update(object);
    context.update(b"}");
    let mut computed = [0u8; 64];
    // 32 bytes always fit 64 hex digits.
    hex::encode_to_slice(context.finish().as_ref(), &mut computed).map_err(|_| malformed())?;
    // Comparing hex text (lower case, as written) means an upper-cased digit is an edit too.
    if computed != stored {
        return Err(TamperKind::HashMismatch);
    }
    Ok(stored)
}

/// The fields verification needs, borrowed from the line; events are skipped unparsed (their
/// bytes are covered by the hash, and verification must not depend on knowing every kind).
#[derive(Deserialize)]
struct RecordHead<'a> {
    seq: u64,
    #[allow(dead_code)] // parsed to check the line's shape
    time: u64,
    #[serde(borrow)]
    prev: &'a str,
    #[serde(default)]
    genesis: Option<Genesis>,
    #[serde(default)]
    event: Option<IgnoredAny>,
    #[serde(default)]
    checkpoint: Option<Checkpoint>,
}

/// Parses a line into a [`Record`] without checking its hash (for reading, not verifying).
pub(crate) fn parse_record(line: &[u8]) -> Result<Record, TamperKind> {
    #[derive(Deserialize)]
    struct Full {
        seq: u64,
        time: Timestamp,
        #[serde(default)]
        genesis: Option<Genesis>,
        #[serde(default)]
        event: Option<serde_json::Value>,
        #[serde(default)]
        checkpoint: Option<Checkpoint>,
    }
    let full: Full =
        serde_json::from_slice(line).map_err(|e| TamperKind::Malformed(e.to_string()))?;
    let body = match (full.genesis, full.event, full.checkpoint) {
        (Some(genesis), None, None) => RecordBody::Genesis(genesis),
        (None, None, Some(checkpoint)) => RecordBody::Checkpoint(checkpoint),
        (None, Some(value), None) => {
            let kind = value
                .get("kind")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("unknown")
                .to_owned();
            match serde_json::from_value::<AuditEvent>(value) {
                Ok(event) => RecordBody::Event(event),
                Err(_) => RecordBody::UnknownEvent { kind },
            }
        }
        _ => return Err(one_body_expected()),
    };
    Ok(Record {
        seq: full.seq,
        time: full.time,
        body,
    })
}

/// Checks a line's hash and returns its seq and hash, without the chain context (for the
/// writer, to resume after the last entry of a previous file).
pub(crate) fn inspect(line: &[u8]) -> Result<(u64, EntryHash), TamperKind> {
    let stored = check_hash(line)?;
    let head: RecordHead<'_> =
        serde_json::from_slice(line).map_err(|e| TamperKind::Malformed(e.to_string()))?;
    let mut hash = EntryHash([0; 32]);
    hex::decode_to_slice(stored, &mut hash.0).map_err(|e| TamperKind::Malformed(e.to_string()))?;
    Ok((head.seq, hash))
}

fn one_body_expected() -> TamperKind {
    TamperKind::Malformed("expected exactly one of genesis, event, checkpoint".into())
}

/// Walks a chain entry by entry: the one place where the chain's rules are written down.
#[derive(Debug, Clone)]
pub(crate) struct ChainChecker {
    /// The seq the next entry must carry.
    pub(crate) next_seq: u64,
    /// Hex of the last entry's hash (zeros before the genesis entry).
    head_hex: [u8; 64],
    /// The writer key, once the genesis entry named it (or as pinned).
    pub(crate) writer: Option<PublicKey>,
    /// A key the genesis entry must name, if the caller pinned one.
    pinned: Option<PublicKey>,
    /// Events seen.
    pub(crate) events: u64,
    /// Checkpoints seen (all verified).
    pub(crate) checkpoints: u64,
    /// The number of entries covered by the last checkpoint (0 before any).
    pub(crate) signed_count: u64,
    /// Events covered by the last checkpoint.
    pub(crate) signed_events: u64,
    /// The last entry, if it is a checkpoint.
    pub(crate) trailing_checkpoint: Option<Checkpoint>,
}

impl ChainChecker {
    /// A checker for a whole chain, from its genesis entry.
    pub(crate) fn from_genesis(pinned: Option<PublicKey>) -> Self {
        Self {
            next_seq: 0,
            head_hex: ZERO_HASH_HEX,
            writer: None,
            pinned,
            events: 0,
            checkpoints: 0,
            signed_count: 0,
            signed_events: 0,
            trailing_checkpoint: None,
        }
    }

    /// A checker that continues a chain after the entry `next_seq - 1` whose hash is `head`.
    pub(crate) fn resume(next_seq: u64, head: &EntryHash, writer: PublicKey) -> Self {
        let mut head_hex = [0u8; 64];
        // 32 bytes always fit 64 hex digits.
        let _ = hex::encode_to_slice(head.0, &mut head_hex);
        Self {
            next_seq,
            head_hex,
            writer: Some(writer),
            pinned: Some(writer),
            ..Self::from_genesis(None)
        }
    }

    /// The hash of the last entry checked.
    pub(crate) fn head(&self) -> EntryHash {
        let mut head = EntryHash([0; 32]);
        // head_hex only ever holds hex that passed the hash check (or zeros).
        let _ = hex::decode_to_slice(self.head_hex, &mut head.0);
        head
    }

    /// Checks the next line (without its newline) and advances past it.
    pub(crate) fn check(&mut self, line: &[u8]) -> Result<(), TamperKind> {
        let stored = check_hash(line)?;
        let head: RecordHead<'_> =
            serde_json::from_slice(line).map_err(|e| TamperKind::Malformed(e.to_string()))?;
        let (genesis, is_event, checkpoint) = (head.genesis, head.event.is_some(), head.checkpoint);
        if usize::from(genesis.is_some())
            + usize::from(is_event)
            + usize::from(checkpoint.is_some())
            != 1
        {
            return Err(one_body_expected());
        }
        if self.next_seq == 0 {
            let Some(genesis) = genesis else {
                return Err(TamperKind::MissingGenesis);
            };
            if head.seq != 0 || head.prev.as_bytes() != ZERO_HASH_HEX {
                return Err(TamperKind::MissingGenesis);
            }
            if self.pinned.is_some_and(|key| key != genesis.writer) {
                return Err(TamperKind::UnknownSigner {
                    found: genesis.writer.to_string(),
                });
            }
            self.writer = Some(genesis.writer);
        } else {
            if head.seq != self.next_seq {
                return Err(TamperKind::OutOfSequence {
                    expected: self.next_seq,
                    found: head.seq,
                });
            }
            if head.prev.as_bytes() != self.head_hex {
                return Err(TamperKind::BrokenLink);
            }
            if genesis.is_some() {
                return Err(TamperKind::Malformed(
                    "a genesis entry after the start of the chain".into(),
                ));
            }
        }
        self.trailing_checkpoint = None;
        if let Some(checkpoint) = checkpoint {
            if Some(checkpoint.signer) != self.writer {
                return Err(TamperKind::UnknownSigner {
                    found: checkpoint.signer.to_string(),
                });
            }
            if !checkpoint.signature_is_valid() {
                return Err(TamperKind::BadSignature);
            }
            // The checkpoint entry at seq s covers entries 0..s, ending at its own prev.
            let mut covered_head_hex = [0u8; 64];
            let _ = hex::encode_to_slice(checkpoint.head.0, &mut covered_head_hex);
            if checkpoint.count != head.seq || covered_head_hex != self.head_hex {
                return Err(TamperKind::CheckpointMismatch);
            }
            self.checkpoints += 1;
            self.signed_count = checkpoint.count;
            self.signed_events = self.events;
            self.trailing_checkpoint = Some(checkpoint);
        } else if is_event {
            self.events += 1;
        }
        self.head_hex.copy_from_slice(stored);
        self.next_seq += 1;
        Ok(())
    }
}

/// One step of reading a log file line by line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Line {
    /// A complete line, now in [`LineReader::line`].
    Complete,
    /// Bytes after the last newline at the end of the file: a write cut short by a crash.
    Torn(u64),
    /// A line longer than [`MAX_LINE_BYTES`].
    TooLong,
    /// The end of the file.
    End,
}

/// Streams lines with one reused buffer, and bounds their length.
pub(crate) struct LineReader<R> {
    inner: R,
    line: Vec<u8>,
    /// The number of the line last returned (complete, torn or too long), counted from 1.
    pub(crate) line_number: u64,
    /// Bytes up to and including the last complete line's newline.
    pub(crate) complete_bytes: u64,
}

impl<R: BufRead> LineReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            line: Vec::with_capacity(1024),
            line_number: 0,
            complete_bytes: 0,
        }
    }

    /// The complete line last returned, without its newline.
    pub(crate) fn line(&self) -> &[u8] {
        &self.line
    }

    pub(crate) fn next_line(&mut self) -> io::Result<Line> {
        self.line.clear();
        loop {
            let available = self.inner.fill_buf()?;
            if available.is_empty() {
                if self.line.is_empty() {
                    return Ok(Line::End);
                }
                self.line_number += 1;
                return Ok(Line::Torn(self.line.len() as u64));
            }
            if let Some(end) = available.iter().position(|&b| b == b'\n') {
                self.line.extend_from_slice(&available[..end]);
                self.inner.consume(end + 1);
                self.line_number += 1;
                self.complete_bytes += self.line.len() as u64 + 1;
                return Ok(if self.line.len() > MAX_LINE_BYTES {
                    Line::TooLong
                } else {
                    Line::Complete
                });
            }
            let taken = available.len();
            self.line.extend_from_slice(available);
            self.inner.consume(taken);
            if self.line.len() > MAX_LINE_BYTES {
                self.line_number += 1;
                return Ok(Line::TooLong);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{Ed25519Signer, SigningSeed};

    fn genesis_line() -> (Vec<u8>, EntryHash, PublicKey) {
        let signer = Ed25519Signer::from_seed(&SigningSeed::from_bytes([5; 32])).unwrap();
        let writer = PublicKey(crate::CheckpointSigner::public_key(&signer));
        let genesis = Genesis { format: 1, writer };
        let (line, hash) = encode(
            0,
            Timestamp(1),
            &EntryHash([0; 32]),
            BodyRef::Genesis(&genesis),
        )
        .unwrap();
        (line, hash, writer)
    }

    #[test]
    fn the_hash_is_sha256_of_the_domain_and_the_object_without_its_hash_member() {
        let (line, hash, writer) = genesis_line();
        let text = String::from_utf8(line).unwrap();
        let object = format!(
            r#"{{"seq":0,"time":1,"prev":"{}","genesis":{{"format":1,"writer":"{writer}"}}}}"#,
            "0".repeat(64)
        );
        let expected = ring::digest::digest(
            &ring::digest::SHA256,
            &[ENTRY_DOMAIN, object.as_bytes()].concat(),
        );
        assert_eq!(hash.0.as_slice(), expected.as_ref());
        assert_eq!(
            text,
            format!(
                "{}{}\"hash\":\"{}\"}}\n",
                &object[..object.len() - 1],
                ",",
                hex::encode(expected)
            )
        );
    }

    #[test]
    fn upper_casing_a_hash_digit_is_an_edit() {
        let (line, _, _) = genesis_line();
        let mut text = String::from_utf8(line).unwrap();
        text.pop();
        let at = text.len() - 3;
        let digit = text.as_bytes()[at];
        let mut bytes = text.into_bytes();
        bytes[at] = if digit.is_ascii_digit() {
            b'F'
        } else {
            digit.to_ascii_uppercase()
        };
        assert_eq!(check_hash(&bytes), Err(TamperKind::HashMismatch));
    }

    #[test]
    fn line_reader_reports_torn_and_overlong_lines() {
        let data = b"one\ntwo\nthr".to_vec();
        let mut reader = LineReader::new(io::BufReader::new(&data[..]));
        assert_eq!(reader.next_line().unwrap(), Line::Complete);
        assert_eq!(reader.line(), b"one");
        assert_eq!(reader.next_line().unwrap(), Line::Complete);
        assert_eq!(reader.line(), b"two");
        assert_eq!(reader.next_line().unwrap(), Line::Torn(3));
        assert_eq!(reader.line_number, 3);
        assert_eq!(reader.complete_bytes, 8);
        let long = vec![b'x'; MAX_LINE_BYTES + 10];
        let mut reader = LineReader::new(io::BufReader::new(&long[..]));
        assert_eq!(reader.next_line().unwrap(), Line::TooLong);
    }
}
