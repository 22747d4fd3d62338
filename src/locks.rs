//! One policy for poisoned locks, everywhere.

use std::sync::{Mutex, MutexGuard};

/// The guard of `m`, also after a panic while it was held: nothing this crate keeps under a
/// lock is left half-written by a panic (every update is one insert, remove or assignment), so
/// a poisoned lock is as good as any.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
