//! The [`MirrorAccess`] the admission path uses: cached, single-flight mirror checks for the
//! `if-present` policy, and the background copy queue.
//!
//! Checks are cached (present for minutes, absent and unknown for seconds), shared between
//! concurrent requests for one image, bounded by the check timeout, and go through a circuit
//! breaker per registry ([`super::circuit`]), so that a registry in trouble costs admission
//! nothing once it has failed. Copies run in a bounded,
//! de-duplicated queue with back-off; a finished copy marks its target present, so the next Pod
//! is rewritten. Every setting is read from the configuration in force, so a reload applies
//! them all: TTLs and timeouts at the next check, `queueSize` at the next copy queued,
//! `concurrency` as soon as running copies allow, registry access at a client's next use.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::circuit::{Admit, CircuitSettings, Circuits, Transition};
use super::run::MirrorError;
use super::{
    CopyEnd, CopyEnds, CopyMode, CopyRequest, CopyRunner, MirrorAccess, Presence, Submitted,
    Upstream,
};
use crate::config::ConfigHandle;
use crate::error::Report;
use crate::locks::lock;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::metrics::{CheckLabels, Metrics, RegistryLabels, ResultLabels, TransitionLabels};
use crate::reference::Reference;
use crate::registry::{backoff, Failure, Registries, RegistryError};
use crate::settings::{CheckSettings, Runner};

/// How long a copy handed to a Job is not asked for again (then its Job is looked up, which
/// starts a new one if it is gone).
const HANDED_RECHECK: Duration = Duration::from_secs(60);
/// How often a paused registry's pull budget is read again, at most.
const BUDGET_RECHECK: Duration = Duration::from_secs(60);

/// How often a warning about lasting trouble is repeated (a registry's refused checks, Jobs
/// asked for without a Kubernetes API); DEBUG in between.
const WARNING_EVERY: Duration = Duration::from_secs(600);

type Shared_<T> = Shared<BoxFuture<'static, T>>;

/// Answers remembered until a deadline, and the lookups in flight, by key: mirror presence by
/// target, upstream digests by source.
struct Memo<T> {
    answers: Mutex<HashMap<String, (T, Instant)>>,
    inflight: Mutex<HashMap<String, Shared_<T>>>,
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

/// Checks and copies against the mirrors of the configuration in force.
pub struct MirrorService {
    inner: Arc<Inner>,
}

struct Inner {
    config: ConfigHandle,
    registries: Arc<Registries>,
    metrics: Metrics,
    /// Target → whether the mirror has it.
    checks: Memo<Presence>,
    /// Source → the digest its tag has upstream (`pin: digest`).
    digests: Memo<Upstream>,
    /// (source, target) of every copy queued, waiting to be retried or running.
    pending: Mutex<HashSet<(String, String)>>,
    queue: Mutex<VecDeque<Job>>,
    queued: Arc<Notify>,
    /// One permit per copy that may run; resized when `copies.concurrency` changes.
    slots: Arc<Semaphore>,
    concurrency: Mutex<usize>,
    circuits: Mutex<Circuits>,
    /// When each lasting-trouble warning was last logged, by registry (or by what it is about).
    warned: Mutex<HashMap<String, Instant>>,
    /// Registries whose copies wait for their pull budget (`rateLimitReserve`), until when.
    paused: Mutex<HashMap<String, Instant>>,
    /// Copies handed to a Job runner: when, and whether this replica started the Job. The Job's
    /// name de-duplicates them, so they leave `pending` at once; this keeps a new Pod from asking
    /// again for a while, and tells whose end to count.
    handed: Mutex<HashMap<(String, String), Handed>>,
    /// Where copies go with `copies.runner: job` (set once the Kubernetes API is there).
    runner: Mutex<Option<Arc<dyn CopyRunner>>>,
}

/// A copy a Job runs (see `Inner::handed`).
#[derive(Debug)]
struct Handed {
    at: Instant,
    started: bool,
    /// The copy slot a Job this replica started holds until it ends, so that
    /// `copies.concurrency` caps running Jobs as it caps copies in the webhook.
    slot: Option<OwnedSemaphorePermit>,
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

struct Job {
    copy: CopyRequest,
    attempt: u32,
}

impl MirrorService {
    /// Starts the copy workers on the current Tokio runtime, and follows configuration reloads.
    pub fn start(config: ConfigHandle, registries: Arc<Registries>, metrics: Metrics) -> Self {
        let concurrency = config.current().settings.copies.concurrency;
        init_registry_series(&metrics, &config.current());
        // Subscribed now, so that no reload between here and the task's start is missed.
        let changes = config.subscribe();
        let inner = Arc::new(Inner {
            config,
            registries,
            metrics,
            checks: Memo::new(),
            digests: Memo::new(),
            pending: Mutex::new(HashSet::new()),
            queue: Mutex::new(VecDeque::new()),
            queued: Arc::new(Notify::new()),
            slots: Arc::new(Semaphore::new(concurrency)),
            concurrency: Mutex::new(concurrency),
            circuits: Mutex::new(Circuits::default()),
            warned: Mutex::new(HashMap::new()),
            paused: Mutex::new(HashMap::new()),
            handed: Mutex::new(HashMap::new()),
            runner: Mutex::new(None),
        });
        tokio::spawn(workers(Arc::downgrade(&inner)));
        tokio::spawn(follow_reloads(Arc::downgrade(&inner), changes));
        MirrorService { inner }
    }

