//! Pull secrets that exist: a metadata-only cache of every mirror's pull secret across the
//! cluster (what the admission path asks before it rewrites), and the controller that keeps a
//! copy of each mirror's `pullSecretFrom` Secret in every opted-in namespace.
//!
//! - Written by server-side apply with one field manager, without force: every replica applies
//!   the same object, so two replicas cannot fight or flap, and a Secret someone else owns is a
//!   conflict the API server reports rather than one we overwrite.
//! - A Secret of that name that is not ours (no `app.kubernetes.io/managed-by` label) is never
//!   touched: it is logged, counted, and reported as an Event on the namespace.
//! - Ours are deleted when the namespace loses the opt-in label, only with a precondition on the
//!   exact object seen as ours.
//! - Everything comes from kube-runtime watchers and reflectors, and a `Controller` over
//!   namespaces; nothing polls.
//! - Without the right to read Secrets (the `pull-secrets` component left out), secrets are
//!   assumed to exist, as before the webhook could look, and nothing is provisioned.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::channel::mpsc;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;

use super::{spawn_stream, FIELD_MANAGER};
use crate::admission::webhook::PullSecrets;
use crate::config::ConfigHandle;
use crate::error::Report;
use crate::locks::lock;
use crate::mapping::{SecretRef, Table};
use crate::metrics::{Metrics, ReasonLabels, SecretLabels};
use crate::pod::INJECT_LABEL;

/// The label every Secret this controller writes carries, and the only ones it deletes.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "image-mirror-webhook";
/// Where a managed Secret says which Secret it is a copy of.
pub const PULL_SECRET_SOURCE_ANNOTATION: &str = "image-mirror/pull-secret-from";
const DOCKER_CONFIG_JSON: &str = "kubernetes.io/dockerconfigjson";
/// Reconciles the controller runs at once.
const RECONCILES_AT_ONCE: u16 = 8;
/// Namespace label values that opt a namespace in.
const OPTED_IN: [&str; 2] = ["enabled", "report"];

/// What the table asks of Kubernetes: which pull secrets to know about, and which to keep.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Wiring {
    /// Every mirror's pull secret name.
    names: BTreeSet<String>,
    /// Pull secret name → the Secret its copies are made from.
    provisioned: BTreeMap<String, SecretRef>,
}

impl Wiring {
    fn of(table: &Table) -> Wiring {
        let mut w = Wiring::default();
        for m in table.mirrors() {
            if let Some(name) = &m.pull_secret {
                w.names.insert(name.clone());
                if let Some(from) = &m.pull_secret_from {
                    w.provisioned.insert(name.clone(), from.clone());
                }
            }
        }
        w
    }
}

