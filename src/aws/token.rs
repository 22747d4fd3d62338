//! When an ECR token is renewed.

use std::time::{Duration, Instant, SystemTime};

/// Renew this long before AWS says a token expires (tokens last 12 hours).
pub const RENEW_BEFORE: Duration = Duration::from_secs(3600);
/// A token refused by a registry is renewed at once, but not sooner than this after the last
/// one was fetched: a registry that refuses every token must not turn each request into a
/// call to AWS.
pub const MIN_RENEWAL: Duration = Duration::from_secs(10);
/// How long a token is kept when its expiry says nothing useful (none, or already past on
/// arrival: a clock far off, or an emulator): until a registry refuses it, or this long.
const UNKNOWN_LIFETIME: Duration = Duration::from_secs(3600);

pub(super) struct Token {
    pub(super) user: String,
    pub(super) password: String,
    pub(super) fetched: Instant,
    pub(super) renew_at: Instant,
}

/// How long to keep a token fetched at `now` that expires at `expires`.
pub fn keep_for(now: SystemTime, expires: Option<SystemTime>) -> Duration {
    match expires.and_then(|e| e.duration_since(now).ok()) {
        Some(left) if left > 2 * RENEW_BEFORE => left - RENEW_BEFORE,
        // A short-lived token: renew half-way.
        Some(left) if left >= 2 * MIN_RENEWAL => left / 2,
        Some(_) | None => UNKNOWN_LIFETIME,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_kept_until_an_hour_before_they_expire_and_an_expired_one_for_a_while() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let h = |n: u64| Duration::from_secs(n * 3600);
        // ECR's 12 hours.
        assert_eq!(keep_for(now, Some(now + h(12))), h(11));
        // Short ones: half-way.
        assert_eq!(keep_for(now, Some(now + h(1))), Duration::from_secs(1800));
        // Already expired on arrival (moto's 2015), about to, or no expiry at all: kept a
        // while, not asked again on every request.
        let in_2015 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_420_070_400);
        for expires in [
            Some(in_2015),
            Some(now),
            Some(now + Duration::from_secs(5)),
            None,
        ] {
            assert_eq!(keep_for(now, expires), UNKNOWN_LIFETIME, "{expires:?}");
        }
    }
}
