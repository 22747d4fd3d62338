//! Where a registry is in AWS (an ECR endpoint's name, or `registries.<host>.aws`), and how a
//! repository mirror on ECR has its repositories made (`ecr:`).

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::RegistryAccess;
use crate::problems::ProblemList;
use crate::reference::registry_host;

/// `registries.<host>.aws`: where the registry is in AWS. A host that is an ECR endpoint
/// (`<account>.dkr.ecr.<region>.amazonaws.com`) says both itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AwsAccess {
    pub region: Option<String>,
    /// The account ID (12 digits) whose registry it is; default: the identity's own account.
    pub registry_id: Option<String>,
}

/// An ECR registry: the region its API is in, and its account when known.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EcrRegistry {
    pub region: String,
    pub registry_id: Option<String>,
}

impl std::fmt::Display for EcrRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.registry_id {
            Some(id) => write!(f, "ECR registry {id} in {}", self.region),
            None => write!(f, "ECR in {} (the identity's own account)", self.region),
        }
    }
}

/// The account and region an ECR endpoint's name holds: `<account>.dkr.ecr[-fips].<region>.`
/// `amazonaws.com` (`.amazonaws.com.cn` in China) or the dual-stack
/// `<account>.dkr-ecr[-fips].<region>.on.aws`.
pub fn ecr_endpoint(host: &str) -> Option<EcrRegistry> {
    let host = registry_host(host).to_ascii_lowercase();
    let mut parts = host.split('.');
    let account = parts.next()?;
    let service = parts.next()?;
    let (region, rest) = match service {
        "dkr" => {
            let ecr = parts.next()?;
            if ecr != "ecr" && ecr != "ecr-fips" {
                return None;
            }
            let region = parts.next()?;
            (region, parts.collect::<Vec<_>>().join("."))
        }
        "dkr-ecr" | "dkr-ecr-fips" => {
            let region = parts.next()?;
            (region, parts.collect::<Vec<_>>().join("."))
        }
        _ => return None,
    };
    let dual = service.starts_with("dkr-ecr");
    let suffix_ok = if dual {
        rest == "on.aws"
    } else {
        rest == "amazonaws.com" || rest == "amazonaws.com.cn"
    };
    (valid_account(account) && valid_region(region) && suffix_ok).then(|| EcrRegistry {
        region: region.to_string(),
        registry_id: Some(account.to_string()),
    })
}

/// Where `host`'s credentials come from in AWS, if they do: its `aws:` entry, else its name.
pub fn ecr_registry(host: &str, access: Option<&RegistryAccess>) -> Option<EcrRegistry> {
    let named = ecr_endpoint(host);
    match access.and_then(|a| a.aws.as_ref()) {
        Some(aws) => {
            let region = aws
                .region
                .clone()
                .or_else(|| named.as_ref().map(|n| n.region.clone()))?;
            let registry_id = aws
                .registry_id
                .clone()
                .or_else(|| named.and_then(|n| n.registry_id));
            Some(EcrRegistry {
                region,
                registry_id,
            })
        }
        None => named,
    }
}

fn valid_account(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit())
}

