//! Writes a small sample audit log to try `shardseal audit verify` and `show` on.
//!
//! ```text
//! cargo run -p shardseal-audit --example sample_log -- DIR
//! shardseal audit verify DIR --checkpoint DIR.checkpoint.json --key "$(cat DIR.pub)"
//! shardseal audit show DIR --kind attest_denied
//! ```
//!
//! The writer key is derived from a fixed seed (this is a sample, not a deployment); its
//! public key is written to `DIR.pub`, and a checkpoint to `DIR.checkpoint.json`.

use std::error::Error;
use std::path::PathBuf;

use shardseal_attestation::{Measurement, ModelId, ModelVersion, StageIndex};
use shardseal_audit::{
    AuditEvent, AuditWriter, CheckpointSigner, Ed25519Signer, KeyFingerprint, Outcome, Reason,
    RequestId, SigningSeed, TeeName, WriterOptions,
};

fn main() -> Result<(), Box<dyn Error>> {
    let dir = PathBuf::from(std::env::args().nth(1).ok_or("usage: sample_log DIR")?);
    std::fs::create_dir_all(&dir)?;
    let signer = Ed25519Signer::from_seed(&SigningSeed::from_bytes([7; 32]))?;
    std::fs::write(
        dir.with_extension("pub"),
        format!("{}\n", hex::encode(signer.public_key())),
    )?;
    let writer = AuditWriter::open(&dir, signer, WriterOptions::default())?;
    let model = ModelId::new("resnet-50")?;
    let version = ModelVersion(1);
    let good = Measurement([0x5e; 32]);
    writer.append(&AuditEvent::ModelRegistered {
        model: model.clone(),
        version,
        stages: 2,
        owner: KeyFingerprint::of_public_key(&[0x0a; 32]),
    })?;
    for stage in 0..2 {
        writer.append(&AuditEvent::AttestAccepted {
            model: model.clone(),
            stage: StageIndex(stage),
            measurement: good,
            tee: TeeName::new("software")?,
        })?;
        writer.append(&AuditEvent::KeyReleased {
            model: model.clone(),
            version,
            stage: StageIndex(stage),
            measurement: good,
        })?;
    }
    writer.append(&AuditEvent::AttestDenied {
        model: Some(model.clone()),
        stage: Some(StageIndex(1)),
        measurement: Some(Measurement([0xba; 32])),
        reason: Reason::new("measurement is not in the release policy"),
    })?;
    writer.append(&AuditEvent::ManifestServed {
        model: model.clone(),
        version,
    })?;
    for i in 0u8..3 {
        writer.append(&AuditEvent::Request {
            request_id: RequestId::from_bytes(&[i; 16])?,
            model: model.clone(),
            version,
            stages: 2,
            input_bytes: 602_112,
            output_bytes: 4_016,
            stage_us: vec![18_250, 9_875],
            total_us: 31_400,
            outcome: Outcome::Ok,
            failed_stage: None,
        })?;
    }
    writer.checkpoint_to(dir.with_extension("checkpoint.json"))?;
    writer.close()?;
    Ok(())
}
