//! The static part of a table as a native `MutatingAdmissionPolicy`
//! (`admissionregistration.k8s.io/v1`, GA in Kubernetes 1.36), for clusters that want no
//! webhook on the admission path.
//!
//! Pure. CEL has no reference parser, so every image string a rewrite can start from is spelled
//! out at export time and looked up in map literals: each Docker Hub spelling of an entry's
//! name (`redis`, `library/redis`, `docker.io/…`, `index.docker.io/…`,
//! `registry-1.docker.io/…`), with its tag; the digest and any tag are carried over after a
//! strict check of their form. Every value is what [`Table::decide`] gives for that very
//! string, so what the policy rewrites it rewrites exactly as the webhook does. What needs a
//! registry (`swap: if-present`, copies), a glob CEL cannot match safely, or the webhook's own
//! record is left out, each with its reason ([`Export::left_out`]).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use crate::mapping::{Decision, EntryTags, Matched, Pin, Policy, SwapPolicy, Table};
use crate::reference::{Reference, DOCKER_HUB};

const IF_PRESENT: &str = "swap: if-present: whether the mirror has the image needs a registry to \
                          ask (and a copy to start), which a policy cannot do";
const PIN_DIGEST: &str = "pin: digest: the tag's digest is asked of the upstream registry at \
                          admission, which a policy cannot do";

/// Why a rewrite with this policy needs the webhook (`Ok` when a policy can make it).
fn static_policy(policy: &Policy<'_>) -> Result<(), &'static str> {
    match (policy.swap, policy.pin) {
        (SwapPolicy::IfPresent, _) => Err(IF_PRESENT),
        (_, Pin::Digest) => Err(PIN_DIGEST),
        (SwapPolicy::Always, Pin::Tag) => Ok(()),
    }
}

/// The form a carried-over tag must have (`:tag`, or nothing).
const TAG_RE: &str = r"^(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$";
/// The form a carried-over digest must have (`@algorithm:hex`, or nothing).
const DIGEST_RE: &str = r"^(@sha256:[a-f0-9]{64}|@sha384:[a-f0-9]{96}|@sha512:[a-f0-9]{128})?$";

/// What a rewrite becomes: the new image (or, for name and digest keys, the new name the tag
/// and digest are appended to), and the pull secret it needs (`""`: none).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    image: String,
    secret: String,
}

/// Something of the table the policy does not do, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftOut {
    /// `images[3] redis:7.*`, `rules[0] docker-hub`, or a feature.
    pub what: String,
    pub reason: String,
}

/// The exported policy: lookups by exact image string, and what was left out.
#[derive(Debug, Clone, Default)]
pub struct Export {
    /// `name:tag` (or a bare name, for `latest`) → the whole new image.
    tags: BTreeMap<String, Target>,
    /// `name@digest` → the new name (the image's tag and digest follow it).
    digests: BTreeMap<String, Target>,
    /// `name` → the new name (any tag and digest follow it).
    names: BTreeMap<String, Target>,
    pub left_out: Vec<LeftOut>,
    /// The table elements exported, as `Matched` displays them.
    exported: BTreeSet<String>,
    excluded_namespaces: Vec<String>,
}

/// Every spelling of a canonical name that Pods may write and [`Reference::parse`] reads as
/// that name.
pub fn spellings(name: &str) -> Vec<String> {
    let mut out = vec![name.to_string()];
    if let Some(path) = name.strip_prefix("docker.io/") {
        let short = path
            .strip_prefix("library/")
            .filter(|rest| !rest.contains('/'));
        for host in [
            "",
            "docker.io/",
            "index.docker.io/",
            "registry-1.docker.io/",
        ] {
            out.push(format!("{host}{path}"));
            if let Some(short) = short {
                out.push(format!("{host}{short}"));
            }
        }
    }
    let mut seen = BTreeSet::new();
    out.retain(|s| {
        let same = Reference::parse(s).is_ok_and(|r| r.canonical().name() == name);
        same && seen.insert(s.clone())
    });
    out
}

