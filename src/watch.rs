//! Watching files for reloads.
//!
//! Kubernetes updates a mounted Secret or ConfigMap by swapping a `..data` symlink in its
//! directory, so a watch on the file itself never fires: the directory is watched, and only
//! events that name a watched file or the kubelet's `..data` link count. Anything else in the
//! directory (a log file, an editor's swap file) is ignored. Events come in bursts; they are
//! coalesced before `reload` runs, and the reload itself decides, by content hash, whether
//! anything changed.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use sha2::Digest as _;

/// The name of the link the kubelet swaps to update a mounted Secret or ConfigMap.
const KUBELET_DATA_LINK: &str = "..data";

/// A watched file's directory and name.
fn split(file: &Path) -> (PathBuf, OsString) {
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let name = file.file_name().map(OsString::from).unwrap_or_default();
    (dir, name)
}

/// Whether an event on `path` concerns one of `watched` (directory, file name) pairs.
fn concerns(watched: &[(PathBuf, OsString)], path: &Path) -> bool {
    let (dir, name) = split(path);
    watched
        .iter()
        .any(|(d, n)| (name == *n || name == KUBELET_DATA_LINK) && (dir == *d || same_dir(&dir, d)))
}

/// Whether two spellings of a directory (`./x`, `/abs/x`) are one directory.
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Runs `reload` (on the tokio runtime) after changes to any of `files` settle, one reload at a
/// time. Keep the returned watcher alive for as long as reloads should happen.
pub fn on_change<F, Fut>(files: &[&Path], mut reload: F) -> notify::Result<RecommendedWatcher>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let watched: Vec<(PathBuf, OsString)> = files.iter().map(|f| split(f)).collect();
    let dirs: BTreeSet<PathBuf> = watched.iter().map(|(d, _)| d.clone()).collect();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let filter = watched.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else {
            return;
        };
        if !event.kind.is_access() && event.paths.iter().any(|p| concerns(&filter, p)) {
            // A full channel already means "reload pending".
            let _ = tx.try_send(());
        }
    })?;
    for dir in &dirs {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            while rx.try_recv().is_ok() {}
            reload().await;
        }
    });
    Ok(watcher)
}

/// The content hash a reload compares, so that an event that changed nothing reloads nothing.
pub fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = sha2::Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_watched_file_and_the_kubelet_link_count() {
        let watched = vec![split(Path::new("/etc/image-mirror/config/config.yaml"))];
        for (path, counts) in [
            ("/etc/image-mirror/config/config.yaml", true),
            ("/etc/image-mirror/config/..data", true),
            ("/etc/image-mirror/config/serve.log", false),
            ("/etc/image-mirror/config/..data_tmp", false),
            ("/etc/image-mirror/config/.config.yaml.swp", false),
            ("/elsewhere/config.yaml", false),
        ] {
            assert_eq!(concerns(&watched, Path::new(path)), counts, "{path}");
        }
        let relative = [split(Path::new("table.yaml"))];
        assert_eq!(relative[0].0, PathBuf::from("."));
    }

    #[test]
    fn digests_tell_contents_apart() {
        assert_eq!(digest(&[b"a", b"b"]), digest(&[b"a", b"b"]));
        assert_ne!(digest(&[b"ab", b""]), digest(&[b"a", b"b"]));
    }
}
