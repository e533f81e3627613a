//! Transport security for every ShardSeal link: a local certificate authority and the
//! tonic TLS configurations built from it.
//!
//! `shardseal up` creates one PKI folder per state folder:
//!
//! ```text
//! pki/
//!   ca.pem                        the root every ShardSeal peer pins (no system roots)
//!   broker.pem      broker.key    server identity  broker.shardseal.internal
//!   coordinator.pem coordinator.key  server identity and the only client identity
//!   function.pem    function.key  server identity  function.shardseal.internal
//! ```
//!
//! Each certificate names exactly one role, and a client always checks the role it
//! expects (`ClientTlsConfig::domain_name`), so a function's certificate cannot pose as
//! the broker. Functions require a client certificate: only the coordinator holds one
//! valid for client authentication (its certificate alone carries the `clientAuth`
//! extended key usage), so nothing else on the host can call a function. The broker and
//! coordinator accept any TLS client: the broker authenticates owners by signature and
//! functions by attestation, and the coordinator serves data owners, whose proof is their
//! own seal. Every server drops a peer that has not finished its handshake within
//! [`TLS_HANDSHAKE_TIMEOUT`].
//!
//! The CA's private key is used once, when the folder is made, and never written:
//! nothing can mint a new ShardSeal identity afterwards.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// How long a server waits for a client to complete its TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A role that holds a TLS identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The key broker.
    Broker,
    /// The coordinator (also the only client that may call functions).
    Coordinator,
    /// Every stage function.
    Function,
}

impl Role {
    /// All roles, in the order their identities are issued.
    pub const ALL: [Role; 3] = [Role::Broker, Role::Coordinator, Role::Function];

    fn file_stem(self) -> &'static str {
        match self {
            Role::Broker => "broker",
            Role::Coordinator => "coordinator",
            Role::Function => "function",
        }
    }

    /// The DNS name in this role's certificate, which clients verify.
    pub fn server_name(self) -> String {
        format!("{}.shardseal.internal", self.file_stem())
    }
}

/// Failures to create or read a PKI folder.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The folder already holds a PKI; it is never overwritten.
    #[error("a PKI already exists at {0}")]
    AlreadyExists(PathBuf),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A PKI folder made by [`Pki::create`].
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Creates a CA and one identity per [`Role`] in `dir`, which must not exist yet.
    ///
    /// Everything is written into a sibling temporary folder and renamed into place,
    /// so an interrupted run leaves no half-made PKI behind.
    pub fn create(dir: &Path) -> Result<Self, TlsError> {
        if dir.exists() {
            return Err(TlsError::AlreadyExists(dir.to_path_buf()));
        }
        let parent = dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TlsError::Io { path, source }
        };
        let staging = parent.join(format!(
            ".{}.tmp-{}",
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("pki"),
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging).map_err(io(&staging))?;
        fs::set_permissions(&staging, fs::Permissions::from_mode(0o700)).map_err(io(&staging))?;

        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "ShardSeal local CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        write_file(&staging.join("ca.pem"), ca_cert.pem().as_bytes(), 0o644)?;
        let issuer = Issuer::new(ca_params, ca_key);

        for role in Role::ALL {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(vec![role.server_name()])?;
            params
                .distinguished_name
                .push(DnType::CommonName, role.server_name());
            // Every certificate chains to the one CA, so the extended key usage is what
            // stops a broker's or function's key from passing as the coordinator's client
            // identity (webpki refuses a client certificate whose EKU omits clientAuth).
            params.extended_key_usages = match role {
                Role::Coordinator => vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ],
                Role::Broker | Role::Function => vec![ExtendedKeyUsagePurpose::ServerAuth],
            };
            let cert = params.signed_by(&key, &issuer)?;
            write_file(
                &staging.join(format!("{}.pem", role.file_stem())),
                cert.pem().as_bytes(),
                0o644,
            )?;
            write_file(
                &staging.join(format!("{}.key", role.file_stem())),
                key.serialize_pem().as_bytes(),
                0o600,
            )?;
        }
        fs::File::open(&staging)
            .and_then(|d| d.sync_all())
            .map_err(io(&staging))?;
        fs::rename(&staging, dir).map_err(io(dir))?;
        fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io(parent))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Opens an existing PKI folder.
    pub fn open(dir: &Path) -> Result<Self, TlsError> {
        let ca = dir.join("ca.pem");
        fs::metadata(&ca).map_err(|source| TlsError::Io { path: ca, source })?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Opens the PKI in `dir`, creating it first if the folder does not exist.
    pub fn open_or_create(dir: &Path) -> Result<Self, TlsError> {
        if dir.exists() {
            Self::open(dir)
        } else {
            Self::create(dir)
        }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate every peer pins.
    pub fn ca_certificate(&self) -> Result<Certificate, TlsError> {
        Ok(Certificate::from_pem(self.read("ca.pem")?))
    }

    fn identity(&self, role: Role) -> Result<Identity, TlsError> {
        let cert = self.read(&format!("{}.pem", role.file_stem()))?;
        let key = self.read(&format!("{}.key", role.file_stem()))?;
        Ok(Identity::from_pem(cert, key))
    }

    fn read(&self, name: &str) -> Result<Vec<u8>, TlsError> {
        let path = self.dir.join(name);
        fs::read(&path).map_err(|source| TlsError::Io { path, source })
    }

    /// The server configuration of `role`. Functions require the coordinator's client
    /// certificate; other roles accept any TLS client.
    pub fn server_config(&self, role: Role) -> Result<ServerTlsConfig, TlsError> {
        // A peer that connects and never finishes its handshake is dropped rather than
        // holding a socket and a task forever (tonic sets no handshake timeout by default).
        let config = ServerTlsConfig::new()
            .identity(self.identity(role)?)
            .timeout(TLS_HANDSHAKE_TIMEOUT);
        Ok(match role {
            Role::Function => config.client_ca_root(self.ca_certificate()?),
            Role::Broker | Role::Coordinator => config,
        })
    }

    /// The client configuration for calling a server of role `server`, presenting the
    /// coordinator's identity when the caller is the coordinator.
    pub fn client_config(
        &self,
        server: Role,
        caller: Option<Role>,
    ) -> Result<ClientTlsConfig, TlsError> {
        let config = ClientTlsConfig::new()
            .ca_certificate(self.ca_certificate()?)
            .domain_name(server.server_name());
        Ok(match caller {
            Some(Role::Coordinator) => config.identity(self.identity(Role::Coordinator)?),
            _ => config,
        })
    }
}

/// A client configuration that trusts only the CA in `ca_pem` and expects a server of
/// `server` role: what a data owner's SDK builds from the CA file it was given.
pub fn client_config_from_ca(ca_pem: &[u8], server: Role) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(server.server_name())
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_with_private_keys_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let pki = Pki::create(&dir).unwrap();
        for role in Role::ALL {
            let key = dir.join(format!("{}.key", role.file_stem()));
            let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
            assert!(pki.server_config(role).is_ok());
        }
        assert!(
            !dir.join("ca.key").exists(),
            "the CA key must never be written"
        );
        assert!(matches!(Pki::create(&dir), Err(TlsError::AlreadyExists(_))));
        assert!(Pki::open(&dir).is_ok());
        assert!(Pki::open(&tmp.path().join("missing")).is_err());
    }
}
