use super::*;

const CHUNK: usize = 64;

fn binding(stage: u32) -> ShardBinding {
    ShardBinding::new(
        ModelId::new("resnet-50").unwrap(),
        ModelVersion(3),
        StageIndex(stage),
    )
}

fn plaintext(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

fn seal(key: &ShardKey, binding: &ShardBinding, chunk_size: usize, data: &[u8]) -> Vec<u8> {
    seal_with_digest(key, binding, chunk_size, data).0
}

/// Seals `data` and returns the shard with the digest the sealer computed.
fn seal_with_digest(
    key: &ShardKey,
    binding: &ShardBinding,
    chunk_size: usize,
    data: &[u8],
) -> (Vec<u8>, [u8; 32]) {
    let mut sealer = ShardSealer::new(key, binding, chunk_size).unwrap();
    let mut out = Vec::new();
    sealer.update(data, &mut out).unwrap();
    let digest = sealer.finish(&mut out).unwrap();
    (out, digest)
}

/// The shard digest computed from the sealed bytes, independently of the sealer and the
/// opener: the header, then each chunk's frame and tag, skipping the ciphertext bodies.
fn digest_by_hand(binding: &ShardBinding, chunk_size: usize, sealed: &[u8]) -> [u8; 32] {
    let header_len = binding.header_len();
    let mut hashed = sealed[..header_len].to_vec();
    let mut at = header_len;
    while at < sealed.len() {
        let frame = &sealed[at..at + FRAME_LEN];
        let len = u32::from_be_bytes(frame[12..16].try_into().unwrap()) as usize;
        assert!(len <= chunk_size);
        hashed.extend_from_slice(frame);
        let tag_at = at + FRAME_LEN + len;
        hashed.extend_from_slice(&sealed[tag_at..tag_at + TAG_LEN]);
        at = tag_at + TAG_LEN;
    }
    let mut digest = [0u8; 32];
    digest.copy_from_slice(digest::digest(&digest::SHA256, &hashed).as_ref());
    digest
}

/// Feeds `ciphertext` to an opener in pieces cut at `cuts` and collects the plaintext.
fn open_in_pieces(
    key: &ShardKey,
    binding: &ShardBinding,
    ciphertext: &[u8],
    cuts: &[usize],
) -> Result<(Vec<u8>, ShardStats), Error> {
    let mut opener = ShardOpener::new(key, binding.clone());
    let mut out = Vec::new();
    let mut expected_index = 0;
    let mut start = 0;
    for &cut in cuts.iter().chain(std::iter::once(&ciphertext.len())) {
        let cut = cut.clamp(start, ciphertext.len());
        for chunk in opener.update(&ciphertext[start..cut])? {
            assert_eq!(chunk.index(), expected_index);
            expected_index += 1;
            out.extend_from_slice(chunk.expose_secret());
        }
        start = cut;
    }
    let stats = opener.finish()?;
    Ok((out, stats))
}

#[test]
fn round_trips_at_every_interesting_size() {
    let key = ShardKey::generate().unwrap();
    let b = binding(0);
    for len in [
        0,
        1,
        CHUNK - 1,
        CHUNK,
        CHUNK + 1,
        2 * CHUNK,
        10 * CHUNK + 17,
    ] {
        let data = plaintext(len);
        let (ct, sealed_digest) = seal_with_digest(&key, &b, CHUNK, &data);
        assert_eq!(sealed_digest, digest_by_hand(&b, CHUNK, &ct), "len {len}");
        assert_eq!(
            Some(ct.len() as u64),
            sealed_shard_len(&b, CHUNK, len as u64),
            "size formula, len {len}"
        );
        let (opened, stats) = open_in_pieces(&key, &b, &ct, &[]).unwrap();
        assert_eq!(opened, data, "len {len}");
        let chunks = len.div_ceil(CHUNK).max(1) as u32;
        assert_eq!(
            stats,
            ShardStats {
                chunks,
                plaintext_len: len as u64,
                ciphertext_len: ct.len() as u64,
                digest: sealed_digest,
            }
        );
    }
}

#[test]
fn a_full_last_chunk_is_not_followed_by_an_empty_one() {
    let key = ShardKey::generate().unwrap();
    let ct = seal(&key, &binding(0), CHUNK, &plaintext(2 * CHUNK));
    let (_, stats) = open_in_pieces(&key, &binding(0), &ct, &[]).unwrap();
    assert_eq!(stats.chunks, 2);
}

#[test]
fn sealing_in_small_writes_gives_the_same_plaintext() {
    let key = ShardKey::generate().unwrap();
    let b = binding(1);
    let data = plaintext(5 * CHUNK + 3);
    let mut sealer = ShardSealer::new(&key, &b, CHUNK).unwrap();
    let mut ct = Vec::new();
    for piece in data.chunks(13) {
        sealer.update(piece, &mut ct).unwrap();
    }
    sealer.finish(&mut ct).unwrap();
    assert_eq!(ct.len(), seal(&key, &b, CHUNK, &data).len());
    assert_eq!(open_in_pieces(&key, &b, &ct, &[]).unwrap().0, data);
}

#[test]
fn the_opener_yields_each_chunk_as_soon_as_it_is_complete() {
    let key = ShardKey::generate().unwrap();
    let b = binding(0);
    let ct = seal(&key, &b, CHUNK, &plaintext(3 * CHUNK + 5));
    let header_len = b.header_len();
    let chunk_len = FRAME_LEN + CHUNK + TAG_LEN;
    let mut opener = ShardOpener::new(&key, b.clone());
    // Everything but the last byte of chunk 0: nothing yet.
    assert!(
        opener
            .update(&ct[..header_len + chunk_len - 1])
            .unwrap()
            .is_empty()
    );
    assert_eq!(opener.header().unwrap().chunk_size(), CHUNK);
    assert_eq!(opener.header().unwrap().binding(), &b);
    // Its last byte: chunk 0 comes out, before the rest of the shard has arrived.
    let chunks = opener
        .update(&ct[header_len + chunk_len - 1..header_len + chunk_len])
        .unwrap();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].index(), 0);
    assert!(!chunks[0].is_last());
    assert_eq!(
        chunks[0].expose_secret(),
        &plaintext(3 * CHUNK + 5)[..CHUNK]
    );
    let rest = opener.update(&ct[header_len + chunk_len..]).unwrap();
    assert_eq!(rest.len(), 3);
    assert!(rest[2].is_last());
    assert_eq!(rest[2].expose_secret().len(), 5);
    assert_eq!(
        format!("{:?}", rest[2]),
        "PlaintextChunk { index: 3, last: true, bytes: SecretBytes(<redacted>, 5 bytes) }"
    );
    opener.finish().unwrap();
}

