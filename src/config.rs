//! The configuration in force: the mapping table and its settings, loaded at start and swapped
//! atomically when the file changes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::locks::lock;
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
        Some(path) => parse_text(path, &read_text(path)?.0),
    }
}

/// A table file's text and its content hash.
fn read_text(path: &Path) -> Result<(String, [u8; 32]), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let digest = crate::watch::digest(&[text.as_bytes()]);
    Ok((text, digest))
}

fn parse_text(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let config = Config::parse(&path.display().to_string(), text).map_err(ConfigError::Invalid)?;
    // Valid, and in force; but probably not what was meant (check-config shows these too).
    for w in config.table.warnings() {
        tracing::warn!(warning = %w, "the table has a setting that is probably not what was meant");
    }
    Ok(config)
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    Replaced,
    /// The file's content is what is in force already.
    Unchanged,
}

/// A table file and the content hash of what was last read from it.
type Source = (PathBuf, [u8; 32]);

/// The configuration in force, shared by every request; readers never wait for a reload.
/// Subscribers ([`ConfigHandle::subscribe`]) hear of every swap.
#[derive(Clone)]
pub struct ConfigHandle {
    current: Arc<ArcSwap<Config>>,
    changes: Arc<watch::Sender<u64>>,
    /// The file it was read from and the hash of what is in force, for reloads.
    source: Arc<Mutex<Option<Source>>>,
}

impl ConfigHandle {
    pub fn new(config: Config) -> Self {
        ConfigHandle {
            current: Arc::new(ArcSwap::from_pointee(config)),
            changes: Arc::new(watch::channel(0).0),
            source: Arc::new(Mutex::new(None)),
        }
    }

    /// Reads `path` (or takes the embedded table) and remembers where it came from, for
    /// [`ConfigHandle::reload`]. Blocking.
    pub fn open(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(ConfigHandle::new(load(None)?));
        };
        let (text, digest) = read_text(path)?;
        let handle = ConfigHandle::new(parse_text(path, &text)?);
        *lock(&handle.source) = Some((path.to_path_buf(), digest));
        Ok(handle)
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

    /// Re-reads the file the configuration came from, off the runtime's workers (a large table
    /// takes a while to parse). Content identical to what is in force is counted and left; a
    /// valid table replaces the current one; an invalid one is logged and counted and the last
    /// good one stays.
    pub async fn reload(&self, metrics: &Metrics) -> Result<Reloaded, ConfigError> {
        let Some((path, digest)) = lock(&self.source).clone() else {
            return Ok(Reloaded::Unchanged);
        };
        let file = path.clone();
        let result = tokio::task::spawn_blocking(move || {
            let (text, new) = read_text(&file)?;
            if new == digest {
                return Ok((None, new));
            }
            Ok((Some(parse_text(&file, &text)?), new))
        })
        .await
        .unwrap_or(Err(ConfigError::Cancelled));
        let label = match &result {
            Ok((None, _)) => "unchanged",
            Ok((Some(_), _)) => "success",
            Err(_) => "failure",
        };
        metrics
            .config_reloads
            .get_or_create(&ResultLabels { result: label })
            .inc();
        match result {
            Ok((None, _)) => {
                tracing::debug!(file = %path.display(), "mapping table unchanged; not reloaded");
                Ok(Reloaded::Unchanged)
            }
            Ok((Some(config), digest)) => {
                tracing::info!(file = %path.display(), entries = config.table.entries().len(),
                    rules = config.table.rules().len(), "mapping table reloaded");
                self.replace(config);
                *lock(&self.source) = Some((path, digest));
                Ok(Reloaded::Replaced)
            }
            Err(e) => {
                tracing::error!(error = %crate::error::Report(&e),
                    "mapping table not reloaded; keeping the last good one");
                Err(e)
            }
        }
    }

    /// Reloads whenever the file the configuration came from changes; `None` for the embedded
    /// table.
    pub fn watch(&self, metrics: Metrics) -> notify::Result<Option<notify::RecommendedWatcher>> {
        let Some((path, _)) = lock(&self.source).clone() else {
            return Ok(None);
        };
        let handle = self.clone();
        crate::watch::on_change(&[&path], move || {
            let (handle, metrics) = (handle.clone(), metrics.clone());
            async move {
                let _ = handle.reload(&metrics).await;
            }
        })
        .map(Some)
    }
}
