//! `shardseal audit`: verify and read the tamper-evident audit logs of the broker and the
//! coordinator.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use shardseal_attestation::ModelId;
use shardseal_audit::{
    LogReader, PublicKey, Record, RecordBody, RecordFilter, Timestamp, VerifyOptions, VerifyReport,
    log_files, verify,
};

/// Verify or read an audit log.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  shardseal audit verify state/broker/audit --key state/broker/broker.pub\n  shardseal audit show state/coordinator/audit --kind request --model m --json"
)]
pub(crate) struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the hash chain and checkpoint signatures; exit non-zero naming the first bad entry.
    Verify(VerifyArgs),
    /// Print the entries as a table, or as JSON lines with --json (does not verify them).
    Show(ShowArgs),
}

#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  shardseal audit verify state/coordinator/audit --key state/coordinator/audit.key.pub"
)]
struct VerifyArgs {
    /// The log: a directory of audit-NNNNNN.log files, or one file.
    log: PathBuf,
    /// A checkpoint file kept away from the log: also detects a cut tail.
    #[arg(long, value_name = "FILE")]
    checkpoint: Option<PathBuf>,
    /// The writer's Ed25519 public key (64 hex digits, or a file holding them or the 32 raw
    /// bytes). Without it, the key named in the log itself is used.
    #[arg(long, value_name = "PUBHEX_OR_FILE")]
    key: Option<String>,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  shardseal audit show state/broker/audit --kind attest_denied\n  shardseal audit show state/coordinator/audit --kind request --since 2026-01-01 --json"
)]
struct ShowArgs {
    /// The log: a directory of audit-NNNNNN.log files, or one file.
    log: PathBuf,
    /// Only entries of this kind (key_released, attest_denied, request, checkpoint, ...).
    #[arg(long, value_name = "K")]
    kind: Option<String>,
    /// Only events about this model.
    #[arg(long, value_name = "M")]
    model: Option<String>,
    /// Only entries written at or after T (RFC 3339, a date, or unix seconds).
    #[arg(long, value_name = "T")]
    since: Option<String>,
    /// Print each entry's stored JSON line instead of a table.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: AuditArgs) -> anyhow::Result<()> {
    match args.command {
        AuditCommand::Verify(args) => run_verify(&args),
        AuditCommand::Show(args) => run_show(&args),
    }
}

fn run_verify(args: &VerifyArgs) -> anyhow::Result<()> {
    let mut options = VerifyOptions::default();
    if let Some(key) = &args.key {
        options = options.with_trusted_key(parse_key(key)?);
    }
    if let Some(checkpoint) = &args.checkpoint {
        options = options.with_checkpoint_file(checkpoint);
    }
    let files = log_files(&args.log)?;
    let report = verify(&files, &options).context("the audit log does not verify")?;
    print_or_broken_pipe(&describe(&report))
}

/// What a successful verification established, and what it could not.
fn describe(report: &VerifyReport) -> String {
    let mut text = format!(
        "OK: {} entries in {} file{}: {} events, {} signed checkpoint{}\n",
        report.entries,
        report.files,
        plural(report.files as u64),
        report.events,
        report.checkpoints,
        plural(report.checkpoints)
    );
    if report.key_pinned {
        text.push_str(&format!(
            "writer key: {} (pinned with --key)\n",
            report.writer
        ));
    } else {
        text.push_str(&format!(
            "writer key: {} (read from the log itself: pass --key to check who wrote it)\n",
            report.writer
        ));
    }
    if report.unsigned_events == 0 {
        text.push_str("signed: every event is covered by a signed checkpoint\n");
    } else if report.signed_entries == 0 {
        text.push_str(&format!(
            "signed: no checkpoint yet, so none of the {} events is covered by a signature\n",
            report.unsigned_events
        ));
    } else {
        text.push_str(&format!(
            "signed: entries 0..{}; the last {} events are not yet covered by a checkpoint\n",
            report.signed_entries, report.unsigned_events
        ));
    }
    match report.external_checkpoint {
        Some(count) => text.push_str(&format!(
            "external checkpoint: its {count} entries are all present and unchanged\n"
        )),
        None => text.push_str(
            "note: without --checkpoint, entries cut from the end of the log cannot be detected\n",
        ),
    }
    if report.torn_tail_bytes > 0 {
        text.push_str(&format!(
            "note: ignored an incomplete last line ({} bytes) left by a crash mid-write\n",
            report.torn_tail_bytes
        ));
    }
    text
}

fn plural(count: u64) -> &'static str {
    if count == 1 { "" } else { "s" }
}

/// `--key`: 64 hex digits, or a file holding them (or the 32 raw bytes).
fn parse_key(argument: &str) -> anyhow::Result<PublicKey> {
    if argument.len() == 64 && argument.bytes().all(|b| b.is_ascii_hexdigit()) {
        return PublicKey::from_hex(&argument.to_ascii_lowercase())
            .context("--key is not a public key");
    }
    let path = Path::new(argument);
    let bytes = std::fs::read(path).with_context(|| {
        format!("--key {argument:?} is neither 64 hex digits nor a readable key file")
    })?;
    if let Ok(raw) = <[u8; 32]>::try_from(bytes.as_slice()) {
        return Ok(PublicKey(raw));
    }
    let text = String::from_utf8_lossy(&bytes);
    PublicKey::from_hex(&text.trim().to_ascii_lowercase())
        .with_context(|| format!("{}: not a public key", path.display()))
}

