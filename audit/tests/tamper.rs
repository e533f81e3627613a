//! Attack-side tests: every kind of tampering is named exactly (error kind and entry), crashes
//! mid-write are recovered, rotation keeps the chain verifiable across files.
//!
//! The forging helpers below recompute entry hashes from the format's definition in the crate
//! doc (not from the crate's code), so these tests also pin the documented format.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use shardseal_attestation::{Measurement, ModelId, ModelVersion, StageIndex};
use shardseal_audit::{
    AuditEvent, AuditWriter, Checkpoint, CheckpointSigner, Ed25519Signer, EntryHash, Error,
    FsyncPolicy, KeyFingerprint, LogReader, Outcome, PublicKey, Reason, RecordBody, RecordFilter,
    RequestId, SigningSeed, TamperKind, TeeName, Timestamp, VerifyOptions, VerifyReport,
    WriterOptions, log_files, verify,
};

fn signer(byte: u8) -> Ed25519Signer {
    Ed25519Signer::from_seed(&SigningSeed::from_bytes([byte; 32])).unwrap()
}

fn key(byte: u8) -> PublicKey {
    PublicKey(signer(byte).public_key())
}

fn model(name: &str) -> ModelId {
    ModelId::new(name).unwrap()
}

/// A varied stream of events: every fourth one a request, the others security decisions.
fn event(i: u64) -> AuditEvent {
    let name = if i.is_multiple_of(2) {
        "resnet"
    } else {
        "bert"
    };
    match i % 4 {
        0 => AuditEvent::KeyReleased {
            model: model(name),
            version: ModelVersion(1),
            stage: StageIndex(u32::try_from(i % 3).unwrap()),
            measurement: Measurement([i as u8; 32]),
        },
        1 => AuditEvent::AttestDenied {
            model: Some(model(name)),
            stage: None,
            measurement: Some(Measurement([7; 32])),
            reason: Reason::new("measurement not in the release policy"),
        },
        2 => AuditEvent::AttestAccepted {
            model: model(name),
            stage: StageIndex(0),
            measurement: Measurement([1; 32]),
            tee: TeeName::new("software").unwrap(),
        },
        _ => AuditEvent::Request {
            request_id: RequestId::from_bytes(&i.to_be_bytes()).unwrap(),
            model: model(name),
            version: ModelVersion(1),
            stages: 3,
            input_bytes: 1000 + i,
            output_bytes: 40,
            stage_us: vec![1200, 3400, 560],
            total_us: 5300,
            outcome: Outcome::Ok,
            failed_stage: None,
        },
    }
}

fn options(checkpoint_every: u64) -> WriterOptions {
    WriterOptions::default()
        .with_fsync(FsyncPolicy::OnCheckpoint)
        .with_checkpoint_every(checkpoint_every)
}

/// A closed log of `events` events with a checkpoint every 5: genesis at seq 0, events 1-5,
/// checkpoint 6, events 7-11, checkpoint 12, ... (close reuses a trailing checkpoint).
fn write_log(dir: &Path, events: u64) -> Checkpoint {
    let writer = AuditWriter::open(dir, signer(1), options(5)).unwrap();
    for i in 0..events {
        writer.append(&event(i)).unwrap();
    }
    writer.close().unwrap()
}

fn first_file(dir: &Path) -> PathBuf {
    dir.join("audit-000001.log")
}

fn read_lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    fs::write(path, text).unwrap();
}

fn verify_dir(dir: &Path, options: &VerifyOptions) -> Result<VerifyReport, Error> {
    verify(&log_files(dir).unwrap(), options)
}

/// Asserts the error is `Tampered` at `line` (of `file`) and chain position `seq`, and returns
/// its kind.
fn tampered_at(
    result: Result<VerifyReport, Error>,
    file: &Path,
    line: u64,
    seq: u64,
) -> TamperKind {
    match result {
        Err(Error::Tampered { at, kind }) => {
            assert_eq!(
                (at.file.as_path(), at.line, at.seq),
                (file, line, seq),
                "wrong entry named for {kind}"
            );
            kind
        }
        other => panic!("expected a tampered log, got {other:?}"),
    }
}

/// The JSON object of a line, without its hash member.
fn object(line: &str) -> Map<String, Value> {
    let mut map: Map<String, Value> = serde_json::from_str(line).unwrap();
    map.remove("hash").unwrap();
    map
}

