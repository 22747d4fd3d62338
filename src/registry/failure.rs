//! The registry layer's error, and how oci-client's errors sort into what retries and checks
//! care about.

use std::fmt;
use std::time::Duration;

use oci_client::errors::{OciDistributionError, OciErrorCode};

use crate::reference::ReferenceError;

/// What went wrong talking to a registry, as far as retrying and checks care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// manifest unknown, name unknown, 404: the thing is not there.
    NotFound,
    /// 401 or 403, or a failed token exchange.
    Denied,
    /// 429; how long the registry asked us to wait, when it said.
    TooManyRequests(Option<Duration>),
    /// No answer in time.
    Timeout,
    /// Connection refused or reset, TLS failure, a broken body.
    Transport,
    /// 5xx and other answers that may heal.
    Server,
    /// An answer that will not change on retry: a bad digest, a refused manifest, garbage.
    Invalid,
}

impl Failure {
    pub(crate) fn retryable(self) -> bool {
        matches!(
            self,
            Failure::TooManyRequests(_) | Failure::Timeout | Failure::Transport | Failure::Server
        )
    }

    /// The label of this failure in metrics.
    pub fn label(self) -> &'static str {
        match self {
            Failure::NotFound => "not-found",
            Failure::Denied => "denied",
            Failure::TooManyRequests(_) => "too-many-requests",
            Failure::Timeout => "timeout",
            Failure::Transport => "transport",
            Failure::Server => "server",
            Failure::Invalid => "invalid",
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::NotFound => f.write_str("not found"),
            Failure::Denied => f.write_str("access denied"),
            Failure::TooManyRequests(Some(d)) => {
                write!(f, "429 too many requests (retry after {}s)", d.as_secs())
            }
            Failure::TooManyRequests(None) => f.write_str("429 too many requests"),
            Failure::Timeout => f.write_str("timed out"),
            Failure::Transport => f.write_str("connection failed"),
            Failure::Server => f.write_str("registry error"),
            Failure::Invalid => f.write_str("registry refused the request"),
        }
    }
}

/// Why the credentials of a registry could not be read. Never holds a credential.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("environment variable {unset} is not set, but {set} is")]
    HalfSet { set: String, unset: String },
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}")]
    DockerConfig {
        path: String,
        #[source]
        source: DockerConfigError,
    },
}

/// What is wrong with a docker `config.json` / `.dockerconfigjson`. Names keys, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DockerConfigError {
    #[error("not a docker config file: {category} at line {line}, column {column}")]
    NotJson {
        category: &'static str,
        line: usize,
        column: usize,
    },
    #[error("the auth of {0:?} is not base64")]
    NotBase64(String),
    #[error("the auth of {0:?} is not UTF-8")]
    NotUtf8(String),
    #[error("the auth of {0:?} is not user:password")]
    NotUserPassword(String),
    #[error("the entry {0:?} holds an identity token, which is not supported; use user:password")]
    IdentityToken(String),
    #[error("the entry {0:?} has no credentials")]
    NoCredentials(String),
}

/// An image that cannot be copied as it is.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("manifest is not valid JSON")]
    NotJson(#[source] serde_json::Error),
    #[error("Docker schema 1 manifests cannot be copied (re-push the image)")]
    SchemaV1,
    #[error("no manifest in the index matches the platforms {0}")]
    NoPlatformMatch(String),
    #[error(
        "a reference pinned by digest needs every platform of the index; remove the platforms \
         setting for it"
    )]
    PinnedNeedsAllPlatforms,
    #[error("indexes nested more than 3 deep")]
    NestedTooDeep,
    #[error("invalid media type {0:?}")]
    MediaType(String),
    #[error(
        "the image is {size} bytes or more, over copies.maxImageSize ({max} bytes); copy it by \
         hand or raise the limit"
    )]
    TooLarge { size: u64, max: u64 },
    #[error("no valid reference for it")]
    Reference(#[source] ReferenceError),
}

/// The registry layer's error: what was being done to what, and why it failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("credentials for {host}")]
    Credentials {
        host: String,
        #[source]
        source: CredentialError,
    },
    #[error("credentials for {host} from AWS")]
    Aws {
        host: String,
        #[source]
        source: Box<crate::aws::AwsError>,
    },
    #[error("CA file {path} for {host}")]
    CaFile {
        host: String,
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{op} {reference}: {failure}")]
    Request {
        op: &'static str,
        reference: String,
        failure: Failure,
        #[source]
        source: OciDistributionError,
    },
    #[error("{op} {reference}: no answer from {registry} in {} s", waited.as_secs_f64())]
    NoAnswer {
        op: &'static str,
        reference: String,
        registry: String,
        waited: std::time::Duration,
    },
    #[error("{reference}")]
    Image {
        reference: String,
        #[source]
        source: ImageError,
    },
}

impl RegistryError {
    pub fn failure(&self) -> Option<Failure> {
        match self {
            RegistryError::Request { failure, .. } => Some(*failure),
            RegistryError::NoAnswer { .. } => Some(Failure::Timeout),
            _ => None,
        }
    }

