//! Every admission fixture through the webhook's router, without a socket: one test per
//! fixture (named after it), its patch applied to its Pod and the result checked.

mod common;

use common::*;
use serde_json::{json, Value};

/// A test named after its fixture: the review, the answer, and the Pod after the patch.
macro_rules! fixture {
    ($name:ident, |$req:ident, $resp:ident, $pod:ident| $body:block) => {
        #[tokio::test]
        async fn $name() {
            let app = App::new();
            let $req = fixture(stringify!($name));
            let $resp = app.review(&$req).await;
            let $pod = patched(&$req, &$resp);
            $body
        }
    };
}

/// A fixture whose Pod must come back untouched, with no patch at all.
macro_rules! unchanged {
    ($($name:ident),* $(,)?) => {$(
        fixture!($name, |req, resp, pod| {
            assert!(resp["response"].get("patch").is_none(), "{resp}");
            assert_eq!(pod, req["request"]["object"]);
        });
    )*};
}

/// Every fixture under tests/data/admission has a test here.
const COVERED: &[&str] = &[
    "deployment_create",
    "ephemeral_container_update",
    "ephemeral_container_update_with_pull_secret",
    "pod_digest_pinned",
    "pod_dry_run",
    "pod_image_already_on_mirror",
    "pod_in_excluded_namespace",
    "pod_many_containers",
    "pod_opted_out",
    "pod_plain",
    "pod_tag_and_digest",
    "pod_three_containers",
    "pod_unparsable_image",
    "pod_update",
    "pod_with_escaped_annotation_keys",
    "pod_with_existing_pull_secrets",
    "pod_with_image_volume",
    "pod_with_init_containers",
    "pod_with_mirror_pull_secret",
    "pod_with_null_containers",
    "pod_without_containers",
    "pod_without_spec",
];

#[test]
fn every_fixture_has_its_test() {
    assert_eq!(fixture_names(), COVERED);
}

fixture!(pod_plain, |req, resp, pod| {
    assert_eq!(
        images(&pod, "containers"),
        [format!("{MIRROR}/docker.io/library/nginx:1.27")]
    );
    assert_eq!(secrets(&pod), ["ghcr-pull"]);
    assert_eq!(original_images(&pod), json!({"web": "nginx:1.27"}));
    assert_eq!(warnings(&resp).len(), 1);
    assert!(warnings(&resp)[0]
        .contains("nginx:1.27 -> ghcr.io/ameideio/mirror/docker.io/library/nginx:1.27"));
    assert_eq!(resp["response"]["auditAnnotations"]["rewrites"], "1");
    // Nothing else in the Pod changed.
    let mut expected = req["request"]["object"].clone();
    expected["spec"]["containers"][0]["image"] = pod["spec"]["containers"][0]["image"].clone();
    expected["spec"]["imagePullSecrets"] = json!([{"name": "ghcr-pull"}]);
    expected["metadata"]["annotations"] = pod["metadata"]["annotations"].clone();
    assert_eq!(pod, expected);
});

fixture!(pod_three_containers, |_req, _resp, pod| {
    assert_eq!(
        images(&pod, "containers"),
        [
            format!("{MIRROR}/docker.io/library/nginx:1.27"),
            format!("{MIRROR}/redis:7.2.5"),
            format!("{MIRROR}/k8s-sidecar:1.30.10")
        ]
    );
    assert_eq!(secrets(&pod), ["ghcr-pull"]);
});

fixture!(pod_with_init_containers, |_req, _resp, pod| {
    assert_eq!(images(&pod, "containers"), [format!("{MIRROR}/loki:3.5.7")]);
    assert_eq!(
        images(&pod, "initContainers"),
        [
            format!("{MIRROR}/busybox:1.36.1"),
            format!("{MIRROR}/temporalio-admin-tools:1.29.1-tctl")
        ]
    );
    assert_eq!(
        original_images(&pod)["migrate"],
        "temporalio/admin-tools:1.29.1-tctl"
    );
});

fixture!(pod_digest_pinned, |_req, _resp, pod| {
    assert_eq!(
        images(&pod, "containers"),
        [format!("{MIRROR}/docker.io/library/nginx@{DIGEST}")]
    );
});

fixture!(pod_tag_and_digest, |_req, _resp, pod| {
    assert_eq!(
        images(&pod, "containers"),
        [format!("{MIRROR}/redis:7.2.5@{DIGEST}")]
    );
});

fixture!(pod_with_existing_pull_secrets, |_req, _resp, pod| {
    assert_eq!(secrets(&pod), ["team-registry", "ghcr-pull"]);
});

