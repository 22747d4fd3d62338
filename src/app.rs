//! `serve` assembled: the table and its reloads, the certificate and its rotation, the mirror
//! service, the Kubernetes layer, both listeners, and the graceful stop. [`crate::server`]
//! holds what answers requests; this module puts the parts together and runs them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::admission::{Mode, Webhook};
use crate::config::{ConfigError, ConfigHandle};
use crate::metrics::Metrics;
use crate::mirror::service::MirrorService;
use crate::mirror::MirrorAccess;
use crate::registry::{Registries, RegistryOptions};
use crate::server::{metrics_router, router, InFlight, Readiness};
use crate::tls::{TlsError, TlsFiles};

/// Why `serve` could not start, or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot watch {path}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("a listener failed")]
    Serve(#[source] std::io::Error),
    #[error("a listener task ended abnormally")]
    Task(#[source] tokio::task::JoinError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
}

impl ServeError {
    /// The label of this error in metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ServeError::Config(e) => e.metric_label(),
            ServeError::Tls(e) => e.metric_label(),
            ServeError::Watch { .. } => "watch",
            ServeError::Listen { .. } => "listen",
            ServeError::Serve(_) | ServeError::Task(_) => "serve",
            ServeError::Cluster(e) => e.metric_label(),
        }
    }
}

/// What `serve` needs; every field has a flag.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub tls: TlsFiles,
    pub config: Option<PathBuf>,
    /// Time budget of one admission review.
    pub budget: Duration,
    /// How long `/readyz` reports unready before connections drain (endpoints must update).
    pub shutdown_delay: Duration,
    /// How long in-flight requests may take to finish once draining.
    pub drain_timeout: Duration,
    /// Refuse Pods instead of admitting them unchanged when the webhook cannot do its job.
    pub strict: bool,
    /// Whether to use the Kubernetes API (pull secrets), when there is a client configuration.
    pub kubernetes: crate::cluster::Access,
    /// What `/mutate` does: patch, or only report.
    pub mode: Mode,
    /// What the reviews in flight may hold in memory, in MiB ([`InFlight`]).
    pub max_in_flight_mib: u32,
    /// This replica's Pod (the downward API's `POD_NAME`): the model of copy Jobs.
    pub pod_name: Option<String>,
    /// Where copy Jobs go: the webhook's namespace (`POD_NAMESPACE`; else the client's).
    pub pod_namespace: Option<String>,
    /// How this replica names itself in the Events it records (the Pod's name, else the host's).
    pub instance: String,
}

/// A server that is up: its addresses, and the means to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub metrics: Metrics,
    pub registry: Arc<Registry>,
    pub config: ConfigHandle,
    /// The checks and copy queue, when `serve` talks to registries itself.
    pub mirror_service: Option<Arc<MirrorService>>,
    ready: Readiness,
    handle: axum_server::Handle<SocketAddr>,
    metrics_stop: Arc<Notify>,
    tasks: Vec<JoinHandle<std::io::Result<()>>>,
    _watchers: Vec<notify::RecommendedWatcher>,
    shutdown_delay: Duration,
    drain_timeout: Duration,
}

/// How the webhook learns whether a mirror has an image.
pub enum Mirrors {
    /// No checks: `if-present` rewrites stay unchanged (`mirror-unknown`).
    Off,
    /// Checks and copies through the registries the table's settings name.
    Registries(RegistryOptions),
    /// Someone else's implementation (tests).
    Custom(Arc<dyn MirrorAccess>),
}

/// Loads the table and the certificate, binds both listeners and starts serving.
pub async fn start(opts: ServeOptions, mirrors: Mirrors) -> Result<Running, ServeError> {
    let path = opts.config.clone();
    let config = tokio::task::spawn_blocking(move || ConfigHandle::open(path.as_deref()))
        .await
        .unwrap_or(Err(ConfigError::Cancelled))?;
    start_with(opts, config, mirrors).await
}