fn run_show(args: &ShowArgs) -> anyhow::Result<()> {
    let mut filter = RecordFilter::all();
    if let Some(kind) = &args.kind {
        filter = filter.kind(kind)?;
    }
    if let Some(model) = &args.model {
        filter = filter.model(ModelId::new(model.as_str())?);
    }
    if let Some(since) = &args.since {
        filter = filter.since(Timestamp::parse(since)?);
    }
    let mut reader = LogReader::open(&args.log)?;
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let written = (|| -> anyhow::Result<()> {
        if !args.json {
            writeln!(
                out,
                "{:>8}  {:<24}  {:<19}  {:<16}  DETAILS",
                "SEQ", "TIME", "KIND", "MODEL"
            )?;
        }
        for entry in reader.by_ref() {
            let entry = entry?;
            if !filter.matches(&entry.record) {
                continue;
            }
            if args.json {
                writeln!(out, "{}", entry.line)?;
            } else {
                writeln!(out, "{}", table_row(&entry.record))?;
            }
        }
        out.flush()?;
        Ok(())
    })();
    match written {
        Err(e) if is_broken_pipe(&e) => return Ok(()),
        other => other?,
    }
    if reader.torn_tail_bytes() > 0 {
        eprintln!(
            "note: skipped an incomplete last line ({} bytes) left by a crash mid-write",
            reader.torn_tail_bytes()
        );
    }
    Ok(())
}

fn table_row(record: &Record) -> String {
    let (model, details) = match &record.body {
        RecordBody::Genesis(genesis) => {
            (None, format!("log started, writer key {}", genesis.writer))
        }
        RecordBody::Event(event) => (event.model().map(ModelId::to_string), event.details()),
        RecordBody::Checkpoint(checkpoint) => (
            None,
            format!(
                "signed: {} entries, head {}",
                checkpoint.count,
                &checkpoint.head.to_string()[..16]
            ),
        ),
        RecordBody::UnknownEvent { .. } => (None, "an event kind this build does not know".into()),
        _ => (None, String::new()),
    };
    format!(
        "{:>8}  {:<24}  {:<19}  {:<16}  {}",
        record.seq,
        record.time,
        record.body.kind_name(),
        model.as_deref().unwrap_or("-"),
        details
    )
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<io::Error>()
        .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

/// Prints to stdout; a reader that went away (`| head`) is not an error.
fn print_or_broken_pipe(text: &str) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardseal_audit::{
        AuditEvent, AuditWriter, CheckpointSigner, Ed25519Signer, SigningSeed, WriterOptions,
    };

    /// A scratch directory under the system temp dir, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("shardseal-cli-audit-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn signer() -> Ed25519Signer {
        Ed25519Signer::from_seed(&SigningSeed::from_bytes([3; 32])).unwrap()
    }

    fn write_log(dir: &Path) {
        let writer = AuditWriter::open(dir, signer(), WriterOptions::default()).unwrap();
        for version in 1..=4 {
            writer
                .append(&AuditEvent::ManifestServed {
                    model: ModelId::new("resnet").unwrap(),
                    version: shardseal_attestation::ModelVersion(version),
                })
                .unwrap();
        }
        writer.close().unwrap();
    }

    fn verify_args(log: &Path) -> VerifyArgs {
        VerifyArgs {
            log: log.to_path_buf(),
            checkpoint: None,
            key: None,
        }
    }

    #[test]
    fn verify_names_the_first_edited_entry() {
        let scratch = Scratch::new("edited");
        write_log(&scratch.0);
        assert!(run_verify(&verify_args(&scratch.0)).is_ok());
        let file = scratch.0.join("audit-000001.log");
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, text.replacen("\"version\":3", "\"version\":9", 1)).unwrap();
        let error = format!("{:#}", run_verify(&verify_args(&scratch.0)).unwrap_err());
        assert!(
            error.ends_with("line 4 (entry #3): hash mismatch: the entry was edited"),
            "{error}"
        );
    }

    #[test]
    fn the_report_says_what_was_not_checked() {
        let scratch = Scratch::new("report");
        write_log(&scratch.0);
        let report = verify(&log_files(&scratch.0).unwrap(), &VerifyOptions::default()).unwrap();
        let text = describe(&report);
        assert!(text.starts_with("OK: 6 entries in 1 file: 4 events, 1 signed checkpoint\n"));
        assert!(text.contains("pass --key"), "{text}");
        assert!(text.contains("without --checkpoint"), "{text}");
    }

    #[test]
    fn keys_are_read_as_hex_or_from_a_file() {
        let public = signer().public_key();
        let hex_key = hex_string(&public);
        assert_eq!(parse_key(&hex_key).unwrap().0, public);
        assert_eq!(parse_key(&hex_key.to_uppercase()).unwrap().0, public);
        let scratch = Scratch::new("keys");
        let text_file = scratch.0.join("writer.pub");
        std::fs::write(&text_file, format!("{hex_key}\n")).unwrap();
        assert_eq!(parse_key(text_file.to_str().unwrap()).unwrap().0, public);
        let raw_file = scratch.0.join("writer.raw");
        std::fs::write(&raw_file, public).unwrap();
        assert_eq!(parse_key(raw_file.to_str().unwrap()).unwrap().0, public);
        assert!(parse_key("not-a-key").is_err());
    }

    fn hex_string(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}
