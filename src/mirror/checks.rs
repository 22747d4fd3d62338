//! Mirror checks for the `if-present` policy, and the upstream digest lookups of `pin: digest`:
//! cached (present for minutes, absent and unknown for seconds), shared between concurrent
//! requests for one image, bounded by the check timeout, and through a circuit breaker per
//! registry ([`super::circuit`]), so that a registry in trouble costs admission nothing once
//! it has failed. Settings are read from the configuration in force at each check.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::cadence::Cadence;
use super::circuit::{Admit, CircuitSettings, Circuits, Transition};
use super::{ImageRecords, Presence, Upstream};
use crate::config::ConfigHandle;
use crate::error::Report;
use crate::locks::lock;
use crate::metrics::{CheckLabels, Metrics, RegistryLabels, ResultLabels, TransitionLabels};
use crate::reference::Reference;
use crate::registry::{Failure, Registries, RegistryError};
use crate::settings::CheckSettings;

/// A lookup in flight, shared by everyone waiting for its answer.
type SharedLookup<T> = Shared<BoxFuture<'static, T>>;

/// Answers remembered until a deadline, and the lookups in flight, by key: mirror presence by
/// target, upstream digests by source.
struct Memo<T> {
    answers: Mutex<HashMap<String, (T, Instant)>>,
    inflight: Mutex<HashMap<String, SharedLookup<T>>>,
}

impl<T: Clone> Memo<T> {
    fn new() -> Self {
        Memo {
            answers: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// What is remembered for `key`, and whether it is still fresh.
    fn lookup(&self, key: &str) -> Option<(T, bool)> {
        lock(&self.answers)
            .get(key)
            .map(|(v, until)| (v.clone(), *until > Instant::now()))
    }

    fn remember(&self, key: &str, value: T, ttl: Duration) {
        let mut answers = lock(&self.answers);
        if ttl.is_zero() {
            // Not to be remembered at all (`unknownTtl: 0s`): not even as a stale answer.
            answers.remove(key);
            return;
        }
        // Drop expired entries now and then, so the map does not grow with every image ever seen.
        if answers.len() > 10_000 {
            let now = Instant::now();
            answers.retain(|_, (_, until)| *until > now);
        }
        answers.insert(key.to_string(), (value, Instant::now() + ttl));
    }

    fn landed(&self, key: &str) {
        lock(&self.inflight).remove(key);
    }
}

/// The checks and lookups of the configuration in force, with what they remember.
pub struct Checks {
    config: ConfigHandle,
    registries: Arc<Registries>,
    metrics: Metrics,
    /// Target → whether the mirror has it.
    presence: Memo<Presence>,
    /// Source → the digest its tag has upstream (`pin: digest`).
    digests: Memo<Upstream>,
    circuits: Mutex<Circuits>,
    /// The unauthorized-check warning, once per registry per period.
    cadence: Cadence,
    /// The cluster's image records, when there are any: told every answer, and asked first
    /// whether another replica found the image already.
    records: Mutex<Option<Arc<dyn ImageRecords>>>,
}

/// How one check ended, as the checks metric counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Present,
    Absent,
    /// 401 or 403: the registry works, but not for us.
    Unauthorized,
    Error,
    Timeout,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Present => "present",
            Outcome::Absent => "absent",
            Outcome::Unauthorized => "unauthorized",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
        }
    }

    fn presence(self) -> Presence {
        match self {
            Outcome::Present => Presence::Present,
            Outcome::Absent => Presence::Absent,
            Outcome::Unauthorized | Outcome::Error | Outcome::Timeout => Presence::Unknown,
        }
    }

    /// Whether the registry failed to answer at all (what trips its circuit).
    fn is_trouble(self) -> bool {
        matches!(self, Outcome::Error | Outcome::Timeout)
    }
}

fn circuit_settings(c: &CheckSettings) -> CircuitSettings {
    CircuitSettings {
        threshold: c.circuit_threshold,
        backoff: c.circuit_backoff,
        max_backoff: c.circuit_max_backoff,
    }
}

impl Checks {
    pub(super) fn new(config: ConfigHandle, registries: Arc<Registries>, metrics: Metrics) -> Self {
        Checks {
            config,
            registries,
            metrics,
            presence: Memo::new(),
            digests: Memo::new(),
            circuits: Mutex::new(Circuits::default()),
            cadence: Cadence::default(),
            records: Mutex::new(None),
        }
    }

