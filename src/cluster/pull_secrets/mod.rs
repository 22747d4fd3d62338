//! Pull secrets that exist: a metadata-only cache of every mirror's pull secret across the
//! cluster, which the admission path asks before it rewrites ([`index`]), and the controller
//! that keeps a copy of each mirror's `pullSecretFrom` Secret in every opted-in namespace
//! ([`controller`]). This module wires both to the table and rebuilds them on reloads.
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
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;

use super::{spawn_stream, FIELD_MANAGER};
use crate::config::ConfigHandle;
use crate::error::Report;
use crate::mapping::{SecretRef, Table};
use crate::metrics::Metrics;
use crate::pod::INJECT_LABEL;

mod controller;
mod index;

pub use controller::ReconcileError;
use controller::{error_policy, reconcile, Context};
use index::IndexState;
pub use index::PullSecretIndex;

/// The label every Secret this controller writes carries, and the only ones it deletes.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "image-mirror-webhook";
/// Where a managed Secret says which Secret it is a copy of.
pub const PULL_SECRET_SOURCE_ANNOTATION: &str = "image-mirror/pull-secret-from";
pub(super) const DOCKER_CONFIG_JSON: &str = "kubernetes.io/dockerconfigjson";
/// Reconciles the controller runs at once.
const RECONCILES_AT_ONCE: u16 = 8;
/// Namespace label values that opt a namespace in.
pub(super) const OPTED_IN: [&str; 2] = ["enabled", "report"];

/// What the table asks of Kubernetes: which pull secrets to know about, and which to keep.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct Wiring {
    /// Every mirror's pull secret name.
    pub(super) names: BTreeSet<String>,
    /// Pull secret name → the Secret its copies are made from.
    pub(super) provisioned: BTreeMap<String, SecretRef>,
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
pub(super) struct Caches {
    pub(super) wiring: Wiring,
    /// Per pull secret name, that name's Secrets in every namespace (metadata only).
    pub(super) secrets: HashMap<String, Store<PartialObjectMeta<Secret>>>,
    /// Every namespace (only when something is provisioned).
    pub(super) namespaces: Option<Store<Namespace>>,
    /// The source Secrets, with their data.
    pub(super) sources: HashMap<SecretRef, Store<Secret>>,
    pub(super) tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Caches {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub(super) fn source_ref(source: &SecretRef) -> ObjectRef<Secret> {
    ObjectRef::new(&source.name).within(&source.namespace)
}

/// Whether the controller keeps pull secrets in `ns`.
pub(super) fn opted_in(ns: &Namespace, table: &Table) -> bool {
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

pub(super) fn managed(meta: &ObjectMeta) -> bool {
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
        state: ArcSwap::from_pointee(IndexState::Starting),
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
                        index
                            .state
                            .store(Arc::new(IndexState::Caches(Arc::new(live))));
                        current = Some(wiring);
                    }
                    Ok(None) => {
                        index.state.store(Arc::new(IndexState::Unchecked));
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
) -> Result<Option<Caches>, kube::Error> {
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
    let live = Caches {
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

impl Caches {
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
