//! Shard encryption: AES-256-GCM in chunks, so a function decrypts a shard while it
//! downloads it, and any truncation, reordering, splice or bit flip is caught.
//!
//! # Format (version 1)
//!
//! ```text
//! header  = "SSHARD" ‖ format u16 ‖ chunk_size u32 ‖ nonce_prefix [7]
//!           ‖ model_len u8 ‖ model id ‖ version u32 ‖ stage u32        (big-endian)
//! chunk i = nonce [12] ‖ plaintext_len u32 ‖ AES-256-GCM(plaintext) ‖ tag [16]
//! nonce   = nonce_prefix [7] ‖ i as u32 ‖ last-chunk flag (0 or 1)     (STREAM)
//! AAD     = the header bytes, for every chunk
//! ```
//!
//! The header names the [`ShardBinding`] (model id, version, stage) and sits in every
//! chunk's AAD, so a shard opens only as the stage it was sealed for, with the chunk size
//! and nonce prefix it was sealed with. Each chunk's nonce is fixed by its position and by
//! whether it is the last, as in the STREAM construction (Hoang, Reyhanitabar, Rogaway,
//! Vizár 2015): a dropped tail has no last-flag chunk ([`Error::ShardTruncated`]), and a
//! chunk moved to another position or flagged differently fails authentication. Every
//! non-last chunk is exactly `chunk_size` plaintext bytes; the last holds the rest (it is
//! empty only for an empty shard).
//!
//! Each chunk repeats its nonce in clear, with its length, in a 16-byte frame. The frame is
//! never trusted for decryption (the opener rebuilds the nonce from its own position
//! counter and the header's prefix); it is there so that the opener knows where a chunk
//! ends as soon as its bytes arrive, and so that a failure is named precisely: a chunk of
//! another shard, a chunk out of order, trailing bytes. The overhead is 32 bytes per chunk
//! (0.003 % at 1 MiB).
//!
//! Keys are never reused: a fresh [`ShardKey`] for every shard and every version, and a
//! fresh random nonce prefix for every sealing on top of that.
//!
//! # The shard digest
//!
//! ```text
//! shard_digest = SHA-256(header ‖ frame 0 ‖ tag 0 ‖ frame 1 ‖ tag 1 ‖ …)
//! ```
//!
//! The owner-signed manifest records this digest, and a function serves a shard only if the
//! one its [`ChunkOpener`] computed matches. It covers every byte of the shard except the
//! chunks' ciphertext bodies, and those are bound to their tags: a different body with the
//! same tag is a GCM forgery, which takes the shard key. So for anyone without the key
//! (the store, the network, the coordinator, another model's owner) the digest pins the
//! whole shard as a SHA-256 of all its bytes would, at 32 bytes hashed per chunk instead of
//! a megabyte: hashing the ciphertext ran at 1.1 to 2.1 GB/s here and was the slowest step
//! of opening a shard. It does not bind a holder of the key (the model owner, who signs the
//! manifest anyway, and attested functions of the stage).
//!
//! # Throughput
//!
//! `cargo run --release -p shardseal-keys --example shard_decrypt_bench` prints it for a
//! 128 MiB shard. What costs is memory, not the cipher: ring's `open_in_place` runs at
//! 5 to 7 GB/s over 1 MiB chunks on the development machine (2 vCPUs of an AMD EPYC VM with
//! AES-NI, VAES and SHA extensions), while the first write to each fresh 4 KiB page (a page
//! fault, costly in a VM) caps copying into new memory near 2.6 GB/s. Hence the two halves:
//! a [`ShardGatherer`] copies each chunk out of the network's buffers into the buffer it
//! will be decrypted in (receiving, on the fetching thread), and a [`ChunkOpener`] opens it
//! there, in place, on another.
//!
//! # Use
//!
//! ```
//! use shardseal_keys::{ShardBinding, ShardKey, ShardOpener, ShardSealer};
//! use shardseal_attestation::{ModelId, ModelVersion, StageIndex};
//!
//! let key = ShardKey::generate()?;
//! let binding = ShardBinding::new(ModelId::new("mnist").unwrap(), ModelVersion(1), StageIndex(0));
//! let mut sealer = ShardSealer::new(&key, &binding, 64)?;
//! let mut ciphertext = Vec::new();
//! sealer.update(b"onnx bytes ...", &mut ciphertext)?;
//! sealer.finish(&mut ciphertext)?;
//!
//! let mut opener = ShardOpener::new(&key, binding);
//! let mut plaintext = Vec::new();
//! for piece in ciphertext.chunks(7) {          // bytes as they arrive from the network
//!     for chunk in opener.update(piece)? {      // verified chunks, as soon as each is in
//!         plaintext.extend_from_slice(chunk.expose_secret());
//!     }
//! }
//! opener.finish()?;                             // only now is the shard known complete
//! assert_eq!(plaintext, b"onnx bytes ...");
//! # Ok::<(), shardseal_keys::Error>(())
//! ```

