//! Configuration: command-line flags, then `OPENIMS_*` environment variables, then
//! `openims.toml` (in the working directory, or `--config`), then defaults.

use clap::Args;
use openims_core::ServiceConfig;
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Args, Debug, Clone, Default)]
pub struct CommonArgs {
    /// Data directory (SQLite metadata, chunk store, staging).
    #[arg(long, env = "OPENIMS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Metadata database URL (default: SQLite in the data directory).
    #[arg(long, env = "OPENIMS_DATABASE")]
    pub database: Option<String>,
    /// Object store for chunks, manifests and bucket objects (default: `<data-dir>/store`):
    /// a directory, or `s3://BUCKET[/PREFIX]?endpoint=URL[&region=R&access_key_id=..&secret_access_key=..]`
    /// for an external S3-compatible store (credentials default to `AWS_*` variables).
    #[arg(long, env = "OPENIMS_STORE")]
    pub store: Option<String>,
    /// Configuration file (default: ./openims.toml if present).
    #[arg(long, env = "OPENIMS_CONFIG")]
    pub config: Option<PathBuf>,
    /// File holding the 32-byte KMS root key (default: <data-dir>/root.key, created on first
    /// start with mode 0600).
    #[arg(long, env = "OPENIMS_ROOT_KEY_FILE")]
    pub root_key_file: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Address of the API.
    #[arg(long, env = "OPENIMS_LISTEN")]
    pub listen: Option<String>,
    /// Address of the embedded S3-compatible bucket endpoint (`off` disables it).
    #[arg(long, env = "OPENIMS_S3_LISTEN")]
    pub s3_listen: Option<String>,
    /// Region this deployment serves.
    #[arg(long, env = "OPENIMS_REGION")]
    pub region: Option<String>,
    /// Public URL of the API, if not http://<listen>.
    #[arg(long, env = "OPENIMS_PUBLIC_ENDPOINT")]
    pub public_endpoint: Option<String>,
    /// Private images per project.
    #[arg(long, env = "OPENIMS_IMAGE_QUOTA")]
    pub image_quota: Option<u64>,
    /// Largest image that may be replicated or exported normally, in GB.
    #[arg(long, env = "OPENIMS_MAX_IMAGE_SIZE_GB")]
    pub max_image_size_gb: Option<u64>,
    /// Job workers in this process.
    #[arg(long, env = "OPENIMS_WORKERS")]
    pub workers: Option<usize>,
    /// Re-encrypt all data (fresh data key) when an encrypted image is copied with another
    /// key, instead of re-wrapping its data key (requests may still ask for it with
    /// `"__reencrypt_data": true`).
    #[arg(long, env = "OPENIMS_REENCRYPT_ON_REKEY")]
    pub reencrypt_on_rekey: Option<bool>,
    /// Concurrent replication jobs per project, per kind (in-region, cross-region).
    #[arg(long, env = "OPENIMS_MAX_COPY_JOBS_PER_PROJECT")]
    pub max_copy_jobs_per_project: Option<u64>,
    /// A job's lease lasts this many seconds without a heartbeat; after that another node
    /// takes the job over (default 30).
    #[arg(long, env = "OPENIMS_JOB_LEASE_SECS")]
    pub job_lease_secs: Option<f64>,
    /// Seconds between garbage-collection passes (0 = never; default 3600).
    #[arg(long, env = "OPENIMS_GC_INTERVAL_SECS")]
    pub gc_interval_secs: Option<u64>,
    /// Unreferenced data younger than this many seconds is kept by GC (default 21600).
    #[arg(long, env = "OPENIMS_GC_GRACE_SECS")]
    pub gc_grace_secs: Option<u64>,
    /// An import records a resume checkpoint every this many MiB of data read (holes of a
    /// sparse image do not count), a streaming export every this many MiB of output (default
    /// 1024).
    #[arg(long, env = "OPENIMS_IMPORT_CHECKPOINT_MIB")]
    pub import_checkpoint_mib: Option<u64>,
    /// Log format: text or json.
    #[arg(long, env = "OPENIMS_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

/// The optional keys of `openims.toml`.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub database: Option<String>,
    #[serde(alias = "store_url")]
    pub store: Option<String>,
    pub job_lease_secs: Option<f64>,
    pub gc_interval_secs: Option<u64>,
    pub gc_grace_secs: Option<u64>,
    pub import_checkpoint_mib: Option<u64>,
    pub listen: Option<String>,
    pub s3_listen: Option<String>,
    pub region: Option<String>,
    pub public_endpoint: Option<String>,
    pub image_quota: Option<u64>,
    pub max_image_size_gb: Option<u64>,
    pub workers: Option<usize>,
    pub root_key_file: Option<PathBuf>,
    pub reencrypt_on_rekey: Option<bool>,
    /// Peer regions for cross-region replication: `[peers.<region>]` tables.
    #[serde(default)]
    pub peers: std::collections::BTreeMap<String, PeerFile>,
    /// Concurrent replication jobs per project (in-region and cross-region each).
    pub max_copy_jobs_per_project: Option<u64>,
}

