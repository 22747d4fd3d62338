//! Checks and copies against real registries on loopback (Debian's `docker-registry`), read
//! back with `skopeo`; the webhook end to end; registry faults.

#[path = "../common/mod.rs"]
mod common;

mod aws;
mod budget;
mod checks;
mod copies;
mod credentials;
mod on_demand;
mod referrers;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{Fault, FaultProxy, Registry, TestImage};
use image_mirror_webhook::app::{self, Mirrors, Running, ServeOptions};
use image_mirror_webhook::certs::DevCerts;
use image_mirror_webhook::config::Config;
use image_mirror_webhook::error::Report;
use image_mirror_webhook::mapping::Platform;
use image_mirror_webhook::mirror::service::MirrorService;
use image_mirror_webhook::registry::{Failure, Registries, RegistryOptions};
use image_mirror_webhook::settings::Settings;
use image_mirror_webhook::tls::TlsFiles;
use image_mirror_webhook::Reference;
use serde_json::{json, Value};

const MIB: usize = 1024 * 1024;

fn r(s: &str) -> Reference {
    Reference::parse(s).unwrap()
}

/// A table with only `registries:` settings for the given registries.
fn access_table(dir: &Path, registries: &[&Registry]) -> Config {
    // A long check timeout: a check's first TLS handshake on a loaded machine is no failure.
    let mut text = String::from("checks: {timeout: 10s}\nregistries:\n");
    for (i, reg) in registries.iter().enumerate() {
        text.push_str(&reg.table_access(&dir.join(format!("docker-config-{i}.json"))));
    }
    Config::parse("access.yaml", &text).unwrap()
}

/// Registries with the settings of `yaml` (a table file's `registries:` and friends).
fn registries_for(yaml: &str) -> Registries {
    Registries::new(settings(yaml), quick(), None)
}

fn settings(yaml: &str) -> Arc<Settings> {
    Config::parse("t.yaml", yaml).unwrap().settings
}

fn quick() -> RegistryOptions {
    RegistryOptions {
        // Short, so that faults show quickly; not so short that a loaded machine trips them.
        timeouts: Some(image_mirror_webhook::settings::Timeouts {
            connect: Duration::from_secs(2),
            response: Duration::from_secs(5),
            idle: Duration::from_secs(5),
        }),
        attempts: 4,
        backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        max_retry_after: Duration::from_secs(5),
    }
}

/// The index and every platform manifest read back identical on both sides, by an independent
/// tool.
fn assert_same_image(from: &Registry, from_repo: &str, to: &Registry, to_repo: &str, tag: &str) {
    let src = from.skopeo_raw(from_repo, tag).expect("source readable");
    let dst = to.skopeo_raw(to_repo, tag).expect("target readable");
    assert_eq!(src, dst, "index differs");
    let index: serde_json::Value = serde_json::from_slice(&src).unwrap();
    for m in index["manifests"].as_array().unwrap() {
        let digest = m["digest"].as_str().unwrap();
        assert_eq!(
            from.skopeo_raw(from_repo, digest),
            to.skopeo_raw(to_repo, digest),
            "manifest {digest} differs"
        );
    }
}

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_image-mirror-webhook"))
}

/// A registry that accepts connections and never says a word: it holds every socket open.
fn silent_registry() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            held.push(conn);
        }
    });
    addr
}

// ---------------------------------------------------------------------------------------------
// Through the running webhook

struct Webhook {
    running: Running,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// The webhook over TLS with a table sending `upstream/**` to a flattening mirror at
/// `mirror_host`, `if-present` and `on-demand`, and a short budget.
async fn webhook(
    upstream: &Registry,
    mirror_host: &str,
    access: &str,
    budget: Duration,
    checks: &str,
) -> Webhook {
    Setup {
        budget,
        checks,
        ..Setup::new(&upstream.host(), mirror_host, access)
    }
    .start()
    .await
}

/// A test webhook's table and budget: images of `upstream/team/*` to a flattening mirror,
/// `if-present` and `on-demand`, with more settings where a test needs them.
struct Setup<'a> {
    upstream: &'a str,
    mirror: &'a str,
    /// The `registries:` entries.
    access: &'a str,
    budget: Duration,
    /// More `checks:` settings.
    checks: &'a str,
    /// More settings (YAML lines) on the rule.
    rule: &'a str,
    /// More `copies:` settings (", key: value").
    copies: &'a str,
}

impl<'a> Setup<'a> {
    /// A generous budget and check timeout: the tests that use it are about copies and pins,
    /// not deadlines.
    fn new(upstream: &'a str, mirror: &'a str, access: &'a str) -> Self {
        Setup {
            upstream,
            mirror,
            access,
            budget: Duration::from_secs(8),
            checks: "timeout: 5s",
            rule: "",
            copies: "",
        }
    }

