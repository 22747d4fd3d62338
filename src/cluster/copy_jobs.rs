//! Copies as Kubernetes Jobs (`copies.runner: job`): one `batch/v1` Job per (source, target)
//! in the webhook's own namespace, running this image's `copy` command with the webhook's table,
//! credentials and security context.
//!
//! - The Job's name is a hash of (source, target), so a second request, from this replica or
//!   another, finds the Job that is there (a 409) instead of starting another.
//! - What the Job needs comes from the webhook's own Pod, read once: image, env, `envFrom`,
//!   mounts (but the serving certificate and the ServiceAccount token), security contexts,
//!   scheduling and pull secrets. The Job gets no Kubernetes token.
//! - A watcher on the Jobs tells the mirror service of every finished one; a success marks the
//!   target present.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement,
    PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, PodTemplateSpec, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;
use tokio::task::AbortHandle;

use super::{spawn_stream, MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use crate::mirror::{
    CopyEnd, CopyEnds, CopyRequest, CopyRunner, RunnerError, Submission, Submitted,
    COPY_PERMANENT_FAILURE,
};
use crate::pod::INJECT_LABEL;
use crate::settings::Settings;

/// Label of every copy Job and its Pods, and what the watcher selects on.
pub const ROLE_LABEL: &str = "image-mirror/role";
pub const ROLE_VALUE: &str = "copy";
/// Where a Job says what it copies (its name is only a hash).
pub const COPY_SOURCE_ANNOTATION: &str = "image-mirror/source";
pub const COPY_TARGET_ANNOTATION: &str = "image-mirror/target";
const NAME_PREFIX: &str = "image-mirror-copy-";
/// The container of the webhook's Pod the Job is modelled on (else the first).
const WEBHOOK_CONTAINER: &str = "webhook";
/// Where Kubernetes mounts ServiceAccount tokens; a copy needs none.
const TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io";
/// Measured: `copy` peaks at 27–28 MiB (2 platforms, 300 MiB) and 29 MiB (a 1 GiB layer)
/// (`cargo bench --bench copy`); the limit leaves room for big manifests and many referrers.
const MEMORY_REQUEST: &str = "64Mi";
const MEMORY_LIMIT: &str = "256Mi";
const CPU_REQUEST: &str = "100m";
/// Where the image has the binary (the Dockerfile's); its ENTRYPOINT adds `serve`, so a Job
/// names the binary itself.
pub const IMAGE_BINARY: &str = "/image-mirror-webhook";

/// Why a copy Job could not be started (the copy then runs in the webhook).
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(
        "cannot tell which Pod this webhook runs in: set POD_NAME (the Deployment in deploy/ \
         does, from metadata.name)"
    )]
    NoPodName,
    #[error("cannot read this webhook's Pod {namespace}/{name}, the model of its copy Jobs")]
    OwnPod {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("the webhook's Pod {namespace}/{name} has no container")]
    NoContainer { namespace: String, name: String },
    #[error("cannot create the copy Job {namespace}/{name}")]
    Create {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot read the copy Job {namespace}/{name}")]
    Get {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the Job {namespace}/{name} copies {source_image} to {target}, not this copy (a name \
         collision; delete that Job)"
    )]
    Collision {
        namespace: String,
        name: String,
        source_image: String,
        target: String,
    },
}

/// What a copy Job takes from the webhook's own Pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    container: Container,
    pod: PodSpec,
}