fixture!(pod_with_mirror_pull_secret, |_req, resp, pod| {
    assert_eq!(secrets(&pod), ["team-registry", "ghcr-pull"]);
    let ops = decoded_patch(&resp);
    assert!(
        !ops.iter().any(|o| o["path"] == "/spec/imagePullSecrets"),
        "no secret op when present: {ops:?}"
    );
});

fixture!(pod_with_image_volume, |_req, resp, pod| {
    // The kubelet pulls image volumes like containers: the Docker Hub one goes to the mirror
    // and brings the pull secret; the container and the quay.io volume are not the table's.
    assert_eq!(
        pod["spec"]["volumes"][0]["image"],
        json!({"reference": format!("{MIRROR}/redis:7.2.5"), "pullPolicy": "IfNotPresent"})
    );
    assert_eq!(
        pod["spec"]["volumes"][1]["image"]["reference"],
        "quay.io/crio/artifact:v2"
    );
    assert_eq!(images(&pod, "containers"), ["quay.io/acme/inference:2.1"]);
    assert_eq!(secrets(&pod), ["ghcr-pull"]);
    assert_eq!(
        original_images(&pod),
        json!({"volumes/models": "redis:7.2.5"})
    );
    assert!(warnings(&resp)[0].starts_with("image-mirror: volume \"models\": redis:7.2.5 -> "));
});

fixture!(pod_with_escaped_annotation_keys, |_req, resp, pod| {
    assert_eq!(
        pod["metadata"]["annotations"]["example.com/owner"],
        "team-a"
    );
    assert_eq!(pod["metadata"]["annotations"]["odd~key/with~1slash"], "x");
    assert!(decoded_patch(&resp)
        .iter()
        .any(|o| o["path"] == "/metadata/annotations/image-mirror~1original-images"));
});

unchanged!(
    pod_image_already_on_mirror,
    pod_opted_out,
    pod_in_excluded_namespace,
    deployment_create,
    pod_update,
    pod_without_containers,
    pod_without_spec,
);

fixture!(pod_unparsable_image, |_req, resp, pod| {
    assert_eq!(
        images(&pod, "containers"),
        [
            format!("{MIRROR}/docker.io/library/nginx:1.27"),
            "Docker/Docker:LATEST!".to_string()
        ]
    );
    assert!(warnings(&resp)
        .iter()
        .any(|w| w.contains("\"Docker/Docker:LATEST!\" left unchanged")));
});

fixture!(pod_with_null_containers, |_req, _resp, pod| {
    assert_eq!(pod["spec"]["containers"], Value::Null);
    assert_eq!(
        pod["spec"]["initContainers"][2]["image"],
        format!("{MIRROR}/busybox:1.36.1")
    );
});

fixture!(ephemeral_container_update, |req, resp, pod| {
    // The Pod has no pull secret for the mirror, and this subresource cannot add one: the
    // debug container keeps its image, and the warning says why.
    assert!(resp["response"].get("patch").is_none(), "{resp}");
    assert_eq!(pod, req["request"]["object"]);
    assert!(
        warnings(&resp)
            .iter()
            .any(|w| w.contains("does not reference the mirror's pull secret \"ghcr-pull\"")),
        "{resp}"
    );
});

fixture!(
    ephemeral_container_update_with_pull_secret,
    |_req, resp, pod| {
        // Only the container this update adds; the existing one cannot change.
        assert_eq!(
            images(&pod, "ephemeralContainers"),
            [
                "busybox:1.36".to_string(),
                format!("{MIRROR}/docker.io/library/busybox:1.36")
            ]
        );
        // Nothing outside /spec/ephemeralContainers: the API server would drop it.
        for op in decoded_patch(&resp) {
            let path = op["path"].as_str().unwrap();
            assert!(path.starts_with("/spec/ephemeralContainers/"), "{path}");
        }
        assert!(
            warnings(&resp)
                .iter()
                .any(|w| w.starts_with("image-mirror: original images: {")),
            "{resp}"
        );
    }
);

fixture!(pod_dry_run, |_req, resp, pod| {
    assert_eq!(
        images(&pod, "containers"),
        [format!("{MIRROR}/docker.io/library/nginx:1.27")]
    );
    assert!(resp["response"]["patch"].is_string());
});

fixture!(pod_many_containers, |_req, _resp, pod| {
    let imgs = images(&pod, "containers");
    assert_eq!(imgs.len(), 300);
    assert!(imgs.iter().all(|i| i.starts_with(MIRROR)));
    assert_eq!(secrets(&pod), ["ghcr-pull"]);
});

