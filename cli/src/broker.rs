//! `shardseal broker`: the key broker, as its own process.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use shardseal_attestation::PlatformPublicKey;
use shardseal_keys::VerifyingKey;
use shardseal_keys::broker::{BROKER_PUB_FILE, BrokerConfig, KeyBroker};
use tokio::net::TcpListener;

/// Run the key broker: it keeps shard keys and stage keys sealed in its state folder and
/// releases a stage's keys only to functions whose attestation meets the model's release
/// policy. Prints `SHARDSEAL_READY <address>` once it serves; stops on Ctrl-C or SIGTERM.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  shardseal broker --state state/broker --listen 127.0.0.1:7000 --pki state/pki \\\n    --platform-key state/platform.key.pub --owner-key <owner public key hex>"
)]
pub(crate) struct BrokerArgs {
    /// The state folder: identity and sealing keys, master key, registered models, audit
    /// log. Created (0700) on first start; its identity public key is written to
    /// DIR/broker.pub for clients and functions to pin.
    #[arg(long, value_name = "DIR", env = "SHARDSEAL_BROKER_STATE")]
    state: Option<PathBuf>,
    /// Where to listen (port 0 picks a free port; the address is printed).
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:7000",
        env = "SHARDSEAL_BROKER_LISTEN"
    )]
    listen: String,
    /// The PKI folder (made by `shardseal up`): the broker serves TLS as its broker identity.
    #[arg(long, value_name = "DIR", env = "SHARDSEAL_PKI")]
    pki: Option<PathBuf>,
    /// A TEE platform key whose quotes are trusted: the quoting agent's platform.key.pub
    /// file, or its 64 hex digits (repeatable).
    #[arg(long = "platform-key", value_name = "PUBFILE_OR_HEX")]
    platform_keys: Vec<String>,
    /// A model owner allowed to register, rotate and revoke models: an Ed25519 public key
    /// as 64 hex digits (`shardseal keys init` prints it), or a file holding them
    /// (repeatable).
    #[arg(long = "owner-key", value_name = "PUBHEX_OR_FILE")]
    owner_keys: Vec<String>,
    /// How long a function's token, the lease on its keys, lasts before the function must
    /// attest again (milliseconds, 1 s to 24 h; default 15 min). A function renews at half
    /// of it and stops serving when it runs out with the broker unreachable.
    #[arg(long, value_name = "MS")]
    token_lifetime_ms: Option<u64>,
    /// A TOML file of settings: this command's long flag names (precedence: flag >
    /// SHARDSEAL_BROKER_<FLAG> variable > file > default) and the broker's own tunables
    /// (`BrokerConfig`). See `shardseal config example --role broker`.
    #[arg(long, value_name = "FILE", env = "SHARDSEAL_BROKER_CONFIG")]
    config: Option<PathBuf>,
    /// Prometheus metrics: attestations accepted and denied, key releases.
    #[command(flatten)]
    metrics: crate::metrics::MetricsArgs,
}

/// Reads a key given as hex on the command line, or from a file that holds the hex.
fn hex_or_file<T: std::str::FromStr>(text: &str, what: &str) -> anyhow::Result<T> {
    if let Ok(key) = text.parse() {
        return Ok(key);
    }
    let path = Path::new(text);
    if !path.exists() {
        bail!("{what} {text:?} is neither 64 hex digits nor an existing file");
    }
    let contents = std::fs::read_to_string(path)
        .with_context(|| format!("reading the {what} file {}", path.display()))?;
    contents.trim().parse().map_err(|_| {
        anyhow::anyhow!(
            "{} does not hold a {what} (expected 64 hex digits)",
            path.display()
        )
    })
}