/// The caches of one wiring.
struct Live {
    wiring: Wiring,
    /// Per pull secret name, that name's Secrets in every namespace (metadata only).
    secrets: HashMap<String, Store<PartialObjectMeta<Secret>>>,
    /// Every namespace (only when something is provisioned).
    namespaces: Option<Store<Namespace>>,
    /// The source Secrets, with their data.
    sources: HashMap<SecretRef, Store<Secret>>,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Live {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

enum Mode {
    /// Caches not filled yet: no secret is known to exist.
    Starting,
    /// No right to read Secrets: every secret counts as there, as without Kubernetes access.
    Unchecked,
    Live(Arc<Live>),
}

/// The admission path's view of which namespaces hold which pull secret.
pub struct PullSecretIndex {
    mode: ArcSwap<Mode>,
    config: ConfigHandle,
}

impl PullSecretIndex {
    /// Whether the caches are filled (or not needed): `/readyz` waits for it.
    pub fn ready(&self) -> bool {
        !matches!(**self.mode.load(), Mode::Starting)
    }
}

impl PullSecrets for PullSecretIndex {
    fn available(&self, namespace: &str, secret: &str) -> bool {
        let live = match &**self.mode.load() {
            Mode::Starting => return false,
            Mode::Unchecked => return true,
            Mode::Live(live) => live.clone(),
        };
        let Some(store) = live.secrets.get(secret) else {
            // A name the caches were not built for (a reload is under way): as before.
            return true;
        };
        if store
            .get(&ObjectRef::new(secret).within(namespace))
            .is_some()
        {
            return true;
        }
        // Not there yet, but about to be: the controller is creating it.
        let table = &self.config.current().table;
        live.wiring.provisioned.get(secret).is_some_and(|source| {
            live.sources
                .get(source)
                .is_some_and(|s| s.get(&source_ref(source)).is_some())
                && live
                    .namespaces
                    .as_ref()
                    .and_then(|n| n.get(&ObjectRef::new(namespace)))
                    .is_some_and(|ns| opted_in(&ns, table))
        })
    }
}

fn source_ref(source: &SecretRef) -> ObjectRef<Secret> {
    ObjectRef::new(&source.name).within(&source.namespace)
}

/// Whether the controller keeps pull secrets in `ns`.
fn opted_in(ns: &Namespace, table: &Table) -> bool {
    let labelled = ns
        .labels()
        .get(INJECT_LABEL)
        .is_some_and(|v| OPTED_IN.contains(&v.as_str()));
    let name = ns.name_any();
    labelled
        && ns.metadata.deletion_timestamp.is_none()
        && !table.namespace_excluded(&name)
        && table.pull_secrets_allowed(&name, &|k| ns.labels().get(k).cloned())
}

fn managed(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY_VALUE)
}

/// Starts the caches and the controller, and rebuilds them when a reload changes which pull
/// secrets the table names. The index answers `false` until the caches are filled.
pub fn start(
    client: kube::Client,
    config: ConfigHandle,
    metrics: Metrics,
    instance: String,
) -> Arc<PullSecretIndex> {
    let index = Arc::new(PullSecretIndex {
        mode: ArcSwap::from_pointee(Mode::Starting),
        config: config.clone(),
    });
    let weak = Arc::downgrade(&index);
    let mut changes = config.subscribe();
    tokio::spawn(async move {
        let mut current: Option<Wiring> = None;
        loop {
            let Some(index) = weak.upgrade() else {
                return;
            };
            let wiring = Wiring::of(&config.current().table);
            if current.as_ref() != Some(&wiring) {
                match wire(&client, &config, &metrics, &instance, wiring.clone()).await {
                    Ok(Some(live)) => {
                        index.mode.store(Arc::new(Mode::Live(Arc::new(live))));
                        current = Some(wiring);
                    }
                    Ok(None) => {
                        index.mode.store(Arc::new(Mode::Unchecked));
                        current = Some(wiring);
                    }
                    Err(e) => {
                        tracing::warn!(error = %Report(&e),
                            "cannot reach the Kubernetes API for pull secrets; trying again");
                        drop(index);
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        continue;
                    }
                }
            }
            drop(index);
            if changes.changed().await.is_err() {
                return;
            }
        }
    });
    index
}

/// Builds the caches for `wiring` and waits until they are filled; `None` when the webhook may
/// not read Secrets.
async fn wire(
    client: &kube::Client,
    config: &ConfigHandle,
    metrics: &Metrics,
    instance: &str,
    wiring: Wiring,
) -> Result<Option<Live>, kube::Error> {
    let metas: Api<PartialObjectMeta<Secret>> = Api::all(client.clone());
    for name in &wiring.names {
        let probe = ListParams::default()
            .fields(&format!("metadata.name={name}"))
            .limit(1);
        match metas.list_metadata(&probe).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 403 => {
                tracing::warn!(secret = %name,
                    "no right to read Secrets: pull secrets are injected unchecked and none are \
                     provisioned (add the pull-secrets component to change that)");
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
    }
    let (sources_changed, reconcile_all) = mpsc::unbounded::<()>();
    let mut tasks = Vec::new();
    let mut secrets = HashMap::new();
    let by_name = |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
    for name in &wiring.names {
        let (store, writer) = reflector::store();
        let stream = reflector::reflector(
            writer,
            watcher(metas.clone(), by_name(name)).default_backoff(),
        )
        .touched_objects();
        tasks.push(spawn_stream(
            stream,
            "pull secrets",
            |_: PartialObjectMeta<Secret>| {},
        ));
        secrets.insert(name.clone(), store);
    }
    let mut sources = HashMap::new();
    for source in wiring.provisioned.values().collect::<BTreeSet<_>>() {
        let api: Api<Secret> = Api::namespaced(client.clone(), &source.namespace);
        let (store, writer) = reflector::store();
        let cfg = watcher::Config::default().fields(&format!("metadata.name={}", source.name));
        let changed = sources_changed.clone();
        let stream =
            reflector::reflector(writer, watcher(api, cfg).default_backoff()).touched_objects();
        tasks.push(spawn_stream(
            stream,
            "pull secret sources",
            move |_: Secret| {
                let _ = changed.unbounded_send(());
            },
        ));
        sources.insert(source.clone(), store);
    }
    let mut namespaces = None;
    if !wiring.provisioned.is_empty() {
        // A few reconciles at once: a thousand namespaces opted in together are worked through
        // in a steady stream instead of a thousand requests (and their buffers) at once.
        let controller = Controller::new(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
        )
        .with_config(kube::runtime::controller::Config::default().concurrency(RECONCILES_AT_ONCE));
        namespaces = Some(controller.store());
        let ctx = Arc::new(Context {
            client: client.clone(),
            config: config.clone(),
            metrics: metrics.clone(),
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: FIELD_MANAGER.to_string(),
                    instance: Some(instance.to_string()),
                },
            ),
            wiring: wiring.clone(),
            secrets: secrets.clone(),
            sources: sources.clone(),
            conflicts: Mutex::new(HashSet::new()),
        });
        // A change to one of these Secrets (ours deleted by hand, another's created) is
        // reconciled in its namespace; a change to a source, everywhere.
        let mut controller = controller.reconcile_all_on(reconcile_all);
        for name in wiring.provisioned.keys() {
            controller = controller.watches(metas.clone(), by_name(name), |s| {
                s.namespace().map(|ns| ObjectRef::<Namespace>::new(&ns))
            });
        }
        let run = controller
            .run(reconcile, error_policy, ctx)
            .for_each(|result| async move {
                if let Err(e) = result {
                    tracing::warn!(error = %Report(&e), "pull secret controller");
                }
            });
        tasks.push(tokio::spawn(run).abort_handle());
    }
    let live = Live {
        wiring,
        secrets,
        namespaces,
        sources,
        tasks,
    };
    live.filled().await;
    tracing::info!(secrets = ?live.wiring.names, provisioned = live.wiring.provisioned.len(),
        "pull secret caches filled");
    Ok(Some(live))
}