use std::fmt;
use std::io::{Read, Write};
use std::sync::Arc;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::digest;
use shardseal_attestation::{MAX_MODEL_ID_LEN, ModelId, ModelVersion, StageIndex};

use crate::error::Error;
use crate::secret::{SecretBytes, ShardKey, fill_random};

/// The chunk size used unless a caller picks another: 1 MiB.
pub const DEFAULT_CHUNK_SIZE: usize = 1 << 20;
/// The smallest chunk size accepted.
pub const MIN_CHUNK_SIZE: usize = 16;
/// The largest chunk size accepted (16 MiB): it bounds what an opener buffers.
pub const MAX_CHUNK_SIZE: usize = 16 << 20;
/// The shard format version this build writes and reads.
pub const SHARD_FORMAT_VERSION: u16 = 1;

const MAGIC: &[u8; 6] = b"SSHARD";
const NONCE_PREFIX_LEN: usize = 7;
/// magic, format, chunk size, nonce prefix, model id length.
const FIXED_HEADER_LEN: usize = 6 + 2 + 4 + NONCE_PREFIX_LEN + 1;
/// nonce, plaintext length.
const FRAME_LEN: usize = NONCE_LEN + 4;
const TAG_LEN: usize = 16;

/// What a shard is sealed for: one stage of one version of one model. It is written in the
/// shard's header and authenticated with every chunk.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ShardBinding {
    /// The model.
    pub model: ModelId,
    /// The model version (each version has fresh shard keys).
    pub version: ModelVersion,
    /// The pipeline stage whose shard this is.
    pub stage: StageIndex,
}

impl ShardBinding {
    /// Binds a shard to a model, version and stage.
    pub fn new(model: ModelId, version: ModelVersion, stage: StageIndex) -> Self {
        Self {
            model,
            version,
            stage,
        }
    }

    fn header_len(&self) -> usize {
        FIXED_HEADER_LEN + self.model.as_str().len() + 8
    }
}

impl fmt::Display for ShardBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "model {} {} {}", self.model, self.version, self.stage)
    }
}

/// A parsed, checked shard header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardHeader {
    chunk_size: usize,
    nonce_prefix: [u8; NONCE_PREFIX_LEN],
    binding: ShardBinding,
}

impl ShardHeader {
    /// Plaintext bytes per chunk (the last chunk may hold fewer).
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// The model, version and stage the shard is sealed for.
    pub fn binding(&self) -> &ShardBinding {
        &self.binding
    }

    fn encode(&self) -> Vec<u8> {
        let model = self.binding.model.as_str().as_bytes();
        let mut out = Vec::with_capacity(self.binding.header_len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&SHARD_FORMAT_VERSION.to_be_bytes());
        // chunk_size <= MAX_CHUNK_SIZE, checked where a header is made.
        out.extend_from_slice(&(self.chunk_size as u32).to_be_bytes());
        out.extend_from_slice(&self.nonce_prefix);
        // A model id is at most MAX_MODEL_ID_LEN (128) bytes, so its length fits a byte.
        out.push(model.len() as u8);
        out.extend_from_slice(model);
        out.extend_from_slice(&self.binding.version.0.to_be_bytes());
        out.extend_from_slice(&self.binding.stage.0.to_be_bytes());
        out
    }

