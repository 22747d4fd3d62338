//! The validation that turns a table file ([`super::raw`]) into a [`Table`] and its
//! [`Settings`], reporting every problem with file, line and field, and what is valid but
//! probably wrong as a warning.

use std::collections::BTreeMap;

use ahash::AHashMap;
use serde_saphyr::Spanned;

use super::clash;
use super::index::{self, NameEntries, NameMatcher, RuleIndex, TagSpec, TargetTag};
use super::mirrors::{valid_object_name, Mirror, MirrorKind, SecretRef};
use super::policy::{CopyPolicy, Naming, Overrides, Pin, Platform, SwapPolicy};
use super::raw::{RawFile, RawImage, RawMirror, RawPullSecretNamespaces};
use super::{Entry, NamespaceFilter, Rule, Table};
use crate::problems::{yaml_error, ProblemList, TableError};
use crate::reference::{
    canonical_host, registry_host, valid_path_component, Reference, DOCKER_HUB,
};
use crate::settings::{self, choose, Settings};

const TYPES: [(&str, bool); 2] = [("repository", false), ("pull-through", true)];
const NAMINGS: [(&str, Naming); 3] = [
    ("flatten", Naming::Flatten),
    ("preserve", Naming::Preserve),
    ("rancher", Naming::Rancher),
];
const SWAPS: [(&str, SwapPolicy); 2] = [
    ("always", SwapPolicy::Always),
    ("if-present", SwapPolicy::IfPresent),
];
const COPIES: [(&str, CopyPolicy); 2] = [
    ("on-demand", CopyPolicy::OnDemand),
    ("off", CopyPolicy::Off),
];
const PINS: [(&str, Pin); 2] = [("tag", Pin::Tag), ("digest", Pin::Digest)];

/// A word setting checked against its choices: `None` when absent, or reported when it is
/// none of them.
fn pick<T: Copy>(
    word: &Option<Spanned<String>>,
    field: impl FnOnce() -> String,
    choices: &[(&str, T)],
    problems: &mut ProblemList,
) -> Option<T> {
    let word = word.as_ref()?;
    match choose(&word.value, choices) {
        Ok(v) => Some(v),
        Err(e) => {
            problems.add(word, field(), e);
            None
        }
    }
}

/// Parses and validates a table file: the mapping table and its settings. `file` names it in
/// every problem reported.
pub(crate) fn parse_file(file: &str, yaml: &str) -> Result<(Table, Settings), TableError> {
    // The parser's default budget (250,000 nodes) is below a table of 100,000 entries.
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = 20_000_000;
    budget.max_events = 40_000_000;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    let empty = yaml
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#') || l.trim() == "---");
    if empty {
        return Err(TableError::whole(
            file,
            "the table is empty: give mirrors and the images or rules that send images to them \
             (serve without --config uses the embedded table)",
        ));
    }
    let raw: RawFile = serde_saphyr::from_str_with_options(yaml, options)
        .map_err(|e| yaml_error(file, yaml, &e))?;
    let mut problems = ProblemList::new(file);
    let table = build(file, &raw, &mut problems);
    let settings = settings::build(
        &raw.registries,
        raw.checks.as_ref(),
        raw.copies.as_ref(),
        raw.timeouts.as_ref(),
        raw.mirrored_images.as_ref(),
        &mut problems,
    );
    let mut settings = settings;
    super::ecr::place(&raw.mirrors, &table, &mut settings, &mut problems);
    let mut table = table;
    table.warnings = std::mem::take(&mut problems.warnings);
    problems.into_result((table, settings))
}

