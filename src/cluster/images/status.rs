//! PURE How what a replica learnt about an image changes its `MirroredImage` status.

use super::crd::{short_digest, Condition, Copying, LastCopy, MirroredImageStatus, Phase};
use crate::mirror::{CopyOutcome, Presence};

/// What a replica learnt about one (source, target) since its record was last written.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Change {
    /// An admission sent a Pod to the mirror (`lastUsed`).
    pub used: bool,
    /// An admission kept a Pod unchanged while the image is copied.
    pub queued: bool,
    /// A check of the mirror answered, and the digest it found.
    pub checked: Option<(Presence, Option<String>)>,
    /// A copy started, through this runner.
    pub started: Option<String>,
    pub ended: Option<CopyOutcome>,
}

impl Change {
    /// Folds a later change into this one.
    pub fn absorb(&mut self, later: Change) {
        self.used |= later.used;
        self.queued |= later.queued;
        if later.checked.is_some() {
            self.checked = later.checked;
        }
        if later.started.is_some() {
            self.started = later.started;
            self.ended = None;
        }
        if later.ended.is_some() {
            self.ended = later.ended;
            self.started = None;
        }
    }

    /// Whether it says nothing but that the image was used.
    pub fn only_used(&self) -> bool {
        self.checked.is_none() && self.started.is_none() && self.ended.is_none()
    }
}

/// `status` after `change`, at `now` (RFC 3339), written by `holder` (this replica).
pub fn apply(
    status: &mut MirroredImageStatus,
    target: &str,
    change: &Change,
    now: &str,
    holder: &str,
) {
    let before = status.phase;
    status.target = Some(target.to_string());
    let served = status.phase.is_some_and(Phase::is_served);
    if change.used {
        status.last_used = Some(now.to_string());
    }
    if change.queued && !served && status.phase != Some(Phase::Copying) {
        status.phase = Some(Phase::Copying);
    }
    if let Some((presence, digest)) = &change.checked {
        status.last_checked = Some(now.to_string());
        match presence {
            Presence::Present => {
                if status.phase != Some(Phase::WarmedUp) {
                    status.phase = Some(Phase::Present);
                }
                if let Some(d) = digest {
                    status.mirror_digest = Some(d.clone());
                }
            }
            Presence::Absent => {
                status.mirror_digest = None;
                if status.phase != Some(Phase::Copying) {
                    status.phase = Some(Phase::Missing);
                }
            }
            Presence::Unknown => {
                if status.phase.is_none() {
                    status.phase = Some(Phase::Unknown);
                }
            }
        }
    }
    if let Some(runner) = &change.started {
        status.phase = Some(Phase::Copying);
        status.copying = Some(Copying {
            holder: holder.to_string(),
            runner: runner.clone(),
            since: now.to_string(),
        });
    }
    let mut message = String::new();
    if let Some(end) = &change.ended {
        status.copying = None;
        let result = match (&end.error, end.gave_up) {
            (None, _) => "Succeeded",
            (Some(_), false) => "Failed",
            (Some(_), true) => "GaveUp",
        };
        status.last_copy = Some(LastCopy {
            result: result.to_string(),
            time: now.to_string(),
            attempts: end.attempts,
            runner: end.runner.clone(),
        });
        match &end.error {
            None => {
                status.phase = Some(if end.warm_up {
                    Phase::WarmedUp
                } else {
                    Phase::Present
                });
                status.last_checked = Some(now.to_string());
                if let Some(d) = &end.digest {
                    status.mirror_digest = Some(d.clone());
                    status.upstream_digest = Some(d.clone());
                }
            }
            Some(error) => {
                status.phase = Some(if end.gave_up {
                    Phase::Failed
                } else {
                    Phase::Copying
                });
                message = one_line(error);
            }
        }
    }
    status.short_digest = status.mirror_digest.as_deref().map(short_digest);
    let phase = status.phase.unwrap_or(Phase::Unknown);
    let (state, reason, default_message) = match phase {
        Phase::Present => ("True", "Present", "the mirror serves the image"),
        Phase::WarmedUp => (
            "True",
            "WarmedUp",
            "the pull-through cache has fetched the image",
        ),
        Phase::Missing => ("False", "NotOnMirror", "the mirror lacks the image"),
        Phase::Copying => ("False", "Copying", "a copy is queued or running"),
        Phase::Failed => ("False", "CopyFailed", "the copy gave up"),
        Phase::Unknown => ("Unknown", "Unknown", "the mirror did not answer"),
    };
    if message.is_empty() {
        // A failure's message stays until something else is known.
        let kept = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready" && c.reason == reason && before == Some(phase))
            .map(|c| c.message.clone());
        message = kept.unwrap_or_else(|| default_message.to_string());
    }
    let transition = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == state)
        .map_or_else(|| now.to_string(), |c| c.last_transition_time.clone());
    status.conditions = vec![Condition {
        type_: "Ready".into(),
        status: state.into(),
        reason: reason.into(),
        message,
        last_transition_time: transition,
    }];
}

