//! Registry access through oci-client: existence checks, warm-ups and whole-image copies.
//!
//! One `oci_client::Client` per registry host, built from the [`Settings`]' `registries`
//! entries (credentials, extra CA, plain HTTP, upload mode). A reload hands in new
//! settings ([`Registries::apply`]); a client whose settings changed, or that is old enough
//! that its credentials may have rotated, is rebuilt on its next use.

mod auth;
mod copy;
mod failure;
mod ratelimit;
mod referrers;
mod retry;
mod stream;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::Client;

pub use auth::{credentials, docker_config_auth};
pub use failure::{CredentialError, DockerConfigError, Failure, ImageError, RegistryError};
pub use ratelimit::RateLimit;
pub use retry::{backoff, parse_retry_after};

use crate::aws::Aws;
use crate::locks::lock;
use crate::mapping::Platform;
use crate::metrics::Metrics;
use crate::reference::{registry_host, wire_host, Reference};
use crate::settings::{ecr_registry, EcrRegistry, RegistryAccess, Settings, Timeouts};

/// Manifest types a copy accepts: Docker schema 2 and OCI, single images and indexes.
const MANIFEST_TYPES: [&str; 4] = [
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
];

/// A client is rebuilt after this long, so rotated credentials (ECR tokens last 12 h) are read.
const CLIENT_MAX_AGE: Duration = Duration::from_secs(30 * 60);

/// The retry policy of one operation, and timeouts that override the table's.
#[derive(Debug, Clone, Copy)]
pub struct RegistryOptions {
    /// Instead of the table's `timeouts` (the CLI's flags, tests).
    pub timeouts: Option<Timeouts>,
    /// Tries of one operation (a manifest fetch, one blob) before the copy fails; one that got
    /// no answer in time is tried twice at most.
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
            timeouts: None,
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
    /// Signatures, attestations, SBOMs and OCI referrers copied along (their blobs count in
    /// `blobs_copied` and `bytes`).
    pub referrers: usize,
    /// The target's tag, when it was not pushed (the image went by digest only).
    pub tag_left: Option<TagLeft>,
}

/// A target tag a copy did not move, and why: upstream's tag does not point at the copied
/// digest now, so moving the mirror's tag could roll every Pod that uses it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagLeft {
    pub tag: String,
    pub why: String,
}

/// Called with the byte count of every piece of blob data copied.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// The client of one registry host, with what it was built from.
struct HostClient {
    /// The host as references name it (the key of the pool and the metric label).
    host: String,
    client: Client,
    auth: RegistryAuth,
    access: RegistryAccess,
    timeouts: Timeouts,
    insecure: bool,
    /// Spoken to over plain HTTP.
    plain: bool,
    created: Instant,
    /// Plain reqwest client with the same TLS roots, for the `Retry-After` probe.
    probe: reqwest::Client,
    /// The ECR registry whose token `auth` holds, when it came from AWS.
    ecr: Option<EcrRegistry>,
}

/// Clients per registry host; cheap to share.
pub struct Registries {
    options: RegistryOptions,
    settings: ArcSwap<Settings>,
    /// Hosts allowed over plain HTTP besides those the settings mark insecure.
    insecure: BTreeSet<String>,
    clients: Mutex<HashMap<String, Arc<HostClient>>>,
    metrics: Option<Metrics>,
}

