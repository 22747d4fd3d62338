//! The table file as written: its YAML schema, before anything is checked.
//!
//! Only the structure is refused here (an unknown key, a list where a map belongs). Every word
//! with a fixed set of values (`type`, `naming`, `swap`, `copy`, `pin`) and every required
//! field is read as it came and checked in [`super::build`], so that one run reports every
//! problem in the file, each on its own field.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::settings::{self, RegistryAccess};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawFile {
    #[serde(default)]
    pub(super) mirrors: BTreeMap<String, Spanned<RawMirror>>,
    #[serde(default)]
    pub(super) images: Vec<Spanned<RawImage>>,
    #[serde(default)]
    pub(super) rules: Vec<Spanned<RawRule>>,
    #[serde(default)]
    pub(super) namespaces: Option<RawNamespaces>,
    #[serde(default)]
    pub(super) registries: BTreeMap<String, Spanned<RegistryAccess>>,
    #[serde(default)]
    pub(super) checks: Option<Spanned<settings::RawChecks>>,
    #[serde(default)]
    pub(super) copies: Option<Spanned<settings::RawCopies>>,
    #[serde(default)]
    pub(super) timeouts: Option<Spanned<settings::RawTimeouts>>,
    #[serde(default)]
    pub(super) mirrored_images: Option<Spanned<settings::RawRecords>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawMirror {
    #[serde(rename = "type")]
    pub(super) kind: Option<Spanned<String>>,
    pub(super) registry: Option<Spanned<String>>,
    pub(super) prefix: Option<Spanned<String>>,
    pub(super) naming: Option<Spanned<String>>,
    pub(super) pull_secret: Option<Spanned<String>>,
    pub(super) pull_secret_from: Option<Spanned<String>>,
    /// Upstream registry → cache prefix; a prefix left out (`docker.io:`) is reported.
    pub(super) upstreams: Option<BTreeMap<String, Spanned<Option<String>>>>,
    pub(super) swap: Option<Spanned<String>>,
    pub(super) copy: Option<Spanned<String>>,
    pub(super) platforms: Option<Vec<Spanned<String>>>,
    #[serde(default, deserialize_with = "super::policy::referrers_flag")]
    pub(super) referrers: Option<bool>,
    /// On ECR: how a copy creates the repositories it pushes into.
    pub(super) ecr: Option<Spanned<super::ecr::RawEcr>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawImage {
    pub(super) source: Option<Spanned<String>>,
    pub(super) target: Option<Spanned<String>>,
    pub(super) swap: Option<Spanned<String>>,
    pub(super) copy: Option<Spanned<String>>,
    pub(super) platforms: Option<Vec<Spanned<String>>>,
    #[serde(default, deserialize_with = "super::policy::referrers_flag")]
    pub(super) referrers: Option<bool>,
    pub(super) pin: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawRule {
    pub(super) name: Option<Spanned<String>>,
    #[serde(rename = "match")]
    pub(super) matches: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(super) exclude: Vec<Spanned<String>>,
    pub(super) mirror: Option<Spanned<String>>,
    pub(super) swap: Option<Spanned<String>>,
    pub(super) copy: Option<Spanned<String>>,
    pub(super) platforms: Option<Vec<Spanned<String>>>,
    #[serde(default, deserialize_with = "super::policy::referrers_flag")]
    pub(super) referrers: Option<bool>,
    pub(super) pin: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawNamespaces {
    #[serde(default)]
    pub(super) exclude: Vec<Spanned<String>>,
    pub(super) pull_secrets: Option<Spanned<RawPullSecretNamespaces>>,
}

/// Which namespaces may receive the mirrors' pull secrets (an admin's allow-list).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawPullSecretNamespaces {
    #[serde(default)]
    pub(super) allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) labels: BTreeMap<String, String>,
}
