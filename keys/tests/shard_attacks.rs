//! Every way to damage a sealed shard in transit is refused with its own error: random
//! split points never matter, and every truncation, reorder, duplicate, splice from another
//! shard, wrong binding and single-bit flip is caught.

use proptest::prelude::*;
use shardseal_attestation::{ModelId, ModelVersion, StageIndex};
use shardseal_keys::{Error, ShardBinding, ShardKey, ShardOpener, ShardSealer};

/// Small chunks keep every case fast while crossing many chunk boundaries.
const CHUNK: usize = 32;
const FRAME_LEN: usize = 16;
const TAG_LEN: usize = 16;
const MODEL: &str = "bert";
/// magic 6, format 2, chunk size 4, nonce prefix 7, model id length 1, model id, version
/// 4, stage 4.
const HEADER_LEN: usize = 20 + MODEL.len() + 8;

fn binding(stage: u32) -> ShardBinding {
    ShardBinding::new(
        ModelId::new(MODEL).unwrap(),
        ModelVersion(1),
        StageIndex(stage),
    )
}

fn seal(key: &ShardKey, binding: &ShardBinding, data: &[u8]) -> Vec<u8> {
    let mut sealer = ShardSealer::new(key, binding, CHUNK).unwrap();
    let mut out = Vec::new();
    sealer.update(data, &mut out).unwrap();
    sealer.finish(&mut out).unwrap();
    out
}

fn open(key: &ShardKey, binding: &ShardBinding, ciphertext: &[u8]) -> Result<Vec<u8>, Error> {
    let mut opener = ShardOpener::new(key, binding.clone());
    let mut out = Vec::new();
    for chunk in opener.update(ciphertext)? {
        out.extend_from_slice(chunk.expose_secret());
    }
    opener.finish()?;
    Ok(out)
}

/// Byte ranges of each chunk (frame, body and tag) inside a sealed shard.
fn chunk_ranges(plaintext_len: usize) -> Vec<std::ops::Range<usize>> {
    let chunks = plaintext_len.div_ceil(CHUNK).max(1);
    let mut ranges = Vec::new();
    let mut at = HEADER_LEN;
    for i in 0..chunks {
        let len = if i + 1 == chunks {
            plaintext_len - i * CHUNK
        } else {
            CHUNK
        };
        ranges.push(at..at + FRAME_LEN + len + TAG_LEN);
        at += FRAME_LEN + len + TAG_LEN;
    }
    ranges
}

fn data_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..8 * CHUNK)
}

/// The exact error a single flipped bit at `offset` must cause.
fn expected_for_flip(plaintext_len: usize, offset: usize, bit: u8) -> Expected {
    if offset < HEADER_LEN {
        return match offset {
            0..=5 => Expected::BadHeader,
            6..=7 => Expected::UnsupportedVersion,
            // A flipped chunk size is either out of range or authenticated as AAD.
            8..=11 => Expected::ChunkSizeOrAuth,
            // The header's nonce prefix no longer matches the chunks' frames.
            12..=18 => Expected::FromOtherShard(0),
            // Model id length: out of range, longer than the bytes there are, or the header
            // now reads another binding.
            19 => Expected::HeaderOrBinding,
            _ => Expected::BindingMismatch,
        };
    }
    let ranges = chunk_ranges(plaintext_len);
    let (index, range) = ranges
        .iter()
        .enumerate()
        .find(|(_, r)| r.contains(&offset))
        .unwrap();
    let index = index as u32;
    let in_chunk = offset - range.start;
    let last = index as usize + 1 == ranges.len();
    match in_chunk {
        0..=6 => Expected::FromOtherShard(index),
        7..=10 => Expected::OutOfOrder(index),
        // The flag: 0 <-> 1 changes the nonce (or makes a short last chunk non-last);
        // any other bit makes it neither 0 nor 1.
        11 if bit == 0 => {
            let len = range.len() - FRAME_LEN - TAG_LEN;
            if last && len != CHUNK {
                Expected::Malformed(index)
            } else {
                Expected::Auth(index)
            }
        }
        11 => Expected::Malformed(index),
        // The length: any change breaks the framing rules, or (for a flip that keeps a
        // last chunk within the chunk size) shifts where the tag is read.
        12..=15 => Expected::MalformedOrAuthOrTruncated(index),
        _ => Expected::Auth(index),
    }
}

#[derive(Debug, Clone, Copy)]
enum Expected {
    BadHeader,
    UnsupportedVersion,
    ChunkSizeOrAuth,
    HeaderOrBinding,
    BindingMismatch,
    FromOtherShard(u32),
    OutOfOrder(u32),
    Malformed(u32),
    MalformedOrAuthOrTruncated(u32),
    Auth(u32),
}

