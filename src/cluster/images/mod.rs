//! `MirroredImage` objects: the cluster's record of every image the webhook sends to a mirror
//! ([`crd`]), and a way for people to ask for an image to be mirrored (declared images,
//! [`declared`]).
//!
//! Admissions, checks and copies tell [`Records`] what they learn; it folds that into pending
//! changes per image and a background writer applies them (server-side apply, the shared field
//! manager) at `mirroredImages.writesPerSecond`, `lastUsed` at most every `usedEvery`. Nothing
//! on the admission path waits for the API server. Every replica watches the objects, so a
//! `Present` one replica found answers the others' checks until it is older than `presentTtl`,
//! and a copy another replica holds is not started twice. Records made from admissions that no
//! Pod has used for `mirroredImages.retention` are deleted (never the image itself).

pub mod crd;
mod declared;
pub mod status;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use serde_json::json;
use tokio::sync::Notify;

use self::crd::{object_name, MirroredImage, MirroredImageStatus, Phase};
use self::status::Change;
use super::FIELD_MANAGER;
use crate::config::ConfigHandle;
use crate::error::Report;
use crate::locks::lock;
use crate::metrics::{Metrics, PhaseLabels, ResultLabels};
use crate::mirror::{CopyOutcome, ImageRecords, MirrorAccess, Presence};
use crate::reference::Reference;

pub use self::crd::{RECORDED_BY_ADMISSION, RECORDED_BY_LABEL};

/// How long a copy another replica holds is left to it; past this without its end, any
/// replica may copy the image again.
const HOLD_TIMEOUT: Duration = Duration::from_secs(600);
/// The most changes waiting to be written; past it, the oldest uses are dropped first.
const MAX_PENDING: usize = 10_000;

/// An image's identity in the records: its canonical source and target.
type Pair = (String, String);

/// What the watch cache holds, indexed the ways the records are asked.
#[derive(Default)]
struct Known {
    objects: HashMap<String, Arc<MirroredImage>>,
    /// (source, target) → the object's name (declared objects name themselves).
    by_pair: HashMap<Pair, String>,
    /// Target → the names of the objects that copy to it.
    by_target: HashMap<String, Vec<String>>,
}

impl Known {
    fn of(objects: impl IntoIterator<Item = MirroredImage>) -> Known {
        let mut known = Known::default();
        for o in objects {
            known.insert(o);
        }
        known
    }

    fn insert(&mut self, mut o: MirroredImage) {
        let Some(name) = o.metadata.name.clone() else {
            return;
        };
        // Kept for their spec, status and labels only: managed fields and annotations (a
        // kubectl apply's last-applied copy) are most of an object's bytes.
        o.metadata.managed_fields = None;
        o.metadata.annotations = None;
        // Names learnt otherwise (a declared image's computed target) stay: an update of the
        // object does not move it to another pair.
        let target = o
            .spec
            .target
            .clone()
            .or_else(|| o.status.as_ref().and_then(|s| s.target.clone()));
        if let Some(target) = target {
            let target = canonical(&target);
            self.by_pair
                .insert((canonical(&o.spec.source), target.clone()), name.clone());
            let names = self.by_target.entry(target).or_default();
            if !names.contains(&name) {
                names.push(name.clone());
            }
        }
        self.objects.insert(name, Arc::new(o));
    }

    fn remove(&mut self, name: &str) {
        if self.objects.remove(name).is_none() {
            return;
        }
        self.by_pair.retain(|_, n| n != name);
        self.by_target.retain(|_, names| {
            names.retain(|n| n != name);
            !names.is_empty()
        });
    }

    fn count_phases(&self) -> HashMap<Phase, i64> {
        let mut counts = HashMap::new();
        for o in self.objects.values() {
            let phase = o
                .status
                .as_ref()
                .and_then(|s| s.phase)
                .unwrap_or(Phase::Unknown);
            *counts.entry(phase).or_default() += 1;
        }
        counts
    }
}

/// A reference as the records key it: canonical (every Docker Hub spelling the same), or as
/// written when it does not parse.
fn canonical(reference: &str) -> String {
    Reference::parse(reference).map_or_else(
        |_| reference.to_string(),
        |r| r.canonical().as_str().to_string(),
    )
}

fn now() -> String {
    Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map_or_else(|_| Timestamp::now().to_string(), |t| t.to_string())
}

/// Time since an RFC 3339 stamp; `None` when it does not read as one.
fn age(stamp: &str) -> Option<Duration> {
    let t: Timestamp = stamp.parse().ok()?;
    let d = Timestamp::now().duration_since(t);
    Duration::try_from(d).ok()
}

