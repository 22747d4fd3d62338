//! Problems with a table file, each located by file, line and field.
//!
//! Pure. Every check of the table and its settings reports into one [`ProblemList`], so that
//! `check-config` shows everything wrong at once; YAML syntax and schema errors are located by
//! the parser's line, with the field path read off the text.

use std::fmt;

use serde_saphyr::Spanned;

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
        match self.line {
            0 => write!(f, "{}: ", self.file)?,
            line => write!(f, "{}:{line}: ", self.file)?,
        }
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

impl TableError {
    /// A problem with the file as a whole.
    pub(crate) fn whole(file: &str, message: &str) -> TableError {
        TableError {
            problems: vec![Problem {
                file: file.to_string(),
                line: 0,
                field: String::new(),
                message: message.to_string(),
            }],
        }
    }
}

/// Collects problems (the table cannot be used) and warnings (it can, but is probably not
/// what was meant) with their file and line.
pub(crate) struct ProblemList<'a> {
    pub(crate) file: &'a str,
    pub(crate) list: Vec<Problem>,
    pub(crate) warnings: Vec<Problem>,
}

impl ProblemList<'_> {
    fn at<T>(&self, at: &Spanned<T>, field: String, message: String) -> Problem {
        Problem {
            file: self.file.to_string(),
            line: at.referenced.line(),
            field,
            message,
        }
    }

    pub(crate) fn add<T>(
        &mut self,
        at: &Spanned<T>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) {
        let p = self.at(at, field.into(), message.into());
        self.list.push(p);
    }

    /// Something valid that is probably not what was meant: said, and (unless
    /// `check-config --strict`) no reason to refuse the table.
    pub(crate) fn warn<T>(
        &mut self,
        at: &Spanned<T>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) {
        let p = self.at(at, field.into(), message.into());
        self.warnings.push(p);
    }
}

impl<'a> ProblemList<'a> {
    pub(crate) fn new(file: &'a str) -> Self {
        ProblemList {
            file,
            list: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// `Ok(value)` when nothing was reported, else every problem.
    pub(crate) fn into_result<T>(self, value: T) -> Result<T, TableError> {
        if self.list.is_empty() {
            Ok(value)
        } else {
            Err(TableError {
                problems: self.list,
            })
        }
    }
}

/// A serde-saphyr error as a located problem, with the field path read off the text.
pub(crate) fn yaml_error(file: &str, yaml: &str, e: &serde_saphyr::Error) -> TableError {
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
    let message = without_library_advice(&message);
    let field = field_path_at(yaml, line as usize);
    // Our own deserialisers name their setting, for flow-style YAML where the path stops at
    // the mapping; said once when the path names it too.
    let key = field.rsplit('.').next().unwrap_or_default();
    let message = match message.strip_prefix(&format!("{key}: ")) {
        Some(rest) if !key.is_empty() => rest.to_string(),
        _ => message,
    };
    TableError {
        problems: vec![Problem {
            file: file.to_string(),
            line,
            field,
            message,
        }],
    }
}

/// The parser's words, without its advice to the programmer who calls it ("set
/// DuplicateKeyPolicy", "use Option<String>"), which a table's author can do nothing with.
fn without_library_advice(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("duplicate mapping key: ") {
        let key = rest.split(',').next().unwrap_or(rest).trim();
        return format!("key {key:?} appears twice in this mapping; keep one");
    }
    if message.starts_with("cannot deserialize null") {
        return "has no value".to_string();
    }
    let cut = [", set ", "; use "]
        .iter()
        .filter_map(|marker| message.find(marker))
        .min()
        .unwrap_or(message.len());
    message[..cut].to_string()
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
}
