//! The mapping table: mirrors, exact entries and rules, and the decision for one image.
//!
//! Pure: the table is built from YAML text and then never changes; [`Table::decide`] does no I/O.
//! Exact entries are found through a hash map keyed by the normalised name, and rule globs are
//! indexed by the registry they name, so the cost of a decision does not grow with the table.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::time::Duration;

use ahash::{AHashMap, AHashSet};
use globset::{GlobBuilder, GlobMatcher};
use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::reference::{is_docker_hub_host, Reference, ReferenceError, DOCKER_HUB};

/// The table compiled into the binary: seed 000's GHCR mirror plus a Docker Hub catch-all.
pub const DEFAULT_TABLE_YAML: &str = include_str!("../deploy/components/ghcr/config.yaml");
/// How the embedded table is named in messages.
pub const DEFAULT_TABLE_NAME: &str = "<embedded default table>";

// ---------------------------------------------------------------------------------------------
// Policies

/// Whether a match is rewritten unconditionally or only when the mirror has the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SwapPolicy {
    Always,
    IfPresent,
}

/// Whether an image missing from the mirror is copied there in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyPolicy {
    OnDemand,
    Off,
}

/// How a `repository` mirror names the copy of `docker.io/grafana/loki`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Naming {
    /// `<prefix>/loki`
    Flatten,
    /// `<prefix>/docker.io/grafana/loki`
    Preserve,
    /// `<prefix>/mirrored-grafana-loki`
    Rancher,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum MirrorType {
    Repository,
    PullThrough,
}

/// An `os/arch[/variant]` platform selector for copies.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn parse(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let word = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(|p| word(p)) {
            return Err(format!(
                "invalid platform {s:?}: expected os/arch or os/arch/variant, e.g. linux/arm64"
            ));
        }
        Ok(Platform {
            os: parts[0].to_string(),
            architecture: parts[1].to_string(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// The policies that apply to one rewrite, after entry, rule and mirror settings are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy<'t> {
    pub swap: SwapPolicy,
    pub copy: CopyPolicy,
    /// Platforms to copy; empty means all.
    pub platforms: &'t [Platform],
}

// ---------------------------------------------------------------------------------------------
// The validated table

/// A mirror target.
#[derive(Debug, Clone, PartialEq)]
pub struct Mirror {
    pub name: String,
    pub registry: String,
    pub kind: MirrorKind,
    pub pull_secret: Option<String>,
    swap: Option<SwapPolicy>,
    copy: Option<CopyPolicy>,
    platforms: Option<Vec<Platform>>,
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
    fn roots(&self) -> Vec<String> {
        match &self.kind {
            MirrorKind::Repository { prefix, .. } => vec![join_root(&self.registry, prefix)],
            MirrorKind::PullThrough { upstreams } => upstreams
                .values()
                .map(|cache| join_root(&self.registry, cache))
                .collect(),
        }
    }

    fn default_swap(&self) -> SwapPolicy {
        match self.kind {
            MirrorKind::Repository { .. } => SwapPolicy::IfPresent,
            MirrorKind::PullThrough { .. } => SwapPolicy::Always,
        }
    }

    fn default_copy(&self) -> CopyPolicy {
        match self.kind {
            MirrorKind::Repository { .. } => CopyPolicy::OnDemand,
            // The cache fills itself on first pull.
            MirrorKind::PullThrough { .. } => CopyPolicy::Off,
        }
    }

    /// The mirrored name of `source` under this mirror, or why there is none.
    fn target_name(&self, source: &Reference) -> Result<String, KeepReasonKind> {
        match &self.kind {
            MirrorKind::Repository { prefix, naming } => {
                let path = source.path();
                let tail = match naming {
                    Naming::Flatten => path.rsplit('/').next().unwrap_or(path).to_string(),
                    Naming::Preserve => format!("{}/{}", host_as_path(source.registry()), path),
                    Naming::Rancher => format!("mirrored-{}", path.replace('/', "-")),
                };
                Ok(format!("{}{}", join_root(&self.registry, prefix), tail))
            }
            MirrorKind::PullThrough { upstreams } => {
                let upstream = hub_alias(source.registry());
                match upstreams.get(upstream) {
                    Some(cache) => Ok(format!(
                        "{}{}",
                        join_root(&self.registry, cache),
                        source.path()
                    )),
                    None => Err(KeepReasonKind::NoCachePrefix),
                }
            }
        }
    }
}

fn join_root(registry: &str, prefix: &str) -> String {
    if prefix.is_empty() {
        format!("{registry}/")
    } else {
        format!("{registry}/{prefix}/")
    }
}

/// A registry host as one repository path component (`localhost:5000` → `localhost_5000`).
fn host_as_path(host: &str) -> String {
    host.to_ascii_lowercase()
        .replace(':', "_")
        .replace(['[', ']'], "")
}

/// Docker Hub under any of its spellings is keyed as `docker.io`.
fn hub_alias(host: &str) -> &str {
    if is_docker_hub_host(host) {
        DOCKER_HUB
    } else {
        host
    }
}

/// Which tags of a source name an exact entry covers.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TagSpec {
    Any,
    Exact(String),
    Glob { prefix: String, suffix: String },
    Digest(String),
}

impl TagSpec {
    fn glob_match<'a>(prefix: &str, suffix: &str, tag: &'a str) -> Option<&'a str> {
        if tag.len() >= prefix.len() + suffix.len()
            && tag.starts_with(prefix)
            && tag.ends_with(suffix)
        {
            Some(&tag[prefix.len()..tag.len() - suffix.len()])
        } else {
            None
        }
    }
}