    /// Whether trying again cannot help: the image itself is unusable (a schema 1 manifest, no
    /// matching platform, garbage) or the registry refuses what it is (a bad digest, a refused
    /// manifest). Missing images, refused credentials and a CA file may all be fixed meanwhile.
    pub fn permanent(&self) -> bool {
        match self {
            RegistryError::Image { .. } => true,
            RegistryError::Request { failure, .. } => *failure == Failure::Invalid,
            RegistryError::Credentials { .. }
            | RegistryError::Aws { .. }
            | RegistryError::CaFile { .. }
            | RegistryError::NoAnswer { .. } => false,
        }
    }

    /// How long a registry asked us to wait before trying again.
    pub fn retry_after(&self) -> Option<Duration> {
        match self.failure() {
            Some(Failure::TooManyRequests(d)) => d,
            _ => None,
        }
    }

    /// The label of this error in metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            RegistryError::Credentials { .. } => "credentials",
            RegistryError::Aws { .. } => "aws",
            RegistryError::CaFile { .. } => "ca-file",
            RegistryError::Request { failure, .. } => failure.label(),
            RegistryError::NoAnswer { .. } => Failure::Timeout.label(),
            RegistryError::Image { .. } => "invalid-image",
        }
    }

    pub(crate) fn image(reference: impl fmt::Display, source: ImageError) -> Self {
        RegistryError::Image {
            reference: reference.to_string(),
            source,
        }
    }
}

/// Sorts an oci-client error into a [`Failure`], with the URL it came from when known.
pub(crate) fn failure_of(e: &OciDistributionError) -> (Failure, Option<&str>) {
    use OciDistributionError as E;
    match e {
        E::RegistryError { envelope, url } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            let failure = if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                )
            }) {
                Failure::NotFound
            } else if codes.contains(&&OciErrorCode::Toomanyrequests) {
                Failure::TooManyRequests(None)
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                Failure::Denied
            } else {
                Failure::Invalid
            };
            (failure, Some(url))
        }
        E::ServerError { code, url, .. } => {
            let failure = match code {
                404 => Failure::NotFound,
                429 => Failure::TooManyRequests(None),
                401 | 403 => Failure::Denied,
                408 | 500..=599 => Failure::Server,
                _ => Failure::Invalid,
            };
            (failure, Some(url))
        }
        E::UnauthorizedError { url } => (Failure::Denied, Some(url)),
        E::AuthenticationFailure(_) => (Failure::Denied, None),
        E::RequestError(re) => {
            let failure = if re.is_timeout() {
                Failure::Timeout
            } else if let Some(status) = re.status() {
                match status.as_u16() {
                    404 => Failure::NotFound,
                    429 => Failure::TooManyRequests(None),
                    401 | 403 => Failure::Denied,
                    _ => Failure::Server,
                }
            } else {
                Failure::Transport
            };
            (failure, re.url().map(|u| u.as_str()))
        }
        E::IoError(_) => (Failure::Transport, None),
        E::SpecViolationError(_) => (Failure::Server, None),
        _ => (Failure::Invalid, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_sort_into_failures() {
        use oci_client::errors::{OciEnvelope, OciError};
        let envelope = |code: OciErrorCode| OciDistributionError::RegistryError {
            envelope: OciEnvelope {
                errors: vec![OciError {
                    code,
                    message: "m".into(),
                    detail: serde_json::Value::Null,
                }],
            },
            url: "http://127.0.0.1/v2/x/manifests/1".into(),
        };
        let server = |code: u16| OciDistributionError::ServerError {
            code,
            url: "u".into(),
            message: String::new(),
        };
        let cases = [
            (envelope(OciErrorCode::ManifestUnknown), Failure::NotFound),
            (envelope(OciErrorCode::NameUnknown), Failure::NotFound),
            (
                envelope(OciErrorCode::Toomanyrequests),
                Failure::TooManyRequests(None),
            ),
            (envelope(OciErrorCode::Denied), Failure::Denied),
            (envelope(OciErrorCode::Unsupported), Failure::Invalid),
            (server(404), Failure::NotFound),
            (server(429), Failure::TooManyRequests(None)),
            (server(401), Failure::Denied),
            (server(503), Failure::Server),
            (server(400), Failure::Invalid),
        ];
        for (e, want) in cases {
            assert_eq!(failure_of(&e).0, want, "{e}");
        }
    }

    #[test]
    fn the_report_names_the_operation_and_the_registry_s_words() {
        let e = RegistryError::Request {
            op: "check",
            reference: "ghcr.io/a/b:1".into(),
            failure: Failure::Server,
            source: OciDistributionError::ServerError {
                code: 503,
                url: "https://ghcr.io/v2/a/b/manifests/1".into(),
                message: "maintenance".into(),
            },
        };
        let text = crate::error::Report(&e).to_string();
        assert!(
            text.starts_with("check ghcr.io/a/b:1: registry error: "),
            "{text}"
        );
        assert!(text.contains("maintenance"), "{text}");
        assert_eq!(e.metric_label(), "server");
    }
}