/// `us-east-1`, `cn-north-1`, `us-gov-west-1`, `eu-isoe-west-1`: letters and digits in
/// dash-separated words, ending in a number.
fn valid_region(s: &str) -> bool {
    let words: Vec<&str> = s.split('-').collect();
    words.len() >= 3
        && words.iter().all(|w| {
            !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
        && words
            .last()
            .is_some_and(|w| w.bytes().all(|b| b.is_ascii_digit()))
}

pub(super) fn check_aws(
    host: &str,
    aws: &AwsAccess,
    at: &Spanned<RegistryAccess>,
    problems: &mut ProblemList,
) {
    let field = format!("registries.{host}.aws");
    match &aws.region {
        Some(r) if !valid_region(r) => problems.add(
            at,
            format!("{field}.region"),
            format!("{r:?} is not an AWS region (us-east-1, say)"),
        ),
        None if ecr_endpoint(host).is_none() => problems.add(
            at,
            format!("{field}.region"),
            "missing: the host is not an ECR endpoint name, so give the region of its registry",
        ),
        _ => {}
    }
    if let Some(id) = &aws.registry_id {
        if !valid_account(id) {
            problems.add(
                at,
                format!("{field}.registryId"),
                format!("{id:?} is not an AWS account ID (12 digits)"),
            );
        }
    }
}

/// A repository mirror's `ecr:`: repositories a copy needs are created first (ECR has no
/// create-on-push), with these settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcrRepositories {
    pub create: bool,
    /// `MUTABLE` or `IMMUTABLE`.
    pub tag_mutability: &'static str,
    pub scan_on_push: bool,
    /// `AES256` or `KMS`, with the KMS key when given.
    pub encryption: &'static str,
    pub kms_key: Option<String>,
    /// A lifecycle policy (JSON text) put on every repository created.
    pub lifecycle_policy: Option<String>,
}

impl Default for EcrRepositories {
    fn default() -> Self {
        EcrRepositories {
            create: true,
            tag_mutability: "MUTABLE",
            scan_on_push: false,
            encryption: "AES256",
            kms_key: None,
            lifecycle_policy: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecr_endpoints_name_their_account_and_region() {
        let ecr = |host: &str| ecr_endpoint(host).map(|r| (r.registry_id.unwrap(), r.region));
        let want = |a: &str, r: &str| Some((a.to_string(), r.to_string()));
        for (host, expected) in [
            (
                "123456789012.dkr.ecr.us-east-1.amazonaws.com",
                want("123456789012", "us-east-1"),
            ),
            (
                "123456789012.dkr.ecr-fips.us-gov-west-1.amazonaws.com",
                want("123456789012", "us-gov-west-1"),
            ),
            (
                "123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn",
                want("123456789012", "cn-north-1"),
            ),
            (
                "123456789012.dkr-ecr.eu-west-1.on.aws",
                want("123456789012", "eu-west-1"),
            ),
            (
                "123456789012.DKR.ECR.ca-central-1.AMAZONAWS.COM",
                want("123456789012", "ca-central-1"),
            ),
            // Not ECR: a short account, another service, a look-alike suffix, public ECR.
            ("1.dkr.ecr.eu-west-1.amazonaws.com", None),
            ("123456789012.dkr.ecr.us-east-1.amazonaws.com.evil.io", None),
            ("123456789012.s3.us-east-1.amazonaws.com", None),
            ("public.ecr.aws", None),
            ("ghcr.io", None),
            ("123456789012.dkr.ecr.useast.amazonaws.com", None),
        ] {
            assert_eq!(ecr(host), expected, "{host}");
        }
    }

    #[test]
    fn an_aws_entry_places_a_registry_the_name_does_not() {
        let entry = |region: Option<&str>, id: Option<&str>| RegistryAccess {
            aws: Some(AwsAccess {
                region: region.map(str::to_string),
                registry_id: id.map(str::to_string),
            }),
            ..RegistryAccess::default()
        };
        let vpce = "registry.internal.example";
        assert_eq!(ecr_registry(vpce, None), None);
        assert_eq!(
            ecr_registry(vpce, Some(&entry(Some("eu-west-1"), Some("111122223333")))),
            Some(EcrRegistry {
                region: "eu-west-1".into(),
                registry_id: Some("111122223333".into())
            })
        );
        // Without a region a private name cannot be placed; an ECR name keeps its own parts.
        assert_eq!(ecr_registry(vpce, Some(&entry(None, None))), None);
        let named = "123456789012.dkr.ecr.us-east-1.amazonaws.com";
        assert_eq!(
            ecr_registry(named, Some(&entry(None, None))),
            ecr_endpoint(named)
        );
        // The table says what is wrong, on the field.
        let err = crate::config::Config::parse(
            "t.yaml",
            "mirrors:\n  m: {type: repository, registry: ghcr.io}\nregistries:\n  registry.internal.example: {aws: {registryId: '12'}}\n",
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("registries.registry.internal.example.aws.region"),
            "{err}"
        );
        assert!(err.contains("registryId"), "{err}");
    }
}
