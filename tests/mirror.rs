//! Checks and copies against real registries on loopback (Debian's `docker-registry`), read
//! back with `skopeo`; the webhook end to end; registry faults.

mod common;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_a_multi_platform_image_byte_for_byte_and_skips_what_is_there() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let upstream = Registry::plain();
    let mirror = Registry::secured();
    let image = TestImage::generate(&["linux/amd64", "linux/arm64/v8"], 24 * MIB);
    upstream.push("team/app", "1.0", &image).await;
    let table = access_table(dir.path(), &[&upstream, &mirror]);
    let registries = Registries::new(table.settings, quick(), None);

    let source = r(&format!("{}/team/app:1.0", upstream.host()));
    let target = r(&format!("{}/mirror/team/app:1.0", mirror.host()));
    let first = registries.copy(&source, &target, &[], None).await.unwrap();
    assert_eq!(first.digest, image.top.0);
    assert_eq!((first.manifests_copied, first.blobs_copied), (3, 5));
    assert_eq!(first.bytes, image.total_bytes());
    assert_eq!(first.platforms, vec!["linux/amd64", "linux/arm64/v8"]);
    assert_same_image(&upstream, "team/app", &mirror, "mirror/team/app", "1.0");
    for (digest, _) in &image.blobs {
        assert!(mirror.has_blob("mirror/team/app", digest).await, "{digest}");
    }
    // By digest too: a tag+digest reference finds both.
    assert!(mirror.skopeo_raw("mirror/team/app", &image.top.0).is_some());

    // Again: nothing moves.
    let second = registries.copy(&source, &target, &[], None).await.unwrap();
    assert_eq!((second.bytes, second.blobs_copied), (0, 0));
    assert_eq!(second.digest, image.top.0);

    // Under a new tag: the platform manifests are there already, only the index is pushed.
    let other = r(&format!("{}/mirror/team/app:1.0-copy", mirror.host()));
    let third = registries.copy(&source, &other, &[], None).await.unwrap();
    assert_eq!(
        (third.bytes, third.blobs_copied, third.blobs_skipped),
        (0, 0, 0)
    );
    assert_eq!(third.manifests_skipped, 2);
    assert_eq!(
        mirror.skopeo_raw("mirror/team/app", "1.0-copy"),
        Some(image.top.1.clone())
    );

    // One platform only: the index is rebuilt with that entry.
    let arm = r(&format!("{}/mirror/arm/app:1.0", mirror.host()));
    let only = [Platform::parse("linux/arm64").unwrap()];
    let filtered = registries.copy(&source, &arm, &only, None).await.unwrap();
    assert!(filtered.filtered);
    assert_eq!(filtered.platforms, vec!["linux/arm64/v8"]);
    assert_eq!(filtered.blobs_copied, 3);
    let index: serde_json::Value =
        serde_json::from_slice(&mirror.skopeo_raw("mirror/arm/app", "1.0").unwrap()).unwrap();
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["platform"]["architecture"], "arm64");
    assert_eq!(
        index["annotations"]["org.opencontainers.image.title"],
        "generated"
    );

    // A pinned target cannot take a rebuilt index.
    let pinned = r(&format!("{}/mirror/arm/app@{}", mirror.host(), image.top.0));
    let err = registries
        .copy(&source, &pinned, &only, None)
        .await
        .unwrap_err();
    let err = Report(&err).to_string();
    assert!(err.contains("pinned by digest"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_tell_present_absent_and_denied_apart() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let mirror = Registry::secured();
    let image = TestImage::generate(&["linux/amd64"], 1024);
    mirror.push("mirror/app", "1.0", &image).await;
    let table = access_table(dir.path(), &[&mirror]);
    let registries = Registries::new(table.settings, quick(), None);
    let host = mirror.host();

    let digest = registries
        .manifest_digest(&r(&format!("{host}/mirror/app:1.0")))
        .await
        .unwrap();
    assert_eq!(digest, image.top.0);
    for missing in ["mirror/app:2.0", "mirror/nothing:1.0"] {
        let e = registries
            .manifest_digest(&r(&format!("{host}/{missing}")))
            .await
            .unwrap_err();
        assert_eq!(e.failure(), Some(Failure::NotFound), "{missing}: {e}");
    }
    // Without the credentials: denied, which is not "absent".
    let anonymous = registries_for(&format!(
        "registries:\n  \"{host}\": {{caFile: {}}}\n",
        mirror.ca_file().unwrap().display()
    ));
    let e = anonymous
        .manifest_digest(&r(&format!("{host}/mirror/app:1.0")))
        .await
        .unwrap_err();
    assert_eq!(e.failure(), Some(Failure::Denied), "{e}");
    // Without the CA: a TLS failure, also not "absent".
    let e = registries_for("{}")
        .manifest_digest(&r(&format!("{host}/mirror/app:1.0")))
        .await
        .unwrap_err();
    assert_eq!(e.failure(), Some(Failure::Transport), "{e}");
}

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_image-mirror-webhook"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_command_reports_what_it_moved() {
    common::init();
    let upstream = Registry::plain();
    let mirror = Registry::plain();
    let image = TestImage::generate(&["linux/amd64", "linux/arm64"], 2 * MIB);
    upstream.push("team/tool", "v1", &image).await;
    let run = |extra: &[&str]| {
        let mut cmd = binary();
        cmd.arg("copy")
            .arg(format!("{}/team/tool:v1", upstream.host()))
            .arg(format!("{}/m/tool:v1", mirror.host()))
            .args(["--insecure-registry", &upstream.host()])
            .args(extra);
        cmd.output().unwrap()
    };
    // The mirror is not declared insecure: HTTPS to a plain registry fails, naming it; that
    // may heal (a CA, a setting), so it is the ordinary failure status.
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&mirror.host()), "{err}");
    // A platform the image does not have cannot come by trying again: status 3, which a copy
    // Job's podFailurePolicy stops on.
    let out = run(&[
        "--insecure-registry",
        &mirror.host(),
        "--platform",
        "linux/s390x",
    ]);
    assert_eq!(
        out.status.code(),
        Some(i32::from(
            image_mirror_webhook::mirror::COPY_PERMANENT_FAILURE
        ))
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("linux/s390x"), "{err}");

    let out = run(&["--insecure-registry", &mirror.host()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("manifests: 3 copied"), "{text}");
    assert!(
        text.contains("blobs:     5 copied, 0 already there"),
        "{text}"
    );
    assert!(
        text.contains(&format!("({} B)", image.total_bytes())),
        "{text}"
    );
    assert_same_image(&upstream, "team/tool", &mirror, "m/tool", "v1");

    let out = run(&["--insecure-registry", &mirror.host()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("(0 B)"), "{text}");

    // To a TLS registry whose CA we are not given: --insecure-registry skips verification, as
    // skopeo's --tls-verify=false does; credentials come from the table.
    let dir = tempfile::tempdir().unwrap();
    let secured = Registry::secured();
    let docker_config = dir.path().join("config.json");
    secured.write_docker_config(&docker_config);
    let table = dir.path().join("table.yaml");
    std::fs::write(
        &table,
        format!(
            "registries:\n  \"{}\": {{dockerConfig: {}}}\n",
            secured.host(),
            docker_config.display()
        ),
    )
    .unwrap();
    let copy_to_secured = |insecure: bool| {
        let mut cmd = binary();
        cmd.arg("copy")
            .arg(format!("{}/team/tool:v1", upstream.host()))
            .arg(format!("{}/m/tool:v1", secured.host()))
            .args(["--insecure-registry", &upstream.host()])
            .arg("--config")
            .arg(&table);
        if insecure {
            cmd.args(["--insecure-registry", &secured.host()]);
        }
        cmd.output().unwrap()
    };
    let out = copy_to_secured(false);
    assert!(
        !out.status.success(),
        "an unknown CA is refused when verifying"
    );
    let out = copy_to_secured(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_image(&upstream, "team/tool", &secured, "m/tool", "v1");
}

/// A Pod pinned to yesterday's build (`app:1.0@sha256:<old>`) must not roll the mirror's `1.0`
/// back for every tenant that pulls `app:1.0`: the old digest is copied by digest only, and
/// the tag moves only to what upstream's tag points at now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_by_an_old_digest_never_moves_the_mirror_tag_back() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let upstream = Registry::plain();
    let mirror = Registry::plain();
    let old = TestImage::generate(&["linux/amd64", "linux/arm64"], MIB);
    let new = TestImage::generate(&["linux/amd64", "linux/arm64"], MIB);
    upstream.push("team/app", "1.0", &old).await;
    upstream.push("team/app", "1.0", &new).await;
    let table = access_table(dir.path(), &[&upstream, &mirror]);
    let registries = Registries::new(table.settings, quick(), None);
    let (u, m) = (upstream.host(), mirror.host());

    // The mirror has today's 1.0.
    let today = registries
        .copy(
            &r(&format!("{u}/team/app:1.0")),
            &r(&format!("{m}/m/app:1.0")),
            &[],
            None,
        )
        .await
        .unwrap();
    assert_eq!(today.tag_left, None);
    assert_eq!(mirror.skopeo_raw("m/app", "1.0"), Some(new.top.1.clone()));

    // Yesterday's digest, through the library (the on-demand queue and Jobs run this) ...
    let pinned = |d: &str| {
        (
            r(&format!("{u}/team/app:1.0@{d}")),
            r(&format!("{m}/m/app:1.0@{d}")),
        )
    };
    let (src, tgt) = pinned(&old.top.0);
    let report = registries.copy(&src, &tgt, &[], None).await.unwrap();
    assert_eq!(report.digest, old.top.0);
    let left = report.tag_left.expect("the tag is left alone");
    assert_eq!(left.tag, "1.0");
    assert!(left.why.contains(&new.top.0), "{}", left.why);
    assert_eq!(mirror.skopeo_raw("m/app", "1.0"), Some(new.top.1.clone()));
    assert_eq!(
        mirror.skopeo_raw("m/app", &old.top.0),
        Some(old.top.1.clone())
    );
    // ... and with a platform filter (a rebuilt index), where the tag is compared by the
    // source's digest.
    let amd64 = [Platform::parse("linux/amd64").unwrap()];
    let to_filtered = r(&format!("{m}/m/app-amd64:1.0"));
    let by_tag = r(&format!("{u}/team/app:1.0"));
    let filtered = registries
        .copy(&by_tag, &to_filtered, &amd64, None)
        .await
        .unwrap();
    assert_eq!(
        filtered.tag_left, None,
        "the source was read by its tag just now"
    );
    let (src, _) = pinned(&old.top.0);
    // A pinned source into a tag-only target with platforms: the tag would hold the old build.
    let report = registries
        .copy(&src, &to_filtered, &amd64, None)
        .await
        .unwrap();
    assert!(report.tag_left.is_some());
    let amd64_today = mirror.skopeo_raw("m/app-amd64", "1.0").unwrap();
    let amd64_today: Value = serde_json::from_slice(&amd64_today).unwrap();
    let new_index: Value = serde_json::from_slice(&new.top.1).unwrap();
    assert_eq!(
        amd64_today["manifests"][0]["digest"],
        new_index["manifests"][0]["digest"]
    );

    // Today's digest, pinned: upstream's tag points at it, so the tag is set (on a fresh
    // repository, where nothing else could have set it).
    let (src, _) = pinned(&new.top.0);
    let fresh = r(&format!("{m}/m/app-fresh:1.0@{}", new.top.0));
    let report = registries.copy(&src, &fresh, &[], None).await.unwrap();
    assert_eq!(report.tag_left, None);
    assert_eq!(
        mirror.skopeo_raw("m/app-fresh", "1.0"),
        Some(new.top.1.clone())
    );

    // The copy command says so.
    let out = binary()
        .arg("copy")
        .arg(format!("{u}/team/app:1.0@{}", old.top.0))
        .arg(format!("{m}/m/app2:1.0@{}", old.top.0))
        .args(["--insecure-registry", &u, "--insecure-registry", &m])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!(
            "tag:       1.0 left alone (upstream's 1.0 is now {}",
            new.top.0
        )),
        "{text}"
    );
    assert_eq!(mirror.skopeo_raw("m/app2", "1.0"), None);
    assert_eq!(
        mirror.skopeo_raw("m/app2", &old.top.0),
        Some(old.top.1.clone())
    );
}