/// Changes waiting to be written, oldest first, by (source, target) as they were told: the
/// admission path queues without parsing; the writer canonicalises (two spellings of one
/// image are two entries, and the second finds the first's write fresh).
#[derive(Default)]
struct Pending {
    order: VecDeque<Pair>,
    changes: HashMap<Pair, Change>,
}

/// The records: told what this replica learns, asked what the cluster knows. Cheap to clone.
#[derive(Clone)]
pub struct Records {
    shared: Arc<Shared>,
}

struct Shared {
    api: Api<MirroredImage>,
    config: ConfigHandle,
    metrics: Metrics,
    /// This replica, as `status.copying.holder` names it.
    holder: String,
    known: Mutex<Known>,
    pending: Mutex<Pending>,
    wake: Arc<Notify>,
    /// When this replica last wrote an image's `lastUsed` (the watch may not show it yet).
    used_written: Mutex<HashMap<String, Instant>>,
}

/// Why the records are off.
#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    #[error(
        "the MirroredImage resource is not installed (deploy/components/mirrored-images); \
         image records are off"
    )]
    NoCrd,
    #[error(
        "no rights on mirroredimages.image-mirror.dev (list, watch, create, patch, delete; see \
         deploy/components/mirrored-images); image records are off"
    )]
    Forbidden,
    #[error("cannot list MirroredImage objects; image records are off")]
    List(#[source] kube::Error),
}

impl Records {
    /// Starts the watch, the writer, the declared-image loop and the retention sweep, once the
    /// API server shows the resource and lets this identity list it. `mirrors` takes the copies
    /// declared images ask for.
    pub async fn start(
        client: kube::Client,
        config: ConfigHandle,
        metrics: Metrics,
        holder: String,
        mirrors: Arc<dyn MirrorAccess>,
    ) -> Result<Records, RecordsError> {
        let api: Api<MirroredImage> = Api::all(client);
        match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => return Err(RecordsError::NoCrd),
            Err(kube::Error::Api(e)) if e.code == 403 => return Err(RecordsError::Forbidden),
            Err(e) => return Err(RecordsError::List(e)),
        }
        for phase in Phase::ALL {
            drop(metrics.images.get_or_create(&PhaseLabels {
                phase: phase.label(),
            }));
        }
        for result in ["success", "error"] {
            drop(
                metrics
                    .image_record_writes
                    .get_or_create(&ResultLabels { result }),
            );
        }
        let records = Records {
            shared: Arc::new(Shared {
                api: api.clone(),
                config,
                metrics,
                holder,
                known: Mutex::new(Known::default()),
                pending: Mutex::new(Pending::default()),
                wake: Arc::new(Notify::new()),
                used_written: Mutex::new(HashMap::new()),
            }),
        };
        records.watch(api);
        tokio::spawn(writer(Arc::downgrade(&records.shared)));
        tokio::spawn(declared::run(Arc::downgrade(&records.shared), mirrors));
        tokio::spawn(sweep(Arc::downgrade(&records.shared)));
        Ok(records)
    }

    fn watch(&self, api: Api<MirroredImage>) {
        let shared = Arc::downgrade(&self.shared);
        let mut initial: Vec<MirroredImage> = Vec::new();
        let stream = watcher(api, watcher::Config::default());
        // Ends with the records: the task holds them weakly.
        super::spawn_stream(stream, "MirroredImage", move |event| {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            match event {
                watcher::Event::Init => initial.clear(),
                watcher::Event::InitApply(mut o) => {
                    // Only what `Known` keeps, while the whole list comes in.
                    o.metadata.managed_fields = None;
                    o.metadata.annotations = None;
                    initial.push(o);
                }
                watcher::Event::InitDone => {
                    *lock(&shared.known) = Known::of(std::mem::take(&mut initial));
                    shared.count_phases();
                }
                watcher::Event::Apply(o) => lock(&shared.known).insert(o),
                watcher::Event::Delete(o) => {
                    if let Some(name) = &o.metadata.name {
                        lock(&shared.known).remove(name);
                    }
                }
            }
        });
    }

    /// Objects in the watch cache.
    pub fn known(&self) -> usize {
        lock(&self.shared.known).objects.len()
    }
}

impl Shared {
    fn count_phases(&self) {
        let counts = lock(&self.known).count_phases();
        for phase in Phase::ALL {
            self.metrics
                .images
                .get_or_create(&PhaseLabels {
                    phase: phase.label(),
                })
                .set(counts.get(&phase).copied().unwrap_or(0));
        }
    }

