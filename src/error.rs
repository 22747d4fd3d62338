//! Error reports that print every cause once.
//!
//! Our error types say only what their own layer knows and leave the cause to `source()`; some
//! library errors also repeat their cause in their message. [`Report`] walks the chain and skips
//! a cause whose text the report already holds, so `cannot read x: No such file or directory
//! (os error 2)` is printed once, not twice.

use std::error::Error;
use std::fmt;

/// `outer: cause: root cause`, each cause once.
pub struct Report<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(c) = cause {
            let s = c.to_string();
            if !s.is_empty() && !text.contains(&s) {
                text.push_str(": ");
                text.push_str(&s);
            }
            cause = c.source();
        }
        f.write_str(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read {path}")]
    struct Outer {
        path: String,
        #[source]
        source: Repeating,
    }

    /// A library error that prints its own cause too.
    #[derive(Debug, thiserror::Error)]
    #[error("no such file (os error 2)")]
    struct Repeating {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn each_cause_once() {
        let e = Outer {
            path: "/x".into(),
            source: Repeating {
                source: std::io::Error::other("no such file (os error 2)"),
            },
        };
        assert_eq!(
            Report(&e).to_string(),
            "cannot read /x: no such file (os error 2)"
        );
    }
}
