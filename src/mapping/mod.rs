//! The mapping table: mirrors, exact entries and rules, and the decision for one image.
//!
//! Pure: the table is built from YAML text ([`build`]) and then never changes; [`Table::decide`]
//! does no I/O. Exact entries are found through a hash map keyed by the normalised name, and
//! rule globs are indexed by the literal components they start with ([`index`]), so the cost of
//! a decision does not grow with the table.

mod build;
mod clash;
mod ecr;
mod index;
mod mirrors;
mod policy;
mod raw;

use std::collections::HashSet;
use std::fmt;

use ahash::{AHashMap, AHashSet};

pub(crate) use build::parse_file;
pub use mirrors::{Mirror, MirrorKind, SecretRef};
pub use policy::{CopyPolicy, Naming, Overrides, Pin, Platform, Policy, SwapPolicy};

use crate::reference::{Reference, ReferenceError};
use index::{NameEntries, NameMatcher, RuleIndex, TagSpec, TargetTag};

/// The table compiled into the binary: the GHCR runbook's mirrored images plus a Docker Hub
/// catch-all.
pub const DEFAULT_TABLE_YAML: &str = include_str!("../../deploy/components/ghcr/config.yaml");
/// How the embedded table is named in messages.
pub const DEFAULT_TABLE_NAME: &str = "<embedded default table>";

/// An exact `source → target` entry.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The source as written in the table.
    pub source: String,
    /// The target as written in the table.
    pub target: String,
    pub index: usize,
    source_name: String,
    tag: TagSpec,
    target_name: String,
    target_tag: TargetTag,
    mirror: Option<usize>,
    overrides: Overrides,
}

/// Which tags of its source an exact entry covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryTags<'a> {
    /// One tag.
    Exact(&'a str),
    /// One digest, under any tag or none.
    Digest(&'a str),
    /// A tag glob (`1.29.1-*`).
    Glob,
    /// Any tag, carried over.
    Any,
}

impl Entry {
    /// The normalised source name the entry matches (`docker.io/library/redis`).
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// Which tags of the source it covers.
    pub fn tags(&self) -> EntryTags<'_> {
        match &self.tag {
            TagSpec::Exact(t) => EntryTags::Exact(t),
            TagSpec::Digest(d) => EntryTags::Digest(d),
            TagSpec::Glob { .. } => EntryTags::Glob,
            TagSpec::Any => EntryTags::Any,
        }
    }

    /// The one image this entry names, when it names one (an exact tag or a digest): what
    /// `sync` copies. Tag globs and any-tag entries name no single image.
    pub fn concrete_source(&self) -> Option<Reference> {
        match &self.tag {
            TagSpec::Exact(tag) => Reference::from_parts_str(&self.source_name, Some(tag), None),
            TagSpec::Digest(digest) => {
                Reference::from_parts_str(&self.source_name, None, Some(digest))
            }
            TagSpec::Any | TagSpec::Glob { .. } => None,
        }
    }
}

/// A rule: globs on the normalised name, excludes, and the mirror to send matches to.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub index: usize,
    pub matches: Vec<String>,
    pub excludes: Vec<String>,
    exclude_matchers: Vec<NameMatcher>,
    mirror: usize,
    overrides: Overrides,
}

impl PartialEq for Rule {
    fn eq(&self, other: &Self) -> bool {
        self.index == other.index && self.matches == other.matches
    }
}

/// A validated, immutable mapping table.
#[derive(Debug, Clone)]
pub struct Table {
    source: String,
    mirrors: Vec<Mirror>,
    entries: Vec<Entry>,
    entry_index: AHashMap<String, NameEntries>,
    rules: Vec<Rule>,
    rule_index: RuleIndex,
    /// `registry/prefix/` roots of every mirror, with the mirror's index.
    roots: Vec<(String, usize)>,
    /// Names of exact-entry targets that lie under no mirror root.
    loose_targets: AHashSet<String>,
    excluded_namespaces: HashSet<String>,
    /// Which opted-in namespaces may receive pull secrets (`namespaces.pullSecrets`); all of
    /// them without it.
    pull_secret_namespaces: Option<NamespaceFilter>,
    /// What is valid but probably not what was meant (`check-config` shows them).
    warnings: Vec<crate::problems::Problem>,
}

/// An admin's allow-list of namespaces: names matching one of the globs (when there are any)
/// and carrying every label (when there are any).
#[derive(Debug, Clone)]
pub struct NamespaceFilter {
    names: Vec<globset::GlobMatcher>,
    labels: Vec<(String, String)>,
}

impl NamespaceFilter {
    pub fn allows(&self, namespace: &str, label: &dyn Fn(&str) -> Option<String>) -> bool {
        (self.names.is_empty() || self.names.iter().any(|g| g.is_match(namespace)))
            && self
                .labels
                .iter()
                .all(|(k, v)| label(k).as_deref() == Some(v.as_str()))
    }

