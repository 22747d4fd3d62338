//! The webhook's own AWS identity against moto on loopback (STS, ECR's API) and a real
//! `docker-registry` whose only user is `AWS` with the token moto issues: copies, checks and
//! warm-ups work only with that token; a refused token is renewed; a role that cannot be
//! assumed and no identity at all are each said in one line; and the table's pull-through
//! prefixes against the account's cache rules.

use super::*;
use common::aws::{self, Answers, Moto};

const LIFECYCLE: &str = r#"{"rules":[{"rulePriority":1,"selection":{"tagStatus":"untagged","countType":"sinceImagePushed","countUnit":"days","countNumber":14},"action":{"type":"expire"}}]}"#;

/// The binary with exactly the AWS environment `env`.
fn run(args: &[&str], env: &[(String, String)]) -> std::process::Output {
    let mut cmd = binary();
    aws::clear_aws(&mut cmd);
    cmd.args(args).envs(env.iter().map(|(k, v)| (k, v)));
    cmd.env("RUST_LOG", "warn").output().unwrap()
}

fn said(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// An ECR stand-in: a registry whose one user is `AWS` with moto's token.
fn ecr_registry() -> Registry {
    let mut r = Registry::plain_with_auth();
    r.set_credentials("AWS", &aws::moto_token());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ecr_token_from_irsa_serves_copies_checks_and_warm_ups() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start();
    let upstream = Registry::plain();
    let image = TestImage::generate(&["linux/amd64", "linux/arm64"], 4096);
    upstream.push("team/app", "1.0", &image).await;
    upstream.push("other/tool", "2.0", &image).await;
    let ecr = ecr_registry();
    // What the pull-through cache already holds: a warm-up is one manifest pull through it.
    ecr.push("cache/other/tool", "2.0", &image).await;
    let (u, e) = (upstream.host(), ecr.host());
    let table = dir.path().join("table.yaml");
    std::fs::write(
        &table,
        format!(
            "mirrors:\n\
             \x20 ecr:\n\
             \x20   type: repository\n\
             \x20   registry: \"{e}\"\n\
             \x20   prefix: mirror\n\
             \x20   naming: flatten\n\
             \x20   ecr: {{tagMutability: IMMUTABLE, scanOnPush: true, lifecyclePolicy: '{LIFECYCLE}'}}\n\
             \x20 cache: {{type: pull-through, registry: \"{e}\", upstreams: {{\"{u}\": cache}}}}\n\
             images:\n\
             \x20 - {{source: \"{u}/team/app:1.0\", target: \"{e}/mirror/app:1.0\"}}\n\
             \x20 - {{source: \"{u}/other/tool:2.0\", target: \"{e}/cache/other/tool:2.0\"}}\n\
             registries:\n\
             \x20 \"{e}\": {{insecure: true, aws: {{region: {region}, registryId: \"{account}\"}}}}\n\
             \x20 \"{u}\": {{insecure: true}}\n",
            region = aws::REGION,
            account = aws::ACCOUNT,
        ),
    )
    .unwrap();
    let table = table.to_str().unwrap();
    let irsa = aws::irsa(dir.path(), &moto.url(), &moto.url());

    // Where the credentials come from, before anything runs.
    let summary = run(&["check-config", table], &irsa);
    assert!(summary.status.success(), "{}", said(&summary));
    let text = String::from_utf8_lossy(&summary.stdout);
    let line = text
        .lines()
        .find(|l| l.contains(&e) && l.contains("credentials:"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains("AWS: an ECR token for ECR registry 111111111111 in us-east-1")
            && line.contains(
                "IRSA web identity (role arn:aws:iam::111111111111:role/image-mirror-webhook"
            ),
        "{line}"
    );

    // With IRSA: the repository is made, the image copied, the cache warmed.
    let out = run(&["sync", "--config", table], &irsa);
    assert!(out.status.success(), "{}", said(&out));
    assert!(!said(&out).contains(&aws::moto_token()), "{}", said(&out));
    assert_same_image(&upstream, "team/app", &ecr, "mirror/app", "1.0");
    let repos = moto.repositories();
    let made: Vec<&Value> = repos.as_array().unwrap().iter().collect();
    assert_eq!(made.len(), 1, "{repos}");
    assert_eq!(made[0]["name"], "mirror/app");
    assert_eq!(made[0]["tagMutability"], "IMMUTABLE");
    assert_eq!(made[0]["scanOnPush"], true);
    assert_eq!(made[0]["encryption"], "AES256");
    assert_eq!(made[0]["lifecyclePolicy"], LIFECYCLE);
    // Checks: both targets are found, with the token.
    let out = run(&["sync", "--config", table, "--dry-run"], &irsa);
    assert!(out.status.success(), "{}", said(&out));
    assert!(
        said(&out).contains("2 images: 0 would be copied, 2 up to date"),
        "{}",
        said(&out)
    );
    // A warm-up: `copy` into the pull-through cache pulls through it (the stand-in holds the
    // image, as a cache that fetched it would), with the token.
    let warm = [
        "copy",
        "--config",
        table,
        &format!("{u}/other/tool:3.0"),
        &format!("{e}/cache/other/tool:3.0"),
    ];
    ecr.push("cache/other/tool", "3.0", &image).await;
    let out = run(&warm, &irsa);
    assert!(out.status.success(), "{}", said(&out));
    assert!(
        said(&out).starts_with(&format!("warmed up {e}/cache/other/tool:3.0")),
        "{}",
        said(&out)
    );

    // No identity at all: asked anonymously, refused, and one warning names what was tried.
    let out = run(
        &["sync", "--config", table, "--dry-run"],
        &aws::isolated(dir.path()),
    );
    let text = said(&out);
    assert!(!out.status.success(), "{text}");
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("no AWS identity found"))
        .collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(
        warnings[0].contains("nothing: no environment keys, no IRSA, no Pod Identity"),
        "{text}"
    );
    assert!(!text.contains(&aws::moto_token()), "{text}");
    let out = run(&warm, &aws::isolated(dir.path()));
    assert!(!out.status.success(), "{}", said(&out));
    assert!(said(&out).contains("access denied"), "{}", said(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_cannot_be_assumed_is_named_with_what_aws_answered() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start();
    let answers = Answers::start(&[]).await;
    let ecr = ecr_registry();
    let e = ecr.host();
    let table = dir.path().join("table.yaml");
    std::fs::write(
        &table,
        format!(
            "mirrors:\n  ecr: {{type: repository, registry: \"{e}\", prefix: mirror}}\n\
             images:\n  - {{source: \"nginx:1.27\", target: \"{e}/mirror/nginx:1.27\"}}\n\
             registries:\n  \"{e}\": {{insecure: true, aws: {{region: us-east-1}}}}\n"
        ),
    )
    .unwrap();
    // STS refuses the role; ECR's API is moto's.
    let env = aws::irsa(dir.path(), &answers.url(), &moto.url());
    let out = run(
        &["sync", "--config", table.to_str().unwrap(), "--dry-run"],
        &env,
    );
    let text = said(&out);
    assert!(!out.status.success(), "{text}");
    let line = text
        .lines()
        .find(|l| l.contains("AccessDenied"))
        .unwrap_or_else(|| panic!("{text}"));
    for part in [
        "IRSA web identity (role arn:aws:iam::111111111111:role/image-mirror-webhook",
        "AWS answered AccessDenied: Not authorized to perform sts:AssumeRoleWithWebIdentity",
        &e,
    ] {
        assert!(line.contains(part), "{part}: {line}");
    }
    // Said once, in words: not the SDK's debug dump of the response.
    assert!(
        !line.contains("ErrorMetadata") && !line.contains("<ErrorResponse"),
        "{line}"
    );
    assert_eq!(text.matches("AccessDenied").count(), 1, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_through_prefix_without_its_cache_rule_is_named_online() {
    let dir = tempfile::tempdir().unwrap();
    let answers = Answers::start(&[
        ("docker-hub", "registry-1.docker.io"),
        ("ghcr", "ghcr.io"),
        ("quay", "public.ecr.aws"),
    ])
    .await;
    // Keys made now; nothing but the loopback stand-in is asked.
    let mut env = aws::isolated(dir.path());
    env.extend([
        (
            "AWS_ACCESS_KEY_ID".to_string(),
            format!("AKIA{}", common::random_secret()),
        ),
        ("AWS_SECRET_ACCESS_KEY".to_string(), common::random_secret()),
        ("AWS_ENDPOINT_URL_ECR".to_string(), answers.url()),
    ]);
    let table = |upstreams: &str| {
        let path = dir.path().join("table.yaml");
        std::fs::write(
            &path,
            format!(
                "mirrors:\n  ecr:\n    type: pull-through\n    registry: 111111111111.dkr.ecr.us-east-1.amazonaws.com\n    upstreams: {{{upstreams}}}\n\
                 rules:\n  - {{match: [\"docker.io/**\"], mirror: ecr}}\n"
            ),
        )
        .unwrap();
        path
    };
    let bad =
        table("docker.io: docker-hub, ghcr.io: ghcr, quay.io: quay, registry.k8s.io: kubernetes");
    let out = run(&["check-config", "--online", bad.to_str().unwrap()], &env);
    let text = said(&out);
    assert!(!out.status.success(), "{text}");
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 2, "{text}");
    assert!(
        errors[0].contains("quay.io → quay: the rule with the prefix quay caches public.ecr.aws"),
        "{text}"
    );
    assert!(
        errors[1].contains(
            "registry.k8s.io → kubernetes: no pull-through cache rule has the prefix kubernetes"
        ) && errors[1].contains("every Pod sent there would fail to pull"),
        "{text}"
    );
    // Offline, the same table is valid: only --online asks.
    let out = run(&["check-config", bad.to_str().unwrap()], &env);
    assert!(out.status.success(), "{}", said(&out));
    let good = table("docker.io: docker-hub, ghcr.io: ghcr");
    let out = run(&["check-config", "--online", good.to_str().unwrap()], &env);
    assert!(out.status.success(), "{}", said(&out));
    assert!(said(&out).contains("online: every pull-through prefix has its cache rule"));
}

/// `serve` keeps one token for checks; a registry that refuses it has it renewed at once,
/// never more than once per ten seconds, and the webhook goes on when the registry takes
/// the token AWS gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_renewed_on_the_401_and_not_more_often() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start();
    let upstream = Registry::plain();
    let mut ecr = ecr_registry();
    let image = TestImage::generate(&["linux/amd64"], 1024);
    for name in ["a", "b", "c", "d"] {
        ecr.push(&format!("mirror/{name}"), "1.0", &image).await;
    }
    let (u, e) = (upstream.host(), ecr.host());
    let table = dir.path().join("table.yaml");
    std::fs::write(
        &table,
        format!(
            "mirrors:\n  ecr: {{type: repository, registry: \"{e}\", prefix: mirror, naming: flatten}}\n\
             rules:\n  - {{match: [\"{u}/team/*\"], mirror: ecr, swap: if-present, copy: off}}\n\
             registries:\n  \"{e}\": {{insecure: true, aws: {{region: us-east-1}}}}\n\
             checks: {{timeout: 5s, unknownTtl: 0s, circuitThreshold: 1000}}\n"
        ),
    )
    .unwrap();
    let tls = common::Tls::new();
    let mut cmd = common::serve_command(&tls.files.cert, &tls.files.key, &table);
    aws::clear_aws(&mut cmd);
    cmd.envs(aws::irsa(dir.path(), &moto.url(), &moto.url()));
    let (_child, addr, metrics_addr) = common::start_serve(cmd).await;
    let client = tls.client(reqwest::Version::HTTP_2);
    let review = |name: &'static str| {
        let (client, u) = (client.clone(), u.clone());
        async move {
            let body = pod_review(&format!("{u}/team/{name}:1.0"), false);
            let out: Value = client
                .post(format!("https://localhost:{}/mutate", addr.port()))
                .json(&body)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            out["response"]["patch"].is_string()
        }
    };
    let tokens = || async move {
        let text = reqwest::get(format!("http://{metrics_addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        common::sample(
            &text,
            "image_mirror_aws_requests_total{action=\"GetAuthorizationToken\",result=\"ok\"}",
        )
    };
    assert!(review("a").await, "present on the mirror, with the token");
    assert_eq!(tokens().await, 1.0);
    // The registry now takes another password: the token is refused.
    ecr.set_credentials("AWS", &common::random_secret());
    common::quiet_period(
        aws_min_renewal() + Duration::from_secs(1),
        "a token is renewed on a 401 only this long after the last",
    )
    .await;
    assert!(!review("b").await, "refused: left unchanged");
    assert_eq!(tokens().await, 2.0, "renewed on the 401");
    assert!(!review("c").await);
    assert_eq!(tokens().await, 2.0, "not again so soon");
    // The registry takes AWS's token again: the webhook goes on with the one it holds.
    ecr.set_credentials("AWS", &aws::moto_token());
    assert!(review("d").await, "present again");
    assert_eq!(tokens().await, 2.0);
    let scrape = reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!scrape.contains(&aws::moto_token()));
}

fn aws_min_renewal() -> Duration {
    image_mirror_webhook::aws::MIN_RENEWAL
}
