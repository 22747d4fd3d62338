//! End to end against a real kube-apiserver 1.36 (`../shared/envtest`, found through
//! `KUBEBUILDER_ASSETS`): the webhook binary runs as the ServiceAccount of `deploy/`, with the
//! RBAC of `deploy/`, and the API server calls it through a MutatingWebhookConfiguration.
//! Without `KUBEBUILDER_ASSETS` every test here says it was skipped, and `scripts/test.sh`
//! prints one line saying so.

mod common;

use std::time::{Duration, Instant};

use common::envtest::{cluster, take_turn, Cluster, Hook};
use common::random_secret;
use serde_json::{json, Value};

const SYSTEM: &str = "image-mirror-system";
/// The names the RBAC of `deploy/` allows: the copies' and the source's.
const PULL: &str = "ghcr-pull";
const SOURCE: &str = "ghcr-pull-source";

/// The cluster, with the RBAC of the GHCR overlay (pull-secrets component included).
fn with_rbac() -> Option<&'static Cluster> {
    let c = cluster()?;
    c.install_rbac("deploy/overlays/ghcr");
    Some(c)
}

/// A table whose mirror's pull secret is `secret`, copied from `source` when given.
fn table(secret: &str, source: Option<&str>) -> String {
    let from = source
        .map(|s| format!("    pullSecretFrom: {SYSTEM}/{s}\n"))
        .unwrap_or_default();
    format!(
        "mirrors:\n  ghcr:\n    type: repository\n    registry: ghcr.io\n    prefix: acme/mirror\n    naming: preserve\n    pullSecret: {secret}\n{from}\
         rules:\n  - name: hub\n    match: [\"docker.io/**\"]\n    mirror: ghcr\n    swap: always\n\
         namespaces:\n  exclude: [kube-system, {SYSTEM}]\n"
    )
}

/// A name no other test uses.
fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        random_secret().to_lowercase().replace(['_', '-'], "")[..8].to_string()
    )
}

/// The webhook as `deploy/`'s ServiceAccount.
async fn hook(c: &Cluster, table: &str) -> Hook {
    let kubeconfig = c.token_kubeconfig(SYSTEM, "image-mirror-webhook");
    Hook::start(table, &kubeconfig).await
}

fn secret(c: &Cluster, ns: &str, name: &str) -> Option<Value> {
    c.get(&["-n", ns, "secret", name])
}

fn sample(text: &str, key: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_labelled_namespace_gets_the_secret_and_a_rotation_follows() {
    let Some(c) = with_rbac() else { return };
    let _turn = take_turn().await;
    let (name, source) = (PULL, SOURCE);
    let first = c.docker_secret(SYSTEM, source, "ghcr.io");
    let h = hook(c, &table(name, Some(source))).await;
    let ns = unique("team");
    let started = Instant::now();
    c.namespace(&ns, &[("image-mirror/inject", "enabled")]);
    let copy = h.eventually(10, "the copy", || secret(c, &ns, name)).await;
    eprintln!(
        "labelled namespace got its Secret in {:?}",
        started.elapsed()
    );
    assert_eq!(copy["type"], "kubernetes.io/dockerconfigjson");
    assert_eq!(
        copy["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "image-mirror-webhook"
    );
    assert_eq!(
        copy["metadata"]["annotations"]["image-mirror/pull-secret-from"],
        format!("{SYSTEM}/{source}")
    );
    let data = |s: &Value| {
        let b = s["data"][".dockerconfigjson"].as_str().unwrap().to_string();
        String::from_utf8(
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b).unwrap(),
        )
        .unwrap()
    };
    assert_eq!(data(&copy), first);
    let managers: Vec<&str> = copy["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["manager"].as_str().unwrap())
        .collect();
    assert_eq!(managers, ["image-mirror-webhook"]);

    // Rotation: the source changes, the copy follows.
    let second = c.docker_secret(SYSTEM, source, "ghcr.io");
    assert_ne!(first, second);
    h.eventually(10, "the rotated copy", || {
        secret(c, &ns, name).filter(|s| data(s) == second)
    })
    .await;
    let text = h.metrics().await;
    assert!(
        sample(
            &text,
            &format!("image_mirror_pull_secrets_managed{{secret=\"{name}\"}}")
        ) >= 1.0,
        "{text}"
    );
    c.ok(&["label", "namespace", &ns, "image-mirror/inject-"]);
    drop(h);
}
