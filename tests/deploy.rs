//! deploy/ rendered with the machine's `kubectl kustomize`, every object deserialised into
//! k8s-openapi types with unknown fields treated as errors, and checked against the binary.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use image_mirror_webhook::cluster::images::crd::MirroredImage;
use image_mirror_webhook::mapping::Table;
use image_mirror_webhook::server::{
    DEFAULT_LISTEN, DEFAULT_METRICS_LISTEN, MUTATE_PATH, REPORT_PATH,
};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, ResourceQuota, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt as _;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn render(dir: &Path) -> Vec<Value> {
    let mut objects = common::kustomize(dir);
    for o in &mut objects {
        unwrap_base64(o);
    }
    objects
}

/// kustomize wraps generated base64 at 70 columns; Go's decoder (the API server's) skips the
/// newlines, k8s-openapi's does not, so join the lines before deserialising.
fn unwrap_base64(o: &mut Value) {
    let join = |v: &mut Value| {
        if let Some(s) = v.as_str() {
            *v = Value::from(s.split_whitespace().collect::<String>());
        }
    };
    if o["kind"] == "Secret" {
        if let Some(data) = o.get_mut("data").and_then(Value::as_object_mut) {
            data.values_mut().for_each(join);
        }
    }
    if let Some(hooks) = o.get_mut("webhooks").and_then(Value::as_array_mut) {
        for h in hooks {
            if let Some(b) = h.pointer_mut("/clientConfig/caBundle") {
                join(b);
            }
        }
    }
}

/// Deserialises into `T`, failing on any field `T` does not know.
fn strict<T: DeserializeOwned>(v: &Value) -> T {
    let mut unknown = Vec::new();
    let t = serde_ignored::deserialize(v.clone(), |path| unknown.push(path.to_string()))
        .unwrap_or_else(|e| panic!("{} {}: {e}", v["kind"], v["metadata"]["name"]));
    assert!(
        unknown.is_empty(),
        "{} {}: unknown fields {unknown:?}",
        v["kind"],
        v["metadata"]["name"]
    );
    t
}

/// Every rendered object, checked by kind; returns the objects for further assertions.
struct Rendered {
    objects: Vec<Value>,
}

impl Rendered {
    fn new(dir: &Path) -> Self {
        let objects = render(dir);
        for o in &objects {
            match o["kind"].as_str().unwrap() {
                "Namespace" => drop(strict::<Namespace>(o)),
                "ServiceAccount" => drop(strict::<ServiceAccount>(o)),
                "ConfigMap" => drop(strict::<ConfigMap>(o)),
                "Secret" => drop(strict::<Secret>(o)),
                "Service" => drop(strict::<Service>(o)),
                "Deployment" => drop(strict::<Deployment>(o)),
                "PodDisruptionBudget" => drop(strict::<PodDisruptionBudget>(o)),
                "NetworkPolicy" => drop(strict::<NetworkPolicy>(o)),
                "ClusterRole" => drop(strict::<ClusterRole>(o)),
                "ClusterRoleBinding" => drop(strict::<ClusterRoleBinding>(o)),
                "Role" => drop(strict::<Role>(o)),
                "RoleBinding" => drop(strict::<RoleBinding>(o)),
                "MutatingWebhookConfiguration" => drop(strict::<MutatingWebhookConfiguration>(o)),
                "ValidatingAdmissionPolicy" => drop(strict::<ValidatingAdmissionPolicy>(o)),
                "ResourceQuota" => drop(strict::<ResourceQuota>(o)),
                "CustomResourceDefinition" => {
                    let crd = strict::<CustomResourceDefinition>(o);
                    assert_eq!(crd, MirroredImage::crd(), "the CRD in {}", dir.display());
                }
                "ValidatingAdmissionPolicyBinding" => {
                    drop(strict::<ValidatingAdmissionPolicyBinding>(o))
                }
                "Issuer" | "Certificate" => assert_eq!(o["apiVersion"], "cert-manager.io/v1"),
                "ServiceMonitor" | "PrometheusRule" => {
                    assert_eq!(o["apiVersion"], "monitoring.coreos.com/v1")
                }
                other => panic!("unexpected kind {other} in {}", dir.display()),
            }
        }
        Rendered { objects }
    }

    fn one<T: DeserializeOwned>(&self, kind: &str) -> T {
        let found: Vec<&Value> = self.objects.iter().filter(|o| o["kind"] == kind).collect();
        assert_eq!(found.len(), 1, "one {kind}");
        strict(found[0])
    }

    fn all<T: DeserializeOwned>(&self, kind: &str) -> Vec<T> {
        self.objects
            .iter()
            .filter(|o| o["kind"] == kind)
            .map(strict)
            .collect()
    }

    /// Every rule granted to the webhook's ServiceAccount, with the namespace it holds in
    /// (`None`: cluster-wide).
    fn granted(&self) -> Vec<(Option<String>, PolicyRule)> {
        let ours = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
            subjects.as_ref().is_some_and(|s| {
                s.iter().any(|s| {
                    s.kind == "ServiceAccount"
                        && s.name == "image-mirror-webhook"
                        && s.namespace.as_deref() == Some("image-mirror-system")
                })
            })
        };
        let mut out = Vec::new();
        for b in self.all::<ClusterRoleBinding>("ClusterRoleBinding") {
            if ours(&b.subjects) {
                let role: Vec<ClusterRole> = self.all("ClusterRole");
                let role = role
                    .iter()
                    .find(|r| r.metadata.name.as_deref() == Some(b.role_ref.name.as_str()))
                    .expect("bound ClusterRole is rendered");
                out.extend(
                    role.rules
                        .clone()
                        .unwrap_or_default()
                        .into_iter()
                        .map(|r| (None, r)),
                );
            }
        }
        for b in self.all::<RoleBinding>("RoleBinding") {
            if ours(&b.subjects) {
                let ns = b.metadata.namespace.clone();
                let roles: Vec<Role> = self.all("Role");
                let role = roles
                    .iter()
                    .find(|r| {
                        r.metadata.name.as_deref() == Some(b.role_ref.name.as_str())
                            && r.metadata.namespace == ns
                    })
                    .expect("bound Role is rendered");
                out.extend(
                    role.rules
                        .clone()
                        .unwrap_or_default()
                        .into_iter()
                        .map(|r| (ns.clone(), r)),
                );
            }
        }
        out
    }
}