    /// Checks the fixed part (the first [`FIXED_HEADER_LEN`] bytes) and returns the full
    /// header length.
    fn full_len(fixed: &[u8]) -> Result<usize, Error> {
        if &fixed[..6] != MAGIC {
            return Err(Error::ShardBadHeader("not a ShardSeal shard (bad magic)"));
        }
        let format = u16::from_be_bytes([fixed[6], fixed[7]]);
        if format != SHARD_FORMAT_VERSION {
            return Err(Error::ShardUnsupportedVersion(format));
        }
        let chunk_size = u32::from_be_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]);
        check_chunk_size(chunk_size as usize)?;
        let model_len = usize::from(fixed[FIXED_HEADER_LEN - 1]);
        if model_len == 0 || model_len > MAX_MODEL_ID_LEN {
            return Err(Error::ShardBadHeader("model id length out of range"));
        }
        Ok(FIXED_HEADER_LEN + model_len + 8)
    }

    /// Parses a complete header whose fixed part passed [`Self::full_len`].
    fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let chunk_size = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
        let mut nonce_prefix = [0u8; NONCE_PREFIX_LEN];
        nonce_prefix.copy_from_slice(&bytes[12..12 + NONCE_PREFIX_LEN]);
        let rest = &bytes[FIXED_HEADER_LEN..];
        let (model, numbers) = rest.split_at(rest.len() - 8);
        let model = std::str::from_utf8(model)
            .ok()
            .and_then(|m| ModelId::new(m).ok())
            .ok_or(Error::ShardBadHeader("invalid model id"))?;
        let version = u32::from_be_bytes([numbers[0], numbers[1], numbers[2], numbers[3]]);
        let stage = u32::from_be_bytes([numbers[4], numbers[5], numbers[6], numbers[7]]);
        Ok(Self {
            chunk_size,
            nonce_prefix,
            binding: ShardBinding::new(model, ModelVersion(version), StageIndex(stage)),
        })
    }
}

fn check_chunk_size(chunk_size: usize) -> Result<(), Error> {
    if (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        Ok(())
    } else {
        Err(Error::ChunkSizeOutOfRange(chunk_size as u64))
    }
}

fn chunk_nonce(prefix: &[u8; NONCE_PREFIX_LEN], index: u32, last: bool) -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    nonce[..NONCE_PREFIX_LEN].copy_from_slice(prefix);
    nonce[NONCE_PREFIX_LEN..NONCE_LEN - 1].copy_from_slice(&index.to_be_bytes());
    nonce[NONCE_LEN - 1] = u8::from(last);
    nonce
}

pub(crate) fn aes_256_gcm_key(key: &[u8; 32]) -> LessSafeKey {
    match UnboundKey::new(&AES_256_GCM, key) {
        Ok(unbound) => LessSafeKey::new(unbound),
        // ring refuses only a key of the wrong length, and this one is 32 bytes by type.
        Err(_) => unreachable!("AES-256-GCM takes a 32-byte key"),
    }
}

/// The exact size of a sealed shard: header, one frame and tag per chunk, and the
/// plaintext. `None` if the chunk size is out of range or the shard needs more than 2^32
/// chunks. Used to check a manifest's `shard_size` against its `plaintext_size`.
pub fn sealed_shard_len(
    binding: &ShardBinding,
    chunk_size: usize,
    plaintext_len: u64,
) -> Option<u64> {
    check_chunk_size(chunk_size).ok()?;
    let chunks = plaintext_len.div_ceil(chunk_size as u64).max(1);
    if chunks > u64::from(u32::MAX) + 1 {
        return None;
    }
    let overhead = chunks.checked_mul((FRAME_LEN + TAG_LEN) as u64)?;
    (binding.header_len() as u64)
        .checked_add(overhead)?
        .checked_add(plaintext_len)
}

/// Encrypts one shard, streamed: plaintext in through [`update`](Self::update), ciphertext
/// out, header first. [`finish`](Self::finish) seals the last chunk; a shard whose sealer was
/// never finished is detectably truncated.
pub struct ShardSealer {
    key: LessSafeKey,
    header: ShardHeader,
    header_bytes: Vec<u8>,
    header_written: bool,
    /// Plaintext waiting to fill a chunk. A full chunk is sealed only once more input
    /// arrives, because until then it may be the last.
    pending: SecretBytes,
    next_index: u32,
    /// The shard digest so far: header, then each sealed chunk's frame and tag.
    digest: digest::Context,
}

impl fmt::Debug for ShardSealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardSealer")
            .field("binding", &self.header.binding)
            .field("chunk_size", &self.header.chunk_size)
            .field("next_index", &self.next_index)
            .finish_non_exhaustive()
    }
}

impl ShardSealer {
    /// Starts sealing a shard for `binding` in chunks of `chunk_size` plaintext bytes
    /// ([`DEFAULT_CHUNK_SIZE`] unless there is a reason), with a fresh random nonce prefix.
    pub fn new(key: &ShardKey, binding: &ShardBinding, chunk_size: usize) -> Result<Self, Error> {
        check_chunk_size(chunk_size)?;
        let mut nonce_prefix = [0u8; NONCE_PREFIX_LEN];
        fill_random(&mut nonce_prefix)?;
        let header = ShardHeader {
            chunk_size,
            nonce_prefix,
            binding: binding.clone(),
        };
        let header_bytes = header.encode();
        let mut digest = digest::Context::new(&digest::SHA256);
        digest.update(&header_bytes);
        Ok(Self {
            key: aes_256_gcm_key(key.expose_secret()),
            header_bytes,
            header,
            header_written: false,
            pending: SecretBytes::with_capacity(chunk_size),
            next_index: 0,
            digest,
        })
    }

