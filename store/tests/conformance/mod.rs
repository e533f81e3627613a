//! What every backend must do, run against each one by `tests/local.rs` and `tests/s3.rs`.
//! Every scenario works under its own `base` prefix, so it can share a store (or an external
//! S3 server) with others.

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use shardseal_store::{Error, KeyProblem, ShardStore, StoreKey};

/// Bigger than the multipart threshold (8 MiB), so it goes up in three parts.
pub const LARGE: usize = 20 * 1024 * 1024;

/// Bytes that differ from chunk to chunk, so a reordered, repeated or dropped chunk shows.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((i ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect()
}

pub fn key(base: &str, rest: &str) -> StoreKey {
    StoreKey::new(format!("{base}/{rest}")).unwrap()
}

fn chunked(data: &[u8], chunk: usize) -> shardseal_store::ByteStream {
    let chunks: Vec<_> = data
        .chunks(chunk)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    stream::iter(chunks).boxed()
}

fn assert_not_found<T: std::fmt::Debug>(result: Result<T, Error>, expected: &StoreKey) {
    match result {
        Err(Error::NotFound { key }) => assert_eq!(&key, expected),
        other => panic!("expected NotFound for {expected}, got {other:?}"),
    }
}

/// put, get, size, get_stream and overwrite of small objects.
pub async fn round_trip(store: &dyn ShardStore, base: &str) {
    let shard = key(base, "models/mlp/v1/stage-0.shard");
    let body = pattern(100_000, 1);
    store.put(&shard, Bytes::from(body.clone())).await.unwrap();
    assert_eq!(store.size(&shard).await.unwrap(), 100_000);
    assert_eq!(store.get(&shard).await.unwrap(), body);

    let stream = store.get_stream(&shard).await.unwrap();
    assert_eq!(stream.size(), 100_000);
    assert_eq!(stream.key(), &shard);
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    assert_eq!(chunks.concat(), body);

    // A put replaces the object whole.
    store
        .put(&shard, Bytes::from_static(b"shorter"))
        .await
        .unwrap();
    assert_eq!(store.get(&shard).await.unwrap(), &b"shorter"[..]);
    assert_eq!(store.size(&shard).await.unwrap(), 7);

    // An empty object is an object.
    let empty = key(base, "models/mlp/v1/empty");
    store.put(&empty, Bytes::new()).await.unwrap();
    assert_eq!(store.size(&empty).await.unwrap(), 0);
    assert!(store.get(&empty).await.unwrap().is_empty());
}

/// A large object goes up as a stream (multipart) and comes back as a stream of several
/// chunks, byte for byte. Returns the sizes of the chunks read.
pub async fn large_object_streams_in_chunks(store: &dyn ShardStore, base: &str) -> Vec<usize> {
    let shard = key(base, "models/big/v3/stage-1.shard");
    let body = pattern(LARGE, 2);
    let written = store
        .put_stream(&shard, chunked(&body, 1024 * 1024 + 7))
        .await
        .unwrap();
    assert_eq!(written, LARGE as u64);
    assert_eq!(store.size(&shard).await.unwrap(), LARGE as u64);

    let mut stream = store.get_stream(&shard).await.unwrap();
    assert_eq!(stream.size(), LARGE as u64);
    let mut sizes = Vec::new();
    let mut offset = 0;
    while let Some(chunk) = stream.try_next().await.unwrap() {
        assert_eq!(
            &chunk[..],
            &body[offset..offset + chunk.len()],
            "chunk at offset {offset}"
        );
        offset += chunk.len();
        sizes.push(chunk.len());
    }
    assert_eq!(offset, LARGE);
    assert!(
        sizes.len() > 1,
        "a {LARGE}-byte object came back in one chunk"
    );
    sizes
}

/// Reads of a missing key fail with the typed error, before any chunk; deletes are idempotent.
pub async fn missing_objects(store: &dyn ShardStore, base: &str) {
    let missing = key(base, "models/none/v1/stage-0.shard");
    assert_not_found(store.get(&missing).await, &missing);
    assert_not_found(store.get_stream(&missing).await, &missing);
    assert_not_found(store.size(&missing).await, &missing);
    store.delete(&missing).await.unwrap();

    let manifest = key(base, "models/gone/v1/manifest.json");
    store
        .put(&manifest, Bytes::from_static(b"{}"))
        .await
        .unwrap();
    store.delete(&manifest).await.unwrap();
    assert_not_found(store.get(&manifest).await, &manifest);
    store.delete(&manifest).await.unwrap();
}

