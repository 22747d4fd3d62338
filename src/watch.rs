//! Directory watching for reloads.
//!
//! Kubernetes updates a mounted Secret or ConfigMap by swapping a `..data` symlink in its
//! directory, so a watch on the file itself never fires: watch the directory and re-read on any
//! event. Events come in bursts; they are coalesced before `reload` runs.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};

/// Runs `reload` (on the tokio runtime) after changes in `dir` settle, one reload at a time.
/// Keep the returned watcher alive for as long as reloads should happen.
pub fn on_change<F, Fut>(dir: &Path, mut reload: F) -> notify::Result<RecommendedWatcher>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            // A full channel already means "reload pending".
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            while rx.try_recv().is_ok() {}
            reload().await;
        }
    });
    Ok(watcher)
}