    async fn start(self) -> Webhook {
        let Setup {
            upstream: upstream_host,
            mirror: mirror_host,
            access,
            budget,
            checks,
            rule,
            copies,
        } = self;
        common::init();
        let dir = tempfile::tempdir().unwrap();
        let certs = DevCerts::generate(&["localhost".to_string()]).unwrap();
        certs.write(dir.path()).unwrap();
        let table = format!(
            "mirrors:\n  local:\n    type: repository\n    registry: \"{mirror_host}\"\n    prefix: mirror\n    naming: flatten\n    pullSecret: local-pull\n\
             rules:\n  - name: upstream\n    match: [\"{upstream_host}/team/*\"]\n    mirror: local\n    swap: if-present\n    copy: on-demand\n{rule}\
             registries:\n{access}\
             checks: {{presentTtl: 10m, absentTtl: 30s, {checks}}}\n\
             copies: {{concurrency: 2, retryBackoff: 200ms, maxAttempts: 20{copies}}}\n",
        );
        let path = dir.path().join("table.yaml");
        std::fs::write(&path, table).unwrap();
        let opts = ServeOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            tls: TlsFiles {
                cert: dir.path().join("tls.crt"),
                key: dir.path().join("tls.key"),
                client_ca: None,
            },
            config: Some(path),
            budget,
            shutdown_delay: Duration::ZERO,
            drain_timeout: Duration::from_secs(5),
            strict: false,
            kubernetes: image_mirror_webhook::cluster::Access::Off,
            mode: image_mirror_webhook::admission::Mode::Enforce,
            max_in_flight_mib: image_mirror_webhook::server::DEFAULT_IN_FLIGHT_MIB,
            pod_name: None,
            pod_namespace: None,
            instance: "test".to_string(),
        };
        let running = app::start(opts, Mirrors::Registries(quick()))
            .await
            .unwrap();
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(certs.ca_pem.as_bytes()).unwrap()])
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        Webhook {
            running,
            client,
            _dir: dir,
        }
    }
}

/// The fault test's budget: long enough for a check on a loaded 2-core machine, short enough
/// to show that a hanging registry does not hold the answer.
const BUDGET: Duration = Duration::from_secs(2);

fn pod_review(image: &str, dry_run: bool) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/admission/pod_plain.json");
    let mut review: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    review["request"]["object"]["spec"]["containers"] = json!([{"name": "app", "image": image}]);
    review["request"]["dryRun"] = json!(dry_run);
    review
}

impl Webhook {
    /// Posts a review; returns the Pod after the patch, the warnings, and how long it took.
    async fn review(&self, image: &str, dry_run: bool) -> (Value, Vec<String>, Duration) {
        let body = pod_review(image, dry_run);
        let started = Instant::now();
        let res = self
            .client
            .post(format!(
                "https://localhost:{}/mutate",
                self.running.addr.port()
            ))
            .json(&body)
            .send()
            .await
            .unwrap();
        let took = started.elapsed();
        assert_eq!(res.status(), 200);
        let out: Value = res.json().await.unwrap();
        assert_eq!(out["response"]["allowed"], true);
        assert_eq!(out["response"]["uid"], body["request"]["uid"]);
        let mut pod = body["request"]["object"].clone();
        if let Some(p) = out["response"]["patch"].as_str() {
            let bytes = base64::engine::general_purpose::STANDARD.decode(p).unwrap();
            let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
            json_patch::patch(&mut pod, &patch).expect("the patch applies to its Pod");
        }
        let warnings = out["response"]["warnings"]
            .as_array()
            .map(|w| w.iter().map(|s| s.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        (pod, warnings, took)
    }

    fn service(&self) -> &MirrorService {
        self.running.mirror_service.as_deref().unwrap()
    }

    fn metric(&self, name: &str, labels: &str) -> f64 {
        metric(&self.running.registry, name, labels)
    }

    async fn wait_copied(&self) {
        common::until(60, "the copy finished", || {
            (self.service().pending_copies() == 0).then_some(())
        })
        .await;
    }
}

/// One sample of a scrape (0 when absent); `labels` as written inside the braces.
fn metric(registry: &prometheus_client::registry::Registry, name: &str, labels: &str) -> f64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    let key = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{labels}}} ")
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

fn image_of(pod: &Value) -> &str {
    pod["spec"]["containers"][0]["image"].as_str().unwrap()
}

/// `sha256:<hex>` as the tag schemas spell it.
fn schema_tag(digest: &str, suffix: &str) -> String {
    format!("{}{suffix}", digest.replace(':', "-"))
}
