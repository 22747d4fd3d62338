//! The Helm chart against the kustomize overlays, through Helm's own SDK (helm-python-sdk,
//! Helm v4.2.3): lint, render for each overlay's values and compare object by object, the
//! schema's refusals, and package + push + pull through a loopback OCI registry.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::helm::{self, chart, render, render_at};
use serde_json::{json, Value};

const NAMESPACE: &str = "image-mirror-system";

fn deploy() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Kinds without a namespace: kustomize gives one to kinds it does not know as cluster-scoped
/// (the admission policies), and the API server drops it.
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "MutatingWebhookConfiguration",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
];

/// Objects by kind, namespace and name, without Helm's own labels and annotations, and with
/// what only the text differs in made equal (kustomize wraps a caBundle at 70 columns).
fn by_identity(objects: Vec<Value>) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for mut o in objects {
        let kind = o["kind"].as_str().unwrap().to_string();
        let meta = o["metadata"].as_object_mut().unwrap();
        if CLUSTER_SCOPED.contains(&kind.as_str()) {
            meta.remove("namespace");
        }
        for (key, helm_own) in [
            (
                "labels",
                &["helm.sh/chart", "app.kubernetes.io/managed-by"][..],
            ),
            ("annotations", &["helm.sh/resource-policy"][..]),
        ] {
            if let Some(map) = meta.get_mut(key).and_then(Value::as_object_mut) {
                for k in helm_own {
                    if map.get(*k).is_some_and(|v| v != "image-mirror-webhook") {
                        map.remove(*k);
                    }
                }
                if map.is_empty() {
                    meta.remove(key);
                }
            }
        }
        if let Some(hooks) = o.get_mut("webhooks").and_then(Value::as_array_mut) {
            for h in hooks {
                if let Some(b) = h.pointer_mut("/clientConfig/caBundle") {
                    *b = Value::from(b.as_str().unwrap().split_whitespace().collect::<String>());
                }
            }
        }
        let id = format!(
            "{kind} {}/{}",
            o["metadata"]["namespace"].as_str().unwrap_or("-"),
            o["metadata"]["name"].as_str().unwrap()
        );
        assert!(out.insert(id.clone(), o).is_none(), "{id} twice");
    }
    out
}

/// The chart with `values` renders exactly `wanted`'s objects.
fn assert_same(what: &str, values: &Value, wanted: Vec<Value>) {
    let chart = by_identity(render(values, NAMESPACE).unwrap());
    let wanted = by_identity(wanted);
    let names = |m: &BTreeMap<String, Value>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&chart), names(&wanted), "{what}: the chart's objects");
    for (id, object) in &wanted {
        assert!(
            &chart[id] == object,
            "{what}: {id} differs\nchart:\n{}\nkustomize:\n{}",
            serde_json::to_string_pretty(&chart[id]).unwrap(),
            serde_json::to_string_pretty(object).unwrap()
        );
    }
}

#[test]
fn the_chart_lints_clean() {
    for values in [
        json!({}),
        json!({"mirror": "ecr"}),
        json!({"monitoring": {"enabled": true}, "copyJobs": {"enabled": true}, "namespace": {"create": true}}),
    ] {
        let report = helm::helm(&[
            "lint",
            chart().to_str().unwrap(),
            &values.to_string(),
            NAMESPACE,
        ])
        .unwrap();
        assert_eq!(report["errors"], json!([]), "{values}: {report}");
        // Only Helm's INFO (severity 1) that a chart should have an icon: the project has none.
        for m in report["messages"].as_array().unwrap() {
            assert_eq!(
                (m["severity"].as_i64(), m["error"].as_str()),
                (Some(1), Some("icon is recommended")),
                "{values}: {m}"
            );
        }
    }
}

#[test]
fn the_chart_renders_the_ghcr_and_ecr_overlays() {
    let ghcr = common::kustomize(&deploy().join("overlays/ghcr"));
    assert_same(
        "ghcr",
        &json!({"namespace": {"create": true}}),
        ghcr.clone(),
    );
    assert_same(
        "ecr",
        &json!({"mirror": "ecr", "namespace": {"create": true}, "serviceAccount": {"annotations": {
            "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/image-mirror-webhook"}}}),
        common::kustomize(&deploy().join("overlays/ecr")),
    );
    // By default Helm's release namespace is made by `helm install --create-namespace`.
    let without: Vec<Value> = ghcr
        .into_iter()
        .filter(|o| o["kind"] != "Namespace")
        .collect();
    assert_same("ghcr, namespace not created", &json!({}), without);
    // Monitoring is deploy/monitoring applied beside the overlay.
    let mut monitored = common::kustomize(&deploy().join("overlays/ghcr"));
    monitored.extend(common::kustomize(&deploy().join("monitoring")));
    assert_same(
        "ghcr with monitoring",
        &json!({"namespace": {"create": true}, "monitoring": {"enabled": true}}),
        monitored,
    );
}

#[test]
fn the_chart_renders_the_copy_jobs_component() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("deploy");
    common::copy_tree(&deploy(), &copy);
    let overlay = copy.join("overlays/ghcr/kustomization.yaml");
    let text = std::fs::read_to_string(&overlay).unwrap();
    let with = text.replace(
        "  - ../../components/pull-secrets\n",
        "  - ../../components/pull-secrets\n  - ../../components/copy-jobs\n",
    );
    assert_ne!(text, with, "the overlay lists its components as expected");
    std::fs::write(&overlay, with).unwrap();
    assert_same(
        "ghcr with copy jobs",
        &json!({"namespace": {"create": true}, "copyJobs": {"enabled": true}}),
        common::kustomize(&copy.join("overlays/ghcr")),
    );
}

