//! The background copy queue: de-duplicated per (source, target), bounded (`queueSize`),
//! `concurrency` copies at once (Jobs included: a copy handed to a Job keeps its slot until the
//! Job ends), retries with back-off, copies paused while a registry's pull budget is down to its
//! reserve. A finished copy marks its target present, so the next Pod is rewritten.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::cadence::Cadence;
use super::checks::Checks;
use super::run::MirrorError;
use super::{
    CopyEnd, CopyEnds, CopyMode, CopyOutcome, CopyRequest, CopyRunner, Presence, Submitted,
};
use crate::config::ConfigHandle;
use crate::error::Report;
use crate::locks::lock;
use crate::metrics::{Metrics, RegistryLabels, ResultLabels};
use crate::registry::{backoff, Registries};
use crate::settings::Runner;

/// How long a copy handed to a Job is not asked for again (then its Job is looked up, which
/// starts a new one if it is gone).
const HANDED_RECHECK: Duration = Duration::from_secs(60);
/// How often a paused registry's pull budget is read again, at most.
const BUDGET_RECHECK: Duration = Duration::from_secs(60);

/// The copies waiting, running and handed to Jobs.
pub struct CopyQueue {
    config: ConfigHandle,
    registries: Arc<Registries>,
    metrics: Metrics,
    /// Where a finished copy marks its target present.
    checks: Arc<Checks>,
    /// (source, target) of every copy queued, waiting to be retried or running.
    pending: Mutex<HashSet<(String, String)>>,
    queue: Mutex<VecDeque<QueuedCopy>>,
    queued: Arc<Notify>,
    /// One permit per copy that may run; resized when `copies.concurrency` changes.
    pub(super) slots: Arc<Semaphore>,
    concurrency: Mutex<usize>,
    /// Registries whose copies wait for their pull budget (`rateLimitReserve`), until when.
    paused: Mutex<HashMap<String, Instant>>,
    /// Copies handed to a Job runner: when, and whether this replica started the Job. The Job's
    /// name de-duplicates them, so they leave `pending` at once; this keeps a new Pod from asking
    /// again for a while, and tells whose end to count.
    handed: Mutex<HashMap<(String, String), Handed>>,
    /// Where copies go with `copies.runner: job` (set once the Kubernetes API is there).
    pub(super) runner: Mutex<Option<Arc<dyn CopyRunner>>>,
    /// The runner-missing warning, once per period.
    cadence: Cadence,
}

/// A copy a Job runs (see `CopyQueue::handed`).
#[derive(Debug)]
struct Handed {
    at: Instant,
    started: bool,
    /// The copy slot a Job this replica started holds until it ends, so that
    /// `copies.concurrency` caps running Jobs as it caps copies in the webhook.
    slot: Option<OwnedSemaphorePermit>,
}

/// A copy in the queue, and which try it is.
struct QueuedCopy {
    copy: CopyRequest,
    attempt: u32,
}

impl CopyQueue {
    /// The queue, with its workers running on the current Tokio runtime.
    pub(super) fn start(
        config: ConfigHandle,
        registries: Arc<Registries>,
        metrics: Metrics,
        checks: Arc<Checks>,
    ) -> Arc<CopyQueue> {
        let concurrency = config.current().settings.copies.concurrency;
        let queue = Arc::new(CopyQueue {
            config,
            registries,
            metrics,
            checks,
            pending: Mutex::new(HashSet::new()),
            queue: Mutex::new(VecDeque::new()),
            queued: Arc::new(Notify::new()),
            slots: Arc::new(Semaphore::new(concurrency)),
            concurrency: Mutex::new(concurrency),
            paused: Mutex::new(HashMap::new()),
            handed: Mutex::new(HashMap::new()),
            runner: Mutex::new(None),
            cadence: Cadence::default(),
        });
        tokio::spawn(workers(Arc::downgrade(&queue)));
        queue
    }

    /// Copies queued, waiting for a retry or running.
    pub(super) fn pending(&self) -> usize {
        lock(&self.pending).len()
    }

    /// Queues `copy` unless it is queued, running or handed to a Job already; whether it was
    /// queued now.
    pub(super) fn request(&self, copy: CopyRequest) -> bool {
        let key = key_of(&copy);
        // A copy a Job runs is asked about again only now and then (a lost Job is noticed).
        if lock(&self.handed)
            .get(&key)
            .is_some_and(|h| h.at.elapsed() < HANDED_RECHECK)
        {
            return false;
        }
        if !lock(&self.pending).insert(key) {
            return false;
        }
        self.enqueue(QueuedCopy { copy, attempt: 1 });
        true
    }

