//! Prints AES-256-GCM throughput: ring, the `aes-gcm` crate (what the `hpke` crate uses),
//! both HPKE sealing paths of `shardseal-keys`, and shard sealing and opening; then what
//! one envelope costs whatever its size (HPKE's key agreement and key schedule).
//!
//! Run it optimized, on an otherwise idle machine:
//!
//! ```text
//! cargo run --release -p shardseal-keys --example aead_throughput
//! ```
//!
//! GB/s is 10^9 bytes of plaintext per second, best of several runs, one thread. The cost
//! of an envelope is the median of many seals (or opens) of 64 bytes.

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce as AesGcmNonce};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use shardseal_attestation::{ModelId, ModelVersion, StageIndex};
use shardseal_keys::{
    DEFAULT_CHUNK_SIZE, RecipientPrivateKey, ShardBinding, ShardKey, ShardOpener, ShardSealer,
    open_sealed, open_sealed_bulk, seal_bulk_to, seal_to,
};

const AAD: &[u8] = b"shardseal/v1/activation benchmark context";
const INFO: &[u8] = b"shardseal/v1/benchmark";

/// Runs `f` until at least `budget` has passed (and at least 3 times) and returns the best
/// throughput in GB/s for `bytes` per run.
fn best_gbps(bytes: usize, budget: Duration, mut f: impl FnMut()) -> f64 {
    f(); // warm up: page in buffers, initialise key schedules and CPU feature detection
    let start = Instant::now();
    let mut best = Duration::MAX;
    let mut runs = 0;
    while runs < 3 || start.elapsed() < budget {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed());
        runs += 1;
    }
    bytes as f64 / best.as_secs_f64() / 1e9
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let budget = Duration::from_millis(700);
    let key_bytes = [0x42u8; 32];
    let ring_key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, &key_bytes).map_err(|_| "ring rejected the key")?,
    );
    let rustcrypto = Aes256Gcm::new_from_slice(&key_bytes).map_err(|_| "bad key length")?;
    let recipient = RecipientPrivateKey::generate()?;
    let public = recipient.public_key();

    println!("{:<44} {:>10} {:>10}", "operation", "1 MiB", "64 MiB");
    let sizes = [1usize << 20, 64 << 20];
    let mut rows: Vec<(&str, Vec<f64>)> = Vec::new();

    let mut row = Vec::new();
    for &size in &sizes {
        let mut buf = vec![0x5au8; size];
        row.push(best_gbps(size, budget, || {
            let tag = ring_key.seal_in_place_separate_tag(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::from(AAD),
                black_box(&mut buf),
            );
            black_box(tag.ok());
        }));
    }
    rows.push(("ring AES-256-GCM seal", row));

    let mut row = Vec::new();
    for &size in &sizes {
        let mut buf = vec![0x5au8; size];
        let nonce = AesGcmNonce::from_slice(&[0u8; 12]);
        row.push(best_gbps(size, budget, || {
            let tag = rustcrypto.encrypt_in_place_detached(nonce, AAD, black_box(&mut buf));
            black_box(tag.ok());
        }));
    }
    rows.push(("aes-gcm crate AES-256-GCM seal", row));

    let mut row = Vec::new();
    for &size in &sizes {
        let plaintext = vec![0x5au8; size];
        row.push(best_gbps(size, budget, || {
            black_box(seal_to(&public, INFO, AAD, black_box(&plaintext)).ok());
        }));
    }
    rows.push(("HPKE seal, hpke's AEAD (seal_to)", row));

    let mut row = Vec::new();
    for &size in &sizes {
        let plaintext = vec![0x5au8; size];
        row.push(best_gbps(size, budget, || {
            black_box(seal_bulk_to(&public, INFO, AAD, black_box(&plaintext)).ok());
        }));
    }
    rows.push(("HPKE seal, export + ring (seal_bulk_to)", row));

    let mut row = Vec::new();
    for &size in &sizes {
        let sealed = seal_to(&public, INFO, AAD, &vec![0x5au8; size])?;
        row.push(best_gbps(size, budget, || {
            black_box(open_sealed(&recipient, INFO, AAD, &sealed).ok());
        }));
    }
    rows.push(("HPKE open, hpke's AEAD (open_sealed)", row));

    let mut row = Vec::new();
    for &size in &sizes {
        let sealed = seal_bulk_to(&public, INFO, AAD, &vec![0x5au8; size])?;
        row.push(best_gbps(size, budget, || {
            black_box(open_sealed_bulk(&recipient, INFO, AAD, &sealed).ok());
        }));
    }
    rows.push(("HPKE open, export + ring (open_sealed_bulk)", row));

    let shard_key = ShardKey::generate()?;
    let binding = ShardBinding::new(ModelId::new("bench")?, ModelVersion(1), StageIndex(0));
    let mut row = Vec::new();
    let mut sealed_shards = Vec::new();
    for &size in &sizes {
        let plaintext = vec![0x5au8; size];
        let mut out = Vec::with_capacity(size + size / 1000 + 1024);
        row.push(best_gbps(size, budget, || {
            out.clear();
            let sealed = ShardSealer::new(&shard_key, &binding, DEFAULT_CHUNK_SIZE).and_then(
                |mut sealer| {
                    sealer.update(black_box(&plaintext), &mut out)?;
                    sealer.finish(&mut out)
                },
            );
            black_box(sealed.ok());
        }));
        sealed_shards.push(out);
    }
    rows.push(("shard seal, 1 MiB chunks", row));

    let mut row = Vec::new();
    for (ciphertext, &size) in sealed_shards.iter().zip(&sizes) {
        row.push(best_gbps(size, budget, || {
            let mut opener = ShardOpener::new(&shard_key, binding.clone());
            let mut total = 0usize;
            // Feed it in 64 KiB pieces, as a download would arrive.
            for piece in ciphertext.chunks(64 << 10) {
                if let Ok(chunks) = opener.update(piece) {
                    total += chunks
                        .iter()
                        .map(|c| c.expose_secret().len())
                        .sum::<usize>();
                }
            }
            black_box((total, opener.finish().ok()));
        }));
    }
    rows.push(("shard open, 1 MiB chunks, 64 KiB reads", row));

    for (name, figures) in rows {
        println!(
            "{:<44} {:>6.2} GB/s {:>5.2} GB/s",
            name, figures[0], figures[1]
        );
    }

    let small = [0x5au8; 64];
    let sealed = seal_bulk_to(&public, INFO, AAD, &small)?;
    println!(
        "one envelope of 64 bytes (HPKE key agreement and schedule): seal {:.1} us, open {:.1} us",
        median_us(|| {
            black_box(seal_bulk_to(&public, INFO, AAD, black_box(&small)).ok());
        }),
        median_us(|| {
            black_box(open_sealed_bulk(&recipient, INFO, AAD, black_box(&sealed)).ok());
        }),
    );
    Ok(())
}

/// The median time of 1,000 runs of `f`, after 50 to warm up, in microseconds.
fn median_us(mut f: impl FnMut()) -> f64 {
    for _ in 0..50 {
        f();
    }
    let mut times: Vec<f64> = (0..1_000)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}
