//! The configuration in force: the mapping table and its settings, loaded at start and swapped
//! atomically when the file changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::mapping::{parse_file, Table, DEFAULT_TABLE_NAME, DEFAULT_TABLE_YAML};
use crate::metrics::{Metrics, ResultLabels};
use crate::problems::TableError;
use crate::settings::Settings;

/// The configuration layer's error.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read mapping table {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid mapping table")]
    Invalid(#[source] TableError),
    #[error("the configuration reload was cancelled")]
    Cancelled,
}

impl ConfigError {
    /// The label of this error in metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ConfigError::Read { .. } => "read",
            ConfigError::Invalid(_) => "invalid",
            ConfigError::Cancelled => "cancelled",
        }
    }
}

/// One table file: the mapping table, and the settings the registry layer is built from.
#[derive(Debug, Clone)]
pub struct Config {
    pub table: Table,
    pub settings: Arc<Settings>,
}

impl Config {
    /// Parses and validates a table file. `file` names it in every problem reported.
    pub fn parse(file: &str, yaml: &str) -> Result<Config, TableError> {
        let (table, settings) = parse_file(file, yaml)?;
        Ok(Config {
            table,
            settings: Arc::new(settings),
        })
    }

    /// The table compiled into the binary.
    pub fn embedded() -> Result<Config, TableError> {
        Config::parse(DEFAULT_TABLE_NAME, DEFAULT_TABLE_YAML)
    }
}

/// Reads and validates a table file, or the embedded table when `path` is `None`. Blocking: on
/// the runtime, go through [`ConfigHandle::reload`].
pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
    match path {
        None => Config::embedded().map_err(ConfigError::Invalid),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            Config::parse(&path.display().to_string(), &text).map_err(ConfigError::Invalid)
        }
    }
}

/// The configuration in force, shared by every request; readers never wait for a reload.
/// Subscribers ([`ConfigHandle::subscribe`]) hear of every swap.
#[derive(Clone)]
pub struct ConfigHandle {
    current: Arc<ArcSwap<Config>>,
    changes: Arc<watch::Sender<u64>>,
}

impl ConfigHandle {
    pub fn new(config: Config) -> Self {
        ConfigHandle {
            current: Arc::new(ArcSwap::from_pointee(config)),
            changes: Arc::new(watch::channel(0).0),
        }
    }

    pub fn current(&self) -> Arc<Config> {
        self.current.load_full()
    }

    /// Changes whenever a new configuration is swapped in.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Swaps in `config` and tells the subscribers.
    pub fn replace(&self, config: Config) {
        self.current.store(Arc::new(config));
        self.changes.send_modify(|generation| *generation += 1);
    }

    /// Re-reads `path` off the runtime's workers (a large table takes a while to parse); a
    /// valid table replaces the current one, an invalid one is logged and counted and the last
    /// good one stays.
    pub async fn reload(&self, path: &Path, metrics: &Metrics) -> Result<(), ConfigError> {
        let owned = path.to_path_buf();
        let result = tokio::task::spawn_blocking(move || load(Some(&owned)))
            .await
            .unwrap_or(Err(ConfigError::Cancelled));
        let label = if result.is_ok() { "success" } else { "failure" };
        metrics
            .config_reloads
            .get_or_create(&ResultLabels { result: label })
            .inc();
        match result {
            Ok(config) => {
                tracing::info!(file = %path.display(), entries = config.table.entries().len(),
                    rules = config.table.rules().len(), "mapping table reloaded");
                self.replace(config);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %crate::error::Report(&e),
                    "mapping table not reloaded; keeping the last good one");
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
            let (handle, path, metrics) = (handle.clone(), path.clone(), metrics.clone());
            async move {
                let _ = handle.reload(&path, &metrics).await;
            }
        })
    }
}