/// The tag an exact entry's target gets.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TargetTag {
    /// The source's tag carried over unchanged.
    Carry,
    Exact(String),
    /// The text a source tag glob matched goes where `*` is.
    Glob {
        prefix: String,
        suffix: String,
    },
}

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
    swap: Option<SwapPolicy>,
    copy: Option<CopyPolicy>,
    platforms: Option<Vec<Platform>>,
}

impl Entry {
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
    swap: Option<SwapPolicy>,
    copy: Option<CopyPolicy>,
    platforms: Option<Vec<Platform>>,
}

/// One compiled glob on a normalised name, with fast paths for the common shapes.
#[derive(Debug, Clone)]
enum NameMatcher {
    /// No wildcard: the name itself.
    Exact(String),
    /// `prefix/**`: every name under `prefix/`.
    Under(String),
    Glob(GlobMatcher),
}

fn has_glob_meta(s: &str) -> bool {
    s.contains(['*', '?', '[', '{', '\\'])
}

impl NameMatcher {
    fn new(glob: &str) -> Result<Self, globset::Error> {
        // `*` stays within one path component; `**` crosses them.
        let compiled = GlobBuilder::new(glob).literal_separator(true).build()?;
        if !has_glob_meta(glob) {
            return Ok(NameMatcher::Exact(glob.to_string()));
        }
        match glob.strip_suffix("/**") {
            Some(prefix) if !has_glob_meta(prefix) => Ok(NameMatcher::Under(format!("{prefix}/"))),
            _ => Ok(NameMatcher::Glob(compiled.compile_matcher())),
        }
    }

    fn is_match(&self, name: &str) -> bool {
        match self {
            NameMatcher::Exact(e) => e == name,
            NameMatcher::Under(prefix) => {
                name.len() > prefix.len() && name.starts_with(prefix.as_str())
            }
            NameMatcher::Glob(g) => g.is_match(name),
        }
    }
}

/// Rule globs indexed by their literal leading components (`quay.io/org5` for
/// `quay.io/org5/*`): a name is tested only against globs whose literal prefix it starts with.
#[derive(Debug, Clone, Default)]
struct RuleIndex {
    /// Every glob with the rule it belongs to, in rule order.
    globs: Vec<(usize, NameMatcher)>,
    by_prefix: AHashMap<String, Vec<usize>>,
    /// Globs whose first component has a wildcard: tried for every name.
    unanchored: Vec<usize>,
}

impl RuleIndex {
    fn add(&mut self, rule: usize, glob: &str, matcher: NameMatcher) {
        let position = self.globs.len();
        self.globs.push((rule, matcher));
        let literal = glob
            .split('/')
            .take_while(|c| !has_glob_meta(c))
            .map(str::len)
            .fold(None, |end: Option<usize>, len| {
                Some(end.map_or(len, |e| e + 1 + len))
            });
        match literal {
            Some(end) => self
                .by_prefix
                .entry(glob[..end].to_string())
                .or_default()
                .push(position),
            None => self.unanchored.push(position),
        }
    }

    /// The rules with a glob matching `name`, in rule order (a rule may repeat).
    fn matching<'a>(&'a self, name: &'a str) -> impl Iterator<Item = usize> + 'a {
        let boundaries = name
            .match_indices('/')
            .map(|(i, _)| i)
            .chain(std::iter::once(name.len()));
        let mut candidates: Vec<usize> = boundaries
            .filter_map(|end| self.by_prefix.get(&name[..end]))
            .flatten()
            .chain(&self.unanchored)
            .copied()
            .collect();
        candidates.sort_unstable();
        candidates.into_iter().filter_map(move |g| {
            let (rule, matcher) = &self.globs[g];
            matcher.is_match(name).then_some(*rule)
        })
    }
}

/// Per-registry access for checks and copies (used by the registry module).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RegistryAccess {
    pub username_env: Option<String>,
    pub password_env: Option<String>,
    pub docker_config: Option<String>,
    #[serde(default)]
    pub insecure: bool,
    pub ca_file: Option<String>,
    #[serde(default)]
    pub monolithic_upload: bool,
}

/// Existence-check settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckSettings {
    pub present_ttl: Duration,
    pub absent_ttl: Duration,
    pub timeout: Duration,
}

impl Default for CheckSettings {
    fn default() -> Self {
        CheckSettings {
            present_ttl: Duration::from_secs(600),
            absent_ttl: Duration::from_secs(30),
            timeout: Duration::from_secs(1),
        }
    }
}

/// Background-copy settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopySettings {
    /// Copies running at once.
    pub concurrency: usize,
    /// Copies waiting to start; more are dropped (and asked for again by the next Pod).
    pub queue_size: usize,
    /// First wait before a failed copy is tried again; doubles per failure, up to 64×.
    pub retry_backoff: Duration,
    /// Tries of one copy before it is given up (the next Pod that needs it queues it again).
    pub max_attempts: u32,
}

impl Default for CopySettings {
    fn default() -> Self {
        CopySettings {
            concurrency: 4,
            queue_size: 256,
            retry_backoff: Duration::from_secs(30),
            max_attempts: 6,
        }
    }
}