    /// Queues `change` for (source, target) as written; cheap, for the admission path.
    fn queue(&self, source: &str, target: &str, change: Change) {
        let pair = (source.to_string(), target.to_string());
        let mut pending = lock(&self.pending);
        if let Some(c) = pending.changes.get_mut(&pair) {
            c.absorb(change);
            return;
        }
        if pending.order.len() >= MAX_PENDING {
            // Dropping the oldest keeps the newest news; a use is said again by the next Pod.
            if let Some(old) = pending.order.pop_front() {
                pending.changes.remove(&old);
            }
        }
        pending.order.push_back(pair.clone());
        pending.changes.insert(pair, change);
        self.metrics
            .image_record_queue
            .set(pending.order.len() as i64);
        drop(pending);
        self.wake.notify_one();
    }

    /// The object of a pair, and its name (the one it has, or the one it gets).
    fn object_of(&self, pair: &Pair) -> (String, Option<Arc<MirroredImage>>) {
        let known = lock(&self.known);
        if let Some(name) = known.by_pair.get(pair) {
            return (name.clone(), known.objects.get(name).cloned());
        }
        let name = match (Reference::parse(&pair.0), Reference::parse(&pair.1)) {
            (Ok(s), Ok(t)) => object_name(&s, &t),
            _ => format!("image-{}", pair.0.len()),
        };
        let object = known.objects.get(&name).cloned();
        (name, object)
    }

    /// Writes one pending change: the object first when it is new (from an admission only),
    /// then its status. The number of API writes made.
    async fn write(&self, (source, target): &Pair, change: Change) -> u32 {
        let pair = (canonical(source), canonical(target));
        let (name, object) = self.object_of(&pair);
        let settings = self.config.current().settings.records;
        let status = object.as_ref().and_then(|o| o.status.clone());
        if change.only_used() {
            let recently = lock(&self.used_written)
                .get(&name)
                .is_some_and(|t| t.elapsed() < settings.used_every);
            let fresh = status
                .as_ref()
                .and_then(|s| s.last_used.as_deref())
                .and_then(age)
                .is_some_and(|a| a < settings.used_every);
            let phase_holds = !change.queued
                || status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(|p| p == Phase::Copying || p.is_served());
            if (recently || fresh) && phase_holds {
                return 0;
            }
        }
        let mut writes = 0;
        if object.is_none() {
            if !change.used && change.started.is_none() {
                // A check or an end for an image no admission recorded: nothing to say it to.
                return 0;
            }
            let body = json!({
                "apiVersion": "image-mirror.dev/v1alpha1",
                "kind": "MirroredImage",
                "metadata": {
                    "name": name,
                    "labels": {RECORDED_BY_LABEL: RECORDED_BY_ADMISSION},
                },
                "spec": {"source": source},
            });
            writes += 1;
            if !self.patch(&name, &body, false).await {
                return writes;
            }
        }
        let mut status = status.unwrap_or_else(MirroredImageStatus::default);
        status::apply(&mut status, &pair.1, &change, &now(), &self.holder);
        let body = json!({
            "apiVersion": "image-mirror.dev/v1alpha1",
            "kind": "MirroredImage",
            "metadata": {"name": name},
            "status": status,
        });
        writes += 1;
        if self.patch(&name, &body, true).await && change.used {
            lock(&self.used_written).insert(name, Instant::now());
        }
        writes
    }

    /// One server-side apply; whether it went through (a failure is counted and logged).
    async fn patch(&self, name: &str, body: &serde_json::Value, status: bool) -> bool {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let patch = Patch::Apply(body);
        let result = if status {
            self.api.patch_status(name, &params, &patch).await
        } else {
            self.api.patch(name, &params, &patch).await
        };
        let label = if result.is_ok() { "success" } else { "error" };
        self.metrics
            .image_record_writes
            .get_or_create(&ResultLabels { result: label })
            .inc();
        match result {
            Ok(o) => {
                lock(&self.known).insert(o);
                true
            }
            Err(e) => {
                tracing::warn!(name, error = %Report(&e), "could not write a MirroredImage");
                false
            }
        }
    }

    fn status_of(&self, name: &str) -> Option<MirroredImageStatus> {
        lock(&self.known)
            .objects
            .get(name)
            .and_then(|o| o.status.clone())
    }
}

impl ImageRecords for Records {
    fn used(&self, source: &str, target: &str, copying: bool) {
        self.shared.queue(
            source,
            target,
            Change {
                used: true,
                queued: copying,
                ..Change::default()
            },
        );
    }

