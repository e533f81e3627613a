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
//! - SHA-256 of the ciphertext: what the manifest check cost when the shard digest covered
//!   every ciphertext byte (it now covers the header, frames and tags);
//! - ShardOpener: gathering and opening on one thread (copy into fresh chunk buffers, then
//!   decrypt in place);
//! - ChunkOpener: the opening half alone over gathered chunks (a function's decrypting
//!   thread; the shard digest included);
//! - file → gather ‖ open: a function's path, from a file in the page cache in 256 KiB
//!   reads (as the local store reads), gathering on one thread while another opens.
//!
//! This example runs with the system allocator; a function binary also wipes what it frees
//! (`WipeOnFree`), which its `cold start` log line accounts for.

use std::hint::black_box;
use std::io::Read;
use std::time::{Duration, Instant};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use shardseal_attestation::{ModelId, ModelVersion, StageIndex};
use shardseal_keys::{
    ChunkOpener, DEFAULT_CHUNK_SIZE, ShardBinding, ShardGatherer, ShardKey, ShardOpener,
    ShardSealer,
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
        "SHA-256 of the ciphertext (former digest)", sha
    );

    let one_thread = best_gbps(size, runs, || {
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
        "ShardOpener (gather + open, one thread)", one_thread
    );

    // The opening half alone, as a function's decrypting thread runs it: each run opens
    // chunks gathered (copied into their own buffers) before the clock starts.
    let mut best = Duration::MAX;
    for run in 0..=runs {
        let mut gatherer = ShardGatherer::new(binding.clone());
        let mut gathered = Vec::new();
        for piece in sealed.chunks(256 << 10) {
            gatherer.update(piece, &mut gathered).unwrap();
        }
        gatherer.finish().unwrap();
        let t = Instant::now();
        let mut opener = ChunkOpener::new(&key, binding.clone());
        let opened: Vec<_> = gathered
            .into_iter()
            .map(|c| opener.open(c).unwrap())
            .collect();
        opener.finish().unwrap();
        if run > 0 {
            best = best.min(t.elapsed());
        }
        black_box(opened);
    }
    println!(
        "{:<44} {:>6.2} GB/s",
        "ChunkOpener (decrypt in place, function)",
        size as f64 / best.as_secs_f64() / 1e9
    );

    let dir = std::env::temp_dir().join(format!("shardseal-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("stage.shard");
    std::fs::write(&path, &sealed)?;
    let pipelined = best_gbps(size, runs, || {
        let (send, receive) = std::sync::mpsc::sync_channel(32);
        let opener_key = ShardKey::from_bytes(*key.expose_secret());
        let opener_binding = binding.clone();
        let opening = std::thread::spawn(move || {
            let mut opener = ChunkOpener::new(&opener_key, opener_binding);
            let opened: Vec<_> = receive.iter().map(|c| opener.open(c).unwrap()).collect();
            opener.finish().unwrap();
            opened
        });
        let mut file = std::fs::File::open(&path).unwrap();
        let mut gatherer = ShardGatherer::new(binding.clone());
        let mut piece = vec![0u8; 256 << 10];
        let mut gathered = Vec::new();
        loop {
            let n = file.read(&mut piece).unwrap();
            if n == 0 {
                break;
            }
            gatherer.update(&piece[..n], &mut gathered).unwrap();
            for chunk in gathered.drain(..) {
                send.send(chunk).unwrap();
            }
        }
        gatherer.finish().unwrap();
        drop(send);
        black_box(opening.join().unwrap());
    });
    std::fs::remove_dir_all(&dir)?;
    println!(
        "{:<44} {:>6.2} GB/s",
        "file → ShardGatherer ‖ ChunkOpener", pipelined
    );
    Ok(())
}
