//! Running a [`CopyRequest`] against the registries: the I/O side of the plain copy data the
//! admission path builds.

use futures::FutureExt;

use super::{CopyMode, CopyRequest};
use crate::registry::{CopyReport, Progress, Registries, RegistryError};

/// Why a copy did not happen.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A library panicked: this copy fails, the process goes on.
    #[error("copy of {reference} failed: internal error (panic)")]
    Panicked { reference: String },
}

impl MirrorError {
    /// Whether trying again cannot help (see [`RegistryError::permanent`]).
    pub fn permanent(&self) -> bool {
        match self {
            MirrorError::Registry(e) => e.permanent(),
            MirrorError::Panicked { .. } => false,
        }
    }

    /// The label of this error in metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            MirrorError::Registry(e) => e.metric_label(),
            MirrorError::Panicked { .. } => "panic",
        }
    }

    /// How long the registry asked us to wait before trying again.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            MirrorError::Registry(e) => e.retry_after(),
            MirrorError::Panicked { .. } => None,
        }
    }
}

impl CopyRequest {
    /// Does it. A panic inside a library fails this copy only.
    pub async fn run(
        &self,
        registries: &Registries,
        progress: Option<Progress>,
    ) -> Result<CopyReport, MirrorError> {
        let work = async {
            match self.mode {
                CopyMode::WarmUp => registries.warm_up(&self.target).await,
                CopyMode::Copy => {
                    registries
                        .copy_with(
                            &self.source,
                            &self.target,
                            &self.platforms,
                            progress,
                            self.referrers,
                        )
                        .await
                }
            }
        };
        match std::panic::AssertUnwindSafe(work).catch_unwind().await {
            Ok(result) => Ok(result?),
            Err(_) => Err(MirrorError::Panicked {
                reference: self.source.to_string(),
            }),
        }
    }
}
