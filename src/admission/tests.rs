//! The pure core of admission: a review and a table in, a plan, then a mutation. Every patch is
//! applied to its Pod with a strict RFC 6902 implementation.

use serde_json::{json, Value};

use super::*;
use crate::mirror::CopyMode;

const TABLE: &str = r#"
mirrors:
  ghcr: {type: repository, registry: ghcr.io, prefix: m, naming: flatten, pullSecret: ghcr-pull}
  ecr: {type: pull-through, registry: 1.dkr.ecr.eu-west-1.amazonaws.com, upstreams: {quay.io: quay}}
images:
  - {source: "redis:7.2.5", target: "ghcr.io/m/redis:7.2.5"}
rules:
  - {name: no-copies, match: ["docker.io/library/alpine"], mirror: ghcr, copy: off}
  - {name: hub, match: ["docker.io/library/*"], exclude: ["docker.io/library/busybox"], mirror: ghcr}
  - {name: quay, match: ["quay.io/**"], mirror: ecr, swap: if-present, copy: on-demand}
namespaces: {exclude: [kube-system]}
"#;

fn table() -> Table {
    crate::config::Config::parse("t.yaml", TABLE)
        .map(|c| c.table)
        .unwrap()
}

/// A parsed review, with the Pod as sent (what a patch applies to).
struct Case {
    review: Review,
    pod: Value,
}

impl std::ops::Deref for Case {
    type Target = Review;
    fn deref(&self) -> &Review {
        &self.review
    }
}

impl std::ops::DerefMut for Case {
    fn deref_mut(&mut self) -> &mut Review {
        &mut self.review
    }
}

/// The case of a review body.
fn case(body: Value) -> Case {
    Case {
        review: Review::parse(&serde_json::to_vec(&body).unwrap()).unwrap(),
        pod: body["request"]["object"].clone(),
    }
}

/// A review of `operation` on a Pod with these `(name, image)` containers.
fn review(operation: &str, containers: &[(&str, &str)], extra: Value) -> Case {
    let containers: Vec<Value> = containers
        .iter()
        .map(|(n, i)| json!({"name": n, "image": i}))
        .collect();
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "namespace": "team-a"},
        "spec": {"containers": containers}});
    json_patch::merge(&mut pod, &extra);
    let body = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u1", "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "team-a", "operation": operation, "object": pod}});
    case(body)
}

fn finish<'r>(review: &'r Review, table: &Table, presence: Presence) -> Mutation<'r> {
    finish_with(review, table, presence, &|_, _| true)
}

fn finish_with<'r>(
    review: &'r Review,
    table: &Table,
    presence: Presence,
    secrets: SecretLookup,
) -> Mutation<'r> {
    plan(review, table, secrets).finish(&|_| presence)
}

/// The Pod after the mutation's patch.
fn patched(case: &Case, m: &Mutation) -> Value {
    let mut pod = case.pod.clone();
    json_patch::patch(&mut pod, &json_patch::Patch(m.patch.clone())).expect("patch applies");
    pod
}

