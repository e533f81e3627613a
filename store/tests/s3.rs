//! The S3 backend against a real S3-compatible server, never a mock.
//!
//! The server comes from the test kit ([`shardseal_testkit::s3::S3Server`]): the one at
//! `SHARDSEAL_S3_TEST_ENDPOINT`, else an `s3s-fs` on PATH (`bash .ci/s3-server.sh` installs
//! it) started per test, else none: each test prints that it was SKIPPED and why, and passes,
//! unless `SHARDSEAL_S3_TEST_REQUIRED` is set (as CI sets it), when it fails instead.

mod conformance;

use std::sync::Arc;

use shardseal_store::{Error, SecretAccessKey, ShardStore, StoreConfig, StoreKey};
use shardseal_testkit::s3::{
    ACCESS_KEY_ID, BUCKET, REGION, S3Server, SECRET_ACCESS_KEY, unique_name as unique_base,
};

/// How the store's tests open the shared test server.
trait StoreServer {
    fn config(&self) -> StoreConfig;
    fn config_for(&self, bucket: &str, secret_access_key: &str) -> StoreConfig;
    fn open(&self) -> Arc<dyn ShardStore>;
}

impl StoreServer for S3Server {
    fn config(&self) -> StoreConfig {
        self.config_for(&self.bucket, &self.secret_access_key)
    }

    fn config_for(&self, bucket: &str, secret_access_key: &str) -> StoreConfig {
        StoreConfig::S3 {
            endpoint: Some(self.endpoint.clone()),
            bucket: bucket.into(),
            region: self.region.clone(),
            access_key_id: self.access_key_id.clone(),
            secret_access_key: SecretAccessKey::new(secret_access_key),
            allow_http: self.allow_http(),
        }
    }

    fn open(&self) -> Arc<dyn ShardStore> {
        self.config().open().unwrap()
    }
}

/// Runs one conformance scenario against a fresh server, then removes what it stored.
macro_rules! s3_scenario {
    ($name:ident $(, $check:expr)?) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let Some(server) = S3Server::start(stringify!($name)) else {
                return;
            };
            let store = server.open();
            let base = unique_base(stringify!($name));
            let _result = conformance::$name(store.as_ref(), &base).await;
            $( ($check)(&_result); )?
            for key in store.list(&base).await.unwrap() {
                store.delete(&key).await.unwrap();
            }
            assert!(store.list(&base).await.unwrap().is_empty());
        }
    };
}

s3_scenario!(round_trip);
s3_scenario!(large_object_streams_in_chunks, |sizes: &Vec<usize>| {
    eprintln!("20 MiB object read from S3 in {} chunks", sizes.len())
});
s3_scenario!(missing_objects);
s3_scenario!(listing);
s3_scenario!(failed_uploads_publish_nothing);
s3_scenario!(put_file);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_a_backend_error_that_names_no_credential() {
    let Some(server) = S3Server::start("refused_credentials") else {
        return;
    };
    let wrong_secret = "wrong-secret-0123456789";
    let config = server.config_for(&server.bucket, wrong_secret);
    let store = config.open().unwrap();
    let key = StoreKey::new(format!(
        "{}/models/m/v1/manifest.json",
        unique_base("refused")
    ))
    .unwrap();
    for result in [
        store.get(&key).await.map(drop),
        store
            .put(&key, bytes::Bytes::from_static(b"x"))
            .await
            .map(drop),
    ] {
        match result {
            Err(Error::Backend(message)) => {
                assert!(message.contains(key.as_str()), "{message}");
                assert!(!message.contains(wrong_secret), "{message}");
                assert!(!message.contains(&server.access_key_id), "{message}");
                assert!(!message.contains(&server.secret_access_key), "{message}");
            }
            other => panic!("expected a Backend error, got {other:?}"),
        }
    }
    // The Debug form names the bucket and endpoint, never a credential.
    let printed = format!("{store:?} {config:?}");
    assert!(printed.contains(&server.bucket), "{printed}");
    assert!(!printed.contains(wrong_secret), "{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_url_opens_the_same_bucket() {
    let Some(server) = S3Server::start("store_url") else {
        return;
    };
    let url = format!(
        "s3://{}?endpoint={}&region={}&allow_http={}",
        server.bucket,
        server.endpoint,
        server.region,
        server.endpoint.starts_with("http://")
    );
    let from_url = StoreConfig::from_url_with_env(&url, |name| match name {
        shardseal_store::ACCESS_KEY_ID_VAR => Some(server.access_key_id.clone()),
        shardseal_store::SECRET_ACCESS_KEY_VAR => Some(server.secret_access_key.clone()),
        _ => None,
    })
    .unwrap();
    assert_eq!(from_url, server.config());

    let key = StoreKey::new(format!(
        "{}/models/m/v1/manifest.json",
        unique_base("store_url")
    ))
    .unwrap();
    server
        .open()
        .put(&key, bytes::Bytes::from_static(b"signed manifest"))
        .await
        .unwrap();
    let store = from_url.open().unwrap();
    assert_eq!(store.get(&key).await.unwrap(), &b"signed manifest"[..]);
    store.delete(&key).await.unwrap();
}

#[tokio::test]
async fn an_https_store_opens_with_the_ring_tls_provider() {
    // Building the HTTPS client needs a rustls provider; without one, reqwest would panic here.
    // Nothing is sent: an S3 store is not contacted until its first request.
    let store = StoreConfig::S3 {
        endpoint: Some("https://127.0.0.1:1".into()),
        bucket: BUCKET.into(),
        region: REGION.into(),
        access_key_id: ACCESS_KEY_ID.into(),
        secret_access_key: SecretAccessKey::new(SECRET_ACCESS_KEY),
        allow_http: false,
    }
    .open()
    .unwrap();
    assert!(format!("{store:?}").contains("s3 bucket shardseal-test at https://127.0.0.1:1"));
    assert!(rustls::crypto::CryptoProvider::get_default().is_some());
}
