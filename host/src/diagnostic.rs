//! Problems found in a source file (a workflow, `trellis.toml`), each at a
//! file, line and column.
//!
//! Validation never stops at the first problem: every stage reports into a
//! `Reporter`, and the caller gets all of them at once as [`Diagnostics`].

use std::fmt;
use std::ops::Range;

use serde::Serialize;

/// One problem in a workflow file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// The path of the file as the caller named it.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, counted in characters.
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

/// Every problem found in a workflow file, in file order; never empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(transparent)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn iter(&self) -> std::slice::Iter<'_, Diagnostic> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One diagnostic per line, without a trailing newline.
impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, diagnostic) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            diagnostic.fmt(f)?;
        }
        Ok(())
    }
}

impl<'a> IntoIterator for &'a Diagnostics {
    type Item = &'a Diagnostic;
    type IntoIter = std::slice::Iter<'a, Diagnostic>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Collects diagnostics for one source text, turning byte offsets into lines and
/// columns.
pub(crate) struct Reporter<'s> {
    file: &'s str,
    source: &'s str,
    /// Byte offset where each line starts.
    line_starts: Vec<usize>,
    /// (byte offset, message), sorted when finished.
    found: Vec<(usize, String)>,
}

impl<'s> Reporter<'s> {
    pub(crate) fn new(file: &'s str, source: &'s str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(source.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Reporter {
            file,
            source,
            line_starts,
            found: Vec::new(),
        }
    }

    pub(crate) fn source(&self) -> &'s str {
        self.source
    }

    /// A problem at byte `offset` of the source.
    pub(crate) fn error_at(&mut self, offset: usize, message: impl Into<String>) {
        self.found
            .push((offset.min(self.source.len()), message.into()));
    }

    /// A problem that starts where `span` starts.
    pub(crate) fn error(&mut self, span: &Range<usize>, message: impl Into<String>) {
        self.error_at(span.start, message);
    }

    pub(crate) fn has_errors(&self) -> bool {
        !self.found.is_empty()
    }

    /// 1-based line and column of a byte offset.
    pub(crate) fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.source.len());
        let line = self.line_starts.partition_point(|&start| start <= offset) - 1;
        let mut start = self.line_starts[line];
        // Never split a character (offsets come from our own arithmetic too).
        let end = self.source.floor_char_boundary(offset);
        start = start.min(end);
        let column = self.source[start..end].chars().count() + 1;
        (line + 1, column)
    }

    pub(crate) fn line(&self, offset: usize) -> usize {
        self.position(offset).0
    }

    /// `Err` with every problem in file order, or `Ok(value)` when there was none.
    pub(crate) fn finish<T>(self, value: Option<T>) -> Result<T, Diagnostics> {
        match value {
            Some(value) if self.found.is_empty() => Ok(value),
            _ => Err(self.into_diagnostics()),
        }
    }

    fn into_diagnostics(mut self) -> Diagnostics {
        self.found.sort_by_key(|(offset, _)| *offset);
        self.found.dedup();
        let mut diagnostics: Vec<Diagnostic> = self
            .found
            .iter()
            .map(|(offset, message)| {
                let (line, column) = self.position(*offset);
                Diagnostic {
                    file: self.file.to_owned(),
                    line,
                    column,
                    message: message.clone(),
                }
            })
            .collect();
        if diagnostics.is_empty() {
            // `finish(None)` without a reported problem is a bug in this module;
            // still tell the user something rather than nothing.
            diagnostics.push(Diagnostic {
                file: self.file.to_owned(),
                line: 1,
                column: 1,
                message: "the workflow could not be read".to_owned(),
            });
        }
        Diagnostics(diagnostics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_count_characters() {
        let reporter = Reporter::new("f.toml", "a = 1\nbé = \"x\"\n");
        assert_eq!(reporter.position(0), (1, 1));
        assert_eq!(reporter.position(4), (1, 5));
        assert_eq!(reporter.position(6), (2, 1));
        // `é` is two bytes but one column.
        assert_eq!(reporter.position(9), (2, 3));
        assert_eq!(reporter.position(100), (3, 1));
    }

    #[test]
    fn display_is_one_problem_per_line_in_file_order() {
        let mut reporter = Reporter::new("w.toml", "a\nb\nc\n");
        reporter.error_at(4, "second");
        reporter.error_at(0, "first");
        reporter.error_at(0, "first");
        let diagnostics = reporter.finish::<()>(None).unwrap_err();
        assert_eq!(
            diagnostics.to_string(),
            "w.toml:1:1: first\nw.toml:3:1: second"
        );
    }

    /// `trellis.toml`'s positions, as config.rs tested them before it used
    /// the reporter.
    #[test]
    fn positions_count_lines_and_characters() {
        let position = |source, offset| Reporter::new("trellis.toml", source).position(offset);
        assert_eq!(position("a = 1\nbé = 2\n", 0), (1, 1));
        assert_eq!(position("a = 1\nbé = 2\n", 6), (2, 1));
        assert_eq!(position("a = 1\nbé = 2\n", 9), (2, 3));
        assert_eq!(position("a", 100), (1, 2));
    }
}