#[test]
fn a_real_shard_in_default_chunks_round_trips_through_readers() {
    let key = ShardKey::generate().unwrap();
    let b = binding(2);
    let data: Vec<u8> = plaintext(2 * DEFAULT_CHUNK_SIZE + 12_345);
    let mut ct = Vec::new();
    let info = seal_shard(&key, &b, DEFAULT_CHUNK_SIZE, &data[..], &mut ct).unwrap();
    assert_eq!(info.ciphertext_len, ct.len() as u64);
    assert_eq!(info.plaintext_len, data.len() as u64);
    assert_eq!(info.digest, digest_by_hand(&b, DEFAULT_CHUNK_SIZE, &ct));
    assert_eq!(
        Some(info.ciphertext_len),
        sealed_shard_len(&b, DEFAULT_CHUNK_SIZE, data.len() as u64)
    );
    let opened = open_shard(&key, b, &ct[..], data.len()).unwrap();
    assert_eq!(opened.expose_secret(), &data[..]);
}

#[test]
fn chunk_sizes_out_of_range_are_refused() {
    let key = ShardKey::generate().unwrap();
    for bad in [0, MIN_CHUNK_SIZE - 1, MAX_CHUNK_SIZE + 1] {
        assert!(matches!(
            ShardSealer::new(&key, &binding(0), bad),
            Err(Error::ChunkSizeOutOfRange(n)) if n == bad as u64
        ));
    }
}

