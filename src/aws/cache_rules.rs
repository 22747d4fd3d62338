//! The table's pull-through upstreams against the account's cache rules: a prefix with no
//! rule behind it would make every Pod sent there fail to pull.

use std::collections::BTreeMap;

use crate::reference::canonical_host;

/// One pull-through cache rule, as `DescribePullThroughCacheRules` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheRule {
    /// The ECR repository prefix (`docker-hub`).
    pub prefix: String,
    /// The upstream registry's URL (`registry-1.docker.io`).
    pub upstream: String,
}

/// A table upstream that the account's rules do not serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleProblem {
    /// No rule has the prefix.
    Missing { upstream: String, prefix: String },
    /// The prefix's rule caches another registry.
    Elsewhere {
        upstream: String,
        prefix: String,
        rule_upstream: String,
    },
}

impl std::fmt::Display for RuleProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RuleProblem::Missing { upstream, prefix } => write!(
                f,
                "{upstream} → {prefix}: no pull-through cache rule has the prefix {prefix}, so \
                 every Pod sent there would fail to pull (aws ecr create-pull-through-cache-rule \
                 --ecr-repository-prefix {prefix} …)"
            ),
            RuleProblem::Elsewhere {
                upstream,
                prefix,
                rule_upstream,
            } => write!(
                f,
                "{upstream} → {prefix}: the rule with the prefix {prefix} caches {rule_upstream}, \
                 not {upstream}"
            ),
        }
    }
}

/// What in `upstreams` (upstream host → cache prefix, a pull-through mirror's) `rules` do not
/// serve. Hosts compare canonically (`registry-1.docker.io` is `docker.io`).
pub fn compare_rules(
    upstreams: &BTreeMap<String, String>,
    rules: &[CacheRule],
) -> Vec<RuleProblem> {
    let mut problems = Vec::new();
    for (upstream, prefix) in upstreams {
        let host = |u: &str| {
            let bare = u
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .trim_end_matches('/');
            canonical_host(bare).to_ascii_lowercase()
        };
        match rules
            .iter()
            .find(|r| r.prefix.trim_matches('/') == prefix.as_str())
        {
            None => problems.push(RuleProblem::Missing {
                upstream: upstream.clone(),
                prefix: prefix.clone(),
            }),
            Some(r) if host(&r.upstream) != host(upstream) => {
                problems.push(RuleProblem::Elsewhere {
                    upstream: upstream.clone(),
                    prefix: prefix.clone(),
                    rule_upstream: r.upstream.clone(),
                })
            }
            Some(_) => {}
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_prefix_needs_a_rule_for_its_upstream() {
        let upstreams: BTreeMap<String, String> = [
            ("docker.io", "docker-hub"),
            ("ghcr.io", "ghcr"),
            ("quay.io", "quay"),
            ("registry.k8s.io", "kubernetes"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let rule = |p: &str, u: &str| CacheRule {
            prefix: p.into(),
            upstream: u.into(),
        };
        let rules = [
            rule("docker-hub", "registry-1.docker.io"),
            rule("ghcr", "ghcr.io"),
            rule("quay", "public.ecr.aws"),
        ];
        assert_eq!(
            compare_rules(&upstreams, &rules),
            [
                RuleProblem::Elsewhere {
                    upstream: "quay.io".into(),
                    prefix: "quay".into(),
                    rule_upstream: "public.ecr.aws".into()
                },
                RuleProblem::Missing {
                    upstream: "registry.k8s.io".into(),
                    prefix: "kubernetes".into()
                },
            ]
        );
        assert!(compare_rules(&upstreams, &rules)[1]
            .to_string()
            .contains("every Pod sent there would fail to pull"));
    }
}
