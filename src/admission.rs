//! AdmissionReview in, AdmissionReview out.
//!
//! The pure part ([`plan`], [`Plan::finish`], [`response_body`]) turns a request and the table
//! into a patch, warnings and copy requests. [`Webhook`] is the thin async shell around it: it
//! asks the mirror about `if-present` targets within the time budget, records metrics, logs one
//! line, and answers *allowed, unchanged* on any trouble of its own.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use kube::core::admission::Operation;
use kube::core::GroupVersionResource;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::TableHandle;
use crate::mapping::{CopyPolicy, Decision, KeepReason, MirrorKind, Platform, SwapPolicy, Table};
use crate::metrics::{Metrics, ReasonLabels, RequestLabels, RewriteLabels, SecretLabels};
use crate::patch::{self, ContainerList, ImageChange};
use crate::reference::Reference;

/// The Pod label (and namespace label) that opts a workload out (`disabled`) or a namespace in.
pub const INJECT_LABEL: &str = "image-mirror/inject";

/// Why a request body is refused with HTTP 400.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("request body is not an AdmissionReview: {0}")]
    NotAReview(#[from] serde_json::Error),
    #[error("AdmissionReview has no request")]
    NoRequest,
    #[error("AdmissionReview kind is {0:?}, expected \"AdmissionReview\"")]
    WrongKind(String),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewIn {
    api_version: Option<String>,
    kind: Option<String>,
    request: Option<AdmissionRequest>,
}

/// The fields of `admission.k8s.io/v1` `AdmissionRequest` the webhook reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    pub uid: String,
    pub resource: GroupVersionResource,
    #[serde(default)]
    pub sub_resource: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    pub operation: Operation,
    /// The Pod, pruned to the fields the webhook reads (see [`crate::pod_view`]).
    #[serde(default, deserialize_with = "crate::pod_view::pod")]
    pub object: Option<Value>,
    #[serde(default, deserialize_with = "crate::pod_view::pod")]
    pub old_object: Option<Value>,
    #[serde(default)]
    pub dry_run: Option<bool>,
}

/// A parsed review: the request and the `apiVersion` to echo.
#[derive(Debug, Clone)]
pub struct Review {
    pub api_version: String,
    pub request: AdmissionRequest,
}

impl Review {
    pub fn parse(body: &[u8]) -> Result<Review, ReviewError> {
        let review: ReviewIn = serde_json::from_slice(body)?;
        if let Some(kind) = review.kind.as_deref().filter(|k| *k != "AdmissionReview") {
            return Err(ReviewError::WrongKind(kind.to_string()));
        }
        let request = review.request.ok_or(ReviewError::NoRequest)?;
        Ok(Review {
            api_version: review
                .api_version
                .unwrap_or_else(|| "admission.k8s.io/v1".to_string()),
            request,
        })
    }

    pub fn operation(&self) -> &'static str {
        match self.request.operation {
            Operation::Create => "CREATE",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
            Operation::Connect => "CONNECT",
        }
    }

    pub fn dry_run(&self) -> bool {
        self.request.dry_run.unwrap_or(false)
    }

    /// The Pod's name, or its `generateName` (Pods of a Deployment have only that).
    pub fn pod_name(&self) -> &str {
        let meta = self.request.object.as_ref().and_then(|o| o.get("metadata"));
        self.request
            .name
            .as_deref()
            .filter(|n| !n.is_empty())
            .or_else(|| meta.and_then(|m| m.get("name")).and_then(Value::as_str))
            .or_else(|| {
                meta.and_then(|m| m.get("generateName"))
                    .and_then(Value::as_str)
            })
            .unwrap_or("")
    }

    pub fn namespace(&self) -> &str {
        self.request
            .namespace
            .as_deref()
            .or_else(|| {
                self.request
                    .object
                    .as_ref()
                    .and_then(|o| o.pointer("/metadata/namespace"))
                    .and_then(Value::as_str)
            })
            .unwrap_or("")
    }
}

/// Whether the mirror holds an image, as far as the webhook could tell in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    Present,
    Absent,
    /// No answer in time, or an answer that proves nothing (401, 5xx, garbage).
    Unknown,
}

/// A copy the admission asks for: the mirror lacked `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyRequest {
    pub source: Reference,
    pub target: Reference,
    pub platforms: Vec<Platform>,
    /// The target is a pull-through cache: one manifest fetch through it fills it.
    pub warm_up: bool,
}