impl Export {
    /// Works out what of `table` a policy can do.
    pub fn of(table: &Table) -> Export {
        let mut e = Export {
            excluded_namespaces: table.excluded_namespaces().map(str::to_string).collect(),
            ..Export::default()
        };
        e.excluded_namespaces.sort();
        // Names whose every entry is exported: only for those may a name-wide key be used,
        // since CEL tries the name after the tags and would stand in for a left-out entry.
        let mut names_left_out: BTreeSet<String> = BTreeSet::new();
        for entry in table.entries() {
            let what = format!("images[{}] {}", entry.index, entry.source);
            let name = entry.source_name().to_string();
            let keys: Vec<(String, bool)> = match entry.tags() {
                EntryTags::Glob => {
                    names_left_out.insert(name);
                    e.leave_out(
                        what,
                        "a tag glob: the policy would have to carry the text it matched into \
                         the target, which CEL cannot do safely",
                    );
                    continue;
                }
                EntryTags::Any => continue, // with the name-wide keys, below
                EntryTags::Exact(tag) => spellings(&name)
                    .into_iter()
                    .flat_map(|s| {
                        let mut keys = vec![(format!("{s}:{tag}"), false)];
                        // `latest` is also what an image without a tag pulls.
                        if tag == "latest" {
                            keys.push((s, false));
                        }
                        keys
                    })
                    .collect(),
                EntryTags::Digest(digest) => spellings(&name)
                    .into_iter()
                    .map(|s| (format!("{s}@{digest}"), true))
                    .collect(),
            };
            match e.policy_reason(table, &keys[0].0, &Matched::Entry(entry).to_string()) {
                Err(reason) => {
                    names_left_out.insert(name);
                    e.leave_out(what, reason);
                }
                Ok(()) => {
                    for (key, by_digest) in keys {
                        let Some(target) = rewrite(table, &key) else {
                            continue;
                        };
                        if by_digest {
                            // A target naming its own tag cannot take the image's.
                            if target.image_tag.is_some() {
                                names_left_out.insert(name.clone());
                                e.leave_out(
                                    what.clone(),
                                    "its target names a tag of its own for a digest",
                                );
                                break;
                            }
                            e.digests.insert(key, target.name_only());
                        } else {
                            e.tags.insert(key, target.whole());
                        }
                    }
                    e.exported.insert(Matched::Entry(entry).to_string());
                }
            }
        }
        // Any-tag entries and rules on one exact name: name-wide keys.
        for entry in table.entries() {
            if entry.tags() != EntryTags::Any {
                continue;
            }
            let what = format!("images[{}] {}", entry.index, entry.source);
            e.name_wide(
                table,
                entry.source_name(),
                &what,
                &Matched::Entry(entry).to_string(),
                &names_left_out,
            );
        }
        for rule in table.rules() {
            let what = format!("rules[{}] {}", rule.index, rule.name);
            let matched = Matched::Rule(rule).to_string();
            if let Err(reason) = e.policy_reason(
                table,
                rule.matches.first().map(String::as_str).unwrap_or(""),
                &matched,
            ) {
                e.leave_out(what, reason);
                continue;
            }
            for glob in &rule.matches {
                if glob.contains(['*', '?', '[', '{', '\\']) {
                    e.leave_out(
                        format!("{what} match {glob}"),
                        "a glob: CEL has no reference parser to normalise an image's spelling \
                         and match it safely",
                    );
                } else {
                    e.name_wide(table, glob, &what, &matched, &names_left_out);
                }
            }
        }
        e.leave_out(
            "pods/ephemeralcontainers".to_string(),
            "left to the webhook: a debug container may go to a mirror only when the Pod \
             already has its pull secret, and existing ephemeral containers never change",
        );
        e.leave_out(
            "the image-mirror/original-images annotation".to_string(),
            "CEL cannot merge the record with one an earlier admission left",
        );
        e
    }