    /// Encrypts more plaintext, appending the ciphertext that is ready to `out` (the header
    /// on the first call, then each chunk once the plaintext after it has started).
    pub fn update(&mut self, mut plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        self.write_header(out);
        let chunk_size = self.header.chunk_size;
        while !plaintext.is_empty() {
            if self.pending.len() == chunk_size {
                self.seal_pending(false, out)?;
            }
            let take = (chunk_size - self.pending.len()).min(plaintext.len());
            let (now, later) = plaintext.split_at(take);
            self.pending.extend_from_slice(now);
            plaintext = later;
        }
        Ok(())
    }

    /// Seals the last chunk, appends it to `out` and returns the shard digest (what the
    /// manifest records as `shard_digest`, see [`ShardStats::digest`]).
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<[u8; 32], Error> {
        self.write_header(out);
        self.seal_pending(true, out)?;
        let mut digest = [0u8; 32];
        digest.copy_from_slice(self.digest.finish().as_ref());
        Ok(digest)
    }

    fn write_header(&mut self, out: &mut Vec<u8>) {
        if !self.header_written {
            out.extend_from_slice(&self.header_bytes);
            self.header_written = true;
        }
    }

    fn seal_pending(&mut self, last: bool, out: &mut Vec<u8>) -> Result<(), Error> {
        let index = self.next_index;
        if !last && index == u32::MAX {
            return Err(Error::ShardTooLarge);
        }
        let nonce = chunk_nonce(&self.header.nonce_prefix, index, last);
        let len = self.pending.len();
        // Reserve first so that the plaintext copied below is never left behind in a freed
        // allocation: it is encrypted in place right after.
        out.reserve(FRAME_LEN + len + TAG_LEN);
        let frame_start = out.len();
        out.extend_from_slice(&nonce);
        // len <= chunk_size <= MAX_CHUNK_SIZE.
        out.extend_from_slice(&(len as u32).to_be_bytes());
        self.digest.update(&out[frame_start..]);
        let start = out.len();
        out.extend_from_slice(self.pending.expose_secret());
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&self.header_bytes),
                &mut out[start..],
            )
            // ring refuses only inputs of tens of GiB; a chunk is at most 16 MiB.
            .map_err(|_| Error::ShardTooLarge)?;
        out.extend_from_slice(tag.as_ref());
        self.digest.update(tag.as_ref());
        self.pending.truncate(0);
        self.next_index = index.wrapping_add(1);
        Ok(())
    }
}

/// A verified plaintext chunk from a [`ShardOpener`] or [`ChunkOpener`], in a buffer wiped
/// on drop.
#[derive(Debug)]
pub struct PlaintextChunk {
    index: u32,
    last: bool,
    bytes: SecretBytes,
}

impl PlaintextChunk {
    /// The chunk's position in the shard, from 0.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Whether this is the shard's last chunk.
    pub fn is_last(&self) -> bool {
        self.last
    }

    /// The plaintext. Keep it in secret buffers (it is model weights).
    pub fn expose_secret(&self) -> &[u8] {
        self.bytes.expose_secret()
    }

    /// The plaintext buffer itself.
    pub fn into_secret(self) -> SecretBytes {
        self.bytes
    }
}

/// What a finished shard stream held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardStats {
    /// Number of chunks.
    pub chunks: u32,
    /// Plaintext bytes.
    pub plaintext_len: u64,
    /// Ciphertext bytes, header included.
    pub ciphertext_len: u64,
    /// The shard digest the manifest records: SHA-256 over the header and every chunk's
    /// frame and GCM tag. The tags bind the ciphertext bodies it skips (a different body
    /// with the same tag is a forgery, which takes the shard key), so for anyone without
    /// the key it pins the whole shard at 32 bytes hashed per chunk.
    pub digest: [u8; 32],
}

/// A shard header as it arrived, shared by every chunk gathered under it.
#[derive(Debug, PartialEq, Eq)]
struct ReceivedHeader {
    header: ShardHeader,
    /// The encoded header: every chunk's AAD, and the start of the shard digest.
    bytes: Vec<u8>,
}

