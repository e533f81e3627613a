//! The two backends, both through `object_store`: a local folder and S3-compatible storage.

use std::fmt;
use std::path::Path as FsPath;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{GetResultPayload, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use tokio::io::AsyncReadExt;
use zeroize::Zeroizing;

use crate::config::SecretAccessKey;
use crate::error::{Error, Result};
use crate::key::{StoreKey, check_prefix};
use crate::shard_store::{ByteStream, ObjectStream, ShardStore};

/// An upload that grows past this size switches from one request to a multipart upload, so
/// memory stays bounded whatever the object's size.
const MULTIPART_THRESHOLD: usize = 8 * 1024 * 1024;

/// The size of each multipart part: at least S3's 5 MiB minimum for all parts but the last.
const PART_SIZE: usize = 8 * 1024 * 1024;

/// Parts uploaded at once; with one part filling, an upload holds at most five parts.
const MAX_PARTS_IN_FLIGHT: usize = 4;

/// The chunk size of local reads. object_store's own local stream reads 8 KiB per blocking
/// task, which makes a large shard cost tens of thousands of thread hand-offs.
const LOCAL_READ_CHUNK: usize = 256 * 1024;

/// A [`ShardStore`] over any `object_store` backend.
pub(crate) struct ObjectBackend {
    store: Arc<dyn ObjectStore>,
    /// What `Debug` shows: the kind of backend and where it is, never a credential.
    description: String,
    scrubber: Arc<Scrubber>,
}

impl ObjectBackend {
    /// A store in the folder `dir`, created if missing.
    pub(crate) fn local(dir: &FsPath) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::Config(format!("local store: cannot create {}: {e}", dir.display()))
        })?;
        let folder = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| Error::Config(format!("local store {}: {e}", dir.display())))?
            // Durable like a remote store: a put returns once the staged file and the rename
            // that publishes it are on disk.
            .with_fsync(true);
        Ok(Self {
            store: Arc::new(folder),
            description: format!("local folder {}", dir.display()),
            scrubber: Arc::new(Scrubber::default()),
        })
    }

    /// A store in an S3 bucket; nothing is sent until the first request.
    pub(crate) fn s3(
        endpoint: Option<&str>,
        bucket: &str,
        region: &str,
        access_key_id: &str,
        secret_access_key: &SecretAccessKey,
        allow_http: bool,
    ) -> Result<Self> {
        // object_store's HTTP client (reqwest, with rustls and no bundled provider) takes the
        // process-wide rustls provider. Ring is the one the workspace compiles in; if another
        // was installed first, that one stays, which is what the error return means.
        let _already_installed = rustls::crypto::ring::default_provider().install_default();

        let scrubber = Arc::new(Scrubber::new([
            access_key_id,
            secret_access_key.expose_secret(),
        ]));
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(region)
            .with_access_key_id(access_key_id)
            .with_secret_access_key(secret_access_key.expose_secret())
            .with_allow_http(allow_http);
        if let Some(endpoint) = endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let s3 = builder
            .build()
            .map_err(|e| Error::Config(scrubber.clean(format!("s3 store: {}", chain(&e)))))?;
        let endpoint = endpoint.map_or_else(|| format!("AWS {region}"), str::to_owned);
        Ok(Self {
            store: Arc::new(s3),
            description: format!("s3 bucket {bucket} at {endpoint}"),
            scrubber,
        })
    }

    fn error(&self, operation: &str, key: Option<&StoreKey>, error: object_store::Error) -> Error {
        backend_error(&self.scrubber, operation, key, error)
    }
}

fn location(key: &StoreKey) -> Path {
    // A StoreKey's alphabet needs no encoding, so the object_store path is the key itself.
    Path::from(key.as_str())
}

fn backend_error(
    scrubber: &Scrubber,
    operation: &str,
    key: Option<&StoreKey>,
    error: object_store::Error,
) -> Error {
    match (error, key) {
        (object_store::Error::NotFound { .. }, Some(key)) => Error::NotFound { key: key.clone() },
        (error, key) => {
            let target = key.map_or_else(String::new, |key| format!(" {key}"));
            Error::Backend(scrubber.clean(format!("{operation}{target}: {}", chain(&error))))
        }
    }
}

