//! What went wrong with AWS, in one line: the identity tried and what AWS answered.

use aws_sdk_ecr::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use super::identity_sources;
use crate::settings::EcrRegistry;

/// An AWS call that failed. Holds AWS's words and the identity's description, never a
/// credential.
#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    #[error("no AWS identity found (tried {tried})")]
    NoCredentials { tried: String },
    #[error("the AWS identity did not resolve (tried {identity}): {message}")]
    Identity { identity: String, message: String },
    #[error("{action} on {registry} as {identity}: AWS answered {code}: {message}")]
    Api {
        action: &'static str,
        registry: String,
        identity: String,
        code: String,
        message: String,
    },
    #[error("{action} on {registry}: no answer from AWS: {message}")]
    Unreachable {
        action: &'static str,
        registry: String,
        message: String,
    },
    #[error("{action} on {registry}: the answer has no {what}")]
    Answer {
        action: &'static str,
        registry: String,
        what: &'static str,
    },
    #[error("{what}: {message}")]
    Settings { what: &'static str, message: String },
}

impl AwsError {
    /// The `result` label of `image_mirror_aws_requests_total`.
    pub fn label(&self) -> &'static str {
        match self {
            AwsError::NoCredentials { .. } => "no-credentials",
            AwsError::Identity { .. } => "identity",
            AwsError::Api { code, .. } if code.contains("AccessDenied") => "access-denied",
            AwsError::Unreachable { .. } => "unreachable",
            AwsError::Api { .. } | AwsError::Answer { .. } | AwsError::Settings { .. } => "error",
        }
    }
}

/// An error and its causes, on one line: AWS's own code and message when one of them carries
/// them (the SDK's error types say little else), each cause's words otherwise.
pub(super) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut words: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if let Some(answer) = aws_answer(&text) {
            return format!("AWS answered {answer}");
        }
        if !words.iter().any(|w| w.contains(&text)) {
            words.push(text);
        }
        next = err.source();
    }
    if words.is_empty() {
        DisplayErrorContext(e).to_string()
    } else {
        words.join(": ")
    }
}

/// `CODE: message` from the SDK's `Error { code: "CODE", message: "message" }`.
fn aws_answer(text: &str) -> Option<String> {
    let field = |name: &str| {
        let start = text.find(&format!("{name}: \""))? + name.len() + 3;
        let len = text[start..].find('"')?;
        Some(&text[start..start + len])
    };
    if !text.starts_with("Error {") {
        return None;
    }
    Some(format!(
        "{}: {}",
        field("code")?,
        field("message").unwrap_or("(no message)")
    ))
}

pub(super) fn from_sdk<E, R>(
    action: &'static str,
    registry: &EcrRegistry,
    e: SdkError<E, R>,
) -> AwsError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    match &e {
        SdkError::ServiceError(_) => AwsError::Api {
            action,
            registry: registry.to_string(),
            identity: identity_sources(),
            code: e.code().unwrap_or("an unnamed error").to_string(),
            message: e.message().unwrap_or("(no message)").to_string(),
        },
        _ => AwsError::Unreachable {
            action,
            registry: registry.to_string(),
            message: chain(&e),
        },
    }
}
