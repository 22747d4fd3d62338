//! Pull secrets against a real kube-apiserver (`KUBEBUILDER_ASSETS`, as for the tests): how long
//! a newly labelled namespace waits for its Secret (target ≤ 2 s), and the RSS of `serve` (the
//! release binary, as `deploy/`'s ServiceAccount) with 1,000 opted-in namespaces, each with an
//! unrelated Secret besides the one the webhook keeps there (target ≤ 64 MiB); and the API
//! server's time to admit a Pod with the exported MutatingAdmissionPolicy against with the
//! webhook (the same table, the same machine).
//!   KUBEBUILDER_ASSETS=$(../shared/envtest/setup.sh target/envtest) cargo bench --bench cluster

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::envtest::{cluster, Hook};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use serde_json::json;

const NAMESPACES: usize = 1000;
const PROBES: usize = 20;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let Some(c) = cluster() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        c.install_rbac("deploy/overlays/ghcr");
        c.docker_secret("image-mirror-system", "ghcr-pull-source", "ghcr.io");
        let started = Instant::now();
        let mut docs = Vec::new();
        for i in 0..NAMESPACES {
            let ns = format!("bench-{i:04}");
            docs.push(json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "labels": {"image-mirror/inject": "enabled"}}}));
            docs.push(json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "app-settings", "namespace": ns},
                "stringData": {"setting": "x".repeat(512)}}));
        }
        let list = json!({"apiVersion": "v1", "kind": "List", "items": docs});
        c.apply(&list.to_string());
        println!(
            "{NAMESPACES} opted-in namespaces and {NAMESPACES} other Secrets created in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let table = "mirrors:\n  ghcr: {type: repository, registry: ghcr.io, prefix: acme/mirror, naming: preserve, pullSecret: ghcr-pull, pullSecretFrom: image-mirror-system/ghcr-pull-source}\nrules:\n  - {match: [\"docker.io/**\"], mirror: ghcr}\n";
        let kubeconfig = c.token_kubeconfig("image-mirror-system", "image-mirror-webhook");
        let started = Instant::now();
        let h = Hook::start(table, &kubeconfig).await;
        println!(
            "serve ready (caches filled) in {:.2} s, RSS {:.1} MiB",
            started.elapsed().as_secs_f64(),
            common::rss_mib(h.pid())
        );
        let admin = kube::Client::try_from(
            kube::Config::from_custom_kubeconfig(
                kube::config::Kubeconfig::read_from(&c.admin).unwrap(),
                &Default::default(),
            )
            .await
            .unwrap(),
        )
        .unwrap();
        let secrets: Api<Secret> = Api::all(admin.clone());
        let count = || async {
            secrets
                .list_metadata(&kube::api::ListParams::default().fields("metadata.name=ghcr-pull"))
                .await
                .map(|l| l.items.len())
                .unwrap_or(0)
        };
        let deadline = Instant::now() + Duration::from_secs(300);
        while count().await < NAMESPACES && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        println!(
            "{} copies of ghcr-pull in place {:.1} s after start",
            count().await,
            started.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        let settled = common::rss_mib(h.pid());

        let mut waits = Vec::new();
        for i in 0..PROBES {
            let ns = format!("probe-{i:02}-{}", std::process::id());
            let api: Api<Secret> = Api::namespaced(admin.clone(), &ns);
            let labelled = Instant::now();
            c.namespace(&ns, &[("image-mirror/inject", "enabled")]);
            loop {
                if api.get_opt("ghcr-pull").await.ok().flatten().is_some() {
                    break;
                }
                assert!(labelled.elapsed() < Duration::from_secs(30), "no Secret in {ns}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            waits.push(labelled.elapsed().as_secs_f64() * 1000.0);
        }
        waits.sort_by(f64::total_cmp);
        let peak = common::rss_mib(h.pid());
        println!(
            "a newly labelled namespace waits for its Secret: median {:.0} ms, p90 {:.0} ms, max {:.0} ms over {PROBES} (kubectl apply included; target 2000 ms)",
            waits[PROBES / 2],
            waits[PROBES * 9 / 10],
            waits[PROBES - 1]
        );
        println!(
            "serve RSS with {} namespaces and {} Secrets: {settled:.1} MiB settled, {peak:.1} MiB after the probes (target 64 MiB)",
            NAMESPACES + PROBES,
            2 * NAMESPACES + PROBES
        );
        drop(h);
        admission_times(c, &admin).await;
    });
}

const PODS: usize = 200;

/// Creates `PODS` Pods one after the other in `ns` and returns each create's latency (ms).
async fn create_pods(admin: &kube::Client, ns: &str) -> Vec<f64> {
    use k8s_openapi::api::core::v1::Pod;
    let api: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let mut times = Vec::new();
    for i in 0..PODS {
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": format!("p{i}")},
            "spec": {"containers": [{"name": "app", "image": "redis:7.2.5"},
                {"name": "side", "image": "kiwigrid/k8s-sidecar:1.30.10"}]}}))
        .unwrap();
        let started = Instant::now();
        let created = api.create(&Default::default(), &pod).await.unwrap();
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        assert!(created.spec.unwrap().containers[0]
            .image
            .as_deref()
            .unwrap()
            .starts_with("ghcr.io/"));
    }
    times.sort_by(f64::total_cmp);
    times
}

