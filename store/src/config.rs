//! Which backend a store uses, from a config file or a URL.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use subtle::ConstantTimeEq;
use url::Url;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::backend::ObjectBackend;
use crate::error::{Error, Result};
use crate::shard_store::ShardStore;

/// The folder a default store uses, relative to the working directory.
pub const DEFAULT_LOCAL_DIR: &str = "shardseal-store";

/// The region used when none is given; S3-compatible servers other than AWS ignore it.
pub const DEFAULT_REGION: &str = "us-east-1";

/// The environment variable [`StoreConfig::from_url`] reads an S3 access key id from.
pub const ACCESS_KEY_ID_VAR: &str = "AWS_ACCESS_KEY_ID";

/// The environment variable [`StoreConfig::from_url`] reads an S3 secret access key from.
pub const SECRET_ACCESS_KEY_VAR: &str = "AWS_SECRET_ACCESS_KEY";

/// Where a shard store keeps its objects.
///
/// In TOML:
///
/// ```toml
/// backend = "local"
/// dir = "/var/lib/shardseal/store"
/// ```
///
/// ```toml
/// backend = "s3"
/// endpoint = "https://minio.internal:9000"   # omit for AWS itself
/// bucket = "shardseal-shards"
/// region = "us-east-1"                        # the default
/// access_key_id = "..."
/// secret_access_key = "..."
/// allow_http = false                          # the default
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreConfig {
    /// A folder on this machine. Puts are atomic: each object is written to a staging file
    /// beside its final name, synced, then renamed into place.
    Local {
        /// The store's root folder, created when the store is opened.
        dir: PathBuf,
    },
    /// An S3-compatible object store (AWS S3, MinIO, Ceph RGW, s3s-fs, ...), addressed
    /// path-style (`<endpoint>/<bucket>/<key>`).
    S3 {
        /// The server's base URL, `https://host[:port]`; `None` means AWS's endpoint for
        /// `region`.
        #[serde(default)]
        endpoint: Option<String>,
        /// The bucket; it must already exist.
        bucket: String,
        /// The region requests are signed for.
        #[serde(default = "default_region")]
        region: String,
        /// The access key id of the credentials requests are signed with.
        access_key_id: String,
        /// The secret access key of those credentials.
        secret_access_key: SecretAccessKey,
        /// Allow a plain `http://` endpoint. Off by default: only for a loopback test server
        /// or a network you trust, as TLS is what keeps the credentials' signatures and the
        /// access pattern off the wire. The objects themselves are ciphertext either way.
        #[serde(default)]
        allow_http: bool,
    },
}

fn default_region() -> String {
    DEFAULT_REGION.to_owned()
}

impl Default for StoreConfig {
    /// A local folder, [`DEFAULT_LOCAL_DIR`], in the working directory.
    fn default() -> Self {
        StoreConfig::Local {
            dir: PathBuf::from(DEFAULT_LOCAL_DIR),
        }
    }
}

impl StoreConfig {
    /// Parses a store URL and checks the result with [`validate`](Self::validate):
    ///
    /// - a plain path, or `file:///absolute/path`: a local folder;
    /// - `s3://<bucket>?endpoint=<url>&region=<region>&allow_http=<true|false>`: an S3 bucket
    ///   (every parameter optional). Credentials are never part of the URL, which ends up in
    ///   shell histories and process lists: they come from the environment variables
    ///   [`ACCESS_KEY_ID_VAR`] and [`SECRET_ACCESS_KEY_VAR`].
    pub fn from_url(url: &str) -> Result<Self> {
        Self::from_url_with_env(url, |name| std::env::var(name).ok())
    }