    pub(super) fn resize(&self, wanted: usize) {
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

    fn enqueue(&self, job: QueuedCopy) {
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
            if self.cadence.due("copies runner") {
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
                self.checks.remember(target.as_str(), Presence::Present);
                return true;
            }
            Submitted::Started => {
                self.count_copy("job");
                if let Some(r) = self.checks.records() {
                    r.copy_started(source.as_str(), target.as_str(), "job");
                }
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
    async fn run(self: Arc<Self>, job: QueuedCopy, slot: OwnedSemaphorePermit) {
        let mut slot = Some(slot);
        // A warm-up spends the pull-through cache's budget, not ours.
        if job.copy.mode == CopyMode::Copy {
            if let Some(wait) = self.budget_wait(&job.copy).await {
                // Waiting for the budget is no failed attempt.
                let weak = Arc::downgrade(&self);
                drop(self);
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    if let Some(queue) = weak.upgrade() {
                        queue.enqueue(job);
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
        let copy = &job.copy;
        let records = self.checks.records();
        if let Some(r) = &records {
            // Another replica copies it now: its end makes the image present for all.
            if r.copied_elsewhere(copy.source.as_str(), copy.target.as_str()) {
                tracing::debug!(source = %copy.source, target = %copy.target,
                    "copy left to the replica that holds it");
                lock(&self.pending).remove(&key_of(copy));
                return;
            }
            r.copy_started(copy.source.as_str(), copy.target.as_str(), "in-process");
        }
        let started = Instant::now();
        let outcome = copy.run(&self.registries, None).await;
        let ended = |digest: Option<String>, error: Option<String>, gave_up: bool| {
            if let Some(r) = &records {
                r.copy_ended(
                    copy.source.as_str(),
                    copy.target.as_str(),
                    &CopyOutcome {
                        attempts: job.attempt,
                        runner: "in-process".into(),
                        warm_up: copy.mode == CopyMode::WarmUp,
                        digest,
                        error,
                        gave_up,
                    },
                );
            }
        };
        self.metrics
            .copy_duration
            .observe(started.elapsed().as_secs_f64());
        let error: MirrorError = match outcome {
            Ok(report) => {
                self.count_copy("success");
                self.metrics.copied_bytes.inc_by(report.bytes);
                self.checks
                    .remember(copy.target.as_str(), Presence::Present);
                lock(&self.pending).remove(&key_of(copy));
                ended(Some(report.digest.clone()), None, false);
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
        let gave_up = job.attempt >= settings.max_attempts;
        ended(None, Some(Report(&error).to_string()), gave_up);
        if gave_up {
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
        let next = QueuedCopy {
            copy: job.copy,
            attempt: job.attempt + 1,
        };
        drop(self);
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            if let Some(queue) = weak.upgrade() {
                queue.enqueue(next);
            }
        });
    }
}

impl Drop for CopyQueue {
    fn drop(&mut self) {
        // Lets the worker loop see that the service is gone.
        self.queued.notify_one();
    }
}

fn key_of(copy: &CopyRequest) -> (String, String) {
    (copy.source.to_string(), copy.target.to_string())
}

/// Takes jobs off the queue and runs as many at once as there are slots; ends with the service.
async fn workers(queue: Weak<CopyQueue>) {
    loop {
        let Some(strong) = queue.upgrade() else {
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
        let Some(strong) = queue.upgrade() else {
            return;
        };
        strong.metrics.copy_queue_depth.dec();
        tokio::spawn(strong.run(job, permit));
    }
}

/// What a copy Job's runner tells of its end.
pub(super) struct JobEnds(pub(super) Weak<CopyQueue>);

impl CopyEnds for JobEnds {
    fn ended(&self, source: &str, target: &str, end: CopyEnd) {
        let Some(queue) = self.0.upgrade() else {
            return;
        };
        // Every replica sees every Job; only the one that started it counts its end.
        let ours = lock(&queue.handed)
            .remove(&(source.to_string(), target.to_string()))
            .is_some_and(|h| h.started);
        tracing::debug!(source, target, ?end, "copy Job finished");
        if let (Some(r), true) = (queue.checks.records(), end != CopyEnd::Vanished) {
            let failed = end == CopyEnd::Failed;
            r.copy_ended(
                source,
                target,
                &CopyOutcome {
                    attempts: 1,
                    runner: "job".into(),
                    warm_up: false,
                    digest: None,
                    error: failed.then(|| "the copy Job failed (kubectl logs shows why)".into()),
                    gave_up: failed,
                },
            );
        }
        match end {
            CopyEnd::Succeeded => {
                queue.checks.remember(target, Presence::Present);
                if ours {
                    queue.count_copy("success");
                    tracing::info!(source, target, "image copied by a Job");
                }
            }
            CopyEnd::Failed if ours => {
                queue.count_copy("given_up");
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