    fn checked(&self, target: &str, presence: Presence, digest: Option<&str>) {
        let key = canonical(target);
        let names = lock(&self.shared.known)
            .by_target
            .get(&key)
            .cloned()
            .unwrap_or_default();
        for name in names {
            let Some(o) = lock(&self.shared.known).objects.get(&name).cloned() else {
                continue;
            };
            // A check that tells nothing new is written once per `presentTtl` at most, which
            // is what other replicas need to trust it.
            let status = o.status.clone().unwrap_or_default();
            let ttl = self.shared.config.current().settings.checks.present_ttl;
            let same = match presence {
                Presence::Present => status.phase.is_some_and(Phase::is_served),
                Presence::Absent => status.phase == Some(Phase::Missing),
                Presence::Unknown => true,
            };
            let young = status
                .last_checked
                .as_deref()
                .and_then(age)
                .is_some_and(|a| a < ttl / 2);
            if same && young {
                continue;
            }
            self.shared.queue(
                &o.spec.source,
                target,
                Change {
                    checked: Some((presence, digest.map(str::to_string))),
                    ..Change::default()
                },
            );
        }
        // An image no object records yet gets one from its first use; keep the answer for it.
        let mut pending = lock(&self.shared.pending);
        for (pair, c) in pending.changes.iter_mut() {
            if (pair.1 == target || pair.1 == key) && c.checked.is_none() {
                c.checked = Some((presence, digest.map(str::to_string)));
            }
        }
    }

    fn copy_started(&self, source: &str, target: &str, runner: &str) {
        self.shared.queue(
            source,
            target,
            Change {
                started: Some(runner.to_string()),
                ..Change::default()
            },
        );
    }

    fn copy_ended(&self, source: &str, target: &str, outcome: &CopyOutcome) {
        self.shared.queue(
            source,
            target,
            Change {
                ended: Some(outcome.clone()),
                ..Change::default()
            },
        );
    }

    fn known_present(&self, target: &str, ttl: Duration) -> bool {
        let known = lock(&self.shared.known);
        let Some(names) = known.by_target.get(&canonical(target)) else {
            return false;
        };
        names.iter().any(|name| {
            known
                .objects
                .get(name)
                .and_then(|o| o.status.as_ref())
                .is_some_and(|s| {
                    s.phase.is_some_and(Phase::is_served)
                        && s.last_checked
                            .as_deref()
                            .and_then(age)
                            .is_some_and(|a| a < ttl)
                })
        })
    }

    fn copied_elsewhere(&self, source: &str, target: &str) -> bool {
        let pair = (canonical(source), canonical(target));
        let (name, _) = self.shared.object_of(&pair);
        self.shared
            .status_of(&name)
            .and_then(|s| s.copying)
            .is_some_and(|c| {
                c.holder != self.shared.holder && age(&c.since).is_some_and(|a| a < HOLD_TIMEOUT)
            })
    }
}

/// Writes pending changes, oldest first, at `writesPerSecond`; ends with the records.
async fn writer(shared: std::sync::Weak<Shared>) {
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let next = {
            let mut pending = lock(&strong.pending);
            let next = pending.order.pop_front().and_then(|pair| {
                let change = pending.changes.remove(&pair)?;
                Some((pair, change))
            });
            strong
                .metrics
                .image_record_queue
                .set(pending.order.len() as i64);
            next
        };
        let Some((pair, change)) = next else {
            let wake = strong.wake.clone();
            drop(strong);
            // Woken by a change; the timeout lets the loop see the records are gone.
            let _ = tokio::time::timeout(Duration::from_secs(5), wake.notified()).await;
            continue;
        };
        let writes = strong.write(&pair, change).await;
        let rate = strong
            .config
            .current()
            .settings
            .records
            .writes_per_second
            .max(1);
        drop(strong);
        if writes > 0 {
            tokio::time::sleep(Duration::from_secs(u64::from(writes)) / rate).await;
        }
    }
}

/// Deletes records made from admissions that no Pod has used for `retention` (and whose
/// spec does not say `retain`), and refreshes the phase gauge; ends with the records.
async fn sweep(shared: std::sync::Weak<Shared>) {
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        strong.count_phases();
        let retention = strong.config.current().settings.records.retention;
        let old: Vec<String> = lock(&strong.known)
            .objects
            .values()
            .filter(|o| {
                let admission = o
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(RECORDED_BY_LABEL))
                    .is_some_and(|v| v == RECORDED_BY_ADMISSION);
                let used = o
                    .status
                    .as_ref()
                    .and_then(|s| s.last_used.clone())
                    .or_else(|| {
                        o.metadata
                            .creation_timestamp
                            .as_ref()
                            .map(|t| t.0.to_string())
                    });
                admission
                    && !o.spec.retain
                    && used.as_deref().and_then(age).is_some_and(|a| a > retention)
            })
            .filter_map(|o| o.metadata.name.clone())
            .collect();
        for name in old {
            match strong.api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {
                    tracing::info!(name, "MirroredImage unused past its retention; deleted")
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    tracing::warn!(name, error = %Report(&e), "could not delete a MirroredImage")
                }
            }
        }
        // Short retentions (tests) are swept often; the gauge is refreshed every 10 s at most.
        let every = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(10));
        drop(strong);
        tokio::time::sleep(every).await;
    }
}
