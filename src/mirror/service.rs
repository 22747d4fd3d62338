//! The [`MirrorAccess`] the admission path uses: the mirror checks ([`super::checks`]) and the
//! copy queue ([`super::queue`]), started together and kept on the configuration in force.
//! Every setting is read from it, so a reload applies them all: TTLs and timeouts at the next
//! check, `queueSize` at the next copy queued, `concurrency` as soon as running copies allow,
//! registry access at a client's next use.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};

use super::checks::Checks;
use super::queue::{CopyQueue, JobEnds};
use super::{CopyEnds, CopyRequest, CopyRunner, ImageRecords, MirrorAccess, Presence, Upstream};
use crate::config::ConfigHandle;
use crate::locks::lock;
use crate::metrics::Metrics;
use crate::reference::Reference;
use crate::registry::Registries;

/// Checks and copies against the mirrors of the configuration in force.
pub struct MirrorService {
    checks: Arc<Checks>,
    queue: Arc<CopyQueue>,
}

impl MirrorService {
    /// Starts the copy workers on the current Tokio runtime, and follows configuration reloads.
    pub fn start(config: ConfigHandle, registries: Arc<Registries>, metrics: Metrics) -> Self {
        init_registry_series(&metrics, &config.current());
        // Subscribed now, so that no reload between here and the task's start is missed.
        let changes = config.subscribe();
        let checks = Arc::new(Checks::new(
            config.clone(),
            registries.clone(),
            metrics.clone(),
        ));
        let queue = CopyQueue::start(
            config.clone(),
            registries.clone(),
            metrics.clone(),
            checks.clone(),
        );
        tokio::spawn(follow_reloads(
            Arc::downgrade(&queue),
            config,
            registries,
            metrics,
            changes,
        ));
        MirrorService { checks, queue }
    }

    /// Copies queued, waiting for a retry or running.
    pub fn pending_copies(&self) -> usize {
        self.queue.pending()
    }

    /// What the cache holds for `target`, if it has not expired.
    pub fn cached(&self, target: &Reference) -> Option<Presence> {
        self.checks.cached(target.as_str())
    }

    /// Hands copies to `runner` while `copies.runner` is `job`.
    pub fn use_runner(&self, runner: Arc<dyn CopyRunner>) {
        *lock(&self.queue.runner) = Some(runner);
    }

    /// Tells `records` what the checks and copies learn, and asks it first.
    pub fn use_records(&self, records: Arc<dyn ImageRecords>) {
        self.checks.set_records(records);
    }

    /// What a runner tells of the copies it ran (held weakly: it does not keep the service).
    pub fn ends(&self) -> Arc<dyn CopyEnds> {
        Arc::new(JobEnds(Arc::downgrade(&self.queue)))
    }
}

/// The per-registry series of the table's mirrors and of the registries it has settings for.
fn init_registry_series(metrics: &Metrics, config: &crate::config::Config) {
    let mirrors = config.table.mirrors().iter().map(|m| m.registry.as_str());
    let configured = config.settings.registries().keys().map(String::as_str);
    metrics.init_registries(mirrors.chain(configured));
}

/// Hands every reloaded configuration's settings to the registries and the copy slots.
async fn follow_reloads(
    queue: Weak<CopyQueue>,
    config: ConfigHandle,
    registries: Arc<Registries>,
    metrics: Metrics,
    mut changes: tokio::sync::watch::Receiver<u64>,
) {
    while changes.changed().await.is_ok() {
        let Some(queue) = queue.upgrade() else {
            return;
        };
        let config = config.current();
        init_registry_series(&metrics, &config);
        let settings = config.settings.clone();
        registries.apply(settings.clone());
        queue.resize(settings.copies.concurrency);
    }
}

impl MirrorAccess for MirrorService {
    fn presence<'a>(
        &'a self,
        target: &'a Reference,
    ) -> Pin<Box<dyn Future<Output = Presence> + Send + 'a>> {
        self.checks.presence(target)
    }

    fn upstream_digest<'a>(
        &'a self,
        source: &'a Reference,
    ) -> Pin<Box<dyn Future<Output = Upstream> + Send + 'a>> {
        self.checks.upstream_digest(source)
    }

    fn request_copy(&self, copy: CopyRequest) -> bool {
        self.queue.request(copy)
    }

    fn record_use(&self, source: &str, target: &str, copying: bool) {
        if let Some(r) = self.checks.records() {
            r.used(source, target, copying);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::ResultLabels;
    use crate::mirror::CopyMode;
    use crate::registry::RegistryOptions;
    use std::time::Duration;
    use std::time::Instant;

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
        assert_eq!(service.queue.slots.available_permits(), 4);

        let next = Config::parse(
            "t.yaml",
            "copies: {concurrency: 1, queueSize: 2}\nregistries:\n  quay.io: {insecure: true}\n",
        )
        .unwrap();
        handle.replace(next);
        let deadline = Instant::now() + Duration::from_secs(5);
        while service.queue.slots.available_permits() != 1 {
            assert!(Instant::now() < deadline, "concurrency not applied");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(registries
            .settings()
            .access("quay.io")
            .is_some_and(|a| a.insecure));

        // Hold the one slot: copies wait in the queue, which now holds two.
        let held = service.queue.slots.clone().acquire_owned().await.unwrap();
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
