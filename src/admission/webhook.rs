//! The admission service around the pure core: the mirror lookups within the time budget,
//! metrics, one log line per review, and *allowed, unchanged* on any trouble of its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{plan, refusal_body, response_body, AdmissionError, Mode, Mutation, Review, Skip};
use crate::config::ConfigHandle;
use crate::error::Report;
use crate::mapping::{KeepReasonKind, Table};
use crate::metrics::{Metrics, ReasonLabels, RequestLabels, RewriteLabels, SecretLabels};
use crate::mirror::{MirrorAccess, Presence, Upstream};
use crate::reference::Reference;

/// Which namespaces hold a pull secret, or are about to (the Kubernetes layer's cache). Without
/// one, every secret counts as there, as it did before the webhook could look.
pub trait PullSecrets: Send + Sync {
    fn available(&self, namespace: &str, secret: &str) -> bool;
}

/// The namespaces that exist (the Kubernetes layer's cache): the `namespace` label of the
/// rewrite metrics takes only these, since a forged review can name any.
pub trait KnownNamespaces: Send + Sync {
    fn knows(&self, namespace: &str) -> bool;
}

/// A fixed set (tests, benches).
impl KnownNamespaces for Vec<String> {
    fn knows(&self, namespace: &str) -> bool {
        self.iter().any(|n| n == namespace)
    }
}

/// The admission service: table, metrics, mirror access and the time budget.
pub struct Webhook {
    pub config: ConfigHandle,
    pub metrics: Metrics,
    /// How long a review may take before it is answered *allowed, unchanged*.
    pub budget: Duration,
    pub mirrors: Option<Arc<dyn MirrorAccess>>,
    pub pull_secrets: Option<Arc<dyn PullSecrets>>,
    /// Without it, rewrites are counted without a namespace (`namespace=""`).
    pub namespaces: Option<Arc<dyn KnownNamespaces>>,
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

/// The `result` label of reviews answered (with an operation) and of bodies that were not.
const RESULTS: [&str; 6] = [
    "patched",
    "reported",
    "skipped",
    "unchanged",
    "error",
    "refused",
];
const BODY_RESULTS: [&str; 2] = ["invalid", "overloaded"];

impl Webhook {
    pub fn new(config: ConfigHandle, metrics: Metrics) -> Self {
        // Every series an alert or the dashboard reads exists from start, at 0: `increase()`
        // sees the first event only against an earlier sample.
        for operation in ["CREATE", "UPDATE"] {
            for result in RESULTS {
                drop(metrics.admission_requests.get_or_create(&RequestLabels {
                    operation: operation.to_string(),
                    result,
                }));
            }
        }
        for result in BODY_RESULTS {
            drop(metrics.admission_requests.get_or_create(&RequestLabels {
                operation: String::new(),
                result,
            }));
        }
        for skip in Skip::all() {
            drop(metrics.skips.get_or_create(&ReasonLabels {
                reason: skip.label(),
            }));
        }
        Webhook {
            config,
            metrics,
            budget: Duration::from_secs(2),
            mirrors: None,
            pull_secrets: None,
            namespaces: None,
            strict: false,
        }
    }

    /// Answers one AdmissionReview body; in report mode, nothing is patched.
    pub async fn review(&self, body: &[u8], mode: Mode) -> Answer {
        let started = Instant::now();
        let review = match Review::parse(body) {
            Ok(r) => r,
            Err(e) => {
                self.count_request("", e.metric_label(), started);
                let reason = Report(&e).to_string();
                tracing::warn!(error = reason.as_str(), "refused a request body");
                return Answer::BadRequest(reason);
            }
        };
        let config = self.config.current();
        // Report mode only ever reports: it never refuses a Pod, not even on an error of ours.
        let strict = self.strict && mode == Mode::Enforce;
        // Only the mirror lookups wait, and they are bounded by the budget inside `mutate`.
        let outcome = self.mutate(&review, &config.table, mode).await;
        let mutation = match outcome {
            Ok(m) => m,
            Err(e) if strict => {
                self.count_request(review.operation(), "refused", started);
                let why = format!("image-mirror (strict): {e}");
                return refuse(&review, 500, &why);
            }
            Err(e) => {
                self.count_request(review.operation(), e.metric_label(), started);
                // Never block a Pod through our own fault: allowed, unchanged.
                tracing::error!(uid = review.request.uid.as_str(), namespace = review.namespace(),
                    pod = review.pod_name(), error = %e, "admission failed; allowed unchanged");
                return Answer::Review(response_body(
                    &review.api_version,
                    &review.request.uid,
                    &Mutation::default(),
                ));
            }
        };
        if let Some(why) = strict.then(|| strict_refusal(&mutation)).flatten() {
            self.count_request(review.operation(), "refused", started);
            return refuse(&review, 403, &why);
        }
        if let Some(mirrors) = &self.mirrors {
            // The image records (queued, never waited on); a dry run leaves no trace.
            if !review.dry_run() {
                for r in &mutation.rewrites {
                    mirrors.record_use(r.slot.image, &r.target, false);
                }
                for copy in &mutation.copies {
                    mirrors.record_use(copy.source.as_str(), copy.target.as_str(), true);
                }
            }
            for copy in &mutation.copies {
                if mirrors.request_copy(copy.clone()) {
                    tracing::info!(uid = review.request.uid.as_str(),
                        namespace = review.namespace(), pod = review.pod_name(),
                        source = %copy.source, target = %copy.target,
                        warm_up = copy.mode == crate::mirror::CopyMode::WarmUp, "copy queued");
                }
            }
        }
        self.record(&review, &mutation, started);
        Answer::Review(response_body(
            &review.api_version,
            &review.request.uid,
            &mutation,
        ))
    }