    fn leave_out(&mut self, what: String, reason: impl Into<String>) {
        self.left_out.push(LeftOut {
            what,
            reason: reason.into(),
        });
    }

    /// Why what `matched` decides cannot be the policy's (`Ok` when it can); `probe` is one
    /// image it decides for.
    fn policy_reason(&self, table: &Table, probe: &str, matched: &str) -> Result<(), String> {
        let policy = match table.decide(probe) {
            Decision::Rewrite(rw) if rw.matched.to_string() == matched => rw.policy,
            // A rule whose first glob is not a name: judged by its policy alone.
            _ => match table
                .rules()
                .iter()
                .find(|r| Matched::Rule(r).to_string() == matched)
            {
                Some(rule) => table.rule_policy(rule),
                None => return Err("another entry or rule decides for it first".to_string()),
            },
        };
        static_policy(&policy).map_err(str::to_string)
    }

    /// Keys for every spelling of `name`, any tag: an any-tag entry or a rule on one name.
    fn name_wide(
        &mut self,
        table: &Table,
        name: &str,
        what: &str,
        matched: &str,
        names_left_out: &BTreeSet<String>,
    ) {
        if names_left_out.contains(name) {
            self.leave_out(
                what.to_string(),
                format!("{name} has entries the policy leaves out, which would be shadowed"),
            );
            return;
        }
        let mut any = false;
        for s in spellings(name) {
            match table.decide(&s) {
                Decision::Rewrite(rw)
                    if rw.matched.to_string() == matched && static_policy(&rw.policy).is_ok() =>
                {
                    if let Some(target) = rewrite(table, &s) {
                        self.names.insert(s, target.name_only());
                        any = true;
                    }
                }
                _ => {}
            }
        }
        if any {
            self.exported.insert(matched.to_string());
        } else {
            self.leave_out(
                what.to_string(),
                format!("{name} is decided by another entry or rule first, or excluded"),
            );
        }
    }

    /// What the policy makes of `image`, by the very lookups its CEL does: the new image and
    /// the pull secret, or `None` when it leaves the image alone.
    pub fn apply(&self, image: &str) -> Option<(String, Option<String>)> {
        let (b, d) = match image.find('@') {
            Some(i) => (&image[..i], &image[i..]),
            None => (image, ""),
        };
        let n = match (b.rfind(':'), b.rfind('/')) {
            (Some(c), slash) if slash.is_none_or(|s| c > s) => &b[..c],
            _ => b,
        };
        let t = &b[n.len()..];
        if !matches_tag(t) || !matches_digest(d) {
            return None;
        }
        let digest_key = format!("{n}{d}");
        let (new, target) = if let (false, Some(v)) = (d.is_empty(), self.digests.get(&digest_key))
        {
            (format!("{}{t}{d}", v.image), v)
        } else if let Some(v) = self.tags.get(b).filter(|_| b != n || d.is_empty()) {
            // A bare name is `latest` only without a digest: `name@digest` pulls no tag.
            (format!("{}{d}", v.image), v)
        } else if let Some(v) = self.names.get(n) {
            (format!("{}{t}{d}", v.image), v)
        } else {
            return None;
        };
        (new != image).then(|| {
            (
                new,
                (!target.secret.is_empty()).then(|| target.secret.clone()),
            )
        })
    }

    /// Whether the table element that made a decision is in the policy.
    pub fn covers(&self, matched: &str) -> bool {
        self.exported.contains(matched)
    }

    /// Why the policy does not do what `matched` does, when it does not.
    pub fn reason_for(&self, what_prefix: &str) -> Option<&str> {
        self.left_out
            .iter()
            .find(|l| l.what.starts_with(what_prefix))
            .map(|l| l.reason.as_str())
    }

