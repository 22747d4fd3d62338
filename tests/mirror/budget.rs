//! Docker Hub's pull budget: copies pause at the reserve.

use super::*;

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
    common::until(20, "copies paused", || {
        (hook.metric("image_mirror_copies_paused", &labels) == 1.0).then_some(())
    })
    .await;
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
    common::until(10, "the budget read again", || {
        (hub.manifest_heads() >= heads + 2).then_some(())
    })
    .await;
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