impl Template {
    /// The parts of `pod` a copy needs: its webhook container's image, command, env, mounts
    /// and security context, the volumes those mounts use, and the Pod's security context,
    /// scheduling (not its affinity, which is about webhook replicas), DNS and pull secrets. Left behind: the ServiceAccount token's mount, and the
    /// mounts holding one of the files in `drop` (the serving key) but not the table `keep`.
    pub fn from_pod(pod: &Pod, drop: &[PathBuf], keep: Option<&Path>) -> Option<Template> {
        let spec = pod.spec.as_ref()?;
        let source = spec
            .containers
            .iter()
            .find(|c| c.name == WEBHOOK_CONTAINER)
            .or_else(|| spec.containers.first())?;
        let dropped = |mount: &str| {
            let mount = Path::new(mount);
            mount.starts_with(TOKEN_DIR)
                || (drop.iter().any(|file| file.starts_with(mount))
                    && !keep.is_some_and(|file| file.starts_with(mount)))
        };
        let mounts: Vec<_> = source
            .volume_mounts
            .iter()
            .flatten()
            .filter(|m| !dropped(&m.mount_path))
            .cloned()
            .collect();
        let used: BTreeSet<&str> = mounts.iter().map(|m| m.name.as_str()).collect();
        let volumes: Vec<_> = spec
            .volumes
            .iter()
            .flatten()
            .filter(|v| used.contains(v.name.as_str()))
            .cloned()
            .collect();
        let container = Container {
            name: ROLE_VALUE.to_string(),
            image: source.image.clone(),
            image_pull_policy: source.image_pull_policy.clone(),
            command: source.command.clone(),
            env: source.env.clone(),
            env_from: source.env_from.clone(),
            security_context: source.security_context.clone(),
            volume_mounts: (!mounts.is_empty()).then_some(mounts),
            ..Container::default()
        };
        let pod = PodSpec {
            service_account_name: spec.service_account_name.clone(),
            security_context: spec.security_context.clone(),
            node_selector: spec.node_selector.clone(),
            tolerations: spec.tolerations.clone(),
            image_pull_secrets: spec.image_pull_secrets.clone(),
            priority_class_name: spec.priority_class_name.clone(),
            // The same names resolve the same way (registries behind private DNS).
            dns_policy: spec.dns_policy.clone(),
            dns_config: spec.dns_config.clone(),
            host_aliases: spec.host_aliases.clone(),
            volumes: (!volumes.is_empty()).then_some(volumes),
            ..PodSpec::default()
        };
        Some(Template { container, pod })
    }
}

/// The name of the Job that copies `source` to `target`: the same on every replica.
pub fn job_name(source: &str, target: &str) -> String {
    let digest = Sha256::new()
        .chain_update(source)
        .chain_update("\n")
        .chain_update(target)
        .finalize();
    let hex: String = digest.iter().take(10).map(|b| format!("{b:02x}")).collect();
    format!("{NAME_PREFIX}{hex}")
}