/// One chunk as it arrived, framing checked but not authenticated: what a
/// [`ShardGatherer`] hands to a [`ChunkOpener`]. Its buffer holds the ciphertext and tag,
/// then the plaintext once opened in place, so it is a secret buffer from the start.
#[derive(Debug)]
pub struct SealedChunk {
    index: u32,
    last: bool,
    header: Arc<ReceivedHeader>,
    /// Ciphertext ‖ tag.
    body: SecretBytes,
}

impl SealedChunk {
    /// The chunk's position in the shard, as its frame states it.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Whether the frame says this is the last chunk.
    pub fn is_last(&self) -> bool {
        self.last
    }
}

enum GatherState {
    /// Collecting the header into `frame`.
    Header,
    /// Collecting the next chunk's frame, then its body.
    Chunks(Arc<ReceivedHeader>),
    /// The last chunk has been gathered.
    Done,
    /// An error was returned; nothing more is accepted.
    Failed,
}

/// The receiving half of a [`ShardOpener`]: takes the ciphertext as it arrives, split
/// anywhere, checks the header's binding and each chunk's frame, and gathers each chunk
/// into a buffer of its own. It holds no key and authenticates nothing; hand its chunks, in
/// the order it returns them, to a [`ChunkOpener`], which does.
///
/// The two halves let a function receive on one thread and decrypt on another: the copy
/// out of the network's buffers (and the first touch of the memory the plaintext will
/// occupy) happens here, and the opener decrypts in place at the cipher's speed.
pub struct ShardGatherer {
    expected: ShardBinding,
    state: GatherState,
    /// The header or the current chunk's frame, as it arrives (ciphertext, not secret).
    frame: Vec<u8>,
    /// The current chunk's frame once complete: (last flag, plaintext length).
    chunk: Option<(bool, usize)>,
    /// The current chunk's ciphertext and tag, as they arrive.
    body: SecretBytes,
    next_index: u32,
}

impl fmt::Debug for ShardGatherer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardGatherer")
            .field("expected", &self.expected)
            .field("next_index", &self.next_index)
            .finish_non_exhaustive()
    }
}

impl ShardGatherer {
    /// Starts receiving a shard that must be bound to `expected`.
    pub fn new(expected: ShardBinding) -> Self {
        Self {
            expected,
            state: GatherState::Header,
            frame: Vec::with_capacity(FIXED_HEADER_LEN + MAX_MODEL_ID_LEN + 8),
            chunk: None,
            body: SecretBytes::default(),
            next_index: 0,
        }
    }

    /// The shard's header, once it has arrived and matched the expected binding.
    pub fn header(&self) -> Option<&ShardHeader> {
        match &self.state {
            GatherState::Chunks(received) => Some(&received.header),
            _ => None,
        }
    }