impl Registries {
    pub fn new(
        settings: Arc<Settings>,
        options: RegistryOptions,
        metrics: Option<Metrics>,
    ) -> Self {
        Registries {
            options,
            settings: ArcSwap::new(settings),
            insecure: BTreeSet::new(),
            clients: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Takes reloaded settings; clients whose access changed are rebuilt on their next use.
    pub fn apply(&self, settings: Arc<Settings>) {
        self.settings.store(settings);
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.load_full()
    }

    /// The timeouts in force: the options' when given, else the table's.
    pub fn timeouts(&self) -> Timeouts {
        self.options
            .timeouts
            .unwrap_or_else(|| self.settings.load().timeouts)
    }

    /// Allows plain HTTP, or HTTPS without certificate verification, to `host` (the CLI's
    /// `--insecure-registry`).
    pub fn allow_insecure(&mut self, host: &str) {
        self.insecure.insert(registry_host(host).to_string());
    }

    /// The client for `host`; rebuilt when its settings changed or it is old enough that
    /// credentials may have rotated.
    async fn client(&self, host: &str) -> Result<Arc<HostClient>, RegistryError> {
        let access = self
            .settings
            .load()
            .access(host)
            .cloned()
            .unwrap_or_default();
        let insecure = access.insecure
            || (!self.insecure.is_empty() && self.insecure.contains(registry_host(host)));
        let timeouts = self.timeouts();
        {
            let clients = lock(&self.clients);
            if let Some(c) = clients.get(host) {
                if c.access == access
                    && c.insecure == insecure
                    && c.timeouts == timeouts
                    && c.created.elapsed() < CLIENT_MAX_AGE
                {
                    return Ok(c.clone());
                }
            }
        }
        // The settings' `insecure: true` means plain HTTP. `--insecure-registry` means what
        // skopeo's --tls-verify=false means: HTTPS without verification when the registry speaks
        // TLS, plain HTTP otherwise (so it probes once).
        let plain = access.insecure || (insecure && !self.speaks_tls(host, timeouts).await);
        let built = Arc::new(self.build(host, access, timeouts, insecure, plain).await?);
        lock(&self.clients).insert(host.to_string(), built.clone());
        Ok(built)
    }

    /// Whether `host` answers HTTPS at all (any certificate, any status).
    async fn speaks_tls(&self, host: &str, timeouts: Timeouts) -> bool {
        let Ok(client) = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .connect_timeout(timeouts.connect)
            .timeout(timeouts.connect + Duration::from_secs(2))
            .build()
        else {
            return false;
        };
        client
            .get(format!("https://{}/v2/", wire_host(host)))
            .send()
            .await
            .is_ok()
    }

    async fn build(
        &self,
        host: &str,
        access: RegistryAccess,
        timeouts: Timeouts,
        insecure: bool,
        plain: bool,
    ) -> Result<HostClient, RegistryError> {
        // Credentials the table names win; an ECR registry's otherwise come from AWS.
        let named = access.username_env.is_some() || access.docker_config.is_some();
        let ecr = ecr_registry(host, Some(&access)).filter(|_| !named);
        let auth =
            match &ecr {
                Some(registry) => match Aws::shared()
                    .registry_credentials(registry, self.metrics.as_ref())
                    .await
                {
                    Ok(Some((user, password))) => RegistryAuth::Basic(user, password),
                    Ok(None) => RegistryAuth::Anonymous,
                    Err(source) => {
                        return Err(RegistryError::Aws {
                            host: host.to_string(),
                            source: Box::new(source),
                        })
                    }
                },
                None => credentials(host, &access).await.map_err(|source| {
                    RegistryError::Credentials {
                        host: host.to_string(),
                        source,
                    }
                })?,
            };
        let ca_error = |source: Box<dyn std::error::Error + Send + Sync>| RegistryError::CaFile {
            host: host.to_string(),
            path: access.ca_file.clone().unwrap_or_default(),
            source,
        };
        let mut roots = Vec::new();
        if let Some(path) = &access.ca_file {
            roots.push(
                tokio::fs::read(path)
                    .await
                    .map_err(|e| ca_error(e.into()))?,
            );
        }
        let wire = wire_host(host).to_string();
        let config = ClientConfig {
            protocol: if plain {
                ClientProtocol::HttpsExcept(vec![wire])
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
            use_monolithic_push: access.upload() == crate::settings::UploadMode::Monolithic,
            platform_resolver: None,
            connect_timeout: Some(timeouts.connect),
            // Every read: headers wait for `response` besides (see `attempts`), a body's next
            // piece for this.
            read_timeout: Some(timeouts.idle),
            user_agent: concat!("image-mirror-webhook/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        };
        // `Client::new` falls back to defaults on a bad config; `try_from` says what was wrong.
        let client = Client::try_from(config).map_err(|e| ca_error(e.into()))?;
        let mut probe = reqwest::Client::builder()
            .danger_accept_invalid_certs(insecure && !plain)
            .connect_timeout(timeouts.connect)
            .timeout(timeouts.connect + timeouts.response);
        for data in &roots {
            for cert in
                reqwest::Certificate::from_pem_bundle(data).map_err(|e| ca_error(e.into()))?
            {
                probe = probe.add_root_certificate(cert);
            }
        }
        let probe = probe.build().map_err(|e| ca_error(e.into()))?;
        Ok(HostClient {
            host: host.to_string(),
            client,
            auth,
            access,
            timeouts,
            insecure,
            plain,
            created: Instant::now(),
            probe,
            ecr,
        })
    }

    /// Runs `op`; when a registry whose token comes from AWS refused it (401/403) and that
    /// token may be renewed now, runs it once more with a new one.
    async fn renewing<T, F, Fut>(&self, hosts: &[&str], mut op: F) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        match op().await {
            Err(e) if e.failure() == Some(Failure::Denied) && self.renew(hosts) => {
                tracing::info!(hosts = ?hosts, "registry refused the ECR token: trying once more with a new one");
                op().await
            }
            other => other,
        }
    }

    /// Marks the AWS tokens of `hosts` for renewal and drops their clients; true when any
    /// will be renewed.
    fn renew(&self, hosts: &[&str]) -> bool {
        let mut renewed = false;
        for host in hosts {
            let ecr = lock(&self.clients).get(*host).and_then(|c| c.ecr.clone());
            if let Some(registry) = ecr {
                if Aws::shared().refused(&registry) {
                    lock(&self.clients).remove(*host);
                    renewed = true;
                }
            }
        }
        renewed
    }

    /// The digest of `reference`'s manifest, by `HEAD` (no retries: checks are on a deadline).
    pub async fn manifest_digest(&self, reference: &Reference) -> Result<String, RegistryError> {
        self.renewing(&[reference.registry()], || async {
            let host = self.client(reference.registry()).await?;
            let oci = to_oci(reference);
            let name = reference.to_string();
            self.attempts(&host, "check", &name, 1, retry::Bound::Response, || {
                host.client.fetch_manifest_digest(&oci, &host.auth)
            })
            .await
        })
        .await
    }

    /// Warms a pull-through cache: one manifest fetch through the cache makes it pull the image.
    pub async fn warm_up(&self, target: &Reference) -> Result<CopyReport, RegistryError> {
        self.renewing(&[target.registry()], || async {
            let host = self.client(target.registry()).await?;
            let oci = to_oci(target);
            let name = target.to_string();
            let (_, digest) = self
                .retry(&host, "warm up", &name, || {
                    host.client
                        .pull_manifest_raw(&oci, &host.auth, &MANIFEST_TYPES)
                })
                .await?;
            Ok(CopyReport {
                digest,
                ..CopyReport::default()
            })
        })
        .await
    }

    /// Copies `source` to `target`: the index, every selected platform, every blob the target
    /// lacks, manifests byte for byte; then the tag; then what points at it (signatures,
    /// attestations, SBOMs, OCI referrers).
    pub async fn copy(
        &self,
        source: &Reference,
        target: &Reference,
        platforms: &[Platform],
        progress: Option<Progress>,
    ) -> Result<CopyReport, RegistryError> {
        self.copy_with(source, target, platforms, progress, true)
            .await
    }

    /// [`Registries::copy`], with or without what points at the image.
    pub async fn copy_with(
        &self,
        source: &Reference,
        target: &Reference,
        platforms: &[Platform],
        progress: Option<Progress>,
        referrers: bool,
    ) -> Result<CopyReport, RegistryError> {
        self.ensure_repository(target).await?;
        self.renewing(&[source.registry(), target.registry()], || async {
            let src = self.client(source.registry()).await?;
            let dst = self.client(target.registry()).await?;
            let job = copy::CopyJob {
                registries: self,
                src,
                dst,
                source: source.clone(),
                target: target.clone(),
                bytes: Arc::new(AtomicU64::new(0)),
                progress: progress.clone(),
                report: Mutex::new(CopyReport::default()),
                blobs_seen: Mutex::new(BTreeSet::new()),
                image_size: AtomicU64::new(0),
                referrers,
            };
            job.run(platforms).await
        })
        .await
    }

    /// ECR has no create-on-push: a mirror with `ecr:` has the target's repository made first.
    async fn ensure_repository(&self, target: &Reference) -> Result<(), RegistryError> {
        let settings = self.settings();
        let host = target.registry();
        let Some(repositories) = settings.ecr_repositories(host) else {
            return Ok(());
        };
        let Some(registry) = ecr_registry(host, settings.access(host)) else {
            return Ok(());
        };
        Aws::shared()
            .ensure_repository(
                &registry,
                target.canonical().path(),
                repositories,
                self.metrics.as_ref(),
            )
            .await
            .map(drop)
            .map_err(|source| RegistryError::Aws {
                host: host.to_string(),
                source: Box::new(source),
            })
    }
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

/// Our reference as oci-client's, Docker Hub canonically spelled (so that requests go to
/// [`wire_host`]); a digest wins over a tag for every request.
fn to_oci(r: &Reference) -> oci_client::Reference {
    let r = r.canonical();
    oci_reference(r.registry(), r.path(), r.tag(), r.digest())
}
