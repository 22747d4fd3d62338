//! No credential in a log line or a metric, on any error path.

use super::*;

/// Every error path of checks and copies, driven through the real binary with real credentials
/// set (environment variables and a docker config file), at DEBUG: no log line and no metric
/// holds a username, a password or an encoded token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credential_reaches_a_log_line_or_a_metric() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let mut upstream = Registry::secured();
    let mirror = Registry::plain_with_auth();
    upstream
        .push(
            "team/app",
            "1.0",
            &TestImage::generate(&["linux/amd64"], 4096),
        )
        .await;
    let proxy = FaultProxy::start(mirror.addr()).await;
    let (mirror_user, mirror_pass) = mirror.auth.clone().unwrap();
    let (upstream_user, upstream_pass) = upstream.auth.clone().unwrap();
    let wrong = common::random_secret();
    let b64 =
        |u: &str, p: &str| base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
    let secrets = [
        mirror_user.clone(),
        mirror_pass.clone(),
        b64(&mirror_user, &mirror_pass),
        upstream_user.clone(),
        upstream_pass.clone(),
        b64(&upstream_user, &upstream_pass),
        wrong.clone(),
        b64(&mirror_user, &wrong),
    ];
    let docker_config = dir.path().join("upstream.json");
    upstream.write_docker_config(&docker_config);
    let (u, p, m) = (upstream.host(), proxy.host(), mirror.host());
    let table = format!(
        "mirrors:\n\
         \x20 local: {{type: repository, registry: \"{p}\", prefix: mirror, naming: flatten}}\n\
         \x20 denied: {{type: repository, registry: \"{m}\", prefix: other, naming: flatten}}\n\
         rules:\n\
         \x20 - {{match: [\"{u}/team/*\", \"127.0.0.1:1/half/*\"], mirror: local, swap: if-present}}\n\
         \x20 - {{match: [\"{u}/other/*\"], mirror: denied, swap: if-present}}\n\
         registries:\n\
         \x20 \"{u}\": {{caFile: {}, dockerConfig: {}}}\n\
         \x20 \"{p}\": {{insecure: true, usernameEnv: IMW_HYGIENE_USER, passwordEnv: IMW_HYGIENE_PASS}}\n\
         \x20 \"{m}\": {{insecure: true, usernameEnv: IMW_HYGIENE_USER, passwordEnv: IMW_HYGIENE_WRONG}}\n\
         \x20 \"127.0.0.1:1\": {{usernameEnv: IMW_HYGIENE_USER, passwordEnv: IMW_HYGIENE_UNSET}}\n\
         checks: {{timeout: 1s, unknownTtl: 0s, circuitThreshold: 1000}}\n\
         copies: {{concurrency: 2, retryBackoff: 100ms, maxAttempts: 3}}\n",
        upstream.ca_file().unwrap().display(),
        docker_config.display(),
    );
    let table_path = dir.path().join("table.yaml");
    std::fs::write(&table_path, table).unwrap();
    let certs = DevCerts::generate(&["localhost".to_string()]).unwrap();
    certs.write(dir.path()).unwrap();
    let env = [
        ("IMW_HYGIENE_USER", mirror_user.as_str()),
        ("IMW_HYGIENE_PASS", mirror_pass.as_str()),
        ("IMW_HYGIENE_WRONG", wrong.as_str()),
        ("RUST_LOG", "debug"),
    ];
    let serve = common::serve_command(
        &dir.path().join("tls.crt"),
        &dir.path().join("tls.key"),
        &table_path,
    );
    let mut child = tokio::process::Command::from(serve)
        .args(["--shutdown-delay", "0s"])
        .envs(env)
        .env_remove("IMW_HYGIENE_UNSET")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();
    let (port, metrics_addr) = loop {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("server starts")
            .unwrap()
            .expect("log line");
        log.push_str(&line);
        log.push('\n');
        if let Some((addr, metrics_addr)) = common::serving_addrs(&line) {
            break (addr.port(), metrics_addr);
        }
    };
    let collected = tokio::spawn(async move {
        let mut rest = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            rest.push_str(&line);
            rest.push('\n');
        }
        rest
    });
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(certs.ca_pem.as_bytes()).unwrap()])
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let review = |image: String| {
        let client = client.clone();
        let url = format!("https://localhost:{port}/mutate");
        async move {
            let res = client
                .post(url)
                .json(&pod_review(&image, false))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200);
        }
    };
    let metrics = || async {
        reqwest::get(format!("http://{metrics_addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let wait_metric = |sample: &'static str| async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = metrics().await;
            if text.lines().any(|l| l.starts_with(sample)) {
                return;
            }
            assert!(Instant::now() < deadline, "never saw {sample}:\n{text}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };

    // Absent, then copied with the upstream's docker config and the mirror's variables.
    review(format!("{u}/team/app:1.0")).await;
    wait_metric("image_mirror_copies_total{result=\"success\"} 1").await;
    // A wrong password, then a proxy that refuses (401), throttles (429) and hangs.
    review(format!("{u}/other/app:1.0")).await;
    for (fault, image) in [
        (Fault::Status(401), "b"),
        (Fault::Status(429), "c"),
        (Fault::Hang, "d"),
    ] {
        proxy.set(fault);
        review(format!("{u}/team/{image}:1.0")).await;
    }
    // Copies that fail: credentials half set, then an upstream that is down.
    proxy.set(Fault::Pass);
    review("127.0.0.1:1/half/halfset:1.0".to_string()).await;
    upstream.stop();
    review(format!("{u}/team/gone:1.0")).await;
    wait_metric("image_mirror_copies_total{result=\"given_up\"} 2").await;
    let text = metrics().await;
    child.kill().await.unwrap();
    log.push_str(&collected.await.unwrap());

    // Every line is one a collector can keep whole.
    common::check_json_log(&log);
    // The error paths were all taken...
    for evidence in [
        "result=\"unauthorized\"",
        "mirror checks are unauthorized",
        "429 too many requests",
        "mirror check timed out",
        "IMW_HYGIENE_UNSET",
        "copy failed; giving up",
    ] {
        assert!(
            log.contains(evidence) || text.contains(evidence),
            "no {evidence:?} in:\n{log}"
        );
    }
    // ...and nothing secret was said on any of them.
    for secret in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "a credential in the log:\n{log}"
        );
        assert!(
            !text.contains(secret.as_str()),
            "a credential in the metrics:\n{text}"
        );
    }

    // The CLI too, on a wrong password and at DEBUG.
    let out = binary()
        .arg("copy")
        .arg(format!("{m}/other/app:1.0"))
        .arg(format!("{m}/other/copy:1.0"))
        .arg("--config")
        .arg(&table_path)
        .envs(env)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains(&m), "{said}");
    for secret in &secrets {
        assert!(
            !said.contains(secret.as_str()),
            "a credential from copy:\n{said}"
        );
    }
}
