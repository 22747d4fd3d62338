//! The admission server over real TLS on loopback, HTTP/1.1 and HTTP/2, with certificates made
//! for the test: what needs a socket (protocols, body limits on the wire, budgets, reloads,
//! certificate rotation, SIGTERM). The fixtures themselves are checked in `tests/admission.rs`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use image_mirror_webhook::app::{self, Mirrors};
use image_mirror_webhook::certs::DevCerts;
use image_mirror_webhook::mirror::{CopyRequest, MirrorAccess, Presence};
use image_mirror_webhook::Reference;
use reqwest::Version;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reviews_over_http1_and_http2_answer_as_the_router_does() {
    let tls = Tls::new();
    let s = tls.start(Some(data("table.yaml")), Mirrors::Off).await;
    let app = App::new();
    for name in [
        "pod_plain",
        "pod_three_containers",
        "ephemeral_container_update",
        "pod_update",
    ] {
        let req = fixture(name);
        let direct = app.review(&req).await;
        for v in [Version::HTTP_11, Version::HTTP_2] {
            let over = review_over(&tls.client(v), &s, &req, v).await;
            assert_eq!(over, direct, "{name} over {v:?}");
        }
    }
    let text = metrics_over(&s).await;
    promtool_check(&text);
    assert_eq!(
        scrape(
            &text,
            "image_mirror_admission_requests_total{operation=\"CREATE\",result=\"patched\"}"
        ),
        4.0
    );
    assert!(scrape(&text, "image_mirror_certificate_expiry_timestamp_seconds") > 1.7e9);
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
async fn bad_bodies_get_400_and_413_on_both_protocols_and_the_connection_stays_usable() {
    let tls = Tls::new();
    let s = tls.start(Some(data("table.yaml")), Mirrors::Off).await;
    for v in [Version::HTTP_11, Version::HTTP_2] {
        let c = tls.client(v);
        let resp = c
            .post(url(&s, "/mutate"))
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
    }
    // curl, as an independent client, says whether the second request reused the connection.
    let big = tls.dir.path().join("big.json");
    let mut review = fixture("pod_plain");
    review["request"]["object"]["metadata"]["annotations"] =
        json!({"padding": "x".repeat(4 * 1024 * 1024)});
    std::fs::write(&big, serde_json::to_vec(&review).unwrap()).unwrap();
    let ca = tls.dir.path().join("ca.crt");
    std::fs::write(&ca, &tls.ca_pem).unwrap();
    for protocol in ["--http1.1", "--http2"] {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", protocol, "--cacert"])
            .arg(&ca)
            .args(["-o", "/dev/null", "-w", "%{http_code} %{num_connects}\\n"])
            .args(["-H", "content-type: application/json", "--data-binary"])
            .arg(format!("@{}", big.display()))
            .arg(url(&s, "/mutate"))
            .args(["--next", "-sS", protocol, "--cacert"])
            .arg(&ca)
            .args(["-o", "/dev/null", "-w", "%{http_code} %{num_connects}\\n"])
            .arg(url(&s, "/healthz"))
            .output()
            .await
            .expect("curl runs");
        let said = String::from_utf8_lossy(&out.stdout);
        // 413 on a new connection, then 200 on the same one (no new connect).
        assert_eq!(
            said,
            "413 1\n200 0\n",
            "{protocol}: {said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
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
    fn request_copy(&self, _copy: CopyRequest) -> bool {
        false
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_mirror_cannot_hold_a_pod_past_the_budget() {
    let tls = Tls::new();
    // The embedded table: nginx goes to the mirror only if present; redis:7.2.5 always.
    let s = tls
        .start(None, Mirrors::Custom(Arc::new(SilentMirror)))
        .await;
    let c = tls.client(Version::HTTP_2);
    let req = fixture("pod_three_containers");
    let started = Instant::now();
    let resp = review_over(&c, &s, &req, Version::HTTP_2).await;
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
    let text = metrics_over(&s).await;
    assert_eq!(
        scrape(&text, "image_mirror_skips_total{reason=\"mirror-unknown\"}"),
        1.0
    );
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_refuses_what_it_cannot_vouch_for() {
    let tls = Tls::new();
    let mut opts = tls.options(None);
    opts.strict = true;
    let s = app::start(opts, Mirrors::Custom(Arc::new(SilentMirror)))
        .await
        .unwrap();
    let c = tls.client(Version::HTTP_2);
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

    let text = metrics_over(&s).await;
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
    let tls = Tls::new();
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("table.yaml");
    std::fs::copy(data("table.yaml"), &table).unwrap();
    let s = tls.start(Some(table.clone()), Mirrors::Off).await;
    let c = tls.client(Version::HTTP_11);
    let before = patched(
        &fixture("pod_plain"),
        &review_over(&c, &s, &fixture("pod_plain"), Version::HTTP_11).await,
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
        &review_over(&c, &s, &fixture("pod_plain"), Version::HTTP_11).await,
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
    let resp = review_over(&c, &s, &fixture("pod_plain"), Version::HTTP_11).await;
    assert!(resp["response"].get("patch").is_none());
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_without_dropping_connections() {
    let tls = Tls::new();
    let s = tls.start(Some(data("table.yaml")), Mirrors::Off).await;
    let c = tls.client(Version::HTTP_2);
    review_over(&c, &s, &fixture("pod_plain"), Version::HTTP_2).await;
    let first_expiry = s.metrics.certificate_expiry.get();

    // An unreadable rotation keeps the old certificate.
    std::fs::write(&tls.files.cert, "garbage").unwrap();
    wait_for(|| {
        s.metrics
            .certificate_reloads
            .get_or_create(&res("failure"))
            .get()
            >= 1
    })
    .await;
    review_over(&c, &s, &fixture("pod_plain"), Version::HTTP_2).await;

    // A new certificate from another CA: new connections get it, the open one keeps working.
    let next = DevCerts::generate(&["localhost".to_string()]).unwrap();
    std::fs::write(&tls.files.key, &next.key_pem).unwrap();
    std::fs::write(&tls.files.cert, &next.cert_pem).unwrap();
    wait_for(|| {
        s.metrics
            .certificate_reloads
            .get_or_create(&res("success"))
            .get()
            >= 1
    })
    .await;
    review_over(&c, &s, &fixture("pod_plain"), Version::HTTP_2).await;
    let fresh_old_ca = tls.client(Version::HTTP_11);
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

/// SIGTERM to the real binary while slow uploads are in flight: every one is answered, /readyz
/// turns unready first, and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let tls = Tls::new();
    let serve = common::serve_command(&tls.files.cert, &tls.files.key, &data("table.yaml"));
    let mut child = tokio::process::Command::from(serve)
        .args(["--shutdown-delay", "700ms", "--drain-timeout", "10s"])
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
        if let Some(addrs) = common::serving_addrs(&line) {
            break addrs;
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let port = addr.port();

    let body = serde_json::to_vec(&fixture("pod_plain")).unwrap();
    let mut inflight = Vec::new();
    for i in 0..8 {
        let c = tls.client(if i % 2 == 0 {
            Version::HTTP_11
        } else {
            Version::HTTP_2
        });
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
    common::quiet_period(
        Duration::from_millis(400),
        "the first chunk of every request reaches the server",
    )
    .await;
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ready = reqwest::get(format!("http://{metrics_addr}/readyz"))
            .await
            .unwrap()
            .status();
        if ready == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "still ready after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

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

/// Writes `text` as `name` the way the kubelet updates a mounted ConfigMap: a new timestamped
/// directory, then a `..data` link swapped to it by rename; `name` links into `..data`.
fn kubelet_write(dir: &std::path::Path, version: u32, name: &str, text: &str) {
    use std::os::unix::fs::symlink;
    let data = dir.join(format!("..v{version}"));
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join(name), text).unwrap();
    let tmp = dir.join("..data_tmp");
    symlink(format!("..v{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    if !dir.join(name).exists() {
        symlink(format!("..data/{name}"), dir.join(name)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_happen_for_the_watched_files_only_and_only_when_they_changed() {
    let tls = Tls::new();
    let dir = tempfile::tempdir().unwrap();
    let original = std::fs::read_to_string(data("table.yaml")).unwrap();
    kubelet_write(dir.path(), 1, "table.yaml", &original);
    let s = tls
        .start(Some(dir.path().join("table.yaml")), Mirrors::Off)
        .await;
    let reloads = |result: &'static str| s.metrics.config_reloads.get_or_create(&res(result)).get();
    let certs = |result: &'static str| {
        s.metrics
            .certificate_reloads
            .get_or_create(&res(result))
            .get()
    };

    // A log file beside the table, and one beside the certificate: nothing is reloaded.
    for i in 0..10 {
        std::fs::write(dir.path().join("serve.log"), format!("line {i}\n")).unwrap();
        std::fs::write(tls.dir.path().join("serve.log"), format!("line {i}\n")).unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    common::quiet_period(
        Duration::from_millis(600),
        "no reload follows writes to unwatched files",
    )
    .await;
    let all = |f: &dyn Fn(&'static str) -> u64| f("success") + f("failure") + f("unchanged");
    assert_eq!(all(&reloads), 0);
    assert_eq!(all(&certs), 0);

    // The same content again: counted as unchanged, not parsed into a new table.
    kubelet_write(dir.path(), 2, "table.yaml", &original);
    wait_for(|| reloads("unchanged") == 1).await;
    assert_eq!(reloads("success"), 0);

    // New content through the kubelet's link swap: reloaded and in force.
    kubelet_write(
        dir.path(),
        3,
        "table.yaml",
        "namespaces: {exclude: [team-a]}\n",
    );
    wait_for(|| reloads("success") == 1).await;
    let c = tls.client(Version::HTTP_11);
    let resp = review_over(&c, &s, &fixture("pod_plain"), Version::HTTP_11).await;
    assert!(resp["response"].get("patch").is_none(), "{resp}");

    // Rewriting the certificate with what it already holds changes nothing either.
    let pem = std::fs::read(&tls.files.cert).unwrap();
    std::fs::write(&tls.files.cert, pem).unwrap();
    wait_for(|| certs("unchanged") == 1).await;
    assert_eq!(certs("success"), 0);
    s.shutdown().await.unwrap();
}

/// `serve` with the given arguments and environment in `dir`, until it has said `serving` or
/// exited; its exit status (None when it was serving, then stopped) and what it logged.
async fn serve_briefly(
    dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Option<std::process::ExitStatus>, String) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_image-mirror-webhook"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .current_dir(dir)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut said = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Ok(Ok(Some(line))) = tokio::time::timeout_at(deadline.into(), lines.next_line()).await
    {
        said.push_str(&line);
        said.push('\n');
        if line.contains("serving") && !line.contains("development") {
            let _ = child.kill().await;
            return (None, said);
        }
    }
    (child.wait().await.ok(), said)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_errors_name_the_file_and_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let (status, said) = serve_briefly(
        dir.path(),
        &[
            "--tls-cert",
            "/nonexistent/tls.crt",
            "--tls-key",
            "/nonexistent/tls.key",
        ],
        &[],
    )
    .await;
    assert!(status.is_some_and(|s| !s.success()), "{said}");
    assert!(said.contains("/nonexistent/tls.crt"), "{said}");
    assert_eq!(said.matches("(os error 2)").count(), 1, "{said}");

    let tls = Tls::new();
    let cert = tls.files.cert.display().to_string();
    let key = tls.files.key.display().to_string();
    let (status, said) = serve_briefly(
        dir.path(),
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--config",
            "/nonexistent/table.yaml",
        ],
        &[],
    )
    .await;
    assert!(status.is_some_and(|s| !s.success()), "{said}");
    assert!(
        said.contains("cannot read mapping table /nonexistent/table.yaml"),
        "{said}"
    );
    assert_eq!(said.matches("(os error 2)").count(), 1, "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn development_certificates_are_announced_and_never_made_in_a_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let (status, said) = serve_briefly(dir.path(), &[], &[]).await;
    assert!(status.is_none(), "serves: {said}");
    assert!(
        said.contains("WARN") && said.contains("made development certificates"),
        "{said}"
    );
    assert!(dir.path().join("certs/tls.crt").exists());
    let (status, said) = serve_briefly(dir.path(), &[], &[]).await;
    assert!(status.is_none(), "serves: {said}");
    assert!(
        said.contains("development certificates made earlier"),
        "{said}"
    );

    let elsewhere = tempfile::tempdir().unwrap();
    let (status, said) = serve_briefly(
        elsewhere.path(),
        &[],
        &[("KUBERNETES_SERVICE_HOST", "10.0.0.1")],
    )
    .await;
    assert!(status.is_some_and(|s| !s.success()), "{said}");
    assert!(
        said.contains("mount the serving certificate Secret"),
        "{said}"
    );
    assert!(!elsewhere.path().join("certs").exists());
}

/// The soak of `benches/soak.sh`, small: reviews over HTTP/2 to the real binary, whose memory
/// must not grow with them once warm (the bench holds the +5 MiB target over 1,000,000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_keeps_memory_flat() {
    use futures::StreamExt as _;
    let tls = Tls::new();
    let serve = common::serve_command(&tls.files.cert, &tls.files.key, &data("table.yaml"));
    let mut serve = serve;
    serve.args(["--shutdown-delay", "0s"]);
    let (mut child, addr, _) = common::start_serve(serve).await;
    let port = addr.port();
    let pid = child.id().unwrap();
    let rss_kib = || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap()
    };
    let c = tls.client(Version::HTTP_2);
    let body = serde_json::to_vec(&fixture("pod_three_containers")).unwrap();
    let url = format!("https://localhost:{port}/mutate");
    let round = |n: usize| {
        let (c, body, url) = (c.clone(), body.clone(), url.clone());
        async move {
            futures::stream::iter(0..n)
                .map(|_| {
                    let (c, body, url) = (c.clone(), body.clone(), url.clone());
                    async move {
                        let resp = c
                            .post(url)
                            .header("content-type", "application/json")
                            .body(body)
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(resp.status(), 200);
                        resp.bytes().await.unwrap();
                    }
                })
                .buffer_unordered(32)
                .collect::<Vec<()>>()
                .await;
        }
    };
    round(3000).await;
    let warm = rss_kib();
    round(15000).await;
    let after = rss_kib();
    let growth_mib = after.saturating_sub(warm) as f64 / 1024.0;
    assert!(growth_mib < 16.0, "RSS {warm} KiB -> {after} KiB");
    child.kill().await.unwrap();
}

/// A review of `pod_plain` whose Pod is padded to about `size` bytes with `shape`: junk a
/// forged review can carry (any Pod can reach `/mutate`). Each list is one JSON text made
/// here, not a `Value`, so that the test itself stays small.
fn hostile_body(shape: &str, size: usize) -> Vec<u8> {
    let mut review = fixture("pod_plain");
    review["request"]["uid"] = json!(format!("hostile-{shape}"));
    let (key, item): (&str, String) = match shape {
        "zeros" => ("containers", "0".into()),
        "empty-objects" => ("containers", "{}".into()),
        "containers" => (
            "initContainers",
            r#"{"name":"c","image":"nginx:1.27"}"#.into(),
        ),
        "pull-secrets" => ("imagePullSecrets", r#"{"name":"s"}"#.into()),
        "nested" => (
            "volumes",
            format!("{}1{}", "[".repeat(100), "]".repeat(100)),
        ),
        other => panic!("no shape {other}"),
    };
    let marker = "\"__HOSTILE__\"";
    review["request"]["object"]["spec"][key] = json!("__HOSTILE__");
    let text = serde_json::to_string(&review).unwrap();
    let room = size - text.len();
    let mut list = String::with_capacity(room);
    list.push('[');
    while list.len() + item.len() + 2 < room {
        if list.len() > 1 {
            list.push(',');
        }
        list.push_str(&item);
    }
    list.push(']');
    text.replacen(marker, &list, 1).into_bytes()
}

/// A 3 MiB review is accepted whole; a flood of them in parallel must not grow `serve` past
/// its memory limit (an OOM-killed webhook lets every Pod through): junk is read without being
/// kept, and past the in-flight budget a review is answered 429 at once. Every request gets an
/// answer, and the server serves on. `benches/hostile.sh` reports the same at a larger scale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_hostile_bodies_keep_memory_bounded_and_every_one_is_answered() {
    use futures::StreamExt as _;
    let tls = Tls::new();
    let serve = common::serve_command(&tls.files.cert, &tls.files.key, &data("table.yaml"));
    let mut serve = serve;
    serve.args(["--shutdown-delay", "0s"]);
    let (mut child, addr, metrics_addr) = common::start_serve(serve).await;
    let pid = child.id().unwrap();
    let status_kib = |key: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap()
    };
    let size = 3 * 1024 * 1024 - 1024;
    let shapes = [
        "zeros",
        "empty-objects",
        "containers",
        "pull-secrets",
        "nested",
    ];
    let bodies: Vec<bytes::Bytes> = shapes
        .iter()
        .map(|s| bytes::Bytes::from(hostile_body(s, size)))
        .collect();
    let url = format!("https://localhost:{}/mutate", addr.port());
    let mut answers: std::collections::BTreeMap<u16, usize> = Default::default();
    // Ordinary reviews during the flood: half the budget is kept for them.
    let ordinary = tls.client(Version::HTTP_2);
    let review = fixture("pod_plain");
    for version in [Version::HTTP_2, Version::HTTP_11] {
        let c = tls.client(version);
        let meanwhile = async {
            for _ in 0..20 {
                let resp = ordinary.post(&url).json(&review).send().await.unwrap();
                assert_eq!(resp.status(), 200, "an ordinary review during the flood");
                resp.bytes().await.unwrap();
            }
        };
        let flood = futures::stream::iter(0..48)
            .map(|i| {
                let (c, url, body) = (c.clone(), url.clone(), bodies[i % bodies.len()].clone());
                async move {
                    let resp = c
                        .post(url)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .expect("every hostile review gets an answer");
                    let status = resp.status().as_u16();
                    resp.bytes().await.unwrap();
                    status
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<u16>>();
        let (statuses, ()) = tokio::join!(flood, meanwhile);
        for s in statuses {
            *answers.entry(s).or_default() += 1;
        }
    }
    let peak_mib = status_kib("VmHWM:") as f64 / 1024.0;
    eprintln!(
        "96 hostile 3 MiB reviews, 16 at a time: peak RSS {peak_mib:.1} MiB, answers {answers:?}"
    );
    assert!(
        peak_mib <= 128.0,
        "peak RSS {peak_mib:.1} MiB; answers {answers:?}"
    );
    assert_eq!(answers.values().sum::<usize>(), 96, "{answers:?}");
    assert!(
        answers.keys().all(|s| [200, 400, 429].contains(s)),
        "{answers:?}"
    );
    // The junk shapes were read and answered (allowed), the deep one refused as no review.
    assert!(answers.get(&200).is_some_and(|n| *n > 0), "{answers:?}");
    // The server serves on: a real review is rewritten.
    let resp = ordinary.post(&url).json(&review).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let out: Value = resp.json().await.unwrap();
    assert!(out["response"]["patch"].is_string(), "{out}");
    let metrics = reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let shed = answers.get(&429).copied().unwrap_or(0) as f64;
    assert_eq!(
        scrape(
            &metrics,
            r#"image_mirror_admission_requests_total{operation="",result="overloaded"}"#
        ),
        shed
    );
    child.kill().await.unwrap();
}

/// Request strings (uid, names) reach the text log escaped: a forged review cannot write a line
/// of its own into it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_request_strings_cannot_inject_log_lines() {
    use tokio::io::AsyncBufReadExt;
    let tls = Tls::new();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_image-mirror-webhook"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(["--log-format", "text", "--shutdown-delay", "0s"])
        .arg("--tls-cert")
        .arg(&tls.files.cert)
        .arg("--tls-key")
        .arg(&tls.files.key)
        .arg("--config")
        .arg(data("table.yaml"))
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let port = loop {
        let line = lines.next_line().await.unwrap().expect("server starts");
        if line.contains("serving") {
            let at = line.find("addr=").unwrap() + 5;
            let addr: std::net::SocketAddr = line[at..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap();
            break addr.port();
        }
    };
    let mut review = fixture("pod_plain");
    let forged = "\nFORGED INFO admission: all is well";
    review["request"]["uid"] = json!(format!("u{forged}"));
    review["request"]["object"]["metadata"]["name"] = json!(format!("web{forged}"));
    review["request"]["name"] = json!(format!("web{forged}"));
    let c = tls.client(Version::HTTP_2);
    let resp = c
        .post(format!("https://localhost:{port}/mutate"))
        .json(&review)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut said = String::new();
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_secs(2), lines.next_line()).await
    {
        let done = line.contains("admission");
        said.push_str(&line);
        said.push('\n');
        assert!(!line.starts_with("FORGED"), "an injected line:\n{said}");
        if done {
            break;
        }
    }
    assert!(
        said.contains(r"FORGED INFO admission: all is well"),
        "{said}"
    );
    assert!(said.contains(r"\nFORGED"), "escaped: {said}");
    child.kill().await.unwrap();
}

/// `--client-ca`: only a caller with a client certificate that CA signed (the API server's, as
/// its AdmissionConfiguration names it) gets through the TLS handshake; the metrics port, where
/// the kubelet probes, asks for none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_client_ca_only_the_api_servers_certificate_gets_through() {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let tls = Tls::new();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "API server client CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let (cert, key) = common::envtest::signed(&issuer, "kube-apiserver", None, false);
    let client_ca = tls.dir.path().join("client-ca.crt");
    std::fs::write(&client_ca, &ca_pem).unwrap();
    let mut opts = tls.options(Some(data("table.yaml")));
    opts.tls.client_ca = Some(client_ca);
    let s = app::start(opts, Mirrors::Off).await.unwrap();
    let review = fixture("pod_plain");

    let anonymous = tls.client(Version::HTTP_2);
    let refused = anonymous
        .post(url(&s, "/mutate"))
        .json(&review)
        .send()
        .await;
    assert!(
        refused.is_err(),
        "a caller without a client certificate got an answer"
    );

    let identity = reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap();
    for version in [Version::HTTP_2, Version::HTTP_11] {
        let builder = reqwest::Client::builder()
            .tls_backend_rustls()
            .tls_certs_only([tls.ca.clone()])
            .identity(identity.clone());
        let builder = if version == Version::HTTP_2 {
            builder.http2_prior_knowledge()
        } else {
            builder.http1_only()
        };
        let answer = review_over(&builder.build().unwrap(), &s, &review, version).await;
        assert!(answer["response"]["patch"].is_string(), "{answer}");
    }
    let ready = reqwest::get(format!("http://{}/readyz", s.metrics_addr))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    s.shutdown().await.unwrap();
}