/// `copies.maxImageSize`: a copy of a larger image stops before its first blob moves, says why,
/// and exits with the status that tells a copy Job not to try again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_over_the_size_limit_is_not_copied() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let upstream = Registry::plain();
    let mirror = Registry::plain();
    let image = TestImage::generate(&["linux/amd64", "linux/arm64"], 2 * MIB);
    upstream.push("team/big", "1", &image).await;
    let table = dir.path().join("table.yaml");
    let (u, m) = (upstream.host(), mirror.host());
    let run = |limit: &str| {
        std::fs::write(
            &table,
            format!("registries:\n  \"{u}\": {{insecure: true}}\n  \"{m}\": {{insecure: true}}\ncopies: {{maxImageSize: {limit}}}\n"),
        )
        .unwrap();
        binary()
            .arg("copy")
            .arg(format!("{u}/team/big:1"))
            .arg(format!("{m}/m/big:1"))
            .arg("--config")
            .arg(&table)
            .output()
            .unwrap()
    };
    let out = run("1MiB");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(i32::from(
            image_mirror_webhook::mirror::COPY_PERMANENT_FAILURE
        )),
        "{err}"
    );
    assert!(
        err.contains("over copies.maxImageSize (1048576 bytes)"),
        "{err}"
    );
    for (digest, _) in &image.blobs {
        assert!(!mirror.has_blob("m/big", digest).await, "{digest} moved");
    }
    let out = run("1GiB");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_image(&upstream, "team/big", &mirror, "m/big", "1");
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