/// A line for `object`, hashed as the crate doc defines: SHA-256 of the domain and the object
/// without its hash member, spliced in as the last member.
fn seal(object: &Map<String, Value>) -> String {
    let body = serde_json::to_string(object).unwrap();
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        &[b"shardseal-audit/entry/v1\n".as_slice(), body.as_bytes()].concat(),
    );
    format!(
        "{},\"hash\":\"{}\"}}",
        &body[..body.len() - 1],
        hex::encode(digest)
    )
}

fn hash_of(line: &str) -> String {
    let map: Map<String, Value> = serde_json::from_str(line).unwrap();
    map["hash"].as_str().unwrap().to_owned()
}

/// What an attacker without the key does after changing line `from`: renumbers and relinks
/// every later line so that hashes, seqs and links are consistent again.
fn rechain(lines: &mut [String], from: usize) {
    for i in from..lines.len() {
        let mut map = object(&lines[i]);
        map.insert("seq".into(), Value::from(i as u64));
        map.insert("prev".into(), Value::from(hash_of(&lines[i - 1])));
        lines[i] = seal(&map);
    }
}

#[test]
fn an_untouched_log_verifies_and_reports_what_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let last = write_log(dir.path(), 20);
    let report = verify_dir(dir.path(), &VerifyOptions::default()).unwrap();
    assert_eq!(report.entries, 25);
    assert_eq!(report.events, 20);
    assert_eq!(report.checkpoints, 4);
    assert_eq!(report.signed_entries, 24);
    assert_eq!(report.unsigned_events, 0);
    assert_eq!(report.writer, key(1));
    assert!(!report.key_pinned);
    assert_eq!(report.torn_tail_bytes, 0);
    assert_eq!(last.count, 24);
    let lines = read_lines(&first_file(dir.path()));
    assert_eq!(
        last.head,
        EntryHash::from_hex(&hash_of(&lines[23])).unwrap()
    );
    assert_eq!(report.head.to_string(), hash_of(&lines[24]));
}

#[test]
fn a_flipped_byte_is_an_edit_of_that_entry() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 20);
    let path = first_file(dir.path());
    let mut bytes = fs::read(&path).unwrap();
    let lines = read_lines(&path);
    // The middle byte of line 4 (seq 3), whatever field it falls in.
    let start: usize = lines[..3].iter().map(|l| l.len() + 1).sum();
    bytes[start + lines[3].len() / 2] ^= 0x01;
    fs::write(&path, bytes).unwrap();
    let kind = tampered_at(
        verify_dir(dir.path(), &VerifyOptions::default()),
        &path,
        4,
        3,
    );
    assert_eq!(kind, TamperKind::HashMismatch);
}

#[test]
fn an_edited_hash_is_an_edit_too() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 20);
    let path = first_file(dir.path());
    let mut lines = read_lines(&path);
    let old = hash_of(&lines[8]);
    let mut new = old.clone().into_bytes();
    new[0] = if new[0] == b'0' { b'1' } else { b'0' };
    let new = String::from_utf8(new).unwrap();
    lines[8] = lines[8].replace(&old, &new);
    write_lines(&path, &lines);
    let kind = tampered_at(
        verify_dir(dir.path(), &VerifyOptions::default()),
        &path,
        9,
        8,
    );
    assert_eq!(kind, TamperKind::HashMismatch);
}

#[test]
fn a_dropped_entry_is_named_where_it_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 20);
    let path = first_file(dir.path());
    let mut lines = read_lines(&path);
    lines.remove(3);
    write_lines(&path, &lines);
    let kind = tampered_at(
        verify_dir(dir.path(), &VerifyOptions::default()),
        &path,
        4,
        3,
    );
    assert_eq!(
        kind,
        TamperKind::OutOfSequence {
            expected: 3,
            found: 4
        }
    );
}

#[test]
fn two_swapped_entries_are_out_of_sequence() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 20);
    let path = first_file(dir.path());
    let mut lines = read_lines(&path);
    lines.swap(8, 9);
    write_lines(&path, &lines);
    let kind = tampered_at(
        verify_dir(dir.path(), &VerifyOptions::default()),
        &path,
        9,
        8,
    );
    assert_eq!(
        kind,
        TamperKind::OutOfSequence {
            expected: 8,
            found: 9
        }
    );
}

