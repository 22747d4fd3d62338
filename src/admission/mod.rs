//! AdmissionReview in, AdmissionReview out.
//!
//! Pure: [`Review::parse`], [`plan`], [`Plan::finish`] and [`response_body`] turn a request
//! and the table into a patch, warnings and copy requests. [`webhook`] is the thin async shell
//! around them: it asks the mirror about `if-present` targets within the time budget, records
//! metrics, logs one line, and answers *allowed, unchanged* on any trouble of its own.

mod response;
pub mod webhook;

use kube::core::admission::Operation;
use kube::core::GroupVersionResource;
use serde::Deserialize;

pub use response::{refusal_body, response_body, WOULD_REWRITE_AUDIT_KEY};
pub use webhook::{Answer, PullSecrets, Webhook};

use crate::mapping::{
    CopyPolicy, Decision, KeepReason, KeepReasonKind, Pin, Rewrite, SwapPolicy, Table,
};
use crate::mirror::{CopyRequest, Presence, Upstream};
use crate::patch::{self, ImageChange};
use crate::pod::{ImageRef, ImageSite, Pod};
use crate::reference::Reference;

/// The admission layer's error: a body that is no review (HTTP 400), or trouble of our own
/// (allowed, unchanged).
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error("request body is not an AdmissionReview")]
    NotAReview(#[source] serde_json::Error),
    #[error("AdmissionReview has no request")]
    NoRequest,
    #[error("AdmissionReview kind is {0:?}, expected \"AdmissionReview\"")]
    WrongKind(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl AdmissionError {
    /// The `result` label of the admission metric for this error.
    pub fn metric_label(&self) -> &'static str {
        match self {
            AdmissionError::Internal(_) => "error",
            _ => "invalid",
        }
    }
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
    #[serde(deserialize_with = "uid")]
    pub uid: String,
    pub resource: GroupVersionResource,
    #[serde(default, deserialize_with = "crate::pod::short_text")]
    pub sub_resource: Option<String>,
    #[serde(default, deserialize_with = "crate::pod::short_text")]
    pub namespace: Option<String>,
    #[serde(default, deserialize_with = "crate::pod::short_text")]
    pub name: Option<String>,
    pub operation: Operation,
    /// The Pod, pruned to the fields the webhook reads.
    #[serde(default, deserialize_with = "crate::pod::pruned")]
    pub object: Option<Pod>,
    #[serde(default, deserialize_with = "crate::pod::pruned")]
    pub old_object: Option<Pod>,
    #[serde(default)]
    pub dry_run: Option<bool>,
}

/// The request's uid, which the response echoes: a string no longer than a uid can be (the API
/// server's are 36 characters), or the body is no review.
fn uid<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let uid = String::deserialize(d)?;
    if uid.len() > MAX_UID {
        return Err(serde::de::Error::custom(format_args!(
            "request.uid is {} characters long, more than {MAX_UID}",
            uid.len()
        )));
    }
    Ok(uid)
}

/// The longest `request.uid` taken.
const MAX_UID: usize = 128;

/// A parsed review: the request and the `apiVersion` to echo.
#[derive(Debug, Clone)]
pub struct Review {
    pub api_version: String,
    pub request: AdmissionRequest,
}

impl Review {
    pub fn parse(body: &[u8]) -> Result<Review, AdmissionError> {
        let review: ReviewIn = serde_json::from_slice(body).map_err(AdmissionError::NotAReview)?;
        if let Some(kind) = review.kind.as_deref().filter(|k| *k != "AdmissionReview") {
            return Err(AdmissionError::WrongKind(kind.to_string()));
        }
        let request = review.request.ok_or(AdmissionError::NoRequest)?;
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
        let pod = self.request.object.as_ref();
        self.request
            .name
            .as_deref()
            .filter(|n| !n.is_empty())
            .or_else(|| pod.and_then(Pod::name))
            .or_else(|| pod.and_then(Pod::generate_name))
            .unwrap_or("")
    }

    pub fn namespace(&self) -> &str {
        self.request
            .namespace
            .as_deref()
            .or_else(|| self.request.object.as_ref().and_then(Pod::namespace))
            .unwrap_or("")
    }
}

