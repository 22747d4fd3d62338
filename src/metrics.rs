//! Every metric family, registered once, through the Prometheus project's `prometheus-client`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub operation: String,
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RewriteLabels {
    pub namespace: String,
    pub source_registry: String,
    pub mirror: String,
    /// `container`, `init-container`, `ephemeral-container` or `image-volume`.
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretLabels {
    pub secret: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    pub registry: String,
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistryLabels {
    pub registry: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AwsLabels {
    /// The AWS API action (`GetAuthorizationToken`, `CreateRepository`, …).
    pub action: &'static str,
    /// `ok`, or what went wrong: `no-credentials`, `identity`, `access-denied`, `error`.
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    pub registry: String,
    pub state: &'static str,
}

/// Admission latency buckets: fine below 5 ms, where a healthy webhook lives, and up to the
/// default 2 s budget, where the slow-admission alert looks.
const ADMISSION_BUCKETS: [f64; 19] = [
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.5, 1.0, 1.5, 2.0, 3.0,
];
const REGISTRY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const COPY_BUCKETS: [f64; 10] = [0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0];

/// The metric families; cheap to clone (every family is reference-counted).
#[derive(Clone)]
pub struct Metrics {
    pub admission_requests: Family<RequestLabels, Counter>,
    pub admission_duration: Histogram,
    pub rewrites: Family<RewriteLabels, Counter>,
    pub would_rewrite: Family<RewriteLabels, Counter>,
    pub skips: Family<ReasonLabels, Counter>,
    pub pull_secrets_injected: Family<SecretLabels, Counter>,
    pub unparsable_images: Counter,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub certificate_reloads: Family<ResultLabels, Counter>,
    pub certificate_expiry: Gauge<i64>,
    pub build_info: Family<BuildLabels, Gauge>,
    pub checks: Family<CheckLabels, Counter>,
    pub check_duration: Histogram,
    pub check_cache: Family<ResultLabels, Counter>,
    pub upstream_digests: Family<CheckLabels, Counter>,
    pub ratelimit_limit: Family<RegistryLabels, Gauge>,
    pub ratelimit_remaining: Family<RegistryLabels, Gauge>,
    pub copies_paused: Family<RegistryLabels, Gauge>,
    pub copies: Family<ResultLabels, Counter>,
    pub copied_bytes: Counter,
    pub copy_duration: Histogram,
    pub copy_queue_depth: Gauge,
    pub too_many_requests: Family<RegistryLabels, Counter>,
    pub circuit_open: Family<RegistryLabels, Gauge>,
    pub circuit_transitions: Family<TransitionLabels, Counter>,
    pub pull_secrets_managed: Family<SecretLabels, Gauge>,
    pub pull_secret_conflicts: Family<SecretLabels, Counter>,
    pub pull_secret_reconcile_errors: Family<ReasonLabels, Counter>,
    pub images: Family<PhaseLabels, Gauge>,
    pub image_record_queue: Gauge,
    pub image_record_writes: Family<ResultLabels, Counter>,
    pub aws_requests: Family<AwsLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            admission_requests: Family::default(),
            admission_duration: Histogram::new(ADMISSION_BUCKETS),
            rewrites: Family::default(),
            would_rewrite: Family::default(),
            skips: Family::default(),
            pull_secrets_injected: Family::default(),
            unparsable_images: Counter::default(),
            config_reloads: Family::default(),
            certificate_reloads: Family::default(),
            certificate_expiry: Gauge::default(),
            build_info: Family::default(),
            checks: Family::default(),
            check_duration: Histogram::new(REGISTRY_BUCKETS),
            check_cache: Family::default(),
            upstream_digests: Family::default(),
            ratelimit_limit: Family::default(),
            ratelimit_remaining: Family::default(),
            copies_paused: Family::default(),
            copies: Family::default(),
            copied_bytes: Counter::default(),
            copy_duration: Histogram::new(COPY_BUCKETS),
            copy_queue_depth: Gauge::default(),
            too_many_requests: Family::default(),
            circuit_open: Family::default(),
            circuit_transitions: Family::default(),
            pull_secrets_managed: Family::default(),
            pull_secret_conflicts: Family::default(),
            pull_secret_reconcile_errors: Family::default(),
            images: Family::default(),
            image_record_queue: Gauge::default(),
            image_record_writes: Family::default(),
            aws_requests: Family::default(),
        }
    }
}

impl Metrics {
    /// Creates the families and registers them, all under the `image_mirror_` prefix.
    pub fn new() -> (Metrics, Registry) {
        let m = Metrics::default();
        let mut r = Registry::with_prefix("image_mirror");
        r.register(
            "admission_requests",
            "Admission reviews answered, by operation and result",
            m.admission_requests.clone(),
        );
        r.register(
            "admission_duration_seconds",
            "Time from request body to response",
            m.admission_duration.clone(),
        );
        r.register(
            "rewrites",
            "Container images rewritten to a mirror",
            m.rewrites.clone(),
        );
        r.register(
            "would_rewrite",
            "Images report-only mode would have rewritten",
            m.would_rewrite.clone(),
        );
        r.register(
            "skips",
            "Container images left unchanged, by reason",
            m.skips.clone(),
        );
        r.register(
            "pull_secrets_injected",
            "imagePullSecrets added to Pods",
            m.pull_secrets_injected.clone(),
        );
        r.register(
            "unparsable_images",
            "Image strings that are not valid references",
            m.unparsable_images.clone(),
        );
        r.register(
            "config_reloads",
            "Mapping-table reloads, by result",
            m.config_reloads.clone(),
        );
        r.register(
            "certificate_reloads",
            "Serving-certificate reloads, by result",
            m.certificate_reloads.clone(),
        );
        r.register(
            "certificate_expiry_timestamp_seconds",
            "Unix time at which the serving certificate expires",
            m.certificate_expiry.clone(),
        );
        r.register(
            "build_info",
            "Build information; the value is always 1",
            m.build_info.clone(),
        );
        r.register(
            "mirror_checks",
            "Mirror existence checks, by result: what the registry answered, or shared (answered by a MirroredImage another replica wrote within presentTtl)",
            m.checks.clone(),
        );
        r.register(
            "mirror_check_duration_seconds",
            "Latency of mirror existence checks",
            m.check_duration.clone(),
        );
        r.register(
            "mirror_check_cache",
            "Mirror existence lookups: answered from the cache (hit), with a stale unknown while \
             the registry is asked again (stale), or by asking it (miss)",
            m.check_cache.clone(),
        );
        r.register(
            "upstream_digest_lookups",
            "Tag digests asked of upstream registries for `pin: digest`, by result",
            m.upstream_digests.clone(),
        );
        r.register(
            "registry_ratelimit_limit",
            "Pulls a registry allows per window, from its last ratelimit-limit header",
            m.ratelimit_limit.clone(),
        );
        r.register(
            "registry_ratelimit_remaining",
            "Pulls left in a registry's window, from its last ratelimit-remaining header",
            m.ratelimit_remaining.clone(),
        );
        r.register(
            "copies_paused",
            "1 while copies from a registry wait for its rate-limit window (rateLimitReserve)",
            m.copies_paused.clone(),
        );
        r.register("copies", "Image copies, by result", m.copies.clone());
        r.register(
            "copied_bytes",
            "Blob bytes pushed to mirrors",
            m.copied_bytes.clone(),
        );
        r.register(
            "copy_duration_seconds",
            "Duration of image copies",
            m.copy_duration.clone(),
        );
        r.register(
            "copy_queue_depth",
            "Copies waiting for a slot (running ones are not counted)",
            m.copy_queue_depth.clone(),
        );
        r.register(
            "registry_too_many_requests",
            "HTTP 429 answers from registries",
            m.too_many_requests.clone(),
        );
        r.register(
            "registry_circuit_open",
            "1 while checks of the registry are answered unknown without asking it",
            m.circuit_open.clone(),
        );
        r.register(
            "registry_circuit_transitions",
            "Registry circuit changes, by the state entered",
            m.circuit_transitions.clone(),
        );
        r.register(
            "pull_secrets_managed",
            "Namespaces holding the webhook's copy of a mirror's pull secret",
            m.pull_secrets_managed.clone(),
        );
        r.register(
            "pull_secret_conflicts",
            "Namespaces where a pull secret of that name exists and is not the webhook's",
            m.pull_secret_conflicts.clone(),
        );
        r.register(
            "pull_secret_reconcile_errors",
            "Pull secret reconciles that failed, by reason",
            m.pull_secret_reconcile_errors.clone(),
        );
        r.register(
            "images",
            "MirroredImage objects in the watch cache, by phase",
            m.images.clone(),
        );
        r.register(
            "image_record_queue",
            "MirroredImage changes waiting to be written",
            m.image_record_queue.clone(),
        );
        r.register(
            "image_record_writes",
            "Writes of MirroredImage objects to the Kubernetes API, by result",
            m.image_record_writes.clone(),
        );
        r.register(
            "aws_requests",
            "Calls to AWS APIs with the webhook's own identity (ECR tokens, repositories, cache \
             rules), by action and result",
            m.aws_requests.clone(),
        );
        m.build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        // Series whose labels are known now exist from start, at 0 (an alert's `increase()`
        // misses a first event that has no earlier sample); the admission and mirror layers add
        // theirs.
        for result in ["success", "failure", "unchanged"] {
            drop(m.config_reloads.get_or_create(&ResultLabels { result }));
            drop(
                m.certificate_reloads
                    .get_or_create(&ResultLabels { result }),
            );
        }
        for result in ["success", "failure", "given_up", "dropped", "job"] {
            drop(m.copies.get_or_create(&ResultLabels { result }));
        }
        for result in ["hit", "miss", "stale"] {
            drop(m.check_cache.get_or_create(&ResultLabels { result }));
        }
        (m, r)
    }

    /// The series of `registries` (the table's mirrors and upstreams), at 0 until they move.
    pub fn init_registries<'a>(&self, registries: impl IntoIterator<Item = &'a str>) {
        for registry in registries {
            let labels = RegistryLabels {
                registry: registry.to_string(),
            };
            drop(self.circuit_open.get_or_create(&labels));
            drop(self.copies_paused.get_or_create(&labels));
            drop(self.too_many_requests.get_or_create(&labels));
            for result in CHECK_RESULTS {
                drop(self.checks.get_or_create(&CheckLabels {
                    registry: registry.to_string(),
                    result,
                }));
            }
        }
    }
}

