//! The admission server over real TLS on loopback, HTTP/1.1 and HTTP/2, with certificates made
//! for the test. Every patch is applied to its Pod and the result checked.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use image_mirror_webhook::admission::{CopyRequest, MirrorAccess, Presence};
use image_mirror_webhook::certs::DevCerts;
use image_mirror_webhook::patch::ORIGINAL_IMAGES_ANNOTATION;
use image_mirror_webhook::server::{self, Mirrors, Running, ServeOptions};
use image_mirror_webhook::tls::TlsFiles;
use image_mirror_webhook::Reference;
use reqwest::Version;
use serde_json::{json, Value};

const DIGEST: &str = "sha256:86e0e091d0da6bde2456dbb48306f3956bbeb2eae1b5b9a43045843f69fe4aaa";
const MIRROR: &str = "ghcr.io/ameideio/mirror";

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/admission")
        .join(name)
}

fn fixture(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(data(&format!("{name}.json"))).unwrap()).unwrap()
}

struct Harness {
    _dir: tempfile::TempDir,
    ca: reqwest::Certificate,
    tls: TlsFiles,
}

fn harness() -> Harness {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let certs = DevCerts::generate(&["localhost".to_string()]).unwrap();
    certs.write(dir.path()).unwrap();
    Harness {
        ca: reqwest::Certificate::from_pem(certs.ca_pem.as_bytes()).unwrap(),
        tls: TlsFiles {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
        },
        _dir: dir,
    }
}

fn options(tls: &TlsFiles, config: Option<PathBuf>) -> ServeOptions {
    ServeOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        tls: tls.clone(),
        config,
        budget: Duration::from_millis(500),
        shutdown_delay: Duration::ZERO,
        drain_timeout: Duration::from_secs(5),
        strict: false,
    }
}

async fn start(h: &Harness, mirrors: Mirrors) -> Running {
    server::start(options(&h.tls, Some(data("table.yaml"))), mirrors)
        .await
        .unwrap()
}

fn client(h: &Harness, version: Version) -> reqwest::Client {
    let b = reqwest::Client::builder()
        .tls_backend_rustls()
        .tls_certs_only([h.ca.clone()])
        .timeout(Duration::from_secs(10));
    let b = if version == Version::HTTP_2 {
        b.http2_prior_knowledge()
    } else {
        b.http1_only()
    };
    b.build().unwrap()
}

fn url(s: &Running, path: &str) -> String {
    format!("https://localhost:{}{path}", s.addr.port())
}

/// Posts a review and returns the response review, after the checks every answer must pass.
async fn review(c: &reqwest::Client, s: &Running, body: &Value, version: Version) -> Value {
    let resp = c.post(url(s, "/mutate")).json(body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), version);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let out: Value = resp.json().await.unwrap();
    assert_eq!(out["apiVersion"], body["apiVersion"]);
    assert_eq!(out["kind"], "AdmissionReview");
    let r = &out["response"];
    assert_eq!(r["uid"], body["request"]["uid"]);
    assert_eq!(r["allowed"], true);
    // patchType is there exactly when patch is, and the patch is a base64 string.
    assert_eq!(r.get("patchType").is_some(), r.get("patch").is_some());
    if let Some(p) = r.get("patch") {
        assert_eq!(r["patchType"], "JSONPatch");
        assert!(p.is_string(), "patch must be a base64 string, got {p}");
    }
    out
}

/// The Pod after the response's patch, applied with a strict RFC 6902 implementation.
fn patched(request: &Value, response: &Value) -> Value {
    let mut pod = request["request"]["object"].clone();
    if let Some(p) = response["response"]["patch"].as_str() {
        let bytes = base64::engine::general_purpose::STANDARD.decode(p).unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        json_patch::patch(&mut pod, &patch).expect("the patch applies to its Pod");
    }
    pod
}

