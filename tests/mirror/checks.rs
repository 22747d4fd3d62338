//! Presence checks: what a registry answers, shared and remembered, circuits and faults.

use super::*;

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
    common::until(20, "a failed copy", || {
        (hook.metric("image_mirror_copies_total", "result=\"failure\"") >= 1.0).then_some(())
    })
    .await;
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
        common::quiet_period(
            Duration::from_millis(1500),
            "the registry answers 429 meanwhile",
        )
        .await;
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
    common::quiet_period(
        Duration::from_millis(400),
        "the remembered unknown answer expires (unknownTtl)",
    )
    .await;
    let (_, _, took) = hook.review(&image("a"), false).await;
    assert!(took < Duration::from_millis(500), "{took:?}");
    assert_eq!(cache("stale"), 1.0);
    common::until(5, "a second check", || {
        (checks("timeout") >= 2.0).then_some(())
    })
    .await;
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
    common::quiet_period(
        Duration::from_millis(1100),
        "the circuit's back-off passes before its probe",
    )
    .await;
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
