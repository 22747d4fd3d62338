//! What answers requests: the admission router (`/mutate`, `/report`, `/healthz`, `/readyz`),
//! with the body limit and the in-flight budget, and the metrics router. [`crate::app`] binds
//! them to their listeners.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::BytesMut;
use prometheus_client::registry::Registry;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::admission::{Answer, Mode, Webhook};
use crate::locks::lock;

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