/// The entries of one source name, indexed by how they match.
#[derive(Debug, Default, Clone)]
struct NameEntries {
    by_tag: AHashMap<String, usize>,
    by_digest: AHashMap<String, usize>,
    globs: Vec<usize>,
    any: Option<usize>,
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
    registries: BTreeMap<String, RegistryAccess>,
    checks: CheckSettings,
    copies: CopySettings,
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

impl PartialEq for Rule {
    fn eq(&self, other: &Self) -> bool {
        self.index == other.index && self.matches == other.matches
    }
}

impl Rule {
    pub fn mirror_index(&self) -> usize {
        self.mirror
    }
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
    /// The table compiled into the binary.
    pub fn embedded_default() -> Result<Table, TableError> {
        Table::parse(DEFAULT_TABLE_NAME, DEFAULT_TABLE_YAML)
    }

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
        // Look up with the name borrowed from `source`, then build the decision from indices.
        enum Found<'t> {
            Mirrored(Option<&'t Mirror>),
            Entry(&'t Entry, Option<String>),
            Rule(&'t Rule),
            Excluded(&'t Rule),
            Nothing,
        }
        let found = {
            let name = match_name(&source);
            if let Some(mirror) = self.mirror_owning(&name) {
                Found::Mirrored(Some(mirror))
            } else if self.loose_targets.contains(name.as_ref()) {
                Found::Mirrored(None)
            } else if let Some((entry, glob_text)) = self.find_entry(&name, &source) {
                Found::Entry(entry, glob_text)
            } else {
                let mut excluded_by = None;
                let mut chosen = None;
                for i in self.rule_index.matching(&name) {
                    let rule = &self.rules[i];
                    if rule.exclude_matchers.iter().any(|m| m.is_match(&name)) {
                        excluded_by.get_or_insert(rule);
                        continue;
                    }
                    chosen = Some(rule);
                    break;
                }
                match (chosen, excluded_by) {
                    (Some(rule), _) => Found::Rule(rule),
                    (None, Some(rule)) => Found::Excluded(rule),
                    (None, None) => Found::Nothing,
                }
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
        let policy = Policy {
            swap: entry
                .swap
                .or(mirror.and_then(|m| m.swap))
                .unwrap_or(SwapPolicy::Always),
            copy: entry
                .copy
                .or(mirror.and_then(|m| m.copy))
                .unwrap_or(CopyPolicy::OnDemand),
            platforms: entry
                .platforms
                .as_deref()
                .or(mirror.and_then(|m| m.platforms.as_deref()))
                .unwrap_or(&[]),
        };
        self.finish(
            source,
            &entry.target_name,
            tag,
            mirror,
            Matched::Entry(entry),
            policy,
        )
    }

    fn rewrite_by_rule<'t>(&'t self, source: Reference, rule: &'t Rule) -> Decision<'t> {
        let mirror = &self.mirrors[rule.mirror];
        // Name the copy after the canonical Docker Hub spelling, whatever the Pod wrote.
        let canonical = if source.is_docker_hub() && source.registry() != DOCKER_HUB {
            Reference::parse(&match_name(&source)).ok()
        } else {
            None
        };
        let target_name = match mirror.target_name(canonical.as_ref().unwrap_or(&source)) {
            Ok(name) => name,
            Err(_) => {
                return Decision::Keep(Keep {
                    source: Some(source),
                    reason: KeepReason::NoCachePrefix { mirror },
                })
            }
        };
        let policy = Policy {
            swap: rule.swap.or(mirror.swap).unwrap_or(mirror.default_swap()),
            copy: rule.copy.or(mirror.copy).unwrap_or(mirror.default_copy()),
            platforms: rule
                .platforms
                .as_deref()
                .or(mirror.platforms.as_deref())
                .unwrap_or(&[]),
        };
        let tag = source.tag().map(str::to_string);
        self.finish(
            source,
            &target_name,
            tag,
            Some(mirror),
            Matched::Rule(rule),
            policy,
        )
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
    pub fn mirrors(&self) -> &[Mirror] {
        &self.mirrors
    }
    pub fn mirror(&self, name: &str) -> Option<&Mirror> {
        self.mirrors.iter().find(|m| m.name == name)
    }
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }
    pub fn registries(&self) -> &BTreeMap<String, RegistryAccess> {
        &self.registries
    }
    /// Access settings of a registry host (Docker Hub under any spelling).
    pub fn registry_access(&self, host: &str) -> Option<&RegistryAccess> {
        self.registries.get(hub_alias(host))
    }
    pub fn checks(&self) -> CheckSettings {
        self.checks
    }
    pub fn copies(&self) -> CopySettings {
        self.copies
    }
    pub fn excluded_namespaces(&self) -> impl Iterator<Item = &str> {
        self.excluded_namespaces.iter().map(String::as_str)
    }
    /// Where the table came from (a file path or the embedded table).
    pub fn source_name(&self) -> &str {
        &self.source
    }
}

/// The name rules and entries match on: Docker Hub's other spellings count as `docker.io`.
fn match_name(source: &Reference) -> Cow<'_, str> {
    if source.registry() != DOCKER_HUB && source.is_docker_hub() {
        let path = source.path();
        if path.contains('/') {
            Cow::Owned(format!("{DOCKER_HUB}/{path}"))
        } else {
            Cow::Owned(format!("{DOCKER_HUB}/library/{path}"))
        }
    } else {
        Cow::Borrowed(source.name())
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing and validation

/// One thing wrong with a table, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    pub line: u64,
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file, self.line)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// Everything wrong with a table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct TableError {
    pub problems: Vec<Problem>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTable {
    #[serde(default)]
    mirrors: BTreeMap<String, Spanned<RawMirror>>,
    #[serde(default)]
    images: Vec<Spanned<RawImage>>,
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
    #[serde(default)]
    namespaces: Option<RawNamespaces>,
    #[serde(default)]
    registries: BTreeMap<String, Spanned<RegistryAccess>>,
    #[serde(default)]
    checks: Option<Spanned<RawChecks>>,
    #[serde(default)]
    copies: Option<Spanned<RawCopies>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawMirror {
    #[serde(rename = "type")]
    kind: MirrorType,
    registry: Spanned<String>,
    prefix: Option<Spanned<String>>,
    naming: Option<Naming>,
    pull_secret: Option<Spanned<String>>,
    upstreams: Option<BTreeMap<String, Spanned<String>>>,
    swap: Option<SwapPolicy>,
    copy: Option<CopyPolicy>,
    platforms: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawImage {
    source: Spanned<String>,
    target: Spanned<String>,
    swap: Option<SwapPolicy>,
    copy: Option<CopyPolicy>,
    platforms: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRule {
    name: Option<String>,
    #[serde(rename = "match")]
    matches: Vec<Spanned<String>>,
    #[serde(default)]
    exclude: Vec<Spanned<String>>,
    mirror: Spanned<String>,
    swap: Option<SwapPolicy>,
    copy: Option<CopyPolicy>,
    platforms: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawNamespaces {
    #[serde(default)]
    exclude: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawChecks {
    present_ttl: Option<Spanned<String>>,
    absent_ttl: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawCopies {
    concurrency: Option<Spanned<usize>>,
    queue_size: Option<Spanned<usize>>,
    retry_backoff: Option<Spanned<String>>,
    max_attempts: Option<Spanned<usize>>,
}

/// Collects problems with their file and line.
struct Problems<'a> {
    file: &'a str,
    list: Vec<Problem>,
}

impl Problems<'_> {
    fn add<T>(&mut self, at: &Spanned<T>, field: impl Into<String>, message: impl Into<String>) {
        self.list.push(Problem {
            file: self.file.to_string(),
            line: at.referenced.line(),
            field: field.into(),
            message: message.into(),
        });
    }
}

impl Table {
    /// Parses and validates a table. `file` names it in every problem reported.
    pub fn parse(file: &str, yaml: &str) -> Result<Table, TableError> {
        // The parser's default budget (250,000 nodes) is below a table of 100,000 entries.
        let mut budget = serde_saphyr::Budget::default();
        budget.max_nodes = 20_000_000;
        budget.max_events = 40_000_000;
        let mut options = serde_saphyr::Options::default();
        options.budget = Some(budget);
        let text = if yaml.trim().is_empty() { "{}" } else { yaml };
        let raw: RawTable = serde_saphyr::from_str_with_options(text, options)
            .map_err(|e| yaml_error(file, yaml, &e))?;
        let mut problems = Problems {
            file,
            list: Vec::new(),
        };
        let table = build(file, raw, &mut problems);
        if problems.list.is_empty() {
            Ok(table)
        } else {
            Err(TableError {
                problems: problems.list,
            })
        }
    }
}

fn build(file: &str, raw: RawTable, problems: &mut Problems) -> Table {
    let mut mirrors = Vec::new();
    for (name, spanned) in &raw.mirrors {
        let field = format!("mirrors.{name}");
        if let Some(mirror) = build_mirror(name, spanned, &field, problems) {
            mirrors.push(mirror);
        }
    }
    let mut roots: Vec<(String, usize)> = mirrors
        .iter()
        .enumerate()
        .flat_map(|(i, m)| m.roots().into_iter().map(move |r| (r, i)))
        .collect();
    // The longest root owns a name, so a mirror nested in another's prefix is found first.
    roots.sort_by_key(|r| std::cmp::Reverse(r.0.len()));

    let mut entries = Vec::new();
    for (i, spanned) in raw.images.iter().enumerate() {
        if let Some(entry) = build_entry(i, spanned, &roots, problems) {
            entries.push(entry);
        }
    }
    let entry_index = index_entries(&entries, &raw.images, problems);
    check_entry_clashes(&entries, &raw.images, problems);

    let mut rules = Vec::new();
    let mut rule_index = RuleIndex::default();
    for (i, spanned) in raw.rules.iter().enumerate() {
        let field = format!("rules[{i}]");
        let rule = &spanned.value;
        let Some(mirror) = mirrors.iter().position(|m| m.name == rule.mirror.value) else {
            problems.add(
                &rule.mirror,
                format!("{field}.mirror"),
                format!("unknown mirror {:?}", rule.mirror.value),
            );
            continue;
        };
        if rule.matches.is_empty() {
            problems.add(
                spanned,
                format!("{field}.match"),
                "at least one glob is required",
            );
        }
        let mut globs = Vec::new();
        for (j, m) in rule.matches.iter().enumerate() {
            if let Some(matcher) = compile_glob(m, &format!("{field}.match[{j}]"), problems) {
                globs.push((canonical_glob(&m.value), matcher));
            }
        }
        let exclude_matchers = rule
            .exclude
            .iter()
            .enumerate()
            .filter_map(|(j, m)| compile_glob(m, &format!("{field}.exclude[{j}]"), problems))
            .collect();
        let built = Rule {
            name: rule.name.clone().unwrap_or_else(|| format!("rule-{i}")),
            index: i,
            matches: rule
                .matches
                .iter()
                .map(|m| canonical_glob(&m.value))
                .collect(),
            excludes: rule
                .exclude
                .iter()
                .map(|m| canonical_glob(&m.value))
                .collect(),
            exclude_matchers,
            mirror,
            swap: rule.swap,
            copy: rule.copy,
            platforms: build_platforms(&rule.platforms, &format!("{field}.platforms"), problems),
        };
        check_rule_clashes(&built, &mirrors[mirror], spanned, &entries, problems);
        for (glob, matcher) in globs {
            rule_index.add(rules.len(), &glob, matcher);
        }
        rules.push(built);
    }

    let loose_targets = entries
        .iter()
        .filter(|e| e.mirror.is_none())
        .map(|e| e.target_name.clone())
        .collect();

    let registries = raw
        .registries
        .iter()
        .map(|(host, access)| {
            if access.value.username_env.is_some() != access.value.password_env.is_some() {
                problems.add(
                    access,
                    format!("registries.{host}"),
                    "usernameEnv and passwordEnv go together",
                );
            }
            (registry_key(host), access.value.clone())
        })
        .collect();

    let mut checks = CheckSettings::default();
    if let Some(c) = &raw.checks {
        let mut set_duration =
            |value: &Option<Spanned<String>>, name: &str, slot: &mut Duration| {
                if let Some(v) = value {
                    match parse_duration(&v.value) {
                        Ok(d) => *slot = d,
                        Err(e) => problems.add(v, format!("checks.{name}"), e),
                    }
                }
            };
        set_duration(&c.value.present_ttl, "presentTtl", &mut checks.present_ttl);
        set_duration(&c.value.absent_ttl, "absentTtl", &mut checks.absent_ttl);
        set_duration(&c.value.timeout, "timeout", &mut checks.timeout);
    }
    let mut copies = CopySettings::default();
    if let Some(c) = &raw.copies {
        let mut in_range =
            |value: &Option<Spanned<usize>>, field: &str, max: usize, slot: &mut usize| {
                if let Some(n) = value {
                    if (1..=max).contains(&n.value) {
                        *slot = n.value;
                    } else {
                        problems.add(
                            n,
                            format!("copies.{field}"),
                            format!("must be between 1 and {max}"),
                        );
                    }
                }
            };
        in_range(
            &c.value.concurrency,
            "concurrency",
            64,
            &mut copies.concurrency,
        );
        in_range(
            &c.value.queue_size,
            "queueSize",
            100_000,
            &mut copies.queue_size,
        );
        let mut attempts = copies.max_attempts as usize;
        in_range(&c.value.max_attempts, "maxAttempts", 100, &mut attempts);
        copies.max_attempts = attempts as u32; // at most 100
        if let Some(v) = &c.value.retry_backoff {
            match parse_duration(&v.value) {
                Ok(d) if !d.is_zero() => copies.retry_backoff = d,
                Ok(_) => problems.add(v, "copies.retryBackoff", "must be more than 0"),
                Err(e) => problems.add(v, "copies.retryBackoff", e),
            }
        }
    }

    Table {
        source: file.to_string(),
        mirrors,
        entries,
        entry_index,
        rules,
        rule_index,
        roots,
        loose_targets,
        excluded_namespaces: raw
            .namespaces
            .map(|n| n.exclude.into_iter().collect())
            .unwrap_or_default(),
        registries,
        checks,
        copies,
    }
}

/// A registry key as users write it (`https://index.docker.io/v1/`, `ghcr.io`) → its host.
pub fn registry_key(key: &str) -> String {
    let host = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = host.split('/').next().unwrap_or(host);
    hub_alias(host).to_string()
}

fn build_mirror(
    name: &str,
    spanned: &Spanned<RawMirror>,
    field: &str,
    problems: &mut Problems,
) -> Option<Mirror> {
    let raw = &spanned.value;
    let registry = registry_key(&raw.registry.value);
    if Reference::from_parts(&registry, "x", None, None).map(|r| r.registry().to_string())
        != Ok(registry.clone())
    {
        problems.add(
            &raw.registry,
            format!("{field}.registry"),
            format!("invalid registry host {:?}", raw.registry.value),
        );
        return None;
    }
    let kind = match raw.kind {
        MirrorType::Repository => {
            if let Some(u) = &raw.upstreams {
                let _ = u;
                problems.add(
                    spanned,
                    format!("{field}.upstreams"),
                    "only a pull-through mirror has upstreams",
                );
            }
            let prefix = raw
                .prefix
                .as_ref()
                .map(|p| p.value.trim_matches('/').to_string());
            if let (Some(p), Some(at)) = (&prefix, &raw.prefix) {
                if !p.is_empty() && !p.split('/').all(crate::reference::valid_path_component) {
                    problems.add(
                        at,
                        format!("{field}.prefix"),
                        format!("invalid repository path prefix {:?}", at.value),
                    );
                }
            }
            MirrorKind::Repository {
                prefix: prefix.unwrap_or_default(),
                naming: raw.naming.unwrap_or(Naming::Flatten),
            }
        }
        MirrorType::PullThrough => {
            if raw.prefix.is_some() || raw.naming.is_some() {
                problems.add(
                    spanned,
                    field,
                    "a pull-through mirror takes upstreams, not prefix or naming",
                );
            }
            let Some(upstreams) = &raw.upstreams else {
                problems.add(
                    spanned,
                    format!("{field}.upstreams"),
                    "a pull-through mirror needs upstreams (registry: cache prefix)",
                );
                return None;
            };
            let mut map = BTreeMap::new();
            for (upstream, cache) in upstreams {
                let c = cache.value.trim_matches('/');
                if c.is_empty() || !c.split('/').all(crate::reference::valid_path_component) {
                    problems.add(
                        cache,
                        format!("{field}.upstreams.{upstream}"),
                        format!("invalid cache prefix {:?}", cache.value),
                    );
                }
                map.insert(registry_key(upstream), c.to_string());
            }
            MirrorKind::PullThrough { upstreams: map }
        }
    };
    Some(Mirror {
        name: name.to_string(),
        registry,
        kind,
        pull_secret: raw.pull_secret.as_ref().map(|s| s.value.clone()),
        swap: raw.swap,
        copy: raw.copy,
        platforms: build_platforms(&raw.platforms, &format!("{field}.platforms"), problems),
    })
}

fn build_platforms(
    raw: &Option<Vec<Spanned<String>>>,
    field: &str,
    problems: &mut Problems,
) -> Option<Vec<Platform>> {
    let raw = raw.as_ref()?;
    let mut out = Vec::new();
    for (i, p) in raw.iter().enumerate() {
        match Platform::parse(&p.value) {
            Ok(platform) => out.push(platform),
            Err(e) => problems.add(p, format!("{field}[{i}]"), e),
        }
    }
    Some(out)
}

/// Splits `name[:tag][@digest]` where the tag may hold one `*`.
fn split_tag_glob(s: &str) -> (&str, Option<&str>) {
    let last_slash = s.rfind('/').map_or(0, |i| i + 1);
    match s[last_slash..].find(':') {
        Some(i) if !s[last_slash..].contains('@') && s[last_slash + i + 1..].contains('*') => {
            (&s[..last_slash + i], Some(&s[last_slash + i + 1..]))
        }
        _ => (s, None),
    }
}

/// Parses a table reference whose tag may be a glob (`name:1.29.1-*`).
fn parse_with_glob(s: &str) -> Result<(Reference, Option<(String, String)>), String> {
    let (name, glob) = split_tag_glob(s);
    match glob {
        None => Reference::parse(s)
            .map(|r| (r, None))
            .map_err(|e| e.to_string()),
        Some(tag) => {
            if tag.matches('*').count() != 1 {
                return Err(format!("tag glob {tag:?} may hold one '*' only"));
            }
            let (prefix, suffix) = tag.split_once('*').unwrap_or((tag, ""));
            // Validate with the widest stand-in: the glob must admit some valid tag.
            let probe = format!("{name}:{}", tag.replace('*', "x"));
            let r = Reference::parse(&probe).map_err(|e| e.to_string())?;
            Ok((r, Some((prefix.to_string(), suffix.to_string()))))
        }
    }
}

fn build_entry(
    i: usize,
    spanned: &Spanned<RawImage>,
    roots: &[(String, usize)],
    problems: &mut Problems,
) -> Option<Entry> {
    let raw = &spanned.value;
    let field = format!("images[{i}]");
    let source = match parse_with_glob(&raw.source.value) {
        Ok(s) => s,
        Err(e) => {
            problems.add(&raw.source, format!("{field}.source"), e);
            return None;
        }
    };
    let target = match parse_with_glob(&raw.target.value) {
        Ok(t) => t,
        Err(e) => {
            problems.add(&raw.target, format!("{field}.target"), e);
            return None;
        }
    };
    let (source_ref, source_glob) = source;
    let (target_ref, target_glob) = target;
    if target_ref.digest().is_some() {
        problems.add(
            &raw.target,
            format!("{field}.target"),
            "a target carries the source's digest; it cannot name its own",
        );
        return None;
    }
    let tag = match (&source_glob, source_ref.tag(), source_ref.digest()) {
        (Some((p, s)), _, _) => TagSpec::Glob {
            prefix: p.clone(),
            suffix: s.clone(),
        },
        (None, _, Some(d)) => TagSpec::Digest(d.to_string()),
        (None, Some(t), None) => TagSpec::Exact(t.to_string()),
        (None, None, None) => TagSpec::Any,
    };
    let target_tag = match (&target_glob, target_ref.tag()) {
        (Some((p, s)), _) => TargetTag::Glob {
            prefix: p.clone(),
            suffix: s.clone(),
        },
        (None, Some(t)) => TargetTag::Exact(t.to_string()),
        (None, None) => TargetTag::Carry,
    };
    let mismatch = match (&tag, &target_tag) {
        (TagSpec::Glob { .. }, TargetTag::Exact(_)) => {
            Some("the source tag is a glob, so the target tag needs the same '*'")
        }
        (TagSpec::Glob { .. }, TargetTag::Carry) => None,
        (_, TargetTag::Glob { .. }) if !matches!(tag, TagSpec::Glob { .. }) => {
            Some("the target tag has a '*' but the source tag is not a glob")
        }
        (TagSpec::Any, TargetTag::Exact(_)) => {
            Some("the source matches any tag, so the target cannot fix one")
        }
        _ => None,
    };
    if let Some(m) = mismatch {
        problems.add(&raw.target, format!("{field}.target"), m);
        return None;
    }
    let target_name = target_ref.name();
    let mirror = roots
        .iter()
        .find(|(root, _)| target_name.starts_with(root.as_str()))
        .map(|(_, i)| *i);
    Some(Entry {
        source: raw.source.value.clone(),
        target: raw.target.value.clone(),
        index: i,
        source_name: match_name(&source_ref).into_owned(),
        tag,
        target_name: target_name.to_string(),
        target_tag,
        mirror,
        swap: raw.swap,
        copy: raw.copy,
        platforms: build_platforms(&raw.platforms, &format!("{field}.platforms"), problems),
    })
}

fn index_entries(
    entries: &[Entry],
    raw: &[Spanned<RawImage>],
    problems: &mut Problems,
) -> AHashMap<String, NameEntries> {
    let mut index: AHashMap<String, NameEntries> = AHashMap::with_capacity(entries.len());
    for (pos, e) in entries.iter().enumerate() {
        let slot = index.entry(e.source_name.clone()).or_default();
        let previous = match &e.tag {
            TagSpec::Exact(t) => slot.by_tag.insert(t.clone(), pos),
            TagSpec::Digest(d) => slot.by_digest.insert(d.clone(), pos),
            TagSpec::Any => slot.any.replace(pos),
            TagSpec::Glob { .. } => {
                let dup = slot
                    .globs
                    .iter()
                    .copied()
                    .find(|&other| entries[other].tag == e.tag);
                slot.globs.push(pos);
                dup
            }
        };
        if let Some(prev) = previous {
            problems.add(
                &raw[e.index].value.source,
                format!("images[{}].source", e.index),
                format!(
                    "duplicate source: images[{}] already maps {}",
                    entries[prev].index, entries[prev].source
                ),
            );
        }
    }
    index
}

/// The set of target tags an entry can produce.
fn target_tags(e: &Entry) -> TagSpec {
    match (&e.target_tag, &e.tag) {
        (TargetTag::Exact(t), _) => TagSpec::Exact(t.clone()),
        (TargetTag::Glob { prefix, suffix }, _) => TagSpec::Glob {
            prefix: prefix.clone(),
            suffix: suffix.clone(),
        },
        (TargetTag::Carry, tag) => tag.clone(),
    }
}

fn tags_overlap(a: &TagSpec, b: &TagSpec) -> bool {
    use TagSpec::*;
    match (a, b) {
        (Any, _) | (_, Any) => true,
        (Digest(x), Digest(y)) => x == y,
        (Digest(_), _) | (_, Digest(_)) => false,
        (Exact(x), Exact(y)) => x == y,
        (Exact(t), Glob { prefix, suffix }) | (Glob { prefix, suffix }, Exact(t)) => {
            TagSpec::glob_match(prefix, suffix, t).is_some()
        }
        (
            Glob {
                prefix: p1,
                suffix: s1,
            },
            Glob {
                prefix: p2,
                suffix: s2,
            },
        ) => {
            (p1.starts_with(p2.as_str()) || p2.starts_with(p1.as_str()))
                && (s1.ends_with(s2.as_str()) || s2.ends_with(s1.as_str()))
        }
    }
}

/// Two entries that send different sources to one target name and tag.
fn check_entry_clashes(entries: &[Entry], raw: &[Spanned<RawImage>], problems: &mut Problems) {
    let mut by_target: HashMap<&str, Vec<&Entry>> = HashMap::new();
    for e in entries {
        by_target.entry(e.target_name.as_str()).or_default().push(e);
    }
    for group in by_target.values().filter(|g| g.len() > 1) {
        for (k, a) in group.iter().enumerate() {
            for b in &group[k + 1..] {
                if a.source_name != b.source_name && tags_overlap(&target_tags(a), &target_tags(b))
                {
                    problems.add(
                        &raw[b.index].value.target,
                        format!("images[{}].target", b.index),
                        format!(
                            "naming clash: {} and images[{}] {} both map to {}",
                            b.source, a.index, a.source, b.target
                        ),
                    );
                }
            }
        }
    }
}

/// A flattening or rancher rule that can send different sources to one target name.
fn check_rule_clashes(
    rule: &Rule,
    mirror: &Mirror,
    spanned: &Spanned<RawRule>,
    entries: &[Entry],
    problems: &mut Problems,
) {
    let MirrorKind::Repository { naming, .. } = &mirror.kind else {
        return;
    };
    for glob in &rule.matches {
        let components: Vec<&str> = glob.split('/').collect();
        let (last, before) = components.split_last().unwrap_or((&"", &[]));
        let risky = match naming {
            Naming::Preserve => false,
            // Only the last component survives, so any freedom before it can collide.
            Naming::Flatten => before.iter().any(|c| has_glob_meta(c)) || last.contains("**"),
            // The registry is dropped, and `**` lets `a/b-c` meet `a-b/c`.
            Naming::Rancher => {
                before.first().is_some_and(|c| has_glob_meta(c)) || glob.contains("**")
            }
        };
        if risky {
            problems.add(
                spanned,
                format!("rules[{}].match", rule.index),
                format!(
                    "naming clash: {glob:?} with {} naming on mirror {} can send different \
                     sources to one target name; use naming: preserve or a narrower glob",
                    naming_label(*naming),
                    mirror.name
                ),
            );
            return;
        }
    }
    if *naming != Naming::Flatten {
        return;
    }
    // A rule's flattened name may also equal an exact entry's target from another source.
    let Ok(matchers) = rule
        .matches
        .iter()
        .map(|g| NameMatcher::new(g))
        .collect::<Result<Vec<_>, _>>()
    else {
        return;
    };
    for e in entries.iter().filter(|e| e.mirror.is_some()) {
        for glob in &rule.matches {
            let Some((dir, _)) = glob.rsplit_once('/') else {
                continue;
            };
            let Some(last) = e.target_name.rsplit('/').next() else {
                continue;
            };
            let candidate = format!("{dir}/{last}");
            let same_target = mirror
                .target_name(&match Reference::parse(&candidate) {
                    Ok(r) => r,
                    Err(_) => continue,
                })
                .is_ok_and(|t| t == e.target_name);
            if same_target
                && matchers.iter().any(|m| m.is_match(&candidate))
                && candidate != e.source_name
            {
                problems.add(
                    spanned,
                    format!("rules[{}].match", rule.index),
                    format!(
                        "naming clash: {candidate} would flatten to {}, the target of images[{}] {}",
                        e.target_name, e.index, e.source
                    ),
                );
                return;
            }
        }
    }
}

fn naming_label(n: Naming) -> &'static str {
    match n {
        Naming::Flatten => "flatten",
        Naming::Preserve => "preserve",
        Naming::Rancher => "rancher",
    }
}

impl fmt::Display for Naming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(naming_label(*self))
    }
}

/// A rule glob with Docker Hub's other spellings written as `docker.io`.
fn canonical_glob(glob: &str) -> String {
    match glob.split_once('/') {
        Some((host, rest)) if is_docker_hub_host(host) => format!("{DOCKER_HUB}/{rest}"),
        _ => glob.to_string(),
    }
}

fn compile_glob(at: &Spanned<String>, field: &str, problems: &mut Problems) -> Option<NameMatcher> {
    let glob = canonical_glob(&at.value);
    if glob.is_empty() {
        problems.add(at, field, "empty glob");
        return None;
    }
    if glob.contains(['@']) || glob.rsplit('/').next().is_some_and(|l| l.contains(':')) {
        problems.add(
            at,
            field,
            format!(
                "glob {:?} matches names only: drop the tag or digest",
                at.value
            ),
        );
        return None;
    }
    match NameMatcher::new(&glob) {
        Ok(m) => Some(m),
        Err(e) => {
            problems.add(
                at,
                field,
                format!("invalid glob {:?}: {}", at.value, e.kind()),
            );
            None
        }
    }
}

/// `500ms`, `30s`, `10m`, `1h`, or a sequence such as `1m30s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("invalid duration {s:?}: write e.g. 500ms, 30s, 10m or 1h");
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(err());
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(err());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            _ => return Err(err()),
        };
        total += unit;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// A serde-saphyr error as a located problem, with the field path read off the text.
fn yaml_error(file: &str, yaml: &str, e: &serde_saphyr::Error) -> TableError {
    let line = e.location().map_or(0, |l| l.line());
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    let message = first
        .strip_prefix("error: ")
        .unwrap_or(first)
        .split_once(": ")
        .filter(|(loc, _)| loc.starts_with("line "))
        .map_or(first, |(_, m)| m)
        .to_string();
    TableError {
        problems: vec![Problem {
            file: file.to_string(),
            line,
            field: field_path_at(yaml, line as usize),
            message,
        }],
    }
}

/// The dotted path (`rules[0].match`) of the key on `line` (1-based), read from block-style
/// YAML by indentation. Used only to name the field in error messages.
fn field_path_at(yaml: &str, line: usize) -> String {
    let lines: Vec<&str> = yaml.lines().collect();
    if line == 0 || line > lines.len() {
        return String::new();
    }
    // For each line: the columns of its `- ` markers, and its key with the key's column.
    let shape = |l: &str| -> (Vec<usize>, Option<(usize, String)>) {
        let mut col = l.len() - l.trim_start().len();
        let mut rest = l.trim_start();
        let mut dashes = Vec::new();
        while let Some(r) = rest
            .strip_prefix("- ")
            .or_else(|| (rest == "-").then_some(""))
        {
            dashes.push(col);
            let skipped = r.len() - r.trim_start().len();
            col += 2 + skipped.saturating_sub(1);
            rest = r.trim_start();
        }
        let key = rest.split_once(':').and_then(|(k, _)| {
            let k = k.trim().trim_matches(['"', '\'']);
            let plain = !k.is_empty() && !k.starts_with('#') && !k.contains([' ', '[', '{', ',']);
            plain.then(|| (col, k.to_string()))
        });
        (dashes, key)
    };
    let meaningful = |l: &str| !l.trim().is_empty() && !l.trim_start().starts_with('#');
    let mut segments: Vec<String> = Vec::new();
    let mut limit = usize::MAX;
    let mut i = line - 1;
    loop {
        let l = lines[i];
        if meaningful(l) {
            let (dashes, key) = shape(l);
            if let Some((col, k)) = key.filter(|(col, _)| *col < limit) {
                segments.push(k);
                limit = col;
            }
            let inner: Vec<usize> = dashes
                .iter()
                .rev()
                .copied()
                .filter(|&d| d < limit)
                .collect();
            for d in inner {
                // Count earlier items of the same list: lines with a dash at this column.
                let mut n = 0;
                for prev in lines[..i].iter().rev().filter(|p| meaningful(p)) {
                    let (pd, pk) = shape(prev);
                    if pd.contains(&d) {
                        n += 1;
                    } else if pd.first().copied().unwrap_or(usize::MAX) < d
                        || pk.is_some_and(|(c, _)| c < d)
                    {
                        break;
                    }
                }
                segments.push(format!("[{n}]"));
                limit = d;
            }
        }
        if i == 0 || limit == 0 {
            break;
        }
        i -= 1;
    }
    let mut path = String::new();
    for seg in segments.iter().rev() {
        if !seg.starts_with('[') && !path.is_empty() {
            path.push('.');
        }
        path.push_str(seg);
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_paths_from_indentation() {
        let yaml = "mirrors:\n  ghcr:\n    type: repository\nrules:\n  - name: a\n    match: [x]\n  - name: b\n    bogus: 1\n    exclude:\n      - a\n      - b\n";
        assert_eq!(field_path_at(yaml, 3), "mirrors.ghcr.type");
        assert_eq!(field_path_at(yaml, 6), "rules[0].match");
        assert_eq!(field_path_at(yaml, 8), "rules[1].bogus");
        assert_eq!(field_path_at(yaml, 11), "rules[1].exclude[1]");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("ten minutes").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn platforms() {
        assert!(Platform::parse("linux/amd64").is_ok());
        assert_eq!(
            Platform::parse("linux/arm64/v8").unwrap().to_string(),
            "linux/arm64/v8"
        );
        assert!(Platform::parse("linux").is_err());
        assert!(Platform::parse("Linux/AMD64").is_err());
    }

    #[test]
    fn tag_globs_split_after_the_last_slash() {
        assert_eq!(
            split_tag_glob("localhost:5000/a/b:1.2-*"),
            ("localhost:5000/a/b", Some("1.2-*"))
        );
        assert_eq!(
            split_tag_glob("localhost:5000/a/b:1.2"),
            ("localhost:5000/a/b:1.2", None)
        );
        assert_eq!(
            TagSpec::glob_match("1.29.1-", "", "1.29.1-tctl"),
            Some("tctl")
        );
        assert_eq!(TagSpec::glob_match("1.29.1-", "", "1.29.2"), None);
    }
}