/// All fixtures through one webhook: the metrics count what happened, and promtool accepts them.
#[tokio::test]
async fn every_fixture_is_counted() {
    let app = App::new();
    for name in COVERED {
        app.review(&fixture(name)).await;
    }
    let text = app.metrics_text();
    promtool_check(&text);
    let count = |sample: &str| scrape(&text, sample);
    assert_eq!(
        count("image_mirror_admission_requests_total{operation=\"CREATE\",result=\"patched\"}"),
        13.0
    );
    assert_eq!(
        count("image_mirror_admission_requests_total{operation=\"UPDATE\",result=\"patched\"}"),
        1.0
    );
    assert_eq!(
        count("image_mirror_skips_total{reason=\"pull-secret-missing\"}"),
        1.0
    );
    assert_eq!(
        count("image_mirror_admission_requests_total{operation=\"CREATE\",result=\"skipped\"}"),
        3.0
    );
    assert_eq!(
        count("image_mirror_skips_total{reason=\"pod-opted-out\"}"),
        1.0
    );
    assert_eq!(
        count("image_mirror_skips_total{reason=\"namespace-excluded\"}"),
        1.0
    );
    assert_eq!(
        count("image_mirror_skips_total{reason=\"already-mirrored\"}"),
        1.0
    );
    assert_eq!(count("image_mirror_unparsable_images_total"), 1.0);
    assert!(
        count("image_mirror_rewrites_total{namespace=\"team-a\",source_registry=\"docker.io\",mirror=\"ghcr\",kind=\"container\"}")
            >= 300.0
    );
    // Every patched CREATE but one (its Pod has the secret); never on the ephemeral subresource.
    assert_eq!(
        count("image_mirror_pull_secrets_injected_total{secret=\"ghcr-pull\"}"),
        12.0
    );
    assert_eq!(
        count("image_mirror_rewrites_total{namespace=\"team-a\",source_registry=\"docker.io\",mirror=\"ghcr\",kind=\"image-volume\"}"),
        1.0
    );
    assert_eq!(count("image_mirror_build_info{version=\"0.1.0\"}"), 1.0);
}