#[test]
fn an_inserted_entry_with_a_valid_hash_and_link_breaks_the_sequence_after_it() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 20);
    let path = first_file(dir.path());
    let mut lines = read_lines(&path);
    // A forged "key released" at seq 3, correctly hashed and linked to seq 2.
    let mut forged = object(&lines[3]);
    forged.insert("event".into(), serde_json::to_value(event(0)).unwrap());
    forged.insert("prev".into(), Value::from(hash_of(&lines[2])));
    lines.insert(3, seal(&forged));
    write_lines(&path, &lines);
    // The genuine seq 3, now on line 5, is where the chain visibly breaks.
    let kind = tampered_at(
        verify_dir(dir.path(), &VerifyOptions::default()),
        &path,
        5,
        4,
    );
    assert_eq!(
        kind,
        TamperKind::OutOfSequence {
            expected: 4,
            found: 3
        }
    );
}

#[test]
fn a_replaced_entry_with_a_valid_hash_breaks_the_link() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 20);
    let path = first_file(dir.path());
    let mut lines = read_lines(&path);
    let mut forged = object(&lines[3]);
    forged.insert("event".into(), serde_json::to_value(event(8)).unwrap());
    lines[3] = seal(&forged);
    write_lines(&path, &lines);
    // Line 4 itself is consistent; line 5's prev no longer matches it.
    let kind = tampered_at(
        verify_dir(dir.path(), &VerifyOptions::default()),
        &path,
        5,
        4,
    );
    assert_eq!(kind, TamperKind::BrokenLink);
}

#[test]
fn rewriting_history_without_the_key_is_caught_by_the_next_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 20);
    let path = first_file(dir.path());
    let original = read_lines(&path);

    // Delete seq 3 and re-chain everything after it: hashes and links all consistent, but the
    // checkpoint (now at seq 5, line 6) still claims count 6 and the old head.
    let mut lines = original.clone();
    lines.remove(3);
    rechain(&mut lines, 3);
    write_lines(&path, &lines);
    let kind = tampered_at(
        verify_dir(dir.path(), &VerifyOptions::default()),
        &path,
        6,
        5,
    );
    assert_eq!(kind, TamperKind::CheckpointMismatch);

    // Also update the checkpoint's count and head: its signature no longer verifies.
    let mut lines = original;
    lines.remove(3);
    rechain(&mut lines, 3);
    let mut checkpoint = object(&lines[5]);
    checkpoint["checkpoint"]["count"] = Value::from(5u64);
    checkpoint["checkpoint"]["head"] = Value::from(hash_of(&lines[4]));
    lines[5] = seal(&checkpoint);
    rechain(&mut lines, 6);
    write_lines(&path, &lines);
    let kind = tampered_at(
        verify_dir(dir.path(), &VerifyOptions::default()),
        &path,
        6,
        5,
    );
    assert_eq!(kind, TamperKind::BadSignature);
}

#[test]
fn a_checkpoint_signed_by_another_key_is_an_unknown_signer() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 20);
    let path = first_file(dir.path());
    let mut lines = read_lines(&path);
    // Re-sign the first checkpoint (line 7, seq 6) with a key of the forger's own.
    let mut map = object(&lines[6]);
    let head = EntryHash::from_hex(&hash_of(&lines[5])).unwrap();
    let forged = Checkpoint::sign(6, head, &signer(9));
    map.insert("checkpoint".into(), serde_json::to_value(&forged).unwrap());
    lines[6] = seal(&map);
    rechain(&mut lines, 7);
    write_lines(&path, &lines);
    let kind = tampered_at(
        verify_dir(dir.path(), &VerifyOptions::default()),
        &path,
        7,
        6,
    );
    assert_eq!(
        kind,
        TamperKind::UnknownSigner {
            found: key(9).to_string()
        }
    );
}

#[test]
fn a_log_rewritten_under_another_key_passes_alone_and_fails_with_the_key_pinned() {
    let genuine = tempfile::tempdir().unwrap();
    write_log(genuine.path(), 10);
    // The forger writes a whole log of its own: consistent, and signed by its own key.
    let forged = tempfile::tempdir().unwrap();
    let writer = AuditWriter::open(forged.path(), signer(9), options(5)).unwrap();
    writer.append(&event(1)).unwrap();
    writer.close().unwrap();

    let report = verify_dir(forged.path(), &VerifyOptions::default()).unwrap();
    assert_eq!(report.writer, key(9));
    assert!(!report.key_pinned);

    let pinned = VerifyOptions::default().with_trusted_key(key(1));
    assert!(verify_dir(genuine.path(), &pinned).unwrap().key_pinned);
    let kind = tampered_at(
        verify_dir(forged.path(), &pinned),
        &first_file(forged.path()),
        1,
        0,
    );
    assert_eq!(
        kind,
        TamperKind::UnknownSigner {
            found: key(9).to_string()
        }
    );
}

