//! An HTTP proxy in front of a plain-HTTP registry that adds Docker Hub's rate-limit headers
//! (`ratelimit-limit: L;w=W`, `ratelimit-remaining: R;w=W`) to every answer, with a remaining
//! count the test sets.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;

struct Shared {
    upstream: SocketAddr,
    /// The proxy's own address, for the registry's `Location`s.
    addr: SocketAddr,
    client: reqwest::Client,
    limit: u64,
    window_secs: u64,
    remaining: AtomicU64,
    heads: AtomicU64,
}

#[derive(Clone)]
pub struct RateLimitProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl RateLimitProxy {
    pub async fn start(upstream: SocketAddr, limit: u64, window_secs: u64) -> RateLimitProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream,
            addr,
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            limit,
            window_secs,
            remaining: AtomicU64::new(limit),
            heads: AtomicU64::new(0),
        });
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        RateLimitProxy { addr, shared }
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn set_remaining(&self, n: u64) {
        self.shared.remaining.store(n, Ordering::SeqCst);
    }

    /// Manifest `HEAD`s seen (what reading the budget costs).
    pub fn manifest_heads(&self) -> u64 {
        self.shared.heads.load(Ordering::SeqCst)
    }
}

async fn forward(State(s): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    if parts.method == axum::http::Method::HEAD && path.contains("/manifests/") {
        s.heads.fetch_add(1, Ordering::SeqCst);
    }
    let Ok(body) = axum::body::to_bytes(body, 1 << 30).await else {
        return status(StatusCode::BAD_REQUEST);
    };
    let mut out = s
        .client
        .request(parts.method.clone(), format!("http://{}{path}", s.upstream))
        .body(body);
    for (name, value) in &parts.headers {
        if name != "host" && name != "content-length" {
            out = out.header(name, value);
        }
    }
    // The registry writes `Location`s for the host it was asked as.
    out = out
        .header("x-forwarded-host", s.addr.to_string())
        .header("x-forwarded-proto", "http");
    let Ok(answer) = out.send().await else {
        return status(StatusCode::BAD_GATEWAY);
    };
    let mut response = Response::builder().status(answer.status().as_u16());
    for (name, value) in answer.headers() {
        if name != "transfer-encoding" {
            response = response.header(name, value);
        }
    }
    let w = s.window_secs;
    let remaining = s.remaining.load(Ordering::SeqCst);
    for (name, value) in [
        ("ratelimit-limit", format!("{};w={w}", s.limit)),
        ("ratelimit-remaining", format!("{remaining};w={w}")),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            response = response.header(HeaderName::from_static(name), v);
        }
    }
    let bytes = answer.bytes().await.unwrap_or_default();
    response
        .body(Body::from(bytes))
        .unwrap_or_else(|_| status(StatusCode::BAD_GATEWAY))
}

fn status(code: StatusCode) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = code;
    r
}