fn build(file: &str, raw: &RawFile, problems: &mut ProblemList) -> Table {
    let mut mirrors: Vec<Mirror> = Vec::new();
    for (name, spanned) in &raw.mirrors {
        let field = format!("mirrors.{name}");
        if let Some(mirror) = build_mirror(name, spanned, &field, problems) {
            // One name in a namespace holds one Secret: two sources for it cannot both be kept.
            let clash = mirrors.iter().find(|m| {
                m.pull_secret.is_some()
                    && m.pull_secret == mirror.pull_secret
                    && m.pull_secret_from.is_some()
                    && mirror.pull_secret_from.is_some()
                    && m.pull_secret_from != mirror.pull_secret_from
            });
            if let (Some(other), Some(at)) = (clash, &spanned.value.pull_secret_from) {
                problems.add(
                    at,
                    format!("{field}.pullSecretFrom"),
                    format!(
                        "mirror {} already provisions pullSecret {:?} from another Secret",
                        other.name,
                        mirror.pull_secret.as_deref().unwrap_or_default()
                    ),
                );
            }
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
            if let (None, Some(target)) = (entry.mirror, &spanned.value.target) {
                problems.warn(
                    target,
                    format!("images[{i}].target"),
                    format!(
                        "{} lies under no mirror's registry/prefix, so no mirror's pull secret \
                         or policies apply (swap: always, no copies); add its mirror, or \
                         correct the target",
                        entry.target
                    ),
                );
            }
            entries.push(entry);
        }
    }
    for entry in &entries {
        let mirror = entry.mirror.map(|m| &mirrors[m].overrides);
        let at = &raw.images[entry.index];
        let field = format!("images[{}].pin", entry.index);
        check_pin(&[Some(&entry.overrides), mirror], at, &field, problems);
    }
    let entry_index = index_entries(&entries, &raw.images, problems);
    clash::check_entries(&entries, &raw.images, problems);

    let mut rules = Vec::new();
    let mut rule_index = RuleIndex::default();
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, spanned) in raw.rules.iter().enumerate() {
        let field = format!("rules[{i}]");
        let rule = &spanned.value;
        if let Some(name) = &rule.name {
            if let Some(first) = names.insert(&name.value, i) {
                problems.add(
                    name,
                    format!("{field}.name"),
                    format!("{:?} is the name of rules[{first}] too: names tell rules apart in explain and the logs", name.value),
                );
            }
        }
        let matches = match &rule.matches {
            Some(m) => m.as_slice(),
            None => {
                problems.add(
                    spanned,
                    format!("{field}.match"),
                    "missing: the globs the rule applies to, on normalized names such as \
                     docker.io/library/nginx",
                );
                &[]
            }
        };
        let rule_overrides = overrides(
            Written {
                swap: pick(&rule.swap, || format!("{field}.swap"), &SWAPS, problems),
                copy: pick(&rule.copy, || format!("{field}.copy"), &COPIES, problems),
                platforms: &rule.platforms,
                referrers: rule.referrers,
                pin: pick(&rule.pin, || format!("{field}.pin"), &PINS, problems),
            },
            &format!("{field}.platforms"),
            problems,
        );
        let Some(wanted) = &rule.mirror else {
            problems.add(
                spanned,
                format!("{field}.mirror"),
                "missing: the name of the mirror the rule sends its matches to",
            );
            continue;
        };
        let mut globs = Vec::new();
        for (j, m) in matches.iter().enumerate() {
            if let Some(matcher) = compile_glob(m, &format!("{field}.match[{j}]"), problems) {
                globs.push((canonical_glob(&m.value), matcher));
            }
        }
        if rule.matches.as_ref().is_some_and(|m| m.is_empty()) {
            problems.add(
                spanned,
                format!("{field}.match"),
                "at least one glob is required",
            );
        }
        let Some(mirror) = mirrors.iter().position(|m| m.name == wanted.value) else {
            let known: Vec<&str> = mirrors.iter().map(|m| m.name.as_str()).collect();
            problems.add(
                wanted,
                format!("{field}.mirror"),
                format!(
                    "unknown mirror {:?}; the table's mirrors: {}",
                    wanted.value,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            );
            continue;
        };
        check_cache_prefixes(&mirrors[mirror], matches, &field, problems);
        let exclude_matchers = rule
            .exclude
            .iter()
            .enumerate()
            .filter_map(|(j, m)| compile_glob(m, &format!("{field}.exclude[{j}]"), problems))
            .collect();
        let built = Rule {
            name: rule
                .name
                .as_ref()
                .map_or_else(|| format!("rule-{i}"), |n| n.value.clone()),
            index: i,
            matches: matches.iter().map(|m| canonical_glob(&m.value)).collect(),
            excludes: rule
                .exclude
                .iter()
                .map(|m| canonical_glob(&m.value))
                .collect(),
            exclude_matchers,
            mirror,
            overrides: rule_overrides,
        };
        let layers = [Some(&built.overrides), Some(&mirrors[mirror].overrides)];
        check_pin(&layers, spanned, &format!("{field}.pin"), problems);
        clash::check_rule(&built, &mirrors[mirror], spanned, &entries, problems);
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
            .iter()
            .flat_map(|n| n.exclude.iter().enumerate())
            .filter_map(|(i, ns)| {
                let valid = valid_object_name(&ns.value, 63, false);
                if !valid {
                    problems.add(
                        ns,
                        format!("namespaces.exclude[{i}]"),
                        format!(
                            "{:?} is not a namespace name (lowercase letters, digits and -)",
                            ns.value
                        ),
                    );
                }
                valid.then(|| ns.value.clone())
            })
            .collect(),
        pull_secret_namespaces: raw
            .namespaces
            .as_ref()
            .and_then(|n| n.pull_secrets.as_ref())
            .and_then(|p| build_namespace_filter(p, problems)),
        warnings: Vec::new(),
    }
}