#[test]
fn the_chart_renders_the_self_signed_overlay_with_the_secret_its_notes_make() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("deploy");
    common::copy_tree(&deploy(), &copy);
    let certs = copy.join("components/self-signed");
    let out = Command::new(env!("CARGO_BIN_EXE_image-mirror-webhook"))
        .args(["certs", "--out"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(out.status.success());
    let bundle = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let values = json!({"namespace": {"create": true}, "certificates": {"source": "secret", "caBundle": bundle}});
    let (secrets, rest): (Vec<Value>, Vec<Value>) =
        common::kustomize(&copy.join("overlays/self-signed"))
            .into_iter()
            .partition(|o| o["kind"] == "Secret");
    assert_same("self-signed", &values, rest);
    // The chart holds no key: the Secret is the one NOTES.txt tells the user to create, and
    // that command makes the overlay's very Secret.
    let notes = helm::notes(&values, NAMESPACE);
    let command = notes
        .lines()
        .map(str::trim)
        .find(|l| l.contains("create secret generic image-mirror-webhook-tls"))
        .expect("NOTES.txt says how to make the Secret");
    let args: Vec<&str> = command.split_whitespace().skip(1).collect();
    // `certs --out certs`, as NOTES.txt says: run where that directory is.
    let here = dir.path().join("here");
    std::fs::create_dir_all(&here).unwrap();
    std::os::unix::fs::symlink(&certs, here.join("certs")).unwrap();
    let made = Command::new("kubectl")
        .args(&args)
        .args(["--dry-run=client", "-o", "json"])
        .current_dir(&here)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let made: Value = serde_json::from_slice(&made.stdout).unwrap();
    assert_eq!(secrets.len(), 1);
    let wanted = &secrets[0];
    assert_eq!(made["type"], wanted["type"]);
    assert_eq!(made["metadata"]["name"], wanted["metadata"]["name"]);
    assert_eq!(
        made["metadata"]["namespace"],
        wanted["metadata"]["namespace"]
    );
    let data = |o: &Value| -> BTreeMap<String, String> {
        o["data"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let joined = v.as_str().unwrap().split_whitespace().collect::<String>();
                (k.clone(), joined)
            })
            .collect()
    };
    assert_eq!(data(&made), data(wanted));
}

#[test]
fn a_wrong_value_is_refused_at_install_naming_it() {
    for (values, field) in [
        (json!({"mirror": "quay"}), "/mirror"),
        (json!({"mode": "patch"}), "/mode"),
        (json!({"certificates": {"source": "secret"}}), "caBundle"),
        (json!({"image": {"digest": "latest"}}), "/image/digest"),
        (json!({"replica": 3}), "replica"),
        (json!({"replicas": 0}), "/replicas"),
        (
            json!({"ghcr": {"pullSecrets": {"name": "Not_A_Name"}}}),
            "/ghcr/pullSecrets/name",
        ),
    ] {
        let err = render(&values, NAMESPACE).expect_err(&values.to_string());
        assert!(
            err.starts_with("HelmValuesError") && err.contains(field),
            "{values}: {err}"
        );
    }
}

#[test]
fn the_chart_goes_through_an_oci_registry_unchanged() {
    let registry = common::Registry::plain();
    let dir = tempfile::tempdir().unwrap();
    let packaged = helm::helm(&[
        "package",
        chart().to_str().unwrap(),
        dir.path().to_str().unwrap(),
    ])
    .unwrap();
    let tgz = packaged["path"].as_str().unwrap().to_string();
    let remote = format!("oci://{}/charts", registry.host());
    helm::helm(&["push", &tgz, &remote]).unwrap();
    let pulled = dir.path().join("pulled");
    std::fs::create_dir_all(&pulled).unwrap();
    let version = env!("CARGO_PKG_VERSION");
    helm::helm(&[
        "pull",
        &format!("{remote}/image-mirror-webhook"),
        version,
        pulled.to_str().unwrap(),
    ])
    .unwrap();
    let digest = |p: &Path| {
        use sha2::Digest as _;
        format!(
            "sha256:{:x}",
            sha2::Sha256::digest(std::fs::read(p).unwrap())
        )
    };
    let sent = digest(Path::new(&tgz));
    let back = pulled.join(format!("image-mirror-webhook-{version}.tgz"));
    assert_eq!(digest(&back), sent, "pulled back with the same digest");
    // The registry holds it as a Helm chart layer of that digest.
    let out = Command::new("curl")
        .args([
            "-sf",
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
        ])
        .arg(format!(
            "http://{}/v2/charts/image-mirror-webhook/manifests/{version}",
            registry.host()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the chart's manifest is in the registry"
    );
    let manifest: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.cncf.helm.config.v1+json"
    );
    assert_eq!(manifest["layers"][0]["digest"], sent.as_str());
    // The package carries the files the chart links from deploy/: it renders as the directory.
    let values = json!({"monitoring": {"enabled": true}, "mirror": "ecr"});
    assert_eq!(
        by_identity(render_at(&back, &values, NAMESPACE).unwrap()),
        by_identity(render(&values, NAMESPACE).unwrap())
    );
}
