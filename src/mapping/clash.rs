//! Naming clashes: two sources that the table would send to one target name.

use std::collections::HashMap;

use serde_saphyr::Spanned;

use super::index::{has_glob_meta, NameMatcher, TagSpec, TargetTag};
use super::mirrors::{Mirror, MirrorKind};
use super::policy::Naming;
use super::raw::{RawImage, RawRule};
use super::{Entry, Rule};
use crate::problems::ProblemList;
use crate::reference::Reference;

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
pub(super) fn check_entries(
    entries: &[Entry],
    raw: &[Spanned<RawImage>],
    problems: &mut ProblemList,
) {
    let mut by_target: HashMap<&str, Vec<&Entry>> = HashMap::new();
    for e in entries {
        by_target.entry(e.target_name.as_str()).or_default().push(e);
    }
    for group in by_target.values().filter(|g| g.len() > 1) {
        for (k, a) in group.iter().enumerate() {
            for b in &group[k + 1..] {
                let Some(at) = &raw[b.index].value.target else {
                    continue;
                };
                if a.source_name != b.source_name && tags_overlap(&target_tags(a), &target_tags(b))
                {
                    problems.add(
                        at,
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
pub(super) fn check_rule(
    rule: &Rule,
    mirror: &Mirror,
    spanned: &Spanned<RawRule>,
    entries: &[Entry],
    problems: &mut ProblemList,
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
                    naming, mirror.name
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
            let Ok(candidate_ref) = Reference::parse(&candidate) else {
                continue;
            };
            let same_target = mirror
                .target_name(&candidate_ref)
                .is_some_and(|t| t == e.target_name);
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