/// The warnings as the kubectl user gets them, from the response.
fn sent(m: &Mutation) -> Vec<String> {
    let body: Value =
        serde_json::from_slice(&response_body("admission.k8s.io/v1", "u", m)).unwrap();
    body["response"]["warnings"]
        .as_array()
        .map(|a| a.iter().map(|w| w.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

fn images(pod: &Value) -> Vec<&str> {
    pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["image"].as_str().unwrap())
        .collect()
}

#[test]
fn plan_asks_only_about_if_present_targets_once_each() {
    let t = table();
    let r = review(
        "CREATE",
        &[
            ("a", "nginx:1"),
            ("b", "nginx:1"),
            ("c", "redis:7.2.5"),
            ("d", "quay.io/x/y:1"),
        ],
        json!({}),
    );
    let p = plan(&r, &t, &|_, _| true);
    let targets: Vec<&str> = p.targets_to_check().iter().map(|t| t.as_str()).collect();
    // redis is an exact entry (always); the quay rule swaps if present on a pull-through cache.
    assert_eq!(
        targets,
        [
            "ghcr.io/m/nginx:1",
            "1.dkr.ecr.eu-west-1.amazonaws.com/quay/x/y:1"
        ]
    );
}

#[test]
fn present_targets_are_rewritten_with_the_pull_secret_and_the_record() {
    let t = table();
    let r = review(
        "CREATE",
        &[("web", "nginx:1"), ("cache", "redis:7.2.5")],
        json!({}),
    );
    let m = finish(&r, &t, Presence::Present);
    let pod = patched(&r, &m);
    assert_eq!(images(&pod), ["ghcr.io/m/nginx:1", "ghcr.io/m/redis:7.2.5"]);
    assert_eq!(
        pod["spec"]["imagePullSecrets"],
        json!([{"name": "ghcr-pull"}])
    );
    let record: Value = serde_json::from_str(
        pod["metadata"]["annotations"][crate::patch::ORIGINAL_IMAGES_ANNOTATION]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(record, json!({"web": "nginx:1", "cache": "redis:7.2.5"}));
    assert_eq!(m.rewrites.len(), 2);
    assert_eq!(m.pull_secrets_added, ["ghcr-pull"]);
    assert!(m.copies.is_empty() && m.skips.is_empty());
    assert_eq!(m.warnings.len(), 2);
}

#[test]
fn an_absent_target_is_kept_and_copied_once_unless_dry_run_or_copy_off() {
    let t = table();
    let r = review(
        "CREATE",
        &[("a", "nginx:1"), ("b", "nginx:1"), ("c", "quay.io/x/y:1")],
        json!({}),
    );
    let m = finish(&r, &t, Presence::Absent);
    assert!(m.patch.is_empty(), "nothing to rewrite: {:?}", m.patch);
    assert_eq!(m.skips, [Skip::MirrorAbsent; 3]);
    let modes: Vec<(&str, CopyMode)> = m
        .copies
        .iter()
        .map(|c| (c.target.as_str(), c.mode))
        .collect();
    assert_eq!(
        modes,
        [
            ("ghcr.io/m/nginx:1", CopyMode::Copy),
            (
                "1.dkr.ecr.eu-west-1.amazonaws.com/quay/x/y:1",
                CopyMode::WarmUp
            )
        ]
    );
    assert!(
        m.warnings.iter().all(|w| w.contains("(copy queued)")),
        "{:?}",
        m.warnings
    );

    let mut dry = review("CREATE", &[("a", "nginx:1")], json!({}));
    dry.request.dry_run = Some(true);
    let m = finish(&dry, &t, Presence::Absent);
    assert!(m.copies.is_empty());
    assert!(!m.warnings[0].contains("copy queued"), "{:?}", m.warnings);

    let off = review("CREATE", &[("a", "alpine:3")], json!({}));
    let m = finish(&off, &t, Presence::Absent);
    assert!(m.copies.is_empty());
    assert_eq!(m.skips, [Skip::MirrorAbsent]);
    assert!(
        m.warnings[0].contains("mirror lacks ghcr.io/m/alpine:3"),
        "{:?}",
        m.warnings
    );
}

#[test]
fn unknown_presence_keeps_the_image_silently_exact_entries_still_rewrite() {
    let t = table();
    let r = review(
        "CREATE",
        &[("a", "nginx:1"), ("c", "redis:7.2.5")],
        json!({}),
    );
    let m = finish(&r, &t, Presence::Unknown);
    assert_eq!(
        images(&patched(&r, &m)),
        ["nginx:1", "ghcr.io/m/redis:7.2.5"]
    );
    assert_eq!(m.skips, [Skip::MirrorUnknown]);
    assert!(m.copies.is_empty());
}

#[test]
fn requests_that_are_not_for_us_are_skipped_whole() {
    let t = table();
    let opted_out = review(
        "CREATE",
        &[("a", "nginx:1")],
        json!({"metadata": {"labels": {"image-mirror/inject": "disabled"}}}),
    );
    assert_eq!(
        finish(&opted_out, &t, Presence::Present).skips,
        [Skip::PodOptedOut]
    );
    let delete = review("DELETE", &[("a", "nginx:1")], json!({}));
    assert_eq!(
        finish(&delete, &t, Presence::Present).skips,
        [Skip::NotAPod]
    );
    let mut excluded = review("CREATE", &[("a", "nginx:1")], json!({}));
    excluded.request.namespace = Some("kube-system".into());
    let m = finish(&excluded, &t, Presence::Present);
    assert_eq!(m.skips, [Skip::NamespaceExcluded]);
    assert!(m.patch.is_empty() && m.warnings.is_empty());
}

#[test]
fn unparsable_and_unmatched_images_are_kept_with_their_reason() {
    let t = table();
    let r = review(
        "CREATE",
        &[("a", "Not/Valid"), ("b", "busybox:1"), ("c", "gcr.io/x:1")],
        json!({}),
    );
    let m = finish(&r, &t, Presence::Present);
    assert_eq!(
        m.skips,
        [
            Skip::Image(KeepReasonKind::Unparsable),
            Skip::Image(KeepReasonKind::Excluded),
            Skip::Image(KeepReasonKind::NoMatch)
        ]
    );
    assert_eq!(m.warnings.len(), 1);
    assert!(
        m.warnings[0].contains("\"Not/Valid\" left unchanged"),
        "{:?}",
        m.warnings
    );
    assert!(m.patch.is_empty());
}

/// A `kubectl debug` review: a Pod with `secrets`, adding a debug container running nginx:2.
fn debug_review(secrets: Value) -> Case {
    let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app", "image": "nginx:1"}],
        "imagePullSecrets": secrets,
        "ephemeralContainers": [{"name": "old", "image": "busybox:2"}, {"name": "debug", "image": "nginx:2"}]}});
    let old = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app", "image": "nginx:1"}],
        "ephemeralContainers": [{"name": "old", "image": "busybox:2"}]}});
    let body = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u", "resource": {"group": "", "version": "v1", "resource": "pods"},
            "subResource": "ephemeralcontainers", "namespace": "team-a", "operation": "UPDATE",
            "object": pod, "oldObject": old}});
    case(body)
}