fn serve_help() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_image-mirror-webhook"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

fn port_of(addr: &str) -> i32 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// One webhook of the configuration: how the API server calls it and for which Pods.
fn check_webhook(
    w: &k8s_openapi::api::admissionregistration::v1::MutatingWebhook,
    path: &str,
    label: &str,
) {
    assert_eq!(w.failure_policy.as_deref(), Some("Ignore"));
    assert_eq!(w.side_effects, "NoneOnDryRun");
    assert_eq!(w.reinvocation_policy.as_deref(), Some("IfNeeded"));
    assert_eq!(w.timeout_seconds, Some(5));
    assert_eq!(w.match_policy.as_deref(), Some("Equivalent"));
    assert_eq!(w.admission_review_versions, ["v1"]);
    let svc = w.client_config.service.as_ref().unwrap();
    assert_eq!(svc.path.as_deref(), Some(path));
    assert_eq!(
        (svc.name.as_str(), svc.namespace.as_str(), svc.port),
        ("image-mirror-webhook", "image-mirror-system", Some(443))
    );
    let rules = w.rules.as_ref().unwrap();
    let rule_for = |res: &str| {
        rules
            .iter()
            .find(|x| x.resources.as_ref().unwrap().contains(&res.to_string()))
            .unwrap()
    };
    // A Pod's images can change in place (kubectl set image): updates are seen too.
    assert_eq!(
        rule_for("pods").operations.as_ref().unwrap(),
        &["CREATE", "UPDATE"]
    );
    assert_eq!(
        rule_for("pods/ephemeralcontainers")
            .operations
            .as_ref()
            .unwrap(),
        &["UPDATE"]
    );
    let ns = w.namespace_selector.as_ref().unwrap();
    assert_eq!(
        ns.match_labels.as_ref().unwrap()["image-mirror/inject"],
        label
    );
    let never = ns
        .match_expressions
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.key == "kubernetes.io/metadata.name")
        .unwrap();
    assert_eq!(never.operator, "NotIn");
    for n in ["image-mirror-system", "kube-system"] {
        assert!(never.values.as_ref().unwrap().contains(&n.to_string()));
    }
    let obj = w
        .object_selector
        .as_ref()
        .unwrap()
        .match_expressions
        .as_ref()
        .unwrap();
    assert_eq!(
        (obj[0].key.as_str(), obj[0].operator.as_str()),
        ("image-mirror/inject", "NotIn")
    );
    assert_eq!(obj[0].values.as_ref().unwrap(), &["disabled"]);
}

