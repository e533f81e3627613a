//! Benchmark: write 1,000,000 audit events, then time their verification.
//!
//! ```text
//! cargo run --release -p shardseal-audit --example verify_million [-- EVENTS]
//! ```
//!
//! Generation uses `FsyncPolicy::OnCheckpoint` (one fdatasync per 1000 events) instead of the
//! broker's default `Always`: fsyncing a million entries one by one measures the disk, not this
//! code, and only verification is being measured. Everything else is as in production: a
//! signed checkpoint every 1000 events, rotation every 64 MiB, a mix of security decisions and
//! per-request entries.

use std::error::Error;
use std::path::Path;
use std::time::Instant;

use shardseal_attestation::{Measurement, ModelId, ModelVersion, StageIndex};
use shardseal_audit::{
    AuditEvent, AuditWriter, Ed25519Signer, FsyncPolicy, Outcome, Reason, RequestId, SigningSeed,
    VerifyOptions, WriterOptions, log_files, verify,
};

fn main() -> Result<(), Box<dyn Error>> {
    let events: u64 = match std::env::args().nth(1) {
        Some(text) => text.parse()?,
        None => 1_000_000,
    };
    let dir = tempfile::tempdir()?;
    let kept = tempfile::tempdir()?;
    let checkpoint_path = kept.path().join("head.json");
    let seed = SigningSeed::generate()?;
    let signer = Ed25519Signer::from_seed(&seed)?;

    let started = Instant::now();
    write_events(dir.path(), signer, events, &checkpoint_path)?;
    let written = started.elapsed();

    let files = log_files(dir.path())?;
    let bytes: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()))
        .sum::<Result<u64, _>>()?;
    println!(
        "wrote {events} events in {} files ({:.1} MiB) in {:.2} s (fsync on checkpoint)",
        files.len(),
        bytes as f64 / (1 << 20) as f64,
        written.as_secs_f64()
    );

    for (label, options) in [
        ("alone", VerifyOptions::default()),
        (
            "with external checkpoint",
            VerifyOptions::default().with_checkpoint_file(&checkpoint_path),
        ),
    ] {
        let started = Instant::now();
        let report = verify(&files, &options)?;
        let took = started.elapsed().as_secs_f64();
        println!(
            "verified {} entries ({} events, {} checkpoints) {label} in {took:.2} s: \
             {:.0} entries/s, {:.0} MiB/s",
            report.entries,
            report.events,
            report.checkpoints,
            report.entries as f64 / took,
            bytes as f64 / (1 << 20) as f64 / took
        );
    }
    Ok(())
}

fn write_events(
    dir: &Path,
    signer: Ed25519Signer,
    events: u64,
    checkpoint_path: &Path,
) -> Result<(), Box<dyn Error>> {
    let options = WriterOptions::default().with_fsync(FsyncPolicy::OnCheckpoint);
    let writer = AuditWriter::open(dir, signer, options)?;
    let models = [ModelId::new("resnet-50")?, ModelId::new("bert-base")?];
    for i in 0..events {
        let model = models[(i % 2) as usize].clone();
        let event = match i % 8 {
            0 => AuditEvent::KeyReleased {
                model,
                version: ModelVersion(3),
                stage: StageIndex((i % 4) as u32),
                measurement: Measurement([(i % 251) as u8; 32]),
            },
            1 => AuditEvent::AttestDenied {
                model: Some(model),
                stage: Some(StageIndex(1)),
                measurement: Some(Measurement([9; 32])),
                reason: Reason::new("measurement is not in the release policy"),
            },
            _ => AuditEvent::Request {
                request_id: RequestId::from_bytes(&(i as u128).to_be_bytes())?,
                model,
                version: ModelVersion(3),
                stages: 3,
                input_bytes: 602_112 + i % 1000,
                output_bytes: 4_016,
                stage_us: vec![12_345, 23_456, 3_456],
                total_us: 41_000 + i % 977,
                outcome: Outcome::Ok,
                failed_stage: None,
            },
        };
        writer.append(&event)?;
    }
    writer.checkpoint_to(checkpoint_path)?;
    writer.close()?;
    Ok(())
}
