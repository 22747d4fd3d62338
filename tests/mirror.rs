//! Checks and copies against real registries on loopback (Debian's `docker-registry`), read
//! back with `skopeo`; the webhook end to end; registry faults.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Fault, FaultProxy, Registry, TestImage};
use image_mirror_webhook::mapping::{Platform, Table};
use image_mirror_webhook::registry::{Failure, Registries, RegistryOptions};
use image_mirror_webhook::Reference;

const MIB: usize = 1024 * 1024;

fn r(s: &str) -> Reference {
    Reference::parse(s).unwrap()
}

/// A table with only `registries:` settings for the given registries.
fn access_table(dir: &Path, registries: &[&Registry]) -> Table {
    let mut text = String::from("registries:\n");
    for (i, reg) in registries.iter().enumerate() {
        text.push_str(&reg.table_access(&dir.join(format!("docker-config-{i}.json"))));
    }
    Table::parse("access.yaml", &text).unwrap()
}

fn quick() -> RegistryOptions {
    RegistryOptions {
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(5),
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
    let registries = Registries::new(quick(), None);

    let source = r(&format!("{}/team/app:1.0", upstream.host()));
    let target = r(&format!("{}/mirror/team/app:1.0", mirror.host()));
    let first = registries
        .copy(&table, &source, &target, &[], None)
        .await
        .unwrap();
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
    let second = registries
        .copy(&table, &source, &target, &[], None)
        .await
        .unwrap();
    assert_eq!((second.bytes, second.blobs_copied), (0, 0));
    assert_eq!(second.digest, image.top.0);

    // Under a new tag: the platform manifests are there already, only the index is pushed.
    let other = r(&format!("{}/mirror/team/app:1.0-copy", mirror.host()));
    let third = registries
        .copy(&table, &source, &other, &[], None)
        .await
        .unwrap();
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
    let filtered = registries
        .copy(&table, &source, &arm, &only, None)
        .await
        .unwrap();
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
        .copy(&table, &source, &pinned, &only, None)
        .await
        .unwrap_err()
        .to_string();
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
    let registries = Registries::new(quick(), None);
    let host = mirror.host();

    let digest = registries
        .manifest_digest(&table, &r(&format!("{host}/mirror/app:1.0")))
        .await
        .unwrap();
    assert_eq!(digest, image.top.0);
    for missing in ["mirror/app:2.0", "mirror/nothing:1.0"] {
        let e = registries
            .manifest_digest(&table, &r(&format!("{host}/{missing}")))
            .await
            .unwrap_err();
        assert_eq!(e.failure(), Some(&Failure::NotFound), "{missing}: {e}");
    }
    // Without the credentials: denied, which is not "absent".
    let anonymous = Table::parse(
        "t.yaml",
        &format!(
            "registries:\n  \"{host}\": {{caFile: {}}}\n",
            mirror.ca_file().unwrap().display()
        ),
    )
    .unwrap();
    let e = registries
        .manifest_digest(&anonymous, &r(&format!("{host}/mirror/app:1.0")))
        .await
        .unwrap_err();
    assert!(matches!(e.failure(), Some(Failure::Denied(_))), "{e}");
    // Without the CA: a TLS failure, also not "absent".
    let e = registries
        .manifest_digest(
            &Table::parse("t.yaml", "{}").unwrap(),
            &r(&format!("{host}/mirror/app:1.0")),
        )
        .await
        .unwrap_err();
    assert!(matches!(e.failure(), Some(Failure::Transport(_))), "{e}");
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
    // The mirror is not declared insecure: HTTPS to a plain registry fails, naming it.
    let out = run(&[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&mirror.host()), "{err}");

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
}