#[test]
fn the_header_names_the_binding_and_a_wrong_one_is_refused() {
    let key = ShardKey::generate().unwrap();
    let ct = seal(&key, &binding(0), CHUNK, b"weights");
    let err = open_in_pieces(&key, &binding(1), &ct, &[]).unwrap_err();
    assert!(
        matches!(&err, Error::ShardBindingMismatch { expected, found }
            if *expected == binding(1) && *found == binding(0)),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "the shard is bound to model resnet-50 v3 stage 0, expected model resnet-50 v3 stage 1"
    );
}

#[test]
fn rewriting_the_header_binding_fails_authentication() {
    // An attacker who edits the clear header to the expected binding gains nothing: the
    // header is every chunk's AAD.
    let key = ShardKey::generate().unwrap();
    let mut ct = seal(&key, &binding(0), CHUNK, b"weights");
    let stage_offset = binding(0).header_len() - 4;
    ct[stage_offset..stage_offset + 4].copy_from_slice(&1u32.to_be_bytes());
    assert!(matches!(
        open_in_pieces(&key, &binding(1), &ct, &[]),
        Err(Error::ShardChunkAuthFailed { chunk: 0 })
    ));
}

#[test]
fn header_errors_are_named() {
    let key = ShardKey::generate().unwrap();
    let ct = seal(&key, &binding(0), CHUNK, b"weights");
    type IsExpected = fn(&Error) -> bool;
    let cases: [(usize, u8, IsExpected); 4] = [
        (0, b'X', |e| matches!(e, Error::ShardBadHeader(_))),
        (7, 2, |e| matches!(e, Error::ShardUnsupportedVersion(2))),
        (8, 0xff, |e| matches!(e, Error::ChunkSizeOutOfRange(_))),
        (FIXED_HEADER_LEN - 1, 0, |e| {
            matches!(e, Error::ShardBadHeader(_))
        }),
    ];
    for (offset, value, expected) in cases {
        let mut bad = ct.clone();
        bad[offset] = value;
        let err = open_in_pieces(&key, &binding(0), &bad, &[]).unwrap_err();
        assert!(expected(&err), "offset {offset}: {err:?}");
    }
}

#[test]
fn the_opener_refuses_input_after_an_error() {
    let key = ShardKey::generate().unwrap();
    let mut ct = seal(&key, &binding(0), CHUNK, &plaintext(3 * CHUNK));
    let last = ct.len() - 1;
    ct[last] ^= 1;
    let mut opener = ShardOpener::new(&key, binding(0));
    assert!(matches!(
        opener.update(&ct),
        Err(Error::ShardChunkAuthFailed { chunk: 2 })
    ));
    assert!(matches!(opener.update(b"x"), Err(Error::ShardStreamFailed)));
    assert!(matches!(opener.finish(), Err(Error::ShardStreamFailed)));
}

#[test]
fn sealer_debug_shows_no_key() {
    let key = ShardKey::from_bytes([0x42; 32]);
    let sealer = ShardSealer::new(&key, &binding(0), CHUNK).unwrap();
    let shown = format!("{sealer:?}");
    assert!(shown.starts_with("ShardSealer { binding:"), "{shown}");
    assert!(
        !shown.contains("42, 42") && !shown.contains("4242"),
        "{shown}"
    );
    let opener = ShardOpener::new(&key, binding(0));
    let shown = format!("{opener:?}");
    assert!(
        !shown.contains("42, 42") && !shown.contains("4242"),
        "{shown}"
    );
}