/// The Job that runs `copy` for `request` (pure: tested without an API server).
pub fn job_for(
    template: &Template,
    request: &CopyRequest,
    settings: &Settings,
    namespace: &str,
    config: Option<&Path>,
) -> Job {
    let source = request.source.to_string();
    let target = request.target.to_string();
    let mut args = vec!["copy".to_string(), source.clone(), target.clone()];
    if let Some(path) = config {
        args.push(format!("--config={}", path.display()));
    }
    for p in &request.platforms {
        args.push(format!("--platform={p}"));
    }
    if !request.referrers {
        args.push("--no-referrers".to_string());
    }
    let labels = |pod: bool| {
        let mut l = BTreeMap::from([
            (
                "app.kubernetes.io/name".to_string(),
                "image-mirror-copy".to_string(),
            ),
            (MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string()),
            (ROLE_LABEL.to_string(), ROLE_VALUE.to_string()),
        ]);
        if pod {
            // Never rewritten by a webhook (this one's objectSelector), whatever the namespace.
            l.insert(INJECT_LABEL.to_string(), "disabled".to_string());
        }
        l
    };
    let quantity = |s: &str| Quantity(s.to_string());
    let container = Container {
        image: settings
            .job_image
            .clone()
            .or_else(|| template.container.image.clone()),
        // The webhook's own binary when its container names one, else the image's.
        command: Some(vec![template
            .container
            .command
            .as_ref()
            .and_then(|c| c.first().cloned())
            .unwrap_or_else(|| IMAGE_BINARY.to_string())]),
        args: Some(args),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), quantity(CPU_REQUEST)),
                ("memory".to_string(), quantity(MEMORY_REQUEST)),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_string(),
                quantity(MEMORY_LIMIT),
            )])),
            ..ResourceRequirements::default()
        }),
        ..template.container.clone()
    };
    let copies = &settings.copies;
    let deadline = i64::try_from(copies.job_deadline.as_secs()).unwrap_or(i64::MAX);
    Job {
        metadata: ObjectMeta {
            name: Some(job_name(&source, &target)),
            namespace: Some(namespace.to_string()),
            labels: Some(labels(false)),
            annotations: Some(BTreeMap::from([
                (COPY_SOURCE_ANNOTATION.to_string(), source),
                (COPY_TARGET_ANNOTATION.to_string(), target),
            ])),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            // `maxAttempts` tries in all, as in-process copies get.
            backoff_limit: Some(i32::try_from(copies.max_attempts.saturating_sub(1)).unwrap_or(0)),
            ttl_seconds_after_finished: Some(
                i32::try_from(copies.job_ttl.as_secs()).unwrap_or(i32::MAX),
            ),
            pod_failure_policy: Some(failure_policy()),
            // A copy that hangs is stopped (every try together: `copies.jobDeadline`).
            active_deadline_seconds: Some(deadline),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(true)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    restart_policy: Some("Never".to_string()),
                    automount_service_account_token: Some(false),
                    // Each try too; it also puts copy Pods in the `Terminating` quota scope,
                    // which the copy-jobs component's ResourceQuota caps (the webhook's own
                    // Pods have no deadline and stay out of it).
                    active_deadline_seconds: Some(deadline),
                    ..template.pod.clone()
                }),
            },
            ..JobSpec::default()
        }),
        status: None,
    }
}

/// A copy that cannot succeed (`copy` exits [`COPY_PERMANENT_FAILURE`]: an unusable image, a
/// refused manifest) fails the Job at once; a Pod evicted or preempted (a node drained) is
/// not counted against `backoffLimit`.
fn failure_policy() -> PodFailurePolicy {
    PodFailurePolicy {
        rules: vec![
            PodFailurePolicyRule {
                action: "FailJob".to_string(),
                on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                    container_name: Some(ROLE_VALUE.to_string()),
                    operator: "In".to_string(),
                    values: vec![i32::from(COPY_PERMANENT_FAILURE)],
                }),
                on_pod_conditions: None,
            },
            PodFailurePolicyRule {
                action: "Ignore".to_string(),
                on_exit_codes: None,
                on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                    type_: "DisruptionTarget".to_string(),
                    status: Some("True".to_string()),
                }]),
            },
        ],
    }
}

/// How a Job stands, from its conditions as the Job controller sets them.
pub fn job_end(job: &Job) -> Option<CopyEnd> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    let holds = |kind: &str| {
        conditions
            .iter()
            .any(|c| c.type_ == kind && c.status == "True")
    };
    if holds("Complete") {
        Some(CopyEnd::Succeeded)
    } else if holds("Failed") {
        Some(CopyEnd::Failed)
    } else {
        None
    }
}

/// What a Job copies, from its annotations.
fn copies_of(job: &Job) -> Option<(&str, &str)> {
    let a = job.metadata.annotations.as_ref()?;
    Some((
        a.get(COPY_SOURCE_ANNOTATION)?,
        a.get(COPY_TARGET_ANNOTATION)?,
    ))
}

/// Starts copy Jobs, and tells `ends` of the ones that finish.
pub struct JobRunner {
    jobs: Api<Job>,
    pods: Api<Pod>,
    namespace: String,
    pod_name: Option<String>,
    config: Option<PathBuf>,
    drop: Vec<PathBuf>,
    template: OnceCell<Template>,
    ends: Arc<dyn CopyEnds>,
    /// Watches Jobs from the first copy handed over (so a webhook that never runs Jobs needs
    /// no right on them); stopped with the runner.
    watcher: std::sync::OnceLock<AbortHandle>,
}