    /// Takes the next ciphertext bytes and appends every chunk they complete, in order, to
    /// `chunks`. The chunks completed before a refused byte are appended too: open them
    /// before reporting the error, since a forged frame (a last flag set early, say) shows
    /// here as trailing bytes but to the opener as the forgery it is. After any error the
    /// gatherer refuses further input ([`Error::ShardStreamFailed`]).
    pub fn update(&mut self, mut bytes: &[u8], chunks: &mut Vec<SealedChunk>) -> Result<(), Error> {
        while !bytes.is_empty() {
            let step = match &self.state {
                GatherState::Header => self.take_header(bytes),
                GatherState::Chunks(_) if self.chunk.is_none() => self.take_frame(bytes),
                GatherState::Chunks(_) => self.take_body(bytes, chunks),
                GatherState::Done => Err(Error::ShardTrailingData),
                GatherState::Failed => Err(Error::ShardStreamFailed),
            };
            match step {
                Ok(rest) => bytes = rest,
                Err(e) => {
                    self.fail();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Ends the stream: an error unless the last chunk arrived. (Only the [`ChunkOpener`]
    /// knows whether it was authentic.)
    pub fn finish(self) -> Result<(), Error> {
        match self.state {
            GatherState::Done => Ok(()),
            GatherState::Failed => Err(Error::ShardStreamFailed),
            GatherState::Header | GatherState::Chunks(_) => Err(Error::ShardTruncated),
        }
    }

    /// Refuses all further input (the opener failed on one of this gatherer's chunks).
    fn fail(&mut self) {
        self.state = GatherState::Failed;
        self.body = SecretBytes::default();
    }

    /// Moves up to `want - frame.len()` bytes into `frame`; returns the rest.
    fn fill_frame<'a>(&mut self, bytes: &'a [u8], want: usize) -> &'a [u8] {
        let take = want.saturating_sub(self.frame.len()).min(bytes.len());
        let (now, rest) = bytes.split_at(take);
        self.frame.extend_from_slice(now);
        rest
    }

    fn take_header<'a>(&mut self, bytes: &'a [u8]) -> Result<&'a [u8], Error> {
        let mut rest = self.fill_frame(bytes, FIXED_HEADER_LEN);
        if self.frame.len() < FIXED_HEADER_LEN {
            return Ok(rest);
        }
        let full = ShardHeader::full_len(&self.frame[..FIXED_HEADER_LEN])?;
        rest = self.fill_frame(rest, full);
        if self.frame.len() < full {
            return Ok(rest);
        }
        let header = ShardHeader::decode(&self.frame)?;
        if header.binding != self.expected {
            return Err(Error::ShardBindingMismatch {
                expected: self.expected.clone(),
                found: header.binding,
            });
        }
        let bytes = std::mem::take(&mut self.frame);
        self.state = GatherState::Chunks(Arc::new(ReceivedHeader { header, bytes }));
        Ok(rest)
    }

    fn take_frame<'a>(&mut self, bytes: &'a [u8]) -> Result<&'a [u8], Error> {
        let rest = self.fill_frame(bytes, FRAME_LEN);
        if self.frame.len() < FRAME_LEN {
            return Ok(rest);
        }
        let GatherState::Chunks(received) = &self.state else {
            return Ok(rest);
        };
        let header = &received.header;
        let chunk = self.next_index;
        let f = &self.frame;
        if f[..NONCE_PREFIX_LEN] != header.nonce_prefix {
            return Err(Error::ShardChunkFromOtherShard { chunk });
        }
        let found = u32::from_be_bytes([f[7], f[8], f[9], f[10]]);
        if found != chunk {
            return Err(Error::ShardChunkOutOfOrder {
                expected: chunk,
                found,
            });
        }
        let last = match f[11] {
            0 => false,
            1 => true,
            _ => {
                return Err(Error::ShardChunkMalformed {
                    chunk,
                    reason: "last-chunk flag is neither 0 nor 1",
                });
            }
        };
        let len = u32::from_be_bytes([f[12], f[13], f[14], f[15]]) as usize;
        if len > header.chunk_size {
            return Err(Error::ShardChunkMalformed {
                chunk,
                reason: "longer than the chunk size",
            });
        }
        if !last && len != header.chunk_size {
            return Err(Error::ShardChunkMalformed {
                chunk,
                reason: "a chunk before the last is not full",
            });
        }
        if !last && chunk == u32::MAX {
            return Err(Error::ShardTooLarge);
        }
        self.frame.clear();
        self.chunk = Some((last, len));
        self.body = SecretBytes::with_capacity(len + TAG_LEN);
        Ok(rest)
    }

    fn take_body<'a>(
        &mut self,
        bytes: &'a [u8],
        chunks: &mut Vec<SealedChunk>,
    ) -> Result<&'a [u8], Error> {
        let (GatherState::Chunks(received), Some((last, len))) = (&self.state, self.chunk) else {
            return Ok(bytes);
        };
        let want = len + TAG_LEN;
        let take = (want - self.body.len()).min(bytes.len());
        let (now, rest) = bytes.split_at(take);
        self.body.extend_from_slice(now);
        if self.body.len() < want {
            return Ok(rest);
        }
        chunks.push(SealedChunk {
            index: self.next_index,
            last,
            header: Arc::clone(received),
            body: std::mem::take(&mut self.body),
        });
        self.chunk = None;
        if last {
            self.state = GatherState::Done;
        } else {
            // Checked in take_frame: a chunk before the last is never number u32::MAX.
            self.next_index += 1;
        }
        Ok(rest)
    }
}

/// The key-holding half of a [`ShardOpener`]: authenticates and decrypts, in place, the
/// chunks a [`ShardGatherer`] gathered, in order, and computes the shard digest as it goes.
///
/// It trusts nothing the gatherer parsed: it rebuilds each nonce from its own counter and
/// the chunk's last flag (a wrong flag or position fails authentication), checks the
/// binding itself, and refuses a chunk gathered under another header.
pub struct ChunkOpener {
    key: LessSafeKey,
    expected: ShardBinding,
    header: Option<Arc<ReceivedHeader>>,
    digest: digest::Context,
    next_index: u32,
    done: bool,
    failed: bool,
    plaintext_len: u64,
    ciphertext_len: u64,
}

impl fmt::Debug for ChunkOpener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkOpener")
            .field("expected", &self.expected)
            .field("next_index", &self.next_index)
            .finish_non_exhaustive()
    }
}

