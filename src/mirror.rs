//! Mirror checks for the `if-present` policy and the background copy queue: the
//! [`MirrorAccess`] the admission path uses.
//!
//! Checks are cached (present for minutes, absent for seconds), shared between concurrent
//! requests for one image and bounded by the table's check timeout. Copies run in a bounded,
//! de-duplicated queue with back-off; a finished copy marks its target present, so the next Pod
//! is rewritten.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::{mpsc, Semaphore};

use crate::admission::{CopyRequest, MirrorAccess, Presence};
use crate::config::TableHandle;
use crate::metrics::{CheckLabels, Metrics, ResultLabels};
use crate::reference::Reference;
use crate::registry::{backoff, Failure, Registries, RegistryError};

type SharedCheck = Shared<BoxFuture<'static, Presence>>;

/// Checks and copies against the mirrors of the table in force.
pub struct MirrorService {
    inner: Arc<Inner>,
}

struct Inner {
    tables: TableHandle,
    registries: Arc<Registries>,
    metrics: Metrics,
    /// Target → what we know and until when.
    cache: Mutex<HashMap<String, (Presence, Instant)>>,
    inflight: Mutex<HashMap<String, SharedCheck>>,
    /// (source, target) of every copy queued, waiting to be retried or running.
    pending: Mutex<HashSet<(String, String)>>,
    queue: mpsc::Sender<Job>,
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
    /// Starts the copy workers on the current Tokio runtime.
    pub fn start(tables: TableHandle, registries: Arc<Registries>, metrics: Metrics) -> Self {
        let settings = tables.current().copies();
        let (tx, rx) = mpsc::channel(settings.queue_size);
        let inner = Arc::new(Inner {
            tables,
            registries,
            metrics,
            cache: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashSet::new()),
            queue: tx,
        });
        tokio::spawn(workers(
            Arc::downgrade(&inner),
            rx,
            Arc::new(Semaphore::new(settings.concurrency)),
        ));
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

impl Inner {
    fn cached(&self, key: &str) -> Option<Presence> {
        lock(&self.cache)
            .get(key)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(p, _)| *p)
    }

    fn remember(&self, key: &str, presence: Presence) {
        let checks = self.tables.current().checks();
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
        let table = self.tables.current();
        let timeout = table.checks().timeout;
        let started = Instant::now();
        let answer =
            tokio::time::timeout(timeout, self.registries.manifest_digest(&table, &target)).await;
        let (presence, result) = match &answer {
            Ok(Ok(_)) => (Presence::Present, "present"),
            Ok(Err(e)) if e.failure() == Some(&Failure::NotFound) => (Presence::Absent, "absent"),
            Ok(Err(e)) => {
                tracing::warn!(target = %target, error = %e, "mirror check failed; image kept");
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

    fn enqueue(&self, job: Job) -> bool {
        match self.queue.try_send(job) {
            Ok(()) => {
                self.metrics.copy_queue_depth.inc();
                true
            }
            Err(e) => {
                let job = match e {
                    mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => j,
                };
                self.count_copy("dropped");
                tracing::warn!(source = %job.copy.source, target = %job.copy.target,
                    "copy queue full; copy dropped (the next Pod that needs it asks again)");
                lock(&self.pending).remove(&key_of(&job.copy));
                false
            }
        }
    }

    fn count_copy(&self, result: &'static str) {
        self.metrics
            .copies
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    async fn run(self: Arc<Self>, job: Job) {
        let table = self.tables.current();
        let started = Instant::now();
        let copy = &job.copy;
        let work = async {
            if copy.warm_up {
                self.registries.warm_up(&table, &copy.target).await
            } else {
                self.registries
                    .copy(&table, &copy.source, &copy.target, &copy.platforms, None)
                    .await
            }
        };
        let outcome = std::panic::AssertUnwindSafe(work).catch_unwind().await;
        self.metrics
            .copy_duration
            .observe(started.elapsed().as_secs_f64());
        let error = match outcome {
            Ok(Ok(report)) => {
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
            Ok(Err(e)) => e,
            Err(_) => RegistryError::Unsupported {
                reference: copy.source.to_string(),
                reason: "the copy panicked".into(),
            },
        };
        self.count_copy("failure");
        let settings = table.copies();
        if job.attempt >= settings.max_attempts {
            self.count_copy("given_up");
            lock(&self.pending).remove(&key_of(copy));
            tracing::error!(source = %copy.source, target = %copy.target, attempts = job.attempt,
                error = %error, "copy failed; giving up until a Pod needs it again");
            return;
        }
        let wait = backoff(
            settings.retry_backoff,
            settings.retry_backoff * 64,
            job.attempt,
        )
        .max(error.retry_after().unwrap_or_default());
        tracing::warn!(source = %copy.source, target = %copy.target, attempt = job.attempt,
            retry_in_ms = wait.as_millis() as u64, error = %error, "copy failed; will retry");
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

fn key_of(copy: &CopyRequest) -> (String, String) {
    (copy.source.to_string(), copy.target.to_string())
}

/// Takes jobs off the queue and runs up to `concurrency` at once; ends with the service.
async fn workers(
    inner: std::sync::Weak<Inner>,
    mut rx: mpsc::Receiver<Job>,
    slots: Arc<Semaphore>,
) {
    while let Some(job) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.metrics.copy_queue_depth.dec();
        tokio::spawn(async move {
            inner.run(job).await;
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
        tracing::info!(source = %copy.source, target = %copy.target, warm_up = copy.warm_up,
            "copy queued");
        inner.enqueue(Job { copy, attempt: 1 });
    }
}