/// Why a request or a container was left alone: the `reason` label of the skips metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    NotAPod,
    PodOptedOut,
    NamespaceExcluded,
    Image(crate::mapping::KeepReasonKind),
    MirrorAbsent,
    MirrorUnknown,
}

impl Skip {
    pub fn label(self) -> &'static str {
        match self {
            Skip::NotAPod => "not-a-pod",
            Skip::PodOptedOut => "pod-opted-out",
            Skip::NamespaceExcluded => "namespace-excluded",
            Skip::Image(kind) => kind.label(),
            Skip::MirrorAbsent => "mirror-absent",
            Skip::MirrorUnknown => "mirror-unknown",
        }
    }
}

/// One container's decision within a request.
#[derive(Debug)]
struct ContainerPlan<'t> {
    list: ContainerList,
    index: usize,
    name: String,
    image: String,
    decision: Decision<'t>,
}

/// What the table decided for each container of a request, before mirror presence is known.
#[derive(Debug)]
pub struct Plan<'t> {
    containers: Vec<ContainerPlan<'t>>,
    /// The request as a whole is not for us (with the reason), or nothing is.
    skipped: Option<Skip>,
    dry_run: bool,
}

/// A rewrite that happened, for metrics and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewriteRecord {
    pub container: String,
    pub source: String,
    pub source_registry: String,
    pub target: String,
    pub mirror: String,
}

/// The outcome of a request.
#[derive(Debug, Clone, Default)]
pub struct Mutation {
    pub patch: Vec<json_patch::PatchOperation>,
    pub warnings: Vec<String>,
    pub rewrites: Vec<RewriteRecord>,
    pub pull_secrets_added: Vec<String>,
    pub skips: Vec<Skip>,
    pub copies: Vec<CopyRequest>,
}

/// Decides each container of the request against the table (pure).
pub fn plan<'t>(review: &Review, table: &'t Table) -> Plan<'t> {
    let req = &review.request;
    let skipped = |skip| Plan {
        containers: Vec::new(),
        skipped: Some(skip),
        dry_run: review.dry_run(),
    };
    let is_pods = req.resource.group.is_empty() && req.resource.resource == "pods";
    let sub = req.sub_resource.as_deref().unwrap_or("");
    let lists: &[ContainerList] = match (is_pods, sub, &req.operation) {
        (true, "", Operation::Create) => {
            &[ContainerList::Containers, ContainerList::InitContainers]
        }
        (true, "ephemeralcontainers", Operation::Update) => &[ContainerList::EphemeralContainers],
        _ => return skipped(Skip::NotAPod),
    };
    let Some(pod) = req.object.as_ref() else {
        return skipped(Skip::NotAPod);
    };
    let opted_out = pod
        .pointer("/metadata/labels")
        .and_then(|l| l.get(INJECT_LABEL))
        .and_then(Value::as_str)
        == Some("disabled");
    if opted_out {
        return skipped(Skip::PodOptedOut);
    }
    if table.namespace_excluded(review.namespace()) {
        return skipped(Skip::NamespaceExcluded);
    }
    // Ephemeral containers cannot change once added: touch only the ones this update adds.
    let old_names: Vec<String> = match (lists, req.old_object.as_ref()) {
        ([ContainerList::EphemeralContainers], Some(old)) => patch::containers(old, lists)
            .into_iter()
            .map(|c| c.name)
            .collect(),
        _ => Vec::new(),
    };
    let containers = patch::containers(pod, lists)
        .into_iter()
        .filter(|c| !old_names.contains(&c.name))
        .map(|c| ContainerPlan {
            decision: table.decide(c.image),
            list: c.list,
            index: c.index,
            name: c.name,
            image: c.image.to_string(),
        })
        .collect();
    Plan {
        containers,
        skipped: None,
        dry_run: review.dry_run(),
    }
}

impl<'t> Plan<'t> {
    /// The mirror targets whose presence decides the outcome (`if-present` rewrites).
    pub fn targets_to_check(&self) -> Vec<&Reference> {
        let mut out: Vec<&Reference> = Vec::new();
        for c in &self.containers {
            if let Decision::Rewrite(rw) = &c.decision {
                if rw.policy.swap == SwapPolicy::IfPresent && !out.contains(&&rw.target) {
                    out.push(&rw.target);
                }
            }
        }
        out
    }

