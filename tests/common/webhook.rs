//! Reviews and their answers: fixtures from `tests/data/admission`, the webhook's router driven
//! without a socket, the server over real TLS, and the checks every answer must pass. Every
//! patch is applied to its Pod with a strict RFC 6902 implementation.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use base64::Engine as _;
use image_mirror_webhook::admission::{Mode, Webhook};
use image_mirror_webhook::app::{self, Mirrors, Running, ServeOptions};
use image_mirror_webhook::certs::DevCerts;
use image_mirror_webhook::config::{self, ConfigHandle};
use image_mirror_webhook::metrics::Metrics;
use image_mirror_webhook::mirror::MirrorAccess;
use image_mirror_webhook::patch::ORIGINAL_IMAGES_ANNOTATION;
use image_mirror_webhook::server::{self, Readiness};
use image_mirror_webhook::tls::TlsFiles;
use prometheus_client::registry::Registry as MetricRegistry;
use serde_json::Value;
use tower::ServiceExt as _;

pub const DIGEST: &str = "sha256:86e0e091d0da6bde2456dbb48306f3956bbeb2eae1b5b9a43045843f69fe4aaa";
/// The GHCR mirror of the test table and the embedded one.
pub const MIRROR: &str = "ghcr.io/ameideio/mirror";

pub fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/admission")
        .join(name)
}

pub fn fixture(name: &str) -> Value {
    let path = data(&format!("{name}.json"));
    let text = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every fixture's name, for tests that must cover them all.
pub fn fixture_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data(""))
        .unwrap()
        .filter_map(|e| {
            let path = e.unwrap().path();
            (path.extension()? == "json")
                .then(|| path.file_stem().unwrap().to_string_lossy().to_string())
        })
        .collect();
    names.sort();
    names
}

/// The webhook with the test table and no mirror checks, as a router: no socket.
pub struct App {
    pub router: axum::Router,
    pub metrics: Metrics,
    pub registry: Arc<MetricRegistry>,
}

/// The namespaces the fixtures' cluster has, as the Kubernetes layer's cache would know them.
fn known_namespaces() -> Arc<dyn image_mirror_webhook::admission::webhook::KnownNamespaces> {
    Arc::new(vec!["team-a".to_string(), "kube-system".to_string()])
}

impl App {
    pub fn new() -> App {
        App::with_table(Some(&data("table.yaml")))
    }

    /// `None`: the embedded table.
    pub fn with_table(path: Option<&Path>) -> App {
        let config = config::load(path).expect("table loads");
        let (metrics, registry) = Metrics::new();
        let mut webhook = Webhook::new(ConfigHandle::new(config), metrics.clone());
        webhook.namespaces = Some(known_namespaces());
        let ready = Readiness::default();
        ready.set(true);
        App {
            router: server::router(Arc::new(webhook), ready, Mode::Enforce, Default::default()),
            metrics,
            registry: Arc::new(registry),
        }
    }

    /// The webhook with `table`, asking `mirrors` about presence and for copies.
    pub fn with_mirrors(table: &str, mirrors: Arc<dyn MirrorAccess>) -> App {
        let config = config::Config::parse("table.yaml", table).expect("table loads");
        let (metrics, registry) = Metrics::new();
        let mut webhook = Webhook::new(ConfigHandle::new(config), metrics.clone());
        webhook.mirrors = Some(mirrors);
        webhook.namespaces = Some(known_namespaces());
        let ready = Readiness::default();
        ready.set(true);
        App {
            router: server::router(Arc::new(webhook), ready, Mode::Enforce, Default::default()),
            metrics,
            registry: Arc::new(registry),
        }
    }

    /// Posts `body` to `/mutate`; the status and the body of the answer.
    pub async fn post(&self, body: Vec<u8>) -> (StatusCode, Vec<u8>) {
        self.post_to("/mutate", body).await
    }

    /// Posts `body` to `path` (`/mutate`, `/report`).
    pub async fn post_to(&self, path: &str, body: Vec<u8>) -> (StatusCode, Vec<u8>) {
        let request = Request::post(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap();
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, bytes.to_vec())
    }

    /// Posts a review; returns the answer after the checks every answer must pass.
    pub async fn review(&self, review: &Value) -> Value {
        self.review_at("/mutate", review).await
    }

    /// Posts a review to `path`; the answer after the checks every answer must pass.
    pub async fn review_at(&self, path: &str, review: &Value) -> Value {
        let (status, body) = self
            .post_to(path, serde_json::to_vec(review).unwrap())
            .await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let out: Value = serde_json::from_slice(&body).unwrap();
        check_answer(review, &out);
        out
    }

    pub fn metrics_text(&self) -> String {
        image_mirror_webhook::metrics::encode(&self.registry, false)
            .unwrap()
            .0
    }
}

