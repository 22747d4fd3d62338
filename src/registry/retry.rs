//! Retries with back-off, and the `Retry-After` of a 429.
//!
//! oci-client has no retries and drops response headers, so a `429`'s `Retry-After` is read by
//! one extra `HEAD` of the refused URL (HEADs do not count against Docker Hub's pull limit).

use std::future::Future;
use std::time::{Duration, SystemTime};

use oci_client::errors::OciDistributionError;

use super::failure::{failure_of, Failure, RegistryError};
use super::{HostClient, Registries};
use crate::metrics::RegistryLabels;

impl Registries {
    /// Runs `f` until it succeeds, fails for good, or runs out of the configured tries; each
    /// try must be answered within the response timeout.
    pub(super) async fn retry<T, F, Fut>(
        &self,
        host: &HostClient,
        op: &'static str,
        reference: &str,
        f: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, OciDistributionError>>,
    {
        self.attempts(
            host,
            op,
            reference,
            self.options.attempts,
            Bound::Response,
            f,
        )
        .await
    }

    /// [`retry`](Self::retry) for a transfer that may take minutes: only silence (the idle
    /// timeout) ends a try.
    pub(super) async fn retry_transfer<T, F, Fut>(
        &self,
        host: &HostClient,
        op: &'static str,
        reference: &str,
        f: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, OciDistributionError>>,
    {
        self.attempts(host, op, reference, self.options.attempts, Bound::Idle, f)
            .await
    }

    /// Runs `f` at most `tries` times (twice at most when no answer came in time); every
    /// failure is sorted into a [`Failure`].
    pub(super) async fn attempts<T, F, Fut>(
        &self,
        host: &HostClient,
        op: &'static str,
        reference: &str,
        tries: u32,
        bound: Bound,
        mut f: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, OciDistributionError>>,
    {
        let timeouts = host.timeouts;
        let no_answer = |waited| RegistryError::NoAnswer {
            op,
            reference: reference.to_string(),
            registry: host.host.clone(),
            waited,
        };
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let answer = match bound {
                Bound::Response => tokio::time::timeout(timeouts.response, f())
                    .await
                    .map_err(|_| timeouts.response),
                Bound::Idle => Ok(f().await),
            };
            let (failure, error) = match answer {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(source)) => {
                    let failure = self.classify(host, &source).await;
                    let error = match failure {
                        // reqwest's read timeout: the idle one.
                        Failure::Timeout => no_answer(timeouts.idle),
                        _ => RegistryError::Request {
                            op,
                            reference: reference.to_string(),
                            failure,
                            source,
                        },
                    };
                    (failure, error)
                }
                Err(waited) => (Failure::Timeout, no_answer(waited)),
            };
            let wait = match failure {
                Failure::TooManyRequests(Some(d)) if d > self.options.max_retry_after => None,
                Failure::TooManyRequests(Some(d)) => Some(d),
                // A registry that did not answer once is asked once more, not until the
                // caller gives up on it.
                Failure::Timeout if attempt >= 2 => None,
                f if f.retryable() => Some(backoff(
                    self.options.backoff,
                    self.options.max_backoff,
                    attempt,
                )),
                _ => None,
            };
            match wait {
                Some(wait) if attempt < tries => {
                    tracing::debug!(op, reference, attempt, error = %crate::error::Report(&error),
                        wait_ms = wait.as_millis() as u64, "registry operation failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                _ => return Err(error),
            }
        }
    }

    /// Maps an oci-client error to a [`Failure`], reading `Retry-After` on a 429.
    async fn classify(&self, host: &HostClient, e: &OciDistributionError) -> Failure {
        let (failure, url) = failure_of(e);
        if let Failure::TooManyRequests(_) = failure {
            if let Some(m) = &self.metrics {
                m.too_many_requests
                    .get_or_create(&RegistryLabels {
                        registry: host.host.clone(),
                    })
                    .inc();
            }
            let wait = match url {
                Some(url) => probe_retry_after(&host.probe, url).await,
                None => None,
            };
            return Failure::TooManyRequests(wait);
        }
        failure
    }
}

/// What ends a try that gets no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Bound {
    /// The response timeout: a request whose whole answer is small.
    Response,
    /// Only the idle timeout: a transfer.
    Idle,
}

/// Exponential back-off with full jitter: a random wait in [base·2ⁿ⁻¹/2, base·2ⁿ⁻¹], capped.
pub fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let ceiling = exp.min(max);
    let half = ceiling / 2;
    half + ceiling.mul_f64(rand::random::<f64>() * 0.5)
}

/// One `HEAD` of a URL that answered 429, to read its `Retry-After` (seconds or HTTP date).
async fn probe_retry_after(client: &reqwest::Client, url: &str) -> Option<Duration> {
    let res = client.head(url).send().await.ok()?;
    if res.status() != reqwest::StatusCode::TOO_MANY_REQUESTS {
        return None;
    }
    let value = res
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?;
    parse_retry_after(value, SystemTime::now())
}

/// `Retry-After: 120` or `Retry-After: Wed, 21 Oct 2015 07:28:00 GMT`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:29:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        for attempt in 1..20 {
            let d = backoff(base, max, attempt);
            let ceiling = (base * (1 << (attempt - 1).min(16))).min(max);
            assert!(d >= ceiling / 2 && d <= ceiling, "attempt {attempt}: {d:?}");
        }
    }
}