    /// Turns the decisions into a patch, given what is known of mirror presence (pure).
    pub fn finish(
        &self,
        pod: Option<&Value>,
        presence: &dyn Fn(&Reference) -> Presence,
    ) -> Mutation {
        let mut m = Mutation::default();
        if let Some(skip) = self.skipped {
            m.skips.push(skip);
            return m;
        }
        let mut changes = Vec::new();
        let mut secrets: Vec<&str> = Vec::new();
        for c in &self.containers {
            let rw = match &c.decision {
                Decision::Rewrite(rw) => rw,
                Decision::Keep(keep) => {
                    m.skips.push(Skip::Image(keep.reason.kind()));
                    if let KeepReason::Unparsable(e) = &keep.reason {
                        m.warnings.push(format!(
                            "image-mirror: container {:?}: image {:?} left unchanged: {e}",
                            c.name, c.image
                        ));
                    }
                    continue;
                }
            };
            if rw.policy.swap == SwapPolicy::IfPresent {
                match presence(&rw.target) {
                    Presence::Present => {}
                    Presence::Absent => {
                        m.skips.push(Skip::MirrorAbsent);
                        let copying = rw.policy.copy == CopyPolicy::OnDemand && !self.dry_run;
                        if copying && !m.copies.iter().any(|q: &CopyRequest| q.target == rw.target)
                        {
                            m.copies.push(CopyRequest {
                                source: rw.source.clone(),
                                target: rw.target.clone(),
                                platforms: rw.policy.platforms.to_vec(),
                                warm_up: rw.mirror.is_some_and(|m| {
                                    matches!(m.kind, MirrorKind::PullThrough { .. })
                                }),
                            });
                        }
                        m.warnings.push(format!(
                            "image-mirror: container {:?}: mirror lacks {}; kept {}{}",
                            c.name,
                            rw.target,
                            c.image,
                            if copying { " (copy queued)" } else { "" }
                        ));
                        continue;
                    }
                    Presence::Unknown => {
                        m.skips.push(Skip::MirrorUnknown);
                        continue;
                    }
                }
            }
            if let Some(secret) = rw.pull_secret() {
                if !secrets.contains(&secret) {
                    secrets.push(secret);
                }
            }
            m.warnings.push(format!(
                "image-mirror: container {:?}: {} -> {}",
                c.name, c.image, rw.target
            ));
            m.rewrites.push(RewriteRecord {
                container: c.name.clone(),
                source: c.image.clone(),
                source_registry: rw.source.registry().to_string(),
                target: rw.target.to_string(),
                mirror: rw.mirror_name().to_string(),
            });
            changes.push(ImageChange {
                list: c.list,
                index: c.index,
                container: c.name.clone(),
                original: c.image.clone(),
                image: rw.target.to_string(),
            });
        }
        if let Some(pod) = pod {
            let built = patch::build_patch(pod, &changes, &secrets);
            m.patch = built.ops;
            m.pull_secrets_added = built.added_secrets;
        }
        m
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewOut<'a> {
    api_version: &'a str,
    kind: &'static str,
    response: ResponseOut<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseOut<'a> {
    uid: &'a str,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    /// Bytes in the API, hence a base64 string in JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    warnings: &'a [String],
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    audit_annotations: BTreeMap<&'static str, String>,
    /// A `metav1.Status`, only on a refusal.
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<StatusOut<'a>>,
}

#[derive(Serialize)]
struct StatusOut<'a> {
    status: &'static str,
    code: u16,
    reason: &'static str,
    message: &'a str,
}

/// The response AdmissionReview of strict mode's refusal: `allowed: false` and why.
pub fn refusal_body(api_version: &str, uid: &str, code: u16, message: &str) -> Vec<u8> {
    let out = ReviewOut {
        api_version,
        kind: "AdmissionReview",
        response: ResponseOut {
            uid,
            allowed: false,
            patch_type: None,
            patch: None,
            warnings: &[],
            audit_annotations: BTreeMap::new(),
            status: Some(StatusOut {
                status: "Failure",
                code,
                reason: if code >= 500 {
                    "InternalError"
                } else {
                    "Forbidden"
                },
                message,
            }),
        },
    };
    serde_json::to_vec(&out).unwrap_or_default()
}