    /// The globs and labels, as the table wrote them (for `check-config`).
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self.names.iter().map(|g| g.glob().to_string()).collect();
        parts.extend(self.labels.iter().map(|(k, v)| format!("{k}={v}")));
        parts.join(", ")
    }
}

// ---------------------------------------------------------------------------------------------
// Decisions

/// What the table decided for one image string.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision<'t> {
    Rewrite(Rewrite<'t>),
    Keep(Keep<'t>),
}

/// A rewrite of `source` to `target`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rewrite<'t> {
    pub source: Reference,
    pub target: Reference,
    pub mirror: Option<&'t Mirror>,
    pub matched: Matched<'t>,
    pub policy: Policy<'t>,
}

impl Rewrite<'_> {
    /// The pull secret of the mirror, injected into Pods that use it.
    pub fn pull_secret(&self) -> Option<&str> {
        self.mirror.and_then(|m| m.pull_secret.as_deref())
    }
    pub fn mirror_name(&self) -> &str {
        self.mirror.map_or("", |m| m.name.as_str())
    }
}

/// The table element that produced a rewrite.
#[derive(Debug, Clone, Copy)]
pub enum Matched<'t> {
    Entry(&'t Entry),
    Rule(&'t Rule),
}

impl PartialEq for Matched<'_> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Matched::Entry(a), Matched::Entry(b)) => a.index == b.index,
            (Matched::Rule(a), Matched::Rule(b)) => a.index == b.index,
            _ => false,
        }
    }
}

impl fmt::Display for Matched<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Matched::Entry(e) => write!(f, "images[{}] {}", e.index, e.source),
            Matched::Rule(r) => write!(f, "rules[{}] {}", r.index, r.name),
        }
    }
}

/// An image left as it is, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Keep<'t> {
    /// The parsed image, when it parsed.
    pub source: Option<Reference>,
    pub reason: KeepReason<'t>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum KeepReason<'t> {
    Unparsable(ReferenceError),
    NoMatch,
    Excluded(&'t Rule),
    AlreadyMirrored(Option<&'t Mirror>),
    NoCachePrefix { mirror: &'t Mirror },
    InvalidTarget(ReferenceError),
}

/// The reason kinds without their data, as used in metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeepReasonKind {
    Unparsable,
    NoMatch,
    Excluded,
    AlreadyMirrored,
    NoCachePrefix,
    InvalidTarget,
}

impl KeepReasonKind {
    pub const ALL: [KeepReasonKind; 6] = [
        KeepReasonKind::Unparsable,
        KeepReasonKind::NoMatch,
        KeepReasonKind::Excluded,
        KeepReasonKind::AlreadyMirrored,
        KeepReasonKind::NoCachePrefix,
        KeepReasonKind::InvalidTarget,
    ];

    pub fn label(self) -> &'static str {
        match self {
            KeepReasonKind::Unparsable => "unparsable",
            KeepReasonKind::NoMatch => "no-match",
            KeepReasonKind::Excluded => "excluded",
            KeepReasonKind::AlreadyMirrored => "already-mirrored",
            KeepReasonKind::NoCachePrefix => "no-cache-prefix",
            KeepReasonKind::InvalidTarget => "invalid-target",
        }
    }
}

impl KeepReason<'_> {
    pub fn kind(&self) -> KeepReasonKind {
        match self {
            KeepReason::Unparsable(_) => KeepReasonKind::Unparsable,
            KeepReason::NoMatch => KeepReasonKind::NoMatch,
            KeepReason::Excluded(_) => KeepReasonKind::Excluded,
            KeepReason::AlreadyMirrored(_) => KeepReasonKind::AlreadyMirrored,
            KeepReason::NoCachePrefix { .. } => KeepReasonKind::NoCachePrefix,
            KeepReason::InvalidTarget(_) => KeepReasonKind::InvalidTarget,
        }
    }
}

impl fmt::Display for KeepReason<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeepReason::Unparsable(e) => write!(f, "not a valid image reference: {e}"),
            KeepReason::NoMatch => f.write_str("no exact entry or rule matches"),
            KeepReason::Excluded(r) => write!(f, "excluded by rules[{}] {}", r.index, r.name),
            KeepReason::AlreadyMirrored(Some(m)) => {
                write!(f, "already points at mirror {}", m.name)
            }
            KeepReason::AlreadyMirrored(None) => {
                f.write_str("already points at an exact entry's target")
            }
            KeepReason::NoCachePrefix { mirror } => write!(
                f,
                "pull-through mirror {} has no cache prefix for this registry",
                mirror.name
            ),
            KeepReason::InvalidTarget(e) => write!(f, "the mirrored name would be invalid: {e}"),
        }
    }
}

