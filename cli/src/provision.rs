//! Provisioning, the model owner's side: plan → stage models → encrypt each shard → sign
//! the manifest. The plaintext model never leaves this process; what is written is
//! ciphertext, a signed manifest, and the shard keys sealed in the owner's key store.
//!
//! ```text
//! OUT/                      written into OUT.partial-<pid>/, renamed into place at the end
//!   manifest.json           owner-signed ModelManifest
//!   stage-0.shard ...       AES-256-GCM, chunked (see shardseal_keys::shard)
//! KEYSTORE/shard-keys/...   the shard keys, sealed under the key store's master key
//! ```
//!
//! Hand-over point: the shard keys stay in the owner's key store until `shardseal keys
//! register` seals them to an attested key broker. Nothing here talks to a broker.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use shardseal_attestation::{ModelId, ModelVersion};
use shardseal_coordinator::planner::{Plan, PlanOptions, TensorInfo, plan};
use shardseal_keys::{
    DEFAULT_CHUNK_SIZE, ModelManifest, OwnerKeyStore, ShardBinding, ShardKeys, StageEntry,
    TensorSpec, seal_shard,
};
use shardseal_proto::tensor::DType;

/// What to provision.
pub(crate) struct ProvisionRequest<'a> {
    pub model_bytes: &'a [u8],
    pub model_id: ModelId,
    pub version: ModelVersion,
    pub options: PlanOptions,
    pub out_dir: &'a Path,
    pub key_store: &'a OwnerKeyStore,
    pub show_progress: bool,
}

/// What was written.
pub(crate) struct Provisioned {
    pub plan: Plan,
    pub manifest: ModelManifest,
    pub manifest_path: PathBuf,
    pub encrypt_seconds: f64,
}

/// The file name of the signed manifest inside a provisioned folder.
pub(crate) const MANIFEST_FILE: &str = "manifest.json";

