//! Registry access through oci-client: existence checks and whole-image copies.
//!
//! One `oci_client::Client` per registry host, built from the table's `registries` settings
//! (credentials, extra CA, plain HTTP, monolithic uploads). oci-client has no retries and drops
//! response headers, so retries with back-off live here, and a `429`'s `Retry-After` is read by
//! one extra `HEAD` of the refused URL (HEADs do not count against Docker Hub's pull limit).

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt, TryStreamExt};
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::Client;
use serde::Deserialize;

use crate::mapping::{registry_key, Platform, RegistryAccess, Table};
use crate::metrics::{Metrics, RegistryLabels};
use crate::reference::Reference;

/// Manifest types a copy accepts: Docker schema 2 and OCI, single images and indexes.
const MANIFEST_TYPES: [&str; 4] = [
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
];

/// oci-client sends each stream item as its own PATCH; collect items into pieces this big.
const UPLOAD_PIECE: usize = 4 * 1024 * 1024;
/// Upload pieces fetched while the previous one is being sent (memory: pieces × 4 MiB per blob).
const READ_AHEAD: usize = 1;
/// Blobs of one image copied at the same time.
const BLOB_CONCURRENCY: usize = 4;
/// A client is rebuilt after this long, so rotated credentials (ECR tokens last 12 h) are read.
const CLIENT_MAX_AGE: Duration = Duration::from_secs(30 * 60);

/// What went wrong talking to a registry, as far as retrying and checks care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// manifest unknown, name unknown, 404: the thing is not there.
    NotFound,
    /// 401 or 403, or a failed token exchange.
    Denied(String),
    /// 429; how long the registry asked us to wait, when it said.
    TooManyRequests(Option<Duration>),
    /// No answer in time.
    Timeout,
    /// Connection refused or reset, TLS failure, a broken body.
    Transport(String),
    /// 5xx and other answers that may heal.
    Server(String),
    /// An answer that will not change on retry: a bad digest, a refused manifest, garbage.
    Invalid(String),
}

impl Failure {
    fn retryable(&self) -> bool {
        matches!(
            self,
            Failure::TooManyRequests(_)
                | Failure::Timeout
                | Failure::Transport(_)
                | Failure::Server(_)
        )
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::NotFound => f.write_str("not found"),
            Failure::Denied(why) => write!(f, "access denied: {why}"),
            Failure::TooManyRequests(Some(d)) => {
                write!(f, "429 too many requests (retry after {}s)", d.as_secs())
            }
            Failure::TooManyRequests(None) => f.write_str("429 too many requests"),
            Failure::Timeout => f.write_str("timed out"),
            Failure::Transport(why) => write!(f, "connection failed: {why}"),
            Failure::Server(why) => write!(f, "registry error: {why}"),
            Failure::Invalid(why) => f.write_str(why),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("credentials for {host}: {reason}")]
    Credentials { host: String, reason: String },
    #[error("CA file {path} for {host}: {reason}")]
    CaFile {
        host: String,
        path: String,
        reason: String,
    },
    #[error("{op} {reference}: {failure}")]
    Request {
        op: &'static str,
        reference: String,
        failure: Failure,
    },
    #[error("{reference}: {reason}")]
    Unsupported { reference: String, reason: String },
}

impl RegistryError {
    pub fn failure(&self) -> Option<&Failure> {
        match self {
            RegistryError::Request { failure, .. } => Some(failure),
            _ => None,
        }
    }
    /// How long a registry asked us to wait before trying again.
    pub fn retry_after(&self) -> Option<Duration> {
        match self.failure() {
            Some(Failure::TooManyRequests(d)) => *d,
            _ => None,
        }
    }
}

/// Per-request limits and the retry policy of one operation.
#[derive(Debug, Clone, Copy)]
pub struct RegistryOptions {
    pub connect_timeout: Duration,
    /// Longest silence while reading an answer (a hanging registry fails after this).
    pub read_timeout: Duration,
    /// Tries of one operation (a manifest fetch, one blob) before the copy fails.
    pub attempts: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// A `Retry-After` longer than this fails the operation instead of waiting inline; the
    /// background queue then waits it out.
    pub max_retry_after: Duration,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(60),
            attempts: 4,
            backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

/// What one copy moved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Digest of the top manifest the target now has.
    pub digest: String,
    pub manifests_copied: usize,
    pub manifests_skipped: usize,
    pub blobs_copied: usize,
    pub blobs_skipped: usize,
    pub bytes: u64,
    /// Platforms copied from an index (empty for a single-platform image).
    pub platforms: Vec<String>,
    /// True when only selected platforms were copied, so the index was rebuilt.
    pub filtered: bool,
}

/// Called with the byte count of every piece of blob data copied.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

struct HostClient {
    client: Client,
    auth: RegistryAuth,
    access: RegistryAccess,
    insecure: bool,
    created: Instant,
    /// Plain reqwest client with the same TLS roots, for the `Retry-After` probe.
    probe: reqwest::Client,
}

/// Clients per registry host; cheap to share.
pub struct Registries {
    options: RegistryOptions,
    /// Hosts allowed over plain HTTP besides those the table marks insecure.
    insecure: BTreeSet<String>,
    clients: Mutex<HashMap<String, Arc<HostClient>>>,
    metrics: Option<Metrics>,
}