/// `namespaces.pullSecrets`: namespace-name globs and labels, each checked.
fn build_namespace_filter(
    spanned: &Spanned<RawPullSecretNamespaces>,
    problems: &mut ProblemList,
) -> Option<NamespaceFilter> {
    let field = "namespaces.pullSecrets";
    let raw = &spanned.value;
    if raw.allow.is_empty() && raw.labels.is_empty() {
        problems.add(
            spanned,
            field,
            "says nothing: give allow (namespace name globs) or labels, or leave it out to let \
             every opted-in namespace have the pull secrets",
        );
        return None;
    }
    let mut names = Vec::new();
    for glob in &raw.allow {
        let valid = !glob.value.is_empty()
            && glob.value.len() <= 63
            && glob
                .value
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'*');
        match globset::Glob::new(&glob.value) {
            Ok(g) if valid => names.push(g.compile_matcher()),
            _ => problems.add(
                glob,
                format!("{field}.allow"),
                format!(
                    "{:?} is not a namespace name glob (lowercase letters, digits, - and *)",
                    glob.value
                ),
            ),
        }
    }
    let mut labels = Vec::new();
    for (key, value) in &raw.labels {
        labels.push((key.clone(), value.clone()));
    }
    Some(NamespaceFilter { names, labels })
}

fn build_mirror(
    name: &str,
    spanned: &Spanned<RawMirror>,
    field: &str,
    problems: &mut ProblemList,
) -> Option<Mirror> {
    let raw = &spanned.value;
    let Some(at) = &raw.registry else {
        problems.add(
            spanned,
            format!("{field}.registry"),
            "missing: the registry host of the mirror (ghcr.io, <account>.dkr.ecr.<region>.amazonaws.com)",
        );
        return None;
    };
    let registry = registry_host(&at.value).to_string();
    if let Some(why) = crate::reference::invalid_host(&registry) {
        problems.add(at, format!("{field}.registry"), why);
        return None;
    }
    if raw.kind.is_none() {
        problems.add(
            spanned,
            format!("{field}.type"),
            "missing: repository (a registry copies are pushed into) or pull-through (an ECR \
             pull-through cache)",
        );
        return None;
    }
    let pull_through = pick(&raw.kind, || format!("{field}.type"), &TYPES, problems)?;
    let naming = pick(
        &raw.naming,
        || format!("{field}.naming"),
        &NAMINGS,
        problems,
    );
    let kind = match pull_through {
        false => {
            if raw.upstreams.is_some() {
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
                if !p.is_empty() && !p.split('/').all(valid_path_component) {
                    problems.add(
                        at,
                        format!("{field}.prefix"),
                        format!("invalid repository path prefix {:?}", at.value),
                    );
                }
            }
            MirrorKind::Repository {
                prefix: prefix.unwrap_or_default(),
                naming: naming.unwrap_or(Naming::Flatten),
            }
        }
        true => {
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
            if upstreams.is_empty() {
                problems.add(
                    spanned,
                    format!("{field}.upstreams"),
                    "is empty: a pull-through mirror needs at least one upstream registry and \
                     its cache prefix",
                );
            }
            let mut map = BTreeMap::new();
            for (upstream, cache) in upstreams {
                let at = format!("{field}.upstreams.{upstream}");
                let Some(value) = &cache.value else {
                    problems.add(
                        cache,
                        at,
                        "has no cache prefix: give the repository prefix of its ECR \
                         pull-through cache rule (docker-hub, say)",
                    );
                    continue;
                };
                let c = value.trim_matches('/');
                if c.is_empty() || !c.split('/').all(valid_path_component) {
                    problems.add(cache, at, format!("invalid cache prefix {value:?}"));
                }
                map.insert(registry_host(upstream).to_string(), c.to_string());
            }
            MirrorKind::PullThrough { upstreams: map }
        }
    };
    let ecr = raw
        .ecr
        .as_ref()
        .and_then(|e| super::ecr::build(e, field, pull_through, problems));
    Some(Mirror {
        name: name.to_string(),
        registry,
        kind,
        ecr,
        pull_secret: raw.pull_secret.as_ref().map(|s| s.value.clone()),
        pull_secret_from: pull_secret_from(raw, field, problems),
        overrides: overrides(
            Written {
                swap: pick(&raw.swap, || format!("{field}.swap"), &SWAPS, problems),
                copy: pick(&raw.copy, || format!("{field}.copy"), &COPIES, problems),
                platforms: &raw.platforms,
                referrers: raw.referrers,
                pin: None,
            },
            &format!("{field}.platforms"),
            problems,
        ),
    })
}

