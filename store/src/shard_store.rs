//! The store seam: the trait every backend implements, and the stream a read returns.

use std::fmt;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream::{BoxStream, Stream, StreamExt, TryStreamExt};
use tokio::io::AsyncReadExt;

use crate::error::{Error, Result};
use crate::key::StoreKey;

/// A stream of byte chunks, for uploads and downloads.
pub type ByteStream = BoxStream<'static, Result<Bytes>>;

/// How much of a local file [`ShardStore::put_file`] reads at a time.
const FILE_READ_CHUNK: usize = 1024 * 1024;

/// The most [`ShardStore::get`] reserves up front: the announced size comes from the store,
/// which is trusted for availability only.
const MAX_GET_RESERVE: u64 = 64 * 1024 * 1024;

/// Where encrypted shards and signed manifests live.
///
/// Object-safe: hold one as `Arc<dyn ShardStore>` (see
/// [`StoreConfig::open`](crate::StoreConfig::open)). Every method takes a checked
/// [`StoreKey`], so a backend never sees `..` or an absolute path.
///
/// A store is trusted for availability only: what it returns is ciphertext or signed data that
/// the caller authenticates (the shard's AES-GCM chunks, the manifest's signature).
#[async_trait]
pub trait ShardStore: fmt::Debug + Send + Sync {
    /// Stores `bytes` under `key`, replacing any object there. Atomic: a reader sees the old
    /// object or the new one, never a part.
    async fn put(&self, key: &StoreKey, bytes: Bytes) -> Result<()>;

    /// Stores a stream of chunks under `key` without holding the whole object in memory, and
    /// returns the number of bytes stored. Atomic like [`put`](Self::put): if the stream or the
    /// backend fails, the upload is abandoned and nothing is published under `key`.
    async fn put_stream(&self, key: &StoreKey, chunks: ByteStream) -> Result<u64>;

    /// Uploads a local file, read in chunks, and returns the number of bytes stored.
    async fn put_file(&self, key: &StoreKey, path: &Path) -> Result<u64> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|source| Error::ReadFile {
                path: path.to_owned(),
                source,
            })?;
        let owned_path = path.to_owned();
        let chunks = futures::stream::try_unfold(file, move |mut file| {
            let path = owned_path.clone();
            async move {
                let mut chunk = BytesMut::with_capacity(FILE_READ_CHUNK);
                while chunk.len() < FILE_READ_CHUNK {
                    let read =
                        file.read_buf(&mut chunk)
                            .await
                            .map_err(|source| Error::ReadFile {
                                path: path.clone(),
                                source,
                            })?;
                    if read == 0 {
                        break;
                    }
                }
                Ok(if chunk.is_empty() {
                    None
                } else {
                    Some((chunk.freeze(), file))
                })
            }
        });
        self.put_stream(key, chunks.boxed()).await
    }

    /// Opens `key` for reading as a stream of chunks, so the caller can decrypt while it
    /// downloads. Fails with [`Error::NotFound`] here, before any chunk, if nothing is stored
    /// under `key`.
    async fn get_stream(&self, key: &StoreKey) -> Result<ObjectStream>;

    /// Reads a whole object into memory; for small objects such as manifests.
    async fn get(&self, key: &StoreKey) -> Result<Bytes> {
        let mut stream = self.get_stream(key).await?;
        let reserve = usize::try_from(stream.size().min(MAX_GET_RESERVE)).unwrap_or(0);
        let mut whole = BytesMut::with_capacity(reserve);
        while let Some(chunk) = stream.try_next().await? {
            whole.extend_from_slice(&chunk);
        }
        Ok(whole.freeze())
    }

    /// The size in bytes of the object under `key`.
    async fn size(&self, key: &StoreKey) -> Result<u64>;

    /// Removes the object under `key`. Removing a key that holds nothing succeeds: S3 does not
    /// tell the two apart, so no backend does.
    async fn delete(&self, key: &StoreKey) -> Result<()>;

    /// The keys under `prefix`, sorted. The prefix is matched by whole path components
    /// (`models/mlp` finds `models/mlp/v1/manifest.json`, not `models/mlp2/...`); the empty
    /// prefix lists the whole store. Objects whose names are not valid keys are skipped.
    async fn list(&self, prefix: &str) -> Result<Vec<StoreKey>>;
}

