//! The local-folder backend: the shared conformance scenarios, plus what only a folder shows
//! (files on disk, staging files, chunk sizes).

mod conformance;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use shardseal_store::{ShardStore, StoreConfig, StoreKey};

fn open(dir: &Path) -> Arc<dyn ShardStore> {
    StoreConfig::Local {
        dir: dir.to_owned(),
    }
    .open()
    .unwrap()
}

/// Every file under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[tokio::test]
async fn round_trip() {
    let dir = tempfile::tempdir().unwrap();
    conformance::round_trip(open(dir.path()).as_ref(), "t").await;
}

#[tokio::test]
async fn large_object_streams_in_chunks_of_256_kib() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = conformance::large_object_streams_in_chunks(open(dir.path()).as_ref(), "t").await;
    assert_eq!(sizes.len(), conformance::LARGE / (256 * 1024));
    assert!(sizes.iter().all(|&size| size == 256 * 1024), "{sizes:?}");
}

#[tokio::test]
async fn missing_objects() {
    let dir = tempfile::tempdir().unwrap();
    conformance::missing_objects(open(dir.path()).as_ref(), "t").await;
}

#[tokio::test]
async fn listing() {
    let dir = tempfile::tempdir().unwrap();
    conformance::listing(open(dir.path()).as_ref(), "t").await;
}

#[tokio::test]
async fn failed_uploads_publish_nothing_and_leave_no_staging_file() {
    let dir = tempfile::tempdir().unwrap();
    conformance::failed_uploads_publish_nothing(open(dir.path()).as_ref(), "t").await;
    assert_eq!(
        files_under(dir.path()),
        vec![
            "t/models/multipart/v1/manifest.json",
            "t/models/small/v1/manifest.json"
        ]
    );
}

#[tokio::test]
async fn put_file() {
    let dir = tempfile::tempdir().unwrap();
    conformance::put_file(open(dir.path()).as_ref(), "t").await;
}

#[tokio::test]
async fn objects_are_plain_files_at_their_key_and_puts_leave_no_staging_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let shard = StoreKey::new("models/mlp/v1/stage-0.shard").unwrap();
    store
        .put(&shard, Bytes::from_static(b"ciphertext"))
        .await
        .unwrap();
    let big = StoreKey::new("models/mlp/v1/stage-1.shard").unwrap();
    let body = conformance::pattern(conformance::LARGE, 9);
    let chunks = futures::stream::iter(
        body.chunks(1 << 20)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    );
    store.put_stream(&big, Box::pin(chunks)).await.unwrap();

    assert_eq!(
        std::fs::read(dir.path().join("models/mlp/v1/stage-0.shard")).unwrap(),
        b"ciphertext"
    );
    assert_eq!(
        std::fs::read(dir.path().join("models/mlp/v1/stage-1.shard")).unwrap(),
        body
    );
    assert_eq!(
        files_under(dir.path()),
        vec!["models/mlp/v1/stage-0.shard", "models/mlp/v1/stage-1.shard"]
    );
}

#[tokio::test]
async fn a_reader_keeps_the_object_it_opened_when_a_put_replaces_it() {
    // Puts publish by rename, so an open download goes on reading the old file whole: never
    // a mix of old and new bytes, never a short read.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let shard = StoreKey::new("models/mlp/v1/stage-0.shard").unwrap();
    let old = conformance::pattern(1024 * 1024, 10);
    store.put(&shard, Bytes::from(old.clone())).await.unwrap();

    let mut reading = store.get_stream(&shard).await.unwrap();
    let first = reading.try_next().await.unwrap().unwrap();
    store
        .put(
            &shard,
            Bytes::from(conformance::pattern(3 * 1024 * 1024, 11)),
        )
        .await
        .unwrap();
    let mut got = first.to_vec();
    while let Some(chunk) = reading.try_next().await.unwrap() {
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, old);
    assert_eq!(store.size(&shard).await.unwrap(), 3 * 1024 * 1024);
}

#[tokio::test]
async fn open_creates_the_folder_and_a_url_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a/b/store");
    let url = format!("file://{}", nested.display());
    let config = StoreConfig::from_url(&url).unwrap();
    assert_eq!(
        config,
        StoreConfig::Local {
            dir: nested.clone()
        }
    );
    let store = config.open().unwrap();
    assert!(nested.is_dir());
    assert!(format!("{store:?}").contains("local folder"), "{store:?}");
    assert!(store.list("").await.unwrap().is_empty());
}
