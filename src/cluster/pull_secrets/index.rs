//! The admission path's view of which namespaces hold (or are about to hold) which pull secret.

use std::sync::Arc;

use arc_swap::ArcSwap;
use kube::runtime::reflector::ObjectRef;

use super::{opted_in, source_ref, Caches};
use crate::admission::webhook::PullSecrets;
use crate::config::ConfigHandle;

pub(super) enum IndexState {
    /// Caches not filled yet: no secret is known to exist.
    Starting,
    /// No right to read Secrets: every secret counts as there, as without Kubernetes access.
    Unchecked,
    Caches(Arc<Caches>),
}

/// The admission path's view of which namespaces hold which pull secret.
pub struct PullSecretIndex {
    pub(super) state: ArcSwap<IndexState>,
    pub(super) config: ConfigHandle,
}

impl PullSecretIndex {
    /// Whether the caches are filled (or not needed): `/readyz` waits for it.
    pub fn ready(&self) -> bool {
        !matches!(**self.state.load(), IndexState::Starting)
    }
}

impl PullSecrets for PullSecretIndex {
    fn available(&self, namespace: &str, secret: &str) -> bool {
        let live = match &**self.state.load() {
            IndexState::Starting => return false,
            IndexState::Unchecked => return true,
            IndexState::Caches(live) => live.clone(),
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
