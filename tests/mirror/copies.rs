//! Whole-image copies with the `copy` and `sync` commands and the library: bytes, tags, limits, timeouts.

use super::*;

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