/// Nothing hangs: against a registry that accepts the connection and never answers, `copy`
/// fails within a minute with the default timeouts, naming the registry, what was asked and
/// how long it waited; `sync --dry-run` asks about the whole table at once and is done within
/// a minute too.
#[test]
fn a_registry_that_never_answers_fails_copy_and_sync_within_a_minute() {
    let silent = silent_registry().to_string();
    let mirror = Registry::plain();
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("table.yaml");
    let images: String = (0..20)
        .map(|i| {
            format!(
                "  - {{source: \"{}/team/app{i}:1\", target: \"{silent}/m/app{i}:1\"}}\n",
                mirror.host()
            )
        })
        .collect();
    std::fs::write(
        &table,
        format!(
            "mirrors:\n  silent: {{type: repository, registry: \"{silent}\", prefix: m, naming: flatten}}\n\
             images:\n{images}registries:\n  \"{silent}\": {{insecure: true}}\n  \"{}\": {{insecure: true}}\n",
            mirror.host()
        ),
    )
    .unwrap();
    let timed = |mut cmd: Command| {
        std::thread::spawn(move || {
            let started = Instant::now();
            let out = cmd.output().unwrap();
            (out, started.elapsed())
        })
    };
    let mut copy = binary();
    copy.arg("copy")
        .arg(format!("{silent}/team/app:1"))
        .arg(format!("{}/m/app:1", mirror.host()))
        .args([
            "--insecure-registry",
            &silent,
            "--insecure-registry",
            &mirror.host(),
        ]);
    let mut sync = binary();
    sync.args(["sync", "--dry-run", "--config"]).arg(&table);
    let (copy, sync) = (timed(copy), timed(sync));
    let (out, took) = copy.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(took < Duration::from_secs(60), "copy took {took:?}");
    assert!(
        err.contains(&format!("no answer from {silent} in 10 s")) && err.contains("team/app:1"),
        "{err}"
    );
    let (out, took) = sync.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        took < Duration::from_secs(60),
        "sync --dry-run took {took:?}"
    );
    assert!(text.contains("20 could not be asked"), "{text}");
    assert_eq!(
        text.matches(&format!("no answer from {silent}")).count(),
        20,
        "{text}"
    );
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
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.service().pending_copies() > 0 {
            assert!(Instant::now() < deadline, "copy did not finish");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_is_kept_copied_in_the_background_then_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Registry::plain();
    let mirror = Registry::secured();
    let image = TestImage::generate(&["linux/amd64", "linux/arm64"], 3 * MIB);
    upstream.push("team/app", "1.0", &image).await;
    upstream.push("team/other", "2.0", &image).await;
    let access = format!(
        "{}{}",
        upstream.table_access(&dir.path().join("u.json")),
        mirror.table_access(&dir.path().join("m.json"))
    );
    // Generous: this test is about the copy, not the deadline.
    let hook = webhook(
        &upstream,
        &mirror.host(),
        &access,
        Duration::from_secs(8),
        "timeout: 5s",
    )
    .await;
    let source = format!("{}/team/app:1.0", upstream.host());
    let target = format!("{}/mirror/app:1.0", mirror.host());

    // First Pod: the mirror lacks the image, so the Pod keeps it and a copy is queued.
    let (pod, warnings, _) = hook.review(&source, false).await;
    assert_eq!(image_of(&pod), source);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("copy queued") && w.contains(&target)),
        "{warnings:?}"
    );
    hook.wait_copied().await;
    assert_same_image(&upstream, "team/app", &mirror, "mirror/app", "1.0");
    assert_eq!(
        hook.metric("image_mirror_copies_total", "result=\"success\""),
        1.0
    );
    assert_eq!(
        hook.metric("image_mirror_copied_bytes_total", ""),
        image.total_bytes() as f64
    );
    assert_eq!(
        hook.metric(
            "image_mirror_mirror_checks_total",
            &format!("registry=\"{}\",result=\"absent\"", mirror.host())
        ),
        1.0
    );

    // Next Pod: rewritten, with the mirror's pull secret, from the cache the copy filled.
    let (pod, _, _) = hook.review(&source, false).await;
    assert_eq!(image_of(&pod), target);
    assert_eq!(
        pod["spec"]["imagePullSecrets"],
        json!([{"name": "local-pull"}])
    );

    // A dry run of another missing image: unchanged and nothing queued, nothing written.
    let other = format!("{}/team/other:2.0", upstream.host());
    let (pod, warnings, _) = hook.review(&other, true).await;
    assert_eq!(image_of(&pod), other);
    assert!(
        warnings.iter().all(|w| !w.contains("copy queued")),
        "{warnings:?}"
    );
    assert_eq!(hook.service().pending_copies(), 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(mirror.skopeo_raw("mirror/other", "2.0").is_none());
    assert_eq!(
        hook.metric("image_mirror_copies_total", "result=\"success\""),
        1.0
    );
    hook.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_digest_never_uses_a_stale_tag_on_the_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Registry::plain();
    let mirror = Registry::plain();
    let old = TestImage::generate(&["linux/amd64"], 64 * 1024);
    let new = TestImage::generate(&["linux/amd64"], 64 * 1024);
    upstream.push("team/app", "1.0", &old).await;
    upstream.push("team/tool", "2.0", &old).await;
    let access = format!(
        "{}{}",
        upstream.table_access(&dir.path().join("u.json")),
        mirror.table_access(&dir.path().join("m.json"))
    );
    // The mirror got yesterday's 1.0; then 1.0 moved upstream.
    let registries = Registries::new(settings(&format!("registries:\n{access}")), quick(), None);
    for name in ["app:1.0", "tool:2.0"] {
        registries
            .copy(
                &r(&format!("{}/team/{name}", upstream.host())),
                &r(&format!("{}/mirror/{name}", mirror.host())),
                &[],
                None,
            )
            .await
            .unwrap();
    }
    upstream.push("team/app", "1.0", &new).await;
    let hook = Setup {
        rule: "    pin: digest\n",
        ..Setup::new(&upstream.host(), &mirror.host(), &access)
    }
    .start()
    .await;
    let source = format!("{}/team/app:1.0", upstream.host());
    let pinned = format!("{}/mirror/app:1.0@{}", mirror.host(), new.top.0);

    // The mirror has a 1.0, but not upstream's: kept, and that digest is copied.
    let (pod, warnings, _) = hook.review(&source, false).await;
    assert_eq!(image_of(&pod), source);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("copy queued") && w.contains(&pinned)),
        "{warnings:?}"
    );
    hook.wait_copied().await;
    assert_eq!(
        mirror.skopeo_raw("mirror/app", "1.0"),
        Some(new.top.1.clone())
    );
    let (pod, warnings, _) = hook.review(&source, false).await;
    assert_eq!(image_of(&pod), pinned, "{warnings:?}");
    let resolved = format!("registry=\"{}\",result=\"resolved\"", upstream.host());
    // Asked once: the second review had it from the cache.
    assert_eq!(
        hook.metric("image_mirror_upstream_digest_lookups_total", &resolved),
        1.0
    );

    // The upstream gone: today's behaviour, by tag, and the warning says why.
    let mut upstream = upstream;
    upstream.stop();
    let tool = format!("{}/team/tool:2.0", upstream.host());
    let (pod, warnings, _) = hook.review(&tool, false).await;
    assert_eq!(image_of(&pod), format!("{}/mirror/tool:2.0", mirror.host()));
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("not pinned to a digest") && w.contains("team/tool:2.0")),
        "{warnings:?}"
    );
    hook.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_wait_while_the_pull_budget_is_down_to_its_reserve() {
    let upstream = Registry::plain();
    let mirror = Registry::plain();
    let image = TestImage::generate(&["linux/amd64"], 64 * 1024);
    upstream.push("team/app", "1.0", &image).await;
    // Docker Hub's headers on a real registry: 10 pulls per 1 s window, 3 left.
    let hub = common::RateLimitProxy::start(upstream.addr(), 10, 1).await;
    hub.set_remaining(3);
    let access = format!(
        "  \"{}\": {{insecure: true, rateLimitReserve: 5}}\n  \"{}\": {{insecure: true}}\n",
        hub.host(),
        mirror.host()
    );
    let hook = Setup::new(&hub.host(), &mirror.host(), &access)
        .start()
        .await;
    let source = format!("{}/team/app:1.0", hub.host());
    let (_, warnings, _) = hook.review(&source, false).await;
    assert!(
        warnings.iter().any(|w| w.contains("copy queued")),
        "{warnings:?}"
    );
    let labels = format!("registry=\"{}\"", hub.host());
    let deadline = Instant::now() + Duration::from_secs(20);
    while hook.metric("image_mirror_copies_paused", &labels) != 1.0 {
        assert!(Instant::now() < deadline, "copies never paused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        hook.metric("image_mirror_registry_ratelimit_remaining", &labels),
        3.0
    );
    assert_eq!(
        hook.metric("image_mirror_registry_ratelimit_limit", &labels),
        10.0
    );
    // Paused across several re-reads of the budget: nothing pulled, no attempt spent.
    let heads = hub.manifest_heads();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(hub.manifest_heads() > heads, "the budget is read again");
    assert_eq!(hook.service().pending_copies(), 1);
    assert!(mirror.skopeo_raw("mirror/app", "1.0").is_none());
    assert_eq!(
        hook.metric("image_mirror_copies_total", "result=\"failure\""),
        0.0
    );

    // The window resets: the copy goes, and the gauge says so.
    hub.set_remaining(10);
    hook.wait_copied().await;
    assert_eq!(
        mirror.skopeo_raw("mirror/app", "1.0"),
        Some(image.top.1.clone())
    );
    assert_eq!(hook.metric("image_mirror_copies_paused", &labels), 0.0);
    assert_eq!(
        hook.metric("image_mirror_copies_total", "result=\"success\""),
        1.0
    );
    assert_eq!(
        hook.metric("image_mirror_registry_ratelimit_remaining", &labels),
        10.0
    );
    hook.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_faults_keep_admission_in_budget_and_copies_recover() {
    let dir = tempfile::tempdir().unwrap();
    let mut upstream = Registry::plain();
    let mut mirror = Registry::plain();
    let image = TestImage::generate(&["linux/amd64", "linux/arm64"], MIB);
    upstream.push("team/app", "1.0", &image).await;
    let proxy = FaultProxy::start(mirror.addr()).await;
    let access = format!(
        "{}  \"{}\": {{insecure: true}}\n",
        upstream.table_access(&dir.path().join("u.json")),
        proxy.host()
    );
    // Every fault is asked afresh: nothing unknown is remembered, no circuit opens.
    let checks = "timeout: 1s, unknownTtl: 0s, circuitThreshold: 1000";
    let hook = webhook(&upstream, &proxy.host(), &access, BUDGET, checks).await;
    let source = format!("{}/team/app:1.0", upstream.host());
    let target = format!("{}/mirror/app:1.0", proxy.host());

    // Every fault: answered within the budget, unchanged, nothing queued (only a proven
    // "absent" queues a copy).
    let faults: [(&str, Option<Fault>); 4] = [
        ("hanging socket", Some(Fault::Hang)),
        ("401", Some(Fault::Status(401))),
        ("429", Some(Fault::Status(429))),
        ("stopped registry", None),
    ];
    for (what, fault) in faults {
        match fault {
            Some(f) => proxy.set(f),
            None => {
                proxy.set(Fault::Pass);
                mirror.stop();
            }
        }
        let (pod, warnings, took) = hook.review(&source, false).await;
        assert_eq!(image_of(&pod), source, "{what}");
        assert!(
            took < BUDGET + Duration::from_millis(300),
            "{what}: {took:?}"
        );
        assert!(
            warnings.iter().all(|w| !w.contains("copy queued")),
            "{what}: {warnings:?}"
        );
        assert_eq!(hook.service().pending_copies(), 0, "{what}");
    }
    assert!(
        hook.metric(
            "image_mirror_mirror_checks_total",
            &format!("registry=\"{}\",result=\"timeout\"", proxy.host())
        ) >= 1.0
    );
    let checks = |result: &str| {
        let labels = format!("registry=\"{}\",result=\"{result}\"", proxy.host());
        hook.metric("image_mirror_mirror_checks_total", &labels)
    };
    // 429 and a stopped registry are errors; a 401 is a result of its own.
    assert!(checks("error") >= 2.0);
    assert!(checks("unauthorized") >= 1.0);
    assert!(
        hook.metric(
            "image_mirror_registry_too_many_requests_total",
            &format!("registry=\"{}\"", proxy.host())
        ) >= 1.0
    );

    // The mirror is back but the upstream is down: the copy queued now fails, and succeeds by
    // itself once the upstream returns.
    mirror.resume();
    upstream.stop();
    let (pod, warnings, _) = hook.review(&source, false).await;
    assert_eq!(image_of(&pod), source);
    assert!(
        warnings.iter().any(|w| w.contains("copy queued")),
        "{warnings:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while hook.metric("image_mirror_copies_total", "result=\"failure\"") < 1.0 {
        assert!(Instant::now() < deadline, "the copy never failed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(hook.service().pending_copies(), 1);
    upstream.resume();
    hook.wait_copied().await;
    assert_eq!(
        hook.metric("image_mirror_copies_total", "result=\"success\""),
        1.0
    );
    let (pod, _, _) = hook.review(&source, false).await;
    assert_eq!(image_of(&pod), target);
    assert_same_image(&upstream, "team/app", &mirror, "mirror/app", "1.0");

    // 429 with `Retry-After: 1` for 1.5 s: the quick back-off alone (4 tries within 0.4 s)
    // would give up, so the copy completes only if it waits as told.
    proxy.set(Fault::Status(429));
    let healer = proxy.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        healer.set(Fault::Pass);
    });
    let registries = registries_for(&format!("registries:\n{access}"));
    let copy_to = |repo: &str| {
        let target = r(&format!("{}/{repo}:1.0", proxy.host()));
        let (registries, source) = (&registries, r(&source));
        async move { registries.copy(&source, &target, &[], None).await }
    };
    let started = Instant::now();
    let report = copy_to("mirror/again").await.unwrap();
    assert!(proxy.refused() >= 2);
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(report.digest, image.top.0);
    assert_same_image(&upstream, "team/app", &mirror, "mirror/again", "1.0");

    // A registry that hangs mid-copy: the copy fails within the read timeout, naming the target.
    proxy.set(Fault::Hang);
    let started = Instant::now();
    let err = copy_to("mirror/hung").await.unwrap_err();
    assert!(err.to_string().contains(&proxy.host()), "{err}");
    // 4 tries, each an auth probe and the request at 2 s read timeout, plus back-off: bounded
    // by our settings, not by the registry.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    hook.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_copies_missing_entries_refreshes_moved_tags_and_lists_failures() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let upstream = Registry::plain();
    let mirror = Registry::secured();
    let app = TestImage::generate(&["linux/amd64", "linux/arm64"], MIB);
    let tool = TestImage::generate(&["linux/amd64"], 1024);
    upstream.push("team/app", "1.0", &app).await;
    upstream.push("team/tool", "2.0", &tool).await;
    let (u, m) = (upstream.host(), mirror.host());
    let table_text = |with_missing: bool| {
        format!(
            "mirrors:\n  local: {{type: repository, registry: \"{m}\", prefix: mirror, naming: flatten}}\n\
             images:\n\
             \x20 - {{source: \"{u}/team/app:1.0\", target: \"{m}/mirror/app:1.0\"}}\n\
             \x20 - {{source: \"{u}/team/tool:2.0\", target: \"{m}/mirror/tool:2.0\"}}\n\
             \x20 - {{source: \"{u}/team/tool:2.*\", target: \"{m}/mirror/tool:2.*\"}}\n{}\
             registries:\n{}{}",
            if with_missing {
                format!("  - {{source: \"{u}/team/ghost:1.0\", target: \"{m}/mirror/ghost:1.0\"}}\n")
            } else {
                String::new()
            },
            upstream.table_access(&dir.path().join("u.json")),
            mirror.table_access(&dir.path().join("m.json"))
        )
    };
    let path = dir.path().join("table.yaml");
    let sync = |args: &[&str]| {
        let out = binary()
            .arg("sync")
            .arg("--config")
            .arg(&path)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };

    std::fs::write(&path, table_text(false)).unwrap();
    let (ok, text, err) = sync(&["--dry-run"]);
    assert!(ok, "{text}{err}");
    assert_eq!(text.matches("would copy (missing)").count(), 2, "{text}");
    assert!(text.contains("2 would be copied, 0 up to date"), "{text}");
    assert!(!text.contains("0 copied"), "{text}");
    assert!(
        mirror.skopeo_raw("mirror/app", "1.0").is_none(),
        "a dry run writes nothing"
    );

    let (ok, text, err) = sync(&[]);
    assert!(ok, "{text}{err}");
    assert_eq!(
        text.lines().filter(|l| l.starts_with("copied ")).count(),
        2,
        "{text}"
    );
    assert!(text.contains("1 entries name no single image"), "{text}");
    assert_same_image(&upstream, "team/app", &mirror, "mirror/app", "1.0");
    assert_same_image(&upstream, "team/tool", &mirror, "mirror/tool", "2.0");

    // Nothing to do; then the upstream tag moves and only --refresh notices.
    let (ok, text, _) = sync(&[]);
    let current = |text: &str| text.lines().filter(|l| l.starts_with("up to date")).count();
    assert!(ok && current(&text) == 2, "{text}");
    let moved = TestImage::generate(&["linux/amd64"], 2048);
    upstream.push("team/tool", "2.0", &moved).await;
    assert_eq!(
        upstream.skopeo_raw("team/tool", "2.0"),
        Some(moved.top.1.clone())
    );
    let (_, text, _) = sync(&[]);
    assert_eq!(current(&text), 2, "{text}");
    let (ok, text, _) = sync(&["--refresh", "--dry-run"]);
    assert!(
        ok && text.contains("would copy (upstream digest moved)"),
        "{text}"
    );
    let (ok, text, _) = sync(&["--refresh"]);
    assert!(ok, "{text}");
    assert_eq!(
        text.lines().filter(|l| l.starts_with("copied ")).count(),
        1,
        "{text}"
    );
    assert_eq!(
        mirror.skopeo_raw("mirror/tool", "2.0"),
        Some(moved.top.1.clone())
    );

    // An entry whose source does not exist: non-zero exit, and the image is named.
    std::fs::write(&path, table_text(true)).unwrap();
    let (ok, text, err) = sync(&[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("FAILED") && text.contains("team/ghost:1.0"),
        "{text}"
    );
    // Said once, on its line, and counted in the summary.
    assert_eq!(text.matches("FAILED").count(), 1, "{text}");
    assert!(!err.contains("team/ghost"), "{err}");
    assert!(text.contains(", 1 failed ("), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_of_one_image_share_one_request_and_are_cached() {
    use image_mirror_webhook::config::ConfigHandle;
    use image_mirror_webhook::metrics::Metrics;
    use image_mirror_webhook::mirror::{MirrorAccess, Presence};

    common::init();
    let dir = tempfile::tempdir().unwrap();
    let mirror = Registry::secured();
    let image = TestImage::generate(&["linux/amd64"], 1024);
    mirror.push("mirror/app", "1.0", &image).await;
    let config = access_table(dir.path(), &[&mirror]);
    let (metrics, registry) = Metrics::new();
    let registries = Registries::new(config.settings.clone(), quick(), Some(metrics.clone()));
    let service = MirrorService::start(ConfigHandle::new(config), Arc::new(registries), metrics);
    let checks = |result: &str| {
        let labels = format!("registry=\"{}\",result=\"{result}\"", mirror.host());
        metric(&registry, "image_mirror_mirror_checks_total", &labels)
    };
    let present = r(&format!("{}/mirror/app:1.0", mirror.host()));
    let absent = r(&format!("{}/mirror/app:9.9", mirror.host()));
    let answers = futures::future::join_all((0..20).map(|_| service.presence(&present))).await;
    assert!(
        answers.iter().all(|a| *a == Presence::Present),
        "{answers:?}"
    );
    let answers = futures::future::join_all((0..20).map(|_| service.presence(&absent))).await;
    assert!(
        answers.iter().all(|a| *a == Presence::Absent),
        "{answers:?}"
    );
    assert_eq!((checks("present"), checks("absent")), (1.0, 1.0));
    // Later asks are answered from the cache.
    assert_eq!(service.presence(&present).await, Presence::Present);
    assert_eq!(service.cached(&absent), Some(Presence::Absent));
    assert_eq!((checks("present"), checks("absent")), (1.0, 1.0));

    // A pull-through warm-up is one manifest fetch through the cache URL.
    let config = access_table(dir.path(), &[&mirror]);
    let warmed = Registries::new(config.settings, quick(), None)
        .warm_up(&present)
        .await
        .unwrap();
    assert_eq!(warmed.digest, image.top.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_uploads_copy_whole_blobs_too() {
    common::init();
    let upstream = Registry::plain();
    let mirror = Registry::plain();
    let image = TestImage::generate(&["linux/amd64", "linux/arm64"], 9 * MIB);
    upstream.push("team/app", "1.0", &image).await;
    let registries = registries_for(&format!(
        "registries:\n  \"{}\": {{insecure: true}}\n  \"{}\": {{insecure: true, uploadMode: chunked}}\n",
        upstream.host(),
        mirror.host()
    ));
    let report = registries
        .copy(
            &r(&format!("{}/team/app:1.0", upstream.host())),
            &r(&format!("{}/chunked/app:1.0", mirror.host())),
            &[],
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        (report.blobs_copied, report.bytes),
        (5, image.total_bytes())
    );
    assert_same_image(&upstream, "team/app", &mirror, "chunked/app", "1.0");
    for (digest, _) in &image.blobs {
        assert!(mirror.has_blob("chunked/app", digest).await, "{digest}");
    }
}

/// `sha256:<hex>` as the tag schemas spell it.
fn schema_tag(digest: &str, suffix: &str) -> String {
    format!("{}{suffix}", digest.replace(':', "-"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_attestations_and_referrers_travel_with_the_image() {
    common::init();
    let upstream = Registry::plain();
    let mirror = Registry::plain();
    let c = upstream.client();
    let image = TestImage::generate(&["linux/amd64", "linux/arm64"], 64 * 1024);
    upstream.push("team/app", "1.0", &image).await;
    let index = (
        image.top.0.as_str(),
        image.top.1.len(),
        image.top.2.as_str(),
    );
    let arm = &image.manifests[1];
    let arm_subject = (arm.0.as_str(), arm.1.len(), arm.2.as_str());
    // cosign: a signature of the index, an attestation of one platform manifest.
    let sig = TestImage::artifact(
        index,
        "application/vnd.dev.cosign.artifact.sig.v1+json",
        false,
    );
    upstream
        .push("team/app", &schema_tag(&image.top.0, ".sig"), &sig)
        .await;
    let att = TestImage::artifact(arm_subject, "application/vnd.dsse.envelope.v1+json", false);
    upstream
        .push("team/app", &schema_tag(&arm.0, ".att"), &att)
        .await;
    // OCI 1.1: an SBOM with a subject; distribution 2.8 has no referrers API, so the index of
    // the tag schema lists it.
    let sbom_type = "application/spdx+json";
    let sbom = TestImage::artifact(index, sbom_type, true);
    upstream.push("team/app", &sbom.top.0, &sbom).await;
    let tag_index = TestImage::referrers_index(&[(&sbom, sbom_type)]);
    upstream
        .put_manifest(
            &c,
            "team/app",
            &schema_tag(&image.top.0, ""),
            &tag_index,
            common::OCI_INDEX,
        )
        .await;

    let registries = registries_for(&format!(
        "registries:\n  \"{}\": {{insecure: true}}\n  \"{}\": {{insecure: true}}\n",
        upstream.host(),
        mirror.host()
    ));
    let source = r(&format!("{}/team/app:1.0", upstream.host()));
    let target = r(&format!("{}/mirror/app:1.0", mirror.host()));
    let first = registries.copy(&source, &target, &[], None).await.unwrap();
    assert_eq!(first.referrers, 3, "{first:?}");
    // Every blob once: the artifacts share their empty config.
    let unique: std::collections::BTreeMap<&str, usize> = [&image, &sig, &att, &sbom]
        .iter()
        .flat_map(|a| a.blobs.iter().map(|(d, b)| (d.as_str(), b.len())))
        .collect();
    assert_eq!(first.bytes, unique.values().sum::<usize>() as u64);
    assert_same_image(&upstream, "team/app", &mirror, "mirror/app", "1.0");
    // Byte for byte, as an independent tool reads them.
    for reference in [
        schema_tag(&image.top.0, ".sig"),
        schema_tag(&arm.0, ".att"),
        sbom.top.0.clone(),
        schema_tag(&image.top.0, ""),
    ] {
        let (from, to) = (
            upstream.skopeo_raw("team/app", &reference),
            mirror.skopeo_raw("mirror/app", &reference),
        );
        assert!(from.is_some(), "upstream has {reference}");
        assert_eq!(from, to, "{reference} differs");
    }
    for artifact in [&sig, &att, &sbom] {
        for (digest, _) in &artifact.blobs {
            assert!(mirror.has_blob("mirror/app", digest).await, "{digest}");
        }
    }

    // Again: nothing moves.
    let second = registries.copy(&source, &target, &[], None).await.unwrap();
    assert_eq!((second.referrers, second.bytes), (0, 0), "{second:?}");

    // A referrer made since: it comes along, and the mirror's tag-schema index lists both.
    let vex_type = "application/vnd.openvex+json";
    let vex = TestImage::artifact(index, vex_type, true);
    upstream.push("team/app", &vex.top.0, &vex).await;
    let tag_index = TestImage::referrers_index(&[(&sbom, sbom_type), (&vex, vex_type)]);
    upstream
        .put_manifest(
            &c,
            "team/app",
            &schema_tag(&image.top.0, ""),
            &tag_index,
            common::OCI_INDEX,
        )
        .await;
    let third = registries.copy(&source, &target, &[], None).await.unwrap();
    assert_eq!(third.referrers, 1, "{third:?}");
    assert_eq!(
        mirror.skopeo_raw("mirror/app", &vex.top.0),
        Some(vex.top.1.clone())
    );
    let listed: Value = serde_json::from_slice(
        &mirror
            .skopeo_raw("mirror/app", &schema_tag(&image.top.0, ""))
            .unwrap(),
    )
    .unwrap();
    let digests: Vec<&str> = listed["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["digest"].as_str().unwrap())
        .collect();
    assert_eq!(digests, [sbom.top.0.as_str(), vex.top.0.as_str()]);
    assert_eq!(listed["manifests"][1]["artifactType"], vex_type);

    // One platform: the rebuilt index has nothing signed, the platform's attestation comes.
    let only_arm = r(&format!("{}/arm/app:1.0", mirror.host()));
    let platform = [Platform::parse("linux/arm64").unwrap()];
    let filtered = registries
        .copy(&source, &only_arm, &platform, None)
        .await
        .unwrap();
    assert_eq!(filtered.referrers, 1, "{filtered:?}");
    assert!(mirror
        .skopeo_raw("arm/app", &schema_tag(&arm.0, ".att"))
        .is_some());
    assert!(mirror
        .skopeo_raw("arm/app", &schema_tag(&image.top.0, ".sig"))
        .is_none());

    // Turned off: the image only.
    let bare = r(&format!("{}/bare/app:1.0", mirror.host()));
    let off = registries
        .copy_with(&source, &bare, &[], None, false)
        .await
        .unwrap();
    assert_eq!((off.referrers, off.bytes), (0, image.total_bytes()));
    assert!(mirror
        .skopeo_raw("bare/app", &schema_tag(&image.top.0, ".sig"))
        .is_none());
    assert!(mirror.skopeo_raw("bare/app", &sbom.top.0).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_mirror_is_asked_once_then_its_circuit_opens_and_heals() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Registry::plain();
    let mirror = Registry::plain();
    let proxy = FaultProxy::start(mirror.addr()).await;
    let access = format!(
        "{}  \"{}\": {{insecure: true}}\n",
        upstream.table_access(&dir.path().join("u.json")),
        proxy.host()
    );
    let checks = "timeout: 500ms, unknownTtl: 300ms, circuitThreshold: 2, circuitBackoff: 1s, \
                  circuitMaxBackoff: 2s";
    let hook = webhook(&upstream, &proxy.host(), &access, BUDGET, checks).await;
    let image = |name: &str| format!("{}/team/{name}:1.0", upstream.host());
    let checks = |result: &str| {
        let labels = format!("registry=\"{}\",result=\"{result}\"", proxy.host());
        hook.metric("image_mirror_mirror_checks_total", &labels)
    };
    let circuit = |metric: &str, labels: &str| {
        let labels = format!("registry=\"{}\"{labels}", proxy.host());
        hook.metric(metric, &labels)
    };
    let cache = |result: &str| {
        let labels = format!("result=\"{result}\"");
        hook.metric("image_mirror_mirror_check_cache_total", &labels)
    };

    proxy.set(Fault::Hang);
    let (pod, _, _) = hook.review(&image("a"), false).await;
    assert_eq!(image_of(&pod), image("a"));
    assert_eq!(checks("timeout"), 1.0);
    // The same image again: what was learnt is remembered; the registry is not asked.
    let (pod, _, took) = hook.review(&image("a"), false).await;
    assert_eq!(image_of(&pod), image("a"));
    assert!(took < Duration::from_millis(500), "{took:?}");
    assert_eq!((checks("timeout"), cache("hit")), (1.0, 1.0));
    // Once that has expired, the old answer is given at once while it is asked again behind.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (_, _, took) = hook.review(&image("a"), false).await;
    assert!(took < Duration::from_millis(500), "{took:?}");
    assert_eq!(cache("stale"), 1.0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while checks("timeout") < 2.0 {
        assert!(Instant::now() < deadline, "no second check");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Two in a row: the circuit is open.
    assert_eq!(circuit("image_mirror_registry_circuit_open", ""), 1.0);
    assert_eq!(
        circuit(
            "image_mirror_registry_circuit_transitions_total",
            ",state=\"open\""
        ),
        1.0
    );
    // Any other image of that registry is answered at once, without asking it.
    let (pod, _, took) = hook.review(&image("c"), false).await;
    assert_eq!(image_of(&pod), image("c"));
    assert!(took < Duration::from_millis(500), "{took:?}");
    assert_eq!(checks("timeout"), 2.0);
    assert_eq!(checks("circuit-open"), 1.0);

    // The mirror heals; after the back-off one probe goes through and closes the circuit.
    proxy.set(Fault::Pass);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, warnings, _) = hook.review(&image("d"), true).await;
    assert!(
        warnings.iter().any(|w| w.contains("mirror lacks")),
        "{warnings:?}"
    );
    assert_eq!(checks("absent"), 1.0);
    assert_eq!(circuit("image_mirror_registry_circuit_open", ""), 0.0);
    for state in ["half-open", "closed"] {
        let labels = format!(",state=\"{state}\"");
        assert_eq!(
            circuit("image_mirror_registry_circuit_transitions_total", &labels),
            1.0,
            "{state}"
        );
    }

    // 401: a result of its own, remembered like unknown.
    proxy.set(Fault::Status(401));
    for _ in 0..2 {
        let (pod, _, _) = hook.review(&image("e"), true).await;
        assert_eq!(image_of(&pod), image("e"));
    }
    assert_eq!(checks("unauthorized"), 1.0);
    assert_eq!(circuit("image_mirror_registry_circuit_open", ""), 0.0);
    hook.running.shutdown().await.unwrap();
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_job_without_a_kubernetes_api_copies_in_process() {
    let upstream = Registry::plain();
    let mirror = Registry::plain();
    let image = TestImage::generate(&["linux/amd64"], MIB);
    upstream.push("team/app", "1.0", &image).await;
    let access = format!(
        "  \"{}\": {{insecure: true}}\n  \"{}\": {{insecure: true}}\n",
        upstream.host(),
        mirror.host()
    );
    let hook = Setup {
        copies: ", runner: job",
        ..Setup::new(&upstream.host(), &mirror.host(), &access)
    }
    .start()
    .await;
    let source = format!("{}/team/app:1.0", upstream.host());
    let (pod, _, _) = hook.review(&source, false).await;
    assert_eq!(image_of(&pod), source);
    hook.wait_copied().await;
    // Never lost: copied here, as if no runner had been asked for.
    assert_same_image(&upstream, "team/app", &mirror, "mirror/app", "1.0");
    assert_eq!(
        hook.metric("image_mirror_copies_total", "result=\"success\""),
        1.0
    );
    assert_eq!(
        hook.metric("image_mirror_copies_total", "result=\"job\""),
        0.0
    );
    let (pod, _, _) = hook.review(&source, false).await;
    assert_eq!(image_of(&pod), format!("{}/mirror/app:1.0", mirror.host()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nested_index_is_copied_children_first_byte_for_byte() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let upstream = Registry::plain();
    let mirror = Registry::plain();
    let inner = TestImage::generate(&["linux/amd64", "linux/arm64"], MIB);
    let plain = TestImage::generate(&["linux/s390x"], MIB);
    upstream.push("team/app", "inner", &inner).await;
    upstream.push("team/app", "plain", &plain).await;
    // An index of an index and of a plain image manifest, as some build tools emit.
    let entry = |(digest, body, media_type): &(String, Vec<u8>, String)| json!({"mediaType": media_type, "digest": digest, "size": body.len()});
    let outer = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry(&inner.top), entry(&plain.manifests[0])]
    }))
    .unwrap();
    let client = upstream.client();
    upstream
        .put_manifest(
            &client,
            "team/app",
            "nested",
            &outer,
            "application/vnd.oci.image.index.v1+json",
        )
        .await;
    let table = access_table(dir.path(), &[&upstream, &mirror]);
    let registries = Registries::new(table.settings, quick(), None);
    let source = r(&format!("{}/team/app:nested", upstream.host()));
    let target = r(&format!("{}/mirror/app:nested", mirror.host()));
    let report = registries.copy(&source, &target, &[], None).await.unwrap();
    // The outer index, the inner one, its two platforms and the plain manifest.
    assert_eq!(report.manifests_copied, 5);
    assert_eq!(
        mirror.skopeo_raw("mirror/app", "nested"),
        Some(outer.clone())
    );
    assert_eq!(
        mirror.skopeo_raw("mirror/app", &inner.top.0),
        Some(inner.top.1.clone())
    );
    for (digest, body, _) in inner.manifests.iter().chain(&plain.manifests) {
        assert_eq!(
            mirror.skopeo_raw("mirror/app", digest).as_ref(),
            Some(body),
            "{digest}"
        );
    }
    for (digest, _) in inner.blobs.iter().chain(&plain.blobs) {
        assert!(mirror.has_blob("mirror/app", digest).await, "{digest}");
    }
}