/// An error's message followed by those of its causes that add something.
fn chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        let text = next.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = next.source();
    }
    message
}

/// Removes credentials from messages. The secret key never travels (requests are signed with
/// it), but servers do echo the access key id in some error bodies, and object_store's errors
/// quote those bodies.
#[derive(Default)]
struct Scrubber {
    credentials: Vec<Zeroizing<String>>,
}

impl Scrubber {
    fn new<'a>(credentials: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            credentials: credentials
                .into_iter()
                .filter(|c| !c.is_empty())
                .map(|c| Zeroizing::new(c.to_owned()))
                .collect(),
        }
    }

    fn clean(&self, mut message: String) -> String {
        for credential in &self.credentials {
            if message.contains(credential.as_str()) {
                message = message.replace(credential.as_str(), "<redacted>");
            }
        }
        message
    }
}

#[async_trait]
impl ShardStore for ObjectBackend {
    async fn put(&self, key: &StoreKey, bytes: Bytes) -> Result<()> {
        self.store
            .put(&location(key), PutPayload::from(bytes))
            .await
            .map_err(|e| self.error("put", Some(key), e))?;
        Ok(())
    }

    async fn put_stream(&self, key: &StoreKey, mut chunks: ByteStream) -> Result<u64> {
        let path = location(key);
        let mut buffered: Vec<Bytes> = Vec::new();
        let mut buffered_len = 0usize;
        let mut upload: Option<WriteMultipart> = None;
        let mut written = 0u64;
        loop {
            let chunk = match chunks.try_next().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(error) => {
                    abandon(upload).await;
                    return Err(error);
                }
            };
            written = written.saturating_add(chunk.len() as u64);
            if let Some(parts) = upload.as_mut() {
                if let Err(error) = parts.wait_for_capacity(MAX_PARTS_IN_FLIGHT).await {
                    abandon(upload).await;
                    return Err(self.error("put", Some(key), error));
                }
                parts.put(chunk);
                continue;
            }
            buffered_len = buffered_len.saturating_add(chunk.len());
            buffered.push(chunk);
            if buffered_len >= MULTIPART_THRESHOLD {
                let started = self
                    .store
                    .put_multipart(&path)
                    .await
                    .map_err(|e| self.error("put", Some(key), e))?;
                let mut parts = WriteMultipart::new_with_chunk_size(started, PART_SIZE);
                for chunk in buffered.drain(..) {
                    parts.put(chunk);
                }
                upload = Some(parts);
            }
        }
        match upload {
            // Small objects go up in one request, which is atomic on every backend.
            None => self
                .store
                .put(&path, buffered.into_iter().collect::<PutPayload>())
                .await
                .map(drop),
            // finish aborts the upload itself if a part or the completion fails.
            Some(parts) => parts.finish().await.map(drop),
        }
        .map_err(|e| self.error("put", Some(key), e))?;
        Ok(written)
    }

    async fn get_stream(&self, key: &StoreKey) -> Result<ObjectStream> {
        let result = self
            .store
            .get(&location(key))
            .await
            .map_err(|e| self.error("get", Some(key), e))?;
        let size = result.meta.size;
        let chunks: ByteStream = match result.payload {
            GetResultPayload::File(file, path) => {
                local_chunks(tokio::fs::File::from_std(file), size, key.clone(), path)
            }
            GetResultPayload::Stream(stream) => {
                let scrubber = Arc::clone(&self.scrubber);
                let key = key.clone();
                stream
                    .map_err(move |e| backend_error(&scrubber, "get", Some(&key), e))
                    .boxed()
            }
        };
        Ok(ObjectStream::new(key.clone(), size, chunks))
    }

    async fn size(&self, key: &StoreKey) -> Result<u64> {
        let meta = self
            .store
            .head(&location(key))
            .await
            .map_err(|e| self.error("size", Some(key), e))?;
        Ok(meta.size)
    }

    async fn delete(&self, key: &StoreKey) -> Result<()> {
        match self.store.delete(&location(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(self.error("delete", Some(key), error)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<StoreKey>> {
        check_prefix(prefix)?;
        let prefix_path = (!prefix.is_empty()).then(|| Path::from(prefix));
        let objects: Vec<_> = self
            .store
            .list(prefix_path.as_ref())
            .try_collect()
            .await
            .map_err(|e| self.error("list", None, e))?;
        let mut keys: Vec<StoreKey> = objects
            .into_iter()
            .filter_map(|meta| match StoreKey::new(meta.location.as_ref()) {
                Ok(key) => Some(key),
                Err(error) => {
                    tracing::warn!(%error, "skipping an object whose name is not a store key");
                    None
                }
            })
            .collect();
        keys.sort();
        Ok(keys)
    }
}

/// Abandons a multipart upload after a failure, so no part of it is published.
async fn abandon(upload: Option<WriteMultipart>) {
    if let Some(parts) = upload
        && let Err(error) = parts.abort().await
    {
        // The failure that caused the abort is what the caller needs; this one only leaves
        // unreferenced parts behind (S3 lifecycle rules or the staging-file sweep remove them).
        tracing::warn!(%error, "could not abort a failed multipart upload");
    }
}

/// Reads an open local file as a stream of [`LOCAL_READ_CHUNK`]-sized chunks, `size` bytes in
/// all (a file that grows while it is read does not lengthen the stream).
fn local_chunks(
    file: tokio::fs::File,
    size: u64,
    key: StoreKey,
    path: std::path::PathBuf,
) -> ByteStream {
    let reader = file.take(size);
    futures::stream::try_unfold(reader, move |mut reader| {
        let key = key.clone();
        let path = path.clone();
        async move {
            let mut chunk = BytesMut::with_capacity(LOCAL_READ_CHUNK);
            while chunk.len() < LOCAL_READ_CHUNK {
                let read = reader.read_buf(&mut chunk).await.map_err(|e| {
                    Error::Backend(format!("get {key}: reading {}: {e}", path.display()))
                })?;
                if read == 0 {
                    break;
                }
            }
            Ok(if chunk.is_empty() {
                None
            } else {
                Some((chunk.freeze(), reader))
            })
        }
    })
    .boxed()
}

impl fmt::Debug for ObjectBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectBackend")
            .field("backend", &self.description)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scrubber_removes_every_credential() {
        let scrubber = Scrubber::new(["AKIDEXAMPLE", "s3cr3t/key+value", ""]);
        let message = "403 SignatureDoesNotMatch: <AWSAccessKeyId>AKIDEXAMPLE</AWSAccessKeyId> \
                       s3cr3t/key+value and AKIDEXAMPLE again";
        assert_eq!(
            scrubber.clean(message.to_owned()),
            "403 SignatureDoesNotMatch: <AWSAccessKeyId><redacted></AWSAccessKeyId> \
             <redacted> and <redacted> again"
        );
        // The empty credential is dropped rather than "redacting" between every character.
        assert_eq!(scrubber.clean("abc".to_owned()), "abc");
    }

    #[test]
    fn not_found_maps_to_the_typed_error_and_others_are_scrubbed() {
        let key = StoreKey::new("models/m/v1/manifest.json").unwrap();
        let scrubber = Scrubber::new(["AKIDEXAMPLE"]);
        let missing = object_store::Error::NotFound {
            path: "models/m/v1/manifest.json".into(),
            source: "gone".into(),
        };
        assert!(matches!(
            backend_error(&scrubber, "get", Some(&key), missing),
            Error::NotFound { key: k } if k == key
        ));
        let refused = object_store::Error::Generic {
            store: "S3",
            source: "InvalidAccessKeyId: AKIDEXAMPLE".into(),
        };
        match backend_error(&scrubber, "get", Some(&key), refused) {
            Error::Backend(message) => {
                assert!(
                    message.starts_with("get models/m/v1/manifest.json: "),
                    "{message}"
                );
                assert!(
                    message.contains("InvalidAccessKeyId: <redacted>"),
                    "{message}"
                );
                assert!(!message.contains("AKIDEXAMPLE"), "{message}");
            }
            other => panic!("expected Backend, got {other:?}"),
        }
    }
}
