//! Mirror targets and how each names the copy of an image.

use std::collections::BTreeMap;

use super::policy::{CopyPolicy, Naming, Overrides, SwapPolicy};
use crate::reference::{canonical_host, Reference};

/// A mirror target.
#[derive(Debug, Clone, PartialEq)]
pub struct Mirror {
    pub name: String,
    pub registry: String,
    pub kind: MirrorKind,
    pub pull_secret: Option<String>,
    /// The Secret whose data the webhook copies into every opted-in namespace as
    /// `pull_secret` (`pullSecretFrom: namespace/name`).
    pub pull_secret_from: Option<SecretRef>,
    /// On ECR (`ecr:`): the repositories a copy needs are created first, with these settings.
    pub ecr: Option<crate::settings::EcrRepositories>,
    pub(crate) overrides: Overrides,
}

/// A Secret by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A Kubernetes object name: a DNS-1123 subdomain (Secrets) or label (namespaces).
pub(crate) fn valid_object_name(s: &str, max: usize, dots: bool) -> bool {
    let ok =
        |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || (dots && c == b'.');
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b.iter().all(|&c| ok(c))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

#[derive(Debug, Clone, PartialEq)]
pub enum MirrorKind {
    /// A registry we push copies into.
    Repository { prefix: String, naming: Naming },
    /// An ECR pull-through cache: upstream registry host → cache prefix.
    PullThrough { upstreams: BTreeMap<String, String> },
}

impl Mirror {
    /// Repository-name prefixes (`registry/prefix/`) under which images already are mirrored.
    pub(crate) fn roots(&self) -> Vec<String> {
        match &self.kind {
            MirrorKind::Repository { prefix, .. } => vec![join_root(&self.registry, prefix)],
            MirrorKind::PullThrough { upstreams } => upstreams
                .values()
                .map(|cache| join_root(&self.registry, cache))
                .collect(),
        }
    }

    /// Whether the mirror fills itself on first pull, so that a copy is only a warm-up.
    pub fn is_pull_through(&self) -> bool {
        matches!(self.kind, MirrorKind::PullThrough { .. })
    }

    pub(crate) fn default_swap(&self) -> SwapPolicy {
        if self.is_pull_through() {
            SwapPolicy::Always
        } else {
            SwapPolicy::IfPresent
        }
    }

    pub(crate) fn default_copy(&self) -> CopyPolicy {
        // A pull-through cache fills itself on first pull.
        if self.is_pull_through() {
            CopyPolicy::Off
        } else {
            CopyPolicy::OnDemand
        }
    }

    /// The mirrored name of `source` (canonical spelling) under this mirror; `None` when a
    /// pull-through mirror has no cache prefix for the source's registry.
    pub(crate) fn target_name(&self, source: &Reference) -> Option<String> {
        match &self.kind {
            MirrorKind::Repository { prefix, naming } => {
                let path = source.path();
                let mut name = root(&self.registry, prefix, path.len() + 16);
                match naming {
                    Naming::Flatten => name.push_str(path.rsplit('/').next().unwrap_or(path)),
                    Naming::Preserve => {
                        name.push_str(&host_as_path(source.registry()));
                        name.push('/');
                        name.push_str(path);
                    }
                    Naming::Rancher => {
                        name.push_str("mirrored-");
                        name.extend(path.chars().map(|c| if c == '/' { '-' } else { c }));
                    }
                }
                Some(name)
            }
            MirrorKind::PullThrough { upstreams } => upstreams
                .get(canonical_host(source.registry()))
                .map(|cache| {
                    let mut name = root(&self.registry, cache, source.path().len());
                    name.push_str(source.path());
                    name
                }),
        }
    }
}

fn join_root(registry: &str, prefix: &str) -> String {
    root(registry, prefix, 0)
}

/// `registry/prefix/` (`registry/` without a prefix), with room for `more` bytes: built by
/// pushes, as it is built for every rewrite.
fn root(registry: &str, prefix: &str, more: usize) -> String {
    let mut s = String::with_capacity(registry.len() + prefix.len() + 2 + more);
    s.push_str(registry);
    s.push('/');
    if !prefix.is_empty() {
        s.push_str(prefix);
        s.push('/');
    }
    s
}

/// A registry host as one repository path component (`localhost:5000` → `localhost_5000`).
fn host_as_path(host: &str) -> String {
    host.to_ascii_lowercase()
        .replace(':', "_")
        .replace(['[', ']'], "")
}