impl ChunkOpener {
    /// Starts opening the chunks of a shard that must be bound to `expected`.
    pub fn new(key: &ShardKey, expected: ShardBinding) -> Self {
        Self {
            key: aes_256_gcm_key(key.expose_secret()),
            expected,
            header: None,
            digest: digest::Context::new(&digest::SHA256),
            next_index: 0,
            done: false,
            failed: false,
            plaintext_len: 0,
            ciphertext_len: 0,
        }
    }

    /// Authenticates the next chunk and decrypts it in its own buffer. After any error the
    /// opener refuses every further chunk ([`Error::ShardStreamFailed`]).
    pub fn open(&mut self, chunk: SealedChunk) -> Result<PlaintextChunk, Error> {
        if self.failed {
            return Err(Error::ShardStreamFailed);
        }
        let opened = self.open_next(chunk);
        self.failed = opened.is_err();
        opened
    }

    fn open_next(&mut self, chunk: SealedChunk) -> Result<PlaintextChunk, Error> {
        if self.done {
            return Err(Error::ShardTrailingData);
        }
        let index = self.next_index;
        let header = match &self.header {
            Some(header) => {
                if !Arc::ptr_eq(header, &chunk.header) && **header != *chunk.header {
                    return Err(Error::ShardChunkFromOtherShard { chunk: index });
                }
                Arc::clone(header)
            }
            None => {
                if chunk.header.header.binding != self.expected {
                    return Err(Error::ShardBindingMismatch {
                        expected: self.expected.clone(),
                        found: chunk.header.header.binding.clone(),
                    });
                }
                self.digest.update(&chunk.header.bytes);
                self.ciphertext_len = chunk.header.bytes.len() as u64;
                self.header = Some(Arc::clone(&chunk.header));
                Arc::clone(&chunk.header)
            }
        };
        if chunk.index != index {
            return Err(Error::ShardChunkOutOfOrder {
                expected: index,
                found: chunk.index,
            });
        }
        let SealedChunk { last, mut body, .. } = chunk;
        let Some(len) = body.len().checked_sub(TAG_LEN) else {
            return Err(Error::ShardChunkMalformed {
                chunk: index,
                reason: "shorter than its tag",
            });
        };
        if len > header.header.chunk_size || (!last && len != header.header.chunk_size) {
            return Err(Error::ShardChunkMalformed {
                chunk: index,
                reason: "its length does not fit the chunk size",
            });
        }
        let nonce = chunk_nonce(&header.header.nonce_prefix, index, last);
        // The frame as the sealer wrote it (the gatherer checked the received one equals
        // it), then the tag: the digest covers everything but the ciphertext bodies, which
        // the tags authenticate under the shard key.
        self.digest.update(&nonce);
        // len <= chunk_size <= MAX_CHUNK_SIZE.
        self.digest.update(&(len as u32).to_be_bytes());
        self.digest.update(&body.expose_secret()[len..]);
        if self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&header.bytes),
                body.expose_secret_mut(),
            )
            .is_err()
        {
            // ring leaves the buffer's contents unspecified on failure; `body` is wiped
            // when it drops here.
            return Err(Error::ShardChunkAuthFailed { chunk: index });
        }
        // Drops (and wipes) the tag's 16 bytes.
        body.truncate(len);
        self.plaintext_len += len as u64;
        self.ciphertext_len += (FRAME_LEN + len + TAG_LEN) as u64;
        if last {
            self.done = true;
            self.next_index = index.saturating_add(1);
        } else {
            self.next_index = index.checked_add(1).ok_or(Error::ShardTooLarge)?;
        }
        Ok(PlaintextChunk {
            index,
            last,
            bytes: body,
        })
    }

    /// Ends the shard: its figures and digest if the last chunk arrived and verified.
    /// Compare the digest with the manifest's before trusting the shard as a whole.
    pub fn finish(self) -> Result<ShardStats, Error> {
        if self.failed {
            return Err(Error::ShardStreamFailed);
        }
        if !self.done {
            return Err(Error::ShardTruncated);
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(self.digest.finish().as_ref());
        Ok(ShardStats {
            chunks: self.next_index,
            plaintext_len: self.plaintext_len,
            ciphertext_len: self.ciphertext_len,
            digest,
        })
    }
}