/// The response AdmissionReview: `allowed: true`, and the patch when there is one.
pub fn response_body(api_version: &str, uid: &str, mutation: &Mutation) -> Vec<u8> {
    let patch = (!mutation.patch.is_empty()).then(|| {
        let json = serde_json::to_vec(&mutation.patch).unwrap_or_default();
        base64::engine::general_purpose::STANDARD.encode(json)
    });
    let mut audit = BTreeMap::new();
    if !mutation.rewrites.is_empty() {
        audit.insert("rewrites", mutation.rewrites.len().to_string());
        let mirrors: Vec<&str> = mutation
            .rewrites
            .iter()
            .map(|r| r.mirror.as_str())
            .collect();
        let mut unique = mirrors.clone();
        unique.sort_unstable();
        unique.dedup();
        audit.insert("mirrors", unique.join(","));
    }
    let out = ReviewOut {
        api_version,
        kind: "AdmissionReview",
        response: ResponseOut {
            uid,
            allowed: true,
            patch_type: patch.as_ref().map(|_| "JSONPatch"),
            patch,
            warnings: &mutation.warnings,
            audit_annotations: audit,
            status: None,
        },
    };
    serde_json::to_vec(&out).unwrap_or_default()
}

/// Asks mirrors whether they hold an image, and takes copy requests (the registry module).
pub trait MirrorAccess: Send + Sync {
    /// Whether `target` is in its mirror; answers from a cache when it can.
    fn presence<'a>(
        &'a self,
        target: &'a Reference,
    ) -> Pin<Box<dyn Future<Output = Presence> + Send + 'a>>;
    /// Queues a background copy (de-duplicated by the implementation).
    fn request_copy(&self, copy: CopyRequest);
}

/// The admission service: table, metrics, mirror access and the time budget.
pub struct Webhook {
    pub tables: TableHandle,
    pub metrics: Metrics,
    /// How long a review may take before it is answered *allowed, unchanged*.
    pub budget: Duration,
    pub mirrors: Option<Arc<dyn MirrorAccess>>,
    /// Refuse the Pod instead of admitting it unchanged when the webhook cannot do its job
    /// (internal error, mirror state unknown, unparsable image).
    pub strict: bool,
}

/// What the HTTP layer sends back.
#[derive(Debug)]
pub enum Answer {
    Review(Vec<u8>),
    BadRequest(String),
}

impl Webhook {
    pub fn new(tables: TableHandle, metrics: Metrics) -> Self {
        Webhook {
            tables,
            metrics,
            budget: Duration::from_secs(2),
            mirrors: None,
            strict: false,
        }
    }

    /// Answers one AdmissionReview body.
    pub async fn review(&self, body: &[u8]) -> Answer {
        let started = Instant::now();
        let review = match Review::parse(body) {
            Ok(r) => r,
            Err(e) => {
                self.count_request("", "invalid", started);
                tracing::warn!(error = %e, "refused a request body");
                return Answer::BadRequest(e.to_string());
            }
        };
        let table = self.tables.current();
        // Only the mirror lookups wait, and they are bounded by the budget inside `mutate`.
        let outcome = self.mutate(&review, &table).await;
        let mutation = match outcome {
            Ok(m) => m,
            Err(why) => {
                self.count_request(review.operation(), "error", started);
                if self.strict {
                    let why = format!("image-mirror (strict): internal error: {why}");
                    return refuse(&review, 500, &why);
                }
                // Never block a Pod through our own fault: allowed, unchanged.
                tracing::error!(uid = %review.request.uid, namespace = review.namespace(),
                    pod = review.pod_name(), error = %why, "admission failed; allowed unchanged");
                return Answer::Review(response_body(
                    &review.api_version,
                    &review.request.uid,
                    &Mutation::default(),
                ));
            }
        };
        if let Some(why) = self.strict.then(|| strict_refusal(&mutation)).flatten() {
            self.count_request(review.operation(), "refused", started);
            return refuse(&review, 403, &why);
        }
        if let Some(mirrors) = &self.mirrors {
            for copy in &mutation.copies {
                mirrors.request_copy(copy.clone());
            }
        }
        self.record(&review, &mutation, started);
        Answer::Review(response_body(
            &review.api_version,
            &review.request.uid,
            &mutation,
        ))
    }