/// `pullSecret` checked, and `pullSecretFrom: namespace/name` read.
fn pull_secret_from(raw: &RawMirror, field: &str, problems: &mut ProblemList) -> Option<SecretRef> {
    if let Some(secret) = &raw.pull_secret {
        if !valid_object_name(&secret.value, 253, true) {
            problems.add(
                secret,
                format!("{field}.pullSecret"),
                format!(
                    "{:?} is not a Secret name (lowercase DNS subdomain)",
                    secret.value
                ),
            );
        }
    }
    let from = raw.pull_secret_from.as_ref()?;
    let at = format!("{field}.pullSecretFrom");
    if raw.pull_secret.is_none() {
        problems.add(
            from,
            at,
            "needs pullSecret: the name the copies get in each namespace",
        );
        return None;
    }
    match from.value.split_once('/') {
        Some((namespace, name))
            if valid_object_name(namespace, 63, false) && valid_object_name(name, 253, true) =>
        {
            Some(SecretRef {
                namespace: namespace.to_string(),
                name: name.to_string(),
            })
        }
        _ => {
            problems.add(
                from,
                at,
                format!("{:?} is not namespace/name of a Secret", from.value),
            );
            None
        }
    }
}

/// The policy settings of a mirror, rule or entry, as written.
struct Written<'a> {
    swap: Option<SwapPolicy>,
    copy: Option<CopyPolicy>,
    platforms: &'a Option<Vec<Spanned<String>>>,
    referrers: Option<bool>,
    pin: Option<Pin>,
}

/// The policy overrides of a mirror, rule or entry, with its platforms parsed.
fn overrides(written: Written<'_>, field: &str, problems: &mut ProblemList) -> Overrides {
    let platforms = written.platforms.as_ref().map(|raw| {
        let mut out = Vec::new();
        for (i, p) in raw.iter().enumerate() {
            match Platform::parse(&p.value) {
                Ok(platform) => out.push(platform),
                Err(e) => problems.add(p, format!("{field}[{i}]"), e.to_string()),
            }
        }
        out
    });
    Overrides {
        swap: written.swap,
        copy: written.copy,
        platforms,
        referrers: written.referrers,
        pin: written.pin,
    }
}

