//! The HTTPS admission listener and the plain-HTTP metrics listener.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::BytesMut;
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::admission::{Answer, Mode, Webhook};
use crate::config::{ConfigError, ConfigHandle};
use crate::locks::lock;
use crate::metrics::Metrics;
use crate::mirror::service::MirrorService;
use crate::mirror::MirrorAccess;
use crate::registry::{Registries, RegistryOptions};
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

/// Request bodies above this are refused with 413 (a Pod review is far below it).
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
/// A body over the limit is still read (and dropped) up to this much, so that the client gets
/// its 413 and can use the connection again; past it the connection is closed.
const DRAIN_BYTES: usize = 64 * 1024 * 1024;
/// Where the admission endpoint listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";
/// Where `/metrics` listens unless told otherwise.
pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:9090";
/// The admission path the MutatingWebhookConfiguration calls (in the `serve --mode`).
pub const MUTATE_PATH: &str = "/mutate";
/// The path of the report-only webhook (namespaces labelled `image-mirror/inject=report`).
pub const REPORT_PATH: &str = "/report";

/// Something readiness waits for besides the listeners (the Kubernetes caches).
pub type Gate = Arc<dyn Fn() -> bool + Send + Sync>;

/// Readiness, shared by both listeners: false until serving and every gate is open, false
/// again once draining.
#[derive(Clone, Default)]
pub struct Readiness {
    serving: Arc<AtomicBool>,
    gates: Arc<std::sync::Mutex<Vec<Gate>>>,
}

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.serving.store(ready, Ordering::SeqCst);
    }
    /// Makes readiness wait for `gate` too.
    pub fn require(&self, gate: Gate) {
        lock(&self.gates).push(gate);
    }
    pub fn get(&self) -> bool {
        self.serving.load(Ordering::SeqCst) && lock(&self.gates).iter().all(|g| g())
    }
}

/// What the reviews in flight may hold in memory, in all: their bodies and what reading them
/// keeps. Past it a review is answered at once with 429 (the API server then admits the Pod as
/// its `failurePolicy` says), so that any caller's flood of large bodies cannot grow the
/// webhook past its memory limit: an OOM-killed webhook lets every Pod through unchanged.
/// Half the budget is kept for ordinary reviews, so that a flood of large ones cannot starve
/// them.
#[derive(Clone)]
pub struct InFlight {
    /// One permit per KiB, for reviews of at most [`SMALL_KIB`].
    small: Arc<Semaphore>,
    /// One permit per KiB, for larger ones.
    large: Arc<Semaphore>,
    total_kib: u32,
}

/// The default of `--max-in-flight-mib`.
pub const DEFAULT_IN_FLIGHT_MIB: u32 = 32;
/// What one review holds at least besides its body (the response, the task), in KiB.
const REVIEW_KIB: u32 = 16;
/// The weight of an ordinary review at most (a body of about 500 KiB; Pods are a few KiB).
const SMALL_KIB: u32 = 1024;

/// What one review holds of the [`InFlight`] budget.
#[derive(Default)]
struct Held {
    permit: Option<OwnedSemaphorePermit>,
    large: bool,
}

impl InFlight {
    pub fn new(mib: u32) -> InFlight {
        let total_kib = mib.saturating_mul(1024).max(2 * SMALL_KIB);
        let small = total_kib / 2;
        InFlight {
            small: Arc::new(Semaphore::new(small as usize)),
            large: Arc::new(Semaphore::new((total_kib - small) as usize)),
            total_kib,
        }
    }

    /// KiB held for a body of `bytes`: the body, and as much again for what reading it keeps.
    fn weight(bytes: usize) -> u32 {
        let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        kib.saturating_mul(2).saturating_add(REVIEW_KIB)
    }

    /// Makes `held` hold `kib` (moving it to the large pool once it outgrows the small one);
    /// `false` when the budget is spent.
    fn grow(&self, held: &mut Held, kib: u32) -> bool {
        let large = held.large || kib > SMALL_KIB;
        if large && !held.large {
            *held = Held {
                permit: None,
                large: true,
            };
        }
        let have = held.permit.as_ref().map_or(0, |p| p.num_permits() as u32);
        if kib <= have {
            return true;
        }
        let pool = if large { &self.large } else { &self.small };
        match pool.clone().try_acquire_many_owned(kib - have) {
            Ok(more) => {
                match &mut held.permit {
                    Some(p) => p.merge(more),
                    None => held.permit = Some(more),
                }
                true
            }
            Err(_) => false,
        }
    }
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight::new(DEFAULT_IN_FLIGHT_MIB)
    }
}

#[derive(Clone)]
struct AppState {
    webhook: Arc<Webhook>,
    ready: Readiness,
    /// What `/mutate` does (`/report` always reports).
    mode: Mode,
    in_flight: InFlight,
}

/// The admission router: `/mutate`, `/healthz`, `/readyz`. Exposed so tests can drive the HTTP
/// surface without a socket.
pub fn router(webhook: Arc<Webhook>, ready: Readiness, mode: Mode, in_flight: InFlight) -> Router {
    Router::new()
        .route(MUTATE_PATH, post(mutate))
        .route(REPORT_PATH, post(report))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        // `mutate` applies the limit itself (axum's refuses without reading the body, and the
        // client, still sending, sees the connection cut instead of the status).
        .layer(DefaultBodyLimit::disable())
        .with_state(AppState {
            webhook,
            ready,
            mode,
            in_flight,
        })
}