/// Plans, encrypts and signs; writes `out_dir` atomically (complete or absent).
pub(crate) fn provision(request: ProvisionRequest<'_>) -> anyhow::Result<Provisioned> {
    let out = request.out_dir;
    if out.exists() {
        bail!(
            "{} already exists; provisioning never overwrites (choose another --out or a new --version)",
            out.display()
        );
    }
    let plan = plan(request.model_bytes, &request.options).context("planning the model")?;
    let stage_count = u32::try_from(plan.stages().len()).context("too many stages")?;

    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let staging = parent.join(format!(
        ".{}.partial-{}",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
    // Whatever happens below, a failed run leaves no partial folder behind.
    let cleanup = RemoveOnDrop(Some(staging.clone()));

    let total: u64 = plan.stages().iter().map(|s| s.param_bytes).sum();
    let progress = if request.show_progress {
        let bar = ProgressBar::new(total.max(1));
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar
    } else {
        ProgressBar::hidden()
    };

    let keys = ShardKeys::generate(stage_count).context("generating shard keys")?;
    let started = Instant::now();
    let mut entries = Vec::with_capacity(plan.stages().len());
    for stage in plan.stages() {
        progress.set_message(format!("stage {}", stage.index.0));
        let onnx = plan
            .stage_model(stage.index)
            .with_context(|| format!("writing stage {} as ONNX", stage.index.0))?;
        let key = keys
            .get(stage.index)
            .context("missing shard key for a stage")?;
        let binding = ShardBinding::new(request.model_id.clone(), request.version, stage.index);
        let shard_file = format!("stage-{}.shard", stage.index.0);
        let path = staging.join(&shard_file);
        let file =
            fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut writer = BufWriter::new(file);
        let info = seal_shard(
            key,
            &binding,
            DEFAULT_CHUNK_SIZE,
            onnx.as_slice(),
            &mut writer,
        )
        .with_context(|| format!("encrypting stage {}", stage.index.0))?;
        let file = writer.into_inner().context("flushing shard")?;
        file.sync_all().context("syncing shard")?;
        progress.inc(stage.param_bytes);
        entries.push(StageEntry {
            index: stage.index,
            inputs: stage
                .inputs
                .iter()
                .map(spec)
                .collect::<anyhow::Result<_>>()?,
            outputs: stage
                .outputs
                .iter()
                .map(spec)
                .collect::<anyhow::Result<_>>()?,
            shard_file,
            shard_digest: info.digest,
            shard_size: info.ciphertext_len,
            plaintext_size: info.plaintext_len,
            param_bytes: stage.param_bytes,
        });
    }
    progress.finish_and_clear();
    let encrypt_seconds = started.elapsed().as_secs_f64();

    let first = plan.stages().first().context("the plan has no stage")?;
    let last = plan.stages().last().context("the plan has no stage")?;
    let manifest = ModelManifest {
        model_id: request.model_id.clone(),
        version: request.version,
        chunk_size: u32::try_from(DEFAULT_CHUNK_SIZE).context("chunk size")?,
        inputs: first
            .inputs
            .iter()
            .map(spec)
            .collect::<anyhow::Result<_>>()?,
        outputs: last
            .outputs
            .iter()
            .map(spec)
            .collect::<anyhow::Result<_>>()?,
        stages: entries,
    };
    let signed = manifest
        .sign(request.key_store.signing_key())
        .context("signing the manifest")?;
    let manifest_tmp = staging.join(MANIFEST_FILE);
    let mut file = fs::File::create(&manifest_tmp).context("creating the manifest")?;
    file.write_all(&signed.to_bytes())?;
    file.sync_all()?;
    fs::File::open(&staging)?.sync_all()?;

    // The keys go to the key store before the output appears: a complete output folder
    // always has its keys.
    request
        .key_store
        .put_shard_keys(&request.model_id, request.version, &keys)
        .context("storing the shard keys in the owner's key store")?;
    fs::rename(&staging, out).with_context(|| format!("moving the output to {}", out.display()))?;
    fs::File::open(parent)?.sync_all()?;
    cleanup.disarm();

    Ok(Provisioned {
        plan,
        manifest,
        manifest_path: out.join(MANIFEST_FILE),
        encrypt_seconds,
    })
}

fn spec(t: &TensorInfo) -> anyhow::Result<TensorSpec> {
    let dtype = DType::parse(t.dtype.as_str()).with_context(|| {
        format!(
            "tensor {:?} has type {}, which ShardSeal does not carry",
            t.name,
            t.dtype.as_str()
        )
    })?;
    Ok(TensorSpec::new(t.name.clone(), dtype, t.shape.clone()))
}

/// Removes a folder when dropped, unless disarmed.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Uploads a provisioned folder (`provision`'s output) to a shard store under the
/// [`StoreKey`](shardseal_store::StoreKey) layout, `models/MODEL/vVERSION/…`: every shard
/// first, streamed from disk, then the signed manifest. A reader that finds the manifest
/// therefore finds every shard it names. Returns the bytes uploaded.
pub(crate) async fn upload(
    dir: &Path,
    manifest: &ModelManifest,
    store: &dyn shardseal_store::ShardStore,
) -> anyhow::Result<u64> {
    use shardseal_store::StoreKey;
    let prefix = StoreKey::version_prefix(&manifest.model_id, manifest.version);
    let mut uploaded = 0u64;
    for stage in &manifest.stages {
        let key = StoreKey::new(format!("{prefix}/{}", stage.shard_file))
            .with_context(|| format!("stage {} shard name", stage.index.0))?;
        uploaded += store
            .put_file(&key, &dir.join(&stage.shard_file))
            .await
            .with_context(|| format!("uploading {key}"))?;
    }
    let key = StoreKey::manifest(&manifest.model_id, manifest.version);
    uploaded += store
        .put_file(&key, &dir.join(MANIFEST_FILE))
        .await
        .with_context(|| format!("uploading {key}"))?;
    Ok(uploaded)
}

/// `shardseal keys provision --store URL`: a shard store to upload one model version to, and
/// the private temporary folder the version is provisioned into first.
pub(crate) struct StoreTarget {
    store: std::sync::Arc<dyn shardseal_store::ShardStore>,
    /// What the output names: the folder, or `s3://BUCKET`; never a credential.
    label: String,
    staging: tempfile::TempDir,
    version: ModelVersion,
    runtime: tokio::runtime::Runtime,
}

impl StoreTarget {
    /// Opens the store `url` and checks that it holds no manifest of `model`@`version` yet:
    /// provisioning never overwrites, in a store as in a folder.
    pub(crate) fn open(url: &str, model: &ModelId, version: ModelVersion) -> anyhow::Result<Self> {
        use shardseal_store::{Error as StoreError, StoreConfig, StoreKey};
        let config = StoreConfig::from_url(url).context("--store")?;
        let label = match &config {
            StoreConfig::S3 { bucket, .. } => format!("s3://{bucket}"),
            StoreConfig::Local { dir } => dir.display().to_string(),
        };
        let store = config.open().context("opening the shard store")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let manifest = StoreKey::manifest(model, version);
        match runtime.block_on(store.size(&manifest)) {
            Err(StoreError::NotFound { .. }) => {}
            Ok(_) => bail!(
                "{label} already holds {manifest}; provisioning never overwrites (choose a new --version)"
            ),
            Err(e) => return Err(e).context(format!("checking {label} for {manifest}")),
        }
        let staging = tempfile::Builder::new()
            .prefix("shardseal-provision-")
            .tempdir()
            .context("creating a temporary folder")?;
        Ok(Self {
            store,
            label,
            staging,
            version,
            runtime,
        })
    }

    /// Where `provision` writes the version before it is uploaded (inside the private
    /// temporary folder, which is removed when this target is dropped).
    pub(crate) fn staging_dir(&self) -> PathBuf {
        self.staging.path().join(format!("v{}", self.version.0))
    }

    /// Uploads what `provision` wrote to [`staging_dir`](Self::staging_dir) and returns a
    /// description of where it went.
    pub(crate) fn upload(&self, dir: &Path, manifest: &ModelManifest) -> anyhow::Result<String> {
        let prefix =
            shardseal_store::StoreKey::version_prefix(&manifest.model_id, manifest.version);
        self.runtime
            .block_on(upload(dir, manifest, self.store.as_ref()))
            .with_context(|| {
                format!(
                    "uploading to {}; the shard keys of v{} are already in the key store, so \
                     provision again with a new --version",
                    self.label, manifest.version.0
                )
            })?;
        Ok(format!("{}/{prefix}/", self.label.trim_end_matches('/')))
    }
}