#[test]
fn a_cut_tail_passes_alone_and_is_caught_by_an_external_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let kept = tempfile::tempdir().unwrap();
    let checkpoint_path = kept.path().join("audit-head.json");
    let writer = AuditWriter::open(dir.path(), signer(1), options(5)).unwrap();
    for i in 0..20 {
        writer.append(&event(i)).unwrap();
    }
    let exported = writer.checkpoint_to(&checkpoint_path).unwrap();
    writer.close().unwrap();
    assert_eq!(exported.count, 24);

    let path = first_file(dir.path());
    let mut lines = read_lines(&path);
    // Keep seq 0..=20: the last checkpoint (seq 18) and two events after it.
    lines.truncate(21);
    write_lines(&path, &lines);

    let alone = verify_dir(dir.path(), &VerifyOptions::default()).unwrap();
    assert_eq!(alone.entries, 21);
    assert_eq!(alone.signed_entries, 18);
    assert_eq!(alone.unsigned_events, 2);
    assert_eq!(alone.external_checkpoint, None);

    let with_checkpoint = VerifyOptions::default().with_checkpoint_file(&checkpoint_path);
    let kind = tampered_at(verify_dir(dir.path(), &with_checkpoint), &path, 21, 20);
    assert_eq!(
        kind,
        TamperKind::Truncated {
            checkpoint_count: 24,
            log_count: 21
        }
    );
}

#[test]
fn an_intact_log_verifies_against_its_external_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let kept = tempfile::tempdir().unwrap();
    let checkpoint_path = kept.path().join("audit-head.json");
    let writer = AuditWriter::open(dir.path(), signer(1), options(0)).unwrap();
    for i in 0..7 {
        writer.append(&event(i)).unwrap();
    }
    writer.checkpoint_to(&checkpoint_path).unwrap();
    for i in 7..9 {
        writer.append(&event(i)).unwrap();
    }
    drop(writer);
    let report = verify_dir(
        dir.path(),
        &VerifyOptions::default()
            .with_checkpoint_file(&checkpoint_path)
            .with_trusted_key(key(1)),
    )
    .unwrap();
    // genesis, 7 events, exported checkpoint (seq 8), 2 events, checkpoint on drop (seq 11).
    assert_eq!(report.entries, 12);
    assert_eq!(report.external_checkpoint, Some(8));
    assert_eq!(report.signed_entries, 11);
    assert_eq!(report.unsigned_events, 0);
}

#[test]
fn forged_external_checkpoints_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let kept = tempfile::tempdir().unwrap();
    let genuine_path = kept.path().join("genuine.json");
    let writer = AuditWriter::open(dir.path(), signer(1), options(5)).unwrap();
    for i in 0..10 {
        writer.append(&event(i)).unwrap();
    }
    let genuine = writer.checkpoint_to(&genuine_path).unwrap();
    writer.close().unwrap();

    // An altered count: the signature no longer verifies.
    let altered_path = kept.path().join("altered.json");
    let text = fs::read_to_string(&genuine_path).unwrap().replace(
        &format!("\"count\": {}", genuine.count),
        &format!("\"count\": {}", genuine.count - 2),
    );
    fs::write(&altered_path, text).unwrap();
    let result = verify_dir(
        dir.path(),
        &VerifyOptions::default().with_checkpoint_file(&altered_path),
    );
    assert!(
        matches!(
            &result,
            Err(Error::CheckpointRejected { path, kind: TamperKind::BadSignature })
                if *path == altered_path
        ),
        "{result:?}"
    );

    // A valid signature by another key, over the log's real head.
    let other_path = kept.path().join("other.json");
    Checkpoint::sign(genuine.count, genuine.head, &signer(9))
        .write_to(&other_path)
        .unwrap();
    let unknown = TamperKind::UnknownSigner {
        found: key(9).to_string(),
    };
    for options in [
        VerifyOptions::default().with_checkpoint_file(&other_path),
        VerifyOptions::default()
            .with_checkpoint_file(&other_path)
            .with_trusted_key(key(1)),
    ] {
        let result = verify_dir(dir.path(), &options);
        assert!(
            matches!(&result, Err(Error::CheckpointRejected { kind, .. }) if *kind == unknown),
            "{result:?}"
        );
    }

    // A genuine checkpoint of a different history (same key): the head does not match.
    let other_log = tempfile::tempdir().unwrap();
    let fork_path = kept.path().join("fork.json");
    let writer = AuditWriter::open(other_log.path(), signer(1), options(5)).unwrap();
    writer.append(&event(3)).unwrap();
    let fork = writer.checkpoint_to(&fork_path).unwrap();
    writer.close().unwrap();
    assert_eq!(fork.count, 2);
    let kind = tampered_at(
        verify_dir(
            dir.path(),
            &VerifyOptions::default().with_checkpoint_file(&fork_path),
        ),
        &first_file(dir.path()),
        2,
        1,
    );
    assert_eq!(kind, TamperKind::CheckpointMismatch);
}