fn check_common(r: &Rendered) -> Deployment {
    // The MutatingWebhookConfiguration: one webhook per opt-in label value, one path each.
    let mwc: MutatingWebhookConfiguration = r.one("MutatingWebhookConfiguration");
    let hooks = mwc.webhooks.unwrap();
    assert_eq!(hooks.len(), 2);
    for (w, path, label) in [
        (&hooks[0], MUTATE_PATH, "enabled"),
        (&hooks[1], REPORT_PATH, "report"),
    ] {
        check_webhook(w, path, label);
    }
    assert_ne!(hooks[0].name, hooks[1].name);

    // The Deployment runs the binary with its real flags, ports and paths.
    let d: Deployment = r.one("Deployment");
    let spec = d.spec.as_ref().unwrap();
    assert!(spec.replicas.unwrap() >= 2);
    let pod = spec.template.spec.as_ref().unwrap();
    assert!(pod.topology_spread_constraints.is_some());
    assert!(pod.affinity.as_ref().unwrap().pod_anti_affinity.is_some());
    assert_eq!(pod.automount_service_account_token, Some(true));
    let container = &pod.containers[0];
    assert!(container
        .env
        .as_ref()
        .unwrap()
        .iter()
        .any(|e| e.name == "POD_NAME"));
    // Copy Jobs go to the webhook's namespace, read from the downward API.
    let namespace = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "POD_NAMESPACE")
        .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(namespace, Some("metadata.namespace"));
    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(
        psc.seccomp_profile.as_ref().unwrap().type_,
        "RuntimeDefault"
    );
    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(),
        &["ALL"]
    );
    let res = c.resources.as_ref().unwrap();
    assert!(res.requests.is_some() && res.limits.is_some());

    let help = serve_help();
    let args = c.args.as_ref().unwrap();
    let mut flags = std::collections::HashMap::new();
    for a in args {
        let (flag, value) = a.split_once('=').unwrap_or((a, ""));
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag} <")),
            "{flag} is not a serve flag"
        );
        flags.insert(flag.to_string(), value.to_string());
    }
    let ports: std::collections::HashMap<_, _> = c
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| (p.name.clone().unwrap(), p.container_port))
        .collect();
    assert_eq!(ports["https"], port_of(&flags["--listen"]));
    assert_eq!(ports["metrics"], port_of(&flags["--metrics-listen"]));
    assert_eq!(port_of(&flags["--listen"]), port_of(DEFAULT_LISTEN));
    assert_eq!(
        port_of(&flags["--metrics-listen"]),
        port_of(DEFAULT_METRICS_LISTEN)
    );
    let ready = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(ready.path.as_deref(), Some("/readyz"));
    // On the plain metrics port: the admission port may require the API server's client
    // certificate (--client-ca), which the kubelet does not have.
    assert_eq!(
        ready.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("metrics".into())
    );
    assert_eq!(ready.scheme.as_deref(), Some("HTTP"));
    // The serving key is readable by the owner and the Pod's group only (0440).
    let tls = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "tls")
        .and_then(|v| v.secret.as_ref())
        .unwrap();
    assert_eq!(tls.default_mode, Some(0o440));
    assert_eq!(psc.fs_group, Some(65532));
    let live = c
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(live.path.as_deref(), Some("/healthz"));

    // Mounted directories hold the files the flags name (directories, so reloads see updates).
    let mounts = c.volume_mounts.as_ref().unwrap();
    for (flag, volume) in [
        ("--tls-cert", "tls"),
        ("--tls-key", "tls"),
        ("--config", "config"),
    ] {
        let m = mounts.iter().find(|m| m.name == volume).unwrap();
        assert!(m.sub_path.is_none(), "{volume} must be a directory mount");
        assert_eq!(
            Path::new(&flags[flag]).parent().unwrap(),
            Path::new(&m.mount_path),
            "{flag}"
        );
    }
    let config_volume = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "config")
        .unwrap();
    let config_map_name = &config_volume.config_map.as_ref().unwrap().name;
    let cm: Vec<ConfigMap> = r
        .objects
        .iter()
        .filter(|o| o["kind"] == "ConfigMap" && &o["metadata"]["name"] == config_map_name)
        .map(strict)
        .collect();
    assert_eq!(
        cm.len(),
        1,
        "the config volume's ConfigMap {config_map_name} is rendered"
    );
    let file = Path::new(&flags["--config"])
        .file_name()
        .unwrap()
        .to_str()
        .unwrap();
    let table = &cm[0].data.as_ref().unwrap()[file];
    image_mirror_webhook::config::Config::parse(file, table)
        .map(|c| c.table)
        .unwrap_or_else(|e| panic!("{e}"));
    let tls_secret = &pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "tls")
        .unwrap()
        .secret
        .as_ref()
        .unwrap()
        .secret_name;
    assert_eq!(tls_secret.as_deref(), Some("image-mirror-webhook-tls"));

    // Longer grace than the drain the flags ask for.
    let secs = |f: &str| {
        image_mirror_webhook::settings::parse_duration(&flags[f])
            .unwrap()
            .as_secs() as i64
    };
    assert!(
        pod.termination_grace_period_seconds.unwrap()
            > secs("--shutdown-delay") + secs("--drain-timeout")
    );

    // Service 443 → https; PDB; NetworkPolicy (the API server's port too); a ServiceAccount
    // with a token that may read namespaces.
    let s: Service = r.one("Service");
    let sp = s.spec.unwrap().ports.unwrap();
    let https = sp.iter().find(|p| p.port == 443).unwrap();
    assert_eq!(serde_json::to_value(&https.target_port).unwrap(), "https");
    assert!(sp.iter().any(|p| p.name.as_deref() == Some("metrics")));
    let _: PodDisruptionBudget = r.one("PodDisruptionBudget");
    let np: NetworkPolicy = r
        .all::<NetworkPolicy>("NetworkPolicy")
        .into_iter()
        .find(|p| p.metadata.name.as_deref() == Some("image-mirror-webhook"))
        .expect("the webhook's NetworkPolicy");
    let egress_ports: Vec<i32> = np
        .spec
        .unwrap()
        .egress
        .unwrap()
        .iter()
        .flat_map(|e| e.ports.clone().unwrap_or_default())
        .filter_map(|p| match p.port {
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => Some(n),
            _ => None,
        })
        .collect();
    for port in [53, 443, 6443] {
        assert!(
            egress_ports.contains(&port),
            "egress {port}: {egress_ports:?}"
        );
    }
    let sa: ServiceAccount = r.one("ServiceAccount");
    assert_eq!(sa.automount_service_account_token, Some(true));
    let granted = r.granted();
    assert!(granted.iter().any(|(ns, rule)| ns.is_none()
        && rule.resources.as_deref() == Some(&["namespaces".to_string()][..])
        && rule.verbs == ["get", "list", "watch"]));
    for (_, rule) in &granted {
        assert!(!rule.verbs.iter().any(|v| v == "*"), "{rule:?}");
        assert!(
            !rule.resources.iter().flatten().any(|r| r == "*"),
            "{rule:?}"
        );
    }
    let nsobj: Namespace = r.one("Namespace");
    assert_eq!(nsobj.metadata.name.as_deref(), Some("image-mirror-system"));
    d
}

fn check_cert_manager(r: &Rendered) {
    let mwc: MutatingWebhookConfiguration = r.one("MutatingWebhookConfiguration");
    assert_eq!(
        mwc.metadata.annotations.unwrap()["cert-manager.io/inject-ca-from"],
        "image-mirror-system/image-mirror-webhook"
    );
    let cert = r
        .objects
        .iter()
        .find(|o| o["kind"] == "Certificate" && o["metadata"]["name"] == "image-mirror-webhook")
        .unwrap();
    assert_eq!(cert["spec"]["secretName"], "image-mirror-webhook-tls");
    assert!(cert["spec"]["dnsNames"]
        .as_array()
        .unwrap()
        .contains(&Value::from("image-mirror-webhook.image-mirror-system.svc")));
}

#[test]
fn ghcr_overlay() {
    let r = Rendered::new(&root().join("deploy/overlays/ghcr"));
    check_common(&r);
    check_cert_manager(&r);
    let cm: ConfigMap = r.one("ConfigMap");
    let table = image_mirror_webhook::config::Config::parse(
        "config.yaml",
        &cm.data.unwrap()["config.yaml"],
    )
    .map(|c| c.table)
    .unwrap();
    assert_eq!(
        table.mirror("ghcr").unwrap().pull_secret.as_deref(),
        Some("ghcr-pull")
    );
    assert_eq!(table.entries().len(), 28);
    check_pull_secret_rights(&r, &table);
}