    /// Copies queued, waiting for a retry or running.
    pub fn pending_copies(&self) -> usize {
        lock(&self.inner.pending).len()
    }

    /// What the cache holds for `target`, if it has not expired.
    pub fn cached(&self, target: &Reference) -> Option<Presence> {
        self.inner.cached(target.as_str())
    }

    /// Hands copies to `runner` while `copies.runner` is `job`.
    pub fn use_runner(&self, runner: Arc<dyn CopyRunner>) {
        *lock(&self.inner.runner) = Some(runner);
    }

    /// What a runner tells of the copies it ran (held weakly: it does not keep the service).
    pub fn ends(&self) -> Arc<dyn CopyEnds> {
        Arc::new(Ends(Arc::downgrade(&self.inner)))
    }
}

struct Ends(Weak<Inner>);

impl CopyEnds for Ends {
    fn ended(&self, source: &str, target: &str, end: CopyEnd) {
        let Some(inner) = self.0.upgrade() else {
            return;
        };
        // Every replica sees every Job; only the one that started it counts its end.
        let ours = lock(&inner.handed)
            .remove(&(source.to_string(), target.to_string()))
            .is_some_and(|h| h.started);
        tracing::debug!(source, target, ?end, "copy Job finished");
        match end {
            CopyEnd::Succeeded => {
                inner.remember(target, Presence::Present);
                if ours {
                    inner.count_copy("success");
                    tracing::info!(source, target, "image copied by a Job");
                }
            }
            CopyEnd::Failed if ours => {
                inner.count_copy("given_up");
                tracing::error!(
                    source,
                    target,
                    "copy Job failed (every try); giving up until a Pod needs it again"
                );
            }
            CopyEnd::Vanished if ours => {
                tracing::warn!(source, target, "copy Job deleted before it finished");
            }
            _ => {}
        }
    }
}

/// The per-registry series of the table's mirrors and of the registries it has settings for.
fn init_registry_series(metrics: &Metrics, config: &crate::config::Config) {
    let mirrors = config.table.mirrors().iter().map(|m| m.registry.as_str());
    let configured = config.settings.registries().keys().map(String::as_str);
    metrics.init_registries(mirrors.chain(configured));
}

/// Hands every reloaded configuration's settings to the registries and the copy slots.
async fn follow_reloads(inner: Weak<Inner>, mut changes: tokio::sync::watch::Receiver<u64>) {
    while changes.changed().await.is_ok() {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let config = inner.config.current();
        init_registry_series(&inner.metrics, &config);
        let settings = config.settings.clone();
        inner.registries.apply(settings.clone());
        inner.resize(settings.copies.concurrency);
    }
}

impl Inner {
    fn resize(&self, wanted: usize) {
        let mut current = lock(&self.concurrency);
        if wanted > *current {
            self.slots.add_permits(wanted - *current);
        } else if wanted < *current {
            // Permits held by running copies come back first; take them out as they do.
            let surplus = (*current - wanted) as u32;
            let slots = self.slots.clone();
            tokio::spawn(async move {
                if let Ok(p) = slots.acquire_many_owned(surplus).await {
                    p.forget();
                }
            });
        }
        *current = wanted;
    }

    fn cached(&self, key: &str) -> Option<Presence> {
        self.checks
            .lookup(key)
            .filter(|(_, fresh)| *fresh)
            .map(|(p, _)| p)
    }