impl Registries {
    pub fn new(options: RegistryOptions, metrics: Option<Metrics>) -> Self {
        Registries {
            options,
            insecure: BTreeSet::new(),
            clients: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Allows plain HTTP, or HTTPS without certificate verification, to `host` (the CLI's
    /// `--insecure-registry`).
    pub fn allow_insecure(&mut self, host: &str) {
        self.insecure.insert(registry_key(host));
    }

    /// The client for `host`, built from the table's settings; rebuilt when those change or it
    /// is old enough that credentials may have rotated.
    async fn client(&self, table: &Table, host: &str) -> Result<Arc<HostClient>, RegistryError> {
        let access = table.registry_access(host).cloned().unwrap_or_default();
        let insecure = access.insecure
            || (!self.insecure.is_empty() && self.insecure.contains(&registry_key(host)));
        {
            let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = clients.get(host) {
                if c.access == access
                    && c.insecure == insecure
                    && c.created.elapsed() < CLIENT_MAX_AGE
                {
                    return Ok(c.clone());
                }
            }
        }
        // The table's `insecure: true` means plain HTTP. `--insecure-registry` means what
        // skopeo's --tls-verify=false means: HTTPS without verification when the registry speaks
        // TLS, plain HTTP otherwise (so it probes once).
        let plain = access.insecure || (insecure && !self.speaks_tls(host).await);
        let built = Arc::new(self.build(host, access, insecure, plain)?);
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host.to_string(), built.clone());
        Ok(built)
    }

    /// Whether `host` answers HTTPS at all (any certificate, any status).
    async fn speaks_tls(&self, host: &str) -> bool {
        let wire = wire_host(host);
        let Ok(client) = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .connect_timeout(self.options.connect_timeout)
            .timeout(self.options.connect_timeout + Duration::from_secs(2))
            .build()
        else {
            return false;
        };
        client
            .get(format!("https://{wire}/v2/"))
            .send()
            .await
            .is_ok()
    }

    fn build(
        &self,
        host: &str,
        access: RegistryAccess,
        insecure: bool,
        plain: bool,
    ) -> Result<HostClient, RegistryError> {
        let auth = credentials(host, &access)?;
        let ca_error = |reason: String| RegistryError::CaFile {
            host: host.to_string(),
            path: access.ca_file.clone().unwrap_or_default(),
            reason,
        };
        let mut roots = Vec::new();
        if let Some(path) = &access.ca_file {
            let data = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
            roots.push(data);
        }
        let wire_host = wire_host(host);
        let config = ClientConfig {
            protocol: if plain {
                ClientProtocol::HttpsExcept(vec![wire_host])
            } else {
                ClientProtocol::Https
            },
            accept_invalid_certificates: insecure && !plain,
            extra_root_certificates: roots
                .iter()
                .map(|data| Certificate {
                    encoding: CertificateEncoding::Pem,
                    data: data.clone(),
                })
                .collect(),
            use_monolithic_push: access.monolithic_upload,
            platform_resolver: None,
            connect_timeout: Some(self.options.connect_timeout),
            read_timeout: Some(self.options.read_timeout),
            user_agent: concat!("image-mirror-webhook/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        };
        // `Client::new` falls back to defaults on a bad config; `try_from` says what was wrong.
        let client = Client::try_from(config).map_err(|e| ca_error(e.to_string()))?;
        let mut probe = reqwest::Client::builder()
            .danger_accept_invalid_certs(insecure && !plain)
            .connect_timeout(self.options.connect_timeout)
            .timeout(self.options.connect_timeout + Duration::from_secs(5));
        for data in &roots {
            for cert in
                reqwest::Certificate::from_pem_bundle(data).map_err(|e| ca_error(e.to_string()))?
            {
                probe = probe.add_root_certificate(cert);
            }
        }
        let probe = probe.build().map_err(|e| ca_error(e.to_string()))?;
        Ok(HostClient {
            client,
            auth,
            access,
            insecure,
            created: Instant::now(),
            probe,
        })
    }

    /// The digest of `reference`'s manifest, by `HEAD` (no retries: checks are on a deadline).
    pub async fn manifest_digest(
        &self,
        table: &Table,
        reference: &Reference,
    ) -> Result<String, RegistryError> {
        let host = self.client(table, reference.registry()).await?;
        let oci = to_oci(reference);
        let name = reference.to_string();
        self.attempts(&host, reference.registry(), "check", &name, 1, || {
            host.client.fetch_manifest_digest(&oci, &host.auth)
        })
        .await
    }

    /// Maps an oci-client error to a [`Failure`], reading `Retry-After` on a 429.
    async fn classify(
        &self,
        host: &HostClient,
        registry: &str,
        e: &OciDistributionError,
    ) -> Failure {
        let (failure, url) = failure_of(e);
        if let Failure::TooManyRequests(_) = failure {
            if let Some(m) = &self.metrics {
                m.too_many_requests
                    .get_or_create(&RegistryLabels {
                        registry: registry.to_string(),
                    })
                    .inc();
            }
            let wait = match url {
                Some(url) => probe_retry_after(&host.probe, &url).await,
                None => None,
            };
            return Failure::TooManyRequests(wait);
        }
        failure
    }

    /// Runs `op` until it succeeds, fails for good, or runs out of the configured tries.
    async fn retry<T, F, Fut>(
        &self,
        host: &HostClient,
        registry: &str,
        op: &'static str,
        reference: &str,
        f: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, OciDistributionError>>,
    {
        let tries = self.options.attempts;
        self.attempts(host, registry, op, reference, tries, f).await
    }

    /// Runs `op` at most `tries` times; every failure is sorted into a [`Failure`].
    async fn attempts<T, F, Fut>(
        &self,
        host: &HostClient,
        registry: &str,
        op: &'static str,
        reference: &str,
        tries: u32,
        mut f: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, OciDistributionError>>,
    {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let e = match f().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let failure = self.classify(host, registry, &e).await;
            let wait = match &failure {
                Failure::TooManyRequests(Some(d)) if *d > self.options.max_retry_after => None,
                Failure::TooManyRequests(Some(d)) => Some(*d),
                f if f.retryable() => Some(backoff(
                    self.options.backoff,
                    self.options.max_backoff,
                    attempt,
                )),
                _ => None,
            };
            match wait {
                Some(wait) if attempt < tries => {
                    tracing::debug!(op, reference, attempt, error = %failure,
                        wait_ms = wait.as_millis() as u64, "registry operation failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                _ => {
                    return Err(RegistryError::Request {
                        op,
                        reference: reference.to_string(),
                        failure,
                    })
                }
            }
        }
    }

    /// Warms a pull-through cache: one manifest fetch through the cache makes it pull the image.
    pub async fn warm_up(
        &self,
        table: &Table,
        target: &Reference,
    ) -> Result<CopyReport, RegistryError> {
        let host = self.client(table, target.registry()).await?;
        let oci = to_oci(target);
        let name = target.to_string();
        let (_, digest) = self
            .retry(&host, target.registry(), "warm up", &name, || {
                host.client
                    .pull_manifest_raw(&oci, &host.auth, &MANIFEST_TYPES)
            })
            .await?;
        Ok(CopyReport {
            digest,
            ..CopyReport::default()
        })
    }

    /// Copies `source` to `target`: the index, every selected platform, every blob the target
    /// lacks, manifests byte for byte; then the tag.
    pub async fn copy(
        &self,
        table: &Table,
        source: &Reference,
        target: &Reference,
        platforms: &[Platform],
        progress: Option<Progress>,
    ) -> Result<CopyReport, RegistryError> {
        let src = self.client(table, source.registry()).await?;
        let dst = self.client(table, target.registry()).await?;
        let job = CopyJob {
            registries: self,
            src,
            dst,
            source: source.clone(),
            target: target.clone(),
            bytes: Arc::new(AtomicU64::new(0)),
            progress,
            report: Mutex::new(CopyReport::default()),
            blobs_seen: Mutex::new(BTreeSet::new()),
        };
        job.run(platforms).await
    }
}

/// One copy in progress.
struct CopyJob<'r> {
    registries: &'r Registries,
    src: Arc<HostClient>,
    dst: Arc<HostClient>,
    source: Reference,
    target: Reference,
    bytes: Arc<AtomicU64>,
    progress: Option<Progress>,
    report: Mutex<CopyReport>,
    blobs_seen: Mutex<BTreeSet<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    platform: Option<DescriptorPlatform>,
    #[serde(default)]
    urls: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct DescriptorPlatform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

impl DescriptorPlatform {
    fn label(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{}", self.os, self.architecture, v),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestDoc {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    blobs: Vec<Descriptor>,
}

impl ManifestDoc {
    fn parse(bytes: &[u8], what: &str) -> Result<Self, RegistryError> {
        let doc: ManifestDoc =
            serde_json::from_slice(bytes).map_err(|e| RegistryError::Unsupported {
                reference: what.to_string(),
                reason: format!("manifest is not valid JSON: {e}"),
            })?;
        if doc.schema_version == Some(1) {
            return Err(RegistryError::Unsupported {
                reference: what.to_string(),
                reason: "Docker schema 1 manifests cannot be copied (re-push the image)".into(),
            });
        }
        Ok(doc)
    }

    fn is_index(&self) -> bool {
        self.manifests.is_some()
    }

    /// The type to push it with: its own `mediaType`, else what its shape says (OCI makes the
    /// field optional).
    fn content_type(&self) -> &str {
        match (&self.media_type, self.is_index()) {
            (Some(t), _) if !t.is_empty() => t,
            (_, true) => OCI_IMAGE_INDEX_MEDIA_TYPE,
            (_, false) => OCI_IMAGE_MEDIA_TYPE,
        }
    }
}

type BoxedCopy<'a> = Pin<Box<dyn Future<Output = Result<(), RegistryError>> + Send + 'a>>;

impl CopyJob<'_> {
    async fn run(&self, platforms: &[Platform]) -> Result<CopyReport, RegistryError> {
        let src_oci = to_oci(&self.source);
        // Blob and push calls take no credentials: oci-client uses those stored per registry.
        self.src
            .client
            .store_auth_if_needed(src_oci.resolve_registry(), &self.src.auth)
            .await;
        self.dst
            .client
            .store_auth_if_needed(&wire_host(self.target.registry()), &self.dst.auth)
            .await;
        let name = self.source.to_string();
        // HEAD first: Docker Hub counts manifest GETs, not HEADs.
        let digest = match self.source.digest() {
            Some(d) => d.to_string(),
            None => {
                self.registries
                    .retry(&self.src, self.source.registry(), "inspect", &name, || {
                        self.src
                            .client
                            .fetch_manifest_digest(&src_oci, &self.src.auth)
                    })
                    .await?
            }
        };
        // The target already holds this exact top manifest (under its tag, when it has one):
        // nothing to move.
        if platforms.is_empty() {
            let probe = match self.target.tag() {
                Some(tag) => self.at_tag(&self.target, tag)?,
                None => self.target.clone(),
            };
            if self.target_has(&probe).await?.as_deref() == Some(digest.as_str()) {
                let mut report = self.take_report();
                report.digest = digest;
                report.manifests_skipped += 1;
                return Ok(report);
            }
        }
        let pinned = self.at_digest(&self.source, &digest);
        let (raw, got) = self.pull_manifest(&pinned).await?;
        let doc = ManifestDoc::parse(&raw, &name)?;
        let mut top_digest = got;
        let mut body = raw;
        if let Some(children) = &doc.manifests {
            let selected: Vec<&Descriptor> = children
                .iter()
                .filter(|c| platforms.is_empty() || selects(platforms, c))
                .collect();
            if selected.is_empty() {
                return Err(RegistryError::Unsupported {
                    reference: name,
                    reason: format!(
                        "no manifest in the index matches the platforms {}",
                        platforms
                            .iter()
                            .map(Platform::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
            let filtered = selected.len() < children.len();
            if filtered && self.target.digest().is_some() {
                // A rebuilt index has another digest, which a pinned target could never have.
                return Err(RegistryError::Unsupported {
                    reference: self.target.to_string(),
                    reason: "a reference pinned by digest needs every platform of the index; \
                             remove the platforms setting for it"
                        .into(),
                });
            }
            for child in &selected {
                self.copy_manifest(child, 1).await?;
                if let Some(p) = &child.platform {
                    self.report().platforms.push(p.label());
                }
            }
            if filtered {
                body = filter_index(&body, &selected)?;
                top_digest = sha256_digest(&body);
                self.report().filtered = true;
            }
        } else {
            self.copy_image_blobs(&doc).await?;
        }
        let content_type = doc.content_type().to_string();
        // By digest first, then the tag, so a tag+digest reference finds both.
        let by_digest = self.at_digest(&self.target, &top_digest);
        self.push_manifest(&by_digest, &body, &content_type).await?;
        if let Some(tag) = self.target.tag() {
            let by_tag = self.at_tag(&self.target, tag)?;
            self.push_manifest(&by_tag, &body, &content_type).await?;
        }
        let mut report = self.take_report();
        report.digest = top_digest;
        report.manifests_copied += 1;
        report.bytes = self.bytes.load(Ordering::Relaxed);
        Ok(report)
    }

    fn report(&self) -> std::sync::MutexGuard<'_, CopyReport> {
        self.report.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_report(&self) -> CopyReport {
        std::mem::take(&mut *self.report())
    }

    fn at_digest(&self, r: &Reference, digest: &str) -> Reference {
        Reference::from_parts(r.registry(), r.path(), None, Some(digest))
            .unwrap_or_else(|_| r.clone())
    }

    /// The digest the target has at `r`; `None` when it has nothing there. Any other failure
    /// stops the copy: pushing blind into a registry that does not answer helps nobody.
    fn at_tag(&self, r: &Reference, tag: &str) -> Result<Reference, RegistryError> {
        Reference::from_parts(r.registry(), r.path(), Some(tag), None).map_err(|e| {
            RegistryError::Unsupported {
                reference: r.to_string(),
                reason: e.to_string(),
            }
        })
    }

    async fn target_has(&self, r: &Reference) -> Result<Option<String>, RegistryError> {
        let oci = to_oci(r);
        let name = r.to_string();
        let found = self
            .registries
            .retry(&self.dst, r.registry(), "inspect", &name, || {
                self.dst.client.fetch_manifest_digest(&oci, &self.dst.auth)
            })
            .await;
        match found {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.failure() == Some(&Failure::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn pull_manifest(&self, r: &Reference) -> Result<(Bytes, String), RegistryError> {
        let oci = to_oci(r);
        let name = r.to_string();
        self.registries
            .retry(&self.src, r.registry(), "fetch manifest", &name, || {
                self.src
                    .client
                    .pull_manifest_raw(&oci, &self.src.auth, &MANIFEST_TYPES)
            })
            .await
    }

    async fn push_manifest(
        &self,
        r: &Reference,
        body: &Bytes,
        content_type: &str,
    ) -> Result<(), RegistryError> {
        // When a registry answers a push without `Location` (ECR does), oci-client strips the
        // tag off the URL and panics if it is not there; a push by digest has no tag. Giving it
        // the digest as its "tag" makes that suffix match. The URL uses the digest either way.
        let oci = match r.digest() {
            Some(d) => oci_client::Reference::with_tag_and_digest(
                r.registry().to_string(),
                r.path().to_string(),
                d.to_string(),
                d.to_string(),
            ),
            None => to_oci(r),
        };
        let name = r.to_string();
        let header = reqwest::header::HeaderValue::from_str(content_type).map_err(|_| {
            RegistryError::Unsupported {
                reference: name.clone(),
                reason: format!("invalid media type {content_type:?}"),
            }
        })?;
        self.registries
            .retry(&self.dst, r.registry(), "push manifest", &name, || {
                self.dst
                    .client
                    .push_manifest_raw(&oci, body.clone(), header.clone())
            })
            .await?;
        Ok(())
    }

    /// Copies one child manifest of an index (and, for a nested index, its children).
    fn copy_manifest<'a>(&'a self, desc: &'a Descriptor, depth: usize) -> BoxedCopy<'a> {
        Box::pin(async move {
            let at_target = self.at_digest(&self.target, &desc.digest);
            if self.target_has(&at_target).await?.is_some() {
                // A registry accepts a manifest only once all it references is there.
                self.report().manifests_skipped += 1;
                return Ok(());
            }
            let at_source = self.at_digest(&self.source, &desc.digest);
            let (raw, _) = self.pull_manifest(&at_source).await?;
            let doc = ManifestDoc::parse(&raw, &at_source.to_string())?;
            match &doc.manifests {
                Some(children) if depth < 3 => {
                    for child in children {
                        self.copy_manifest(child, depth + 1).await?;
                    }
                }
                Some(_) => {
                    return Err(RegistryError::Unsupported {
                        reference: at_source.to_string(),
                        reason: "indexes nested more than 3 deep".into(),
                    })
                }
                None => self.copy_image_blobs(&doc).await?,
            }
            let content_type = if desc.media_type.is_empty() {
                doc.content_type().to_string()
            } else {
                desc.media_type.clone()
            };
            self.push_manifest(&at_target, &raw, &content_type).await?;
            self.report().manifests_copied += 1;
            Ok(())
        })
    }

    /// Config and layers of one image manifest, a few at a time.
    async fn copy_image_blobs(&self, doc: &ManifestDoc) -> Result<(), RegistryError> {
        let blobs = doc
            .config
            .iter()
            .chain(&doc.layers)
            .chain(&doc.blobs)
            // Foreign (non-distributable) layers live at their URLs, not in the registry.
            .filter(|d| d.urls.is_empty() || !is_foreign(&d.media_type))
            .filter(|d| {
                self.blobs_seen
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(d.digest.clone())
            })
            .collect::<Vec<_>>();
        futures::stream::iter(blobs)
            .map(|d| self.copy_blob(d))
            // Boxing works around rust-lang/rust#104382 (a Send future over a borrowing map).
            .boxed()
            .buffer_unordered(BLOB_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    async fn copy_blob(&self, desc: &Descriptor) -> Result<(), RegistryError> {
        let src_oci = to_oci(&self.source);
        let dst_oci = to_oci(&self.target);
        let name = format!("{}@{}", self.target.name(), desc.digest);
        let exists = self
            .registries
            .retry(
                &self.dst,
                self.target.registry(),
                "check blob",
                &name,
                || self.dst.client.blob_exists(&dst_oci, &desc.digest),
            )
            .await?;
        if exists {
            self.report().blobs_skipped += 1;
            return Ok(());
        }
        let layer = oci_client::manifest::OciDescriptor {
            media_type: desc.media_type.clone(),
            digest: desc.digest.clone(),
            size: desc.size as i64,
            ..Default::default()
        };
        self.registries
            .retry(
                &self.dst,
                self.target.registry(),
                "copy blob",
                &name,
                || {
                    let layer = layer.clone();
                    let src_oci = src_oci.clone();
                    let dst_oci = dst_oci.clone();
                    async move {
                        let pulled = self.src.client.pull_blob_stream(&src_oci, &layer).await?;
                        // Bytes are counted as they arrive; a retried blob counts again, as it moved
                        // again.
                        let counter = self.bytes.clone();
                        let progress = self.progress.clone();
                        let stream = pulled.stream.map(move |piece| {
                            let piece = piece.map_err(OciDistributionError::from)?;
                            counter.fetch_add(piece.len() as u64, Ordering::Relaxed);
                            if let Some(p) = &progress {
                                p(piece.len() as u64);
                            }
                            Ok(piece)
                        });
                        let stream: Pin<Box<dyn Stream<Item = _> + Send>> =
                            if self.dst.access.monolithic_upload {
                                Box::pin(stream)
                            } else {
                                Box::pin(read_ahead(rechunk(stream, UPLOAD_PIECE), READ_AHEAD))
                            };
                        self.dst
                            .client
                            .push_blob_stream(&dst_oci, stream, &layer.digest, Some(desc.size))
                            .await
                    }
                },
            )
            .await?;
        self.report().blobs_copied += 1;
        Ok(())
    }
}

/// Gathers small stream items into pieces of `size` bytes (the last may be shorter). Each piece
/// is its own allocation of exactly `size`, so a piece held by an upload pins nothing else.
fn rechunk<S>(
    stream: S,
    size: usize,
) -> impl Stream<Item = Result<Bytes, OciDistributionError>> + Send
where
    S: Stream<Item = Result<Bytes, OciDistributionError>> + Send + Unpin,
{
    struct State<S> {
        stream: S,
        leftover: Bytes,
        done: bool,
    }
    let start = State {
        stream,
        leftover: Bytes::new(),
        done: false,
    };
    futures::stream::unfold(start, move |mut st| async move {
        if st.done {
            return None;
        }
        let mut buf = BytesMut::with_capacity(size);
        loop {
            if !st.leftover.is_empty() {
                let take = (size - buf.len()).min(st.leftover.len());
                buf.extend_from_slice(&st.leftover.split_to(take));
            }
            if buf.len() == size {
                return Some((Ok(buf.freeze()), st));
            }
            match st.stream.next().await {
                Some(Ok(piece)) => st.leftover = piece,
                Some(Err(e)) => {
                    st.done = true;
                    return Some((Err(e), st));
                }
                None => {
                    st.done = true;
                    return (!buf.is_empty()).then(|| (Ok(buf.freeze()), st));
                }
            }
        }
    })
}

/// Keeps up to `depth` items of `stream` fetched ahead, so the download goes on while each
/// upload piece is sent (oci-client sends a piece, waits for the answer, then reads on).
fn read_ahead<S, T>(stream: S, depth: usize) -> impl Stream<Item = T> + Send + 'static
where
    S: Stream<Item = T> + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(depth);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            // The uploader stopped (failed or finished): stop reading.
            if tx.send(item).await.is_err() {
                return;
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|i| (i, rx)) })
}

/// Foreign (Windows base) and non-distributable layers: registries serve them from their URLs
/// and often refuse to store them, so copies leave them where they are (as skopeo does).
fn is_foreign(media_type: &str) -> bool {
    media_type.contains(".foreign.") || media_type.contains(".nondistributable.")
}

/// Whether an index entry is one of the selected platforms.
fn selects(platforms: &[Platform], desc: &Descriptor) -> bool {
    let Some(p) = &desc.platform else {
        return false;
    };
    platforms.iter().any(|want| {
        want.os == p.os
            && want.architecture == p.architecture
            && (want.variant.is_none() || want.variant == p.variant)
    })
}

/// The index with only the selected entries; every other field kept as it was.
fn filter_index(raw: &[u8], keep: &[&Descriptor]) -> Result<Bytes, RegistryError> {
    let invalid = |e: String| RegistryError::Unsupported {
        reference: "index".into(),
        reason: e,
    };
    let mut doc: serde_json::Value =
        serde_json::from_slice(raw).map_err(|e| invalid(e.to_string()))?;
    if let Some(list) = doc.get_mut("manifests").and_then(|m| m.as_array_mut()) {
        list.retain(|m| {
            m.get("digest")
                .and_then(|d| d.as_str())
                .is_some_and(|d| keep.iter().any(|k| k.digest == d))
        });
    }
    serde_json::to_vec(&doc)
        .map(Bytes::from)
        .map_err(|e| invalid(e.to_string()))
}

fn sha256_digest(data: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{:x}", sha2::Sha256::digest(data))
}

/// Exponential back-off with full jitter: a random wait in [base·2ⁿ⁻¹/2, base·2ⁿ⁻¹], capped.
pub fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let ceiling = exp.min(max);
    let half = ceiling / 2;
    half + ceiling.mul_f64(rand::random::<f64>() * 0.5)
}

fn oci_reference(
    host: &str,
    repository: &str,
    tag: Option<&str>,
    digest: Option<&str>,
) -> oci_client::Reference {
    let (h, r) = (host.to_string(), repository.to_string());
    match (tag, digest) {
        (Some(t), Some(d)) => oci_client::Reference::with_tag_and_digest(h, r, t.into(), d.into()),
        (None, Some(d)) => oci_client::Reference::with_digest(h, r, d.into()),
        (Some(t), None) => oci_client::Reference::with_tag(h, r, t.into()),
        (None, None) => oci_client::Reference::with_tag(h, r, "latest".into()),
    }
}

/// The host requests go to (`docker.io` is served at `index.docker.io`).
fn wire_host(host: &str) -> String {
    oci_reference(host, "x", None, None)
        .resolve_registry()
        .to_string()
}

/// Our reference as oci-client's; a digest wins over a tag for every request.
fn to_oci(r: &Reference) -> oci_client::Reference {
    oci_reference(r.registry(), r.path(), r.tag(), r.digest())
}

/// Credentials for `host`: environment variables first, then a docker config file, else
/// anonymous. Errors name the variable or file, never a value.
pub fn credentials(host: &str, access: &RegistryAccess) -> Result<RegistryAuth, RegistryError> {
    let err = |reason: String| RegistryError::Credentials {
        host: host.to_string(),
        reason,
    };
    if let (Some(user_var), Some(pass_var)) = (&access.username_env, &access.password_env) {
        let read = |var: &str| std::env::var(var).ok().filter(|v| !v.is_empty());
        return match (read(user_var), read(pass_var)) {
            (Some(user), Some(pass)) => Ok(RegistryAuth::Basic(user, pass)),
            // Neither set (an optional Secret that is not there): anonymous, as for a missing
            // docker config file.
            (None, None) => {
                tracing::debug!(host, "credential variables unset; anonymous");
                Ok(RegistryAuth::Anonymous)
            }
            (None, Some(_)) => Err(err(format!(
                "environment variable {user_var} is not set, but {pass_var} is"
            ))),
            (Some(_), None) => Err(err(format!(
                "environment variable {pass_var} is not set, but {user_var} is"
            ))),
        };
    }
    if let Some(path) = &access.docker_config {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            // An optional Secret that is not there: public images still work anonymously.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!(host, file = %path, "docker config file absent; anonymous");
                return Ok(RegistryAuth::Anonymous);
            }
            Err(e) => return Err(err(format!("cannot read {path}: {e}"))),
        };
        return docker_config_auth(&text, host)
            .map_err(|reason| err(format!("{path}: {reason}")))
            .map(|found| found.unwrap_or(RegistryAuth::Anonymous));
    }
    Ok(RegistryAuth::Anonymous)
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: Option<HashMap<String, DockerAuth>>,
    #[serde(flatten)]
    legacy: HashMap<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// Finds `host` in a docker `config.json` / `.dockerconfigjson` (or the legacy `.dockercfg`
/// shape without `auths`). Keys may be URLs (`https://index.docker.io/v1/`).
pub fn docker_config_auth(text: &[u8], host: &str) -> Result<Option<RegistryAuth>, String> {
    let config: DockerConfig =
        serde_json::from_slice(text).map_err(|e| format!("not a docker config file: {e}"))?;
    let auths: HashMap<String, DockerAuth> = match config.auths {
        Some(a) => a,
        None => config
            .legacy
            .into_iter()
            .filter_map(|(k, v)| serde_json::from_value(v).ok().map(|a| (k, a)))
            .collect(),
    };
    let want = registry_key(host);
    let Some((key, entry)) = auths.into_iter().find(|(k, _)| registry_key(k) == want) else {
        return Ok(None);
    };
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(Some(RegistryAuth::Basic(u.clone(), p.clone())));
    }
    if let Some(encoded) = &entry.auth {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| format!("the auth of {key:?} is not base64"))?;
        let decoded =
            String::from_utf8(decoded).map_err(|_| format!("the auth of {key:?} is not UTF-8"))?;
        let (u, p) = decoded
            .split_once(':')
            .ok_or_else(|| format!("the auth of {key:?} is not user:password"))?;
        return Ok(Some(RegistryAuth::Basic(u.to_string(), p.to_string())));
    }
    if entry.identitytoken.is_some() {
        return Err(format!(
            "the entry {key:?} holds an identity token, which is not supported; use user:password"
        ));
    }
    Err(format!("the entry {key:?} has no credentials"))
}

/// Sorts an oci-client error into a [`Failure`], with the URL it came from when known.
fn failure_of(e: &OciDistributionError) -> (Failure, Option<String>) {
    use OciDistributionError as E;
    match e {
        E::RegistryError { envelope, url } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            let text = envelope
                .errors
                .iter()
                .map(|e| e.message.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            let failure = if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                )
            }) {
                Failure::NotFound
            } else if codes.contains(&&OciErrorCode::Toomanyrequests) {
                Failure::TooManyRequests(None)
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                Failure::Denied(text)
            } else {
                Failure::Invalid(format!("registry refused: {text}"))
            };
            (failure, Some(url.clone()))
        }
        E::ServerError { code, url, message } => {
            let short: String = message.chars().take(200).collect();
            let failure = match code {
                404 => Failure::NotFound,
                429 => Failure::TooManyRequests(None),
                401 | 403 => Failure::Denied(format!("HTTP {code}")),
                408 | 500..=599 => Failure::Server(format!("HTTP {code}: {short}")),
                _ => Failure::Invalid(format!("HTTP {code}: {short}")),
            };
            (failure, Some(url.clone()))
        }
        E::UnauthorizedError { url } => (Failure::Denied("HTTP 401".into()), Some(url.clone())),
        E::AuthenticationFailure(why) => {
            let short: String = why.chars().take(200).collect();
            (
                Failure::Denied(format!("token exchange failed: {short}")),
                None,
            )
        }
        E::RequestError(re) => {
            let failure = if re.is_timeout() {
                Failure::Timeout
            } else if let Some(status) = re.status() {
                match status.as_u16() {
                    404 => Failure::NotFound,
                    429 => Failure::TooManyRequests(None),
                    401 | 403 => Failure::Denied(format!("HTTP {status}")),
                    _ => Failure::Server(format!("HTTP {status}")),
                }
            } else {
                Failure::Transport(error_chain(re))
            };
            (failure, re.url().map(|u| u.to_string()))
        }
        E::IoError(io) => (Failure::Transport(io.to_string()), None),
        E::SpecViolationError(why) => (
            Failure::Server(format!("registry broke the spec: {why}")),
            None,
        ),
        other => (Failure::Invalid(other.to_string()), None),
    }
}

/// An error with its causes, one line ("error sending request: connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cause = c.source();
    }
    text
}

/// One `HEAD` of a URL that answered 429, to read its `Retry-After` (seconds or HTTP date).
async fn probe_retry_after(client: &reqwest::Client, url: &str) -> Option<Duration> {
    let res = client.head(url).send().await.ok()?;
    if res.status() != reqwest::StatusCode::TOO_MANY_REQUESTS {
        return None;
    }
    let value = res
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?;
    parse_retry_after(value, std::time::SystemTime::now())
}

/// `Retry-After: 120` or `Retry-After: Wed, 21 Oct 2015 07:28:00 GMT`.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:29:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        for attempt in 1..20 {
            let d = backoff(base, max, attempt);
            let ceiling = (base * (1 << (attempt - 1).min(16))).min(max);
            assert!(d >= ceiling / 2 && d <= ceiling, "attempt {attempt}: {d:?}");
        }
    }

    #[test]
    fn docker_config_shapes() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("robot:generated");
        let basic = |u: &str, p: &str| Some(RegistryAuth::Basic(u.into(), p.into()));
        let cases: Vec<(String, &str, Option<RegistryAuth>)> = vec![
            (
                format!(r#"{{"auths":{{"ghcr.io":{{"auth":"{b64}"}}}}}}"#),
                "ghcr.io",
                basic("robot", "generated"),
            ),
            (
                format!(r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{b64}"}}}}}}"#),
                "docker.io",
                basic("robot", "generated"),
            ),
            (
                r#"{"auths":{"quay.io":{"username":"u","password":"p"}}}"#.into(),
                "quay.io",
                basic("u", "p"),
            ),
            (
                format!(r#"{{"registry.local:5000":{{"auth":"{b64}"}}}}"#),
                "registry.local:5000",
                basic("robot", "generated"),
            ),
            (
                format!(r#"{{"auths":{{"ghcr.io":{{"auth":"{b64}"}}}}}}"#),
                "quay.io",
                None,
            ),
        ];
        for (text, host, want) in cases {
            assert_eq!(
                docker_config_auth(text.as_bytes(), host),
                Ok(want),
                "{text} for {host}"
            );
        }
        let err =
            docker_config_auth(br#"{"auths":{"ghcr.io":{"auth":"!!"}}}"#, "ghcr.io").unwrap_err();
        assert!(
            err.contains("\"ghcr.io\"") && err.contains("base64"),
            "{err}"
        );
        let err = docker_config_auth(br#"{"auths":{"ghcr.io":{"identitytoken":"x"}}}"#, "ghcr.io")
            .unwrap_err();
        assert!(
            err.contains("identity token") && !err.contains("\"x\""),
            "{err}"
        );
    }

    #[test]
    fn env_credentials_unset_mean_anonymous_half_set_names_the_variable() {
        let access = RegistryAccess {
            username_env: Some("IMW_TEST_SURELY_UNSET_USER".into()),
            password_env: Some("IMW_TEST_SURELY_UNSET_PASS".into()),
            ..RegistryAccess::default()
        };
        assert_eq!(
            credentials("docker.io", &access).unwrap(),
            RegistryAuth::Anonymous
        );
        // One of the two set is a mistake worth an error naming both (never their values).
        let half = RegistryAccess {
            username_env: Some("IMW_TEST_SURELY_UNSET_USER".into()),
            password_env: Some("PATH".into()),
            ..RegistryAccess::default()
        };
        let err = credentials("docker.io", &half).unwrap_err().to_string();
        assert!(!err.contains(&std::env::var("PATH").unwrap()), "{err}");
        assert!(
            err.contains("IMW_TEST_SURELY_UNSET_USER") && err.contains("docker.io"),
            "{err}"
        );
        let absent = RegistryAccess {
            docker_config: Some("/nonexistent/.dockerconfigjson".into()),
            ..RegistryAccess::default()
        };
        assert_eq!(
            credentials("ghcr.io", &absent).unwrap(),
            RegistryAuth::Anonymous
        );
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("config.json");
        std::fs::write(&garbage, "not json").unwrap();
        let bad = RegistryAccess {
            docker_config: Some(garbage.display().to_string()),
            ..RegistryAccess::default()
        };
        let err = credentials("ghcr.io", &bad).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("ghcr.io"),
            "{err}"
        );
    }

    #[test]
    fn errors_sort_into_failures() {
        use oci_client::errors::{OciEnvelope, OciError};
        let envelope = |code: OciErrorCode| OciDistributionError::RegistryError {
            envelope: OciEnvelope {
                errors: vec![OciError {
                    code,
                    message: "m".into(),
                    detail: serde_json::Value::Null,
                }],
            },
            url: "http://127.0.0.1/v2/x/manifests/1".into(),
        };
        let server = |code: u16| OciDistributionError::ServerError {
            code,
            url: "u".into(),
            message: String::new(),
        };
        let cases = [
            (envelope(OciErrorCode::ManifestUnknown), Failure::NotFound),
            (envelope(OciErrorCode::NameUnknown), Failure::NotFound),
            (
                envelope(OciErrorCode::Toomanyrequests),
                Failure::TooManyRequests(None),
            ),
            (envelope(OciErrorCode::Denied), Failure::Denied("m".into())),
            (server(404), Failure::NotFound),
            (server(429), Failure::TooManyRequests(None)),
            (server(401), Failure::Denied("HTTP 401".into())),
            (server(503), Failure::Server("HTTP 503: ".into())),
        ];
        for (e, want) in cases {
            assert_eq!(failure_of(&e).0, want, "{e}");
        }
    }

    #[test]
    fn foreign_layers_are_recognised() {
        assert!(is_foreign(
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
        ));
        assert!(is_foreign(
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        ));
        assert!(!is_foreign("application/vnd.oci.image.layer.v1.tar+gzip"));
        assert!(!is_foreign(
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        ));
    }

    #[test]
    fn rechunk_makes_even_pieces() {
        let items: Vec<Result<Bytes, OciDistributionError>> =
            (0..10).map(|i| Ok(Bytes::from(vec![i as u8; 3]))).collect();
        let out: Vec<Bytes> =
            futures::executor::block_on(rechunk(futures::stream::iter(items), 7).try_collect())
                .unwrap();
        let sizes: Vec<usize> = out.iter().map(Bytes::len).collect();
        assert_eq!(sizes, vec![7, 7, 7, 7, 2]);
        let joined: Vec<u8> = out.concat();
        assert_eq!(joined.len(), 30);
        assert_eq!(joined[3], 1);
    }

    #[test]
    fn platform_filter_keeps_other_fields() {
        let raw = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"digest":"sha256:a","platform":{"os":"linux","architecture":"amd64"}},{"digest":"sha256:b","platform":{"os":"linux","architecture":"arm64","variant":"v8"}}],"annotations":{"k":"v"}}"#;
        let doc = ManifestDoc::parse(raw, "x").unwrap();
        let children = doc.manifests.as_ref().unwrap();
        let arm = [Platform::parse("linux/arm64").unwrap()];
        let keep: Vec<&Descriptor> = children.iter().filter(|c| selects(&arm, c)).collect();
        assert_eq!(keep.len(), 1);
        let out: serde_json::Value =
            serde_json::from_slice(&filter_index(raw, &keep).unwrap()).unwrap();
        assert_eq!(out["manifests"].as_array().unwrap().len(), 1);
        assert_eq!(out["manifests"][0]["digest"], "sha256:b");
        assert_eq!(out["annotations"]["k"], "v");
        let v7 = [Platform::parse("linux/arm64/v7").unwrap()];
        assert!(children.iter().all(|c| !selects(&v7, c)));
    }
}