/// The pull-secrets component: Secret rights narrowed to the table's names, events to create.
fn check_pull_secret_rights(r: &Rendered, table: &Table) {
    let ghcr = table.mirror("ghcr").unwrap();
    let copies = ghcr.pull_secret.clone().unwrap();
    let source = ghcr.pull_secret_from.clone().unwrap();
    let granted = r.granted();
    let secret_rules: Vec<&(Option<String>, PolicyRule)> = granted
        .iter()
        .filter(|(_, r)| r.resources.iter().flatten().any(|x| x == "secrets"))
        .collect();
    let verbs_for = |ns: Option<&str>, name: &str| -> Vec<String> {
        secret_rules
            .iter()
            .filter(|(n, r)| {
                n.as_deref() == ns
                    && r.resource_names
                        .as_ref()
                        .is_some_and(|names| names.contains(&name.to_string()))
            })
            .flat_map(|(_, r)| r.verbs.clone())
            .collect()
    };
    assert_eq!(
        verbs_for(None, &copies),
        ["get", "list", "watch", "patch", "delete"]
    );
    assert_eq!(
        verbs_for(Some(&source.namespace), &source.name),
        ["get", "list", "watch"]
    );
    // Only create is not narrowed by name (RBAC cannot: the object does not exist yet).
    let unnamed: Vec<&String> = secret_rules
        .iter()
        .filter(|(_, r)| r.resource_names.is_none())
        .flat_map(|(_, r)| &r.verbs)
        .collect();
    assert_eq!(unnamed, ["create"]);
    // Events only in the webhook's own namespace, where they are recorded.
    let events: Vec<&(Option<String>, PolicyRule)> = granted
        .iter()
        .filter(|(_, r)| r.api_groups.as_deref() == Some(&["events.k8s.io".to_string()][..]))
        .collect();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0.as_deref(), Some(source.namespace.as_str()));
    assert_eq!(events[0].1.verbs, ["create", "patch"]);
    check_secret_fence(r, &copies);
}

/// The ValidatingAdmissionPolicy that narrows what RBAC cannot (create by name): it applies to
/// the webhook's ServiceAccount as the overlay names it, allows the copies' name and type only,
/// fails closed, and is bound to deny.
fn check_secret_fence(r: &Rendered, copies: &str) {
    let policy: ValidatingAdmissionPolicy = r.one("ValidatingAdmissionPolicy");
    let binding: ValidatingAdmissionPolicyBinding = r.one("ValidatingAdmissionPolicyBinding");
    let sa: ServiceAccount = r.one("ServiceAccount");
    let user = format!(
        "system:serviceaccount:{}:{}",
        sa.metadata.namespace.unwrap(),
        sa.metadata.name.unwrap()
    );
    let spec = policy.spec.unwrap();
    assert_eq!(spec.failure_policy.as_deref(), Some("Fail"));
    let conditions = spec.match_conditions.unwrap();
    assert_eq!(conditions.len(), 1);
    assert_eq!(
        conditions[0].expression,
        format!("request.userInfo.username == '{user}'")
    );
    let validations = spec.validations.unwrap();
    assert!(validations
        .iter()
        .any(|v| v.expression == format!("variables.secret.metadata.name == '{copies}'")));
    assert!(validations.iter().any(|v| v
        .expression
        .contains("object.type == 'kubernetes.io/dockerconfigjson'")));
    let binding = binding.spec;
    assert_eq!(binding.policy_name, policy.metadata.name.unwrap());
    assert_eq!(binding.validation_actions, ["Deny"]);
}

#[test]
fn ecr_overlay() {
    let r = Rendered::new(&root().join("deploy/overlays/ecr"));
    check_common(&r);
    check_cert_manager(&r);
    let cm: ConfigMap = r.one("ConfigMap");
    let table = image_mirror_webhook::config::Config::parse(
        "config.yaml",
        &cm.data.unwrap()["config.yaml"],
    )
    .map(|c| c.table)
    .unwrap();
    let ecr = table.mirror("ecr").unwrap();
    assert_eq!(ecr.pull_secret, None);
    // No pull secret, so no right on Secrets at all.
    assert!(!r.granted().iter().any(|(_, rule)| rule
        .resources
        .iter()
        .flatten()
        .any(|x| x == "secrets")));
    let policy: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/components/ecr/node-iam-policy.json"))
            .unwrap(),
    )
    .unwrap();
    // Only the login, which AWS does not scope to repositories, holds for every resource; the
    // pull-through actions hold for the table's cache prefixes in its account and region.
    let statements = policy["Statement"].as_array().unwrap();
    let (login, cache) = (&statements[0], &statements[1]);
    assert_eq!(
        login["Action"],
        serde_json::json!(["ecr:GetAuthorizationToken"])
    );
    assert_eq!(login["Resource"], "*");
    let actions = cache["Action"].as_array().unwrap();
    for a in ["ecr:BatchImportUpstreamImage", "ecr:CreateRepository"] {
        assert!(actions.contains(&Value::from(a)), "{a}");
    }
    let registry = ecr.registry.clone();
    let account = registry.split('.').next().unwrap();
    let region = registry.split('.').nth(3).unwrap();
    let image_mirror_webhook::mapping::MirrorKind::PullThrough { upstreams } = &ecr.kind else {
        panic!("the ecr mirror is a pull-through cache");
    };
    let mut wanted: Vec<String> = upstreams
        .values()
        .map(|prefix| format!("arn:aws:ecr:{region}:{account}:repository/{prefix}/*"))
        .collect();
    wanted.sort();
    let mut resources: Vec<String> = cache["Resource"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    resources.sort();
    assert_eq!(resources, wanted);
    assert_eq!(statements.len(), 2);
}