    fn remember(&self, key: &str, presence: Presence) {
        self.checks.remember(key, presence, self.ttl(presence));
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

    /// One registry check, recorded in metrics, the cache and the registry's circuit.
    async fn check(self: Arc<Self>, target: Reference) -> Presence {
        let (outcome, _) = self.ask(&target, "mirror check").await;
        self.metrics
            .checks
            .get_or_create(&CheckLabels {
                registry: target.registry().to_string(),
                result: outcome.label(),
            })
            .inc();
        let presence = outcome.presence();
        self.remember(target.as_str(), presence);
        self.checks.landed(target.as_str());
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

    /// Whether the warning about `key` is due: once per [`WARNING_EVERY`], DEBUG in between.
    fn warning_due(&self, key: &str) -> bool {
        let now = Instant::now();
        let mut warned = lock(&self.warned);
        let due = warned
            .get(key)
            .is_none_or(|last| now.duration_since(*last) >= WARNING_EVERY);
        if due {
            warned.insert(key.to_string(), now);
        }
        due
    }

    /// Says once per registry per period what to configure when checks are refused.
    fn warn_unauthorized(&self, target: &Reference, e: &RegistryError) {
        let registry = target.registry();
        if !self.warning_due(registry) {
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

    fn enqueue(&self, job: Job) {
        let limit = self.config.current().settings.copies.queue_size;
        let mut queue = lock(&self.queue);
        if queue.len() >= limit {
            drop(queue);
            self.count_copy("dropped");
            tracing::warn!(source = %job.copy.source, target = %job.copy.target,
                "copy queue full; copy dropped (the next Pod that needs it asks again)");
            lock(&self.pending).remove(&key_of(&job.copy));
            return;
        }
        queue.push_back(job);
        drop(queue);
        self.metrics.copy_queue_depth.inc();
        self.queued.notify_one();
    }

    fn count_copy(&self, result: &'static str) {
        self.metrics
            .copies
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// How long a copy from `copy.source`'s registry must wait for its pull budget: `None` to
    /// go now. The budget is read (and its gauges set) before every copy; with a
    /// `rateLimitReserve`, copies pause while the remaining pulls are at most the reserve, and
    /// the budget is read again every minute (or window, when shorter).
    async fn budget_wait(&self, copy: &CopyRequest) -> Option<Duration> {
        let registry = copy.source.canonical().registry().to_string();
        let now = Instant::now();
        if let Some(until) = lock(&self.paused).get(&registry).copied() {
            if until > now {
                return Some(until - now);
            }
        }
        let reserve = self
            .config
            .current()
            .settings
            .access(&registry)
            .and_then(|a| a.rate_limit_reserve);
        let seen = self.registries.rate_limit(&copy.source).await;
        let labels = RegistryLabels {
            registry: registry.clone(),
        };
        match (reserve, seen) {
            (Some(reserve), Some(seen)) if seen.remaining <= u64::from(reserve) => {
                let wait = seen
                    .window
                    .unwrap_or(BUDGET_RECHECK)
                    .clamp(Duration::from_secs(1), BUDGET_RECHECK);
                let first = lock(&self.paused)
                    .insert(registry.clone(), Instant::now() + wait)
                    .is_none();
                if first {
                    self.metrics.copies_paused.get_or_create(&labels).set(1);
                    tracing::warn!(
                        registry,
                        remaining = seen.remaining,
                        reserve,
                        "copies paused: the registry's pull budget is down to its reserve, \
                         which is left to the nodes"
                    );
                }
                Some(wait)
            }
            _ => {
                if lock(&self.paused).remove(&registry).is_some() {
                    self.metrics.copies_paused.get_or_create(&labels).set(0);
                    tracing::info!(
                        registry,
                        remaining = seen.map(|s| s.remaining),
                        "copies resumed: the registry's pull budget is above its reserve"
                    );
                }
                None
            }
        }
    }

    /// Gives a copy to the Job runner; `false` when it could not, so it runs here instead
    /// (a copy is never lost to trouble with Kubernetes). A Job started here takes `slot`
    /// with it until it ends.
    async fn hand_over(
        &self,
        copy: &CopyRequest,
        settings: &crate::settings::Settings,
        slot: &mut Option<OwnedSemaphorePermit>,
    ) -> bool {
        let Some(runner) = lock(&self.runner).clone() else {
            // Not a registry name: a host cannot be spelt with a space.
            if self.warning_due("copies runner") {
                tracing::warn!(
                    "copies.runner is job, but there is no Kubernetes API; copying in-process"
                );
            }
            return false;
        };
        let submitted = match runner.submit(copy, settings).await {
            Ok(submitted) => submitted,
            Err(e) => {
                tracing::warn!(source = %copy.source, target = %copy.target, error = %Report(&*e),
                    "could not start a copy Job; copying in-process");
                return false;
            }
        };
        let key = key_of(copy);
        lock(&self.pending).remove(&key);
        let (source, target) = (&copy.source, &copy.target);
        match submitted {
            Submitted::Succeeded => {
                lock(&self.handed).remove(&key);
                self.remember(target.as_str(), Presence::Present);
                return true;
            }
            Submitted::Started => {
                self.count_copy("job");
                tracing::info!(%source, %target, "copy handed to a Job");
            }
            Submitted::Running => {
                tracing::debug!(%source, %target, "copy already running in a Job");
            }
            Submitted::Failed => {
                tracing::warn!(%source, %target,
                    "the copy Job of this image failed; a new one starts once it expires \
                     (copies.jobTtl; kubectl logs shows why it failed)");
            }
        }
        let now = Instant::now();
        let started = submitted == Submitted::Started;
        let slot = if started { slot.take() } else { None };
        let mut handed = lock(&self.handed);
        let entry = handed.entry(key).or_insert(Handed {
            at: now,
            started: false,
            slot: None,
        });
        entry.at = now;
        entry.started |= started;
        if slot.is_some() {
            entry.slot = slot;
        } else if submitted == Submitted::Failed {
            // It ended while nobody watched: its slot is free again.
            entry.slot = None;
        }
        true
    }

    /// Runs one copy in its slot (`slot` is given back when it ends, or kept by its Job).
    async fn run(self: Arc<Self>, job: Job, slot: OwnedSemaphorePermit) {
        let mut slot = Some(slot);
        // A warm-up spends the pull-through cache's budget, not ours.
        if job.copy.mode == CopyMode::Copy {
            if let Some(wait) = self.budget_wait(&job.copy).await {
                // Waiting for the budget is no failed attempt.
                let weak = Arc::downgrade(&self);
                drop(self);
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    if let Some(inner) = weak.upgrade() {
                        inner.enqueue(job);
                    }
                });
                return;
            }
        }
        let settings = &self.config.current().settings;
        if settings.copies.runner == Runner::Job
            && job.copy.mode == CopyMode::Copy
            && self.hand_over(&job.copy, settings, &mut slot).await
        {
            return;
        }
        let started = Instant::now();
        let copy = &job.copy;
        let outcome = copy.run(&self.registries, None).await;
        self.metrics
            .copy_duration
            .observe(started.elapsed().as_secs_f64());
        let error: MirrorError = match outcome {
            Ok(report) => {
                self.count_copy("success");
                self.metrics.copied_bytes.inc_by(report.bytes);
                self.remember(copy.target.as_str(), Presence::Present);
                lock(&self.pending).remove(&key_of(copy));
                tracing::info!(source = %copy.source, target = %copy.target,
                    digest = report.digest, manifests = report.manifests_copied,
                    blobs_copied = report.blobs_copied, blobs_skipped = report.blobs_skipped,
                    bytes = report.bytes, duration_ms = started.elapsed().as_millis() as u64,
                    tag_left_alone = report.tag_left.as_ref().map(|t| t.why.as_str()),
                    "image copied");
                return;
            }
            Err(e) => e,
        };
        self.count_copy("failure");
        let settings = self.config.current().settings.copies;
        if job.attempt >= settings.max_attempts {
            self.count_copy("given_up");
            lock(&self.pending).remove(&key_of(copy));
            tracing::error!(source = %copy.source, target = %copy.target, attempts = job.attempt,
                error = %Report(&error), "copy failed; giving up until a Pod needs it again");
            return;
        }
        let wait = backoff(
            settings.retry_backoff,
            settings.retry_backoff * 64,
            job.attempt,
        )
        .max(error.retry_after().unwrap_or_default());
        tracing::warn!(source = %copy.source, target = %copy.target, attempt = job.attempt,
            retry_in_ms = wait.as_millis() as u64, error = %Report(&error),
            "copy failed; will retry");
        let weak = Arc::downgrade(&self);
        let next = Job {
            copy: job.copy,
            attempt: job.attempt + 1,
        };
        drop(self);
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            if let Some(inner) = weak.upgrade() {
                inner.enqueue(next);
            }
        });
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Lets the worker loop see that the service is gone.
        self.queued.notify_one();
    }
}

fn key_of(copy: &CopyRequest) -> (String, String) {
    (copy.source.to_string(), copy.target.to_string())
}

/// Takes jobs off the queue and runs as many at once as there are slots; ends with the service.
async fn workers(inner: Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let job = lock(&strong.queue).pop_front();
        let Some(job) = job else {
            // Wait without keeping the service alive; dropping it wakes us to end.
            let queued = strong.queued.clone();
            drop(strong);
            queued.notified().await;
            continue;
        };
        let slots = strong.slots.clone();
        drop(strong);
        let Ok(permit) = slots.acquire_owned().await else {
            return;
        };
        let Some(strong) = inner.upgrade() else {
            return;
        };
        strong.metrics.copy_queue_depth.dec();
        tokio::spawn(strong.run(job, permit));
    }
}

impl Inner {
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
        start: impl FnOnce(Arc<Inner>) -> BoxFuture<'static, T>,
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
        let answer = |shared: Shared_<T>| -> Pin<Box<dyn Future<Output = T> + Send + 'a>> {
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

impl MirrorAccess for MirrorService {
    fn presence<'a>(
        &'a self,
        target: &'a Reference,
    ) -> Pin<Box<dyn Future<Output = Presence> + Send + 'a>> {
        let inner = &self.inner;
        let owned = target.clone();
        inner.memoized(
            &inner.checks,
            target.as_str(),
            target.registry(),
            Presence::Unknown,
            (Some(&inner.metrics.check_cache), &inner.metrics.checks),
            move |inner| inner.check(owned).boxed(),
        )
    }