/// [`start`] with the table already opened from `opts.config` (`serve` reads it before it
/// makes any file, so that a broken table leaves nothing behind).
pub async fn start_with(
    opts: ServeOptions,
    config: ConfigHandle,
    mirrors: Mirrors,
) -> Result<Running, ServeError> {
    let (metrics, registry) = Metrics::new();
    let registry = Arc::new(registry);
    let mut watchers = Vec::new();
    let watcher = config
        .watch(metrics.clone())
        .map_err(|source| ServeError::Watch {
            path: opts.config.clone().unwrap_or_default(),
            source,
        })?;
    watchers.extend(watcher);
    let files = opts.tls.clone();
    let tls = tokio::task::spawn_blocking(move || files.load())
        .await
        .unwrap_or(Err(TlsError::Cancelled))?;
    if let Some(t) = tls.not_after {
        metrics.certificate_expiry.set(t);
    }
    let rustls = axum_server::tls_rustls::RustlsConfig::from_config(tls.config);
    let cert_watcher = opts
        .tls
        .watch(rustls.clone(), tls.digest, metrics.clone())
        .map_err(|source| ServeError::Watch {
            path: opts.tls.cert.clone(),
            source,
        })?;
    watchers.push(cert_watcher);

    let mut webhook = Webhook::new(config.clone(), metrics.clone());
    webhook.budget = opts.budget;
    webhook.strict = opts.strict;
    let service = match mirrors {
        Mirrors::Off => None,
        Mirrors::Registries(options) => {
            let settings = config.current().settings.clone();
            // A pull-through prefix without its cache rule fails every Pod sent there: say so
            // at start (it needs AWS, so in the background).
            let (current, m) = (config.current(), metrics.clone());
            if current.table.mirrors().iter().any(|m| m.is_pull_through()) {
                tokio::spawn(async move {
                    for p in
                        crate::aws::cache_rule_problems(&current.table, &current.settings, Some(&m))
                            .await
                    {
                        tracing::warn!(problem = %p, "pull-through cache rules");
                    }
                });
            }
            let registries = Arc::new(Registries::new(settings, options, Some(metrics.clone())));
            Some(Arc::new(MirrorService::start(
                config.clone(),
                registries,
                metrics.clone(),
            )))
        }
        Mirrors::Custom(access) => {
            webhook.mirrors = Some(access);
            None
        }
    };
    if let Some(service) = &service {
        webhook.mirrors = Some(service.clone());
    }
    let ready = Readiness::default();
    match crate::cluster::connect(opts.kubernetes).await? {
        Some(client) => {
            let index = crate::cluster::pull_secrets::start(
                client.clone(),
                config.clone(),
                metrics.clone(),
                opts.instance.clone(),
            );
            let gate = index.clone();
            ready.require(Arc::new(move || gate.ready()));
            webhook.pull_secrets = Some(index);
            let namespaces = crate::cluster::namespaces::NamespaceNames::start(client.clone());
            let gate = namespaces.clone();
            ready.require(Arc::new(move || gate.filled()));
            webhook.namespaces = Some(namespaces);
            if let Some(service) = &service {
                let namespace = opts
                    .pod_namespace
                    .clone()
                    .unwrap_or_else(|| client.default_namespace().to_string());
                let runner = crate::cluster::copy_jobs::JobRunner::start(
                    client.clone(),
                    namespace,
                    opts.pod_name.clone(),
                    opts.config.clone(),
                    vec![opts.tls.cert.clone(), opts.tls.key.clone()],
                    service.ends(),
                );
                service.use_runner(runner);
                let mirrors: Arc<dyn crate::mirror::MirrorAccess> = service.clone();
                match crate::cluster::images::Records::start(
                    client.clone(),
                    config.clone(),
                    metrics.clone(),
                    opts.instance.clone(),
                    mirrors,
                )
                .await
                {
                    Ok(records) => {
                        service.use_records(Arc::new(records));
                        tracing::info!("MirroredImage records in use");
                    }
                    // Everything else works as before; say once what is missing.
                    Err(e) => {
                        tracing::warn!(error = %crate::error::Report(&e), "image records off")
                    }
                }
            }
            tracing::info!("Kubernetes API in use: pull secrets are checked and provisioned");
        }
        None => tracing::info!(
            "no Kubernetes API: pull secrets are injected unchecked and none are provisioned"
        ),
    }

    let listen_error = |addr| move |source| ServeError::Listen { addr, source };
    let listener = std::net::TcpListener::bind(opts.listen).map_err(listen_error(opts.listen))?;
    listener
        .set_nonblocking(true)
        .map_err(listen_error(opts.listen))?;
    let addr = listener.local_addr().map_err(listen_error(opts.listen))?;
    let handle = axum_server::Handle::new();
    let https = axum_server::from_tcp_rustls(listener, rustls)
        .map_err(listen_error(opts.listen))?
        .handle(handle.clone())
        .serve(
            router(
                Arc::new(webhook),
                ready.clone(),
                opts.mode,
                InFlight::new(opts.max_in_flight_mib),
            )
            .into_make_service(),
        );

    let metrics_listener = tokio::net::TcpListener::bind(opts.metrics_listen)
        .await
        .map_err(listen_error(opts.metrics_listen))?;
    let metrics_addr = metrics_listener
        .local_addr()
        .map_err(listen_error(opts.metrics_listen))?;
    let metrics_stop = Arc::new(Notify::new());
    let stop = metrics_stop.clone();
    let plain = axum::serve(
        metrics_listener,
        metrics_router(registry.clone(), ready.clone()),
    )
    .with_graceful_shutdown(async move { stop.notified().await });

    let tasks = vec![
        tokio::spawn(https),
        tokio::spawn(async move { plain.await }),
    ];
    ready.set(true);
    tracing::info!(%addr, %metrics_addr, config = opts.config.as_ref().map_or("<embedded>".to_string(), |p| p.display().to_string()), "serving");
    Ok(Running {
        addr,
        metrics_addr,
        metrics,
        registry,
        config,
        mirror_service: service,
        ready,
        handle,
        metrics_stop,
        tasks,
        _watchers: watchers,
        shutdown_delay: opts.shutdown_delay,
        drain_timeout: opts.drain_timeout,
    })
}

impl Running {
    /// Graceful stop: unready first, then stop accepting and let in-flight requests finish.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        self.ready.set(false);
        tracing::info!(delay = ?self.shutdown_delay, "shutting down: unready, then draining");
        tokio::time::sleep(self.shutdown_delay).await;
        self.handle.graceful_shutdown(Some(self.drain_timeout));
        self.metrics_stop.notify_one();
        for task in self.tasks {
            task.await
                .map_err(ServeError::Task)?
                .map_err(ServeError::Serve)?;
        }
        tracing::info!("stopped");
        Ok(())
    }

    /// Serves until SIGTERM or SIGINT, then shuts down gracefully.
    pub async fn run_until_signal(self) -> Result<(), ServeError> {
        shutdown_signal().await;
        self.shutdown().await
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