#[test]
fn self_signed_overlay_with_generated_certificates() {
    // Render a copy with certificates from the binary itself, as the README's steps do.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("deploy");
    common::copy_tree(&root().join("deploy"), &copy);
    let status = Command::new(env!("CARGO_BIN_EXE_image-mirror-webhook"))
        .args(["certs", "--out"])
        .arg(copy.join("components/self-signed"))
        .output()
        .unwrap();
    assert!(status.status.success());
    let printed_bundle = String::from_utf8(status.stdout).unwrap().trim().to_string();
    let r = Rendered::new(&copy.join("overlays/self-signed"));
    check_common(&r);
    let cm: ConfigMap = r.one("ConfigMap");
    let table = image_mirror_webhook::config::Config::parse(
        "config.yaml",
        &cm.data.unwrap()["config.yaml"],
    )
    .map(|c| c.table)
    .unwrap();
    check_pull_secret_rights(&r, &table);
    let mwc: MutatingWebhookConfiguration = r.one("MutatingWebhookConfiguration");
    let hooks = mwc.webhooks.unwrap();
    let bundle = hooks[0].client_config.ca_bundle.clone().unwrap().0;
    assert_eq!(hooks[1].client_config.ca_bundle.clone().unwrap().0, bundle);
    let pem = String::from_utf8(bundle).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    let printed = base64::engine::general_purpose::STANDARD
        .decode(printed_bundle)
        .unwrap();
    assert_eq!(
        pem.as_bytes(),
        printed,
        "the caBundle is the CA `certs` printed"
    );
    let secret: Secret = r.one("Secret");
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    assert!(secret.data.unwrap().contains_key("tls.key"));
}

#[test]
fn copy_jobs_component_grants_jobs_in_its_own_namespace_only() {
    // The ghcr overlay with the component added, as the README says to.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("deploy");
    common::copy_tree(&root().join("deploy"), &copy);
    let overlay = copy.join("overlays/ghcr/kustomization.yaml");
    let text = std::fs::read_to_string(&overlay).unwrap();
    let with = text.replace(
        "  - ../../components/pull-secrets\n",
        "  - ../../components/pull-secrets\n  - ../../components/copy-jobs\n",
    );
    assert_ne!(text, with, "the overlay lists its components as expected");
    std::fs::write(&overlay, with).unwrap();
    let r = Rendered::new(&copy.join("overlays/ghcr"));
    check_common(&r);
    let granted = r.granted();
    let on = |group: &str, resource: &str| -> Vec<(Option<String>, Vec<String>)> {
        granted
            .iter()
            .filter(|(_, rule)| {
                rule.api_groups.iter().flatten().any(|g| g == group)
                    && rule.resources.iter().flatten().any(|x| x == resource)
            })
            .map(|(ns, rule)| (ns.clone(), rule.verbs.clone()))
            .collect()
    };
    let ns = Some("image-mirror-system".to_string());
    let verbs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        on("batch", "jobs"),
        [(ns.clone(), verbs(&["create", "get", "list", "watch"]))]
    );
    assert_eq!(on("", "pods"), [(ns, verbs(&["get"]))]);
    // Without the component: no right on Jobs or Pods.
    let plain = Rendered::new(&root().join("deploy/overlays/ghcr")).granted();
    assert!(!plain.iter().any(|(_, rule)| rule
        .resources
        .iter()
        .flatten()
        .any(|x| x == "jobs" || x == "pods")));
    // The copy Pods' NetworkPolicy selects what the webhook labels them with.
    let policies: Vec<NetworkPolicy> = r.all("NetworkPolicy");
    let copy_policy = policies
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("image-mirror-copy"))
        .expect("the component's NetworkPolicy");
    let selector = copy_policy.spec.as_ref().unwrap().pod_selector.clone();
    assert_eq!(
        selector.unwrap().match_labels.unwrap()["app.kubernetes.io/name"],
        "image-mirror-copy"
    );
    assert_eq!(
        copy_policy.metadata.namespace.as_deref(),
        Some("image-mirror-system")
    );
    // The quota caps copy Pods (Terminating: they have a deadline), room for a few at the
    // requests the webhook gives them, and never the webhook's own Pods (no deadline).
    let quota: ResourceQuota = r.one("ResourceQuota");
    let spec = quota.spec.unwrap();
    assert_eq!(spec.scopes.unwrap(), ["Terminating"]);
    let hard = spec.hard.unwrap();
    assert!(hard["pods"].0.parse::<u32>().unwrap() >= 2);
    let deployment: Deployment = r.one("Deployment");
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.active_deadline_seconds, None);
    let namespace: Namespace = r.one("Namespace");
    assert_eq!(
        namespace.metadata.labels.unwrap()["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
}

#[test]
fn monitoring_names_only_metrics_the_binary_exports() {
    let r = Rendered::new(&root().join("deploy/monitoring"));
    use image_mirror_webhook::metrics::*;
    let (m, registry) = Metrics::new();
    // A label family appears in a scrape once it has a sample.
    let result = ResultLabels { result: "x" };
    m.admission_requests
        .get_or_create(&RequestLabels {
            operation: "x".into(),
            result: "x",
        })
        .inc();
    m.rewrites
        .get_or_create(&RewriteLabels {
            namespace: "x".into(),
            source_registry: "x".into(),
            mirror: "x".into(),
            kind: "x",
        })
        .inc();
    m.skips.get_or_create(&ReasonLabels { reason: "x" }).inc();
    m.pull_secrets_injected
        .get_or_create(&SecretLabels { secret: "x".into() })
        .inc();
    m.config_reloads.get_or_create(&result).inc();
    m.certificate_reloads.get_or_create(&result).inc();
    m.checks
        .get_or_create(&CheckLabels {
            registry: "x".into(),
            result: "x",
        })
        .inc();
    m.check_cache.get_or_create(&result).inc();
    m.copies.get_or_create(&result).inc();
    m.too_many_requests
        .get_or_create(&RegistryLabels {
            registry: "x".into(),
        })
        .inc();
    m.copies_paused
        .get_or_create(&RegistryLabels {
            registry: "x".into(),
        })
        .set(1);
    let (text, _) = encode(&registry, false).unwrap();
    let mut known: Vec<String> = Vec::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = line.split(' ').next().unwrap();
        known.push(name.to_string());
        for suffix in ["_bucket", "_sum", "_count"] {
            known.push(format!("{name}{suffix}"));
        }
    }
    let rendered = serde_json::to_string(&r.objects).unwrap();
    let names: Vec<&str> = rendered
        .match_indices("image_mirror_")
        .map(|(i, _)| {
            let rest = &rendered[i..];
            &rest[..rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len())]
        })
        .collect();
    assert!(names.len() > 10);
    for n in names {
        assert!(known.iter().any(|k| k == n), "{n} is not exported");
    }
    let rule = r
        .objects
        .iter()
        .find(|o| o["kind"] == "PrometheusRule")
        .unwrap();
    let alerts: Vec<&str> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["alert"].as_str().unwrap())
        .collect();
    for a in [
        "ImageMirrorAdmissionErrors",
        "ImageMirrorCopyFailures",
        "ImageMirrorRegistryRateLimited",
        "ImageMirrorCertificateExpiring",
        "ImageMirrorAdmissionSlow",
        "ImageMirrorCopiesGivenUp",
        "ImageMirrorPullBudgetLow",
    ] {
        assert!(alerts.contains(&a), "{a}");
    }
    // Prometheus itself accepts the rules (the spec is a rule file; JSON is YAML).
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(&rules, rule["spec"].to_string()).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("promtool (Debian: prometheus) is installed");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let cm: ConfigMap = r.one("ConfigMap");
    let dash: Value = serde_json::from_str(&cm.data.unwrap()["image-mirror-webhook.json"]).unwrap();
    assert!(dash["panels"].as_array().unwrap().len() >= 6);
}