    async fn mutate<'r>(
        &self,
        review: &'r Review,
        table: &Table,
        mode: Mode,
    ) -> Result<Mutation<'r>, AdmissionError> {
        let secrets = |namespace: &str, secret: &str| {
            self.pull_secrets
                .as_ref()
                .is_none_or(|p| p.available(namespace, secret))
        };
        let mut plan = catch(|| plan(review, table, &secrets))?;
        // Leave a quarter of the budget for the rest: an unanswered lookup is unknown, and
        // the Pod's other rewrites still happen. Digests first: they name what to check.
        let deadline = tokio::time::Instant::now() + self.budget * 3 / 4;
        let sources = plan.sources_to_pin();
        if !sources.is_empty() {
            let keys: Vec<&Reference> = sources.iter().collect();
            let digests = self
                .ask_all(&keys, deadline, |m, s| m.upstream_digest(s))
                .await;
            let answer = |s: &Reference| digests.get(s).cloned().unwrap_or(Upstream::Unknown);
            catch(|| plan.pin(&answer))?;
        }
        let targets = plan.targets_to_check();
        let known = self.ask_all(&targets, deadline, |m, t| m.presence(t)).await;
        let lookup = |t: &Reference| known.get(t).copied().unwrap_or(Presence::Unknown);
        catch(|| plan.finish_as(mode, &lookup))
    }

    /// Asks the mirrors about every key at once, until `deadline`; what is not answered by
    /// then (or everything, without mirrors) stays unknown.
    async fn ask_all<'k, V, F>(
        &'k self,
        keys: &[&'k Reference],
        deadline: tokio::time::Instant,
        ask: impl Fn(&'k dyn MirrorAccess, &'k Reference) -> F,
    ) -> HashMap<&'k Reference, V>
    where
        F: std::future::Future<Output = V>,
    {
        let Some(mirrors) = self.mirrors.as_deref().filter(|_| !keys.is_empty()) else {
            return HashMap::new();
        };
        let lookups = futures::future::join_all(keys.iter().map(|k| ask(mirrors, k)));
        match tokio::time::timeout_at(deadline, lookups).await {
            Ok(answers) => keys.iter().copied().zip(answers).collect(),
            Err(_) => HashMap::new(),
        }
    }

    /// Counts a review answered 429 before it was read (the in-flight budget was spent).
    pub fn count_overloaded(&self) {
        self.metrics
            .admission_requests
            .get_or_create(&RequestLabels {
                operation: String::new(),
                result: "overloaded",
            })
            .inc();
    }

    /// The `namespace` label for a review in `namespace`: the name when the cluster has such a
    /// namespace, `other` when it has not (a forged review), and none without the cache.
    fn metric_namespace<'a>(&self, namespace: &'a str) -> &'a str {
        match &self.namespaces {
            Some(known) if known.knows(namespace) => namespace,
            Some(_) => "other",
            None => "",
        }
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
        } else if !m.would_rewrite.is_empty() {
            "reported"
        } else if m.skips.iter().any(|s| s.is_request()) {
            "skipped"
        } else {
            "unchanged"
        };
        self.count_request(review.operation(), result, started);
        let namespace = self.metric_namespace(review.namespace());
        // Counted per label set, not per image: a Pod's images mostly share one, and each
        // lookup of a series builds its labels and hashes them.
        for (family, records) in [
            (&self.metrics.rewrites, &m.rewrites),
            (&self.metrics.would_rewrite, &m.would_rewrite),
        ] {
            let mut counts: Vec<(&str, &str, &'static str, u64)> = Vec::new();
            for r in records {
                let key = (
                    r.source_registry.as_str(),
                    r.mirror.as_str(),
                    r.slot.site.label(),
                );
                match counts.iter_mut().find(|c| (c.0, c.1, c.2) == key) {
                    Some(c) => c.3 += 1,
                    None => counts.push((key.0, key.1, key.2, 1)),
                }
            }
            for (source_registry, mirror, kind, n) in counts {
                family
                    .get_or_create(&RewriteLabels {
                        namespace: namespace.to_string(),
                        source_registry: source_registry.to_string(),
                        mirror: mirror.to_string(),
                        kind,
                    })
                    .inc_by(n);
            }
        }
        let mut skips: Vec<(&'static str, u64)> = Vec::new();
        for s in &m.skips {
            match skips.iter_mut().find(|(label, _)| *label == s.label()) {
                Some((_, n)) => *n += 1,
                None => skips.push((s.label(), 1)),
            }
            if *s == Skip::Image(KeepReasonKind::Unparsable) {
                self.metrics.unparsable_images.inc();
            }
        }
        for (reason, n) in skips {
            self.metrics
                .skips
                .get_or_create(&ReasonLabels { reason })
                .inc_by(n);
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
            uid = review.request.uid.as_str(),
            operation = review.operation(),
            namespace = review.namespace(),
            pod = review.pod_name(),
            rewrites = m.rewrites.len(),
            would_rewrite = m.would_rewrite.len(),
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
    tracing::warn!(
        uid = review.request.uid.as_str(),
        namespace = review.namespace(),
        pod = review.pod_name(),
        code,
        reason = why,
        "refused (strict)"
    );
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
        .filter(|s| **s == Skip::Image(KeepReasonKind::Unparsable))
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
        message.push_str(w);
    }
    Some(message)
}

/// Runs pure code, turning a panic into an error so that the Pod is still admitted.
fn catch<T>(f: impl FnOnce() -> T) -> Result<T, AdmissionError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_string());
        AdmissionError::Internal(message)
    })
}
