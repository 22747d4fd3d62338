//! MirroredImage records against a real kube-apiserver (`KUBEBUILDER_ASSETS`, as for the
//! tests): the RSS of `serve` (the debug binary the tests use, as `deploy/`'s ServiceAccount)
//! with 10,000 objects in its watch cache (target ≤ 64 MiB); the writes a rollout of 1,000 Pods
//! over 50 images costs (target ≤ 100); and admission latency with the records against
//! without them (no rights on the resource), the same 1,000 reviews (target: p99 within 10 %).
//!   KUBEBUILDER_ASSETS=$(../shared/envtest/setup.sh target/envtest) cargo bench --bench records

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::envtest::{cluster, Cluster, Hook};
use futures::StreamExt as _;
use serde_json::json;

const OBJECTS: usize = 10_000;
const PODS: usize = 1_000;
const IMAGES: usize = 50;
const SYSTEM: &str = "image-mirror-system";

/// `PODS` reviews over `IMAGES` images, 8 at a time, straight to `/mutate`; each latency (ms).
/// `PODS` reviews after a warm-up (connections and first answers are not what is measured).
async fn rollout(hook: &Hook, tag: &str) -> Vec<f64> {
    warm_up(hook).await;
    reviews(hook, tag, PODS).await
}

async fn warm_up(hook: &Hook) {
    reviews(hook, "warm-up", 100).await;
}

async fn reviews(hook: &Hook, tag: &str, count: usize) -> Vec<f64> {
    let client = hook.client();
    let mut times: Vec<f64> = futures::stream::iter(0..count)
        .map(|i| {
            let client = client.clone();
            let image = format!("docker.io/bench/app-{}:{tag}", i % IMAGES);
            async move {
                let started = Instant::now();
                let answer = hook
                    .review_with(&client, "rollout", &format!("r-{i}"), &image)
                    .await;
                assert!(answer["response"]["patch"].is_string(), "{answer}");
                started.elapsed().as_secs_f64() * 1000.0
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    times.sort_by(f64::total_cmp);
    times
}

/// Waits until `hook`'s watch cache holds every object (the phase gauge, refreshed every 10 s).
async fn filled(hook: &Hook) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = hook.metrics().await;
        let total: f64 = [
            "Unknown", "Present", "Missing", "Copying", "Failed", "WarmedUp",
        ]
        .iter()
        .map(|p| common::sample(&text, &format!("image_mirror_images{{phase=\"{p}\"}}")))
        .sum();
        if total >= OBJECTS as f64 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the cache never held every object"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
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

/// A ServiceAccount with every right of the overlay but the records'.
fn without_records(c: &Cluster) -> std::path::PathBuf {
    let sa = format!("bench-no-records-{}", std::process::id());
    c.ok(&["-n", SYSTEM, "create", "serviceaccount", &sa]);
    let subject = format!("{SYSTEM}:{sa}");
    for role in ["image-mirror-webhook", "image-mirror-webhook-pull-secrets"] {
        c.ok(&[
            "create",
            "clusterrolebinding",
            &format!("{sa}-{role}"),
            &format!("--clusterrole={role}"),
            &format!("--serviceaccount={subject}"),
        ]);
    }
    c.token_kubeconfig(SYSTEM, &sa)
}

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
        let crd = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/components/mirrored-images/crd.yaml");
        c.ok(&["apply", "--server-side", "-f", crd]);
        c.ok(&["wait", "--for=condition=Established", "--timeout=30s", "crd/mirroredimages.image-mirror.dev"]);
        let admin = kube::Client::try_from(
            kube::Config::from_custom_kubeconfig(
                kube::config::Kubeconfig::read_from(&c.admin).unwrap(),
                &Default::default(),
            )
            .await
            .unwrap(),
        )
        .unwrap();
        let api: kube::Api<image_mirror_webhook::cluster::images::crd::MirroredImage> =
            kube::Api::all(admin);
        let started = Instant::now();
        futures::stream::iter(0..OBJECTS)
            .map(|i| {
                let api = api.clone();
                async move {
                    let o: image_mirror_webhook::cluster::images::crd::MirroredImage =
                        serde_json::from_value(json!({"apiVersion": "image-mirror.dev/v1alpha1",
                            "kind": "MirroredImage",
                            "metadata": {"name": format!("bench-{i:05}"),
                                "labels": {"image-mirror.dev/recorded-by": "admission"}},
                            "spec": {"source": format!("docker.io/filler/image-{i}:1.0.{i}"),
                                "target": format!("ghcr.io/acme/mirror/filler/image-{i}:1.0.{i}")}}))
                        .unwrap();
                    let _ = api.create(&Default::default(), &o).await;
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<()>>()
            .await;
        println!(
            "{OBJECTS} MirroredImage objects created in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let table = "mirrors:\n  ghcr: {type: repository, registry: ghcr.io, prefix: acme/mirror, naming: preserve}\n\
                     rules:\n  - {match: [\"docker.io/**\"], mirror: ghcr, swap: always}\n";
        let kubeconfig = c.token_kubeconfig(SYSTEM, "image-mirror-webhook");
        let hook = Hook::start(table, &kubeconfig).await;
        filled(&hook).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        println!(
            "serve RSS with {OBJECTS} MirroredImage objects in its cache: {:.1} MiB (target 64 MiB)",
            common::rss_mib(hook.pid())
        );

        let writes = |text: &str| {
            common::sample(text, "image_mirror_image_record_writes_total{result=\"success\"}")
                + common::sample(text, "image_mirror_image_record_writes_total{result=\"error\"}")
        };
        warm_up(&hook).await;
        let mut before = -1.0;
        loop {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let text = hook.metrics().await;
            let now = writes(&text);
            if common::sample(&text, "image_mirror_image_record_queue") == 0.0 && now == before {
                break;
            }
            before = now;
        }
        let with = reviews(&hook, "1", PODS).await;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last = -1.0;
        loop {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let text = hook.metrics().await;
            let now = writes(&text);
            if common::sample(&text, "image_mirror_image_record_queue") == 0.0 && now == last {
                println!(
                    "a rollout of {PODS} Pods over {IMAGES} images: {} writes (target 100); RSS {:.1} MiB",
                    now - before,
                    common::rss_mib(hook.pid())
                );
                break;
            }
            last = now;
            assert!(Instant::now() < deadline, "the writer never drained");
        }
        drop(hook);
        let off = Hook::start(table, &without_records(c)).await;
        let without = rollout(&off, "1").await;
        let with_again = {
            drop(off);
            let hook = Hook::start(table, &kubeconfig).await;
            filled(&hook).await;
            rollout(&hook, "2").await
        };
        println!("admission, {PODS} reviews 8 at a time, with the records:    {}", summary(&with));
        println!("admission, the same, records off (no rights):              {}", summary(&without));
        println!("admission, with the records again (50 new images):         {}", summary(&with_again));
    });
}