#[test]
fn dockerfile_runs_the_binary_as_non_root() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    assert!(text.contains("ENTRYPOINT [\"/image-mirror-webhook\", \"serve\"]"));
    // Copy Jobs run the binary by this path (the ENTRYPOINT would add `serve`).
    assert!(text.contains(&format!(
        "release/image-mirror-webhook {}\n",
        image_mirror_webhook::cluster::copy_jobs::IMAGE_BINARY
    )));
    assert!(text.contains("USER 65532"));
    assert!(text.matches("FROM ").count() >= 2, "multi-stage");
    assert!(text.contains("org.opencontainers.image.source"));
    // Base images by digest: a rebuild gets the bytes that were reviewed.
    for from in text.lines().filter(|l| l.starts_with("FROM ")) {
        let image = from.split_whitespace().nth(1).unwrap();
        let digest = image.split_once("@sha256:").map(|(_, d)| d).unwrap_or("");
        assert!(
            digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
            "{from}"
        );
    }
    // The dependency stage makes a stand-in for every bench the manifest names (cargo refuses a
    // manifest whose targets are missing): the same awk over Cargo.toml finds them all.
    let program = text
        .split("awk '")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .expect("the Dockerfile lists benches with awk");
    let out = Command::new("awk")
        .arg(program)
        .arg(root().join("Cargo.toml"))
        .output()
        .unwrap();
    let found: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(found, bench_names(&root().join("Cargo.toml")));
}

/// The `[[bench]]` names of a Cargo manifest, read line by line (no TOML parser here).
fn bench_names(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut names = Vec::new();
    let mut in_bench = false;
    for line in text.lines() {
        if line.starts_with('[') {
            in_bench = line == "[[bench]]";
        } else if let Some(name) = line.strip_prefix("name = ").filter(|_| in_bench) {
            names.push(name.trim_matches('"').to_string());
        }
    }
    names
}

/// What `serve` exposes on /metrics right after it started (the GHCR table, no Kubernetes): the
/// series names with their labels, `name{labels}`.
fn series_at_start() -> std::collections::BTreeSet<String> {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap();
    image_mirror_webhook::certs::DevCerts::generate(&["localhost".to_string()])
        .unwrap()
        .write(dir.path())
        .unwrap();
    let mut child = common::serve_command(
        &dir.path().join("tls.crt"),
        &dir.path().join("tls.key"),
        &root().join("deploy/components/ghcr/config.yaml"),
    )
    .args(["--kubernetes", "off"])
    .env("RUST_LOG", "info")
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let metrics = stderr
        .lines()
        .map_while(Result::ok)
        .find_map(|l| common::serving_addrs(&l))
        .expect("serve starts")
        .1;
    let text = std::process::Command::new("curl")
        .args(["-sS", &format!("http://{metrics}/metrics")])
        .output()
        .unwrap()
        .stdout;
    let _ = child.kill();
    let _ = child.wait();
    String::from_utf8(text)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(series, _)| series.to_string()))
        .collect()
}

/// One alert's unit test: series (as the webhook exposes them) with their values per minute, and
/// when the alert must be firing.
struct AlertCase {
    alert: &'static str,
    series: &'static [(&'static str, &'static str)],
    firing_at: &'static str,
    /// The labels the alert carries besides its own (a `by` clause).
    labels: &'static str,
}