#[tokio::test]
async fn bodies_that_are_not_reviews_get_400_with_one_line() {
    let app = App::new();
    for body in [
        "{not json",
        "[]",
        r#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1"}"#,
        r#"{"kind":"Pod"}"#,
    ] {
        let (status, text) = app.post(body.as_bytes().to_vec()).await;
        assert_eq!(status, 400, "{body}");
        let text = String::from_utf8(text).unwrap();
        assert!(
            !text.trim().is_empty() && !text.trim().contains('\n'),
            "one line: {text:?}"
        );
    }
    let text = app.metrics_text();
    assert_eq!(
        scrape(
            &text,
            "image_mirror_admission_requests_total{operation=\"\",result=\"invalid\"}"
        ),
        4.0
    );
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413() {
    let app = App::new();
    let mut big = fixture("pod_plain");
    big["request"]["object"]["metadata"]["annotations"] =
        json!({"padding": "x".repeat(4 * 1024 * 1024)});
    let (status, _) = app.post(serde_json::to_vec(&big).unwrap()).await;
    assert_eq!(status, 413);
}

/// A forged review can name any namespace: the rewrite metrics take only namespaces the
/// cluster has, and count the rest as `other`, so made-up names cannot grow them.
#[tokio::test]
async fn forged_namespaces_do_not_grow_the_metrics() {
    let app = App::new();
    for n in 0..50 {
        let mut forged = fixture("pod_plain");
        forged["request"]["namespace"] = json!(format!("made-up-{n}"));
        forged["request"]["object"]["metadata"]["namespace"] = json!(format!("made-up-{n}"));
        let answer = app.review(&forged).await;
        assert!(
            answer["response"]["patch"].is_string(),
            "still rewritten: {answer}"
        );
    }
    app.review(&fixture("pod_plain")).await;
    let text = app.metrics_text();
    promtool_check(&text);
    let series = |ns: &str| {
        scrape(
            &text,
            &format!("image_mirror_rewrites_total{{namespace=\"{ns}\",source_registry=\"docker.io\",mirror=\"ghcr\",kind=\"container\"}}"),
        )
    };
    assert!(series("other") >= 50.0, "{text}");
    assert!(series("team-a") >= 1.0, "{text}");
    assert!(!text.contains("made-up"), "{text}");
}

#[tokio::test]
async fn the_embedded_table_rewrites_what_the_runbook_mirrored() {
    let app = App::with_table(None);
    let req = fixture("pod_three_containers");
    let resp = app.review(&req).await;
    let pod = patched(&req, &resp);
    // No mirror checks here: the catch-all rule swaps only if present, so nginx stays.
    assert_eq!(
        images(&pod, "containers"),
        [
            "nginx:1.27".to_string(),
            format!("{MIRROR}/redis:7.2.5"),
            format!("{MIRROR}/k8s-sidecar:1.30.10")
        ]
    );
    assert_eq!(secrets(&pod), ["ghcr-pull"]);
}

/// Report-only mode, fixture by fixture: the same decisions as `/mutate`, nothing patched, the
/// kubectl user told what would change, and the audit log given the record.
#[tokio::test]
async fn report_mode_decides_the_same_and_patches_nothing() {
    let app = App::new();
    let mut reported = 0;
    for name in COVERED {
        let req = fixture(name);
        let enforced = app.review(&req).await;
        let report = app.review_at("/report", &req).await;
        let r = &report["response"];
        assert!(
            r.get("patch").is_none() && r.get("patchType").is_none(),
            "{name}: {report}"
        );
        let done: Vec<String> = warnings(&enforced)
            .into_iter()
            .filter(|w| w.contains(" -> "))
            .collect();
        for w in &done {
            let (head, change) = w.split_once(": ").unwrap().1.split_once(": ").unwrap();
            let would = format!("image-mirror: {head}: would rewrite {change}");
            assert!(
                warnings(&report).contains(&would),
                "{name}: no {would:?} in {report}"
            );
        }
        let audit = r["auditAnnotations"]["would-rewrite"].as_str();
        if done.is_empty() {
            assert!(audit.is_none(), "{name}: {report}");
            continue;
        }
        reported += 1;
        let record: Value = serde_json::from_str(audit.unwrap()).unwrap();
        assert_eq!(record.as_object().unwrap().len(), done.len(), "{name}");
        // Each target is what `/mutate` put there.
        let pod = patched(&req, &enforced);
        for (key, target) in record.as_object().unwrap() {
            let found = ["containers", "initContainers", "ephemeralContainers"]
                .iter()
                .flat_map(|l| images(&pod, l))
                .chain(
                    pod["spec"]["volumes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|v| v["image"]["reference"].as_str().map(str::to_string)),
                )
                .any(|i| i == *target);
            assert!(
                found,
                "{name}: {key} -> {target} is not in the enforced Pod"
            );
        }
    }
    assert!(reported >= 10, "{reported}");
    let text = app.metrics_text();
    promtool_check(&text);
    assert!(
        scrape(
            &text,
            "image_mirror_would_rewrite_total{namespace=\"team-a\",source_registry=\"docker.io\",mirror=\"ghcr\",kind=\"container\"}"
        ) >= 300.0
    );
    assert!(
        scrape(
            &text,
            "image_mirror_admission_requests_total{operation=\"CREATE\",result=\"reported\"}"
        ) >= 10.0
    );
}

/// A mirror that lacks everything, and remembers the copies asked of it.
#[derive(Default)]
struct EmptyMirror(std::sync::Mutex<Vec<String>>);

impl image_mirror_webhook::mirror::MirrorAccess for EmptyMirror {
    fn presence<'a>(
        &'a self,
        _target: &'a image_mirror_webhook::Reference,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = image_mirror_webhook::mirror::Presence> + Send + 'a>,
    > {
        Box::pin(std::future::ready(
            image_mirror_webhook::mirror::Presence::Absent,
        ))
    }
    fn request_copy(&self, copy: image_mirror_webhook::mirror::CopyRequest) -> bool {
        self.0.lock().unwrap().push(copy.target.to_string());
        true
    }
}

#[tokio::test]
async fn report_mode_still_queues_copies_so_mirrors_are_warm_before_the_switch() {
    let mirror = std::sync::Arc::new(EmptyMirror::default());
    let table = "mirrors:\n  m: {type: repository, registry: ghcr.io, prefix: m, naming: preserve}\n\
                 rules:\n  - {match: [\"docker.io/**\"], mirror: m, swap: if-present, copy: on-demand}\n";
    let app = App::with_mirrors(table, mirror.clone());
    let req = fixture("pod_plain");
    let report = app.review_at("/report", &req).await;
    assert!(report["response"].get("patch").is_none());
    assert!(
        warnings(&report)
            .iter()
            .any(|w| w.contains("mirror lacks") && w.contains("copy queued")),
        "{report}"
    );
    assert_eq!(
        *mirror.0.lock().unwrap(),
        ["ghcr.io/m/docker.io/library/nginx:1.27"]
    );
}