/// The `result` label of mirror checks.
pub const CHECK_RESULTS: [&str; 7] = [
    "present",
    "shared",
    "absent",
    "unauthorized",
    "error",
    "timeout",
    "circuit-open",
];

/// The content type of [`encode`]'s Prometheus text output.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The content type of OpenMetrics output.
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Encodes the registry as OpenMetrics, or as Prometheus text 0.0.4 for scrapers that did not
/// ask for OpenMetrics. Returns the body and its content type.
pub fn encode(
    registry: &Registry,
    openmetrics: bool,
) -> Result<(String, &'static str), std::fmt::Error> {
    let mut text = String::with_capacity(8192);
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    if openmetrics {
        Ok((text, OPENMETRICS_TEXT))
    } else {
        Ok((to_prometheus_text(&text), PROMETHEUS_TEXT))
    }
}

/// OpenMetrics → Prometheus text 0.0.4: a counter family `x` is exposed as `x_total` (its
/// samples already are), and the `# UNIT` and `# EOF` lines go. promtool and older scrapers read
/// only this format.
fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut pending_help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            pending_help = rest.split_once(' ').or(Some((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "gauge" | "histogram" | "summary" => (name.to_string(), kind),
                _ => (name.to_string(), "untyped"),
            };
            if let Some((_, help)) = pending_help.take() {
                out.push_str(&format!("# HELP {name} {help}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_become_total_families() {
        let (m, r) = Metrics::new();
        m.skips
            .get_or_create(&ReasonLabels { reason: "no-match" })
            .inc();
        let (text, kind) = encode(&r, false).unwrap();
        assert_eq!(kind, PROMETHEUS_TEXT);
        assert!(text.contains("# TYPE image_mirror_skips_total counter\n"));
        assert!(text.contains("# HELP image_mirror_skips_total Container images"));
        assert!(text.contains("image_mirror_skips_total{reason=\"no-match\"} 1"));
        assert!(!text.contains("# EOF"));
        let (om, kind) = encode(&r, true).unwrap();
        assert_eq!(kind, OPENMETRICS_TEXT);
        assert!(om.ends_with("# EOF\n"));
    }
}
