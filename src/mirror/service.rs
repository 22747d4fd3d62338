//! The [`MirrorAccess`] the admission path uses: cached, single-flight mirror checks for the
//! `if-present` policy, and the background copy queue.
//!
//! Checks are cached (present for minutes, absent for seconds), shared between concurrent
//! requests for one image and bounded by the check timeout. Copies run in a bounded,
//! de-duplicated queue with back-off; a finished copy marks its target present, so the next Pod
//! is rewritten. Every setting is read from the configuration in force, so a reload applies
//! them all: TTLs and timeouts at the next check, `queueSize` at the next copy queued,
//! `concurrency` as soon as running copies allow, registry access at a client's next use.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::{Notify, Semaphore};

use super::{CopyMode, CopyRequest, MirrorAccess, MirrorError, Presence};
use crate::config::ConfigHandle;
use crate::error::Report;
use crate::metrics::{CheckLabels, Metrics, ResultLabels};
use crate::reference::Reference;
use crate::registry::{backoff, Failure, Registries};

type SharedCheck = Shared<BoxFuture<'static, Presence>>;

/// Checks and copies against the mirrors of the configuration in force.
pub struct MirrorService {
    inner: Arc<Inner>,
}

struct Inner {
    config: ConfigHandle,
    registries: Arc<Registries>,
    metrics: Metrics,
    /// Target → what we know and until when.
    cache: Mutex<HashMap<String, (Presence, Instant)>>,
    inflight: Mutex<HashMap<String, SharedCheck>>,
    /// (source, target) of every copy queued, waiting to be retried or running.
    pending: Mutex<HashSet<(String, String)>>,
    queue: Mutex<VecDeque<Job>>,
    queued: Arc<Notify>,
    /// One permit per copy that may run; resized when `copies.concurrency` changes.
    slots: Arc<Semaphore>,
    concurrency: Mutex<usize>,
}

struct Job {
    copy: CopyRequest,
    attempt: u32,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these maps leaves it usable: every entry is whole.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MirrorService {
    /// Starts the copy workers on the current Tokio runtime, and follows configuration reloads.
    pub fn start(config: ConfigHandle, registries: Arc<Registries>, metrics: Metrics) -> Self {
        let concurrency = config.current().settings.copies.concurrency;
        // Subscribed now, so that no reload between here and the task's start is missed.
        let changes = config.subscribe();
        let inner = Arc::new(Inner {
            config,
            registries,
            metrics,
            cache: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashSet::new()),
            queue: Mutex::new(VecDeque::new()),
            queued: Arc::new(Notify::new()),
            slots: Arc::new(Semaphore::new(concurrency)),
            concurrency: Mutex::new(concurrency),
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
}

/// Hands every reloaded configuration's settings to the registries and the copy slots.
async fn follow_reloads(inner: Weak<Inner>, mut changes: tokio::sync::watch::Receiver<u64>) {
    while changes.changed().await.is_ok() {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let settings = inner.config.current().settings.clone();
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
        lock(&self.cache)
            .get(key)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(p, _)| *p)
    }

    fn remember(&self, key: &str, presence: Presence) {
        let checks = self.config.current().settings.checks;
        let ttl = match presence {
            Presence::Present => checks.present_ttl,
            Presence::Absent => checks.absent_ttl,
            Presence::Unknown => return,
        };
        let mut cache = lock(&self.cache);
        // Drop expired entries now and then, so the map does not grow with every image ever seen.
        if cache.len() > 10_000 {
            let now = Instant::now();
            cache.retain(|_, (_, until)| *until > now);
        }
        cache.insert(key.to_string(), (presence, Instant::now() + ttl));
    }

    /// One registry check, recorded in metrics and the cache.
    async fn check(self: Arc<Self>, target: Reference) -> Presence {
        let timeout = self.config.current().settings.checks.timeout;
        let started = Instant::now();
        let answer = tokio::time::timeout(timeout, self.registries.manifest_digest(&target)).await;
        let (presence, result) = match &answer {
            Ok(Ok(_)) => (Presence::Present, "present"),
            Ok(Err(e)) if e.failure() == Some(Failure::NotFound) => (Presence::Absent, "absent"),
            Ok(Err(e)) => {
                tracing::warn!(target = %target, error = %Report(e), "mirror check failed; image kept");
                (Presence::Unknown, "error")
            }
            Err(_) => {
                tracing::warn!(target = %target, timeout_ms = timeout.as_millis() as u64,
                    "mirror check timed out; image kept");
                (Presence::Unknown, "timeout")
            }
        };
        self.metrics
            .check_duration
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .checks
            .get_or_create(&CheckLabels {
                registry: target.registry().to_string(),
                result,
            })
            .inc();
        self.remember(target.as_str(), presence);
        lock(&self.inflight).remove(target.as_str());
        presence
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

    async fn run(self: Arc<Self>, job: Job) {
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
        tokio::spawn(async move {
            strong.run(job).await;
            drop(permit);
        });
    }
}

impl MirrorAccess for MirrorService {
    fn presence<'a>(
        &'a self,
        target: &'a Reference,
    ) -> Pin<Box<dyn Future<Output = Presence> + Send + 'a>> {
        let inner = &self.inner;
        if let Some(p) = inner.cached(target.as_str()) {
            inner
                .metrics
                .check_cache
                .get_or_create(&ResultLabels { result: "hit" })
                .inc();
            return Box::pin(std::future::ready(p));
        }
        inner
            .metrics
            .check_cache
            .get_or_create(&ResultLabels { result: "miss" })
            .inc();
        let shared = {
            let mut inflight = lock(&inner.inflight);
            inflight
                .entry(target.as_str().to_string())
                .or_insert_with(|| {
                    // Spawned, so the check finishes and fills the cache even when the review
                    // that asked has stopped waiting.
                    let task = tokio::spawn(inner.clone().check(target.clone()));
                    task.map(|r| r.unwrap_or(Presence::Unknown))
                        .boxed()
                        .shared()
                })
                .clone()
        };
        Box::pin(shared)
    }

    fn request_copy(&self, copy: CopyRequest) {
        let inner = &self.inner;
        if !lock(&inner.pending).insert(key_of(&copy)) {
            return;
        }
        tracing::info!(source = %copy.source, target = %copy.target,
            warm_up = copy.mode == CopyMode::WarmUp, "copy queued");
        inner.enqueue(Job { copy, attempt: 1 });
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