/// `pin: digest` needs every platform copied: an index rebuilt for some platforms has a digest
/// of its own, which the upstream digest could never match.
fn check_pin<T>(
    layers: &[Option<&Overrides>],
    at: &Spanned<T>,
    field: &str,
    problems: &mut ProblemList,
) {
    let policy = Overrides::resolve(layers, SwapPolicy::Always, CopyPolicy::OnDemand);
    if policy.pin == Pin::Digest && !policy.platforms.is_empty() {
        problems.add(
            at,
            field,
            "digest cannot go with platforms: an index copied for some platforms has another \
             digest than upstream's (remove platforms here or on the mirror)",
        );
    }
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
    problems: &mut ProblemList,
) -> Option<Entry> {
    let raw = &spanned.value;
    let field = format!("images[{i}]");
    let (Some(raw_source), Some(raw_target)) = (&raw.source, &raw.target) else {
        let which = if raw.source.is_none() {
            "source"
        } else {
            "target"
        };
        problems.add(
            spanned,
            format!("{field}.{which}"),
            "missing: an exact entry maps a source image to its target on the mirror",
        );
        return None;
    };
    let source = match parse_with_glob(&raw_source.value) {
        Ok(s) => s,
        Err(e) => {
            problems.add(raw_source, format!("{field}.source"), e);
            return None;
        }
    };
    let target = match parse_with_glob(&raw_target.value) {
        Ok(t) => t,
        Err(e) => {
            problems.add(raw_target, format!("{field}.target"), e);
            return None;
        }
    };
    if let Some(why) = crate::reference::invalid_host(target.0.registry()) {
        problems.add(raw_target, format!("{field}.target"), why);
        return None;
    }
    let (source_ref, source_glob) = source;
    let (target_ref, target_glob) = target;
    if target_ref.digest().is_some() {
        problems.add(
            raw_target,
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
        problems.add(raw_target, format!("{field}.target"), m);
        return None;
    }
    let target_name = target_ref.name();
    let mirror = roots
        .iter()
        .find(|(root, _)| target_name.starts_with(root.as_str()))
        .map(|(_, i)| *i);
    Some(Entry {
        source: raw_source.value.clone(),
        target: raw_target.value.clone(),
        index: i,
        source_name: source_ref.canonical().name().to_string(),
        tag,
        target_name: target_name.to_string(),
        target_tag,
        mirror,
        overrides: overrides(
            Written {
                swap: pick(&raw.swap, || format!("{field}.swap"), &SWAPS, problems),
                copy: pick(&raw.copy, || format!("{field}.copy"), &COPIES, problems),
                platforms: &raw.platforms,
                referrers: raw.referrers,
                pin: pick(&raw.pin, || format!("{field}.pin"), &PINS, problems),
            },
            &format!("{field}.platforms"),
            problems,
        ),
    })
}

fn index_entries(
    entries: &[Entry],
    raw: &[Spanned<RawImage>],
    problems: &mut ProblemList,
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
        if let (Some(prev), Some(source)) = (previous, &raw[e.index].value.source) {
            problems.add(
                source,
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

/// A rule glob with Docker Hub's other spellings written as `docker.io`.
pub(super) fn canonical_glob(glob: &str) -> String {
    match glob.split_once('/') {
        Some((host, rest)) if canonical_host(host) == DOCKER_HUB => format!("{DOCKER_HUB}/{rest}"),
        _ => glob.to_string(),
    }
}

fn compile_glob(
    at: &Spanned<String>,
    field: &str,
    problems: &mut ProblemList,
) -> Option<NameMatcher> {
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
    if let Some(meant) = never_matches(&glob) {
        problems.add(
            at,
            field,
            format!(
                "{:?} can never match: globs match normalized names, which begin with a \
                 registry (docker.io/library/nginx); did you mean {meant:?}?",
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

/// What a glob that can never match probably meant, when it can never match: its first
/// component must be able to be a registry host, since every normalized name begins with one.
fn never_matches(glob: &str) -> Option<String> {
    if glob == "**" {
        return None;
    }
    let (first, rest) = match glob.split_once('/') {
        Some((first, rest)) => (first, Some(rest)),
        None => (glob, None),
    };
    let host_like = index::has_glob_meta(first)
        || first.contains(['.', ':'])
        || first == "localhost"
        || first.starts_with('[');
    if host_like && rest.is_some() {
        return None;
    }
    Some(match rest {
        None if first.contains("**") => format!("docker.io/{glob}"),
        None => format!("docker.io/library/{glob}"),
        Some(_) => format!("docker.io/{glob}"),
    })
}

/// A rule that sends a registry's images to a pull-through mirror without a cache prefix for
/// that registry rewrites nothing: every match is kept (`no-cache-prefix`).
fn check_cache_prefixes(
    mirror: &Mirror,
    matches: &[Spanned<String>],
    field: &str,
    problems: &mut ProblemList,
) {
    let MirrorKind::PullThrough { upstreams } = &mirror.kind else {
        return;
    };
    for (j, glob) in matches.iter().enumerate() {
        let canonical = canonical_glob(&glob.value);
        let Some((host, _)) = canonical.split_once('/') else {
            continue;
        };
        if index::has_glob_meta(host) || upstreams.contains_key(registry_host(host)) {
            continue;
        }
        problems.add(
            glob,
            format!("{field}.match[{j}]"),
            format!(
                "mirror {} has no cache prefix for {host}, so nothing this glob matches is \
                 rewritten: add {host} to its upstreams, or send it to another mirror",
                mirror.name
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn globs_name_docker_hub_canonically() {
        assert_eq!(
            canonical_glob("index.docker.io/grafana/*"),
            "docker.io/grafana/*"
        );
        assert_eq!(canonical_glob("registry-1.docker.io/**"), "docker.io/**");
        assert_eq!(canonical_glob("quay.io/**"), "quay.io/**");
    }

    #[test]
    fn a_rate_limit_reserve_is_read_and_a_bad_one_named() {
        let (_, settings) = parse_file(
            "t.yaml",
            "registries:\n  docker.io: {rateLimitReserve: 20}\n",
        )
        .unwrap();
        assert_eq!(
            settings
                .access("docker.io")
                .and_then(|a| a.rate_limit_reserve),
            Some(20)
        );
        for bad in ["-1", "lots", "1.5"] {
            let yaml = format!(
                "checks: {{timeout: 1s}}\nregistries:\n  docker.io: {{rateLimitReserve: {bad}}}\n"
            );
            let e = parse_file("t.yaml", &yaml).unwrap_err().to_string();
            assert!(
                e.contains("t.yaml:3") && e.contains("rateLimitReserve"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn job_settings_are_read_and_bad_ones_named_with_line_and_field() {
        let (_, settings) = parse_file(
            "t.yaml",
            "copies: {runner: job, jobTtl: 5m, jobImage: 'registry.local/imw:1'}\n",
        )
        .unwrap();
        assert_eq!(settings.copies.runner, crate::settings::Runner::Job);
        assert_eq!(settings.copies.job_ttl, std::time::Duration::from_secs(300));
        assert_eq!(settings.job_image.as_deref(), Some("registry.local/imw:1"));
        let (_, defaults) = parse_file("t.yaml", "copies: {concurrency: 2}\n").unwrap();
        assert_eq!(defaults.copies.runner, crate::settings::Runner::InProcess);
        assert_eq!(defaults.job_image, None);
        for (bad, field, says) in [
            (
                "runner: jobs",
                "copies.runner",
                "not one of in-process, job",
            ),
            ("jobTtl: soon", "copies.jobTtl", "soon"),
            ("jobTtl: 1000000000h", "copies.jobTtl", "at most"),
            (
                "jobImage: 'Not An Image'",
                "copies.jobImage",
                "not an image reference",
            ),
        ] {
            let yaml = format!("checks: {{timeout: 1s}}\ncopies:\n  {bad}\n");
            let e = parse_file("t.yaml", &yaml).unwrap_err().to_string();
            assert!(
                e.contains("t.yaml:3") && e.contains(field) && e.contains(says),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn the_pull_secret_allow_list_names_namespaces_and_labels() {
        let (table, _) = parse_file(
            "t.yaml",
            "namespaces:\n  pullSecrets: {allow: [team-*, payments], labels: {tier: trusted}}\n",
        )
        .unwrap();
        let trusted = |k: &str| (k == "tier").then(|| "trusted".to_string());
        let none = |_: &str| None;
        assert!(table.pull_secrets_allowed("team-a", &trusted));
        assert!(table.pull_secrets_allowed("payments", &trusted));
        assert!(
            !table.pull_secrets_allowed("team-a", &none),
            "the label is needed too"
        );
        assert!(!table.pull_secrets_allowed("sandbox", &trusted));
        let (open, _) = parse_file("t.yaml", "namespaces: {exclude: [x]}\n").unwrap();
        assert!(open.pull_secrets_allowed("sandbox", &none));
        for (bad, says) in [
            (
                "{allow: [Team_A]}",
                "\"Team_A\" is not a namespace name glob",
            ),
            ("{}", "says nothing"),
        ] {
            let yaml = format!("checks: {{timeout: 1s}}\nnamespaces:\n  pullSecrets: {bad}\n");
            let e = parse_file("t.yaml", &yaml).unwrap_err().to_string();
            assert!(
                e.contains("t.yaml:3") && e.contains("namespaces.pullSecrets") && e.contains(says),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn an_upload_mode_is_read_and_a_bad_one_named() {
        let (_, settings) =
            parse_file("t.yaml", "registries:\n  ghcr.io: {uploadMode: chunked}\n").unwrap();
        assert_eq!(
            settings.access("ghcr.io").map(|a| a.upload()),
            Some(crate::settings::UploadMode::Chunked)
        );
        let e = parse_file(
            "t.yaml",
            "checks: {timeout: 1s}\nregistries:\n  ghcr.io: {uploadMode: fast}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("t.yaml:3")
                && e.contains("uploadMode")
                && e.contains("not one of monolithic, chunked"),
            "{e}"
        );
    }
}