/// Set in the child process of the crash test: the log directory it writes and then dies in.
const CRASH_DIR_VAR: &str = "SHARDSEAL_AUDIT_TEST_CRASH_DIR";

/// Does nothing in a normal run. In the crash test's child process it appends 7 events and
/// aborts: a real process death, with no close, no checkpoint on drop, and the writer lock
/// released by the kernel.
#[test]
fn crash_child_process() {
    let Some(dir) = std::env::var_os(CRASH_DIR_VAR) else {
        return;
    };
    let writer = AuditWriter::open(PathBuf::from(dir), signer(1), options(5)).unwrap();
    for i in 0..7 {
        writer.append(&event(i)).unwrap();
    }
    std::process::abort();
}

#[test]
fn a_crash_mid_write_leaves_a_torn_line_that_is_dropped_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child_process", "--test-threads=1"])
        .env(CRASH_DIR_VAR, dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the child was meant to crash");
    let path = first_file(dir.path());
    let lines = read_lines(&path);
    assert_eq!(lines.len(), 9); // genesis, 5 events, checkpoint, 2 events
    // A crash in the middle of writing the next entry leaves part of a line.
    let half = &lines[8].as_bytes()[..lines[8].len() / 2];
    let mut bytes = fs::read(&path).unwrap();
    bytes.extend_from_slice(half);
    fs::write(&path, &bytes).unwrap();

    // What came before still verifies; the torn bytes are reported, not trusted.
    let report = verify_dir(dir.path(), &VerifyOptions::default()).unwrap();
    assert_eq!(report.entries, 9);
    assert_eq!(report.torn_tail_bytes, half.len() as u64);
    assert_eq!(report.unsigned_events, 2);

    // The writer comes back, cuts the torn line and continues the chain.
    let writer = AuditWriter::open(dir.path(), signer(1), options(5)).unwrap();
    assert_eq!(writer.recovered_torn_bytes(), half.len() as u64);
    assert_eq!(writer.next_seq(), 9);
    for i in 7..10 {
        writer.append(&event(i)).unwrap();
    }
    writer.close().unwrap();
    let report = verify_dir(dir.path(), &VerifyOptions::default()).unwrap();
    assert_eq!(report.events, 10);
    assert_eq!(report.torn_tail_bytes, 0);
    assert_eq!(report.unsigned_events, 0);
}

#[test]
fn a_crash_while_writing_the_genesis_entry_starts_the_log_again() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(first_file(dir.path()), b"{\"seq\":0,\"time\":17").unwrap();
    let writer = AuditWriter::open(dir.path(), signer(1), options(5)).unwrap();
    writer.append(&event(0)).unwrap();
    writer.close().unwrap();
    let report = verify_dir(dir.path(), &VerifyOptions::default()).unwrap();
    assert_eq!((report.entries, report.events), (3, 1));
}

#[test]
fn the_writer_refuses_a_tampered_log_and_a_foreign_one() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 10);
    let opened = AuditWriter::open(dir.path(), signer(2), options(5));
    assert!(
        matches!(&opened, Err(Error::SignerMismatch { log_writer, .. }) if *log_writer == key(1).to_string()),
        "{opened:?}"
    );

    let path = first_file(dir.path());
    let mut lines = read_lines(&path);
    lines.swap(2, 3);
    write_lines(&path, &lines);
    let opened = AuditWriter::open(dir.path(), signer(1), options(5));
    assert!(
        matches!(
            &opened,
            Err(Error::Tampered {
                at,
                kind: TamperKind::OutOfSequence { expected: 2, found: 3 }
            }) if at.line == 3
        ),
        "{opened:?}"
    );
}

