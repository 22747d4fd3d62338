//! The Kubernetes API, when `serve` has access to one (in-cluster, or `KUBECONFIG`): the pull
//! secret index the admission path asks, and the controller that provisions pull secrets
//! ([`pull_secrets`]); copies run as Jobs ([`copy_jobs`]); the namespaces' names, which bound
//! a metric label ([`namespaces`]). Without access, `serve` works as it always did.

pub mod copy_jobs;
pub mod images;
pub mod namespaces;
pub mod pull_secrets;

use std::path::PathBuf;

use futures::StreamExt;
use kube::runtime::watcher;

use crate::error::Report;

pub use pull_secrets::{
    PullSecretIndex, MANAGED_BY_LABEL, MANAGED_BY_VALUE, PULL_SECRET_SOURCE_ANNOTATION,
};

/// The field manager of every write, shared by all replicas so that their server-side applies
/// are one and the same (they cannot fight over fields).
pub const FIELD_MANAGER: &str = "image-mirror-webhook";

/// The Kubernetes layer's error.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot read the Kubernetes client configuration")]
    Config(#[source] kube::config::InferConfigError),
    #[error("cannot build a Kubernetes client")]
    Client(#[source] kube::Error),
}

impl ClusterError {
    /// The label of this error in metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ClusterError::Config(_) => "config",
            ClusterError::Client(_) => "client",
        }
    }
}

/// Whether `serve` uses the Kubernetes API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Access {
    /// When there is a client configuration (in-cluster or a kubeconfig).
    #[default]
    Auto,
    /// Never.
    Off,
}

/// A client from the standard configuration; `None` when there is none to be had (no
/// kubeconfig and not in a cluster). A configuration that is there but broken is an error.
pub async fn connect(access: Access) -> Result<Option<kube::Client>, ClusterError> {
    if access == Access::Off {
        return Ok(None);
    }
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let kubeconfig = std::env::var_os("KUBECONFIG").is_some()
        || std::env::var_os("HOME")
            .map(|home| PathBuf::from(home).join(".kube/config"))
            .is_some_and(|p| p.exists());
    if !in_cluster && !kubeconfig {
        return Ok(None);
    }
    let config = kube::Config::infer().await.map_err(ClusterError::Config)?;
    kube::Client::try_from(config)
        .map(Some)
        .map_err(ClusterError::Client)
}

/// Drives a watch stream in a task, calling `seen` for every item; errors are logged and the
/// stream (with its back-off) goes on. Stopped by aborting the handle.
pub(crate) fn spawn_stream<K, S>(
    stream: S,
    what: &'static str,
    mut seen: impl FnMut(K) + Send + 'static,
) -> tokio::task::AbortHandle
where
    K: Send + 'static,
    S: futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(obj) => seen(obj),
                Err(e) => tracing::warn!(what, error = %Report(&e), "watch failed; retrying"),
            }
        }
    })
    .abort_handle()
}