/// Decrypts one shard incrementally: feed ciphertext as it arrives, split anywhere, and get
/// each chunk's verified plaintext as soon as the chunk is complete. It is a
/// [`ShardGatherer`] and a [`ChunkOpener`] in one; use the two halves to receive and
/// decrypt on different threads.
///
/// Each returned chunk is authentic and in place, but the shard is known to be complete
/// only when [`finish`](Self::finish) succeeds: do not act on the plaintext before (loading
/// it is fine; serving with a truncated model is not). After any error the opener refuses
/// further input ([`Error::ShardStreamFailed`]).
#[derive(Debug)]
pub struct ShardOpener {
    gatherer: ShardGatherer,
    opener: ChunkOpener,
}

impl ShardOpener {
    /// Starts opening a shard that must be bound to `expected`.
    pub fn new(key: &ShardKey, expected: ShardBinding) -> Self {
        Self {
            gatherer: ShardGatherer::new(expected.clone()),
            opener: ChunkOpener::new(key, expected),
        }
    }

    /// The shard's header, once it has arrived and matched the expected binding.
    pub fn header(&self) -> Option<&ShardHeader> {
        self.gatherer.header()
    }

    /// Takes the next ciphertext bytes and returns every chunk they complete, verified.
    pub fn update(&mut self, bytes: &[u8]) -> Result<Vec<PlaintextChunk>, Error> {
        let mut sealed = Vec::new();
        let gathered = self.gatherer.update(bytes, &mut sealed);
        let mut opened = Vec::with_capacity(sealed.len());
        for chunk in sealed {
            match self.opener.open(chunk) {
                Ok(chunk) => opened.push(chunk),
                Err(e) => {
                    self.gatherer.fail();
                    return Err(e);
                }
            }
        }
        gathered?;
        Ok(opened)
    }

    /// Ends the stream: the shard's figures and digest, or an error unless the last chunk
    /// arrived and verified.
    pub fn finish(self) -> Result<ShardStats, Error> {
        self.gatherer.finish()?;
        self.opener.finish()
    }
}

/// What [`seal_shard`] wrote: the figures a model manifest records for the shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealedShardInfo {
    /// The shard digest ([`ShardStats::digest`]), as the manifest's `shard_digest`.
    pub digest: [u8; 32],
    /// Ciphertext bytes written.
    pub ciphertext_len: u64,
    /// Plaintext bytes read.
    pub plaintext_len: u64,
}

/// Seals everything `plaintext` yields into `ciphertext`, chunk by chunk (memory stays at
/// about two chunks), and returns the digest and sizes for the manifest.
pub fn seal_shard(
    key: &ShardKey,
    binding: &ShardBinding,
    chunk_size: usize,
    mut plaintext: impl Read,
    mut ciphertext: impl Write,
) -> Result<SealedShardInfo, Error> {
    let mut sealer = ShardSealer::new(key, binding, chunk_size)?;
    let mut input = SecretBytes::new(vec![0u8; chunk_size]);
    let mut output = Vec::with_capacity(chunk_size + 2 * (FRAME_LEN + TAG_LEN) + 256);
    let mut info = SealedShardInfo {
        digest: [0; 32],
        ciphertext_len: 0,
        plaintext_len: 0,
    };
    loop {
        let n = match plaintext.read(input.expose_secret_mut()) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        info.plaintext_len += n as u64;
        sealer.update(&input.expose_secret()[..n], &mut output)?;
        write_counted(&mut ciphertext, &mut output, &mut info)?;
    }
    info.digest = sealer.finish(&mut output)?;
    write_counted(&mut ciphertext, &mut output, &mut info)?;
    ciphertext.flush()?;
    Ok(info)
}

fn write_counted(
    sink: &mut impl Write,
    bytes: &mut Vec<u8>,
    info: &mut SealedShardInfo,
) -> Result<(), Error> {
    sink.write_all(bytes)?;
    info.ciphertext_len += bytes.len() as u64;
    bytes.clear();
    Ok(())
}

/// Opens a whole shard from `ciphertext` into one secret buffer. `size_hint` (the
/// manifest's `plaintext_size`) sizes the buffer up front; it is only a hint.
pub fn open_shard(
    key: &ShardKey,
    expected: ShardBinding,
    mut ciphertext: impl Read,
    size_hint: usize,
) -> Result<SecretBytes, Error> {
    let mut opener = ShardOpener::new(key, expected);
    // The hint is reserved before any byte is authenticated: cap it at 1 GiB.
    let mut plaintext = SecretBytes::with_capacity(size_hint.min(1 << 30));
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match ciphertext.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        for chunk in opener.update(&buf[..n])? {
            plaintext.extend_from_slice(chunk.expose_secret());
        }
    }
    opener.finish()?;
    Ok(plaintext)
}

#[cfg(test)]
mod tests;
