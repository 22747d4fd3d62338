//! A circuit breaker per registry, so that a mirror in trouble costs admission nothing.
//!
//! After `threshold` checks in a row fail (time out, cannot connect, 5xx, 429), the circuit
//! opens: checks of that registry are answered *unknown* at once, without asking it, for a
//! back-off that doubles with every failed probe up to a cap. When the back-off is over one
//! check goes through as a probe (half-open) while the others are still answered at once; its
//! success closes the circuit. Pure: the time is passed in.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The breaker's settings (from `checks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitSettings {
    pub threshold: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
        backoff: Duration,
    },
    /// One probe is out; `backoff` is what the next opening lasts if it fails.
    HalfOpen {
        backoff: Duration,
    },
}

/// What to do with a check of a registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Ask the registry.
    Check,
    /// Ask the registry: this check is the half-open probe.
    Probe,
    /// Do not ask: answer unknown now.
    ShortCircuit,
}

/// A change of a registry's circuit, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened { for_: Duration },
    HalfOpened,
    Closed,
}

impl Transition {
    /// The `state` label of the transitions metric.
    pub fn label(self) -> &'static str {
        match self {
            Transition::Opened { .. } => "open",
            Transition::HalfOpened => "half-open",
            Transition::Closed => "closed",
        }
    }
}

/// The circuits of every registry checked so far.
#[derive(Debug, Default)]
pub struct Circuits {
    states: HashMap<String, State>,
}

impl Circuits {
    /// Whether a check of `registry` may go out now.
    pub fn admit(&mut self, registry: &str, now: Instant) -> (Admit, Option<Transition>) {
        match self.states.get(registry).copied() {
            None | Some(State::Closed { .. }) => (Admit::Check, None),
            Some(State::HalfOpen { .. }) => (Admit::ShortCircuit, None),
            Some(State::Open { until, .. }) if now < until => (Admit::ShortCircuit, None),
            Some(State::Open { backoff, .. }) => {
                self.states
                    .insert(registry.to_string(), State::HalfOpen { backoff });
                (Admit::Probe, Some(Transition::HalfOpened))
            }
        }
    }

    /// Records how a check that went out ended: `failed` when the registry did not answer
    /// usefully (any answer, even a 401 or a 404, is a working registry).
    pub fn record(
        &mut self,
        registry: &str,
        failed: bool,
        settings: CircuitSettings,
        now: Instant,
    ) -> Option<Transition> {
        let state = self
            .states
            .get(registry)
            .copied()
            .unwrap_or(State::Closed { failures: 0 });
        let (next, transition) = match (state, failed) {
            (State::Closed { .. }, false) => (State::Closed { failures: 0 }, None),
            (State::Closed { failures }, true) if failures + 1 >= settings.threshold.max(1) => {
                let for_ = settings.backoff.min(settings.max_backoff);
                open(now, for_)
            }
            (State::Closed { failures }, true) => (
                State::Closed {
                    failures: failures + 1,
                },
                None,
            ),
            (State::HalfOpen { .. }, false) => {
                (State::Closed { failures: 0 }, Some(Transition::Closed))
            }
            (State::HalfOpen { backoff }, true) => {
                open(now, backoff.saturating_mul(2).min(settings.max_backoff))
            }
            // A check admitted before the circuit opened: it changes nothing now.
            (open @ State::Open { .. }, _) => (open, None),
        };
        if next == (State::Closed { failures: 0 }) {
            self.states.remove(registry);
        } else {
            self.states.insert(registry.to_string(), next);
        }
        transition
    }

    /// Whether checks of `registry` are being answered without asking it.
    pub fn is_open(&self, registry: &str) -> bool {
        matches!(
            self.states.get(registry),
            Some(State::Open { .. } | State::HalfOpen { .. })
        )
    }
}

fn open(now: Instant, for_: Duration) -> (State, Option<Transition>) {
    (
        State::Open {
            until: now + for_,
            backoff: for_,
        },
        Some(Transition::Opened { for_ }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: CircuitSettings = CircuitSettings {
        threshold: 3,
        backoff: Duration::from_secs(5),
        max_backoff: Duration::from_secs(12),
    };

    #[test]
    fn opens_after_consecutive_failures_probes_once_and_backs_off_to_a_cap() {
        let mut c = Circuits::default();
        let t0 = Instant::now();
        let r = "mirror.example";
        // Two failures and a success: still closed, the count starts over.
        for failed in [true, true, false, true, true] {
            assert_eq!(c.admit(r, t0).0, Admit::Check);
            assert_eq!(c.record(r, failed, S, t0), None);
        }
        assert_eq!(
            c.record(r, true, S, t0),
            Some(Transition::Opened {
                for_: Duration::from_secs(5)
            })
        );
        assert!(c.is_open(r));
        assert_eq!(
            c.admit(r, t0 + Duration::from_secs(4)).0,
            Admit::ShortCircuit
        );
        // Over: one probe, everyone else still short-circuited while it is out.
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(c.admit(r, t1), (Admit::Probe, Some(Transition::HalfOpened)));
        assert_eq!(c.admit(r, t1).0, Admit::ShortCircuit);
        // The probe fails: open twice as long; then capped.
        assert_eq!(
            c.record(r, true, S, t1),
            Some(Transition::Opened {
                for_: Duration::from_secs(10)
            })
        );
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(c.admit(r, t2).0, Admit::Probe);
        assert_eq!(
            c.record(r, true, S, t2),
            Some(Transition::Opened {
                for_: Duration::from_secs(12)
            })
        );
        let t3 = t2 + Duration::from_secs(12);
        assert_eq!(c.admit(r, t3).0, Admit::Probe);
        assert_eq!(c.record(r, false, S, t3), Some(Transition::Closed));
        assert!(!c.is_open(r));
        assert_eq!(c.admit(r, t3).0, Admit::Check);
        // Other registries were never affected.
        assert_eq!(c.admit("other.example", t1).0, Admit::Check);
    }

    #[test]
    fn a_late_answer_from_before_the_opening_changes_nothing() {
        let mut c = Circuits::default();
        let t0 = Instant::now();
        for _ in 0..3 {
            c.record("r", true, S, t0);
        }
        assert_eq!(c.record("r", false, S, t0), None);
        assert!(c.is_open("r"));
    }
}