/// `[peers.<region>]` in `openims.toml`.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct PeerFile {
    /// Base URL of the peer's API (`http://HOST:PORT`).
    pub endpoint: String,
    /// AK/SK of the peer service account at the peer (`openims admin peer-account create`).
    pub access_key: String,
    pub secret_key: String,
    /// Bandwidth limit towards this peer in MB/s (10^6 bytes; 0 or absent = unlimited).
    pub bandwidth_mb_per_sec: Option<f64>,
}

pub fn load_file(common: &CommonArgs) -> anyhow::Result<FileConfig> {
    let path = match &common.config {
        Some(p) => p.clone(),
        None => {
            let p = PathBuf::from("openims.toml");
            if !p.exists() {
                return Ok(FileConfig::default());
            }
            p
        }
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("invalid {}: {e}", path.display()))
}

/// The data directory and database URL in force for admin commands.
pub fn resolve_common(common: &CommonArgs) -> anyhow::Result<ServiceConfig> {
    let file = load_file(common)?;
    let data_dir = common
        .data_dir
        .clone()
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from("openims-data"));
    let mut cfg = ServiceConfig::new(data_dir);
    cfg.database_url = common.database.clone().or(file.database);
    cfg.store_url = common.store.clone().or(file.store);
    cfg.root_key_file = common.root_key_file.clone().or(file.root_key_file);
    Ok(cfg)
}

/// Default address of the embedded S3 endpoint.
pub const DEFAULT_S3_LISTEN: &str = "127.0.0.1:9000";

/// Where `serve` listens: the API, and the S3 endpoint unless disabled (`off`).
#[derive(Debug, Clone)]
pub struct Listen {
    pub api: String,
    pub s3: Option<String>,
}

/// Everything `serve` needs.
pub fn resolve_serve(args: &ServeArgs) -> anyhow::Result<(ServiceConfig, Listen)> {
    let file = load_file(&args.common)?;
    let mut cfg = resolve_common(&args.common)?;
    let listen = args
        .listen
        .clone()
        .or(file.listen)
        .unwrap_or_else(|| "127.0.0.1:9292".into());
    let s3 = args
        .s3_listen
        .clone()
        .or(file.s3_listen)
        .unwrap_or_else(|| DEFAULT_S3_LISTEN.into());
    let s3 = match s3.trim() {
        "off" | "none" | "" => None,
        a => Some(a.to_string()),
    };
    if let Some(r) = args.region.clone().or(file.region) {
        cfg.region = r;
    }
    cfg.public_endpoint = args
        .public_endpoint
        .clone()
        .or(file.public_endpoint)
        .unwrap_or_else(|| format!("http://{listen}"));
    if let Some(q) = args.image_quota.or(file.image_quota) {
        cfg.image_quota = q;
    }
    if let Some(g) = args.max_image_size_gb.or(file.max_image_size_gb) {
        cfg.max_image_size = g * 1024 * 1024 * 1024;
    }
    if let Some(w) = args.workers.or(file.workers) {
        cfg.workers = w;
    }
    if let Some(l) = args.job_lease_secs.or(file.job_lease_secs) {
        if !(l.is_finite() && l >= 0.2) {
            anyhow::bail!("job lease must be at least 0.2 seconds (got {l})");
        }
        cfg.job_lease_ms = (l * 1000.0) as i64;
    }
    if let Some(g) = args.gc_interval_secs.or(file.gc_interval_secs) {
        cfg.gc_interval_secs = g;
    }
    if let Some(g) = args.gc_grace_secs.or(file.gc_grace_secs) {
        cfg.gc_grace_secs = g;
    }
    if let Some(m) = args.import_checkpoint_mib.or(file.import_checkpoint_mib) {
        if m == 0 {
            anyhow::bail!("import checkpoint interval must be at least 1 MiB");
        }
        cfg.import_checkpoint_bytes = m << 20;
    }
    if let Some(r) = args.reencrypt_on_rekey.or(file.reencrypt_on_rekey) {
        cfg.reencrypt_on_rekey = r;
    }
    if let Some(n) = args
        .max_copy_jobs_per_project
        .or(file.max_copy_jobs_per_project)
    {
        cfg.max_copy_jobs_per_project = n;
    }
    for (region, p) in file.peers {
        cfg.peers.insert(
            region,
            openims_core::config::PeerConfig {
                endpoint: p.endpoint,
                access_key: p.access_key,
                secret_key: p.secret_key,
                bandwidth_bytes_per_sec: p
                    .bandwidth_mb_per_sec
                    .map(|m| (m.max(0.0) * 1e6) as u64)
                    .unwrap_or(0),
            },
        );
    }
    Ok((cfg, Listen { api: listen, s3 }))
}
