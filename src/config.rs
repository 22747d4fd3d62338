//! The mapping table in force: loaded at start, swapped atomically when its file changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::mapping::{Table, TableError};
use crate::metrics::{Metrics, ResultLabels};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read mapping table {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid mapping table:\n{0}")]
    Invalid(#[from] TableError),
}

/// Reads and validates a table file, or returns the embedded table when `path` is `None`.
pub fn load(path: Option<&Path>) -> Result<Table, ConfigError> {
    match path {
        None => Ok(Table::embedded_default()?),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            Ok(Table::parse(&path.display().to_string(), &text)?)
        }
    }
}

/// The table in force, shared by every request; readers never wait for a reload.
#[derive(Clone)]
pub struct TableHandle(Arc<ArcSwap<Table>>);

impl TableHandle {
    pub fn new(table: Table) -> Self {
        TableHandle(Arc::new(ArcSwap::from_pointee(table)))
    }

    pub fn current(&self) -> Arc<Table> {
        self.0.load_full()
    }

    /// Re-reads `path`; a valid table replaces the current one, an invalid one is logged and
    /// counted and the last good table stays.
    pub fn reload(&self, path: &Path, metrics: &Metrics) -> Result<(), ConfigError> {
        let result = load(Some(path));
        let label = if result.is_ok() { "success" } else { "failure" };
        metrics
            .config_reloads
            .get_or_create(&ResultLabels { result: label })
            .inc();
        match result {
            Ok(table) => {
                tracing::info!(file = %path.display(), entries = table.entries().len(),
                    rules = table.rules().len(), "mapping table reloaded");
                self.0.store(Arc::new(table));
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "mapping table not reloaded; keeping the last good one");
                Err(e)
            }
        }
    }

    /// Reloads the table whenever the directory of `path` changes.
    pub fn watch(
        &self,
        path: PathBuf,
        metrics: Metrics,
    ) -> notify::Result<notify::RecommendedWatcher> {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let handle = self.clone();
        crate::watch::on_change(&dir, move || {
            let _ = handle.reload(&path, &metrics);
        })
    }
}