fn summary(times: &[f64]) -> String {
    let n = times.len();
    format!(
        "median {:.2} ms, p90 {:.2} ms, p99 {:.2} ms",
        times[n / 2],
        times[n * 9 / 10],
        times[(n * 99 / 100).min(n - 1)]
    )
}

/// The same 2-container Pod admitted by the exported policy, then by the webhook.
async fn admission_times(c: &common::envtest::Cluster, admin: &kube::Client) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let table = root.join("tests/data/admission/table.yaml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_image-mirror-webhook"))
        .arg("export-policy")
        .arg("--config")
        .arg(&table)
        .output()
        .unwrap();
    c.apply(&String::from_utf8(out.stdout).unwrap());
    c.namespace("admit-policy", &[("image-mirror/inject", "enabled")]);
    // The API server takes up a new policy within seconds: wait until it rewrites.
    {
        use k8s_openapi::api::core::v1::Pod;
        let api: Api<Pod> = Api::namespaced(admin.clone(), "admit-policy");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let probe: Pod = serde_json::from_value(json!({"metadata": {"generateName": "probe-"},
                "spec": {"containers": [{"name": "app", "image": "redis:7.2.5"}]}}))
            .unwrap();
            let created = api.create(&Default::default(), &probe).await.unwrap();
            let image = created.spec.unwrap().containers[0]
                .image
                .clone()
                .unwrap_or_default();
            if image.starts_with("ghcr.io/") {
                break;
            }
            assert!(Instant::now() < deadline, "the policy never took effect");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let policy = create_pods(admin, "admit-policy").await;
    c.ok(&["delete", "mutatingadmissionpolicybinding", "image-mirror"]);
    c.ok(&["delete", "mutatingadmissionpolicy", "image-mirror"]);
    c.namespace("admit-webhook", &[("image-mirror/inject", "enabled")]);
    // The webhook sends Pods to the mirror only where its pull secret exists.
    c.docker_secret("admit-webhook", "ghcr-pull", "ghcr.io");
    let text = std::fs::read_to_string(&table).unwrap();
    let kubeconfig = c.token_kubeconfig("image-mirror-system", "image-mirror-webhook");
    let hook = Hook::start(&text, &kubeconfig).await;
    c.register("admit-webhook", &hook, &["admit-webhook"]);
    let webhook = create_pods(admin, "admit-webhook").await;
    println!(
        "admitting a 2-container Pod ({PODS} creates, one at a time): with the MutatingAdmissionPolicy {}; with the webhook {}",
        summary(&policy),
        summary(&webhook)
    );
    drop(hook);
}