/// Listing is by whole path components, sorted, and checks its prefix.
pub async fn listing(store: &dyn ShardStore, base: &str) {
    let names = [
        "models/mlp/v1/stage-1.shard",
        "models/mlp/v1/manifest.json",
        "models/mlp/v1/stage-0.shard",
        "models/mlp/v2/manifest.json",
        "models/mlp2/v1/manifest.json",
    ];
    for name in names {
        store
            .put(&key(base, name), Bytes::from_static(b"x"))
            .await
            .unwrap();
    }
    let v1 = store.list(&format!("{base}/models/mlp/v1")).await.unwrap();
    assert_eq!(
        v1,
        vec![
            key(base, "models/mlp/v1/manifest.json"),
            key(base, "models/mlp/v1/stage-0.shard"),
            key(base, "models/mlp/v1/stage-1.shard"),
        ]
    );
    // `models/mlp` does not reach into `models/mlp2`.
    assert_eq!(
        store
            .list(&format!("{base}/models/mlp"))
            .await
            .unwrap()
            .len(),
        4
    );
    assert!(
        store
            .list(&format!("{base}/models/absent"))
            .await
            .unwrap()
            .is_empty()
    );
    let everything = store.list("").await.unwrap();
    for name in names {
        assert!(everything.contains(&key(base, name)), "{name} not listed");
    }
    for (prefix, problem) in [
        ("../etc", KeyProblem::DotComponent),
        ("/models", KeyProblem::Absolute),
        ("models/", KeyProblem::EmptyComponent),
        ("models/*", KeyProblem::BadCharacter('*')),
    ] {
        match store.list(prefix).await {
            Err(Error::InvalidKey { problem: got, .. }) => assert_eq!(got, problem, "{prefix}"),
            other => panic!("list({prefix:?}) should be InvalidKey, got {other:?}"),
        }
    }
}

/// An upload whose source fails publishes nothing, whether it failed while still buffered or
/// after the multipart upload began, and leaves an older object under the key untouched.
pub async fn failed_uploads_publish_nothing(store: &dyn ShardStore, base: &str) {
    for (name, good_bytes) in [("small", 3 * 1024 * 1024), ("multipart", 12 * 1024 * 1024)] {
        let fresh = key(base, &format!("models/{name}/v1/stage-0.shard"));
        let failing = chunked(&pattern(good_bytes, 3), 1024 * 1024)
            .chain(stream::once(async {
                Err(Error::Backend("source went away".into()))
            }))
            .boxed();
        match store.put_stream(&fresh, failing).await {
            Err(Error::Backend(message)) => assert_eq!(message, "source went away"),
            other => panic!("{name}: expected the source's error, got {other:?}"),
        }
        assert_not_found(store.get(&fresh).await, &fresh);

        let existing = key(base, &format!("models/{name}/v1/manifest.json"));
        store
            .put(&existing, Bytes::from_static(b"old"))
            .await
            .unwrap();
        let failing = chunked(&pattern(good_bytes, 4), 1024 * 1024)
            .chain(stream::once(async {
                Err(Error::Backend("source went away".into()))
            }))
            .boxed();
        assert!(store.put_stream(&existing, failing).await.is_err());
        assert_eq!(store.get(&existing).await.unwrap(), &b"old"[..]);
    }
}

/// put_file uploads a local file whole.
pub async fn put_file(store: &dyn ShardStore, base: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stage-2.shard");
    let body = pattern(2 * 1024 * 1024 + 5, 5);
    std::fs::write(&path, &body).unwrap();
    let shard = key(base, "models/file/v1/stage-2.shard");
    assert_eq!(
        store.put_file(&shard, &path).await.unwrap(),
        body.len() as u64
    );
    assert_eq!(store.get(&shard).await.unwrap(), body);

    let absent = dir.path().join("absent.shard");
    match store.put_file(&shard, &absent).await {
        Err(Error::ReadFile { path, source }) => {
            assert_eq!(path, absent);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected ReadFile, got {other:?}"),
    }
    // The failed upload left the earlier object as it was.
    assert_eq!(store.get(&shard).await.unwrap(), body);
}