fn images(pod: &Value, list: &str) -> Vec<String> {
    pod["spec"][list]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| c["image"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn secrets(pod: &Value) -> Vec<String> {
    pod["spec"]["imagePullSecrets"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| s["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn original_images(pod: &Value) -> Value {
    let text = pod["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION]
        .as_str()
        .expect("annotation present");
    serde_json::from_str(text).unwrap()
}

fn warnings(resp: &Value) -> Vec<String> {
    resp["response"]["warnings"]
        .as_array()
        .map(|a| a.iter().map(|w| w.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// Every fixture, its patch applied, with the outcome each case must show.
async fn check_all_fixtures(c: &reqwest::Client, s: &Running, v: Version) {
    let run = |name: &'static str| async move {
        let req = fixture(name);
        let resp = review(c, s, &req, v).await;
        (req.clone(), resp.clone(), patched(&req, &resp))
    };

    let (req, resp, pod) = run("pod_plain").await;
    assert_eq!(
        images(&pod, "containers"),
        [format!("{MIRROR}/docker.io/library/nginx:1.27")]
    );
    assert_eq!(secrets(&pod), ["ghcr-pull"]);
    assert_eq!(original_images(&pod), json!({"web": "nginx:1.27"}));
    assert_eq!(warnings(&resp).len(), 1);
    assert!(warnings(&resp)[0]
        .contains("nginx:1.27 -> ghcr.io/ameideio/mirror/docker.io/library/nginx:1.27"));
    assert_eq!(resp["response"]["auditAnnotations"]["rewrites"], "1");
    // Nothing else in the Pod changed.
    let mut expected = req["request"]["object"].clone();
    expected["spec"]["containers"][0]["image"] = pod["spec"]["containers"][0]["image"].clone();
    expected["spec"]["imagePullSecrets"] = json!([{"name": "ghcr-pull"}]);
    expected["metadata"]["annotations"] = pod["metadata"]["annotations"].clone();
    assert_eq!(pod, expected);

    let (_, _, pod) = run("pod_with_init_containers").await;
    assert_eq!(images(&pod, "containers"), [format!("{MIRROR}/loki:3.5.7")]);
    assert_eq!(
        images(&pod, "initContainers"),
        [
            format!("{MIRROR}/busybox:1.36.1"),
            format!("{MIRROR}/temporalio-admin-tools:1.29.1-tctl")
        ]
    );
    assert_eq!(
        original_images(&pod)["migrate"],
        "temporalio/admin-tools:1.29.1-tctl"
    );

    let (_, _, pod) = run("pod_digest_pinned").await;
    assert_eq!(
        images(&pod, "containers"),
        [format!("{MIRROR}/docker.io/library/nginx@{DIGEST}")]
    );

    let (_, _, pod) = run("pod_tag_and_digest").await;
    assert_eq!(
        images(&pod, "containers"),
        [format!("{MIRROR}/redis:7.2.5@{DIGEST}")]
    );

    let (_, _, pod) = run("pod_with_existing_pull_secrets").await;
    assert_eq!(secrets(&pod), ["team-registry", "ghcr-pull"]);

    let (_, resp, pod) = run("pod_with_mirror_pull_secret").await;
    assert_eq!(secrets(&pod), ["team-registry", "ghcr-pull"]);
    let ops = decoded_patch(&resp);
    assert!(
        !ops.iter().any(|o| o["path"] == "/spec/imagePullSecrets"),
        "no secret op when present: {ops:?}"
    );

    let (_, resp, pod) = run("pod_with_escaped_annotation_keys").await;
    assert_eq!(
        pod["metadata"]["annotations"]["example.com/owner"],
        "team-a"
    );
    assert_eq!(pod["metadata"]["annotations"]["odd~key/with~1slash"], "x");
    assert!(decoded_patch(&resp)
        .iter()
        .any(|o| o["path"] == "/metadata/annotations/image-mirror~1original-images"));

    for unchanged in [
        "pod_image_already_on_mirror",
        "pod_opted_out",
        "pod_in_excluded_namespace",
        "deployment_create",
        "pod_update",
        "pod_without_containers",
        "pod_without_spec",
    ] {
        let (req, resp, pod) = run(unchanged).await;
        assert!(
            resp["response"].get("patch").is_none(),
            "{unchanged}: {resp}"
        );
        assert_eq!(pod, req["request"]["object"], "{unchanged}");
    }

    let (_, resp, pod) = run("pod_unparsable_image").await;
    assert_eq!(
        images(&pod, "containers"),
        [
            format!("{MIRROR}/docker.io/library/nginx:1.27"),
            "Docker/Docker:LATEST!".to_string()
        ]
    );
    assert!(warnings(&resp)
        .iter()
        .any(|w| w.contains("\"Docker/Docker:LATEST!\" left unchanged")));

    let (_, _, pod) = run("pod_with_null_containers").await;
    assert_eq!(pod["spec"]["containers"], Value::Null);
    assert_eq!(
        pod["spec"]["initContainers"][2]["image"],
        format!("{MIRROR}/busybox:1.36.1")
    );

    let (_, _, pod) = run("ephemeral_container_update").await;
    // Only the container this update adds; the existing one cannot change.
    assert_eq!(
        images(&pod, "ephemeralContainers"),
        [
            "busybox:1.36".to_string(),
            format!("{MIRROR}/docker.io/library/busybox:1.36")
        ]
    );
    assert_eq!(
        images(&pod, "containers"),
        [format!("{MIRROR}/docker.io/library/nginx:1.27")]
    );

    let (_, resp, pod) = run("pod_dry_run").await;
    assert_eq!(
        images(&pod, "containers"),
        [format!("{MIRROR}/docker.io/library/nginx:1.27")]
    );
    assert!(resp["response"]["patch"].is_string());

    let (_, _, pod) = run("pod_many_containers").await;
    let imgs = images(&pod, "containers");
    assert_eq!(imgs.len(), 300);
    assert!(imgs.iter().all(|i| i.starts_with(MIRROR)));
    assert_eq!(secrets(&pod), ["ghcr-pull"]);
}

fn decoded_patch(resp: &Value) -> Vec<Value> {
    let p = resp["response"]["patch"].as_str().unwrap();
    serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(p).unwrap()).unwrap()
}

fn scrape(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is installed by scripts/test.sh");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixtures_over_http1_and_http2_then_metrics() {
    let h = harness();
    let s = start(&h, Mirrors::Off).await;
    for v in [Version::HTTP_11, Version::HTTP_2] {
        check_all_fixtures(&client(&h, v), &s, v).await;
    }

    let text = reqwest::get(format!("http://{}/metrics", s.metrics_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    promtool_check(&text);
    // Per protocol: 11 patched CREATEs and 1 patched ephemeral UPDATE.
    assert_eq!(
        scrape(
            &text,
            "image_mirror_admission_requests_total{operation=\"CREATE\",result=\"patched\"}"
        ),
        22.0
    );
    assert_eq!(
        scrape(
            &text,
            "image_mirror_admission_requests_total{operation=\"UPDATE\",result=\"patched\"}"
        ),
        2.0
    );
    assert_eq!(
        scrape(&text, "image_mirror_skips_total{reason=\"pod-opted-out\"}"),
        2.0
    );
    assert_eq!(
        scrape(
            &text,
            "image_mirror_skips_total{reason=\"namespace-excluded\"}"
        ),
        2.0
    );
    assert_eq!(
        scrape(
            &text,
            "image_mirror_skips_total{reason=\"already-mirrored\"}"
        ),
        2.0
    );
    assert_eq!(scrape(&text, "image_mirror_unparsable_images_total"), 2.0);
    assert!(scrape(&text, "image_mirror_rewrites_total{namespace=\"team-a\",source_registry=\"docker.io\",mirror=\"ghcr\"}") >= 300.0);
    assert_eq!(
        scrape(
            &text,
            "image_mirror_pull_secrets_injected_total{secret=\"ghcr-pull\"}"
        ),
        22.0
    );
    assert!(scrape(&text, "image_mirror_certificate_expiry_timestamp_seconds") > 1.7e9);
    assert_eq!(
        scrape(&text, "image_mirror_build_info{version=\"0.1.0\"}"),
        1.0
    );
    // OpenMetrics when the scraper asks for it.
    let om = reqwest::Client::new()
        .get(format!("http://{}/metrics", s.metrics_addr))
        .header("accept", "application/openmetrics-text; version=1.0.0")
        .send()
        .await
        .unwrap();
    assert!(om.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    assert!(om.text().await.unwrap().ends_with("# EOF\n"));
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_get_400_and_413() {
    let h = harness();
    let s = start(&h, Mirrors::Off).await;
    for v in [Version::HTTP_11, Version::HTTP_2] {
        let c = client(&h, v);
        for body in [
            "{not json",
            "[]",
            r#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1"}"#,
            r#"{"kind":"Pod"}"#,
        ] {
            let resp = c.post(url(&s, "/mutate")).body(body).send().await.unwrap();
            assert_eq!(resp.status(), 400, "{body}");
            let text = resp.text().await.unwrap();
            assert!(
                !text.trim().is_empty() && !text.trim().contains('\n'),
                "one line: {text:?}"
            );
        }
        let mut big = fixture("pod_plain");
        big["request"]["object"]["metadata"]["annotations"] =
            json!({"padding": "x".repeat(4 * 1024 * 1024)});
        let resp = c.post(url(&s, "/mutate")).json(&big).send().await.unwrap();
        assert_eq!(resp.status(), 413);
        // After a 413 the server closes that connection; health is asked on a fresh one.
        let fresh = client(&h, v);
        for path in ["/healthz", "/readyz"] {
            assert_eq!(fresh.get(url(&s, path)).send().await.unwrap().status(), 200);
        }
    }
    for path in ["/healthz", "/readyz"] {
        let r = reqwest::get(format!("http://{}{path}", s.metrics_addr))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    s.shutdown().await.unwrap();
}

/// A mirror that never answers, as a registry that accepts and then hangs would.
struct SilentMirror;
impl MirrorAccess for SilentMirror {
    fn presence<'a>(
        &'a self,
        _target: &'a Reference,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Presence> + Send + 'a>> {
        Box::pin(std::future::pending())
    }
    fn request_copy(&self, _copy: CopyRequest) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_mirror_cannot_hold_a_pod_past_the_budget() {
    let h = harness();
    // The embedded table: nginx goes to the mirror only if present; redis:7.2.5 always.
    let s = server::start(
        options(&h.tls, None),
        Mirrors::Custom(Arc::new(SilentMirror)),
    )
    .await
    .unwrap();
    let c = client(&h, Version::HTTP_2);
    let req = fixture("pod_three_containers");
    let started = Instant::now();
    let resp = review(&c, &s, &req, Version::HTTP_2).await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    let pod = patched(&req, &resp);
    assert_eq!(
        images(&pod, "containers"),
        [
            "nginx:1.27".to_string(),
            format!("{MIRROR}/redis:7.2.5"),
            format!("{MIRROR}/k8s-sidecar:1.30.10")
        ]
    );
    let text = reqwest::get(format!("http://{}/metrics", s.metrics_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        scrape(&text, "image_mirror_skips_total{reason=\"mirror-unknown\"}"),
        1.0
    );
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_refuses_what_it_cannot_vouch_for() {
    let h = harness();
    let mut opts = options(&h.tls, None);
    opts.strict = true;
    let s = server::start(opts, Mirrors::Custom(Arc::new(SilentMirror)))
        .await
        .unwrap();
    let c = client(&h, Version::HTTP_2);
    let post = |body: Value| {
        let c = c.clone();
        let url = url(&s, "/mutate");
        async move {
            let resp = c.post(url).json(&body).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let out: Value = resp.json().await.unwrap();
            assert_eq!(out["response"]["uid"], body["request"]["uid"]);
            assert_eq!(out["apiVersion"], body["apiVersion"]);
            out["response"].clone()
        }
    };

    // nginx:1.27 goes to the mirror only if present, and the mirror never answers.
    let started = Instant::now();
    let r = post(fixture("pod_three_containers")).await;
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(r["allowed"], false);
    assert!(r.get("patch").is_none() && r.get("patchType").is_none());
    assert_eq!(r["status"]["code"], 403);
    let message = r["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("could not tell whether the mirror has 1 image"),
        "{message}"
    );

    let r = post(fixture("pod_unparsable_image")).await;
    assert_eq!(r["allowed"], false);
    let message = r["status"]["message"].as_str().unwrap();
    assert!(message.contains("not valid references"), "{message}");

    // Images the table vouches for (exact entries: always) are rewritten as usual.
    let mut req = fixture("pod_plain");
    req["request"]["object"]["spec"]["containers"] =
        json!([{"name": "cache", "image": "redis:7.2.5"}]);
    let r = post(req.clone()).await;
    assert_eq!(r["allowed"], true);
    let pod = patched(&req, &json!({ "response": r }));
    assert_eq!(
        images(&pod, "containers"),
        [format!("{MIRROR}/redis:7.2.5")]
    );

    let text = reqwest::get(format!("http://{}/metrics", s.metrics_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        scrape(
            &text,
            "image_mirror_admission_requests_total{operation=\"CREATE\",result=\"refused\"}"
        ),
        2.0
    );
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_reload_keeps_the_last_good_table() {
    let h = harness();
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("table.yaml");
    std::fs::copy(data("table.yaml"), &table).unwrap();
    let s = server::start(options(&h.tls, Some(table.clone())), Mirrors::Off)
        .await
        .unwrap();
    let c = client(&h, Version::HTTP_11);
    let before = patched(
        &fixture("pod_plain"),
        &review(&c, &s, &fixture("pod_plain"), Version::HTTP_11).await,
    );
    assert!(images(&before, "containers")[0].starts_with(MIRROR));

    std::fs::write(&table, "mirrors: {bogus\n").unwrap();
    wait_for(|| {
        s.metrics
            .config_reloads
            .get_or_create(&res("failure"))
            .get()
            >= 1
    })
    .await;
    let still = patched(
        &fixture("pod_plain"),
        &review(&c, &s, &fixture("pod_plain"), Version::HTTP_11).await,
    );
    assert_eq!(still, before);

    std::fs::write(&table, "namespaces: {exclude: [team-a]}\n").unwrap();
    wait_for(|| {
        s.metrics
            .config_reloads
            .get_or_create(&res("success"))
            .get()
            >= 1
    })
    .await;
    let resp = review(&c, &s, &fixture("pod_plain"), Version::HTTP_11).await;
    assert!(resp["response"].get("patch").is_none());
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_without_dropping_connections() {
    let h = harness();
    let s = start(&h, Mirrors::Off).await;
    let c = client(&h, Version::HTTP_2);
    review(&c, &s, &fixture("pod_plain"), Version::HTTP_2).await;
    let first_expiry = s.metrics.certificate_expiry.get();

    // An unreadable rotation keeps the old certificate.
    std::fs::write(&h.tls.cert, "garbage").unwrap();
    wait_for(|| {
        s.metrics
            .certificate_reloads
            .get_or_create(&res("failure"))
            .get()
            >= 1
    })
    .await;
    review(&c, &s, &fixture("pod_plain"), Version::HTTP_2).await;

    // A new certificate from another CA: new connections get it, the open one keeps working.
    let next = DevCerts::generate(&["localhost".to_string()]).unwrap();
    std::fs::write(&h.tls.key, &next.key_pem).unwrap();
    std::fs::write(&h.tls.cert, &next.cert_pem).unwrap();
    wait_for(|| {
        s.metrics
            .certificate_reloads
            .get_or_create(&res("success"))
            .get()
            >= 1
    })
    .await;
    review(&c, &s, &fixture("pod_plain"), Version::HTTP_2).await;
    let fresh_old_ca = client(&h, Version::HTTP_11);
    assert!(
        fresh_old_ca.get(url(&s, "/healthz")).send().await.is_err(),
        "old CA must not verify the new certificate"
    );
    let new_ca = reqwest::Client::builder()
        .tls_backend_rustls()
        .tls_certs_only([reqwest::Certificate::from_pem(next.ca_pem.as_bytes()).unwrap()])
        .build()
        .unwrap();
    assert_eq!(
        new_ca
            .get(url(&s, "/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(s.metrics.certificate_expiry.get() >= first_expiry);
    s.shutdown().await.unwrap();
}

fn res(result: &'static str) -> image_mirror_webhook::metrics::ResultLabels {
    image_mirror_webhook::metrics::ResultLabels { result }
}

async fn wait_for(mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "condition not met within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM to the real binary while slow uploads are in flight: every one is answered, /readyz
/// turns unready first, and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let h = harness();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_image-mirror-webhook"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .args(["--shutdown-delay", "700ms", "--drain-timeout", "10s"])
        .arg("--tls-cert")
        .arg(&h.tls.cert)
        .arg("--tls-key")
        .arg(&h.tls.key)
        .arg("--config")
        .arg(data("table.yaml"))
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (addr, metrics_addr) = loop {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("server starts")
            .unwrap()
            .expect("log line");
        let v: Value = serde_json::from_str(&line).unwrap_or_default();
        if v["message"] == "serving" {
            break (
                v["addr"].as_str().unwrap().to_string(),
                v["metrics_addr"].as_str().unwrap().to_string(),
            );
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let port = addr.rsplit(':').next().unwrap().to_string();

    let body = serde_json::to_vec(&fixture("pod_plain")).unwrap();
    let mut inflight = Vec::new();
    for i in 0..8 {
        let c = client(
            &h,
            if i % 2 == 0 {
                Version::HTTP_11
            } else {
                Version::HTTP_2
            },
        );
        let body = body.clone();
        let url = format!("https://localhost:{port}/mutate");
        inflight.push(tokio::spawn(async move {
            // The body trickles in over ~1.5 s, so the request is in flight across SIGTERM.
            let chunks: Vec<Vec<u8>> = body
                .chunks(body.len() / 5 + 1)
                .map(<[u8]>::to_vec)
                .collect();
            let stream = futures::stream::iter(chunks).then(|chunk| async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok::<_, std::io::Error>(chunk)
            });
            let resp = c
                .post(url)
                .header("content-type", "application/json")
                .body(reqwest::Body::wrap_stream(stream))
                .send()
                .await
                .expect("in-flight request answered");
            (resp.status(), resp.json::<Value>().await.unwrap())
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ready = reqwest::get(format!("http://{metrics_addr}/readyz"))
        .await
        .unwrap()
        .status();
    assert_eq!(ready, 503, "unready while draining");

    for task in inflight {
        let (status, out) = task.await.unwrap();
        assert_eq!(status, 200);
        assert!(out["response"]["patch"].is_string());
    }
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

use futures::StreamExt as _;