impl Live {
    /// Waits until every cache is filled, saying every 10 s which one it is still waiting for.
    async fn filled(&self) {
        let mut waiting: Vec<(String, Box<dyn Fn() -> bool + Send + Sync>)> = Vec::new();
        for (name, store) in &self.secrets {
            waiting.push((format!("Secrets named {name}"), filled(store.clone())));
        }
        for (source, store) in &self.sources {
            waiting.push((format!("source Secret {source}"), filled(store.clone())));
        }
        if let Some(store) = &self.namespaces {
            waiting.push(("namespaces".to_string(), filled(store.clone())));
        }
        let started = std::time::Instant::now();
        let mut said = Duration::ZERO;
        while !waiting.is_empty() {
            waiting.retain(|(_, is_filled)| !is_filled());
            let waited = started.elapsed();
            if let Some((what, _)) = waiting
                .first()
                .filter(|_| waited >= said + Duration::from_secs(10))
            {
                tracing::warn!(cache = %what, "still waiting for a Kubernetes cache to fill");
                said = waited;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Whether a reflector's store has had its first full list.
fn filled<K>(store: Store<K>) -> Box<dyn Fn() -> bool + Send + Sync>
where
    K: kube::Resource + Clone + Send + Sync + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone + Send + Sync,
{
    use futures::FutureExt as _;
    Box::new(move || store.wait_until_ready().now_or_never().is_some())
}

struct Context {
    client: kube::Client,
    config: ConfigHandle,
    metrics: Metrics,
    recorder: Recorder,
    wiring: Wiring,
    secrets: HashMap<String, Store<PartialObjectMeta<Secret>>>,
    sources: HashMap<SecretRef, Store<Secret>>,
    /// (namespace, secret) pairs known to hold someone else's Secret: reported once each.
    conflicts: Mutex<HashSet<(String, String)>>,
}

/// Why a reconcile of one Secret did not go through.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("source Secret {0} does not exist")]
    SourceMissing(String),
    #[error("source Secret {source_ref} is of type {type_:?}, not {DOCKER_CONFIG_JSON}")]
    SourceType { source_ref: String, type_: String },
    #[error("cannot apply Secret {0}")]
    Apply(String, #[source] kube::Error),
    #[error("cannot delete Secret {0}")]
    Delete(String, #[source] kube::Error),
}

impl ReconcileError {
    /// The `reason` label of the reconcile errors metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ReconcileError::SourceMissing(_) => "source-missing",
            ReconcileError::SourceType { .. } => "source-type",
            ReconcileError::Apply(..) => "apply",
            ReconcileError::Delete(..) => "delete",
        }
    }
}

async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let namespace = ns.name_any();
    let wanted = opted_in(&ns, &ctx.config.current().table);
    let mut failed = None;
    for (name, source) in &ctx.wiring.provisioned {
        let result = if wanted {
            ctx.provision(&ns, name, source).await
        } else {
            ctx.withdraw(&namespace, name).await
        };
        if let Err(e) = result {
            ctx.metrics
                .pull_secret_reconcile_errors
                .get_or_create(&ReasonLabels {
                    reason: e.metric_label(),
                })
                .inc();
            tracing::warn!(namespace, secret = %name, error = %Report(&e),
                "pull secret not reconciled; trying again");
            failed = Some(e);
        }
        ctx.count_managed(name);
    }
    Ok(match failed {
        Some(_) => Action::requeue(Duration::from_secs(10)),
        None => Action::requeue(Duration::from_secs(600)),
    })
}

fn error_policy(_ns: Arc<Namespace>, _e: &ReconcileError, _ctx: Arc<Context>) -> Action {
    Action::requeue(Duration::from_secs(10))
}

impl Context {
    fn existing(&self, namespace: &str, name: &str) -> Option<Arc<PartialObjectMeta<Secret>>> {
        self.secrets
            .get(name)?
            .get(&ObjectRef::new(name).within(namespace))
    }

    /// Keeps `name` in `ns` equal to `source`, unless someone else's Secret has that name.
    async fn provision(
        &self,
        ns: &Namespace,
        name: &str,
        source: &SecretRef,
    ) -> Result<(), ReconcileError> {
        let namespace = ns.name_any();
        if let Some(existing) = self.existing(&namespace, name) {
            if !managed(&existing.metadata) {
                self.conflict(ns, name, "it is not managed by image-mirror-webhook")
                    .await;
                return Ok(());
            }
        }
        let src = self
            .sources
            .get(source)
            .and_then(|s| s.get(&source_ref(source)))
            .ok_or_else(|| ReconcileError::SourceMissing(source.to_string()))?;
        let type_ = src.type_.clone().unwrap_or_default();
        if type_ != DOCKER_CONFIG_JSON {
            return Err(ReconcileError::SourceType {
                source_ref: source.to_string(),
                type_,
            });
        }
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(namespace.clone()),
                labels: Some([(MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string())].into()),
                annotations: Some(
                    [(
                        PULL_SECRET_SOURCE_ANNOTATION.to_string(),
                        source.to_string(),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            type_: Some(type_),
            data: src.data.clone(),
            ..Secret::default()
        };
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &namespace);
        // Not forced: a field someone else owns is a conflict to report, not to take over.
        match api
            .patch(
                name,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Apply(&secret),
            )
            .await
        {
            Ok(_) => {
                lock(&self.conflicts).remove(&(namespace, name.to_string()));
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                self.conflict(ns, name, "another field manager owns its data")
                    .await;
                Ok(())
            }
            Err(e) => Err(ReconcileError::Apply(format!("{namespace}/{name}"), e)),
        }
    }

    /// Deletes our copy of `name` from a namespace that no longer wants it; never another's.
    async fn withdraw(&self, namespace: &str, name: &str) -> Result<(), ReconcileError> {
        let Some(existing) = self.existing(namespace, name) else {
            return Ok(());
        };
        if !managed(&existing.metadata) {
            return Ok(());
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let params = DeleteParams {
            // Exactly the object seen as ours: a Secret put in its place is not deleted.
            preconditions: Some(Preconditions {
                resource_version: existing.metadata.resource_version.clone(),
                uid: existing.metadata.uid.clone(),
            }),
            ..DeleteParams::default()
        };
        match api.delete(name, &params).await {
            Ok(_) => {
                tracing::info!(
                    namespace,
                    secret = name,
                    "pull secret removed: namespace opted out"
                );
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
            Err(e) => Err(ReconcileError::Delete(format!("{namespace}/{name}"), e)),
        }
    }

    /// Reports someone else's Secret in the way, once per namespace and name.
    async fn conflict(&self, ns: &Namespace, name: &str, why: &str) {
        let namespace = ns.name_any();
        let new = lock(&self.conflicts).insert((namespace.clone(), name.to_string()));
        if !new {
            return;
        }
        self.metrics
            .pull_secret_conflicts
            .get_or_create(&SecretLabels {
                secret: name.to_string(),
            })
            .inc();
        let note = format!(
            "Secret {namespace}/{name} is left as it is: {why}. Pods that use the mirror get it \
             as their pull secret; delete it to have image-mirror-webhook keep a copy of the \
             mirror's pull secret there instead."
        );
        tracing::warn!(
            namespace,
            secret = name,
            reason = why,
            "a pull secret of that name exists and is not ours; left alone"
        );
        // About the source Secret, so that the Event lands in the webhook's own namespace (a
        // Role there is enough to record it); the Secret in the way is its second object.
        let secret_ref = |namespace: &str, name: &str| ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Secret".into()),
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            ..ObjectReference::default()
        };
        let Some(source) = self.wiring.provisioned.get(name) else {
            return;
        };
        let event = Event {
            type_: EventType::Warning,
            reason: "PullSecretConflict".into(),
            note: Some(note),
            action: "ProvisionPullSecret".into(),
            secondary: Some(secret_ref(&namespace, name)),
        };
        let regarding = secret_ref(&source.namespace, &source.name);
        if let Err(e) = self.recorder.publish(&event, &regarding).await {
            tracing::warn!(namespace, error = %Report(&e), "cannot record the conflict Event");
        }
    }

    fn count_managed(&self, name: &str) {
        let Some(store) = self.secrets.get(name) else {
            return;
        };
        let n = store
            .state()
            .iter()
            .filter(|s| managed(&s.metadata))
            .count();
        self.metrics
            .pull_secrets_managed
            .get_or_create(&SecretLabels {
                secret: name.to_string(),
            })
            .set(n as i64);
    }
}