/// Why a request or a container was left alone: the `reason` label of the skips metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    NotAPod,
    PodOptedOut,
    NamespaceExcluded,
    /// More images or pull secrets than the webhook reads ([`crate::pod::MAX_IMAGES`]): no
    /// real Pod, so it is left unchanged.
    PodTooLarge,
    Image(KeepReasonKind),
    MirrorAbsent,
    MirrorUnknown,
    /// The mirror needs a pull secret the namespace does not have (or, on the ephemeral
    /// containers subresource, the Pod does not reference).
    PullSecretMissing,
}

impl Skip {
    /// Every reason, for the metric's series that exist from start.
    pub fn all() -> impl Iterator<Item = Skip> {
        [
            Skip::NotAPod,
            Skip::PodOptedOut,
            Skip::NamespaceExcluded,
            Skip::PodTooLarge,
            Skip::MirrorAbsent,
            Skip::MirrorUnknown,
            Skip::PullSecretMissing,
        ]
        .into_iter()
        .chain(KeepReasonKind::ALL.map(Skip::Image))
    }

    pub fn label(self) -> &'static str {
        match self {
            Skip::NotAPod => "not-a-pod",
            Skip::PodOptedOut => "pod-opted-out",
            Skip::NamespaceExcluded => "namespace-excluded",
            Skip::PodTooLarge => "pod-too-large",
            Skip::Image(kind) => kind.label(),
            Skip::MirrorAbsent => "mirror-absent",
            Skip::MirrorUnknown => "mirror-unknown",
            Skip::PullSecretMissing => "pull-secret-missing",
        }
    }

    /// Whether the whole request was passed over (rather than one of its images).
    pub fn is_request(self) -> bool {
        matches!(
            self,
            Skip::NotAPod | Skip::PodOptedOut | Skip::NamespaceExcluded | Skip::PodTooLarge
        )
    }
}

/// One image's decision within a request: the image as the Pod has it, and what the table made
/// of it.
#[derive(Debug)]
struct ContainerPlan<'t, 'p> {
    slot: ImageRef<'p>,
    decision: Decision<'t>,
    /// Why the rewrite cannot happen for want of a pull secret (the warning's words).
    secret_missing: Option<String>,
    /// Why a `pin: digest` rewrite goes by tag after all (the warning's words).
    unpinned: Option<String>,
}

impl ContainerPlan<'_, '_> {
    /// A warning about this image, as the kubectl user reads it (without the `image-mirror: `
    /// every warning gets when it is sent).
    fn say(&self, what: std::fmt::Arguments<'_>) -> String {
        use std::fmt::Write as _;
        let mut s = self.said_of(64);
        let _ = s.write_fmt(what);
        s
    }

    /// `<noun> "<name>": <from> -> <to>`, the warning of every rewrite: written piece by piece,
    /// without the formatting machinery, as it is said for every image of every Pod.
    fn say_rewrite(&self, prefix: &str, from: &str, to: &str) -> String {
        let mut s = self.said_of(prefix.len() + from.len() + to.len() + 4);
        s.push_str(prefix);
        s.push_str(from);
        s.push_str(" -> ");
        s.push_str(to);
        s
    }

    /// The start of a warning about this image, with room for `more` bytes: the name quoted as
    /// `{:?}` quotes it (container names are DNS labels: nothing to escape, as a rule).
    fn said_of(&self, more: usize) -> String {
        let noun = self.slot.site.noun();
        let name: &str = &self.slot.name;
        let mut s = String::with_capacity(noun.len() + name.len() + 5 + more);
        s.push_str(noun);
        s.push(' ');
        if name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        {
            s.push('"');
            s.push_str(name);
            s.push('"');
        } else {
            use std::fmt::Write as _;
            let _ = write!(s, "{name:?}");
        }
        s.push_str(": ");
        s
    }
}

/// What the table decided for each container of a request, before mirror presence is known,
/// with the Pod it read them from (the patch is written against it).
#[derive(Debug)]
pub struct Plan<'t, 'p> {
    containers: Vec<ContainerPlan<'t, 'p>>,
    pod: Option<&'p Pod>,
    /// The request as a whole is not for us (with the reason), or nothing is.
    skipped: Option<Skip>,
    dry_run: bool,
    /// What the request may change.
    scope: Scope,
}