/// What every answer to `review` must be: the same `apiVersion` and `uid`, allowed, and
/// `patchType` exactly when there is a patch, which is a base64 string.
pub fn check_answer(review: &Value, out: &Value) {
    assert_eq!(out["apiVersion"], review["apiVersion"]);
    assert_eq!(out["kind"], "AdmissionReview");
    let r = &out["response"];
    assert_eq!(r["uid"], review["request"]["uid"]);
    assert_eq!(r["allowed"], true);
    assert_eq!(r.get("patchType").is_some(), r.get("patch").is_some());
    if let Some(p) = r.get("patch") {
        assert_eq!(r["patchType"], "JSONPatch");
        assert!(p.is_string(), "patch must be a base64 string, got {p}");
    }
}

/// The Pod after the answer's patch, applied with a strict RFC 6902 implementation.
pub fn patched(review: &Value, answer: &Value) -> Value {
    let mut pod = review["request"]["object"].clone();
    if let Some(p) = answer["response"]["patch"].as_str() {
        let bytes = base64::engine::general_purpose::STANDARD.decode(p).unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        json_patch::patch(&mut pod, &patch).expect("the patch applies to its Pod");
    }
    pod
}

pub fn decoded_patch(answer: &Value) -> Vec<Value> {
    let p = answer["response"]["patch"].as_str().expect("a patch");
    serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(p).unwrap()).unwrap()
}

pub fn images(pod: &Value, list: &str) -> Vec<String> {
    pod["spec"][list]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| c["image"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

pub fn secrets(pod: &Value) -> Vec<String> {
    pod["spec"]["imagePullSecrets"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| s["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

pub fn original_images(pod: &Value) -> Value {
    let text = pod["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION]
        .as_str()
        .expect("annotation present");
    serde_json::from_str(text).unwrap()
}

pub fn warnings(answer: &Value) -> Vec<String> {
    answer["response"]["warnings"]
        .as_array()
        .map(|a| a.iter().map(|w| w.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// One sample of a Prometheus text scrape (0 when absent), `sample` as `name{labels}`.
pub fn scrape(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// `promtool check metrics` accepts `text` without a word of complaint.
pub fn promtool_check(text: &str) {
    let mut cmd = std::process::Command::new("promtool");
    cmd.args(["check", "metrics"]);
    let out = super::output_with_input(&mut cmd, Some(text))
        .expect("promtool (Debian package prometheus) is installed by scripts/test.sh");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );
}

/// A serving certificate made for the test, and a client CA that trusts it.
pub struct Tls {
    pub dir: tempfile::TempDir,
    pub ca: reqwest::Certificate,
    pub ca_pem: String,
    pub files: TlsFiles,
}

impl Tls {
    pub fn new() -> Tls {
        super::init();
        let dir = tempfile::tempdir().unwrap();
        let certs = DevCerts::generate(&["localhost".to_string()]).unwrap();
        certs.write(dir.path()).unwrap();
        Tls {
            ca: reqwest::Certificate::from_pem(certs.ca_pem.as_bytes()).unwrap(),
            ca_pem: certs.ca_pem.clone(),
            files: TlsFiles {
                cert: dir.path().join("tls.crt"),
                key: dir.path().join("tls.key"),
                client_ca: None,
            },
            dir,
        }
    }

    /// `serve`'s options on loopback with this certificate and `config`.
    pub fn options(&self, config: Option<PathBuf>) -> ServeOptions {
        ServeOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            tls: self.files.clone(),
            config,
            budget: Duration::from_millis(500),
            shutdown_delay: Duration::ZERO,
            drain_timeout: Duration::from_secs(5),
            strict: false,
            kubernetes: image_mirror_webhook::cluster::Access::Off,
            mode: image_mirror_webhook::admission::Mode::Enforce,
            max_in_flight_mib: image_mirror_webhook::server::DEFAULT_IN_FLIGHT_MIB,
            pod_name: None,
            pod_namespace: None,
            instance: "test".to_string(),
        }
    }

    pub async fn start(&self, config: Option<PathBuf>, mirrors: Mirrors) -> Running {
        app::start(self.options(config), mirrors).await.unwrap()
    }

    /// A client that trusts the test CA, speaking HTTP/1.1 or HTTP/2 only.
    pub fn client(&self, version: reqwest::Version) -> reqwest::Client {
        let b = reqwest::Client::builder()
            .tls_backend_rustls()
            .tls_certs_only([self.ca.clone()])
            .timeout(Duration::from_secs(10));
        let b = if version == reqwest::Version::HTTP_2 {
            b.http2_prior_knowledge()
        } else {
            b.http1_only()
        };
        b.build().unwrap()
    }
}

pub fn url(s: &Running, path: &str) -> String {
    format!("https://localhost:{}{path}", s.addr.port())
}

/// Posts a review over the network; the answer after the checks every answer must pass.
pub async fn review_over(
    c: &reqwest::Client,
    s: &Running,
    body: &Value,
    version: reqwest::Version,
) -> Value {
    let resp = c.post(url(s, "/mutate")).json(body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), version);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let out: Value = resp.json().await.unwrap();
    check_answer(body, &out);
    out
}

pub async fn metrics_over(s: &Running) -> String {
    reqwest::get(format!("http://{}/metrics", s.metrics_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

pub async fn wait_for(mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not met within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
