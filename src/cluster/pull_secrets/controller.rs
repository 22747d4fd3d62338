//! The controller that keeps a copy of each mirror's `pullSecretFrom` Secret in every opted-in
//! namespace, and removes ours from namespaces that opt out.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::ResourceExt;

use super::{
    managed, opted_in, source_ref, Wiring, DOCKER_CONFIG_JSON, MANAGED_BY_LABEL, MANAGED_BY_VALUE,
    PULL_SECRET_SOURCE_ANNOTATION,
};
use crate::cluster::FIELD_MANAGER;
use crate::config::ConfigHandle;
use crate::error::Report;
use crate::locks::lock;
use crate::mapping::SecretRef;
use crate::metrics::{Metrics, ReasonLabels, SecretLabels};

pub(super) struct Context {
    pub(super) client: kube::Client,
    pub(super) config: ConfigHandle,
    pub(super) metrics: Metrics,
    pub(super) recorder: Recorder,
    pub(super) wiring: Wiring,
    pub(super) secrets: HashMap<String, Store<PartialObjectMeta<Secret>>>,
    pub(super) sources: HashMap<SecretRef, Store<Secret>>,
    /// (namespace, secret) pairs known to hold someone else's Secret: reported once each.
    pub(super) conflicts: Mutex<HashSet<(String, String)>>,
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

pub(super) async fn reconcile(
    ns: Arc<Namespace>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
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

pub(super) fn error_policy(_ns: Arc<Namespace>, _e: &ReconcileError, _ctx: Arc<Context>) -> Action {
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