/// An error in one line, at most 512 characters (a condition's message is read in a table).
fn one_line(error: &str) -> String {
    let line: String = error
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(512)
        .collect();
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2026-12-02T10:00:00Z";
    const LATER: &str = "2026-12-02T10:05:00Z";

    fn ended(error: Option<&str>, gave_up: bool) -> Change {
        Change {
            ended: Some(CopyOutcome {
                attempts: 2,
                runner: "in-process".into(),
                warm_up: false,
                digest: error
                    .is_none()
                    .then(|| format!("sha256:{}", "ab".repeat(32))),
                error: error.map(str::to_string),
                gave_up,
            }),
            ..Change::default()
        }
    }

    #[test]
    fn a_kept_image_goes_copying_then_present_with_its_digest() {
        let mut s = MirroredImageStatus::default();
        let used = Change {
            used: true,
            queued: true,
            checked: Some((Presence::Absent, None)),
            ..Change::default()
        };
        apply(&mut s, "m/app:1", &used, NOW, "replica-a");
        assert_eq!(s.phase, Some(Phase::Copying));
        assert_eq!(s.last_used.as_deref(), Some(NOW));
        assert_eq!(s.conditions[0].status, "False");
        let start = Change {
            started: Some("in-process".into()),
            ..Change::default()
        };
        apply(&mut s, "m/app:1", &start, NOW, "replica-a");
        assert_eq!(s.copying.as_ref().unwrap().holder, "replica-a");
        apply(&mut s, "m/app:1", &ended(None, false), LATER, "replica-a");
        assert_eq!(s.phase, Some(Phase::Present));
        assert_eq!(s.copying, None);
        assert_eq!(s.short_digest.as_deref(), Some("abababababab"));
        assert_eq!(s.last_checked.as_deref(), Some(LATER));
        let ready = &s.conditions[0];
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "Present")
        );
        assert_eq!(ready.last_transition_time, LATER);
        assert_eq!(s.last_copy.as_ref().unwrap().result, "Succeeded");
    }

    #[test]
    fn a_failure_says_why_in_one_line_and_a_retry_keeps_copying() {
        let mut s = MirroredImageStatus::default();
        apply(
            &mut s,
            "t",
            &ended(Some("pull: 500\nboom"), false),
            NOW,
            "a",
        );
        assert_eq!(s.phase, Some(Phase::Copying));
        assert_eq!(s.conditions[0].message, "pull: 500 boom");
        apply(&mut s, "t", &ended(Some("denied"), true), NOW, "a");
        assert_eq!(s.phase, Some(Phase::Failed));
        assert_eq!(s.conditions[0].reason, "CopyFailed");
        assert_eq!(s.conditions[0].message, "denied");
        assert_eq!(s.last_copy.as_ref().unwrap().result, "GaveUp");
        // Only a later use: the failure and its message stay.
        let used = Change {
            used: true,
            ..Change::default()
        };
        apply(&mut s, "t", &used, LATER, "a");
        assert_eq!(s.phase, Some(Phase::Failed));
        assert_eq!(s.conditions[0].message, "denied");
        assert_eq!(s.conditions[0].last_transition_time, NOW);
    }

    #[test]
    fn changes_fold_into_one_write() {
        let mut c = Change {
            used: true,
            ..Change::default()
        };
        assert!(c.only_used());
        c.absorb(Change {
            started: Some("job".into()),
            ..Change::default()
        });
        c.absorb(ended(None, false));
        assert!(c.used && c.started.is_none() && c.ended.is_some());
        assert!(!c.only_used());
    }
}