impl Drop for JobRunner {
    fn drop(&mut self) {
        if let Some(task) = self.watcher.get() {
            task.abort();
        }
    }
}

impl JobRunner {
    /// A runner in `namespace`, modelled on the Pod `pod_name`, whose Jobs read the table at
    /// `config` and leave the mounts holding the files in `drop` behind; it reports the Jobs
    /// that end to `ends`.
    pub fn start(
        client: kube::Client,
        namespace: String,
        pod_name: Option<String>,
        config: Option<PathBuf>,
        drop: Vec<PathBuf>,
        ends: Arc<dyn CopyEnds>,
    ) -> Arc<JobRunner> {
        Arc::new(JobRunner {
            jobs: Api::namespaced(client.clone(), &namespace),
            pods: Api::namespaced(client, &namespace),
            namespace,
            pod_name,
            config,
            drop,
            template: OnceCell::new(),
            ends,
            watcher: std::sync::OnceLock::new(),
        })
    }

    async fn template(&self) -> Result<&Template, JobError> {
        self.template
            .get_or_try_init(|| async {
                let name = self.pod_name.clone().ok_or(JobError::NoPodName)?;
                let pod = self
                    .pods
                    .get(&name)
                    .await
                    .map_err(|source| JobError::OwnPod {
                        namespace: self.namespace.clone(),
                        name: name.clone(),
                        source,
                    })?;
                Template::from_pod(&pod, &self.drop, self.config.as_deref()).ok_or(
                    JobError::NoContainer {
                        namespace: self.namespace.clone(),
                        name,
                    },
                )
            })
            .await
    }

    async fn submit_job(
        &self,
        copy: &CopyRequest,
        settings: &Settings,
    ) -> Result<Submitted, JobError> {
        self.watcher
            .get_or_init(|| watch(self.jobs.clone(), self.ends.clone()));
        let template = self.template().await?;
        let job = job_for(
            template,
            copy,
            settings,
            &self.namespace,
            self.config.as_deref(),
        );
        let name = job.metadata.name.clone().unwrap_or_default();
        match self.jobs.create(&PostParams::default(), &job).await {
            Ok(_) => return Ok(Submitted::Started),
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(source) => {
                return Err(JobError::Create {
                    namespace: self.namespace.clone(),
                    name,
                    source,
                })
            }
        }
        let existing = self.jobs.get(&name).await.map_err(|source| JobError::Get {
            namespace: self.namespace.clone(),
            name: name.clone(),
            source,
        })?;
        let (source, target) = copies_of(&existing).unwrap_or_default();
        if (source, target) != (&*copy.source.to_string(), &*copy.target.to_string()) {
            return Err(JobError::Collision {
                namespace: self.namespace.clone(),
                name,
                source_image: source.to_string(),
                target: target.to_string(),
            });
        }
        Ok(match job_end(&existing) {
            Some(CopyEnd::Succeeded) => Submitted::Succeeded,
            Some(_) => Submitted::Failed,
            None => Submitted::Running,
        })
    }
}

impl CopyRunner for JobRunner {
    fn submit<'a>(&'a self, copy: &'a CopyRequest, settings: &'a Settings) -> Submission<'a> {
        Box::pin(async move {
            self.submit_job(copy, settings)
                .await
                .map_err(|e| Box::new(e) as RunnerError)
        })
    }
}