/// What a request may change of its Pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// A new Pod: images, pull secrets and the record.
    Create,
    /// An update of a Pod: its images (the only mutable part of its spec) and the record. Pull
    /// secrets cannot be added, so a mirror that needs one is used only when the Pod has it.
    Update,
    /// The `pods/ephemeralcontainers` subresource: the API server keeps only changes under
    /// `/spec/ephemeralContainers` and silently drops the rest.
    Ephemeral,
}

/// Whether a namespace holds a pull secret (or is about to): `(namespace, secret) → bool`.
pub type SecretLookup<'a> = &'a dyn Fn(&str, &str) -> bool;

/// What the webhook does with its decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Patch the Pod.
    #[default]
    Enforce,
    /// Decide everything, patch nothing: say what would change (warnings, audit annotations,
    /// metrics). Copies are still queued, so that mirrors are warm before the switch.
    Report,
}

/// The outcome of a request.
#[derive(Debug, Clone, Default)]
pub struct Mutation<'p> {
    pub patch: Vec<json_patch::PatchOperation>,
    /// What the kubectl user is told, each sent as `image-mirror: <warning>`.
    pub warnings: Vec<String>,
    pub rewrites: Vec<ImageChange<'p>>,
    /// Report mode: the rewrites that were decided and not made.
    pub would_rewrite: Vec<ImageChange<'p>>,
    pub pull_secrets_added: Vec<String>,
    pub skips: Vec<Skip>,
    pub copies: Vec<CopyRequest>,
}

/// Decides each container of the request against the table, given which pull secrets exist
/// (pure).
pub fn plan<'t, 'p>(review: &'p Review, table: &'t Table, secrets: SecretLookup) -> Plan<'t, 'p> {
    let req = &review.request;
    let skipped = |skip| Plan {
        containers: Vec::new(),
        pod: None,
        skipped: Some(skip),
        dry_run: review.dry_run(),
        scope: Scope::Create,
    };
    let is_pods = req.resource.group.is_empty() && req.resource.resource == "pods";
    let sub = req.sub_resource.as_deref().unwrap_or("");
    let (scope, sites): (Scope, &[ImageSite]) = match (is_pods, sub, &req.operation) {
        (true, "", Operation::Create) => (
            Scope::Create,
            &[
                ImageSite::Containers,
                ImageSite::InitContainers,
                ImageSite::Volumes,
            ],
        ),
        // Of a Pod's spec only the container images may change once it exists.
        (true, "", Operation::Update) => (
            Scope::Update,
            &[ImageSite::Containers, ImageSite::InitContainers],
        ),
        (true, "ephemeralcontainers", Operation::Update) => {
            (Scope::Ephemeral, &[ImageSite::EphemeralContainers])
        }
        _ => return skipped(Skip::NotAPod),
    };
    let Some(pod) = req.object.as_ref() else {
        return skipped(Skip::NotAPod);
    };
    if pod.opted_out() {
        return skipped(Skip::PodOptedOut);
    }
    if table.namespace_excluded(review.namespace()) {
        return skipped(Skip::NamespaceExcluded);
    }
    if pod.too_large() {
        return skipped(Skip::PodTooLarge);
    }
    // An update touches only what it changes: an ephemeral container once added, or an image
    // the old Pod did not have at that container (never one the webhook wrote itself, so that a
    // re-invocation or a no-op update changes nothing).
    let old: Vec<(ImageSite, String, String)> = match (scope, req.old_object.as_ref()) {
        (Scope::Create, _) | (_, None) => Vec::new(),
        (_, Some(old)) => old
            .images(sites)
            .into_iter()
            .map(|c| (c.site, c.name, c.image.to_string()))
            .collect(),
    };
    let unchanged = |c: &crate::pod::ImageRef<'_>| {
        old.iter().any(|(site, name, image)| {
            *site == c.site && *name == c.name && (scope == Scope::Ephemeral || image == c.image)
        })
    };
    let namespace = review.namespace();
    // Only a new Pod can be given a pull secret; otherwise the Pod must have it already.
    let referenced = if scope == Scope::Create {
        Vec::new()
    } else {
        pod.pull_secrets()
    };
    // Why a rewrite to a mirror with this pull secret cannot happen here, if it cannot.
    let missing = |secret: &str| {
        if scope != Scope::Create && !referenced.contains(&secret) {
            let on = match scope {
                Scope::Ephemeral => "on the ephemeral containers subresource",
                _ => "on an update of the Pod",
            };
            Some(format!(
                "the Pod does not reference the mirror's pull secret {secret:?}, and {on} it \
                 cannot be added"
            ))
        } else if !secrets(namespace, secret) {
            Some(format!(
                "the mirror's pull secret {secret:?} is missing in namespace {namespace:?}"
            ))
        } else {
            None
        }
    };
    let containers = pod
        .images(sites)
        .into_iter()
        .filter(|c| !unchanged(c))
        .map(|slot| {
            let decision = table.decide(slot.image);
            let secret_missing = decision
                .rewrite()
                .and_then(|rw| rw.pull_secret())
                .and_then(missing);
            ContainerPlan {
                slot,
                decision,
                secret_missing,
                unpinned: None,
            }
        })
        .collect();
    Plan {
        containers,
        pod: Some(pod),
        skipped: None,
        dry_run: review.dry_run(),
        scope,
    }
}