    /// Whether the mirror has `target`: from the cache, the lookup in flight, or a new check.
    pub(super) fn presence<'a>(
        self: &'a Arc<Self>,
        target: &'a Reference,
    ) -> Pin<Box<dyn Future<Output = Presence> + Send + 'a>> {
        let owned = target.clone();
        self.memoized(
            &self.presence,
            target.as_str(),
            target.registry(),
            Presence::Unknown,
            (Some(&self.metrics.check_cache), &self.metrics.checks),
            move |checks| checks.check(owned).boxed(),
        )
    }

    /// The digest `source`'s tag has upstream, remembered as checks are.
    pub(super) fn upstream_digest<'a>(
        self: &'a Arc<Self>,
        source: &'a Reference,
    ) -> Pin<Box<dyn Future<Output = Upstream> + Send + 'a>> {
        let owned = source.clone();
        self.memoized(
            &self.digests,
            source.as_str(),
            source.registry(),
            Upstream::Unknown,
            (None, &self.metrics.upstream_digests),
            move |checks| checks.resolve(owned).boxed(),
        )
    }

    pub(super) fn cached(&self, key: &str) -> Option<Presence> {
        self.presence
            .lookup(key)
            .filter(|(_, fresh)| *fresh)
            .map(|(p, _)| p)
    }

    pub(super) fn remember(&self, key: &str, presence: Presence) {
        self.presence.remember(key, presence, self.ttl(presence));
    }

    /// How long an answer is remembered: `presentTtl` for a found image (or digest),
    /// `absentTtl` for a missing one, `unknownTtl` for no answer.
    fn ttl(&self, presence: Presence) -> Duration {
        let checks = self.config.current().settings.checks;
        match presence {
            Presence::Present => checks.present_ttl,
            Presence::Absent => checks.absent_ttl,
            // Jittered, so that images which failed together are not all asked again at once.
            Presence::Unknown => checks
                .unknown_ttl
                .mul_f64(0.8 + 0.4 * rand::random::<f64>()),
        }
    }

    pub(super) fn set_records(&self, records: Arc<dyn ImageRecords>) {
        *lock(&self.records) = Some(records);
    }

    pub(super) fn records(&self) -> Option<Arc<dyn ImageRecords>> {
        lock(&self.records).clone()
    }

    /// One registry check, recorded in metrics, the cache, the registry's circuit and the
    /// image records; answered without the registry when another replica found the image
    /// within `presentTtl`.
    async fn check(self: Arc<Self>, target: Reference) -> Presence {
        let records = self.records();
        let ttl = self.config.current().settings.checks.present_ttl;
        let shared = records
            .as_ref()
            .is_some_and(|r| r.known_present(target.as_str(), ttl));
        let (label, presence) = if shared {
            ("shared", Presence::Present)
        } else {
            let (outcome, digest) = self.ask(&target, "mirror check").await;
            if let Some(r) = &records {
                r.checked(target.as_str(), outcome.presence(), digest.as_deref());
            }
            (outcome.label(), outcome.presence())
        };
        self.metrics
            .checks
            .get_or_create(&CheckLabels {
                registry: target.registry().to_string(),
                result: label,
            })
            .inc();
        self.remember(target.as_str(), presence);
        self.presence.landed(target.as_str());
        presence
    }

    /// One upstream digest lookup (a `HEAD`, which Docker Hub does not count), remembered as
    /// checks are.
    async fn resolve(self: Arc<Self>, source: Reference) -> Upstream {
        let (outcome, digest) = self.ask(&source, "upstream digest lookup").await;
        self.metrics
            .upstream_digests
            .get_or_create(&CheckLabels {
                registry: source.registry().to_string(),
                result: match outcome {
                    Outcome::Present => "resolved",
                    other => other.label(),
                },
            })
            .inc();
        let answer = match (outcome, digest) {
            (Outcome::Present, Some(d)) => Upstream::Digest(d),
            (Outcome::Absent, _) => Upstream::Absent,
            _ => Upstream::Unknown,
        };
        let ttl = self.ttl(outcome.presence());
        self.digests.remember(source.as_str(), answer.clone(), ttl);
        self.digests.landed(source.as_str());
        answer
    }

    /// A `HEAD` of `reference`'s manifest within the check timeout, recorded in the check
    /// latency and the registry's circuit; the digest when it was found.
    async fn ask(&self, target: &Reference, what: &str) -> (Outcome, Option<String>) {
        let checks = self.config.current().settings.checks;
        let started = Instant::now();
        let answer =
            tokio::time::timeout(checks.timeout, self.registries.manifest_digest(target)).await;
        let outcome = match &answer {
            Ok(Ok(_)) => Outcome::Present,
            Ok(Err(e)) => match e.failure() {
                Some(Failure::NotFound) => Outcome::Absent,
                Some(Failure::Denied) => {
                    self.warn_unauthorized(target, e);
                    Outcome::Unauthorized
                }
                _ => {
                    tracing::warn!(target = %target, error = %Report(e), "{what} failed; image kept");
                    Outcome::Error
                }
            },
            Err(_) => {
                tracing::warn!(target = %target, timeout_ms = checks.timeout.as_millis() as u64,
                    "{what} timed out; image kept");
                Outcome::Timeout
            }
        };
        let registry = target.registry();
        self.metrics
            .check_duration
            .observe(started.elapsed().as_secs_f64());
        let transition = lock(&self.circuits).record(
            registry,
            outcome.is_trouble(),
            circuit_settings(&checks),
            Instant::now(),
        );
        self.circuit_moved(registry, transition);
        (outcome, answer.ok().and_then(Result::ok))
    }

    /// Says once per registry per period what to configure when checks are refused.
    fn warn_unauthorized(&self, target: &Reference, e: &RegistryError) {
        let registry = target.registry();
        if !self.cadence.due(registry) {
            tracing::debug!(target = %target, error = %Report(e), "mirror check unauthorized");
            return;
        }
        let settings = self.config.current().settings.clone();
        let fix = match settings.access(registry) {
            None => format!(
                "add a `registries` entry for {registry} to the table, with usernameEnv and \
                 passwordEnv or a dockerConfig file"
            ),
            Some(a) if a.docker_config.is_some() => format!(
                "check the credentials for {registry} in {} (the mounted mirror credentials \
                 Secret; when it is absent, checks are anonymous)",
                a.docker_config.as_deref().unwrap_or_default()
            ),
            Some(a) if a.username_env.is_some() => format!(
                "check the credentials in the environment variables {} and {} (the optional \
                 registry credentials Secret)",
                a.username_env.as_deref().unwrap_or_default(),
                a.password_env.as_deref().unwrap_or_default()
            ),
            Some(_) => "its `registries` entry has no credentials: add usernameEnv and \
                        passwordEnv or a dockerConfig file"
                .to_string(),
        };
        tracing::warn!(registry, target = %target, error = %Report(e),
            "mirror checks are unauthorized (401/403), so images stay where they are: {fix}; \
             repeated at most every 10 minutes");
    }

    fn circuit_moved(&self, registry: &str, transition: Option<Transition>) {
        let Some(transition) = transition else {
            return;
        };
        self.metrics
            .circuit_transitions
            .get_or_create(&TransitionLabels {
                registry: registry.to_string(),
                state: transition.label(),
            })
            .inc();
        let open = lock(&self.circuits).is_open(registry);
        self.metrics
            .circuit_open
            .get_or_create(&RegistryLabels {
                registry: registry.to_string(),
            })
            .set(i64::from(open));
        match transition {
            Transition::Opened { for_ } => tracing::warn!(
                registry,
                open_for_ms = for_.as_millis() as u64,
                "registry circuit open: checks answered unknown without asking it"
            ),
            Transition::HalfOpened => {
                tracing::info!(registry, "registry circuit half-open: one probe")
            }
            Transition::Closed => {
                tracing::info!(registry, "registry circuit closed: checks resume")
            }
        }
    }

    /// The memoised answer for `key`, else the one in flight, else a new lookup (`start`),
    /// spawned so that it fills the memo even when nobody waits for it. A stale *unknown* is
    /// given again at once while the registry is asked afresh in the background, so that a
    /// registry in trouble never holds a review twice; an open circuit answers *unknown*
    /// without asking.
    fn memoized<'a, T>(
        self: &Arc<Self>,
        memo: &Memo<T>,
        key: &str,
        registry: &str,
        unknown: T,
        // The cache metric, when this memo has one, and the family counting short circuits.
        counts: (
            Option<&Family<ResultLabels, Counter>>,
            &Family<CheckLabels, Counter>,
        ),
        start: impl FnOnce(Arc<Checks>) -> BoxFuture<'static, T>,
    ) -> Pin<Box<dyn Future<Output = T> + Send + 'a>>
    where
        T: Clone + PartialEq + Send + Sync + 'static,
    {
        let (cache, family) = counts;
        let count = |result: &'static str| {
            if let Some(cache) = cache {
                cache.get_or_create(&ResultLabels { result }).inc();
            }
        };
        let known = memo.lookup(key);
        if let Some((v, true)) = known {
            count("hit");
            return Box::pin(std::future::ready(v));
        }
        let stale_unknown = known.is_some_and(|(v, _)| v == unknown);
        count(if stale_unknown { "stale" } else { "miss" });
        let answer = |shared: SharedLookup<T>| -> Pin<Box<dyn Future<Output = T> + Send + 'a>> {
            if stale_unknown {
                Box::pin(std::future::ready(unknown.clone()))
            } else {
                Box::pin(shared)
            }
        };
        let mut inflight = lock(&memo.inflight);
        if let Some(shared) = inflight.get(key) {
            return answer(shared.clone());
        }
        let (admit, transition) = lock(&self.circuits).admit(registry, Instant::now());
        self.circuit_moved(registry, transition);
        if admit == Admit::ShortCircuit {
            drop(inflight);
            family
                .get_or_create(&CheckLabels {
                    registry: registry.to_string(),
                    result: "circuit-open",
                })
                .inc();
            return Box::pin(std::future::ready(unknown));
        }
        let task = tokio::spawn(start(self.clone()));
        let fallback = unknown.clone();
        let shared = task.map(move |r| r.unwrap_or(fallback)).boxed().shared();
        inflight.insert(key.to_string(), shared.clone());
        answer(shared)
    }
}