const ALERT_CASES: &[AlertCase] = &[
    AlertCase {
        alert: "ImageMirrorAdmissionErrors",
        series: &[(
            r#"image_mirror_admission_requests_total{operation="CREATE",result="error"}"#,
            "0x10 1+1x40",
        )],
        firing_at: "30m",
        labels: "",
    },
    AlertCase {
        alert: "ImageMirrorCopyFailures",
        series: &[(r#"image_mirror_copies_total{result="failure"}"#, "0 1+1x60")],
        firing_at: "45m",
        labels: "",
    },
    AlertCase {
        alert: "ImageMirrorCopiesGivenUp",
        // One copy given up, the first event after start.
        series: &[(
            r#"image_mirror_copies_total{result="given_up"}"#,
            "0 0 0 1x5",
        )],
        firing_at: "4m",
        labels: "",
    },
    AlertCase {
        alert: "ImageMirrorPullBudgetLow",
        series: &[(
            r#"image_mirror_copies_paused{registry="docker.io"}"#,
            "0 1x150",
        )],
        firing_at: "140m",
        labels: r#"registry="docker.io""#,
    },
    AlertCase {
        alert: "ImageMirrorRegistryRateLimited",
        series: &[(
            r#"image_mirror_registry_too_many_requests_total{registry="docker.io"}"#,
            "0 5+5x40",
        )],
        firing_at: "30m",
        labels: r#"registry="docker.io""#,
    },
    AlertCase {
        alert: "ImageMirrorCertificateExpiring",
        // A week left (the clock of a rule test starts at 0).
        series: &[(
            "image_mirror_certificate_expiry_timestamp_seconds",
            "604800x90",
        )],
        firing_at: "70m",
        labels: "",
    },
    AlertCase {
        alert: "ImageMirrorAdmissionSlow",
        // Every review between 1 and 1.5 s.
        series: &[
            (
                r#"image_mirror_admission_duration_seconds_bucket{le="0.5"}"#,
                "0x30",
            ),
            (
                r#"image_mirror_admission_duration_seconds_bucket{le="1.0"}"#,
                "0x30",
            ),
            (
                r#"image_mirror_admission_duration_seconds_bucket{le="1.5"}"#,
                "0 10+10x30",
            ),
            (
                r#"image_mirror_admission_duration_seconds_bucket{le="+Inf"}"#,
                "0 10+10x30",
            ),
        ],
        firing_at: "25m",
        labels: "",
    },
    AlertCase {
        alert: "ImageMirrorConfigReloadFailed",
        series: &[(
            r#"image_mirror_config_reloads_total{result="failure"}"#,
            "0 0 1x5",
        )],
        firing_at: "3m",
        labels: "",
    },
];

/// The optional rule reads the API server's metric, not the webhook's.
const FAIL_OPEN_CASE: AlertCase = AlertCase {
    alert: "ImageMirrorWebhookFailingOpen",
    series: &[(
        r#"apiserver_admission_webhook_fail_open_count{name="pods.image-mirror-webhook.image-mirror.io",type="admit"}"#,
        "0 0 3x5",
    )],
    firing_at: "3m",
    labels: "",
};

/// `promtool test rules` of `rules` (a PrometheusRule's spec) with one test per case: each fires
/// on its series, and not before they move.
fn promtool_test_rules(rules: &Value, cases: &[&AlertCase]) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), rules.to_string()).unwrap();
    let mut tests = Vec::new();
    for case in cases {
        let input: Vec<Value> = case
            .series
            .iter()
            .map(|(s, v)| serde_json::json!({"series": s, "values": v}))
            .collect();
        let severity = rules["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .find(|r| r["alert"] == case.alert)
            .map(|r| r["labels"]["severity"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("no alert {}", case.alert));
        let extra = if case.labels.is_empty() {
            String::new()
        } else {
            format!(", {}", case.labels)
        };
        let firing = |at: &str, samples: Vec<Value>| {
            serde_json::json!({
                "expr": format!("ALERTS{{alertname=\"{}\", alertstate=\"firing\"}}", case.alert),
                "eval_time": at,
                "exp_samples": samples,
            })
        };
        let labels = format!(
            "ALERTS{{alertname=\"{}\", alertstate=\"firing\", severity=\"{severity}\"{extra}}}",
            case.alert
        );
        tests.push(serde_json::json!({
            "interval": "1m",
            "input_series": input,
            "promql_expr_test": [
                firing("0m", vec![]),
                firing(case.firing_at, vec![serde_json::json!({"labels": labels, "value": 1})]),
            ],
        }));
    }
    let file = serde_json::json!({
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": tests,
    });
    std::fs::write(dir.path().join("tests.yaml"), file.to_string()).unwrap();
    let out = Command::new("promtool")
        .args(["test", "rules", "tests.yaml"])
        .current_dir(dir.path())
        .output()
        .expect("promtool (Debian: prometheus) is installed");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every alert fires on the series the webhook exposes from start, including the first event
/// after start (a series that appeared only with it would give `increase()` nothing to compare).
#[test]
fn every_alert_fires_on_the_series_the_webhook_exposes_from_start() {
    let r = Rendered::new(&root().join("deploy/monitoring"));
    let rule = r
        .objects
        .iter()
        .find(|o| o["kind"] == "PrometheusRule")
        .unwrap();
    let alerts: Vec<&str> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["alert"].as_str().unwrap())
        .collect();
    let tested: Vec<&str> = ALERT_CASES.iter().map(|c| c.alert).collect();
    assert_eq!(alerts, tested, "every alert has its unit test here");
    let exposed = series_at_start();
    for case in ALERT_CASES {
        for (series, _) in case.series {
            assert!(
                exposed.contains(*series),
                "{}: {series} is not exposed at start:\n{exposed:#?}",
                case.alert
            );
        }
    }
    promtool_test_rules(&rule["spec"], &ALERT_CASES.iter().collect::<Vec<_>>());

    // The optional rule on the API server's metric.
    let text =
        std::fs::read_to_string(root().join("deploy/monitoring/optional/apiserver-fail-open.yaml"))
            .unwrap();
    let optional: Value = serde_saphyr::from_str(&text).unwrap();
    assert_eq!(optional["kind"], "PrometheusRule");
    promtool_test_rules(&optional["spec"], &[&FAIL_OPEN_CASE]);
}

/// The network settings live in one component every overlay includes; changed there as its
/// comments say (control plane only, another scraping namespace, a registry on port 5000), the
/// rendered policy follows.
#[test]
fn network_policy_settings_are_set_in_one_component() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("deploy");
    common::copy_tree(&root().join("deploy"), &copy);
    let rules = copy.join("components/network-policy/rules.yaml");
    let text = std::fs::read_to_string(&rules).unwrap();
    let changed = text
        .replacen(
            "    - ports:\n        - {port: 8443, protocol: TCP}\n",
            "    - ports:\n        - {port: 8443, protocol: TCP}\n      from: [{ipBlock: {cidr: 10.0.0.10/32}}]\n",
            1,
        )
        .replace(
            "kubernetes.io/metadata.name: monitoring",
            "kubernetes.io/metadata.name: observability",
        )
        .replace(
            "    #   - ports:\n    #       - {port: 5000, protocol: TCP}\n",
            "    - ports:\n        - {port: 5000, protocol: TCP}\n",
        );
    assert_eq!(
        changed.matches("10.0.0.10/32").count(),
        2,
        "the example and the setting"
    );
    assert!(
        changed.contains("observability")
            && changed.contains("    - ports:\n        - {port: 5000")
    );
    std::fs::write(&rules, changed).unwrap();
    for overlay in ["ghcr", "ecr", "self-signed"] {
        if overlay == "self-signed" {
            Command::new(env!("CARGO_BIN_EXE_image-mirror-webhook"))
                .args(["certs", "--out"])
                .arg(copy.join("components/self-signed"))
                .output()
                .unwrap();
        }
        let r = Rendered::new(&copy.join("overlays").join(overlay));
        let np: NetworkPolicy = r
            .all::<NetworkPolicy>("NetworkPolicy")
            .into_iter()
            .find(|p| p.metadata.name.as_deref() == Some("image-mirror-webhook"))
            .unwrap();
        let spec = np.spec.unwrap();
        let ingress = spec.ingress.unwrap();
        let cidr = ingress[0].from.as_ref().unwrap()[0]
            .ip_block
            .as_ref()
            .unwrap();
        assert_eq!(cidr.cidr, "10.0.0.10/32", "{overlay}");
        let scrape = ingress[1].from.as_ref().unwrap()[0]
            .namespace_selector
            .clone()
            .unwrap()
            .match_labels
            .unwrap();
        assert_eq!(scrape["kubernetes.io/metadata.name"], "observability");
        let ports: Vec<String> = spec
            .egress
            .unwrap()
            .iter()
            .flat_map(|e| e.ports.clone().unwrap_or_default())
            .map(|p| serde_json::to_value(p.port).unwrap().to_string())
            .collect();
        assert!(ports.contains(&"5000".to_string()), "{overlay}: {ports:?}");
    }
}