    /// The MutatingAdmissionPolicy and its binding, named `name`.
    pub fn manifests(&self, name: &str) -> (Value, Value) {
        let mut excluded: Vec<String> = vec!["image-mirror-system".into(), "kube-system".into()];
        for ns in &self.excluded_namespaces {
            if !excluded.contains(ns) {
                excluded.push(ns.clone());
            }
        }
        let secrets: Vec<String> = self
            .tags
            .values()
            .chain(self.digests.values())
            .chain(self.names.values())
            .filter(|t| !t.secret.is_empty())
            .map(|t| t.secret.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let valid = format!(
            "p[1].substring(size(p[3])).matches({}) && p[2].matches({})",
            cel_str(TAG_RE),
            cel_str(DIGEST_RE)
        );
        // string(…) everywhere: an empty map or list literal is typed dyn, and CEL's `?:` wants
        // both branches of one type.
        let lookup = "(p[2] != '' && (p[3] + p[2]) in variables.digests) ? \
             [p[0], string(variables.digests[p[3] + p[2]][0]) + p[1].substring(size(p[3])) + p[2], string(variables.digests[p[3] + p[2]][1])] : \
             ((p[1] != p[3] || p[2] == '') && p[1] in variables.tags) ? [p[0], string(variables.tags[p[1]][0]) + p[2], string(variables.tags[p[1]][1])] : \
             (p[3] in variables.names) ? [p[0], string(variables.names[p[3]][0]) + p[1].substring(size(p[3])) + p[2], string(variables.names[p[3]][1])] : \
             [p[0], p[0], '']";
        let replace = |list: &str, image: &str, path: &str| {
            format!(
                "object.spec.{list}.filter(c, has(c.{image}) && variables.rewritten.exists(r, r[0] == c.{image})).map(c, \
                 JSONPatch{{op: 'replace', path: '/spec/{list}/' + string(object.spec.{list}.indexOf(c)) + '{path}', \
                 value: variables.rewritten.filter(r, r[0] == c.{image})[0][1]}})"
            )
        };
        let patch = format!(
            "{}\n+ (has(object.spec.initContainers) ? {} : [])\n+ (has(object.spec.volumes) ? {} : [])\n\
             + (variables.missing.size() == 0 ? [] : has(object.spec.imagePullSecrets) ? \
             variables.missing.map(s, JSONPatch{{op: 'add', path: '/spec/imagePullSecrets/-', value: {{'name': s}}}}) : \
             [JSONPatch{{op: 'add', path: '/spec/imagePullSecrets', value: variables.missing.map(s, {{'name': s}})}}])",
            replace("containers", "image", "/image"),
            replace("initContainers", "image", "/image"),
            replace("volumes", "image.reference", "/image/reference")
                .replace("has(c.image.reference)", "has(c.image) && has(c.image.reference)"),
        );
        let variables = json!([
            {"name": "tags", "expression": cel_map(&self.tags)},
            {"name": "digests", "expression": cel_map(&self.digests)},
            {"name": "names", "expression": cel_map(&self.names)},
            {"name": "images", "expression": "object.spec.containers.filter(c, has(c.image)).map(c, c.image) \
                + (has(object.spec.initContainers) ? object.spec.initContainers.filter(c, has(c.image)).map(c, c.image) : []) \
                + (has(object.spec.volumes) ? object.spec.volumes.filter(v, has(v.image) && has(v.image.reference)).map(v, v.image.reference) : [])"},
            {"name": "parts", "expression": "variables.images.map(i, string(i)).map(x, [x, x.indexOf('@') >= 0 ? x.substring(0, x.indexOf('@')) : x, x.indexOf('@') >= 0 ? x.substring(x.indexOf('@')) : ''])"},
            {"name": "named", "expression": "variables.parts.map(p, [p[0], p[1], p[2], p[1].lastIndexOf(':') > p[1].lastIndexOf('/') ? p[1].substring(0, p[1].lastIndexOf(':')) : p[1]])"},
            {"name": "rewritten", "expression": format!("variables.named.filter(p, {valid}).map(p, {lookup}).filter(r, r[0] != r[1])")},
            {"name": "missing", "expression": format!(
                "{}.filter(s, variables.rewritten.exists(r, r[2] == s) && !(has(object.spec.imagePullSecrets) && object.spec.imagePullSecrets.exists(p, p.name == s)))",
                cel_list(&secrets)
            )},
        ]);
        let policy = json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingAdmissionPolicy",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "image-mirror-webhook"}},
            "spec": {
                "matchConstraints": {
                    "resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"], "scope": "Namespaced"}],
                    "namespaceSelector": {
                        "matchLabels": {"image-mirror/inject": "enabled"},
                        "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": excluded}]
                    },
                    "objectSelector": {"matchExpressions": [{"key": "image-mirror/inject", "operator": "NotIn", "values": ["disabled"]}]},
                    "matchPolicy": "Equivalent"
                },
                "failurePolicy": "Ignore",
                "reinvocationPolicy": "IfNeeded",
                "variables": variables,
                "mutations": [{"patchType": "JSONPatch", "jsonPatch": {"expression": patch}}]
            }
        });
        let binding = json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingAdmissionPolicyBinding",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "image-mirror-webhook"}},
            "spec": {"policyName": name}
        });
        (policy, binding)
    }
}