fn matches_expected(err: &Error, expected: Expected) -> bool {
    match expected {
        Expected::BadHeader => matches!(err, Error::ShardBadHeader(_)),
        Expected::UnsupportedVersion => matches!(err, Error::ShardUnsupportedVersion(_)),
        Expected::ChunkSizeOrAuth => matches!(
            err,
            Error::ChunkSizeOutOfRange(_)
                | Error::ShardChunkMalformed { chunk: 0, .. }
                | Error::ShardChunkAuthFailed { chunk: 0 }
                | Error::ShardTruncated
        ),
        Expected::HeaderOrBinding => matches!(
            err,
            Error::ShardBadHeader(_) | Error::ShardBindingMismatch { .. } | Error::ShardTruncated
        ),
        Expected::BindingMismatch => matches!(
            err,
            Error::ShardBindingMismatch { .. } | Error::ShardBadHeader("invalid model id")
        ),
        Expected::FromOtherShard(i) => {
            matches!(err, Error::ShardChunkFromOtherShard { chunk } if *chunk == i)
        }
        Expected::OutOfOrder(i) => {
            matches!(err, Error::ShardChunkOutOfOrder { expected, .. } if *expected == i)
        }
        Expected::Malformed(i) => {
            matches!(err, Error::ShardChunkMalformed { chunk, .. } if *chunk == i)
        }
        Expected::MalformedOrAuthOrTruncated(i) => {
            matches!(
                err,
                Error::ShardChunkMalformed { chunk, .. } | Error::ShardChunkAuthFailed { chunk }
                    if *chunk == i
            ) || matches!(err, Error::ShardTruncated)
        }
        Expected::Auth(i) => matches!(err, Error::ShardChunkAuthFailed { chunk } if *chunk == i),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn split_points_never_matter(
        data in data_strategy(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let key = ShardKey::generate().unwrap();
        let ct = seal(&key, &binding(0), &data);
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(ct.len() + 1)).collect();
        cuts.sort_unstable();
        let mut opener = ShardOpener::new(&key, binding(0));
        let mut out = Vec::new();
        let mut start = 0;
        for cut in cuts.into_iter().chain([ct.len()]) {
            for chunk in opener.update(&ct[start..cut]).unwrap() {
                out.extend_from_slice(chunk.expose_secret());
            }
            start = cut;
        }
        opener.finish().unwrap();
        prop_assert_eq!(out, data);
    }

    #[test]
    fn every_truncation_is_reported_as_truncation(
        data in data_strategy(),
        cut in any::<prop::sample::Index>(),
    ) {
        let key = ShardKey::generate().unwrap();
        let ct = seal(&key, &binding(0), &data);
        let cut = cut.index(ct.len());
        let err = open(&key, &binding(0), &ct[..cut]).unwrap_err();
        prop_assert!(matches!(err, Error::ShardTruncated), "cut {}: {:?}", cut, err);
    }

    #[test]
    fn every_single_bit_flip_is_refused_with_its_error(
        data in data_strategy(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let key = ShardKey::generate().unwrap();
        let ct = seal(&key, &binding(0), &data);
        let offset = at.index(ct.len());
        let mut bad = ct.clone();
        bad[offset] ^= 1 << bit;
        let err = open(&key, &binding(0), &bad).unwrap_err();
        let expected = expected_for_flip(data.len(), offset, bit);
        prop_assert!(matches_expected(&err, expected),
            "flip bit {} at {}: got {:?}, expected {:?}", bit, offset, err, expected);
    }

    #[test]
    fn reordered_or_duplicated_chunks_are_refused(
        data in prop::collection::vec(any::<u8>(), 2 * CHUNK + 1..8 * CHUNK),
        a in any::<prop::sample::Index>(),
        b in any::<prop::sample::Index>(),
        duplicate in any::<bool>(),
    ) {
        let key = ShardKey::generate().unwrap();
        let ct = seal(&key, &binding(0), &data);
        let ranges = chunk_ranges(data.len());
        // Full-size chunks only, so that the framing stays valid and the position check
        // is what catches the change.
        let full = ranges.len() - 1;
        let (a, b) = (a.index(full), b.index(full));
        prop_assume!(a != b);
        let (first, second) = (a.min(b), a.max(b));
        let mut chunks: Vec<&[u8]> = ranges.iter().map(|r| &ct[r.clone()]).collect();
        if duplicate {
            chunks[second] = chunks[first];
        } else {
            chunks.swap(first, second);
        }
        let mut bad = ct[..HEADER_LEN].to_vec();
        for c in chunks {
            bad.extend_from_slice(c);
        }
        let err = open(&key, &binding(0), &bad).unwrap_err();
        let expected = if duplicate { second } else { first } as u32;
        let found = if duplicate { first } else { second } as u32;
        prop_assert!(
            matches!(err, Error::ShardChunkOutOfOrder { expected: e, found: f } if e == expected && f == found),
            "{:?}", err
        );
    }

    #[test]
    fn a_chunk_from_another_shard_is_refused(
        data in prop::collection::vec(any::<u8>(), CHUNK + 1..6 * CHUNK),
        at in any::<prop::sample::Index>(),
        same_key in any::<bool>(),
    ) {
        let key = ShardKey::generate().unwrap();
        let other_key = if same_key {
            ShardKey::from_bytes(*key.expose_secret())
        } else {
            ShardKey::generate().unwrap()
        };
        let ct = seal(&key, &binding(0), &data);
        // Same plaintext, same binding: only the sealing (nonce prefix, maybe key) differs.
        let other = seal(&other_key, &binding(0), &data);
        let ranges = chunk_ranges(data.len());
        let i = at.index(ranges.len());
        let mut bad = ct.clone();
        bad[ranges[i].clone()].copy_from_slice(&other[ranges[i].clone()]);
        let err = open(&key, &binding(0), &bad).unwrap_err();
        prop_assert!(
            matches!(err, Error::ShardChunkFromOtherShard { chunk } if chunk as usize == i),
            "{:?}", err
        );
    }

    #[test]
    fn a_shard_never_opens_as_another_binding(
        data in data_strategy(),
        stage in 1u32..4,
        version in 2u32..5,
        other_model in any::<bool>(),
    ) {
        let key = ShardKey::generate().unwrap();
        let ct = seal(&key, &binding(0), &data);
        let wrong = if other_model {
            ShardBinding::new(ModelId::new("gpt2").unwrap(), ModelVersion(1), StageIndex(0))
        } else {
            ShardBinding::new(ModelId::new(MODEL).unwrap(), ModelVersion(version), StageIndex(stage))
        };
        let err = open(&key, &wrong, &ct).unwrap_err();
        prop_assert!(
            matches!(&err, Error::ShardBindingMismatch { expected, found }
                if *expected == wrong && *found == binding(0)),
            "{:?}", err
        );
    }

    #[test]
    fn bytes_after_the_last_chunk_are_refused(
        data in data_strategy(),
        extra in prop::collection::vec(any::<u8>(), 1..40),
    ) {
        let key = ShardKey::generate().unwrap();
        let mut ct = seal(&key, &binding(0), &data);
        ct.extend_from_slice(&extra);
        prop_assert!(matches!(open(&key, &binding(0), &ct), Err(Error::ShardTrailingData)));
    }

    #[test]
    fn a_wrong_key_fails_authentication_of_chunk_0(data in data_strategy()) {
        let ct = seal(&ShardKey::generate().unwrap(), &binding(0), &data);
        let err = open(&ShardKey::generate().unwrap(), &binding(0), &ct).unwrap_err();
        prop_assert!(matches!(err, Error::ShardChunkAuthFailed { chunk: 0 }), "{:?}", err);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_opener(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let key = ShardKey::generate().unwrap();
        let mut opener = ShardOpener::new(&key, binding(0));
        let _ = opener.update(&bytes);
        let _ = opener.finish();
    }
}

#[test]
fn dropping_the_last_chunk_is_truncation_even_at_a_chunk_boundary() {
    let key = ShardKey::generate().unwrap();
    let data = vec![7u8; 3 * CHUNK];
    let ct = seal(&key, &binding(0), &data);
    let ranges = chunk_ranges(data.len());
    let err = open(&key, &binding(0), &ct[..ranges[2].start]).unwrap_err();
    assert!(matches!(err, Error::ShardTruncated), "{err:?}");
    // Marking chunk 1 as the last (to hide the cut) breaks its nonce.
    let mut forged = ct[..ranges[2].start].to_vec();
    forged[ranges[1].start + 11] = 1;
    let err = open(&key, &binding(0), &forged).unwrap_err();
    assert!(
        matches!(err, Error::ShardChunkAuthFailed { chunk: 1 }),
        "{err:?}"
    );
}

/// Exhaustive versions of the properties above on shards of several shapes: every cut and
/// every bit.
#[test]
fn every_cut_and_every_bit_of_small_shards_is_caught() {
    let key = ShardKey::generate().unwrap();
    for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5] {
        let data: Vec<u8> = (0..len as u8).collect();
        let ct = seal(&key, &binding(0), &data);
        for cut in 0..ct.len() {
            let err = open(&key, &binding(0), &ct[..cut]).unwrap_err();
            assert!(
                matches!(err, Error::ShardTruncated),
                "len {len} cut {cut}: {err:?}"
            );
        }
        for offset in 0..ct.len() {
            for bit in 0..8 {
                let mut bad = ct.clone();
                bad[offset] ^= 1 << bit;
                let err = open(&key, &binding(0), &bad).unwrap_err();
                let expected = expected_for_flip(len, offset, bit);
                assert!(
                    matches_expected(&err, expected),
                    "len {len}, bit {bit} at {offset}: got {err:?}, expected {expected:?}"
                );
            }
        }
    }
}
