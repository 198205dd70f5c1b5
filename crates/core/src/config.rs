//! Settings of a running service that the domain rules depend on.

use std::path::PathBuf;

/// Limits and locations the domain needs. Built by the CLI from flags, file and environment.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Root of local state: metadata database (SQLite), chunk store, staging files.
    pub data_dir: PathBuf,
    /// Metadata database URL; `None` means SQLite in `data_dir`.
    pub database_url: Option<String>,
    /// Object store URL for chunks, manifests and bucket objects: `None` means the local
    /// directory `<data_dir>/store`; `s3://bucket[/prefix]?endpoint=...` an external
    /// S3-compatible store (several nodes share one).
    pub store_url: Option<String>,
    /// Region this deployment serves.
    pub region: String,
    /// Public base URL of the API (used in token catalogs and `Location` headers).
    pub public_endpoint: String,
    /// Private images per project (IMG.0015).
    pub image_quota: u64,
    /// Tags per image (IMG.0116).
    pub tag_quota: usize,
    /// Largest image that may be replicated or exported normally, in bytes (128 GB default).
    pub max_image_size: u64,
    /// Largest file accepted by an upload, in bytes (128 GB default).
    pub max_upload_size: u64,
    /// Largest virtual disk any image file may declare, in bytes (1 TiB default).
    pub max_virtual_size: u64,
    /// Concurrent replication jobs per project (5 default).
    pub max_copy_jobs_per_project: u64,
    /// Job workers in this process.
    pub workers: usize,
    /// Token lifetime in seconds.
    pub token_ttl_secs: i64,
    /// A lease on a running job lasts this long without a heartbeat (ms).
    pub job_lease_ms: i64,
    /// How often unreferenced data is collected (seconds; 0 = never).
    pub gc_interval_secs: u64,
    /// Unreferenced data younger than this is kept (it may belong to a running ingest).
    pub gc_grace_secs: u64,
    /// An import records a resume checkpoint every this many bytes of data read from its
    /// source (rounded to whole chunks; holes and chunks referenced without reading do not
    /// count; default 1 GiB), a streaming export every this many bytes of output: a job taken
    /// over after a crash continues from there.
    pub import_checkpoint_bytes: u64,
    /// File of the KMS root key (32 bytes) that wraps master keys and service-held data
    /// keys; `None` means `<data_dir>/root.key`, created on first start (mode 0600).
    pub root_key_file: Option<PathBuf>,
    /// Deployment policy: a re-keying copy re-encrypts every chunk under a fresh data key
    /// (as if `"__reencrypt_data": true` were sent) instead of re-wrapping the data key.
    pub reencrypt_on_rekey: bool,
    /// Peer regions this deployment may replicate images to (cross-region copy), by region
    /// name.
    pub peers: std::collections::BTreeMap<String, PeerConfig>,
}

/// A peer region: another OpenIMS deployment, reached with the AK/SK of a peer service
/// account there (`openims admin peer-account create` on the peer).
#[derive(Clone, Default)]
pub struct PeerConfig {
    /// Base URL of the peer's API, e.g. `http://10.0.0.2:9292`.
    pub endpoint: String,
    /// Access key of the service account at the peer.
    pub access_key: String,
    /// Secret key of the service account at the peer.
    pub secret_key: String,
    /// Most bytes per second sent to this peer by all replications together (0 = no limit).
    pub bandwidth_bytes_per_sec: u64,
}

impl std::fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConfig")
            .field("endpoint", &self.endpoint)
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .field("bandwidth_bytes_per_sec", &self.bandwidth_bytes_per_sec)
            .finish()
    }
}

impl ServiceConfig {
    /// Defaults for a data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        ServiceConfig {
            data_dir: data_dir.into(),
            database_url: None,
            store_url: None,
            region: "local-1".into(),
            public_endpoint: "http://127.0.0.1:9292".into(),
            image_quota: 50,
            tag_quota: 10,
            max_image_size: 128 * 1024 * 1024 * 1024,
            max_upload_size: 128 * 1024 * 1024 * 1024,
            max_virtual_size: 1024 * 1024 * 1024 * 1024,
            max_copy_jobs_per_project: 5,
            workers: 4,
            token_ttl_secs: 24 * 3600,
            job_lease_ms: 30_000,
            gc_interval_secs: 3600,
            gc_grace_secs: 6 * 3600,
            import_checkpoint_bytes: 1 << 30,
            root_key_file: None,
            reencrypt_on_rekey: false,
            peers: Default::default(),
        }
    }

    pub fn store_dir(&self) -> PathBuf {
        self.data_dir.join("store")
    }

    /// The root key file in force.
    pub fn root_key_path(&self) -> PathBuf {
        self.root_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("root.key"))
    }

    pub fn staging_dir(&self) -> PathBuf {
        self.data_dir.join("staging")
    }

    /// The database URL in force.
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(u) => u.clone(),
            None => format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("openims.db").display()
            ),
        }
    }
}