/// A decision's target, split the way the maps need it.
struct Rewritten {
    image: String,
    name: String,
    image_tag: Option<String>,
    secret: String,
}

impl Rewritten {
    fn whole(&self) -> Target {
        Target {
            image: self.image.clone(),
            secret: self.secret.clone(),
        }
    }
    fn name_only(&self) -> Target {
        Target {
            image: self.name.clone(),
            secret: self.secret.clone(),
        }
    }
}

fn rewrite(table: &Table, image: &str) -> Option<Rewritten> {
    match table.decide(image) {
        Decision::Rewrite(rw) if static_policy(&rw.policy).is_ok() => Some(Rewritten {
            image: rw.target.as_str().to_string(),
            name: rw.target.name().to_string(),
            image_tag: rw.target.tag().map(str::to_string),
            secret: rw.pull_secret().unwrap_or_default().to_string(),
        }),
        _ => None,
    }
}

fn matches_tag(t: &str) -> bool {
    t.is_empty()
        || t.strip_prefix(':').is_some_and(|tag| {
            let b = tag.as_bytes();
            !b.is_empty()
                && b.len() <= 128
                && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c))
        })
}

fn matches_digest(d: &str) -> bool {
    d.is_empty()
        || [("@sha256:", 64), ("@sha384:", 96), ("@sha512:", 128)]
            .iter()
            .any(|(prefix, len)| {
                d.strip_prefix(prefix).is_some_and(|hex| {
                    hex.len() == *len && hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
                })
            })
}