/// An object being read: its announced size and a stream of its bytes in chunks.
///
/// The stream ends with [`Error::SizeMismatch`] if the backend delivers more or fewer bytes
/// than it announced, so a cut connection is never mistaken for a short object.
pub struct ObjectStream {
    key: StoreKey,
    size: u64,
    delivered: u64,
    finished: bool,
    chunks: ByteStream,
}

impl ObjectStream {
    /// Wraps a backend's chunk stream for the object `key` of `size` bytes.
    pub fn new(
        key: StoreKey,
        size: u64,
        chunks: impl Stream<Item = Result<Bytes>> + Send + 'static,
    ) -> Self {
        Self {
            key,
            size,
            delivered: 0,
            finished: false,
            chunks: chunks.boxed(),
        }
    }

    /// The object's size in bytes, as the backend announced it.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The key being read.
    pub fn key(&self) -> &StoreKey {
        &self.key
    }

    fn mismatch(&mut self) -> Poll<Option<Result<Bytes>>> {
        self.finished = true;
        Poll::Ready(Some(Err(Error::SizeMismatch {
            key: self.key.clone(),
            announced: self.size,
            delivered: self.delivered,
        })))
    }
}

impl Stream for ObjectStream {
    type Item = Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match self.chunks.poll_next_unpin(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => {
                self.delivered = self.delivered.saturating_add(chunk.len() as u64);
                if self.delivered > self.size {
                    self.mismatch()
                } else {
                    Poll::Ready(Some(Ok(chunk)))
                }
            }
            Poll::Ready(Some(Err(error))) => {
                self.finished = true;
                Poll::Ready(Some(Err(error)))
            }
            Poll::Ready(None) if self.delivered != self.size => self.mismatch(),
            Poll::Ready(None) => {
                self.finished = true;
                Poll::Ready(None)
            }
        }
    }
}

impl fmt::Debug for ObjectStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectStream")
            .field("key", &self.key)
            .field("size", &self.size)
            .field("delivered", &self.delivered)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use futures::stream;

    use super::*;

    fn key() -> StoreKey {
        StoreKey::new("models/m/v1/stage-0.shard").unwrap()
    }

    fn chunks(parts: &[&'static [u8]]) -> impl Stream<Item = Result<Bytes>> + Send + 'static {
        stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    #[tokio::test]
    async fn passes_chunks_through_when_the_size_matches() {
        let stream = ObjectStream::new(key(), 5, chunks(&[b"ab", b"cde"]));
        let got: Vec<Bytes> = stream.try_collect().await.unwrap();
        assert_eq!(
            got,
            vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cde")]
        );
    }

    #[tokio::test]
    async fn a_short_object_ends_with_size_mismatch() {
        let mut stream = ObjectStream::new(key(), 10, chunks(&[b"abcd"]));
        assert_eq!(stream.next().await.unwrap().unwrap(), &b"abcd"[..]);
        match stream.next().await {
            Some(Err(Error::SizeMismatch {
                key: k,
                announced: 10,
                delivered: 4,
            })) => assert_eq!(k, key()),
            other => panic!("expected SizeMismatch, got {other:?}"),
        }
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn a_long_object_is_cut_with_size_mismatch() {
        let mut stream = ObjectStream::new(key(), 3, chunks(&[b"ab", b"cd", b"ef"]));
        assert_eq!(stream.next().await.unwrap().unwrap(), &b"ab"[..]);
        assert!(matches!(
            stream.next().await,
            Some(Err(Error::SizeMismatch {
                announced: 3,
                delivered: 4,
                ..
            }))
        ));
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn a_backend_error_ends_the_stream() {
        let failing = stream::iter(vec![
            Ok(Bytes::from_static(b"ab")),
            Err(Error::Backend("connection reset".into())),
            Ok(Bytes::from_static(b"cd")),
        ]);
        let mut stream = ObjectStream::new(key(), 4, failing);
        assert!(stream.next().await.unwrap().is_ok());
        assert!(
            matches!(stream.next().await, Some(Err(Error::Backend(m))) if m == "connection reset")
        );
        assert!(stream.next().await.is_none());
    }
}