/// The CRD in `deploy/` is generated from the Rust types (`image-mirror-webhook crd`), and the
/// component grants the records and their status, nothing wider.
#[test]
fn the_mirrored_image_crd_is_the_types_and_its_rights_are_narrow() {
    let dir = root().join("deploy/components/mirrored-images");
    let file = std::fs::read_to_string(dir.join("crd.yaml")).unwrap();
    let generated = image_mirror_webhook::cluster::images::crd::crd_yaml().unwrap();
    assert!(
        file == generated,
        "deploy/components/mirrored-images/crd.yaml differs from the types; regenerate it:\n  \
         cargo run -q -- crd > deploy/components/mirrored-images/crd.yaml"
    );
    let crd: CustomResourceDefinition = serde_saphyr::from_str(&file).unwrap();
    assert_eq!(crd.spec.scope, "Cluster");
    let columns: Vec<String> = crd.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(
        columns,
        ["Source", "Target", "Phase", "Digest", "Last Used", "Age"]
    );
    let rendered = Rendered::new(&root().join("deploy/overlays/ghcr"));
    let role: ClusterRole = rendered
        .all::<ClusterRole>("ClusterRole")
        .into_iter()
        .find(|r| r.metadata.name.as_deref() == Some("image-mirror-webhook-mirrored-images"))
        .expect("the overlay grants the records");
    for rule in role.rules.iter().flatten() {
        assert_eq!(
            rule.api_groups.as_deref(),
            Some(&["image-mirror.dev".to_string()][..])
        );
        for resource in rule.resources.iter().flatten() {
            assert!(
                resource == "mirroredimages" || resource == "mirroredimages/status",
                "{resource}"
            );
        }
        assert!(!rule
            .verbs
            .iter()
            .any(|v| v == "*" || v == "update" || v == "deletecollection"));
    }
}

/// The IAM policies of `deploy/` are valid JSON policy documents that grant no wildcard action
/// and only actions the webhook calls (its SDK calls, and what ECR authorises its registry
/// requests as); every SDK call is granted by some policy; and the ecr overlay's ServiceAccount
/// carries the IRSA role annotation.
#[test]
fn iam_policies_grant_only_what_the_webhook_calls() {
    use image_mirror_webhook::aws::{REGISTRY_PULL_ACTIONS, REGISTRY_PUSH_ACTIONS, SDK_ACTIONS};
    let known: Vec<&str> = SDK_ACTIONS
        .iter()
        .chain(&REGISTRY_PULL_ACTIONS)
        .chain(&REGISTRY_PUSH_ACTIONS)
        .copied()
        .collect();
    // AWS does not scope these to a repository.
    let unscoped = [
        "ecr:GetAuthorizationToken",
        "ecr:DescribePullThroughCacheRules",
    ];
    let mut granted = std::collections::BTreeSet::new();
    for file in [
        "deploy/iam/pull-through.json",
        "deploy/iam/repository-mirror.json",
        "deploy/components/ecr/node-iam-policy.json",
    ] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        let policy: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file} is not JSON: {e}"));
        assert_eq!(policy["Version"], "2012-10-17", "{file}");
        for statement in policy["Statement"].as_array().unwrap() {
            assert_eq!(statement["Effect"], "Allow", "{file}");
            let actions: Vec<&str> = statement["Action"]
                .as_array()
                .unwrap_or_else(|| panic!("{file}: Action is a list"))
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            for a in &actions {
                assert!(!a.contains('*'), "{file}: wildcard action {a}");
                assert!(
                    known.contains(a),
                    "{file}: {a} is not called by the webhook"
                );
                granted.insert(a.to_string());
            }
            let everywhere = statement["Resource"] == "*";
            assert_eq!(
                everywhere,
                actions.iter().all(|a| unscoped.contains(a)),
                "{file}: only the token and the cache rules hold on every resource"
            );
        }
    }
    for a in SDK_ACTIONS {
        assert!(
            granted.contains(a),
            "no policy grants {a}, which the webhook calls"
        );
    }
    let r = Rendered::new(&root().join("deploy/overlays/ecr"));
    let sa: ServiceAccount = r.one("ServiceAccount");
    let role = &sa.metadata.annotations.unwrap()["eks.amazonaws.com/role-arn"];
    assert!(
        role.starts_with("arn:aws:iam::123456789012:role/"),
        "{role}"
    );
}
