//! `shardseal coordinator --platform`: where the coordinator's stage functions come from.
//!
//! `local` (the default) starts them as child processes of the coordinator; `static` routes
//! to functions something else runs (Knative Services on a cluster, or processes started by
//! hand), given by `--endpoint MODEL/STAGE=URL` flags or an `--endpoints` file. See the
//! `shardseal_coordinator::platform::static_endpoints` module and `deploy/README.md`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use shardseal_attestation::ModelId;
use shardseal_coordinator::platform::Platform;
use shardseal_coordinator::platform::static_endpoints::{
    EndpointSpec, StaticEndpoints, StaticPlatform, StaticPlatformConfig,
};
use shardseal_proto::tls::Pki;

/// Which platform runs the stage functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum PlatformKind {
    /// Child processes of the coordinator, started on demand.
    Local,
    /// Functions at fixed endpoints that the coordinator never starts or stops (Knative).
    Static,
}

/// The platform options of `shardseal coordinator`.
#[derive(Debug, clap::Args)]
pub(crate) struct PlatformArgs {
    /// Where stage functions come from: `local` starts them as child processes; `static`
    /// routes to the endpoints given with --endpoint or --endpoints and never starts them.
    #[arg(long, value_enum, default_value = "local")]
    pub(crate) platform: PlatformKind,
    /// A stage endpoint for --platform static, as MODEL/STAGE=URL (repeatable; several for
    /// one stage are replicas). https:// is dialled with the coordinator's mTLS identity,
    /// http:// as plain h2c.
    #[arg(long = "endpoint", value_name = "MODEL/STAGE=URL")]
    endpoints: Vec<String>,
    /// A TOML (or .json) file of stage endpoints for --platform static:
    /// [[endpoint]] model = "m", stage = 0, url = "https://...".
    #[arg(long = "endpoints", value_name = "FILE")]
    endpoints_file: Option<PathBuf>,
    /// How long a static endpoint may take to answer Ready (scale from zero included).
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    ready_timeout: u64,
}

impl PlatformArgs {
    /// Whether the static platform was chosen.
    pub(crate) fn is_static(&self) -> bool {
        self.platform == PlatformKind::Static
    }

    /// Builds the static platform and checks that each `--deploy`ed model has endpoints for
    /// exactly its stages.
    pub(crate) fn static_platform(
        &self,
        pki: &Pki,
        deployments: &[(ModelId, u32)],
    ) -> anyhow::Result<Arc<dyn Platform>> {
        let mut specs = match &self.endpoints_file {
            Some(path) => StaticEndpoints::from_file(path)?,
            None => Vec::new(),
        };
        for flag in &self.endpoints {
            specs.push(EndpointSpec::parse_flag(flag)?);
        }
        let endpoints = StaticEndpoints::new(specs).context("--platform static")?;
        for (model, stages) in deployments {
            let configured = endpoints.stage_count(model);
            if configured != *stages {
                bail!(
                    "--deploy {model}={stages}: the static endpoints give {model} {configured} stage(s)"
                );
            }
        }
        for model in endpoints.models() {
            tracing::info!(%model, stages = endpoints.stage_count(&model), "static endpoints");
        }
        let platform = StaticPlatform::new(
            endpoints,
            pki,
            StaticPlatformConfig {
                ready_timeout: std::time::Duration::from_secs(self.ready_timeout),
                ..StaticPlatformConfig::default()
            },
        )
        .context("the coordinator's TLS identity")?;
        Ok(Arc::new(platform))
    }

    /// Refuses endpoint options without `--platform static`, where they would be ignored.
    pub(crate) fn check_local(&self) -> anyhow::Result<()> {
        if !self.endpoints.is_empty() || self.endpoints_file.is_some() {
            bail!("--endpoint and --endpoints need --platform static");
        }
        Ok(())
    }
}