#[test]
fn open_shard_gives_the_same_plaintext_for_any_size_hint() {
    let key = ShardKey::generate().unwrap();
    let b = binding(0);
    for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 10 * CHUNK + 17] {
        let data = plaintext(len);
        let ct = seal(&key, &b, CHUNK, &data);
        // An exact size hint, none, and a wrong one.
        for hint in [len, 0, len / 2 + 1] {
            let opened = open_shard(&key, b.clone(), &ct[..], hint).unwrap();
            assert_eq!(opened.expose_secret(), data.as_slice(), "len {len}");
        }
    }
}

#[test]
fn open_shard_names_what_fails_and_returns_nothing() {
    let key = ShardKey::generate().unwrap();
    let mut ct = seal(&key, &binding(0), CHUNK, &plaintext(3 * CHUNK + 1));
    let truncated = &ct[..ct.len() - (FRAME_LEN + 1 + TAG_LEN)];
    assert!(matches!(
        open_shard(&key, binding(0), truncated, 0),
        Err(Error::ShardTruncated)
    ));
    assert!(matches!(
        open_shard(&key, binding(1), &ct[..], 0),
        Err(Error::ShardBindingMismatch { .. })
    ));
    let other_key = ShardKey::generate().unwrap();
    assert!(matches!(
        open_shard(&other_key, binding(0), &ct[..], 0),
        Err(Error::ShardChunkAuthFailed { chunk: 0 })
    ));
    // A bit flip in the second chunk's ciphertext.
    let second_body = binding(0).header_len() + (FRAME_LEN + CHUNK + TAG_LEN) + FRAME_LEN + 1;
    ct[second_body] ^= 1;
    assert!(matches!(
        open_shard(&key, binding(0), &ct[..], 0),
        Err(Error::ShardChunkAuthFailed { chunk: 1 })
    ));
}

#[test]
fn a_shard_sealed_again_under_the_same_key_has_another_digest() {
    // Two sealings of the same plaintext for the same stage under the same key both open;
    // only the digest in the manifest tells the one the owner signed from the other.
    let key = ShardKey::generate().unwrap();
    let b = binding(0);
    let data = plaintext(5 * CHUNK + 3);
    let (_, first_digest) = seal_with_digest(&key, &b, CHUNK, &data);
    let (second, second_digest) = seal_with_digest(&key, &b, CHUNK, &data);
    assert_ne!(first_digest, second_digest);
    let (_, stats) = open_in_pieces(&key, &b, &second, &[]).unwrap();
    assert_eq!(stats.digest, second_digest);
    assert_ne!(stats.digest, first_digest);
}

/// Gathers `ciphertext` in pieces of `piece` bytes, without the key.
fn gather(binding: &ShardBinding, ciphertext: &[u8], piece: usize) -> Vec<SealedChunk> {
    let mut gatherer = ShardGatherer::new(binding.clone());
    let mut chunks = Vec::new();
    for bytes in ciphertext.chunks(piece) {
        gatherer.update(bytes, &mut chunks).unwrap();
    }
    gatherer.finish().unwrap();
    chunks
}

#[test]
fn gathering_and_opening_apart_is_opening_at_once() {
    let key = ShardKey::generate().unwrap();
    let b = binding(1);
    for len in [0, CHUNK, 4 * CHUNK + 9] {
        let data = plaintext(len);
        let (ct, digest) = seal_with_digest(&key, &b, CHUNK, &data);
        for piece in [1, 7, CHUNK + 3, ct.len()] {
            let chunks = gather(&b, &ct, piece);
            assert_eq!(chunks.len(), len.div_ceil(CHUNK).max(1));
            // The gatherer sees the plaintext only as ciphertext.
            if len > 0 {
                assert_ne!(&chunks[0].body.expose_secret()[..8], &data[..8]);
            }
            let mut opener = ChunkOpener::new(&key, b.clone());
            let mut opened = Vec::new();
            for chunk in chunks {
                opened.extend_from_slice(opener.open(chunk).unwrap().expose_secret());
            }
            let stats = opener.finish().unwrap();
            assert_eq!(opened, data, "len {len} piece {piece}");
            assert_eq!(stats.digest, digest);
            assert_eq!(stats.ciphertext_len, ct.len() as u64);
        }
    }
}

