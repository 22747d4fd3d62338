//! The webhook's own AWS identity: ECR registry credentials from `GetAuthorizationToken`,
//! repositories created before a copy pushes into them, and the account's pull-through cache
//! rules. The SDK's default chain finds the identity (IRSA, EKS Pod Identity, environment
//! keys, the instance role); every client points wherever `AWS_ENDPOINT_URL` says.
//!
//! Tokens are kept per registry and shared by checks, warm-ups and copies; one is renewed an
//! hour before it expires, and at once when a registry refuses it, but never more often than
//! [`MIN_RENEWAL`]. No token, password or key ever reaches a log line, error or metric.

mod cache_rules;
mod errors;
mod token;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use aws_config::BehaviorVersion;
use aws_credential_types::provider::{error::CredentialsError, ProvideCredentials};
use aws_sdk_ecr::error::ProvideErrorMetadata;
use aws_sdk_ecr::types::{
    EncryptionConfiguration, EncryptionType, ImageScanningConfiguration, ImageTagMutability,
};
use base64::Engine as _;

pub use cache_rules::{compare_rules, CacheRule, RuleProblem};
pub use errors::AwsError;
pub use token::{keep_for, MIN_RENEWAL, RENEW_BEFORE};

use crate::locks::lock;
use crate::metrics::{AwsLabels, Metrics};
use crate::settings::{EcrRegistry, EcrRepositories};

/// Every AWS API action the webhook calls with the SDK; the IAM policies in `deploy/` name
/// these and the registry actions below, nothing else (a test checks).
pub const SDK_ACTIONS: [&str; 4] = [
    "ecr:GetAuthorizationToken",
    "ecr:CreateRepository",
    "ecr:PutLifecyclePolicy",
    "ecr:DescribePullThroughCacheRules",
];

/// What ECR authorises the registry protocol's requests as: a pull (and a pull-through
/// cache's import of what it lacks), and a push.
pub const REGISTRY_PULL_ACTIONS: [&str; 3] = [
    "ecr:BatchGetImage",
    "ecr:GetDownloadUrlForLayer",
    "ecr:BatchImportUpstreamImage",
];
pub const REGISTRY_PUSH_ACTIONS: [&str; 5] = [
    "ecr:BatchCheckLayerAvailability",
    "ecr:InitiateLayerUpload",
    "ecr:UploadLayerPart",
    "ecr:CompleteLayerUpload",
    "ecr:PutImage",
];