/// Whether this rewrite waits for its tag's digest upstream.
fn wants_pin(rw: &Rewrite<'_>) -> bool {
    rw.policy.pin == Pin::Digest && rw.source.digest().is_none()
}

/// `r` with `digest` added to its tag.
fn with_digest(r: &Reference, digest: &str) -> Option<Reference> {
    Reference::from_parts(r.registry(), r.path(), r.tag(), Some(digest)).ok()
}

impl<'t, 'p> Plan<'t, 'p> {
    /// The rewrites nothing holds back before the registries are asked (a missing pull
    /// secret does).
    fn live_rewrites(&self) -> impl Iterator<Item = &Rewrite<'t>> {
        self.containers
            .iter()
            .filter(|c| c.secret_missing.is_none())
            .filter_map(|c| c.decision.rewrite())
    }

    /// The sources (canonical) whose tag's digest upstream the rewrite carries (`pin: digest`).
    pub fn sources_to_pin(&self) -> Vec<Reference> {
        let mut out: Vec<Reference> = Vec::new();
        for rw in self.live_rewrites().filter(|rw| wants_pin(rw)) {
            let source = rw.source.canonical();
            if !out.contains(&source) {
                out.push(source.into_owned());
            }
        }
        out
    }

    /// Pins each `pin: digest` rewrite to the digest its tag has upstream: target and copy
    /// become `<name>:<tag>@<digest>`, so that a mirror holding another version of the tag is
    /// not used. Without an answer the rewrite goes by tag, as without the setting, and the
    /// warning says so (pure).
    pub fn pin(&mut self, upstream: &dyn Fn(&Reference) -> Upstream) {
        for c in self
            .containers
            .iter_mut()
            .filter(|c| c.secret_missing.is_none())
        {
            let Decision::Rewrite(rw) = &mut c.decision else {
                continue;
            };
            if !wants_pin(rw) {
                continue;
            }
            let source = rw.source.canonical().into_owned();
            let why = match upstream(&source) {
                Upstream::Digest(d) => {
                    match (with_digest(&source, &d), with_digest(&rw.target, &d)) {
                        (Some(s), Some(t)) => {
                            rw.source = s;
                            rw.target = t;
                            continue;
                        }
                        _ => {
                            format!("the upstream answered {d:?} for {source}, which is no digest")
                        }
                    }
                }
                Upstream::Absent => format!("the upstream registry has no {source}"),
                Upstream::Unknown => {
                    format!("the upstream registry did not say in time which digest {source} has")
                }
            };
            c.unpinned = Some(why);
        }
    }

    /// The mirror targets whose presence decides the outcome (`if-present` rewrites that
    /// nothing else holds back).
    pub fn targets_to_check(&self) -> Vec<&Reference> {
        let mut out: Vec<&Reference> = Vec::new();
        for rw in self.live_rewrites() {
            if rw.policy.swap == SwapPolicy::IfPresent && !out.contains(&&rw.target) {
                out.push(&rw.target);
            }
        }
        out
    }

    /// Turns the decisions into a patch, given what is known of mirror presence (pure).
    pub fn finish(&self, presence: &dyn Fn(&Reference) -> Presence) -> Mutation<'p> {
        self.finish_as(Mode::Enforce, presence)
    }

    /// [`finish`](Self::finish) in `mode`: in report mode the same decisions are reported
    /// instead of made (no patch, "would rewrite" warnings, the rewrites kept for the audit
    /// annotation and the metrics), and copies are still queued.
    pub fn finish_as(&self, mode: Mode, presence: &dyn Fn(&Reference) -> Presence) -> Mutation<'p> {
        let mut m = Mutation::default();
        if let Some(skip) = self.skipped {
            m.skips.push(skip);
            if skip == Skip::PodTooLarge {
                m.warnings.push(format!(
                    "the Pod has more than {} images or {} pull secrets in one \
                     list; left unchanged",
                    crate::pod::MAX_IMAGES,
                    crate::pod::MAX_PULL_SECRETS
                ));
            }
            return m;
        }
        let mut secrets: Vec<&str> = Vec::new();
        for c in &self.containers {
            let rw = match &c.decision {
                Decision::Rewrite(rw) => rw,
                Decision::Keep(keep) => {
                    m.skips.push(Skip::Image(keep.reason.kind()));
                    if let KeepReason::Unparsable(e) = &keep.reason {
                        let image = c.slot.image;
                        m.warnings
                            .push(c.say(format_args!("image {image:?} left unchanged: {e}")));
                    }
                    continue;
                }
            };
            if let Some(why) = &c.secret_missing {
                m.skips.push(Skip::PullSecretMissing);
                m.warnings
                    .push(c.say(format_args!("kept {}: {why}", c.slot.image)));
                continue;
            }
            if let Some(why) = &c.unpinned {
                m.warnings.push(c.say(format_args!(
                    "not pinned to a digest ({why}); going by tag {}",
                    rw.target
                )));
            }
            if rw.policy.swap == SwapPolicy::IfPresent {
                match presence(&rw.target) {
                    Presence::Present => {}
                    Presence::Absent => {
                        m.skips.push(Skip::MirrorAbsent);
                        let copying = rw.policy.copy == CopyPolicy::OnDemand && !self.dry_run;
                        if copying && !m.copies.iter().any(|q| q.target == rw.target) {
                            m.copies.push(CopyRequest::for_rewrite(rw));
                        }
                        m.warnings.push(c.say(format_args!(
                            "mirror lacks {}; kept {}{}",
                            rw.target,
                            &c.slot.image,
                            if copying { " (copy queued)" } else { "" }
                        )));
                        continue;
                    }
                    Presence::Unknown => {
                        m.skips.push(Skip::MirrorUnknown);
                        continue;
                    }
                }
            }
            let change = ImageChange {
                slot: c.slot.clone(),
                target: rw.target.to_string(),
                source_registry: rw.source.registry().to_string(),
                mirror: rw.mirror_name().to_string(),
            };
            if mode == Mode::Report {
                m.warnings
                    .push(c.say_rewrite("would rewrite ", c.slot.image, &change.target));
                m.would_rewrite.push(change);
                continue;
            }
            m.warnings
                .push(c.say_rewrite("", c.slot.image, &change.target));
            m.rewrites.push(change);
            if let Some(secret) = rw.pull_secret() {
                if !secrets.contains(&secret) {
                    secrets.push(secret);
                }
            }
        }
        if let Some(pod) = self.pod {
            let changes = &m.rewrites;
            match self.scope {
                Scope::Ephemeral => {
                    // Only the images: the API server would drop the pull secrets and the
                    // record, so the kubectl user gets the record as a warning instead.
                    m.patch = patch::image_ops(changes);
                    if let Some(record) = patch::original_images(pod, changes) {
                        m.warnings.push(format!("original images: {record}"));
                    }
                }
                // A Pod's pull secrets cannot change once it exists (the rewrites above were
                // only those whose secret the Pod has).
                Scope::Update => m.patch = patch::build_patch(pod, changes, &[]).ops,
                Scope::Create => {
                    let built = patch::build_patch(pod, changes, &secrets);
                    m.patch = built.ops;
                    m.pull_secrets_added = built.added_secrets;
                }
            }
        }
        m
    }
}

#[cfg(test)]
mod tests;
