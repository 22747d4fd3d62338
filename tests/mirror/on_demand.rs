//! Copies the webhook queues for an image the mirror lacks, in-process or as Jobs.

use super::*;

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
    common::quiet_period(
        Duration::from_millis(500),
        "a dry run writes nothing to the mirror",
    )
    .await;
    assert!(mirror.skopeo_raw("mirror/other", "2.0").is_none());
    assert_eq!(
        hook.metric("image_mirror_copies_total", "result=\"success\""),
        1.0
    );
    hook.running.shutdown().await.unwrap();
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