/// The identity sources the SDK's default chain would try here, from the environment: what
/// an error names, so that the operator knows which one answered (or that none was there).
pub fn identity_sources() -> String {
    identity_sources_in(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
}

/// [`identity_sources`] over any environment (tests).
pub fn identity_sources_in(env: impl Fn(&str) -> Option<String>) -> String {
    let mut tried = Vec::new();
    if env("AWS_ACCESS_KEY_ID").is_some() {
        tried.push("environment keys (AWS_ACCESS_KEY_ID)".to_string());
    }
    if let Some(profile) = env("AWS_PROFILE") {
        tried.push(format!("profile {profile}"));
    }
    match (env("AWS_ROLE_ARN"), env("AWS_WEB_IDENTITY_TOKEN_FILE")) {
        (Some(role), Some(file)) => {
            tried.push(format!("IRSA web identity (role {role}, token {file})"))
        }
        (Some(_), None) => tried.push("IRSA without AWS_WEB_IDENTITY_TOKEN_FILE".to_string()),
        (None, Some(_)) => tried.push("IRSA without AWS_ROLE_ARN".to_string()),
        (None, None) => {}
    }
    if let Some(uri) = env("AWS_CONTAINER_CREDENTIALS_FULL_URI")
        .or_else(|| env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"))
    {
        tried.push(format!("EKS Pod Identity / container credentials ({uri})"));
    }
    let imds_off = env("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    if !imds_off {
        tried.push("the node's instance role (instance metadata)".to_string());
    }
    if tried.is_empty() {
        "nothing: no environment keys, no IRSA, no Pod Identity, instance metadata disabled"
            .to_string()
    } else {
        tried.join(", then ")
    }
}

/// The webhook's AWS access, shared by the whole process (its identity is the process's).
pub struct Aws {
    config: tokio::sync::OnceCell<aws_config::SdkConfig>,
    clients: Mutex<HashMap<String, aws_sdk_ecr::Client>>,
    tokens: Mutex<HashMap<EcrRegistry, Arc<tokio::sync::Mutex<Option<token::Token>>>>>,
    /// Repositories known to exist (made, or found made), so each is created once.
    repositories: Mutex<BTreeSet<(EcrRegistry, String)>>,
    /// Registries already warned about going anonymous.
    anonymous: Mutex<BTreeSet<EcrRegistry>>,
}

impl Aws {
    /// The process's AWS access.
    pub fn shared() -> &'static Aws {
        static AWS: OnceLock<Aws> = OnceLock::new();
        AWS.get_or_init(|| Aws {
            config: tokio::sync::OnceCell::new(),
            clients: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            repositories: Mutex::new(BTreeSet::new()),
            anonymous: Mutex::new(BTreeSet::new()),
        })
    }

    async fn sdk(&self) -> &aws_config::SdkConfig {
        self.config
            .get_or_init(|| async {
                let timeouts = aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(10))
                    .operation_timeout(Duration::from_secs(30))
                    .build();
                aws_config::defaults(BehaviorVersion::latest())
                    .timeout_config(timeouts)
                    .load()
                    .await
            })
            .await
    }

    fn client(&self, sdk: &aws_config::SdkConfig, region: &str) -> aws_sdk_ecr::Client {
        lock(&self.clients)
            .entry(region.to_string())
            .or_insert_with(|| {
                let config = aws_sdk_ecr::config::Builder::from(sdk)
                    .region(aws_config::Region::new(region.to_string()))
                    .build();
                aws_sdk_ecr::Client::from_conf(config)
            })
            .clone()
    }

    /// An ECR client for `region`, once the identity is known to resolve: its absence and its
    /// failure are told apart here, before any API call.
    async fn ready(
        &self,
        region: &str,
        action: &'static str,
        metrics: Option<&Metrics>,
    ) -> Result<aws_sdk_ecr::Client, AwsError> {
        let sdk = self.sdk().await;
        let Some(provider) = sdk.credentials_provider() else {
            count(metrics, action, "no-credentials");
            return Err(AwsError::NoCredentials {
                tried: identity_sources(),
            });
        };
        match provider.provide_credentials().await {
            Ok(_) => Ok(self.client(sdk, region)),
            Err(CredentialsError::CredentialsNotLoaded(_)) => {
                count(metrics, action, "no-credentials");
                Err(AwsError::NoCredentials {
                    tried: identity_sources(),
                })
            }
            Err(e) => {
                count(metrics, action, "identity");
                Err(AwsError::Identity {
                    identity: identity_sources(),
                    message: errors::chain(&e),
                })
            }
        }
    }

    /// The registry credentials (user `AWS` and a token) for `registry`: the kept token, or a
    /// new one. `None` when there is no AWS identity at all: the registry is then spoken to
    /// anonymously, as without AWS, and that is said once.
    pub async fn registry_credentials(
        &self,
        registry: &EcrRegistry,
        metrics: Option<&Metrics>,
    ) -> Result<Option<(String, String)>, AwsError> {
        let slot = lock(&self.tokens)
            .entry(registry.clone())
            .or_default()
            .clone();
        let mut held = slot.lock().await;
        if let Some(t) = held.as_ref() {
            if Instant::now() < t.renew_at {
                return Ok(Some((t.user.clone(), t.password.clone())));
            }
        }
        match self.fetch_token(registry, metrics).await {
            Ok(t) => {
                let pair = (t.user.clone(), t.password.clone());
                *held = Some(t);
                Ok(Some(pair))
            }
            Err(AwsError::NoCredentials { tried }) => {
                if lock(&self.anonymous).insert(registry.clone()) {
                    tracing::warn!(
                        registry = %registry,
                        tried = %tried,
                        "no AWS identity found, so the registry is asked anonymously (its \
                         checks, warm-ups and copies will be refused): give the webhook IRSA \
                         or EKS Pod Identity"
                    );
                }
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// A registry refused the token held for `registry` (401/403): it is renewed on next use,
    /// unless it was fetched less than [`MIN_RENEWAL`] ago. True when it will be.
    pub fn refused(&self, registry: &EcrRegistry) -> bool {
        let Some(slot) = lock(&self.tokens).get(registry).cloned() else {
            return false;
        };
        let Ok(mut held) = slot.try_lock() else {
            // Being renewed right now.
            return true;
        };
        match held.as_mut() {
            Some(t) if t.fetched.elapsed() >= MIN_RENEWAL => {
                t.renew_at = Instant::now();
                true
            }
            _ => false,
        }
    }

    async fn fetch_token(
        &self,
        registry: &EcrRegistry,
        metrics: Option<&Metrics>,
    ) -> Result<token::Token, AwsError> {
        const ACTION: &str = "GetAuthorizationToken";
        let client = self.ready(&registry.region, ACTION, metrics).await?;
        // No registryIds (deprecated): a token serves every registry the identity may use.
        let answer = client
            .get_authorization_token()
            .send()
            .await
            .map_err(|e| self.api_error(ACTION, registry, e, metrics))?;
        let missing = |what| AwsError::Answer {
            action: ACTION,
            registry: registry.to_string(),
            what,
        };
        let data = answer
            .authorization_data()
            .first()
            .ok_or_else(|| missing("authorizationData"))?;
        let encoded = data
            .authorization_token()
            .ok_or_else(|| missing("authorizationToken"))?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| missing("base64 user:password token"))?;
        let (user, password) = decoded
            .split_once(':')
            .ok_or_else(|| missing("base64 user:password token"))?;
        let now = SystemTime::now();
        let expires = data
            .expires_at()
            .and_then(|t| SystemTime::try_from(*t).ok());
        if expires.is_some_and(|e| e <= now) {
            tracing::warn!(
                registry = %registry,
                "AWS gave an ECR token that has already expired (is this machine's clock right?); \
                 it is used until a registry refuses it"
            );
        }
        count(metrics, ACTION, "ok");
        let fetched = Instant::now();
        Ok(token::Token {
            user: user.to_string(),
            password: password.to_string(),
            fetched,
            renew_at: fetched + keep_for(now, expires),
        })
    }

    fn api_error<E, R>(
        &self,
        action: &'static str,
        registry: &EcrRegistry,
        e: aws_sdk_ecr::error::SdkError<E, R>,
        metrics: Option<&Metrics>,
    ) -> AwsError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        let e = errors::from_sdk(action, registry, e);
        count(metrics, action, e.label());
        e
    }

    /// Makes repository `name` on `registry` when it is not there, with `settings`; an existing
    /// one is left as it is. True when it was made now.
    pub async fn ensure_repository(
        &self,
        registry: &EcrRegistry,
        name: &str,
        settings: &EcrRepositories,
        metrics: Option<&Metrics>,
    ) -> Result<bool, AwsError> {
        let key = (registry.clone(), name.to_string());
        if !settings.create || lock(&self.repositories).contains(&key) {
            return Ok(false);
        }
        const CREATE: &str = "CreateRepository";
        let client = self.ready(&registry.region, CREATE, metrics).await?;
        let mut encryption = EncryptionConfiguration::builder()
            .encryption_type(EncryptionType::from(settings.encryption));
        if let Some(key) = &settings.kms_key {
            encryption = encryption.kms_key(key);
        }
        let encryption = encryption.build().map_err(|e| AwsError::Settings {
            what: "ecr.encryption",
            message: e.to_string(),
        })?;
        let made = client
            .create_repository()
            .set_registry_id(registry.registry_id.clone())
            .repository_name(name)
            .image_tag_mutability(ImageTagMutability::from(settings.tag_mutability))
            .image_scanning_configuration(
                ImageScanningConfiguration::builder()
                    .scan_on_push(settings.scan_on_push)
                    .build(),
            )
            .encryption_configuration(encryption)
            .send()
            .await;
        let made = match made {
            Ok(_) => {
                count(metrics, CREATE, "ok");
                true
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_repository_already_exists_exception()) =>
            {
                // Made by another replica, or by hand: theirs stands.
                count(metrics, CREATE, "ok");
                false
            }
            Err(e) => return Err(self.api_error(CREATE, registry, e, metrics)),
        };
        if made {
            if let Some(policy) = &settings.lifecycle_policy {
                const PUT: &str = "PutLifecyclePolicy";
                client
                    .put_lifecycle_policy()
                    .set_registry_id(registry.registry_id.clone())
                    .repository_name(name)
                    .lifecycle_policy_text(policy)
                    .send()
                    .await
                    .map_err(|e| self.api_error(PUT, registry, e, metrics))?;
                count(metrics, PUT, "ok");
            }
            tracing::info!(registry = %registry, repository = name, "ECR repository created");
        }
        lock(&self.repositories).insert(key);
        Ok(made)
    }

    /// The pull-through cache rules of `registry`.
    pub async fn cache_rules(
        &self,
        registry: &EcrRegistry,
        metrics: Option<&Metrics>,
    ) -> Result<Vec<CacheRule>, AwsError> {
        const ACTION: &str = "DescribePullThroughCacheRules";
        let client = self.ready(&registry.region, ACTION, metrics).await?;
        let mut rules = Vec::new();
        let mut pages = client
            .describe_pull_through_cache_rules()
            .set_registry_id(registry.registry_id.clone())
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.api_error(ACTION, registry, e, metrics))?;
            for r in page.pull_through_cache_rules() {
                rules.push(CacheRule {
                    prefix: r.ecr_repository_prefix().unwrap_or_default().to_string(),
                    upstream: r.upstream_registry_url().unwrap_or_default().to_string(),
                });
            }
        }
        count(metrics, ACTION, "ok");
        Ok(rules)
    }
}