    fn upstream_digest<'a>(
        &'a self,
        source: &'a Reference,
    ) -> Pin<Box<dyn Future<Output = Upstream> + Send + 'a>> {
        let inner = &self.inner;
        let owned = source.clone();
        inner.memoized(
            &inner.digests,
            source.as_str(),
            source.registry(),
            Upstream::Unknown,
            (None, &inner.metrics.upstream_digests),
            move |inner| inner.resolve(owned).boxed(),
        )
    }

    fn request_copy(&self, copy: CopyRequest) -> bool {
        let inner = &self.inner;
        let key = key_of(&copy);
        // A copy a Job runs is asked about again only now and then (a lost Job is noticed).
        if lock(&inner.handed)
            .get(&key)
            .is_some_and(|h| h.at.elapsed() < HANDED_RECHECK)
        {
            return false;
        }
        if !lock(&inner.pending).insert(key) {
            return false;
        }
        inner.enqueue(Job { copy, attempt: 1 });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::registry::RegistryOptions;
    use std::time::Duration;

    fn config(copies: &str) -> Config {
        Config::parse("t.yaml", &format!("copies: {copies}\n")).unwrap()
    }

    fn copy_to(n: usize) -> CopyRequest {
        let r = |s: String| Reference::parse(&s).unwrap();
        CopyRequest {
            source: r(format!("127.0.0.1:1/src/app{n}:1")),
            target: r(format!("127.0.0.1:1/dst/app{n}:1")),
            platforms: Vec::new(),
            referrers: true,
            mode: CopyMode::Copy,
        }
    }

    #[tokio::test]
    async fn a_reload_applies_every_copy_setting_and_the_registry_access() {
        let first = config("{concurrency: 4, queueSize: 256}");
        let handle = ConfigHandle::new(first.clone());
        let (metrics, _registry) = Metrics::new();
        let registries = Arc::new(Registries::new(
            first.settings.clone(),
            RegistryOptions::default(),
            None,
        ));
        let service = MirrorService::start(handle.clone(), registries.clone(), metrics.clone());
        assert_eq!(service.inner.slots.available_permits(), 4);

        let next = Config::parse(
            "t.yaml",
            "copies: {concurrency: 1, queueSize: 2}\nregistries:\n  quay.io: {insecure: true}\n",
        )
        .unwrap();
        handle.replace(next);
        let deadline = Instant::now() + Duration::from_secs(5);
        while service.inner.slots.available_permits() != 1 {
            assert!(Instant::now() < deadline, "concurrency not applied");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(registries
            .settings()
            .access("quay.io")
            .is_some_and(|a| a.insecure));

        // Hold the one slot: copies wait in the queue, which now holds two.
        let held = service.inner.slots.clone().acquire_owned().await.unwrap();
        for n in 0..3 {
            service.request_copy(copy_to(n));
        }
        let dropped = metrics
            .copies
            .get_or_create(&ResultLabels { result: "dropped" })
            .get();
        assert_eq!(dropped, 1);
        assert_eq!(service.pending_copies(), 2);
        drop(held);
    }
}