impl BrokerArgs {
    fn into_config(self) -> anyhow::Result<BrokerConfig> {
        let mut config = match &self.config {
            Some(path) => crate::config::broker_file_config(path)?,
            None => BrokerConfig::default(),
        };
        if let Some(state) = self.state {
            config.state_dir = state;
        }
        if let Some(pki) = self.pki {
            config.pki_dir = pki;
        }
        if let Some(lifetime) = self.token_lifetime_ms {
            config.token_lifetime_ms = lifetime;
        }
        for text in &self.platform_keys {
            let key: PlatformPublicKey = hex_or_file(text, "platform public key")?;
            if !config.trusted_roots.software_tee.contains(&key) {
                config.trusted_roots.software_tee.push(key);
            }
        }
        for text in &self.owner_keys {
            let key: VerifyingKey = hex_or_file(text, "owner public key")?;
            if !config.owner_keys.contains(&key) {
                config.owner_keys.push(key);
            }
        }
        if config.state_dir.as_os_str().is_empty() {
            bail!("no state folder: pass --state DIR");
        }
        if config.pki_dir.as_os_str().is_empty() {
            bail!("no PKI folder: pass --pki DIR");
        }
        if config.trusted_roots.software_tee.is_empty() {
            bail!(
                "no trusted platform key: pass --platform-key with the quoting agent's \
                 platform.key.pub, or no function could ever attest"
            );
        }
        config.validate()?;
        Ok(config)
    }
}

pub(crate) fn run(args: BrokerArgs) -> anyhow::Result<()> {
    let listen = args.listen.clone();
    let metrics = args.metrics.clone();
    let config = args.into_config()?;
    if config.owner_keys.is_empty() {
        eprintln!(
            "warning: no --owner-key: the owner API refuses every call (registered models are \
             still served)"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        // Installed before READY, so a supervisor's SIGTERM right after it stops cleanly.
        let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
        let metrics_listener = metrics.bind().await?;
        let state_dir = config.state_dir.clone();
        let broker = KeyBroker::open(config).context("cannot start the key broker")?;
        crate::metrics::serve(metrics_listener, || async {
            shardseal_proto::metrics::global().render()
        })?;
        let listener = TcpListener::bind(&listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let address = listener
            .local_addr()
            .context("reading the listening address")?;
        println!("key broker identity: {}", broker.identity_key());
        println!(
            "identity public key file: {} (pin it in clients and functions)",
            state_dir.join(BROKER_PUB_FILE).display()
        );
        println!("{} model(s) registered", broker.model_count());
        println!("SHARDSEAL_READY {address}");
        let shutdown = async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
            println!("stopping");
        };
        broker
            .run(listener, shutdown)
            .await
            .context("the key broker failed")?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> BrokerArgs {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: BrokerArgs,
        }
        let mut argv = vec!["broker"];
        argv.extend_from_slice(extra);
        Wrapper::parse_from(argv).args
    }

    #[test]
    fn keys_come_as_hex_or_files_and_missing_settings_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let platform = dir.path().join("platform.key.pub");
        std::fs::write(&platform, format!("{}\n", "11".repeat(32))).unwrap();
        let owner = "22".repeat(32);
        let config = args(&[
            "--state",
            "s",
            "--pki",
            "p",
            "--platform-key",
            platform.to_str().unwrap(),
            "--owner-key",
            &owner,
        ])
        .into_config()
        .unwrap();
        assert_eq!(config.trusted_roots.software_tee.len(), 1);
        assert_eq!(config.owner_keys, vec![owner.parse().unwrap()]);

        let error = args(&["--state", "s", "--pki", "p"])
            .into_config()
            .unwrap_err();
        assert!(
            error.to_string().starts_with("no trusted platform key"),
            "{error}"
        );
        let error = args(&["--pki", "p"]).into_config().unwrap_err();
        assert_eq!(error.to_string(), "no state folder: pass --state DIR");
        let error = args(&["--state", "s", "--pki", "p", "--platform-key", "nope"])
            .into_config()
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "platform public key \"nope\" is neither 64 hex digits nor an existing file"
        );
    }
}
