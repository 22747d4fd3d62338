//! The indexes that keep a decision's cost flat as the table grows: entries by normalised name,
//! and rule globs by the literal components they start with.

use ahash::AHashMap;
use globset::{GlobBuilder, GlobMatcher};

/// Which tags of a source name an exact entry covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TagSpec {
    Any,
    Exact(String),
    Glob { prefix: String, suffix: String },
    Digest(String),
}

impl TagSpec {
    pub(crate) fn glob_match<'a>(prefix: &str, suffix: &str, tag: &'a str) -> Option<&'a str> {
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
pub(crate) enum TargetTag {
    /// The source's tag carried over unchanged.
    Carry,
    Exact(String),
    /// The text a source tag glob matched goes where `*` is.
    Glob {
        prefix: String,
        suffix: String,
    },
}

/// One compiled glob on a normalised name, with fast paths for the common shapes.
#[derive(Debug, Clone)]
pub(crate) enum NameMatcher {
    /// No wildcard: the name itself.
    Exact(String),
    /// `prefix/**`: every name under `prefix/`.
    Under(String),
    Glob(GlobMatcher),
}

pub(crate) fn has_glob_meta(s: &str) -> bool {
    s.contains(['*', '?', '[', '{', '\\'])
}

impl NameMatcher {
    pub(crate) fn new(glob: &str) -> Result<Self, globset::Error> {
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

    pub(crate) fn is_match(&self, name: &str) -> bool {
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
pub(crate) struct RuleIndex {
    /// Every glob with the rule it belongs to, in rule order.
    globs: Vec<(usize, NameMatcher)>,
    by_prefix: AHashMap<String, Vec<usize>>,
    /// Globs whose first component has a wildcard: tried for every name.
    unanchored: Vec<usize>,
}

impl RuleIndex {
    pub(crate) fn add(&mut self, rule: usize, glob: &str, matcher: NameMatcher) {
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
    pub(crate) fn matching<'a>(&'a self, name: &'a str) -> impl Iterator<Item = usize> + 'a {
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

/// The entries of one source name, indexed by how they match.
#[derive(Debug, Default, Clone)]
pub(crate) struct NameEntries {
    pub(crate) by_tag: AHashMap<String, usize>,
    pub(crate) by_digest: AHashMap<String, usize>,
    pub(crate) globs: Vec<usize>,
    pub(crate) any: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_globs_match_prefix_and_suffix() {
        assert_eq!(
            TagSpec::glob_match("1.29.1-", "", "1.29.1-tctl"),
            Some("tctl")
        );
        assert_eq!(TagSpec::glob_match("1.29.1-", "", "1.29.2"), None);
        assert_eq!(TagSpec::glob_match("v", "-alpine", "v1-alpine"), Some("1"));
    }

    #[test]
    fn rule_index_finds_globs_by_literal_prefix() {
        let mut index = RuleIndex::default();
        for (rule, glob) in [(0, "quay.io/org/*"), (1, "*.io/**"), (2, "docker.io/**")] {
            index.add(rule, glob, NameMatcher::new(glob).unwrap());
        }
        let found: Vec<usize> = index.matching("quay.io/org/app").collect();
        assert_eq!(found, [0, 1]);
        let found: Vec<usize> = index.matching("docker.io/library/nginx").collect();
        assert_eq!(found, [1, 2]);
        assert_eq!(index.matching("ghcr.io").count(), 0);
    }
}