/// Each pull-through mirror on ECR against the account's cache rules (`check-config
/// --online`, and `serve` at start): one line per problem, empty when every prefix has its rule.
pub async fn cache_rule_problems(
    table: &crate::mapping::Table,
    settings: &crate::settings::Settings,
    metrics: Option<&Metrics>,
) -> Vec<String> {
    let mut out = Vec::new();
    for m in table.mirrors() {
        let crate::mapping::MirrorKind::PullThrough { upstreams } = &m.kind else {
            continue;
        };
        let Some(registry) =
            crate::settings::ecr_registry(&m.registry, settings.access(&m.registry))
        else {
            continue;
        };
        match Aws::shared().cache_rules(&registry, metrics).await {
            Ok(rules) => out.extend(
                compare_rules(upstreams, &rules)
                    .into_iter()
                    .map(|p| format!("mirrors.{} ({registry}): {p}", m.name)),
            ),
            Err(e) => out.push(format!(
                "mirrors.{}: cannot read the pull-through cache rules: {}",
                m.name,
                crate::error::Report(&e)
            )),
        }
    }
    out
}

fn count(metrics: Option<&Metrics>, action: &'static str, result: &'static str) {
    if let Some(m) = metrics {
        m.aws_requests
            .get_or_create(&AwsLabels { action, result })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_named_is_the_one_the_environment_sets_up() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let irsa = identity_sources_in(env(&[
            ("AWS_ROLE_ARN", "arn:aws:iam::111122223333:role/mirror"),
            (
                "AWS_WEB_IDENTITY_TOKEN_FILE",
                "/var/run/secrets/eks.amazonaws.com/serviceaccount/token",
            ),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]));
        assert_eq!(
            irsa,
            "IRSA web identity (role arn:aws:iam::111122223333:role/mirror, token \
             /var/run/secrets/eks.amazonaws.com/serviceaccount/token)"
        );
        let pod_identity = identity_sources_in(env(&[(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "http://169.254.170.23/v1/credentials",
        )]));
        assert!(
            pod_identity.starts_with("EKS Pod Identity"),
            "{pod_identity}"
        );
        assert!(pod_identity.ends_with("then the node's instance role (instance metadata)"));
        assert!(
            identity_sources_in(env(&[("AWS_EC2_METADATA_DISABLED", "true")]))
                .starts_with("nothing")
        );
        // A secret key is never part of what is said.
        let keys = identity_sources_in(env(&[
            ("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEEXAMPLE00"),
            ("AWS_SECRET_ACCESS_KEY", "generated-at-run-time"),
        ]));
        assert!(
            !keys.contains("AKIA") && !keys.contains("generated"),
            "{keys}"
        );
    }
}
