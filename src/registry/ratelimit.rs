//! Docker Hub's pull budget: `ratelimit-limit: 100;w=21600` and `ratelimit-remaining: 76;w=21600`
//! on manifest responses. oci-client drops response headers, so they are read by one `HEAD` of
//! the manifest (Docker Hub counts GETs, not HEADs), with the pull token oci-client gets.

use std::time::Duration;

use oci_client::RegistryOperation;

use super::{to_oci, HostClient, Registries, MANIFEST_TYPES};
use crate::metrics::RegistryLabels;
use crate::reference::{wire_host, Reference};

/// A registry's pull budget, as its last answer gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Pulls allowed per window, when the registry says.
    pub limit: Option<u64>,
    pub remaining: u64,
    /// The window's length (`w=`), when the registry says.
    pub window: Option<Duration>,
}

impl RateLimit {
    /// From the two headers' values; `None` without a readable `ratelimit-remaining`.
    pub fn from_headers(limit: Option<&str>, remaining: Option<&str>) -> Option<RateLimit> {
        let (remaining, w1) = parse_quota(remaining?)?;
        let (limit, w2) = match limit.and_then(parse_quota) {
            Some((l, w)) => (Some(l), w),
            None => (None, None),
        };
        Some(RateLimit {
            limit,
            remaining,
            window: w1.or(w2).map(Duration::from_secs),
        })
    }
}

/// `76;w=21600` → (76, Some(21600)); `76` → (76, None).
fn parse_quota(value: &str) -> Option<(u64, Option<u64>)> {
    let mut parts = value.split(';');
    let count = parts.next()?.trim().parse().ok()?;
    let window = parts
        .filter_map(|p| p.trim().strip_prefix("w="))
        .find_map(|w| w.trim().parse().ok());
    Some((count, window))
}

impl HostClient {
    /// `request` with this registry's credentials for pulling `image`: the bearer token
    /// oci-client negotiates, else basic credentials, else none.
    pub(super) async fn authorized(
        &self,
        request: reqwest::RequestBuilder,
        image: &oci_client::Reference,
    ) -> reqwest::RequestBuilder {
        // The token exchange is a request of its own: bounded like any other.
        let token = tokio::time::timeout(
            self.timeouts.response,
            self.client.auth(image, &self.auth, RegistryOperation::Pull),
        )
        .await;
        match token {
            Ok(Ok(Some(token))) => request.bearer_auth(token),
            _ => match &self.auth {
                oci_client::secrets::RegistryAuth::Basic(u, p) => request.basic_auth(u, Some(p)),
                _ => request,
            },
        }
    }

    /// `https://host/v2/<name>/<what>`, or `http://` for a plain-HTTP registry.
    pub(super) fn api_url(&self, on: &Reference, what: &str) -> (String, oci_client::Reference) {
        let image = to_oci(on);
        let scheme = if self.plain { "http" } else { "https" };
        let url = format!(
            "{scheme}://{}/v2/{}/{what}",
            wire_host(on.registry()),
            image.repository()
        );
        (url, image)
    }
}

impl Registries {
    /// The pull budget `reference`'s registry has left, read from one `HEAD` of its manifest,
    /// and set in the registry's gauges; `None` when the registry does not say (most do not) or
    /// does not answer.
    pub async fn rate_limit(&self, reference: &Reference) -> Option<RateLimit> {
        let host = self.client(reference.registry()).await.ok()?;
        let what = match (reference.canonical().digest(), reference.effective_tag()) {
            (Some(d), _) => format!("manifests/{d}"),
            (None, Some(t)) => format!("manifests/{t}"),
            (None, None) => return None,
        };
        let (url, image) = host.api_url(reference, &what);
        let request = host
            .probe
            .head(url)
            .header(reqwest::header::ACCEPT, MANIFEST_TYPES.join(", "));
        // Only informative: a registry that does not answer in time has no budget to report.
        let asked = async { host.authorized(request, &image).await.send().await };
        let response = tokio::time::timeout(host.timeouts.response, asked)
            .await
            .ok()?
            .ok()?;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let seen = RateLimit::from_headers(
            header("ratelimit-limit").as_deref(),
            header("ratelimit-remaining").as_deref(),
        )?;
        if let Some(m) = &self.metrics {
            let labels = RegistryLabels {
                registry: host.host.clone(),
            };
            let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            m.ratelimit_remaining
                .get_or_create(&labels)
                .set(gauge(seen.remaining));
            if let Some(limit) = seen.limit {
                m.ratelimit_limit.get_or_create(&labels).set(gauge(limit));
            }
        }
        Some(seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_s_headers_are_read() {
        let r = RateLimit::from_headers(Some("100;w=21600"), Some("76;w=21600")).unwrap();
        assert_eq!(
            r,
            RateLimit {
                limit: Some(100),
                remaining: 76,
                window: Some(Duration::from_secs(21600)),
            }
        );
        let r = RateLimit::from_headers(None, Some(" 0 ")).unwrap();
        assert_eq!((r.limit, r.remaining, r.window), (None, 0, None));
        assert_eq!(
            RateLimit::from_headers(Some("100;w=60"), Some("5"))
                .unwrap()
                .window,
            Some(Duration::from_secs(60))
        );
        assert!(RateLimit::from_headers(Some("100;w=21600"), None).is_none());
        assert!(RateLimit::from_headers(None, Some("lots")).is_none());
        assert!(RateLimit::from_headers(None, Some("-1;w=5")).is_none());
    }
}