impl<'t> Decision<'t> {
    pub fn source(&self) -> Option<&Reference> {
        match self {
            Decision::Rewrite(r) => Some(&r.source),
            Decision::Keep(k) => k.source.as_ref(),
        }
    }
    pub fn rewrite(&self) -> Option<&Rewrite<'t>> {
        match self {
            Decision::Rewrite(r) => Some(r),
            Decision::Keep(_) => None,
        }
    }
}

impl Table {
    /// Decides what `image` becomes.
    pub fn decide<'t>(&'t self, image: &str) -> Decision<'t> {
        let source = match Reference::parse(image) {
            Ok(r) => r,
            Err(e) => {
                return Decision::Keep(Keep {
                    source: None,
                    reason: KeepReason::Unparsable(e),
                })
            }
        };
        let keep = |source, reason| Decision::Keep(Keep { source, reason });
        if source.registry().is_empty() {
            return keep(Some(source), KeepReason::NoMatch);
        }
        // Entries and rules match Docker Hub under its canonical spelling, whatever the Pod wrote.
        let found = {
            let canonical = source.canonical();
            let name = canonical.name();
            if let Some(mirror) = self.mirror_owning(name) {
                Found::Mirrored(Some(mirror))
            } else if self.loose_targets.contains(name) {
                Found::Mirrored(None)
            } else if let Some((entry, glob_text)) = self.find_entry(name, &canonical) {
                Found::Entry(entry, glob_text)
            } else {
                self.find_rule(name)
            }
        };
        match found {
            Found::Mirrored(m) => keep(Some(source), KeepReason::AlreadyMirrored(m)),
            Found::Entry(entry, glob_text) => self.rewrite_by_entry(source, entry, glob_text),
            Found::Rule(rule) => self.rewrite_by_rule(source, rule),
            Found::Excluded(rule) => keep(Some(source), KeepReason::Excluded(rule)),
            Found::Nothing => keep(Some(source), KeepReason::NoMatch),
        }
    }

    /// The mirror under whose root `target` is (its canonical name), if any.
    pub fn mirror_of_target(&self, target: &Reference) -> Option<&Mirror> {
        let canonical = target.canonical();
        self.mirror_owning(&format!("{}/{}", canonical.registry(), canonical.path()))
    }

    fn mirror_owning(&self, name: &str) -> Option<&Mirror> {
        self.roots
            .iter()
            .find(|(root, _)| name.starts_with(root.as_str()))
            .map(|(_, i)| &self.mirrors[*i])
    }

    /// The exact entry for an image, with the text a tag glob matched.
    fn find_entry(&self, name: &str, source: &Reference) -> Option<(&Entry, Option<String>)> {
        let entries = self.entry_index.get(name)?;
        if let Some(i) = source.digest().and_then(|d| entries.by_digest.get(d)) {
            return Some((&self.entries[*i], None));
        }
        if let Some(tag) = source.effective_tag() {
            if let Some(i) = entries.by_tag.get(tag) {
                return Some((&self.entries[*i], None));
            }
            for &i in &entries.globs {
                if let TagSpec::Glob { prefix, suffix } = &self.entries[i].tag {
                    if let Some(text) = TagSpec::glob_match(prefix, suffix, tag) {
                        return Some((&self.entries[i], Some(text.to_string())));
                    }
                }
            }
        }
        entries.any.map(|i| (&self.entries[i], None))
    }

    /// The first rule matching `name` that does not exclude it.
    fn find_rule(&self, name: &str) -> Found<'_> {
        let mut excluded_by = None;
        for i in self.rule_index.matching(name) {
            let rule = &self.rules[i];
            if rule.exclude_matchers.iter().any(|m| m.is_match(name)) {
                excluded_by.get_or_insert(rule);
                continue;
            }
            return Found::Rule(rule);
        }
        excluded_by.map_or(Found::Nothing, Found::Excluded)
    }

    fn rewrite_by_entry<'t>(
        &'t self,
        source: Reference,
        entry: &'t Entry,
        glob_text: Option<String>,
    ) -> Decision<'t> {
        let tag = match (&entry.target_tag, &entry.tag) {
            (TargetTag::Carry, _) => source.tag().map(str::to_string),
            // Same tag on both sides: keep the image's own spelling (no `:latest` added).
            (TargetTag::Exact(t), TagSpec::Exact(s)) if t == s => source.tag().map(str::to_string),
            (TargetTag::Exact(t), _) => Some(t.clone()),
            (TargetTag::Glob { prefix, suffix }, _) => {
                Some(format!("{prefix}{}{suffix}", glob_text.unwrap_or_default()))
            }
        };
        let mirror = entry.mirror.map(|i| &self.mirrors[i]);
        let policy = self.entry_policy(entry);
        let matched = Matched::Entry(entry);
        self.finish(source, &entry.target_name, tag, mirror, matched, policy)
    }

    fn rewrite_by_rule<'t>(&'t self, source: Reference, rule: &'t Rule) -> Decision<'t> {
        let mirror = &self.mirrors[rule.mirror];
        // Name the copy after the canonical Docker Hub spelling, whatever the Pod wrote.
        let Some(target_name) = mirror.target_name(&source.canonical()) else {
            return Decision::Keep(Keep {
                source: Some(source),
                reason: KeepReason::NoCachePrefix { mirror },
            });
        };
        let policy = self.rule_policy(rule);
        let tag = source.tag().map(str::to_string);
        let matched = Matched::Rule(rule);
        self.finish(source, &target_name, tag, Some(mirror), matched, policy)
    }

    fn finish<'t>(
        &'t self,
        source: Reference,
        target_name: &str,
        tag: Option<String>,
        mirror: Option<&'t Mirror>,
        matched: Matched<'t>,
        policy: Policy<'t>,
    ) -> Decision<'t> {
        let (registry, path) = target_name.split_once('/').unwrap_or((target_name, ""));
        match Reference::from_parts(registry, path, tag.as_deref(), source.digest()) {
            Ok(target) => Decision::Rewrite(Rewrite {
                source,
                target,
                mirror,
                matched,
                policy,
            }),
            Err(e) => Decision::Keep(Keep {
                source: Some(source),
                reason: KeepReason::InvalidTarget(e),
            }),
        }
    }

    /// Whether Pods in `namespace` are left alone.
    pub fn namespace_excluded(&self, namespace: &str) -> bool {
        self.excluded_namespaces.contains(namespace)
    }

    /// Whether `namespace` (with its labels) may receive the mirrors' pull secrets.
    pub fn pull_secrets_allowed(
        &self,
        namespace: &str,
        label: &dyn Fn(&str) -> Option<String>,
    ) -> bool {
        self.pull_secret_namespaces
            .as_ref()
            .is_none_or(|f| f.allows(namespace, label))
    }

    /// What is valid in the table but probably not what was meant.
    pub fn warnings(&self) -> &[crate::problems::Problem] {
        &self.warnings
    }

    /// The allow-list of namespaces that may receive pull secrets, when there is one.
    pub fn pull_secret_namespaces(&self) -> Option<&NamespaceFilter> {
        self.pull_secret_namespaces.as_ref()
    }
    pub fn mirrors(&self) -> &[Mirror] {
        &self.mirrors
    }
    pub fn mirror(&self, name: &str) -> Option<&Mirror> {
        self.mirrors.iter().find(|m| m.name == name)
    }
    /// The policies a rule's matches get: its own settings, then its mirror's, then the
    /// mirror's defaults.
    pub fn rule_policy<'t>(&'t self, rule: &'t Rule) -> Policy<'t> {
        let mirror = &self.mirrors[rule.mirror];
        Overrides::resolve(
            &[Some(&rule.overrides), Some(&mirror.overrides)],
            mirror.default_swap(),
            mirror.default_copy(),
        )
    }

    /// The policies of an exact entry: its own settings, then its mirror's; it swaps always
    /// by default (the table promises the copy exists).
    pub fn entry_policy<'t>(&'t self, entry: &'t Entry) -> Policy<'t> {
        let mirror = entry.mirror.map(|i| &self.mirrors[i]);
        Overrides::resolve(
            &[Some(&entry.overrides), mirror.map(|m| &m.overrides)],
            SwapPolicy::Always,
            CopyPolicy::OnDemand,
        )
    }

    /// The policies a mirror gives what its rules and entries do not set.
    pub fn mirror_policy<'t>(&'t self, mirror: &'t Mirror) -> Policy<'t> {
        Overrides::resolve(
            &[Some(&mirror.overrides)],
            mirror.default_swap(),
            mirror.default_copy(),
        )
    }

    /// The mirror an exact entry's target lies under.
    pub fn entry_mirror(&self, entry: &Entry) -> Option<&Mirror> {
        entry.mirror.map(|i| &self.mirrors[i])
    }

    /// The mirror a rule sends its matches to.
    pub fn rule_mirror(&self, rule: &Rule) -> &Mirror {
        &self.mirrors[rule.mirror]
    }
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }
    pub fn excluded_namespaces(&self) -> impl Iterator<Item = &str> {
        self.excluded_namespaces.iter().map(String::as_str)
    }
    /// Where the table came from (a file path or the embedded table).
    pub fn source_name(&self) -> &str {
        &self.source
    }
}

/// Where a lookup ended, before the decision is built from it.
enum Found<'t> {
    Mirrored(Option<&'t Mirror>),
    Entry(&'t Entry, Option<String>),
    Rule(&'t Rule),
    Excluded(&'t Rule),
    Nothing,
}