#[test]
fn the_chunk_opener_trusts_nothing_the_gatherer_parsed() {
    let key = ShardKey::generate().unwrap();
    let b = binding(0);
    let ct = seal(&key, &b, CHUNK, &plaintext(3 * CHUNK));
    let other = seal(&key, &b, CHUNK, &plaintext(3 * CHUNK));

    // A chunk gathered from another sealing of the same stage, under the same key.
    let mut opener = ChunkOpener::new(&key, b.clone());
    let mut chunks = gather(&b, &ct, 50).into_iter();
    let mut spliced = gather(&b, &other, 50).into_iter();
    opener.open(chunks.next().unwrap()).unwrap();
    assert!(matches!(
        opener.open(spliced.nth(1).unwrap()),
        Err(Error::ShardChunkFromOtherShard { chunk: 1 })
    ));
    assert!(matches!(
        opener.open(chunks.next().unwrap()),
        Err(Error::ShardStreamFailed)
    ));

    // Chunks handed over out of order, or skipped.
    let mut opener = ChunkOpener::new(&key, b.clone());
    let mut chunks = gather(&b, &ct, 50).into_iter();
    let first = chunks.next().unwrap();
    assert!(matches!(
        opener.open(chunks.next().unwrap()),
        Err(Error::ShardChunkOutOfOrder {
            expected: 0,
            found: 1
        })
    ));
    assert!(matches!(opener.open(first), Err(Error::ShardStreamFailed)));
    assert!(matches!(opener.finish(), Err(Error::ShardStreamFailed)));

    // An opener for another stage refuses the first chunk; one that misses the last
    // chunk reports the shard truncated.
    let mut opener = ChunkOpener::new(&key, binding(1));
    assert!(matches!(
        opener.open(gather(&b, &ct, 50).remove(0)),
        Err(Error::ShardBindingMismatch { .. })
    ));
    let mut opener = ChunkOpener::new(&key, b.clone());
    for chunk in gather(&b, &ct, 50).into_iter().take(2) {
        opener.open(chunk).unwrap();
    }
    assert!(matches!(opener.finish(), Err(Error::ShardTruncated)));

    // A chunk whose last flag was set by a forged frame: the nonce the opener rebuilds
    // from the flag differs from the sealer's, so authentication fails.
    let mut chunks = gather(&b, &ct, 50);
    chunks[2].last = false;
    let mut opener = ChunkOpener::new(&key, b.clone());
    let mut results = chunks.into_iter().map(|c| opener.open(c));
    assert!(results.next().unwrap().is_ok());
    assert!(results.next().unwrap().is_ok());
    assert!(matches!(
        results.next().unwrap(),
        Err(Error::ShardChunkAuthFailed { chunk: 2 })
    ));
}

#[test]
fn gatherer_and_chunk_opener_debug_show_no_key_and_no_bytes() {
    let key = ShardKey::from_bytes([0x42; 32]);
    let b = binding(0);
    let ct = seal(&key, &b, CHUNK, &[0x42; 2 * CHUNK]);
    let mut gatherer = ShardGatherer::new(b.clone());
    let mut chunks = Vec::new();
    gatherer.update(&ct, &mut chunks).unwrap();
    let opener = ChunkOpener::new(&key, b);
    for shown in [
        format!("{gatherer:?}"),
        format!("{opener:?}"),
        format!("{:?}", chunks[0]),
    ] {
        assert!(
            !shown.contains("42, 42") && !shown.contains("4242"),
            "{shown}"
        );
    }
}
