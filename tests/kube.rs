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
        &random_secret().to_lowercase().replace(['_', '-'], "")[..8]
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_labelled_namespace_gets_the_secret_and_a_rotation_follows() {
    let Some(c) = with_rbac() else { return };
    let _turn = take_turn().await;
    let (name, source) = (PULL, SOURCE);
    let first = c.docker_secret(SYSTEM, source, "ghcr.io");
    let h = hook(c, &table(name, Some(source))).await;
    let ns = unique("team");
    let _opted_in = OptedIn::new(c, &[&ns]);
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
        common::scrape(
            &text,
            &format!("image_mirror_pull_secrets_managed{{secret=\"{name}\"}}")
        ) >= 1.0,
        "{text}"
    );
    drop(h);
}

/// Takes the opt-in label off namespaces.
fn opt_out(c: &Cluster, namespaces: &[&str]) {
    for ns in namespaces {
        c.ok(&["label", "namespace", ns, "image-mirror/inject-"]);
    }
}

/// Namespaces a test opts in, opted out again when it ends, even by a panic: a later test's
/// controller would otherwise act on them.
struct OptedIn(&'static Cluster, Vec<String>);

impl OptedIn {
    fn new(c: &'static Cluster, namespaces: &[&str]) -> OptedIn {
        OptedIn(c, namespaces.iter().map(|n| n.to_string()).collect())
    }

    /// A new namespace named after `prefix`, opted in (`image-mirror/inject=enabled`).
    fn namespace(c: &'static Cluster, prefix: &str) -> (String, OptedIn) {
        let ns = unique(prefix);
        let opted_in = OptedIn::new(c, &[&ns]);
        c.namespace(&ns, &[("image-mirror/inject", "enabled")]);
        (ns, opted_in)
    }
}

impl Drop for OptedIn {
    fn drop(&mut self) {
        for ns in &self.1 {
            let _ = self
                .0
                .kubectl(&["label", "namespace", ns, "image-mirror/inject-"]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opting_out_removes_only_managed_secrets_and_a_foreign_one_is_left_alone() {
    let Some(c) = with_rbac() else { return };
    let _turn = take_turn().await;
    c.docker_secret(SYSTEM, SOURCE, "ghcr.io");
    let (ours, theirs) = (unique("ours"), unique("theirs"));
    let _opted_in = OptedIn::new(c, &[&ours, &theirs]);
    c.namespace(&theirs, &[]);
    let foreign = c.docker_secret(&theirs, PULL, "ghcr.io");
    let h = hook(c, &table(PULL, Some(SOURCE))).await;
    c.namespace(&ours, &[("image-mirror/inject", "enabled")]);
    c.namespace(&theirs, &[("image-mirror/inject", "enabled")]);
    h.eventually(10, "our copy", || secret(c, &ours, PULL))
        .await;

    // Someone else's Secret of that name: counted once, an Event on the namespace, untouched.
    let conflicts = format!("image_mirror_pull_secret_conflicts_total{{secret=\"{PULL}\"}}");
    let mut text = String::new();
    for _ in 0..100 {
        text = h.metrics().await;
        if common::scrape(&text, &conflicts) >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        common::scrape(&text, &conflicts),
        1.0,
        "{text}\n{}",
        h.log()
    );
    let event = h
        .eventually(10, "the conflict Event", || {
            let events = c.get(&["-n", SYSTEM, "events.events.k8s.io"])?;
            events["items"]
                .as_array()?
                .iter()
                .find(|e| e["related"]["namespace"] == theirs.as_str())
                .cloned()
        })
        .await;
    assert_eq!(event["reason"], "PullSecretConflict");
    assert_eq!(event["regarding"]["name"], SOURCE);
    assert_eq!(event["related"]["name"], PULL);
    assert_eq!(event["type"], "Warning");
    assert!(event["note"]
        .as_str()
        .unwrap()
        .contains(&format!("{theirs}/{PULL}")));
    let theirs_now = secret(c, &theirs, PULL).unwrap();
    assert!(theirs_now["metadata"]["labels"]
        .get("app.kubernetes.io/managed-by")
        .is_none());
    let config = theirs_now["data"][".dockerconfigjson"].as_str().unwrap();
    assert_eq!(
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, config).unwrap(),
        foreign.as_bytes()
    );

    // Both opt out: ours goes, theirs stays.
    opt_out(c, &[&ours, &theirs]);
    h.eventually(10, "our copy gone", || {
        secret(c, &ours, PULL).is_none().then_some(())
    })
    .await;
    common::quiet_period(
        Duration::from_millis(500),
        "no delete of the foreign Secret follows ours",
    )
    .await;
    assert!(
        secret(c, &theirs, PULL).is_some(),
        "a foreign Secret was deleted"
    );
}

/// `kubectl run` as admin in `ns`: the stored Pod, and what kubectl printed as warnings.
fn run_pod(c: &Cluster, ns: &str, name: &str, image: &str) -> (Value, String) {
    let out = c.kubectl(&[
        "-n",
        ns,
        "run",
        name,
        &format!("--image={image}"),
        "--restart=Never",
    ]);
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "kubectl run: {said}");
    (c.get(&["-n", ns, "pod", name]).unwrap(), said)
}

fn image_of<'a>(pod: &'a Value, list: &str, i: usize) -> &'a str {
    pod["spec"][list][i]["image"].as_str().unwrap()
}

/// A Secret as the webhook's ServiceAccount might write it.
fn secret_manifest(ns: &str, name: &str, kind: &str, ours: bool) -> String {
    let labels = if ours {
        json!({"app.kubernetes.io/managed-by": "image-mirror-webhook"})
    } else {
        json!({})
    };
    let mut s = json!({"apiVersion": "v1", "kind": "Secret", "type": kind,
        "metadata": {"name": name, "namespace": ns, "labels": labels}});
    if kind == "kubernetes.io/service-account-token" {
        s["metadata"]["annotations"] = json!({"kubernetes.io/service-account.name": "default"});
    } else {
        s["stringData"] = json!({".dockerconfigjson": r#"{"auths":{}}"#});
    }
    s.to_string()
}

/// A stolen webhook token must not reach beyond the pull secret: RBAC lets it create any
/// Secret (create cannot be narrowed by name), so without the component's
/// ValidatingAdmissionPolicy it could create `kube-system/ghcr-pull` of type
/// `service-account-token` and read back a privileged token. As the ServiceAccount of
/// `deploy/`: that path and every other write but the controller's own is refused, the admin
/// is not fenced, and provisioning still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_s_token_writes_only_its_own_pull_secret() {
    let Some(c) = with_rbac() else { return };
    let sa = c.token_kubeconfig(SYSTEM, "image-mirror-webhook");
    let as_webhook = |args: &[&str], manifest: &str| {
        let out = c.kubectl_as(&sa, args, Some(manifest));
        let said = String::from_utf8_lossy(&out.stderr).to_string();
        (out.status.success(), said)
    };
    let escalation = secret_manifest(
        "kube-system",
        PULL,
        "kubernetes.io/service-account-token",
        true,
    );
    // The binding takes effect within a second or so: wait for it on a dry run, which runs
    // admission and stores nothing.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, said) = as_webhook(&["create", "--dry-run=server", "-f", "-"], &escalation);
        if !ok && said.contains("ValidatingAdmissionPolicy") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the policy never refused: {ok} {said}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (ok, said) = as_webhook(&["create", "-f", "-"], &escalation);
    assert!(!ok, "the token Secret was created");
    assert!(
        said.contains("writes only Secrets of type kubernetes.io/dockerconfigjson"),
        "{said}"
    );
    assert!(secret(c, "kube-system", PULL).is_none());
    // The admin is not fenced.
    let out = c.kubectl_as(
        &c.admin,
        &["create", "--dry-run=server", "-f", "-"],
        Some(&escalation),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (ns, _opted_in) = OptedIn::namespace(c, "fence");
    let plain = unique("plain");
    c.namespace(&plain, &[]);
    let docker = "kubernetes.io/dockerconfigjson";
    for (manifest, why) in [
        (
            secret_manifest(&plain, PULL, docker, true),
            "only in namespaces labelled",
        ),
        (
            secret_manifest(&ns, "other", docker, true),
            "writes only the pull secret ghcr-pull, not other",
        ),
        (secret_manifest(&ns, PULL, "Opaque", true), "not Opaque"),
        (
            secret_manifest(&ns, PULL, docker, false),
            "changes only Secrets labelled",
        ),
    ] {
        let (ok, said) = as_webhook(&["create", "-f", "-"], &manifest);
        assert!(!ok && said.contains(why), "{manifest}: {said}");
    }
    // Someone else's Secret of that name cannot be taken over or deleted.
    let foreign = unique("foreign");
    c.namespace(&foreign, &[("image-mirror/inject", "enabled")]);
    let _foreign_opted_in = OptedIn::new(c, &[&foreign]);
    c.apply(&secret_manifest(&foreign, PULL, docker, false));
    let (ok, said) = as_webhook(
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        &secret_manifest(&foreign, PULL, docker, true),
    );
    assert!(
        !ok && said.contains("changes only Secrets labelled"),
        "{said}"
    );
    let (ok, said) = as_webhook(&["-n", &foreign, "delete", "secret", PULL], "");
    assert!(
        !ok && said.contains("changes only Secrets labelled"),
        "{said}"
    );
    assert!(secret(c, &foreign, PULL).is_some());

    // What the controller writes is let through: the copy appears in an opted-in namespace.
    let _turn = take_turn().await;
    c.docker_secret(SYSTEM, SOURCE, "ghcr.io");
    let h = hook(c, &table(PULL, Some(SOURCE))).await;
    let copy = h
        .eventually(15, "the copy behind the fence", || secret(c, &ns, PULL))
        .await;
    assert_eq!(copy["type"], docker);
    // And removed on opt-out.
    opt_out(c, &[&ns]);
    h.eventually(15, "the copy removed", || {
        secret(c, &ns, PULL).is_none().then_some(())
    })
    .await;
    drop(h);
}

/// Whoever may label a namespace can opt it in; the admin's allow-list in the table
/// (`namespaces.pullSecrets`) decides which opted-in namespaces get the pull credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_namespaces_the_admin_allows_receive_the_pull_secret() {
    let Some(c) = with_rbac() else { return };
    let _turn = take_turn().await;
    let (allowed, labelled, other) = (unique("allowed"), unique("labelled"), unique("other"));
    let _opted_in = OptedIn::new(c, &[&allowed, &labelled, &other]);
    c.docker_secret(SYSTEM, SOURCE, "ghcr.io");
    let prefix = &allowed[..allowed.len() - 4];
    let table = format!(
        "{}  pullSecrets: {{allow: [\"{prefix}*\", \"{labelled}\"], labels: {{image-mirror/trusted: \"yes\"}}}}\n",
        table(PULL, Some(SOURCE))
    );
    let h = hook(c, &table).await;
    c.register(&unique("mwc"), &h, &[&allowed, &labelled, &other]);
    let on = ("image-mirror/inject", "enabled");
    let trusted = ("image-mirror/trusted", "yes");
    c.namespace(&allowed, &[on, trusted]);
    // The name matches but the label is missing; the label is there but the name does not match.
    c.namespace(&labelled, &[on]);
    c.namespace(&other, &[on, trusted]);
    h.eventually(15, "the allowed namespace's copy", || {
        secret(c, &allowed, PULL)
    })
    .await;
    for ns in [&labelled, &other] {
        let (pod, said) = run_pod(c, ns, "web", "nginx:1.27");
        assert_eq!(image_of(&pod, "containers", 0), "nginx:1.27", "{ns}");
        assert!(
            said.contains("pull secret \"ghcr-pull\" is missing"),
            "{said}"
        );
        assert!(secret(c, ns, PULL).is_none(), "{ns} got the pull secret");
    }
    let (pod, _) = run_pod(c, &allowed, "web", "nginx:1.27");
    assert_eq!(pod["spec"]["imagePullSecrets"], json!([{"name": PULL}]));
    opt_out(c, &[&allowed, &labelled, &other]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_is_sent_to_the_mirror_only_where_its_pull_secret_exists() {
    let Some(c) = with_rbac() else { return };
    let _turn = take_turn().await;
    let (with, without) = (unique("with"), unique("without"));
    let _opted_in = OptedIn::new(c, &[&with, &without]);
    for ns in [&with, &without] {
        c.namespace(ns, &[("image-mirror/inject", "enabled")]);
    }
    c.docker_secret(&with, PULL, "ghcr.io");
    // Nothing provisioned: the table names the secret but no source for it.
    let h = hook(c, &table(PULL, None)).await;
    c.register(&unique("mwc"), &h, &[&with, &without]);

    let (pod, said) = run_pod(c, &with, "web", "nginx:1.27");
    assert_eq!(
        image_of(&pod, "containers", 0),
        "ghcr.io/acme/mirror/docker.io/library/nginx:1.27"
    );
    assert_eq!(pod["spec"]["imagePullSecrets"], json!([{"name": PULL}]));
    assert!(
        said.contains("image-mirror: container \"web\": nginx:1.27 -> ghcr.io/acme/mirror"),
        "{said}"
    );

    let (pod, said) = run_pod(c, &without, "web", "nginx:1.27");
    assert_eq!(image_of(&pod, "containers", 0), "nginx:1.27");
    assert!(pod["spec"].get("imagePullSecrets").is_none(), "{pod}");
    assert!(
        said.contains(&format!(
            "kept nginx:1.27: the mirror's pull secret \"{PULL}\" is missing in namespace \"{without}\""
        )),
        "{said}"
    );
    let text = h.metrics().await;
    assert_eq!(
        common::scrape(
            &text,
            "image_mirror_skips_total{reason=\"pull-secret-missing\"}"
        ),
        1.0
    );
    opt_out(c, &[&with, &without]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_debug_goes_to_the_mirror_only_when_the_pod_has_its_pull_secret() {
    let Some(c) = with_rbac() else { return };
    let _turn = take_turn().await;
    let (ns, _opted_in) = OptedIn::namespace(c, "debug");
    c.docker_secret(&ns, PULL, "ghcr.io");
    // Created before the webhook is there: a Pod without the mirror's pull secret.
    let (plain, _) = run_pod(c, &ns, "before", "nginx:1.27");
    assert!(plain["spec"].get("imagePullSecrets").is_none());
    let h = hook(c, &table(PULL, None)).await;
    c.register(&unique("mwc"), &h, &[&ns]);
    let (with, _) = run_pod(c, &ns, "after", "nginx:1.27");
    assert_eq!(with["spec"]["imagePullSecrets"], json!([{"name": PULL}]));

    let debug = |pod: &str| {
        let out = c.kubectl(&[
            "-n",
            &ns,
            "debug",
            pod,
            "--image=busybox:1.36",
            "--container=debugger",
        ]);
        let said = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "kubectl debug: {said}");
        (c.get(&["-n", &ns, "pod", pod]).unwrap(), said)
    };
    let (pod, said) = debug("after");
    assert_eq!(
        image_of(&pod, "ephemeralContainers", 0),
        "ghcr.io/acme/mirror/docker.io/library/busybox:1.36"
    );
    // The record the annotation would have got (merged with the Pod's earlier one).
    assert!(
        said.lines()
            .any(|l| l.contains("image-mirror: original images: {")
                && l.contains("\"debugger\":\"busybox:1.36\"")),
        "{said}"
    );

    let (pod, said) = debug("before");
    assert_eq!(image_of(&pod, "ephemeralContainers", 0), "busybox:1.36");
    assert!(pod["spec"].get("imagePullSecrets").is_none(), "{pod}");
    assert!(
        said.contains("does not reference the mirror's pull secret"),
        "{said}"
    );
    opt_out(c, &[&ns]);
    drop(h);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_apply_the_same_secret_and_never_flap() {
    let Some(c) = with_rbac() else { return };
    let _turn = take_turn().await;
    c.docker_secret(SYSTEM, SOURCE, "ghcr.io");
    let t = table(PULL, Some(SOURCE));
    let (a, b) = (hook(c, &t).await, hook(c, &t).await);
    let (ns, _opted_in) = OptedIn::namespace(c, "pair");
    let first = a.eventually(10, "the copy", || secret(c, &ns, PULL)).await;
    let version = |s: &Value| {
        s["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // Both replicas reconcile it, and it does not change: one field manager, one content.
    common::quiet_period(
        Duration::from_secs(3),
        "both replicas reconcile the copy without writing it",
    )
    .await;
    let later = secret(c, &ns, PULL).unwrap();
    assert_eq!(
        version(&later),
        version(&first),
        "the copy changed while nothing else did"
    );
    let managers = later["metadata"]["managedFields"].as_array().unwrap();
    assert_eq!(managers.len(), 1, "{managers:?}");
    // A rotation lands once, and stays.
    let rotated = c.docker_secret(SYSTEM, SOURCE, "ghcr.io");
    let decoded = |s: &Value| {
        let d = s["data"][".dockerconfigjson"].as_str().unwrap();
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, d).unwrap()
    };
    let after = a
        .eventually(10, "the rotation", || {
            secret(c, &ns, PULL).filter(|s| decoded(s) == rotated.as_bytes())
        })
        .await;
    common::quiet_period(
        Duration::from_secs(2),
        "no replica writes the rotated copy again",
    )
    .await;
    assert_eq!(version(&secret(c, &ns, PULL).unwrap()), version(&after));
    // Opting out: deleted once; neither replica fails over the other's delete.
    opt_out(c, &[&ns]);
    a.eventually(10, "the copy gone", || {
        secret(c, &ns, PULL).is_none().then_some(())
    })
    .await;
    common::quiet_period(
        Duration::from_secs(1),
        "neither replica fails over the other's delete",
    )
    .await;
    for h in [&a, &b] {
        let text = h.metrics().await;
        assert!(
            !text.contains("image_mirror_pull_secret_reconcile_errors_total{"),
            "{text}\n{}",
            h.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_pull_secrets_component_secrets_are_injected_unchecked() {
    let Some(c) = with_rbac() else { return };
    let _turn = take_turn().await;
    // An identity with only the base's rights (namespaces), as the ECR overlay has.
    let sa = unique("base-only");
    c.ok(&["-n", SYSTEM, "create", "serviceaccount", &sa]);
    c.ok(&[
        "create",
        "clusterrolebinding",
        &sa,
        "--clusterrole=image-mirror-webhook",
        &format!("--serviceaccount={SYSTEM}:{sa}"),
    ]);
    let (ns, _opted_in) = OptedIn::namespace(c, "unchecked");
    let h = Hook::start(&table(PULL, Some(SOURCE)), &c.token_kubeconfig(SYSTEM, &sa)).await;
    assert!(h.log().contains("no right to read Secrets"), "{}", h.log());
    c.register(&unique("mwc"), &h, &[&ns]);
    let (pod, _) = run_pod(c, &ns, "web", "nginx:1.27");
    assert_eq!(
        image_of(&pod, "containers", 0),
        "ghcr.io/acme/mirror/docker.io/library/nginx:1.27"
    );
    assert_eq!(pod["spec"]["imagePullSecrets"], json!([{"name": PULL}]));
    assert!(
        secret(c, &ns, PULL).is_none(),
        "nothing is provisioned without the rights"
    );
    opt_out(c, &[&ns]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_in_a_report_namespace_is_stored_unchanged_while_kubectl_shows_what_would_change() {
    let Some(c) = with_rbac() else { return };
    let _turn = take_turn().await;
    let (report, enabled) = (unique("report"), unique("enabled"));
    let _opted_in = OptedIn::new(c, &[&report, &enabled]);
    c.namespace(&report, &[("image-mirror/inject", "report")]);
    c.namespace(&enabled, &[("image-mirror/inject", "enabled")]);
    for ns in [&report, &enabled] {
        c.docker_secret(ns, PULL, "ghcr.io");
    }
    let h = hook(c, &table(PULL, None)).await;
    c.register(&unique("mwc"), &h, &[&report, &enabled]);

    let (pod, said) = run_pod(c, &report, "web", "nginx:1.27");
    assert_eq!(image_of(&pod, "containers", 0), "nginx:1.27");
    assert!(pod["spec"].get("imagePullSecrets").is_none(), "{pod}");
    assert!(pod["metadata"]["annotations"]
        .get("image-mirror/original-images")
        .is_none());
    assert!(
        said.contains(
            "image-mirror: container \"web\": would rewrite nginx:1.27 -> ghcr.io/acme/mirror/docker.io/library/nginx:1.27"
        ),
        "{said}"
    );
    // The audit log has the record, under the report webhook's name.
    let event = h
        .eventually(10, "the audit event", || {
            c.audit_events(&report, "web")
                .into_iter()
                .find(|e| e["verb"] == "create" && e["stage"] == "ResponseComplete")
        })
        .await;
    let key = "report.pods.image-mirror-webhook.image-mirror.io/would-rewrite";
    let record: Value = serde_json::from_str(
        event["annotations"][key]
            .as_str()
            .unwrap_or_else(|| panic!("{event}")),
    )
    .unwrap();
    assert_eq!(
        record,
        json!({"web": "ghcr.io/acme/mirror/docker.io/library/nginx:1.27"})
    );

    // The same webhook in an `enabled` namespace patches as usual.
    let (pod, _) = run_pod(c, &enabled, "web", "nginx:1.27");
    assert_eq!(
        image_of(&pod, "containers", 0),
        "ghcr.io/acme/mirror/docker.io/library/nginx:1.27"
    );
    let text = h.metrics().await;
    assert_eq!(
        common::scrape(
            &text,
            &format!(
                "image_mirror_would_rewrite_total{{namespace=\"{report}\",source_registry=\"docker.io\",mirror=\"ghcr\",kind=\"container\"}}"
            )
        ),
        1.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_volume_is_rewritten_and_brings_the_pull_secret() {
    let Some(c) = with_rbac() else { return };
    let _turn = take_turn().await;
    let (ns, _opted_in) = OptedIn::namespace(c, "volumes");
    c.docker_secret(&ns, PULL, "ghcr.io");
    let h = hook(c, &table(PULL, None)).await;
    c.register(&unique("mwc"), &h, &[&ns]);
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "inference", "namespace": ns},
        "spec": {"containers": [{"name": "server", "image": "quay.io/acme/inference:2.1",
            "volumeMounts": [{"name": "models", "mountPath": "/models"}]}],
        "volumes": [{"name": "models", "image": {"reference": "redis:7.2.5", "pullPolicy": "IfNotPresent"}}]}});
    c.apply(&pod.to_string());
    let stored = c.get(&["-n", &ns, "pod", "inference"]).unwrap();
    assert_eq!(
        stored["spec"]["volumes"][0]["image"]["reference"],
        "ghcr.io/acme/mirror/docker.io/library/redis:7.2.5"
    );
    assert_eq!(
        image_of(&stored, "containers", 0),
        "quay.io/acme/inference:2.1"
    );
    assert_eq!(stored["spec"]["imagePullSecrets"], json!([{"name": PULL}]));
    drop(h);
}

/// `export-policy` of `table`, as the binary prints it.
fn export_policy(table: &std::path::Path) -> (String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_image-mirror-webhook"))
        .arg("export-policy")
        .arg("--config")
        .arg(table)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Image strings for the comparison: every spelling of every entry of the table, with and
/// without a digest, and images no entry names.
fn images_for(table: &image_mirror_webhook::Table) -> Vec<String> {
    const D: &str = "sha256:86e0e091d0da6bde2456dbb48306f3956bbeb2eae1b5b9a43045843f69fe4aaa";
    let mut out = Vec::new();
    for entry in table.entries() {
        for s in image_mirror_webhook::export::spellings(entry.source_name()) {
            match entry.tags() {
                image_mirror_webhook::mapping::EntryTags::Exact(t) => {
                    out.push(format!("{s}:{t}"));
                    out.push(format!("{s}:{t}@{D}"));
                    // No tag: `latest` without a digest, no tag at all with one.
                    out.push(s.clone());
                    out.push(format!("{s}@{D}"));
                }
                image_mirror_webhook::mapping::EntryTags::Glob => {
                    out.push(format!("{s}:1.29.1-tctl"))
                }
                _ => out.push(format!("{s}:9.9")),
            }
        }
    }
    out.extend(
        [
            "nginx:1.27",
            "quay.io/minio/minio:latest",
            "ghcr.io/ameideio/mirror/redis:7.2.5",
            "redis:7.2.6",
            "redis",
        ]
        .map(String::from),
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exported_policy_rewrites_exactly_as_the_webhook_would() {
    let Some(c) = with_rbac() else { return };
    let _turn = take_turn().await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    // Both tables export and apply without a word from the API server.
    for table in ["deploy/config/ghcr.yaml", "tests/data/admission/table.yaml"] {
        let (yaml, left_out) = export_policy(&root.join(table));
        assert!(
            left_out.lines().all(|l| l.starts_with("not exported: ")),
            "{left_out}"
        );
        let out = c.kubectl_as(
            &c.admin,
            &["apply", "--dry-run=server", "-f", "-"],
            Some(&yaml),
        );
        assert!(
            out.status.success(),
            "{table}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let table_path = root.join("tests/data/admission/table.yaml");
    let (yaml, _) = export_policy(&table_path);
    c.apply(&yaml);
    let (ns, _opted_in) = OptedIn::namespace(c, "policy");
    // The policy is picked up within a moment: wait for it to rewrite a first Pod.
    let table = image_mirror_webhook::config::Config::parse(
        "t",
        &std::fs::read_to_string(&table_path).unwrap(),
    )
    .map(|c| c.table)
    .unwrap();
    // The test table's entries, and the GHCR runbook's (which this table's rule, not an entry,
    // decides: the policy must leave them to the webhook).
    let ghcr = image_mirror_webhook::config::Config::parse(
        "ghcr",
        &std::fs::read_to_string(root.join("deploy/config/ghcr.yaml")).unwrap(),
    )
    .map(|c| c.table)
    .unwrap();
    let mut images = images_for(&table);
    images.extend(images_for(&ghcr));
    images.sort();
    images.dedup();
    assert!(images.len() >= 100, "{}", images.len());
    let pods: Vec<Value> = images
        .iter()
        .enumerate()
        .map(|(i, image)| {
            let mut spec = json!({"containers": [{"name": "app", "image": image}]});
            // Every fifth also pulls it as an image volume, and some have a secret already.
            if i % 5 == 0 {
                spec["volumes"] = json!([{"name": "data", "image": {"reference": image}}]);
            }
            if i % 7 == 0 {
                spec["imagePullSecrets"] = json!([{"name": "team-registry"}]);
            }
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": format!("p{i}"), "namespace": ns}, "spec": spec})
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let probe = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe", "namespace": ns},
            "spec": {"containers": [{"name": "app", "image": "redis:7.2.5"}]}});
        let out = c.kubectl_as(
            &c.admin,
            &["create", "-f", "-", "-o", "json"],
            Some(&probe.to_string()),
        );
        let stored: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        c.kubectl(&["-n", &ns, "delete", "pod", "probe", "--wait=false"]);
        if stored["spec"]["containers"][0]["image"] == "ghcr.io/ameideio/mirror/redis:7.2.5" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the policy never took effect: {stored}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    c.apply(&json!({"apiVersion": "v1", "kind": "List", "items": pods}).to_string());
    let app = common::App::with_table(Some(&table_path));
    let export = image_mirror_webhook::export::Export::of(&table);
    let mut compared = 0;
    for (i, sent) in pods.iter().enumerate() {
        let stored = c.get(&["-n", &ns, "pod", &format!("p{i}")]).unwrap();
        let review = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": format!("u{i}"), "operation": "CREATE", "namespace": ns,
                "resource": {"group": "", "version": "v1", "resource": "pods"}, "object": sent}});
        let by_webhook = common::patched(&review, &app.review(&review).await);
        let image = &images[i];
        let stored_image = stored["spec"]["containers"][0]["image"].as_str().unwrap();
        let stored_secrets = &stored["spec"]["imagePullSecrets"];
        if export.apply(image).is_some() {
            // Exported: identical to the webhook's Pod in images and pull secrets.
            assert_eq!(
                stored_image, by_webhook["spec"]["containers"][0]["image"],
                "{image}"
            );
            assert_eq!(
                stored_secrets, &by_webhook["spec"]["imagePullSecrets"],
                "{image}"
            );
            if i % 5 == 0 {
                assert_eq!(
                    stored["spec"]["volumes"][0]["image"]["reference"],
                    by_webhook["spec"]["volumes"][0]["image"]["reference"],
                    "{image}"
                );
            }
            compared += 1;
        } else {
            assert_eq!(
                stored_image,
                image.as_str(),
                "the policy rewrote what it does not export"
            );
        }
    }
    assert!(compared >= 40, "{compared} of {}", images.len());
    eprintln!(
        "{} Pods compared with the webhook, {compared} of them rewritten by the policy",
        images.len()
    );
    c.ok(&["delete", "mutatingadmissionpolicybinding", "image-mirror"]);
    c.ok(&["delete", "mutatingadmissionpolicy", "image-mirror"]);
}

/// The webhook's Pod as `overlay`'s Deployment makes it, with its certificate and table mounted
/// where `hook` has them (the Job is modelled on it); named `name`, in the system namespace.
fn webhook_pod(c: &Cluster, overlay: &str, hook: &Hook, name: &str) -> Value {
    let deployment: Value = common::envtest::kustomize(overlay)
        .split("\n---\n")
        .map(|doc| serde_saphyr::from_str::<Value>(doc).unwrap())
        .find(|o| o["kind"] == "Deployment")
        .unwrap();
    let template = &deployment["spec"]["template"];
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": SYSTEM, "labels": template["metadata"]["labels"]},
        "spec": template["spec"],
    });
    let config_dir = hook.config_path.parent().unwrap().display().to_string();
    for m in pod["spec"]["containers"][0]["volumeMounts"]
        .as_array_mut()
        .unwrap()
    {
        match m["name"].as_str().unwrap() {
            "tls" => m["mountPath"] = json!(hook.tls_dir.display().to_string()),
            "config" => m["mountPath"] = json!(config_dir),
            _ => {}
        }
    }
    // What the ServiceAccount admission plugin adds in a cluster (this API server runs without
    // it): the token, which a copy Job must not get.
    let token = "kube-api-access-test1";
    pod["spec"]["containers"][0]["volumeMounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": token, "readOnly": true,
            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}));
    pod["spec"]["volumes"].as_array_mut().unwrap().push(json!({"name": token,
        "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}));
    c.apply(&pod.to_string());
    c.get(&["-n", SYSTEM, "pod", name]).unwrap()
}

fn copy_jobs(c: &Cluster) -> Vec<Value> {
    c.get(&["-n", SYSTEM, "jobs", "-l", "image-mirror/role=copy"])
        .map(|list| list["items"].as_array().cloned().unwrap_or_default())
        .unwrap_or_default()
}

/// Sets a Job's status the way the Job controller does when it ends (there is no controller
/// manager here).
fn finish_job(c: &Cluster, name: &str, success: bool) {
    let now = String::from_utf8(
        std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let condition = |kind: &str, reason: &str| {
        json!({"type": kind, "status": "True", "reason": reason, "message": "test",
            "lastProbeTime": now, "lastTransitionTime": now})
    };
    let status = if success {
        json!({"startTime": now, "completionTime": now, "succeeded": 1, "active": 0,
            "conditions": [condition("SuccessCriteriaMet", "CompletionsReached"),
                           condition("Complete", "CompletionsReached")]})
    } else {
        json!({"startTime": now, "failed": 3, "active": 0,
            "conditions": [condition("FailureTarget", "BackoffLimitExceeded"),
                           condition("Failed", "BackoffLimitExceeded")]})
    };
    c.ok(&[
        "-n",
        SYSTEM,
        "patch",
        "job",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        &json!({ "status": status }).to_string(),
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_run_as_one_job_per_image_and_a_finished_job_sends_pods_to_the_mirror() {
    const OVERLAY: &str = "tests/data/overlays/copy-jobs";
    let Some(c) = cluster() else { return };
    c.install_rbac(OVERLAY);
    let _turn = take_turn().await;
    common::init();
    let upstream = common::registry::Registry::plain();
    let mirror = common::registry::Registry::plain();
    let image = common::registry::TestImage::generate(&["linux/amd64", "linux/arm64"], 1);
    upstream.push("team/app", "1", &image).await;
    let (up, down) = (upstream.host(), mirror.host());
    let table = format!(
        "mirrors:\n  local:\n    type: repository\n    registry: \"{down}\"\n    prefix: mirror\n    naming: flatten\n\
         rules:\n  - name: upstream\n    match: [\"{up}/team/*\"]\n    mirror: local\n    swap: if-present\n    copy: on-demand\n\
         registries:\n  \"{up}\": {{insecure: true}}\n  \"{down}\": {{insecure: true}}\n\
         checks: {{presentTtl: 10m, absentTtl: 10m}}\n\
         copies: {{runner: job, maxAttempts: 3, jobTtl: 2m}}\n\
         namespaces:\n  exclude: [kube-system, {SYSTEM}]\n"
    );
    let kubeconfig = c.token_kubeconfig(SYSTEM, "image-mirror-webhook");
    let pod_name = unique("image-mirror-webhook");
    let env = [("POD_NAME", pod_name.as_str()), ("POD_NAMESPACE", SYSTEM)];
    // Two replicas, each registered on its own, so that every Pod asks both.
    let first = Hook::start_with_env(&table, &kubeconfig, &env).await;
    let second = Hook::start_with_env(&table, &kubeconfig, &env).await;
    // Both model their Jobs on one Pod (the first's paths); the second's table is the same.
    let model = webhook_pod(c, OVERLAY, &first, &pod_name);
    let (ns, _opted_in) = OptedIn::namespace(c, "jobs");
    c.register(&unique("mwc"), &first, &[&ns]);

    // The mirror lacks the image: the Pod keeps it, and one Job is started to copy it.
    let source = format!("{up}/team/app:1");
    let (pod, _) = run_pod(c, &ns, "one", &source);
    assert_eq!(image_of(&pod, "containers", 0), source);
    let job = first
        .eventually(20, "a copy Job", || copy_jobs(c).into_iter().next())
        .await;
    let target = job["metadata"]["annotations"]["image-mirror/target"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        job["metadata"]["annotations"]["image-mirror/source"],
        source
    );
    assert!(target.starts_with(&format!("{down}/mirror/")), "{target}");
    let name = job["metadata"]["name"].as_str().unwrap().to_string();
    assert_eq!(
        name,
        image_mirror_webhook::cluster::copy_jobs::job_name(&source, &target)
    );
    assert_eq!(job["spec"]["backoffLimit"], 2);
    // Accepted by the API server as the Job controller will read it.
    assert_eq!(
        job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"],
        json!([3])
    );
    assert_eq!(job["spec"]["ttlSecondsAfterFinished"], 120);
    let spec = &job["spec"]["template"]["spec"];
    let model = &model["spec"];
    assert_eq!(spec["restartPolicy"], "Never");
    assert_eq!(spec["automountServiceAccountToken"], false);
    assert_eq!(spec["securityContext"], model["securityContext"]);
    assert_eq!(spec["serviceAccountName"], "image-mirror-webhook");
    assert_eq!(
        job["spec"]["template"]["metadata"]["labels"]["image-mirror/inject"],
        "disabled"
    );
    let container = &spec["containers"][0];
    let webhook = &model["containers"][0];
    assert_eq!(container["image"], webhook["image"]);
    assert_eq!(container["securityContext"], webhook["securityContext"]);
    assert_eq!(container["envFrom"], webhook["envFrom"]);
    assert_eq!(container["resources"]["requests"]["memory"], "64Mi");
    // The table and /tmp, but neither the serving key nor the API token the Pod was given.
    let names = |list: &Value| -> Vec<String> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(
        names(&model["volumes"])
            .iter()
            .any(|v| v.starts_with("kube-api-access")),
        "the model Pod has a token volume: {}",
        model["volumes"]
    );
    assert_eq!(
        names(&spec["volumes"]),
        ["config", "tmp", "ghcr-credentials"]
    );
    assert_eq!(
        names(&container["volumeMounts"]),
        ["config", "tmp", "ghcr-credentials"]
    );
    assert_eq!(container["command"], json!(["/image-mirror-webhook"]));
    let args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        args,
        [
            "copy".to_string(),
            source.clone(),
            target.clone(),
            format!("--config={}", first.config_path.display())
        ]
    );

    // The other replica too (its paths differ from the model Pod's, so it must not be the one
    // that makes the Job): more Pods of the image, each seen by both, still that one Job.
    c.register(&unique("mwc"), &second, &[&ns]);
    for i in 0..3 {
        let (pod, _) = run_pod(c, &ns, &format!("more-{i}"), &source);
        assert_eq!(image_of(&pod, "containers", 0), source);
    }
    second
        .eventually(10, "the second replica finding the Job there", || {
            second
                .log()
                .contains("copy already running in a Job")
                .then_some(())
        })
        .await;
    assert_eq!(copy_jobs(c).len(), 1);
    let started = |text: &str| common::scrape(text, "image_mirror_copies_total{result=\"job\"}");
    let (a, b) = (first.metrics().await, second.metrics().await);
    assert_eq!(started(&a) + started(&b), 1.0, "{a}\n{b}");

    // What the Job's Pod would do, done here with its very arguments; then the Job controller's
    // part: the status that says it completed.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_image-mirror-webhook"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (pod, _) = run_pod(c, &ns, "before", &source);
    assert_eq!(
        image_of(&pod, "containers", 0),
        source,
        "absent is cached for 10 minutes: only the Job's end can change it"
    );
    finish_job(c, &name, true);
    for hook in [&first, &second] {
        hook.eventually(10, "the finished Job noticed", || {
            hook.log().contains("copy Job finished").then_some(())
        })
        .await;
    }
    let (pod, said) = run_pod(c, &ns, "after", &source);
    assert_eq!(image_of(&pod, "containers", 0), target, "{said}");
    let succeeded =
        |text: &str| common::scrape(text, "image_mirror_copies_total{result=\"success\"}");
    let (a, b) = (first.metrics().await, second.metrics().await);
    assert_eq!(succeeded(&a) + succeeded(&b), 1.0, "{a}\n{b}");

    // A copy whose Job fails: given up once, and no second Job while the failed one is kept.
    let missing = format!("{up}/team/missing:1");
    let (pod, _) = run_pod(c, &ns, "missing", &missing);
    assert_eq!(image_of(&pod, "containers", 0), missing);
    let failing = first
        .eventually(20, "a second copy Job", || {
            copy_jobs(c)
                .into_iter()
                .find(|j| j["metadata"]["annotations"]["image-mirror/source"] == missing.as_str())
        })
        .await;
    finish_job(c, failing["metadata"]["name"].as_str().unwrap(), false);
    let given_up =
        |text: &str| common::scrape(text, "image_mirror_copies_total{result=\"given_up\"}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (a, b) = (first.metrics().await, second.metrics().await);
        if given_up(&a) + given_up(&b) == 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the failed Job is not counted:\n{a}\n{b}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (pod, _) = run_pod(c, &ns, "missing-again", &missing);
    assert_eq!(image_of(&pod, "containers", 0), missing);
    common::quiet_period(
        Duration::from_secs(1),
        "no third Job for an image whose copy failed for good",
    )
    .await;
    assert_eq!(copy_jobs(c).len(), 2);
    for hook in [&first, &second] {
        assert!(!hook.log().contains("copying in-process"), "{}", hook.log());
    }
    c.ok(&[
        "-n",
        SYSTEM,
        "delete",
        "jobs",
        "-l",
        "image-mirror/role=copy",
    ]);
    c.ok(&["-n", SYSTEM, "delete", "pod", &pod_name, "--wait=false"]);
}

/// `copies.concurrency` caps the Jobs a replica has running, as it caps copies in the webhook:
/// a copy handed to a Job keeps its slot until the Job ends, and every Job has a deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_copy_jobs_are_capped_by_concurrency() {
    const OVERLAY: &str = "tests/data/overlays/copy-jobs";
    let Some(c) = cluster() else { return };
    c.install_rbac(OVERLAY);
    let _turn = take_turn().await;
    common::init();
    // Both registries empty: the mirror lacks every image (the Jobs never run here).
    let upstream = common::registry::Registry::plain();
    let mirror = common::registry::Registry::plain();
    let (up, down) = (upstream.host(), mirror.host());
    let table = format!(
        "mirrors:\n  local:\n    type: repository\n    registry: \"{down}\"\n    prefix: mirror\n    naming: flatten\n\
         rules:\n  - name: upstream\n    match: [\"{up}/team/*\"]\n    mirror: local\n    swap: if-present\n    copy: on-demand\n\
         registries:\n  \"{up}\": {{insecure: true}}\n  \"{down}\": {{insecure: true}}\n\
         checks: {{presentTtl: 10m, absentTtl: 10m}}\n\
         copies: {{runner: job, concurrency: 1, jobDeadline: 10m}}\n\
         namespaces:\n  exclude: [kube-system, {SYSTEM}]\n"
    );
    let kubeconfig = c.token_kubeconfig(SYSTEM, "image-mirror-webhook");
    let pod_name = unique("image-mirror-webhook");
    let env = [("POD_NAME", pod_name.as_str()), ("POD_NAMESPACE", SYSTEM)];
    let hook = Hook::start_with_env(&table, &kubeconfig, &env).await;
    webhook_pod(c, OVERLAY, &hook, &pod_name);
    let (ns, _opted_in) = OptedIn::namespace(c, "capped");
    c.register(&unique("mwc"), &hook, &[&ns]);
    for app in ["a", "b"] {
        run_pod(c, &ns, app, &format!("{up}/team/{app}:1"));
    }
    // One Job runs; the other copy waits in the queue for the slot the Job holds.
    let depth = |text: &str| common::scrape(text, "image_mirror_copy_queue_depth");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = hook.metrics().await;
        if copy_jobs(c).len() == 1 && depth(&text) == 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not one Job and one queued copy: {} Jobs\n{text}\n{}",
            copy_jobs(c).len(),
            hook.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = copy_jobs(c).remove(0);
    assert_eq!(first["spec"]["activeDeadlineSeconds"], 600);
    finish_job(c, first["metadata"]["name"].as_str().unwrap(), true);
    hook.eventually(20, "the second Job, once the first ended", || {
        (copy_jobs(c).len() == 2).then_some(())
    })
    .await;
    c.ok(&[
        "-n",
        SYSTEM,
        "delete",
        "jobs",
        "-l",
        "image-mirror/role=copy",
    ]);
    c.ok(&["-n", SYSTEM, "delete", "pod", &pod_name, "--wait=false"]);
}

/// An image changed in place (`kubectl set image`) goes to the mirror too; a no-op update and
/// the webhook's own rewrites change nothing; the pull secret is never added on an update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_set_in_place_goes_to_the_mirror_too() {
    let Some(c) = with_rbac() else { return };
    let _turn = take_turn().await;
    let (with, without) = (unique("setimg"), unique("setimg-nosecret"));
    let _opted_in = OptedIn::new(c, &[&with, &without]);
    for ns in [&with, &without] {
        c.namespace(ns, &[("image-mirror/inject", "enabled")]);
    }
    c.docker_secret(&with, PULL, "ghcr.io");
    let h = hook(c, &table(PULL, None)).await;
    c.register(&unique("mwc"), &h, &[&with, &without]);
    let mirror = "ghcr.io/acme/mirror/docker.io/library";

    let (pod, _) = run_pod(c, &with, "web", "nginx:1.27");
    assert_eq!(
        image_of(&pod, "containers", 0),
        format!("{mirror}/nginx:1.27")
    );
    let out = c.kubectl(&["-n", &with, "set", "image", "pod/web", "web=redis:7.2.5"]);
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{said}");
    let pod = c.get(&["-n", &with, "pod", "web"]).unwrap();
    assert_eq!(
        image_of(&pod, "containers", 0),
        format!("{mirror}/redis:7.2.5"),
        "{said}"
    );
    // The record keeps the first original image of the container.
    let record: Value = serde_json::from_str(
        pod["metadata"]["annotations"]["image-mirror/original-images"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(record, json!({"web": "nginx:1.27"}));
    // A no-op update (a label): the image stays what it is.
    c.ok(&["-n", &with, "label", "pod", "web", "touched=yes"]);
    let pod = c.get(&["-n", &with, "pod", "web"]).unwrap();
    assert_eq!(
        image_of(&pod, "containers", 0),
        format!("{mirror}/redis:7.2.5")
    );

    // A Pod without the mirror's pull secret cannot be given it on an update: kept, said.
    let (pod, _) = run_pod(c, &without, "web", "nginx:1.27");
    assert_eq!(image_of(&pod, "containers", 0), "nginx:1.27");
    let out = c.kubectl(&["-n", &without, "set", "image", "pod/web", "web=redis:7.2.5"]);
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{said}");
    let pod = c.get(&["-n", &without, "pod", "web"]).unwrap();
    assert_eq!(image_of(&pod, "containers", 0), "redis:7.2.5");
    assert!(pod["spec"].get("imagePullSecrets").is_none(), "{pod}");
    opt_out(c, &[&with, &without]);
}

// ---------------------------------------------------------------------------------------------
// MirroredImage records

/// The MirroredImage CRD, applied server-side as an admin would, and established.
fn install_crd(c: &Cluster) {
    let crd = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/components/mirrored-images/crd.yaml"
    );
    c.ok(&["apply", "--server-side", "-f", crd]);
    c.ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/mirroredimages.image-mirror.dev",
    ]);
}

/// Every MirroredImage, by name.
fn mirrored_images(c: &Cluster) -> Vec<Value> {
    c.get(&["mirroredimages"])
        .and_then(|l| l["items"].as_array().cloned())
        .unwrap_or_default()
}

/// The record whose `spec.source` is `source`, once `ok` holds for it.
async fn record_where(
    hook: &Hook,
    c: &Cluster,
    source: &str,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    hook.eventually(60, what, || {
        mirrored_images(c)
            .into_iter()
            .find(|o| o["spec"]["source"] == source && ok(o))
    })
    .await
}

/// The records, end to end as `deploy/`'s ServiceAccount: a kept-for-copy image gets an
/// object that reaches `Present` after its copy; a second replica answers a check from the
/// first's status without asking the registry; the replicas do not fight; a declared image is
/// copied, and copied again when its tag moves; retention deletes an old admission record and
/// keeps a `retain` one; `kubectl get` shows the columns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_images_record_copies_share_checks_and_copy_declared_images() {
    let Some(c) = with_rbac() else { return };
    let _turn = take_turn().await;
    common::init();
    install_crd(c);
    let upstream = common::registry::Registry::plain();
    let mirror = common::registry::Registry::plain();
    let image = common::registry::TestImage::generate(&["linux/amd64"], 1);
    let other = common::registry::TestImage::generate(&["linux/amd64"], 1);
    upstream.push("team/app", "1", &image).await;
    upstream.push("team/other", "1", &other).await;
    let (up, down) = (upstream.host(), mirror.host());
    let table = |extra: &str| {
        format!(
            "mirrors:\n  local:\n    type: repository\n    registry: \"{down}\"\n    prefix: mirror\n    naming: flatten\n\
             rules:\n  - name: upstream\n    match: [\"{up}/team/*\"]\n    mirror: local\n    swap: if-present\n    copy: on-demand\n\
             registries:\n  \"{up}\": {{insecure: true}}\n  \"{down}\": {{insecure: true}}\n\
             checks: {{presentTtl: 10m, absentTtl: 1s}}\n\
             mirroredImages: {{writesPerSecond: 50{extra}}}\n\
             namespaces:\n  exclude: [kube-system, {SYSTEM}]\n"
        )
    };
    let kubeconfig = c.token_kubeconfig(SYSTEM, "image-mirror-webhook");
    let first = Hook::start(&table(""), &kubeconfig).await;
    assert!(
        first.log().contains("MirroredImage records in use"),
        "{}",
        first.log()
    );
    let (ns, _opted_in) = OptedIn::namespace(c, "records");
    c.register(&unique("mwc"), &first, &[&ns]);

    // Kept while it is copied; the record follows the copy to Present, with its digest.
    let source = format!("{up}/team/app:1");
    let (pod, _) = run_pod(c, &ns, "one", &source);
    assert_eq!(image_of(&pod, "containers", 0), source);
    let record = record_where(&first, c, &source, "a Present record", |o| {
        o["status"]["phase"] == "Present"
    })
    .await;
    let target = record["status"]["target"].as_str().unwrap().to_string();
    assert!(target.starts_with(&format!("{down}/mirror/")), "{target}");
    let name = record["metadata"]["name"].as_str().unwrap().to_string();
    assert_eq!(
        name,
        image_mirror_webhook::cluster::images::crd::object_name(
            &image_mirror_webhook::Reference::parse(&source).unwrap(),
            &image_mirror_webhook::Reference::parse(&target).unwrap()
        )
    );
    assert_eq!(
        record["metadata"]["labels"]["image-mirror.dev/recorded-by"],
        "admission"
    );
    let status = &record["status"];
    assert!(status["mirrorDigest"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    assert_eq!(status["lastCopy"]["result"], "Succeeded");
    assert_eq!(status["lastCopy"]["runner"], "in-process");
    assert!(status["lastUsed"].is_string() && status["lastChecked"].is_string());
    assert_eq!(status["conditions"][0]["type"], "Ready");
    assert_eq!(status["conditions"][0]["status"], "True");
    // The next Pod goes to the mirror.
    let (pod, _) = run_pod(c, &ns, "two", &source);
    assert_eq!(image_of(&pod, "containers", 0), target);

    // A second replica: its check is answered by the first's status, not by the registry.
    let second = Hook::start(&table(""), &kubeconfig).await;
    second
        .eventually(20, "the second replica's cache", || {
            second
                .log()
                .contains("MirroredImage records in use")
                .then_some(())
        })
        .await;
    let answer = record_where(&second, c, &source, "the record", |_| true).await;
    assert_eq!(answer["status"]["phase"], "Present");
    let reviewed = second.review(&ns, &source).await;
    assert_eq!(reviewed["response"]["allowed"], true);
    assert!(
        reviewed["response"]["patch"].is_string(),
        "the second replica sends the Pod to the mirror: {reviewed}"
    );
    let scrape = second.metrics().await;
    let registry = down.clone();
    assert_eq!(
        common::sample(
            &scrape,
            &format!(
                "image_mirror_mirror_checks_total{{registry=\"{registry}\",result=\"shared\"}}"
            )
        ),
        1.0,
        "{scrape}"
    );
    assert_eq!(
        common::sample(
            &scrape,
            &format!(
                "image_mirror_mirror_checks_total{{registry=\"{registry}\",result=\"present\"}}"
            )
        ),
        0.0,
        "the second replica asked the registry:\n{scrape}"
    );
    assert!(
        common::sample(&scrape, "image_mirror_images{phase=\"Present\"}") >= 1.0,
        "{scrape}"
    );

    // Both replicas seen it all: no replica writes the record again while nothing changes.
    let version = |c: &Cluster| {
        c.get(&["mirroredimage", &name]).unwrap()["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let before = version(c);
    for _ in 0..3 {
        second.review(&ns, &source).await;
    }
    common::quiet_period(
        Duration::from_secs(2),
        "neither replica rewrites a record whose lastUsed is fresh",
    )
    .await;
    assert_eq!(version(c), before, "the record was written again");
    let managers: Vec<String> = c
        .get(&["mirroredimage", &name, "--show-managed-fields"])
        .unwrap()["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["manager"].as_str().unwrap().to_string())
        .collect();
    assert!(
        managers.iter().all(|m| m == "image-mirror-webhook"),
        "{managers:?}"
    );

    // `kubectl get` is the view.
    let view = c.ok(&["get", "mirroredimages"]);
    let header = view.lines().next().unwrap();
    for column in [
        "NAME",
        "SOURCE",
        "TARGET",
        "PHASE",
        "DIGEST",
        "LAST USED",
        "AGE",
    ] {
        assert!(header.contains(column), "{view}");
    }
    assert!(view.contains(&name) && view.contains("Present"), "{view}");

    // A declared image: copied, and copied again once its tag moved and `refresh` passed.
    let declared_source = format!("{up}/team/other:1");
    let declared = unique("declared");
    c.apply(
        &json!({"apiVersion": "image-mirror.dev/v1alpha1", "kind": "MirroredImage",
            "metadata": {"name": declared},
            "spec": {"source": declared_source, "refresh": "3s"}})
        .to_string(),
    );
    let done = record_where(&first, c, &declared_source, "the declared copy", |o| {
        o["status"]["phase"] == "Present"
    })
    .await;
    assert_eq!(done["metadata"]["name"], declared.as_str());
    let first_digest = done["status"]["mirrorDigest"].as_str().unwrap().to_string();
    let moved = common::registry::TestImage::generate(&["linux/amd64"], 1);
    upstream.push("team/other", "1", &moved).await;
    record_where(&first, c, &declared_source, "the moved tag copied", |o| {
        o["status"]["mirrorDigest"]
            .as_str()
            .is_some_and(|d| d != first_digest)
    })
    .await;

    // Retention: an old admission record goes, one that says `retain` and a declared one stay.
    let kept_source = format!("{up}/team/other:1");
    let _ = kept_source;
    c.ok(&[
        "patch",
        "mirroredimage",
        &name,
        "--type=merge",
        "-p",
        r#"{"spec":{"retain":true}}"#,
    ]);
    let second_image = format!("{up}/team/app:2");
    upstream.push("team/app", "2", &image).await;
    run_pod(c, &ns, "three", &second_image);
    let doomed = record_where(&first, c, &second_image, "a second record", |_| true).await;
    let doomed = doomed["metadata"]["name"].as_str().unwrap().to_string();
    std::fs::write(&first.config_path, table(", retention: 2s")).unwrap();
    first
        .eventually(30, "the unused record deleted", || {
            c.get(&["mirroredimage", &doomed]).is_none().then_some(())
        })
        .await;
    assert!(
        c.get(&["mirroredimage", &name]).is_some(),
        "a retain record was deleted"
    );
    assert!(
        c.get(&["mirroredimage", &declared]).is_some(),
        "a declared record was deleted"
    );
    c.ok(&["delete", "mirroredimage", &name, &declared]);
}

/// Without rights on the records, the webhook works as before and says once what is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_rights_on_mirrored_images_admission_is_as_before() {
    let Some(c) = with_rbac() else { return };
    let _turn = take_turn().await;
    install_crd(c);
    // An identity with every right of the overlay but the records'.
    let sa = unique("no-records");
    c.ok(&["-n", SYSTEM, "create", "serviceaccount", &sa]);
    let subject = format!("{SYSTEM}:{sa}");
    for role in ["image-mirror-webhook", "image-mirror-webhook-pull-secrets"] {
        c.ok(&[
            "create",
            "clusterrolebinding",
            &unique(role),
            &format!("--clusterrole={role}"),
            &format!("--serviceaccount={subject}"),
        ]);
    }
    c.ok(&[
        "-n",
        SYSTEM,
        "create",
        "rolebinding",
        &unique("source"),
        "--role=image-mirror-webhook-pull-secret-source",
        &format!("--serviceaccount={subject}"),
    ]);
    let kubeconfig = c.token_kubeconfig(SYSTEM, &sa);
    works_without_records(
        c,
        &kubeconfig,
        "no rights on mirroredimages.image-mirror.dev",
    )
    .await;
}

/// Without the CRD, the webhook works as before and says once that the records are off; the
/// CRD is put back for the tests that use it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_mirrored_image_crd_admission_is_as_before() {
    let Some(c) = with_rbac() else { return };
    let _turn = take_turn().await;
    c.ok(&[
        "delete",
        "crd",
        "mirroredimages.image-mirror.dev",
        "--ignore-not-found",
        "--wait=true",
    ]);
    let kubeconfig = c.token_kubeconfig(SYSTEM, "image-mirror-webhook");
    works_without_records(
        c,
        &kubeconfig,
        "the MirroredImage resource is not installed",
    )
    .await;
    install_crd(c);
}

/// A webhook as `kubeconfig` that says `warning` once at start and sends Pods to the mirror as
/// it always did.
async fn works_without_records(c: &'static Cluster, kubeconfig: &std::path::Path, warning: &str) {
    let hook = Hook::start(&table(PULL, None), kubeconfig).await;
    let log = hook.log();
    assert_eq!(log.matches(warning).count(), 1, "{log}");
    let (ns, _opted_in) = OptedIn::namespace(c, "norecords");
    c.docker_secret(&ns, PULL, "ghcr.io");
    c.register(&unique("mwc"), &hook, &[&ns]);
    let (pod, _) = run_pod(c, &ns, "p", "nginx:1.27");
    assert_eq!(
        image_of(&pod, "containers", 0),
        "ghcr.io/acme/mirror/docker.io/library/nginx:1.27"
    );
}

/// The Helm chart's objects, rendered by Helm's own SDK into a namespace of their own, are
/// taken by the API server (`--dry-run=server`: its schema, validation and admission), for
/// each flavour and with every switch on (the exported MutatingAdmissionPolicy too). cert-manager's and the Prometheus Operator's kinds
/// are left out: a bare API server does not serve them (tests/helm.rs compares them with the
/// overlays instead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_helm_chart_applies_to_the_api_server() {
    let Some(c) = cluster() else { return };
    let _turn = take_turn().await;
    let ns = unique("helm");
    c.namespace(&ns, &[]);
    let bundle = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, c.ca_pem());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let (policy, _) = export_policy(&root.join("deploy/config/ghcr.yaml"));
    for values in [
        json!({"namespace": {"create": true}, "copyJobs": {"enabled": true}, "mode": "report"}),
        json!({"mirror": "ecr", "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/image-mirror"}}}),
        json!({"certificates": {"source": "secret", "caBundle": bundle},
            "networkPolicy": {"admissionFrom": [{"ipBlock": {"cidr": "10.0.0.10/32"}}]},
            "admissionPolicy": {"manifest": policy}}),
    ] {
        let objects: Vec<Value> = common::helm::render(&values, &ns)
            .unwrap()
            .into_iter()
            .filter(|o| {
                let api = o["apiVersion"].as_str().unwrap();
                !api.starts_with("cert-manager.io/") && !api.starts_with("monitoring.coreos.com/")
            })
            .collect();
        let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
        let out = c.kubectl_as(
            &c.admin,
            &["apply", "--dry-run=server", "-f", "-"],
            Some(&list.to_string()),
        );
        assert!(
            out.status.success(),
            "{values}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            said.lines()
                .filter(|l| l.ends_with("(server dry run)"))
                .count(),
            objects.len(),
            "{values}: every object taken\n{said}"
        );
    }
}