fn rotated_log(dir: &Path) -> Vec<PathBuf> {
    let options = options(0).with_max_file_entries(10);
    let writer = AuditWriter::open(dir, signer(1), options).unwrap();
    for i in 0..25 {
        writer.append(&event(i)).unwrap();
    }
    writer.close().unwrap();
    log_files(dir).unwrap()
}

#[test]
fn rotation_keeps_one_chain_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let files = rotated_log(dir.path());
    assert_eq!(files.len(), 3);
    assert_eq!(files[2], dir.path().join("audit-000003.log"));
    // Each full file ends with a checkpoint; the next starts where it ended.
    let first = read_lines(&files[0]);
    let second = read_lines(&files[1]);
    assert!(first.last().unwrap().contains("\"checkpoint\""));
    assert_eq!(
        object(&second[0])["prev"].as_str().unwrap(),
        hash_of(first.last().unwrap())
    );
    let report = verify_dir(dir.path(), &VerifyOptions::default()).unwrap();
    assert_eq!(report.files, 3);
    assert_eq!(report.events, 25);
    assert_eq!(report.unsigned_events, 0);

    // A writer reopened on a rotated log continues the chain in the newest file.
    let writer =
        AuditWriter::open(dir.path(), signer(1), options(0).with_max_file_entries(10)).unwrap();
    assert_eq!(writer.next_seq(), report.entries);
    writer.append(&event(99)).unwrap();
    writer.close().unwrap();
    let report = verify_dir(dir.path(), &VerifyOptions::default()).unwrap();
    assert_eq!(report.events, 26);
}

#[test]
fn a_missing_middle_file_is_detected_at_the_start_of_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let files = rotated_log(dir.path());
    let seq_of = |line: &str| object(line)["seq"].as_u64().unwrap();
    let missing_from = seq_of(&read_lines(&files[1])[0]);
    let resumes_at = seq_of(&read_lines(&files[2])[0]);
    fs::remove_file(&files[1]).unwrap();
    let kind = tampered_at(
        verify_dir(dir.path(), &VerifyOptions::default()),
        &files[2],
        1,
        missing_from,
    );
    assert_eq!(
        kind,
        TamperKind::OutOfSequence {
            expected: missing_from,
            found: resumes_at
        }
    );
}

#[test]
fn a_missing_first_file_is_a_missing_genesis() {
    let dir = tempfile::tempdir().unwrap();
    let files = rotated_log(dir.path());
    fs::remove_file(&files[0]).unwrap();
    let kind = tampered_at(
        verify_dir(dir.path(), &VerifyOptions::default()),
        &files[1],
        1,
        0,
    );
    assert_eq!(kind, TamperKind::MissingGenesis);
}

