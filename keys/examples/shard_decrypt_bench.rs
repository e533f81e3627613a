//! Prints how fast a large shard seals and opens, in memory and from a file the way a
//! function reads it, to find where decryption time goes.
//!
//! ```text
//! cargo run --release -p shardseal-keys --example shard_decrypt_bench [-- SIZE_MIB]
//! ```
//!
//! GB/s is 10^9 plaintext bytes per second, best of five runs, default shard 128 MiB in
//! 1 MiB chunks. Rows:
//! - ring open_in_place: the cipher alone over the same chunks (the ceiling);
//! - SHA-256: ring's digest of the ciphertext (the manifest check);
//! - ShardOpener + copy: the per-chunk opener with each chunk copied into one buffer (how
//!   functions opened shards before);
//! - ShardOpener chunks: the per-chunk opener, chunks kept as they are (a function now);
//! - ShardPlaintextOpener: decrypting in place into one contiguous buffer;
//! - file → hash ‖ open: a function's path, from a file in the page cache in 256 KiB reads
//!   (as the local store reads), hashing on one thread while another opens.
//!
//! This example runs with the system allocator; a function binary also wipes what it frees
//! (`WipeOnFree`), which its `cold start` log line accounts for.

use std::hint::black_box;
use std::io::Read;
use std::time::{Duration, Instant};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use shardseal_attestation::{ModelId, ModelVersion, StageIndex};
use shardseal_keys::{
    DEFAULT_CHUNK_SIZE, ShardBinding, ShardKey, ShardOpener, ShardPlaintextOpener, ShardSealer,
};

fn best_gbps(bytes: usize, runs: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm up: page in buffers, key schedules, CPU feature detection
    let mut best = Duration::MAX;
    for _ in 0..runs {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed());
    }
    bytes as f64 / best.as_secs_f64() / 1e9
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(128);
    let size = mib << 20;
    let runs = 5;
    let plaintext: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    let key = ShardKey::generate()?;
    let binding = ShardBinding::new(ModelId::new("bench")?, ModelVersion(1), StageIndex(0));
    println!("shard: {mib} MiB, {} KiB chunks", DEFAULT_CHUNK_SIZE >> 10);

    let mut sealed = Vec::with_capacity(size + size / 1000 + 1024);
    let seal = best_gbps(size, runs, || {
        sealed.clear();
        let mut sealer = ShardSealer::new(&key, &binding, DEFAULT_CHUNK_SIZE).unwrap();
        sealer.update(&plaintext, &mut sealed).unwrap();
        sealer.finish(&mut sealed).unwrap();
    });
    println!("{:<44} {:>6.2} GB/s", "ShardSealer (seal)", seal);

    let ring_key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, &[7u8; 32]).map_err(|_| "ring rejected the key")?,
    );
    let mut chunks: Vec<Vec<u8>> = plaintext
        .chunks(DEFAULT_CHUNK_SIZE)
        .map(|c| {
            let mut c = c.to_vec();
            let tag = ring_key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key([0; 12]),
                    Aad::empty(),
                    &mut c,
                )
                .unwrap();
            c.extend_from_slice(tag.as_ref());
            c
        })
        .collect();
    let ceiling = best_gbps(size, runs, || {
        for c in chunks.iter_mut() {
            // Fails after the first run (the buffer is plaintext then): same work either way.
            let _ = black_box(ring_key.open_in_place(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::empty(),
                c,
            ));
        }
    });
    println!(
        "{:<44} {:>6.2} GB/s",
        "ring open_in_place (ceiling)", ceiling
    );

    let sha = best_gbps(size, runs, || {
        black_box(ring::digest::digest(&ring::digest::SHA256, &sealed));
    });
    println!(
        "{:<44} {:>6.2} GB/s",
        "SHA-256 of the ciphertext (ring)", sha
    );

    let copy = best_gbps(size, runs, || {
        let mut opener = ShardOpener::new(&key, binding.clone());
        let mut out = Vec::with_capacity(size);
        for piece in sealed.chunks(256 << 10) {
            for chunk in opener.update(piece).unwrap() {
                out.extend_from_slice(chunk.expose_secret());
            }
        }
        opener.finish().unwrap();
        black_box(out);
    });
    println!(
        "{:<44} {:>6.2} GB/s",
        "ShardOpener + copy into one buffer (before)", copy
    );

    let per_chunk = best_gbps(size, runs, || {
        let mut opener = ShardOpener::new(&key, binding.clone());
        let mut out = Vec::with_capacity(size / DEFAULT_CHUNK_SIZE + 1);
        for piece in sealed.chunks(256 << 10) {
            out.extend(opener.update(piece).unwrap());
        }
        opener.finish().unwrap();
        black_box(out);
    });
    println!(
        "{:<44} {:>6.2} GB/s",
        "ShardOpener chunks (function)", per_chunk
    );

    let contiguous = best_gbps(size, runs, || {
        let mut opener = ShardPlaintextOpener::new(&key, binding.clone(), size);
        for piece in sealed.chunks(256 << 10) {
            opener.update(piece).unwrap();
        }
        black_box(opener.finish().unwrap());
    });
    println!(
        "{:<44} {:>6.2} GB/s",
        "ShardPlaintextOpener (in place)", contiguous
    );

    let dir = std::env::temp_dir().join(format!("shardseal-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("stage.shard");
    std::fs::write(&path, &sealed)?;
    let pipelined = best_gbps(size, runs, || {
        let (send, receive) = std::sync::mpsc::sync_channel::<Vec<u8>>(32);
        let opener_key = ShardKey::from_bytes(*key.expose_secret());
        let opener_binding = binding.clone();
        let opening = std::thread::spawn(move || {
            let mut opener = ShardOpener::new(&opener_key, opener_binding);
            let mut out = Vec::new();
            for piece in receive {
                out.extend(opener.update(&piece).unwrap());
            }
            opener.finish().unwrap();
            out
        });
        let mut file = std::fs::File::open(&path).unwrap();
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        loop {
            let mut piece = vec![0u8; 256 << 10];
            let n = file.read(&mut piece).unwrap();
            if n == 0 {
                break;
            }
            piece.truncate(n);
            digest.update(&piece);
            send.send(piece).unwrap();
        }
        drop(send);
        black_box((digest.finish(), opening.join().unwrap()));
    });
    std::fs::remove_dir_all(&dir)?;
    println!(
        "{:<44} {:>6.2} GB/s",
        "file → SHA-256 ‖ ShardOpener (2 threads)", pipelined
    );
    Ok(())
}