    async fn mutate(&self, review: &Review, table: &Table) -> Result<Mutation, String> {
        let plan = catch(|| plan(review, table))?;
        let mut known: HashMap<&Reference, Presence> = HashMap::new();
        let targets = plan.targets_to_check();
        if let (Some(mirrors), false) = (&self.mirrors, targets.is_empty()) {
            // Leave a quarter of the budget for the rest: an unanswered check is `Unknown`,
            // and the Pod's other rewrites still happen.
            let lookups = futures::future::join_all(targets.iter().map(|t| mirrors.presence(t)));
            if let Ok(answers) = tokio::time::timeout(self.budget * 3 / 4, lookups).await {
                known.extend(targets.iter().copied().zip(answers));
            }
        }
        let lookup = |t: &Reference| known.get(t).copied().unwrap_or(Presence::Unknown);
        catch(|| plan.finish(review.request.object.as_ref(), &lookup))
    }

    fn count_request(&self, operation: &str, result: &'static str, started: Instant) {
        self.metrics
            .admission_requests
            .get_or_create(&RequestLabels {
                operation: operation.to_string(),
                result,
            })
            .inc();
        self.metrics
            .admission_duration
            .observe(started.elapsed().as_secs_f64());
    }

    fn record(&self, review: &Review, m: &Mutation, started: Instant) {
        let result = if !m.patch.is_empty() {
            "patched"
        } else if m.skips.iter().any(|s| {
            matches!(
                s,
                Skip::NotAPod | Skip::PodOptedOut | Skip::NamespaceExcluded
            )
        }) {
            "skipped"
        } else {
            "unchanged"
        };
        self.count_request(review.operation(), result, started);
        let namespace = review.namespace();
        for r in &m.rewrites {
            self.metrics
                .rewrites
                .get_or_create(&RewriteLabels {
                    namespace: namespace.to_string(),
                    source_registry: r.source_registry.clone(),
                    mirror: r.mirror.clone(),
                })
                .inc();
        }
        for s in &m.skips {
            self.metrics
                .skips
                .get_or_create(&ReasonLabels { reason: s.label() })
                .inc();
            if *s == Skip::Image(crate::mapping::KeepReasonKind::Unparsable) {
                self.metrics.unparsable_images.inc();
            }
        }
        for secret in &m.pull_secrets_added {
            self.metrics
                .pull_secrets_injected
                .get_or_create(&SecretLabels {
                    secret: secret.clone(),
                })
                .inc();
        }
        tracing::info!(
            uid = %review.request.uid,
            operation = review.operation(),
            namespace,
            pod = review.pod_name(),
            rewrites = m.rewrites.len(),
            skipped = m.skips.len(),
            copies = m.copies.len(),
            dry_run = review.dry_run(),
            result,
            duration_us = started.elapsed().as_micros() as u64,
            "admission"
        );
    }
}

/// Strict mode's answer: logged, then `allowed: false` with `code` and `why`.
fn refuse(review: &Review, code: u16, why: &str) -> Answer {
    tracing::warn!(uid = %review.request.uid, namespace = review.namespace(),
        pod = review.pod_name(), code, reason = why, "refused (strict)");
    Answer::Review(refusal_body(
        &review.api_version,
        &review.request.uid,
        code,
        why,
    ))
}

/// Why strict mode refuses this mutation, if it does: an image whose mirror could not be asked,
/// or an image string that is not a reference.
fn strict_refusal(m: &Mutation) -> Option<String> {
    let unknown = m
        .skips
        .iter()
        .filter(|s| **s == Skip::MirrorUnknown)
        .count();
    let unparsable = m
        .skips
        .iter()
        .filter(|s| **s == Skip::Image(crate::mapping::KeepReasonKind::Unparsable))
        .count();
    if unknown == 0 && unparsable == 0 {
        return None;
    }
    let mut parts = Vec::new();
    if unknown > 0 {
        parts.push(format!(
            "could not tell whether the mirror has {unknown} image(s) (registry slow or failing)"
        ));
    }
    if unparsable > 0 {
        parts.push(format!("{unparsable} image(s) are not valid references"));
    }
    let mut message = format!("image-mirror (strict): {}", parts.join("; "));
    for w in &m.warnings {
        message.push_str("; ");
        message.push_str(w.trim_start_matches("image-mirror: "));
    }
    Some(message)
}

/// Runs pure code, turning a panic into an error so that the Pod is still admitted.
fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "internal error".to_string())
    })
}