/// Reports every copy Job that finishes, or goes before it does.
fn watch(jobs: Api<Job>, ends: Arc<dyn CopyEnds>) -> AbortHandle {
    let config = watcher::Config::default().labels(&format!("{ROLE_LABEL}={ROLE_VALUE}"));
    let events = watcher(jobs, config).default_backoff();
    spawn_stream(events, "copy Jobs", move |event| match event {
        watcher::Event::Apply(job) | watcher::Event::InitApply(job) => {
            if let (Some(end), Some((source, target))) = (job_end(&job), copies_of(&job)) {
                ends.ended(source, target, end);
            }
        }
        watcher::Event::Delete(job) => {
            if let (None, Some((source, target))) = (job_end(&job), copies_of(&job)) {
                ends.ended(source, target, CopyEnd::Vanished);
            }
        }
        _ => {}
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::CopyMode;
    use crate::reference::Reference;

    fn webhook_pod() -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "image-mirror-webhook-abc", "namespace": "image-mirror-system"},
            "spec": {
                "serviceAccountName": "image-mirror-webhook",
                "securityContext": {"runAsNonRoot": true, "runAsUser": 65532},
                "nodeSelector": {"kubernetes.io/os": "linux"},
                "dnsPolicy": "ClusterFirst",
                "hostAliases": [{"ip": "10.0.0.5", "hostnames": ["registry.internal"]}],
                "affinity": {"podAntiAffinity": {}},
                "containers": [
                    {"name": "sidecar", "image": "busybox"},
                    {
                        "name": "webhook",
                        "image": "ghcr.io/ameideio/image-mirror-webhook:0.1.0",
                        "imagePullPolicy": "IfNotPresent",
                        "args": ["--listen=0.0.0.0:8443"],
                        "env": [{"name": "RUST_LOG", "value": "info"}],
                        "envFrom": [{"secretRef": {"name": "creds", "optional": true}}],
                        "ports": [{"containerPort": 8443}],
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8443}},
                        "securityContext": {"readOnlyRootFilesystem": true},
                        "volumeMounts": [
                            {"name": "tls", "mountPath": "/etc/image-mirror/tls", "readOnly": true},
                            {"name": "config", "mountPath": "/etc/image-mirror/config"},
                            {"name": "tmp", "mountPath": "/tmp"},
                            {"name": "kube-api-access-x1",
                             "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}
                        ]
                    }
                ],
                "volumes": [
                    {"name": "tls", "secret": {"secretName": "image-mirror-webhook-tls"}},
                    {"name": "config", "configMap": {"name": "image-mirror-config"}},
                    {"name": "tmp", "emptyDir": {}},
                    {"name": "kube-api-access-x1", "projected": {"sources": []}}
                ]
            }
        }))
        .unwrap()
    }

    fn request(platforms: &[&str], referrers: bool) -> CopyRequest {
        CopyRequest {
            source: Reference::parse("nginx:1.27").unwrap(),
            target: Reference::parse("ghcr.io/acme/mirror/nginx:1.27").unwrap(),
            platforms: platforms
                .iter()
                .map(|p| crate::mapping::Platform::parse(p).unwrap())
                .collect(),
            referrers,
            mode: CopyMode::Copy,
        }
    }

    fn settings(yaml: &str) -> Settings {
        crate::config::Config::parse("t.yaml", yaml)
            .unwrap()
            .settings
            .as_ref()
            .clone()
    }

    fn job(settings: &Settings, request: &CopyRequest) -> serde_json::Value {
        let drop = [
            PathBuf::from("/etc/image-mirror/tls/tls.crt"),
            PathBuf::from("/etc/image-mirror/tls/tls.key"),
        ];
        let template = Template::from_pod(
            &webhook_pod(),
            &drop,
            Some(Path::new("/etc/image-mirror/config/config.yaml")),
        )
        .unwrap();
        let job = job_for(
            &template,
            request,
            settings,
            "image-mirror-system",
            Some(Path::new("/etc/image-mirror/config/config.yaml")),
        );
        serde_json::to_value(job).unwrap()
    }

    #[test]
    fn the_job_runs_copy_with_the_webhooks_table_credentials_and_security() {
        let s = settings("copies: {maxAttempts: 4, jobTtl: 5m, jobDeadline: 20m, runner: job}\n");
        let j = job(&s, &request(&[], true));
        assert_eq!(
            j["metadata"]["name"],
            job_name(
                "docker.io/library/nginx:1.27",
                "ghcr.io/acme/mirror/nginx:1.27"
            )
        );
        assert_eq!(j["metadata"]["namespace"], "image-mirror-system");
        // Canonical: what Docker Hub spelling the Pod used does not make another Job.
        assert_eq!(
            j["metadata"]["annotations"][COPY_SOURCE_ANNOTATION],
            "docker.io/library/nginx:1.27"
        );
        assert_eq!(
            j["metadata"]["annotations"][COPY_TARGET_ANNOTATION],
            "ghcr.io/acme/mirror/nginx:1.27"
        );
        assert_eq!(j["metadata"]["labels"][ROLE_LABEL], ROLE_VALUE);
        assert_eq!(j["spec"]["backoffLimit"], 3);
        // No try spent on what cannot work; none on a drained node.
        let rules = &j["spec"]["podFailurePolicy"]["rules"];
        assert_eq!(rules[0]["action"], "FailJob");
        assert_eq!(rules[0]["onExitCodes"]["containerName"], "copy");
        assert_eq!(
            rules[0]["onExitCodes"]["values"],
            serde_json::json!([COPY_PERMANENT_FAILURE])
        );
        assert_eq!(rules[1]["action"], "Ignore");
        assert_eq!(rules[1]["onPodConditions"][0]["type"], "DisruptionTarget");
        assert_eq!(j["spec"]["ttlSecondsAfterFinished"], 300);
        // A hanging copy is stopped, and each copy Pod is in the quota's Terminating scope.
        assert_eq!(j["spec"]["activeDeadlineSeconds"], 1200);
        assert_eq!(j["spec"]["template"]["spec"]["activeDeadlineSeconds"], 1200);
        let pod = &j["spec"]["template"];
        assert_eq!(pod["metadata"]["labels"][INJECT_LABEL], "disabled");
        let spec = &pod["spec"];
        assert_eq!(spec["restartPolicy"], "Never");
        assert_eq!(spec["automountServiceAccountToken"], false);
        assert_eq!(spec["serviceAccountName"], "image-mirror-webhook");
        assert_eq!(spec["securityContext"]["runAsUser"], 65532);
        assert_eq!(spec["nodeSelector"]["kubernetes.io/os"], "linux");
        assert_eq!(spec["dnsPolicy"], "ClusterFirst");
        assert_eq!(spec["hostAliases"][0]["hostnames"][0], "registry.internal");
        assert!(spec.get("affinity").is_none());
        let volumes: Vec<&str> = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(volumes, ["config", "tmp"]);
        let containers = spec["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1);
        let c = &containers[0];
        assert_eq!(c["image"], "ghcr.io/ameideio/image-mirror-webhook:0.1.0");
        assert_eq!(c["command"], serde_json::json!([IMAGE_BINARY]));
        assert_eq!(
            c["args"],
            serde_json::json!([
                "copy",
                "docker.io/library/nginx:1.27",
                "ghcr.io/acme/mirror/nginx:1.27",
                "--config=/etc/image-mirror/config/config.yaml"
            ])
        );
        assert_eq!(c["envFrom"][0]["secretRef"]["name"], "creds");
        assert_eq!(c["env"][0]["name"], "RUST_LOG");
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["resources"]["requests"]["memory"], MEMORY_REQUEST);
        assert_eq!(c["resources"]["limits"]["memory"], MEMORY_LIMIT);
        let mounts: Vec<&str> = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["mountPath"].as_str().unwrap())
            .collect();
        assert_eq!(mounts, ["/etc/image-mirror/config", "/tmp"]);
        // Nothing of serving: no ports, probes, or the webhook's flags.
        assert!(c.get("ports").is_none() && c.get("readinessProbe").is_none());
        // It is a Job the API accepts as one (round trip through the typed object).
        let _: Job = serde_json::from_value(j.clone()).unwrap();
    }

    #[test]
    fn platforms_referrers_and_the_job_image_are_passed_on() {
        let s = settings("copies: {jobImage: 'registry.local/imw:1'}\n");
        let j = job(&s, &request(&["linux/amd64", "linux/arm/v7"], false));
        let c = &j["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], "registry.local/imw:1");
        assert_eq!(c["command"], serde_json::json!([IMAGE_BINARY]));
        let args: Vec<&str> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(
            &args[3..],
            [
                "--config=/etc/image-mirror/config/config.yaml",
                "--platform=linux/amd64",
                "--platform=linux/arm/v7",
                "--no-referrers"
            ]
        );
        // Defaults: six tries, ten minutes.
        assert_eq!(j["spec"]["backoffLimit"], 5);
        assert_eq!(j["spec"]["ttlSecondsAfterFinished"], 600);
    }

    #[test]
    fn the_name_depends_on_source_and_target_only_and_is_a_valid_name() {
        let a = job_name("nginx:1.27", "ghcr.io/a/nginx:1.27");
        assert_eq!(a, job_name("nginx:1.27", "ghcr.io/a/nginx:1.27"));
        assert_ne!(a, job_name("nginx:1.27", "ghcr.io/b/nginx:1.27"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(job_name("ab", "c"), job_name("a", "bc"));
        // A DNS label (Job names become Pod labels), with room for the Pods' suffix.
        assert!(a.len() <= 63 - 6, "{a}");
        assert!(a
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
    }

    #[test]
    fn a_job_ends_by_its_conditions() {
        let with = |conditions: serde_json::Value| -> Job {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "j"},
                "status": {"conditions": conditions}
            }))
            .unwrap()
        };
        assert_eq!(job_end(&with(serde_json::json!([]))), None);
        assert_eq!(
            job_end(&with(serde_json::json!([
                {"type": "SuccessCriteriaMet", "status": "True"},
                {"type": "Complete", "status": "True"}
            ]))),
            Some(CopyEnd::Succeeded)
        );
        assert_eq!(
            job_end(&with(serde_json::json!([
                {"type": "FailureTarget", "status": "True"},
                {"type": "Failed", "status": "True"}
            ]))),
            Some(CopyEnd::Failed)
        );
        // Only a condition that holds counts.
        assert_eq!(
            job_end(&with(
                serde_json::json!([{"type": "Complete", "status": "False"}])
            )),
            None
        );
        // No status at all: running.
        assert_eq!(job_end(&Job::default()), None);
    }

    #[test]
    fn a_webhook_container_with_a_command_lends_its_binary_not_its_subcommand() {
        let mut pod = webhook_pod();
        pod.spec.as_mut().unwrap().containers[1].command =
            Some(vec!["/bin/imw".to_string(), "serve".to_string()]);
        let template = Template::from_pod(&pod, &[], None).unwrap();
        let job = job_for(&template, &request(&[], true), &settings("{}"), "ns", None);
        let v = serde_json::to_value(job).unwrap();
        let c = &v["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["command"], serde_json::json!(["/bin/imw"]));
        assert_eq!(c["args"][0], "copy");
        // No table file: the Job's copy uses the embedded one, as the webhook does.
        assert_eq!(c["args"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn a_pod_without_containers_gives_no_template() {
        let mut pod = webhook_pod();
        pod.spec.as_mut().unwrap().containers.clear();
        assert!(Template::from_pod(&pod, &[], None).is_none());
    }

    #[test]
    fn a_mount_holding_the_key_and_the_table_stays() {
        let file = |p: &str| PathBuf::from(p);
        let mounts = |drop: &[PathBuf], keep: Option<&Path>| -> Vec<String> {
            let t = Template::from_pod(&webhook_pod(), drop, keep).unwrap();
            let v = serde_json::to_value(&t.container).unwrap();
            v["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["mountPath"].as_str().unwrap().to_string())
                .collect()
        };
        let key = [file("/etc/image-mirror/config/tls.key")];
        assert_eq!(mounts(&key, None), ["/etc/image-mirror/tls", "/tmp"]);
        assert_eq!(
            mounts(
                &key,
                Some(Path::new("/etc/image-mirror/config/config.yaml"))
            ),
            ["/etc/image-mirror/tls", "/etc/image-mirror/config", "/tmp"]
        );
    }
}