/// Why a request body was not read.
enum BodyError {
    TooLarge,
    Broken,
    /// The reviews in flight hold the whole [`InFlight`] budget.
    Overloaded,
}

/// The body when it is at most `limit` bytes and the in-flight budget holds it (`held` grows
/// with it). A body that is too long, or that the budget cannot hold, is drained up to
/// [`DRAIN_BYTES`] without being kept, so that the client reads its answer and keeps the
/// connection (an HTTP/1.1 client still sending sees a reset instead).
async fn read_body(
    body: Body,
    limit: usize,
    declared: Option<usize>,
    in_flight: &InFlight,
    held: &mut Held,
) -> Result<Bytes, BodyError> {
    use futures::StreamExt as _;
    let mut stream = body.into_data_stream();
    // Sized once when the length is declared (no doubling while it grows).
    let expected = declared.filter(|n| *n <= limit).unwrap_or(0);
    let mut refused =
        (!in_flight.grow(held, InFlight::weight(expected))).then_some(BodyError::Overloaded);
    let mut buf = BytesMut::with_capacity(if refused.is_none() { expected } else { 0 });
    let mut seen = 0usize;
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|_| BodyError::Broken)?;
        seen = seen.saturating_add(piece.len());
        if seen > DRAIN_BYTES {
            return Err(refused.unwrap_or(BodyError::TooLarge));
        }
        if refused.is_some() {
            continue;
        }
        if seen > limit {
            refused = Some(BodyError::TooLarge);
        } else if !in_flight.grow(held, InFlight::weight(seen)) {
            refused = Some(BodyError::Overloaded);
        }
        match refused {
            Some(_) => {
                *held = Held::default();
                buf = BytesMut::new();
            }
            None => buf.extend_from_slice(&piece),
        }
    }
    match refused {
        Some(e) => Err(e),
        None => Ok(buf.freeze()),
    }
}

async fn mutate(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let mode = state.mode;
    answer(state, headers, body, mode).await
}

async fn report(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    answer(state, headers, body, Mode::Report).await
}

async fn answer(state: AppState, headers: HeaderMap, body: Body, mode: Mode) -> Response {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let too_large = || {
        let text = format!("request body larger than {} MiB", MAX_BODY_BYTES >> 20);
        (StatusCode::PAYLOAD_TOO_LARGE, text).into_response()
    };
    if declared.is_some_and(|n| n > DRAIN_BYTES) {
        return too_large();
    }
    // Held until the answer is written: the body, the parsed review and the response.
    let mut held = Held::default();
    let read = read_body(body, MAX_BODY_BYTES, declared, &state.in_flight, &mut held).await;
    let body = match read {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return too_large(),
        Err(BodyError::Broken) => {
            return (StatusCode::BAD_REQUEST, "request body could not be read").into_response()
        }
        Err(BodyError::Overloaded) => {
            drop(held);
            state.webhook.count_overloaded();
            let text = format!(
                "too many reviews in flight (their bodies hold the {} MiB of --max-in-flight-mib); \
                 try again",
                state.in_flight.total_kib / 1024
            );
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, "1")],
                text,
            )
                .into_response();
        }
    };
    let answer = state.webhook.review(&body, mode).await;
    drop(body);
    let response = match answer {
        Answer::Review(json) => {
            ([(header::CONTENT_TYPE, "application/json")], json).into_response()
        }
        Answer::BadRequest(reason) => (StatusCode::BAD_REQUEST, reason).into_response(),
    };
    drop(held);
    response
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> Response {
    ready_answer(&state.ready)
}

fn ready_answer(ready: &Readiness) -> Response {
    if ready.get() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

#[derive(Clone)]
struct MetricsState {
    registry: Arc<Registry>,
    ready: Readiness,
}

/// The metrics router: `/metrics` (Prometheus text, or OpenMetrics when asked), `/healthz`,
/// `/readyz`.
pub fn metrics_router(registry: Arc<Registry>, ready: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(healthz))
        .route(
            "/readyz",
            get(|State(s): State<MetricsState>| async move { ready_answer(&s.ready) }),
        )
        .with_state(MetricsState { registry, ready })
}

async fn scrape(State(state): State<MetricsState>, headers: HeaderMap) -> Response {
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    match crate::metrics::encode(&state.registry, openmetrics) {
        Ok((body, content_type)) => ([(header::CONTENT_TYPE, content_type)], body).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics").into_response(),
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
            let instance = std::env::var("POD_NAME")
                .or_else(|_| std::env::var("HOSTNAME"))
                .unwrap_or_else(|_| "image-mirror-webhook".to_string());
            let index = crate::cluster::pull_secrets::start(
                client.clone(),
                config.clone(),
                metrics.clone(),
                instance,
            );
            let gate = index.clone();
            ready.require(Arc::new(move || gate.ready()));
            webhook.pull_secrets = Some(index);
            let namespaces = crate::cluster::namespaces::NamespaceNames::start(client.clone());
            let gate = namespaces.clone();
            ready.require(Arc::new(move || gate.filled()));
            webhook.namespaces = Some(namespaces);
            if let Some(service) = &service {
                let namespace = std::env::var("POD_NAMESPACE")
                    .unwrap_or_else(|_| client.default_namespace().to_string());
                let runner = crate::cluster::copy_jobs::JobRunner::start(
                    client.clone(),
                    namespace,
                    std::env::var("POD_NAME").ok(),
                    opts.config.clone(),
                    vec![opts.tls.cert.clone(), opts.tls.key.clone()],
                    service.ends(),
                );
                service.use_runner(runner);
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