#[test]
fn appends_from_many_threads_form_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let writer =
        std::sync::Arc::new(AuditWriter::open(dir.path(), signer(1), options(50)).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let writer = writer.clone();
            std::thread::spawn(move || {
                for i in 0..100 {
                    writer.append(&event(t * 100 + i)).unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    drop(writer);
    let report = verify_dir(dir.path(), &VerifyOptions::default()).unwrap();
    assert_eq!(report.events, 400);
    assert_eq!(report.checkpoints, 8);
}

#[test]
fn events_of_an_unknown_kind_verify_and_read_as_unknown() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 4);
    let path = first_file(dir.path());
    let mut lines = read_lines(&path);
    let mut future = object(lines.last().unwrap());
    future.remove("checkpoint");
    future.insert("seq".into(), Value::from(lines.len() as u64));
    future.insert("prev".into(), Value::from(hash_of(lines.last().unwrap())));
    future.insert(
        "event".into(),
        serde_json::json!({"kind": "quantum_leap", "x": 1}),
    );
    lines.push(seal(&future));
    write_lines(&path, &lines);
    let report = verify_dir(dir.path(), &VerifyOptions::default()).unwrap();
    assert_eq!((report.events, report.unsigned_events), (5, 1));
    let last = LogReader::open(dir.path())
        .unwrap()
        .last()
        .unwrap()
        .unwrap();
    assert_eq!(
        last.record.body,
        RecordBody::UnknownEvent {
            kind: "quantum_leap".into()
        }
    );
}

#[test]
fn the_reader_filters_by_kind_model_and_time() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 12);
    let kinds = |filter: RecordFilter| -> Vec<(u64, String)> {
        LogReader::open(dir.path())
            .unwrap()
            .map(Result::unwrap)
            .filter(|entry| filter.matches(&entry.record))
            .map(|entry| (entry.record.seq, entry.record.body.kind_name().to_owned()))
            .collect()
    };
    let released = kinds(RecordFilter::all().kind("key_released").unwrap());
    // Events 0, 4, 8 are key releases, at seq 1, 5 and 10 (seq 6 is a checkpoint).
    assert_eq!(
        released,
        [
            (1, "key_released"),
            (5, "key_released"),
            (10, "key_released")
        ]
        .map(|(s, k)| (s, k.to_owned()))
    );
    let bert = kinds(RecordFilter::all().model(model("bert")));
    assert_eq!(bert.len(), 6);
    assert!(bert.iter().all(|(_, kind)| kind != "key_released"));
    // Checkpoints at seq 6 and 12, and the one written on close at 15.
    assert_eq!(
        kinds(RecordFilter::all().kind("checkpoint").unwrap()).len(),
        3
    );
    assert_eq!(
        kinds(RecordFilter::all().since(Timestamp(u64::MAX))).len(),
        0
    );
    assert_eq!(kinds(RecordFilter::all().since(Timestamp(0))).len(), 16);
}

#[test]
fn no_event_field_can_hold_bytes() {
    // The owner's key is recorded as a fingerprint; reasons are bounded text.
    let owner = KeyFingerprint::of_public_key(&[4; 32]);
    let event = AuditEvent::ModelRegistered {
        model: model("resnet"),
        version: ModelVersion(3),
        stages: 4,
        owner,
    };
    let json = serde_json::to_string(&event).unwrap();
    assert!(!json.contains(&hex::encode([4u8; 32])));
    assert!(event.details().contains("4 stages"));
}

#[test]
fn a_second_writer_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = AuditWriter::open(dir.path(), signer(1), options(5)).unwrap();
    let second = AuditWriter::open(dir.path(), signer(1), options(5));
    assert!(
        matches!(&second, Err(Error::LogInUse { dir: locked }) if locked == dir.path()),
        "{second:?}"
    );
    first.close().unwrap();
    // The lock goes with the first writer.
    AuditWriter::open(dir.path(), signer(1), options(5))
        .unwrap()
        .close()
        .unwrap();
}

#[test]
fn events_appended_together_stay_together_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    // A checkpoint every 3 events falls inside some groups; fsync on every append.
    let writer = std::sync::Arc::new(
        AuditWriter::open(
            dir.path(),
            signer(1),
            options(3).with_fsync(FsyncPolicy::Always),
        )
        .unwrap(),
    );
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let writer = writer.clone();
            std::thread::spawn(move || {
                (0..25)
                    .map(|i| {
                        let first = t * 1000 + i * 10;
                        if i % 5 == 0 {
                            vec![writer.append(&event(first)).unwrap()]
                        } else {
                            writer
                                .append_all(&[event(first), event(first + 1), event(first + 2)])
                                .unwrap()
                        }
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let groups: Vec<Vec<u64>> = threads
        .into_iter()
        .flat_map(|thread| thread.join().unwrap())
        .collect();
    drop(writer);

    let report = verify_dir(dir.path(), &VerifyOptions::default()).unwrap();
    assert_eq!(report.events, 4 * (5 + 20 * 3));
    let records: std::collections::HashMap<u64, bool> = LogReader::open(dir.path())
        .unwrap()
        .map(|r| {
            let r = r.unwrap();
            (r.record.seq, matches!(r.record.body, RecordBody::Event(_)))
        })
        .collect();
    for group in groups.iter().filter(|g| g.len() > 1) {
        assert!(group.windows(2).all(|w| w[0] < w[1]), "{group:?}");
        for seq in group[0]..=group[group.len() - 1] {
            // Within a group: its own events, and a checkpoint at most.
            assert!(group.contains(&seq) || !records[&seq], "{group:?} {seq}");
        }
    }
}