    /// [`from_url`](Self::from_url) with the environment given as a lookup function, so that
    /// callers (and tests) can supply credentials from elsewhere.
    pub fn from_url_with_env(url: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let config = if let Some(rest) = url.strip_prefix("s3://") {
            parse_s3_url(rest, url, env)?
        } else if url.starts_with("file:") {
            let parsed =
                Url::parse(url).map_err(|e| Error::Config(format!("invalid file URL: {e}")))?;
            let dir = parsed.to_file_path().map_err(|()| {
                Error::Config(
                    "a file URL names an absolute local path: file:///path/to/store".into(),
                )
            })?;
            StoreConfig::Local { dir }
        } else if let Some((scheme, _)) = url.split_once("://") {
            // Not echoing the URL: whatever follows the scheme may hold credentials.
            return Err(Error::Config(format!(
                "unsupported store URL scheme {scheme:?}: use a path, file:///path or s3://bucket"
            )));
        } else {
            StoreConfig::Local {
                dir: PathBuf::from(url),
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the settings, so that a bad configuration fails at start-up with a message that
    /// names the setting, never at the first shard download.
    pub fn validate(&self) -> Result<()> {
        match self {
            StoreConfig::Local { dir } => {
                if dir.as_os_str().is_empty() {
                    return Err(Error::Config("local store: `dir` is empty".into()));
                }
                Ok(())
            }
            StoreConfig::S3 {
                endpoint,
                bucket,
                region,
                access_key_id,
                secret_access_key,
                allow_http,
            } => {
                check_bucket_name(bucket)?;
                if region.is_empty()
                    || !region
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                {
                    return Err(Error::Config(format!(
                        "s3 store: region {region:?} is not a region name such as us-east-1"
                    )));
                }
                if let Some(endpoint) = endpoint {
                    check_endpoint(endpoint, *allow_http)?;
                }
                if access_key_id.is_empty() {
                    return Err(Error::Config("s3 store: `access_key_id` is empty".into()));
                }
                if secret_access_key.expose_secret().is_empty() {
                    return Err(Error::Config(
                        "s3 store: `secret_access_key` is empty".into(),
                    ));
                }
                Ok(())
            }
        }
    }

    /// Validates the configuration and opens the store it names. A local store's folder is
    /// created if missing; an S3 store is not contacted until the first request.
    pub fn open(&self) -> Result<Arc<dyn ShardStore>> {
        self.validate()?;
        let backend = match self {
            StoreConfig::Local { dir } => ObjectBackend::local(dir)?,
            StoreConfig::S3 {
                endpoint,
                bucket,
                region,
                access_key_id,
                secret_access_key,
                allow_http,
            } => ObjectBackend::s3(
                endpoint.as_deref(),
                bucket,
                region,
                access_key_id,
                secret_access_key,
                *allow_http,
            )?,
        };
        Ok(Arc::new(backend))
    }
}

fn parse_s3_url(
    rest: &str,
    url: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<StoreConfig> {
    let authority = rest
        .split_once('?')
        .map_or(rest, |(authority, _)| authority);
    if authority.contains('@') {
        return Err(Error::Config(format!(
            "an s3 URL carries no credentials: set {ACCESS_KEY_ID_VAR} and {SECRET_ACCESS_KEY_VAR}"
        )));
    }
    let bucket = authority.strip_suffix('/').unwrap_or(authority);
    if bucket.contains('/') {
        return Err(Error::Config(
            "an s3 URL names a bucket and no path: s3://bucket?endpoint=...".into(),
        ));
    }
    let mut endpoint = None;
    let mut region = DEFAULT_REGION.to_owned();
    let mut allow_http = false;
    let parsed = Url::parse(url).map_err(|e| Error::Config(format!("invalid s3 URL: {e}")))?;
    for (name, value) in parsed.query_pairs() {
        match name.as_ref() {
            "endpoint" => endpoint = Some(value.into_owned()),
            "region" => region = value.into_owned(),
            "allow_http" => {
                allow_http = match value.as_ref() {
                    "true" => true,
                    "false" => false,
                    _ => {
                        return Err(Error::Config(format!(
                            "s3 URL: allow_http is true or false, not {value:?}"
                        )));
                    }
                }
            }
            other => {
                return Err(Error::Config(format!(
                    "s3 URL: unknown parameter {other:?} (known: endpoint, region, allow_http)"
                )));
            }
        }
    }
    let (Some(access_key_id), Some(secret)) = (env(ACCESS_KEY_ID_VAR), env(SECRET_ACCESS_KEY_VAR))
    else {
        return Err(Error::Config(format!(
            "s3 store: set {ACCESS_KEY_ID_VAR} and {SECRET_ACCESS_KEY_VAR} to its credentials"
        )));
    };
    Ok(StoreConfig::S3 {
        endpoint,
        bucket: bucket.to_owned(),
        region,
        access_key_id,
        secret_access_key: SecretAccessKey::new(secret),
        allow_http,
    })
}

/// S3's bucket naming rules, so a typo fails here rather than as a signature error.
fn check_bucket_name(bucket: &str) -> Result<()> {
    let bytes = bucket.as_bytes();
    let charset_ok = bytes
        .iter()
        .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let ends_ok = matches!(
        (bytes.first(), bytes.last()),
        (Some(first), Some(last)) if first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric()
    );
    if (3..=63).contains(&bytes.len()) && charset_ok && ends_ok && !bucket.contains("..") {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "s3 store: bucket {bucket:?} is not a valid bucket name (3 to 63 characters of \
             a-z 0-9 . -, starting and ending with a letter or digit)"
        )))
    }
}

fn check_endpoint(endpoint: &str, allow_http: bool) -> Result<()> {
    // The endpoint's text is not echoed: a user may have pasted credentials into it.
    let url = Url::parse(endpoint)
        .map_err(|e| Error::Config(format!("s3 store: `endpoint` is not a URL: {e}")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Error::Config(
            "s3 store: `endpoint` carries no credentials: use access_key_id and secret_access_key"
                .into(),
        ));
    }
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Error::Config(format!(
            "s3 store: `endpoint` scheme {:?} is not http or https",
            url.scheme()
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(Error::Config("s3 store: `endpoint` has no host".into()));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(Error::Config(
            "s3 store: `endpoint` is a scheme, host and port only (the bucket is `bucket`)".into(),
        ));
    }
    if url.scheme() == "http" && !allow_http {
        return Err(Error::Config(
            "s3 store: `endpoint` is plain http; set allow_http = true only for a loopback \
             test server or a network you trust"
                .into(),
        ));
    }
    Ok(())
}

/// An S3 secret access key: printed as a redacted marker, wiped on drop, compared in constant
/// time.
#[derive(Clone, Deserialize, Zeroize, ZeroizeOnDrop)]
#[serde(transparent)]
pub struct SecretAccessKey(String);

impl SecretAccessKey {
    /// Wraps a secret access key.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself, for signing requests. Do not log it.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretAccessKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretAccessKey(<redacted>)")
    }
}

impl PartialEq for SecretAccessKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl Eq for SecretAccessKey {}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY";

