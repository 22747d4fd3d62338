//! PURE The `MirroredImage` resource (`image-mirror.dev/v1alpha1`, cluster-scoped): the
//! cluster's record of an image sent to a mirror, or a person's request to mirror one. Its CRD
//! is generated from these types (`image-mirror-webhook crd`), and `deploy/` holds the result.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::reference::Reference;

/// The API group of the project's own resources.
pub const GROUP: &str = "image-mirror.dev";
/// The label on objects the webhook made from admissions (their value: `admission`); an object
/// without it was declared by a person.
pub const RECORDED_BY_LABEL: &str = "image-mirror.dev/recorded-by";
pub const RECORDED_BY_ADMISSION: &str = "admission";

/// An image the webhook sends to a mirror (recorded from admissions), or one a person asks to
/// have mirrored (declared: created without the `image-mirror.dev/recorded-by` label).
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "image-mirror.dev",
    version = "v1alpha1",
    kind = "MirroredImage",
    plural = "mirroredimages",
    shortname = "mimg",
    category = "image-mirror",
    status = "MirroredImageStatus",
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".spec.source"}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".status.target"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Digest","type":"string","jsonPath":".status.shortDigest"}"#,
    printcolumn = r#"{"name":"Last Used","type":"date","jsonPath":".status.lastUsed"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MirroredImageSpec {
    /// The image as a Pod names it (`nginx:1.27`, `docker.io/library/nginx:1.27`, ...).
    pub source: String,
    /// The image on the mirror. When absent, the table's mapping of `source` decides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Platforms to copy (`linux/amd64`, `linux/arm64/v8`). When empty, the table's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<String>,
    /// How often upstream is asked again whether the tag moved, and a moved tag copied again
    /// (`6h`, `1d`). Declared images only; never when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh: Option<String>,
    /// Keep this object although no Pod has used the image for `mirroredImages.retention`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retain: bool,
}

/// Where the image stands on its mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// The mirror holds it.
    Present,
    /// The mirror lacks it, and no copy runs.
    Missing,
    /// A copy (or warm-up) is queued or running.
    Copying,
    /// The last copy gave up; `conditions` says why.
    Failed,
    /// Nobody could tell (the mirror did not answer, or nothing was asked yet).
    Unknown,
    /// A pull-through cache was made to fetch it.
    WarmedUp,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Present,
        Phase::Missing,
        Phase::Copying,
        Phase::Failed,
        Phase::Unknown,
        Phase::WarmedUp,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Phase::Present => "Present",
            Phase::Missing => "Missing",
            Phase::Copying => "Copying",
            Phase::Failed => "Failed",
            Phase::Unknown => "Unknown",
            Phase::WarmedUp => "WarmedUp",
        }
    }

    /// Whether the mirror can serve the image.
    pub fn is_served(self) -> bool {
        matches!(self, Phase::Present | Phase::WarmedUp)
    }
}

/// What the webhook knows of the image.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MirroredImageStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The image on the mirror, as the table decided it (or `spec.target`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The digest the mirror serves, as last seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_digest: Option<String>,
    /// The first 12 hex digits of `mirrorDigest`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub short_digest: Option<String>,
    /// The digest upstream's tag pointed to at the last copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_digest: Option<String>,
    /// `Ready`: whether the mirror serves the image, with the reason and, after a failed copy,
    /// its error in one line.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// When a replica last asked the mirror (RFC 3339). A `Present` younger than the checks'
    /// `presentTtl` answers every replica's check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checked: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_copy: Option<LastCopy>,
    /// When an admission last sent a Pod to the mirror for it (written every few minutes at
    /// most).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<String>,
    /// Who is copying it now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copying: Option<Copying>,
}

/// A Kubernetes-style condition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    pub last_transition_time: String,
}

/// The last copy or warm-up.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastCopy {
    /// `Succeeded`, `Failed` (and retrying) or `GaveUp`.
    pub result: String,
    pub time: String,
    pub attempts: u32,
    /// `in-process`, or the copy Job's name.
    pub runner: String,
}

/// A copy in progress: which replica holds it, through which runner, since when.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Copying {
    pub holder: String,
    pub runner: String,
    pub since: String,
}

/// The CustomResourceDefinition, as YAML.
pub fn crd_yaml() -> Result<String, serde_saphyr::ser::Error> {
    use kube::CustomResourceExt as _;
    serde_saphyr::to_string(&MirroredImage::crd())
}

/// The object name of the record of `source` → `target`: a readable prefix (the source's
/// repository and tag) and 10 hex digits of a hash of the canonical pair, so that every
/// spelling of a Docker Hub image is one object and two pairs never share a name.
pub fn object_name(source: &Reference, target: &Reference) -> String {
    let source = source.canonical();
    let target = target.canonical();
    let hash = Sha256::digest(format!("{}\n{}", source.as_str(), target.as_str()).as_bytes());
    let hex: String = hash.iter().take(5).map(|b| format!("{b:02x}")).collect();
    let path = source.path().rsplit('/').take(2).collect::<Vec<_>>();
    let readable = format!(
        "{}-{}",
        path.into_iter().rev().collect::<Vec<_>>().join("-"),
        source.tag().unwrap_or("digest")
    );
    let mut prefix = String::with_capacity(48);
    for c in readable.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            prefix.push(c);
        } else if !prefix.ends_with('-') && !prefix.is_empty() {
            prefix.push('-');
        }
        if prefix.len() >= 48 {
            break;
        }
    }
    let prefix = prefix.trim_matches('-');
    if prefix.is_empty() {
        format!("image-{hex}")
    } else {
        format!("{prefix}-{hex}")
    }
}

/// `sha256:abcdef…` → its first 12 hex digits.
pub fn short_digest(digest: &str) -> String {
    let hex = digest.split_once(':').map_or(digest, |(_, h)| h);
    hex.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(source: &str, target: &str) -> String {
        object_name(
            &Reference::parse(source).unwrap(),
            &Reference::parse(target).unwrap(),
        )
    }

    #[test]
    fn every_docker_hub_spelling_is_one_object_and_names_are_valid() {
        let target = "ghcr.io/acme/mirror/nginx:1.27";
        let one = name("nginx:1.27", target);
        for spelling in [
            "docker.io/nginx:1.27",
            "docker.io/library/nginx:1.27",
            "index.docker.io/library/nginx:1.27",
            "registry-1.docker.io/library/nginx:1.27",
        ] {
            assert_eq!(name(spelling, target), one, "{spelling}");
        }
        assert!(one.starts_with("library-nginx-1-27-"), "{one}");
        // Another target, another tag, another registry: another object.
        assert_ne!(name("nginx:1.27", "ghcr.io/acme/other/nginx:1.27"), one);
        assert_ne!(name("nginx:1.28", target), one);
        assert_ne!(name("quay.io/library/nginx:1.27", target), one);
        // A DNS-1123 subdomain name whatever the source.
        for source in [
            "nginx",
            "a/b/c/d/e/f:v1.2.3_RC-4",
            &format!("x/{}:t", "y".repeat(200)),
            "busybox@sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "_/__:_",
        ] {
            let Ok(source) = Reference::parse(source) else {
                continue;
            };
            let n = object_name(&source, &Reference::parse(target).unwrap());
            assert!(n.len() <= 63, "{n}");
            assert!(
                n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !n.starts_with('-')
                    && !n.ends_with('-'),
                "{n}"
            );
        }
    }

    #[test]
    fn short_digests() {
        assert_eq!(short_digest("sha256:0123456789abcdef"), "0123456789ab");
        assert_eq!(short_digest("abc"), "abc");
    }
}