#[test]
fn ephemeral_updates_touch_only_the_added_container_and_only_its_image() {
    let t = table();
    let r = debug_review(json!([{"name": "ghcr-pull"}]));
    let m = finish(&r, &t, Presence::Present);
    // The API server keeps nothing else on this subresource: no secret, no annotation.
    let paths: Vec<String> = m
        .patch
        .iter()
        .map(|op| {
            serde_json::to_value(op).unwrap()["path"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(paths, ["/spec/ephemeralContainers/1/image"]);
    let out = patched(&r, &m);
    assert_eq!(
        out["spec"]["ephemeralContainers"][1]["image"],
        "ghcr.io/m/nginx:2"
    );
    assert_eq!(out["spec"]["ephemeralContainers"][0]["image"], "busybox:2");
    assert_eq!(out["spec"]["containers"][0]["image"], "nginx:1");
    // What the annotation would have said goes to the kubectl user.
    assert!(
        sent(&m)
            .iter()
            .any(|w| w == r#"image-mirror: original images: {"debug":"nginx:2"}"#),
        "{:?}",
        m.warnings
    );
}

#[test]
fn a_debug_container_stays_put_when_the_pod_lacks_the_mirror_s_pull_secret() {
    let t = table();
    for secrets in [Value::Null, json!([{"name": "other"}])] {
        let r = debug_review(secrets);
        let m = finish(&r, &t, Presence::Present);
        assert!(m.patch.is_empty(), "{:?}", m.patch);
        assert_eq!(m.skips, [Skip::PullSecretMissing]);
        assert!(
            m.warnings[0].contains("does not reference the mirror's pull secret \"ghcr-pull\""),
            "{:?}",
            m.warnings
        );
    }
}

#[test]
fn a_namespace_without_the_pull_secret_keeps_the_image_and_asks_no_registry() {
    let t = table();
    let r = review(
        "CREATE",
        &[("web", "nginx:1"), ("q", "quay.io/x/y:1")],
        json!({}),
    );
    let only_elsewhere = |ns: &str, secret: &str| ns == "team-b" && secret == "ghcr-pull";
    let p = plan(&r, &t, &only_elsewhere);
    // The ECR mirror needs no secret, so only its target is asked about.
    let targets: Vec<&str> = p.targets_to_check().iter().map(|t| t.as_str()).collect();
    assert_eq!(targets, ["1.dkr.ecr.eu-west-1.amazonaws.com/quay/x/y:1"]);
    let m = finish_with(&r, &t, Presence::Present, &only_elsewhere);
    let pod = patched(&r, &m);
    assert_eq!(
        images(&pod),
        ["nginx:1", "1.dkr.ecr.eu-west-1.amazonaws.com/quay/x/y:1"]
    );
    assert!(pod["spec"].get("imagePullSecrets").is_none());
    assert_eq!(m.skips, [Skip::PullSecretMissing]);
    assert_eq!(
        sent(&m)[0],
        "image-mirror: container \"web\": kept nginx:1: the mirror's pull secret \"ghcr-pull\" \
         is missing in namespace \"team-a\""
    );
}

#[test]
fn review_names_the_pod_and_its_namespace() {
    let r = review(
        "CREATE",
        &[],
        json!({"metadata": {"name": null, "generateName": "web-"}}),
    );
    assert_eq!(r.pod_name(), "web-");
    assert_eq!(r.namespace(), "team-a");
    assert_eq!(r.operation(), "CREATE");
    for (body, want) in [
        (&b"{not json"[..], "invalid"),
        (br#"{"kind":"Pod"}"#, "invalid"),
        (br#"{"kind":"AdmissionReview"}"#, "invalid"),
    ] {
        assert_eq!(Review::parse(body).unwrap_err().metric_label(), want);
    }
}

const PINNED: &str = r#"
mirrors:
  ghcr: {type: repository, registry: ghcr.io, prefix: m, naming: flatten}
  ecr: {type: pull-through, registry: 1.dkr.ecr.eu-west-1.amazonaws.com, upstreams: {docker.io: hub}}
images:
  - {source: "redis:7.2.5", target: "ghcr.io/m/redis:7.2.5-mirrored", pin: digest}
rules:
  - {match: ["docker.io/library/nginx"], mirror: ghcr, pin: digest}
  - {match: ["docker.io/library/*"], mirror: ecr, pin: digest}
"#;

const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

#[test]
fn pin_digest_rewrites_checks_and_copies_the_tag_s_upstream_digest() {
    let t = crate::config::Config::parse("t.yaml", PINNED)
        .map(|c| c.table)
        .unwrap();
    let r = review(
        "CREATE",
        &[
            ("web", "nginx:1.27"),
            ("cache", "redis:7.2.5"),
            ("db", "index.docker.io/library/postgres:16"),
            // Already pinned by the Pod: nothing to ask.
            ("side", &format!("busybox:1@{D}")),
        ],
        json!({}),
    );
    let mut p = plan(&r, &t, &|_, _| true);
    let asked: Vec<String> = p.sources_to_pin().iter().map(|s| s.to_string()).collect();
    assert_eq!(
        asked,
        [
            "docker.io/library/nginx:1.27",
            "docker.io/library/redis:7.2.5",
            "docker.io/library/postgres:16"
        ]
    );
    p.pin(&|s| {
        assert!(s.digest().is_none());
        Upstream::Digest(D.to_string())
    });
    let checked: Vec<String> = p.targets_to_check().iter().map(|t| t.to_string()).collect();
    assert_eq!(checked, [format!("ghcr.io/m/nginx:1.27@{D}")]);
    let m = p.finish(&|_| Presence::Absent);
    // Absent by digest: kept, and that digest is what gets copied.
    assert_eq!(m.copies.len(), 1);
    assert_eq!(
        m.copies[0].source.to_string(),
        format!("docker.io/library/nginx:1.27@{D}")
    );
    assert_eq!(
        m.copies[0].target.to_string(),
        format!("ghcr.io/m/nginx:1.27@{D}")
    );
    let pod = patched(&r, &m);
    assert_eq!(
        images(&pod),
        [
            "nginx:1.27",
            &format!("ghcr.io/m/redis:7.2.5-mirrored@{D}"),
            &format!("1.dkr.ecr.eu-west-1.amazonaws.com/hub/library/postgres:16@{D}"),
            &format!("1.dkr.ecr.eu-west-1.amazonaws.com/hub/library/busybox:1@{D}"),
        ]
    );
    let mut p = plan(&r, &t, &|_, _| true);
    p.pin(&|_| Upstream::Digest(D.to_string()));
    let m = p.finish(&|_| Presence::Present);
    assert_eq!(
        images(&patched(&r, &m))[0],
        format!("ghcr.io/m/nginx:1.27@{D}")
    );
    assert!(
        m.warnings.iter().all(|w| !w.contains("not pinned")),
        "{:?}",
        m.warnings
    );
}

#[test]
fn an_unanswered_digest_keeps_today_s_rewrite_and_says_so() {
    let t = crate::config::Config::parse("t.yaml", PINNED)
        .map(|c| c.table)
        .unwrap();
    let r = review(
        "CREATE",
        &[("cache", "redis:7.2.5"), ("db", "postgres:16")],
        json!({}),
    );
    let mut p = plan(&r, &t, &|_, _| true);
    p.pin(&|s| {
        if s.path() == "library/redis" {
            Upstream::Unknown
        } else {
            Upstream::Absent
        }
    });
    let m = p.finish(&|_| Presence::Present);
    assert_eq!(
        images(&patched(&r, &m)),
        [
            "ghcr.io/m/redis:7.2.5-mirrored",
            "1.dkr.ecr.eu-west-1.amazonaws.com/hub/library/postgres:16"
        ]
    );
    let notes: Vec<&String> = m
        .warnings
        .iter()
        .filter(|w| w.contains("not pinned"))
        .collect();
    assert_eq!(notes.len(), 2, "{:?}", m.warnings);
    assert!(notes[0].contains("did not say in time") && notes[0].contains("redis:7.2.5"));
    assert!(notes[1].contains("has no docker.io/library/postgres:16"));
}

#[test]
fn pin_digest_is_refused_with_platforms_and_on_a_mirror() {
    let with_platforms = "mirrors:\n  g: {type: repository, registry: ghcr.io, prefix: m, platforms: [linux/amd64]}\nrules:\n  - {match: [\"docker.io/**\"], mirror: g, pin: digest}\n";
    let e = crate::config::Config::parse("t.yaml", with_platforms)
        .map(|c| c.table)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("t.yaml:4") && e.contains("rules[0].pin") && e.contains("platforms"),
        "{e}"
    );
    let on_mirror =
        "mirrors:\n  g: {type: repository, registry: ghcr.io, prefix: m, pin: digest}\n";
    let e = crate::config::Config::parse("t.yaml", on_mirror)
        .map(|c| c.table)
        .unwrap_err()
        .to_string();
    assert!(e.contains("pin"), "{e}");
    let bad = "mirrors:\n  g: {type: repository, registry: ghcr.io, prefix: m}\nrules:\n  - {match: [\"docker.io/**\"], mirror: g, pin: sha}\n";
    let e = crate::config::Config::parse("t.yaml", bad)
        .map(|c| c.table)
        .unwrap_err()
        .to_string();
    assert!(e.contains("t.yaml:4") && e.contains("sha"), "{e}");
    let off = "mirrors:\n  g: {type: repository, registry: ghcr.io, prefix: m, naming: preserve, referrers: false}\nrules:\n  - {match: [\"docker.io/**\"], mirror: g, referrers: true}\n  - {match: [\"quay.io/**\"], mirror: g}\n";
    let t = crate::config::Config::parse("t.yaml", off)
        .map(|c| c.table)
        .unwrap();
    let policy = |image: &str| t.decide(image).rewrite().unwrap().policy;
    assert!(policy("nginx:1").referrers);
    assert!(!policy("quay.io/a/b:1").referrers);
    let e = crate::config::Config::parse(
        "t.yaml",
        &off.replace("referrers: true", "referrers: yes please"),
    )
    .map(|c| c.table)
    .unwrap_err()
    .to_string();
    assert!(e.contains("t.yaml:4"), "{e}");
}

/// An UPDATE of a Pod (`kubectl set image`, a controller patching images): with `old` and `new`
/// as `(name, image)` containers, the new Pod having `secrets`.
fn update_review(old: &[(&str, &str)], new: &[(&str, &str)], secrets: Value) -> Case {
    let pod = |containers: &[(&str, &str)]| {
        let containers: Vec<Value> = containers
            .iter()
            .map(|(n, i)| json!({"name": n, "image": i}))
            .collect();
        json!({"metadata": {"name": "p", "namespace": "team-a",
            "annotations": {crate::patch::ORIGINAL_IMAGES_ANNOTATION: "{\"web\":\"nginx:1\"}"}},
            "spec": {"containers": containers, "imagePullSecrets": secrets}})
    };
    case(
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u", "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "team-a", "operation": "UPDATE", "object": pod(new), "oldObject": pod(old)}}),
    )
}

#[test]
fn an_update_rewrites_only_the_images_it_changes_and_never_adds_a_secret() {
    let t = table();
    let secret = json!([{"name": "ghcr-pull"}]);
    // kubectl set image web=nginx:2 on a Pod the webhook sent to the mirror earlier.
    let r = update_review(
        &[("web", "ghcr.io/m/nginx:1"), ("side", "busybox:1")],
        &[("web", "nginx:2"), ("side", "busybox:1")],
        secret.clone(),
    );
    let m = finish(&r, &t, Presence::Present);
    let pod = patched(&r, &m);
    assert_eq!(images(&pod), ["ghcr.io/m/nginx:2", "busybox:1"]);
    // The record keeps the first original, and nothing touches the pull secrets.
    let record: Value = serde_json::from_str(
        pod["metadata"]["annotations"][crate::patch::ORIGINAL_IMAGES_ANNOTATION]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(record, json!({"web": "nginx:1"}));
    assert_eq!(pod["spec"]["imagePullSecrets"], secret);
    assert!(m.pull_secrets_added.is_empty());

    // A no-op update, and a re-invocation after the webhook's own rewrite: nothing.
    for (old, new) in [
        (
            [("web", "ghcr.io/m/nginx:1")],
            [("web", "ghcr.io/m/nginx:1")],
        ),
        ([("web", "nginx:2")], [("web", "ghcr.io/m/nginx:2")]),
    ] {
        let r = update_review(&old, &new, secret.clone());
        let m = finish(&r, &t, Presence::Present);
        assert!(m.patch.is_empty(), "{old:?} -> {new:?}: {:?}", m.patch);
    }

    // Without the mirror's pull secret the Pod cannot get it now: the new image stays.
    let r = update_review(&[("web", "nginx:1")], &[("web", "nginx:2")], Value::Null);
    let m = finish(&r, &t, Presence::Present);
    assert!(m.patch.is_empty());
    assert_eq!(m.skips, [Skip::PullSecretMissing]);
    assert!(
        m.warnings[0].contains("on an update of the Pod it cannot be added"),
        "{:?}",
        m.warnings
    );
}