    fn env(name: &str) -> Option<String> {
        match name {
            ACCESS_KEY_ID_VAR => Some("AKIDEXAMPLE".into()),
            SECRET_ACCESS_KEY_VAR => Some(SECRET.into()),
            _ => None,
        }
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn config_error(result: Result<StoreConfig>) -> String {
        match result {
            Err(Error::Config(message)) => message,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    fn validate_error(config: StoreConfig) -> String {
        match config.validate() {
            Err(Error::Config(message)) => message,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    fn s3(endpoint: Option<&str>, bucket: &str, allow_http: bool) -> StoreConfig {
        StoreConfig::S3 {
            endpoint: endpoint.map(str::to_owned),
            bucket: bucket.into(),
            region: DEFAULT_REGION.into(),
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: SecretAccessKey::new(SECRET),
            allow_http,
        }
    }

    #[test]
    fn plain_paths_and_file_urls_are_local_folders() {
        assert_eq!(
            StoreConfig::from_url_with_env("/srv/store", no_env).unwrap(),
            StoreConfig::Local {
                dir: "/srv/store".into()
            }
        );
        assert_eq!(
            StoreConfig::from_url_with_env("relative/store", no_env).unwrap(),
            StoreConfig::Local {
                dir: "relative/store".into()
            }
        );
        assert_eq!(
            StoreConfig::from_url_with_env("file:///srv/my%20store", no_env).unwrap(),
            StoreConfig::Local {
                dir: "/srv/my store".into()
            }
        );
        config_error(StoreConfig::from_url_with_env(
            "file://remote-host/x",
            no_env,
        ));
        config_error(StoreConfig::from_url_with_env("", no_env));
    }

    #[test]
    fn s3_urls_take_parameters_and_credentials_from_the_environment() {
        let config = StoreConfig::from_url_with_env(
            "s3://shardseal-shards?endpoint=http://127.0.0.1:9000&region=eu-west-1&allow_http=true",
            env,
        )
        .unwrap();
        assert_eq!(
            config,
            StoreConfig::S3 {
                endpoint: Some("http://127.0.0.1:9000".into()),
                bucket: "shardseal-shards".into(),
                region: "eu-west-1".into(),
                access_key_id: "AKIDEXAMPLE".into(),
                secret_access_key: SecretAccessKey::new(SECRET),
                allow_http: true,
            }
        );
        assert_eq!(
            StoreConfig::from_url_with_env("s3://bucket-a/", env).unwrap(),
            s3(None, "bucket-a", false)
        );
    }

    #[test]
    fn bad_s3_urls_are_config_errors_that_do_not_echo_secrets() {
        let message = config_error(StoreConfig::from_url_with_env(
            &format!("s3://AKIDEXAMPLE:{SECRET}@bucket"),
            env,
        ));
        assert!(message.contains(ACCESS_KEY_ID_VAR), "{message}");
        assert!(!message.contains(SECRET), "{message}");

        let message = config_error(StoreConfig::from_url_with_env("s3://bucket", no_env));
        assert!(message.contains(SECRET_ACCESS_KEY_VAR), "{message}");

        let message = config_error(StoreConfig::from_url_with_env("s3://bucket/models", env));
        assert!(message.contains("no path"), "{message}");

        let message = config_error(StoreConfig::from_url_with_env("s3://bucket?color=red", env));
        assert!(message.contains("\"color\""), "{message}");

        let message = config_error(StoreConfig::from_url_with_env(
            "s3://bucket?allow_http=yes",
            env,
        ));
        assert!(message.contains("allow_http"), "{message}");

        let message = config_error(StoreConfig::from_url_with_env(
            "s3://bucket?endpoint=http://127.0.0.1:9000",
            env,
        ));
        assert!(message.contains("allow_http"), "{message}");

        let message = config_error(StoreConfig::from_url_with_env(
            &format!("gs://{SECRET}@bucket"),
            env,
        ));
        assert!(!message.contains(SECRET), "{message}");
    }

    #[test]
    fn validate_names_the_bad_setting() {
        assert!(
            s3(Some("https://minio.internal:9000"), "shards", false)
                .validate()
                .is_ok()
        );
        assert!(
            s3(Some("http://127.0.0.1:9000/"), "shards", true)
                .validate()
                .is_ok()
        );
        for bucket in ["ab", "Shards", "-shards", "shards-", "a..b", "sh_ards", ""] {
            let message = validate_error(s3(None, bucket, false));
            assert!(message.contains("bucket"), "{bucket}: {message}");
        }
        for (endpoint, needle) in [
            ("minio.internal:9000", "scheme"),
            ("ftp://minio.internal", "scheme"),
            ("https://user:pw@minio.internal", "credentials"),
            ("https://minio.internal/bucket", "host and port only"),
            ("http://minio.internal", "allow_http"),
            ("not a url", "not a URL"),
        ] {
            let message = validate_error(s3(Some(endpoint), "shards", false));
            assert!(message.contains(needle), "{endpoint}: {message}");
            assert!(!message.contains("pw"), "{endpoint}: {message}");
        }
        let mut empty_secret = s3(None, "shards", false);
        if let StoreConfig::S3 {
            secret_access_key, ..
        } = &mut empty_secret
        {
            *secret_access_key = SecretAccessKey::new("");
        }
        let message = validate_error(empty_secret);
        assert!(message.contains("secret_access_key"), "{message}");
        let message = validate_error(StoreConfig::Local { dir: "".into() });
        assert!(message.contains("dir"), "{message}");
    }

    #[test]
    fn debug_never_prints_the_secret() {
        let printed = format!("{:?}", s3(None, "shards", false));
        assert!(!printed.contains(SECRET), "{printed}");
        assert!(printed.contains("SecretAccessKey(<redacted>)"), "{printed}");
    }

    #[test]
    fn secrets_compare_by_value() {
        assert_eq!(SecretAccessKey::new("abc"), SecretAccessKey::new("abc"));
        assert_ne!(SecretAccessKey::new("abc"), SecretAccessKey::new("abd"));
        assert_ne!(SecretAccessKey::new("abc"), SecretAccessKey::new("abcd"));
    }

    #[test]
    fn toml_configs_parse_with_defaults() {
        let local: StoreConfig =
            toml::from_str("backend = \"local\"\ndir = \"/srv/store\"").unwrap();
        assert_eq!(
            local,
            StoreConfig::Local {
                dir: "/srv/store".into()
            }
        );
        let remote: StoreConfig = toml::from_str(&format!(
            "backend = \"s3\"\nbucket = \"shards\"\naccess_key_id = \"AKIDEXAMPLE\"\n\
             secret_access_key = \"{SECRET}\"\n"
        ))
        .unwrap();
        assert_eq!(remote, s3(None, "shards", false));
        assert!(
            toml::from_str::<StoreConfig>("backend = \"local\"\ndir = \"x\"\ncolour = 1").is_err()
        );
        assert!(toml::from_str::<StoreConfig>("backend = \"gcs\"\ndir = \"x\"").is_err());
        assert_eq!(
            StoreConfig::default(),
            StoreConfig::Local {
                dir: DEFAULT_LOCAL_DIR.into()
            }
        );
    }
}
