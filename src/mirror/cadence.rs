//! How often a warning about lasting trouble is said: once per period per subject, DEBUG in
//! between (a registry's refused checks, copy Jobs asked for without a Kubernetes API).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::locks::lock;

/// How often a warning about lasting trouble is repeated.
const WARNING_EVERY: Duration = Duration::from_secs(600);

/// When each warning was last said, by what it is about.
#[derive(Default)]
pub(super) struct Cadence(Mutex<HashMap<String, Instant>>);

impl Cadence {
    /// Whether the warning about `key` is due: once per [`WARNING_EVERY`], DEBUG in between.
    pub(super) fn due(&self, key: &str) -> bool {
        let now = Instant::now();
        let mut warned = lock(&self.0);
        let due = warned
            .get(key)
            .is_none_or(|last| now.duration_since(*last) >= WARNING_EVERY);
        if due {
            warned.insert(key.to_string(), now);
        }
        due
    }
}
