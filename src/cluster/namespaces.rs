//! The names of the cluster's namespaces (a metadata-only watch), which bound the `namespace`
//! label of the rewrite metrics: a forged review can name any namespace, and a label value for
//! every made-up name would grow the metrics without end.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};

use super::spawn_stream;
use crate::admission::webhook::KnownNamespaces;

/// Every namespace's name, as the API server has them.
pub struct NamespaceNames {
    store: Store<PartialObjectMeta<Namespace>>,
    task: tokio::task::AbortHandle,
}

impl NamespaceNames {
    /// Starts the watch (the base RBAC's `list` and `watch` on namespaces).
    pub fn start(client: kube::Client) -> Arc<NamespaceNames> {
        let api: Api<PartialObjectMeta<Namespace>> = Api::all(client);
        let (store, writer) = reflector::store();
        let stream = reflector::reflector(
            writer,
            watcher(api, watcher::Config::default()).default_backoff(),
        )
        .touched_objects();
        let task = spawn_stream(stream, "namespaces", |_: PartialObjectMeta<Namespace>| {});
        Arc::new(NamespaceNames { store, task })
    }
}

impl NamespaceNames {
    /// Whether the first list is in (`/readyz` waits for it).
    pub fn filled(&self) -> bool {
        use futures::FutureExt as _;
        self.store.wait_until_ready().now_or_never().is_some()
    }
}

impl KnownNamespaces for NamespaceNames {
    fn knows(&self, namespace: &str) -> bool {
        self.store.get(&ObjectRef::new(namespace)).is_some()
    }
}

impl Drop for NamespaceNames {
    fn drop(&mut self) {
        self.task.abort();
    }
}