/// A CEL string literal.
fn cel_str(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn cel_list(items: &[String]) -> String {
    format!(
        "[{}]",
        items
            .iter()
            .map(|s| cel_str(s))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// `{'key': ['target', 'secret'], …}`.
fn cel_map(map: &BTreeMap<String, Target>) -> String {
    let items: Vec<String> = map
        .iter()
        .map(|(k, v)| {
            format!(
                "{}: [{}, {}]",
                cel_str(k),
                cel_str(&v.image),
                cel_str(&v.secret)
            )
        })
        .collect();
    format!("{{{}}}", items.join(", "))
}

/// Whether `image`'s rewrite is one the exported policy makes, and if not, why.
pub fn explain(export: &Export, table: &Table, image: &str) -> Option<Result<(), String>> {
    let Decision::Rewrite(rw) = table.decide(image) else {
        return None;
    };
    let by_policy = export.apply(image);
    Some(match by_policy {
        Some((new, _)) if new == rw.target.as_str() => Ok(()),
        _ => {
            let what = match rw.matched {
                Matched::Entry(e) => format!("images[{}]", e.index),
                Matched::Rule(r) => format!("rules[{}]", r.index),
            };
            Err(export
                .reason_for(&what)
                .map(str::to_string)
                .unwrap_or_else(|| {
                    if rw.source.registry() == DOCKER_HUB || rw.source.is_docker_hub() {
                        "this spelling of the image is not one the policy lists".to_string()
                    } else {
                        "not in the policy".to_string()
                    }
                }))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D: &str = "sha256:86e0e091d0da6bde2456dbb48306f3956bbeb2eae1b5b9a43045843f69fe4aaa";

    fn tables() -> Vec<Table> {
        let root = env!("CARGO_MANIFEST_DIR");
        [
            "tests/data/admission/table.yaml",
            "deploy/config/ghcr.yaml",
            "deploy/config/ecr-pull-through.yaml",
            "deploy/config/rancher.yaml",
        ]
        .iter()
        .map(|f| {
            crate::config::Config::parse(f, &std::fs::read_to_string(format!("{root}/{f}")).unwrap()).map(|c| c.table).unwrap()
        })
        .chain([crate::config::Config::parse(
            "t.yaml",
            &format!(
                "mirrors:\n  m: {{type: repository, registry: r.io, prefix: m, pullSecret: s}}\n\
                 images:\n  - {{source: \"grafana/loki\", target: \"r.io/m/loki\"}}\n\
                 \x20 - {{source: \"busybox@{D}\", target: \"r.io/m/busybox\"}}\n\
                 \x20 - {{source: \"quay.io/a/b:latest\", target: \"r.io/m/b:latest\"}}\n\
                 \x20 - {{source: \"grafana/tempo:2\", target: \"r.io/m/tempo:2\", swap: if-present}}\n\
                 \x20 - {{source: \"grafana/tempo\", target: \"r.io/m/tempo\"}}\n\
                 rules:\n  - {{match: [\"docker.io/library/alpine\"], mirror: m, swap: always}}\n"
            ),
        ).map(|c| c.table)
        .unwrap()])
        .collect()
    }

    /// What the policy does to `image` is what the webhook does, or nothing.
    fn agrees(table: &Table, export: &Export, image: &str) -> Result<(), TestCaseError> {
        if let Some((new, secret)) = export.apply(image) {
            let Decision::Rewrite(rw) = table.decide(image) else {
                return Err(TestCaseError::fail(format!(
                    "{image}: the webhook keeps it, the policy makes {new}"
                )));
            };
            prop_assert_eq!(rw.target.as_str(), new.as_str(), "{}", image);
            prop_assert_eq!(rw.pull_secret(), secret.as_deref(), "{}", image);
            prop_assert_eq!(rw.policy.swap, SwapPolicy::Always);
        }
        Ok(())
    }

    #[test]
    fn every_spelling_of_an_exported_entry_is_rewritten_as_the_webhook_does() {
        for table in tables() {
            let export = Export::of(&table);
            for entry in table.entries() {
                for s in spellings(entry.source_name()) {
                    let images = match entry.tags() {
                        EntryTags::Exact(t) => vec![format!("{s}:{t}"), format!("{s}:{t}@{D}")],
                        EntryTags::Digest(d) => vec![format!("{s}@{d}"), format!("{s}:1@{d}")],
                        EntryTags::Any => vec![s.clone(), format!("{s}:3"), format!("{s}:3@{D}")],
                        EntryTags::Glob => vec![format!("{s}:1.29.1-x")],
                    };
                    for image in images {
                        agrees(&table, &export, &image).unwrap();
                        let exported = export.covers(&Matched::Entry(entry).to_string());
                        if exported && table.decide(&image).rewrite().is_some() {
                            assert!(
                                export.apply(&image).is_some(),
                                "{image} is not in the policy"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn what_cannot_be_exported_is_said_with_its_reason() {
        let t = tables().pop().unwrap();
        let e = Export::of(&t);
        let reason = |what: &str| e.reason_for(what).unwrap_or_default().to_string();
        assert!(reason("images[3] grafana/tempo:2").contains("if-present"));
        // tempo:2 is left out, so "any tag of tempo" would shadow it: left out too.
        assert!(reason("images[4] grafana/tempo").contains("would be shadowed"));
        assert!(e.apply("grafana/tempo:2").is_none() && e.apply("grafana/tempo:3").is_none());
        // The rule on one exact name is exported, any tag.
        assert_eq!(
            e.apply("alpine:3.20"),
            Some(("r.io/m/alpine:3.20".to_string(), Some("s".to_string())))
        );
        // A bare name pulls `latest`, which an entry for :latest covers, without adding a tag.
        assert_eq!(
            e.apply("quay.io/a/b").map(|r| r.0).as_deref(),
            Some("r.io/m/b")
        );
        // A tag or digest of the wrong form is never carried.
        assert!(e.apply("grafana/loki:-bad").is_none());
        assert!(e.apply("grafana/loki@sha256:abc").is_none());
    }

    #[test]
    fn a_pinned_rule_is_left_out_with_its_reason_as_written() {
        let t = crate::config::Config::parse(
            "t.yaml",
            "mirrors:\n  m: {type: repository, registry: r.io, prefix: m, naming: preserve}\n\
             images:\n  - {source: \"nginx:1.27\", target: \"r.io/m/nginx:1.27\", pin: digest}\n",
        )
        .map(|c| c.table)
        .unwrap();
        let e = Export::of(&t);
        assert_eq!(
            e.reason_for("images[0] nginx:1.27"),
            Some(
                "pin: digest: the tag's digest is asked of the upstream registry at admission, \
                 which a policy cannot do"
            )
        );
        // Every reason reads as one sentence: no run of spaces from a broken line.
        for l in &e.left_out {
            assert!(!l.reason.contains("  "), "{:?}", l.reason);
        }
    }

    #[test]
    fn the_manifests_name_every_secret_and_exclusion() {
        let t = tables().remove(1);
        let (policy, binding) = Export::of(&t).manifests("image-mirror");
        assert_eq!(policy["kind"], "MutatingAdmissionPolicy");
        assert_eq!(binding["spec"]["policyName"], "image-mirror");
        let excluded = &policy["spec"]["matchConstraints"]["namespaceSelector"]["matchExpressions"]
            [0]["values"];
        assert!(excluded
            .as_array()
            .unwrap()
            .contains(&Value::from("kube-system")));
        let missing = policy["spec"]["variables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "missing")
            .unwrap()["expression"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(missing.starts_with("['ghcr-pull']"), "{missing}");
    }

    fn reference() -> impl Strategy<Value = String> {
        let host = prop_oneof![
            Just(String::new()),
            Just("docker.io/".to_string()),
            Just("index.docker.io/".to_string()),
            Just("registry-1.docker.io/".to_string()),
            Just("quay.io/".to_string()),
            Just("library/".to_string()),
        ];
        let name = prop::sample::select(vec![
            "redis",
            "busybox",
            "grafana/loki",
            "grafana/tempo",
            "alpine",
            "a/b",
            "kiwigrid/k8s-sidecar",
            "temporalio/admin-tools",
            "nginx",
            "postgres",
        ]);
        let tag = prop::option::of(prop_oneof![
            Just("7.2.5".to_string()),
            Just("latest".to_string()),
            Just("1.36.1".to_string()),
            "[A-Za-z0-9_.-]{0,6}",
        ]);
        let digest = prop::option::of(prop_oneof![Just(D.to_string()), "[a-z0-9:]{0,12}"]);
        (host, name, tag, digest).prop_map(|(h, n, t, d)| {
            let mut s = format!("{h}{n}");
            if let Some(t) = t {
                s = format!("{s}:{t}");
            }
            if let Some(d) = d {
                s = format!("{s}@{d}");
            }
            s
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        #[test]
        fn the_policy_never_does_what_the_webhook_would_not(image in reference()) {
            static TABLES: std::sync::OnceLock<Vec<(Table, Export)>> = std::sync::OnceLock::new();
            let all = TABLES.get_or_init(|| tables().into_iter().map(|t| { let e = Export::of(&t); (t, e) }).collect());
            for (table, export) in all {
                agrees(table, export, &image)?;
            }
        }
    }
}
