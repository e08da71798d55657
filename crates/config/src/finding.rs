//! Findings: one problem in a configuration, with the file, line and key path
//! a human needs to fix it.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::KeyPath;

/// One problem found in a configuration or one of its policy files.
///
/// Displayed as `FILE:LINE PATH: MESSAGE`, for example
/// `portcullis.toml:42 agents[1].tools[3]: unknown tool "wh.delet"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The file, as given by the user (not canonicalized).
    pub file: PathBuf,
    /// The 1-based line, when known.
    pub line: Option<usize>,
    /// The key path (or, for policy files, a policy id), possibly empty.
    pub path: String,
    /// What is wrong, in lowercase prose.
    pub message: String,
}

impl Finding {
    /// A finding at a known place.
    pub fn new(
        file: impl AsRef<Path>,
        line: Option<usize>,
        path: impl fmt::Display,
        message: impl Into<String>,
    ) -> Self {
        Self {
            file: file.as_ref().to_path_buf(),
            line,
            path: clip(path.to_string()),
            message: clip(message.into()),
        }
    }
}

/// Longest key path or message kept in a finding: a 4 MiB value must not
/// become a 4 MiB line of output.
const MAX_FINDING_TEXT: usize = 400;

fn clip(mut text: String) -> String {
    if text.len() > MAX_FINDING_TEXT {
        let cut = (0..=MAX_FINDING_TEXT)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text.truncate(cut);
        text.push('…');
    }
    text
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.path.is_empty() {
            write!(f, " {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Several findings, displayed one per line.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
pub struct Findings(pub Vec<Finding>);

impl fmt::Display for Findings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, finding) in self.0.iter().enumerate() {
            if n > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{finding}")?;
        }
        Ok(())
    }
}

impl From<Finding> for Findings {
    fn from(finding: Finding) -> Self {
        Self(vec![finding])
    }
}

/// A sink for findings about one configuration file, which turns key paths
/// into lines.
#[derive(Debug)]
pub struct Reporter<'a> {
    file: &'a Path,
    source: &'a crate::SourceMap,
    findings: Vec<Finding>,
}

impl<'a> Reporter<'a> {
    /// A reporter for `file`, whose positions `source` knows.
    pub fn new(file: &'a Path, source: &'a crate::SourceMap) -> Self {
        Self {
            file,
            source,
            findings: Vec::new(),
        }
    }

    /// Records a finding at `path`.
    pub fn at(&mut self, path: &KeyPath, message: impl Into<String>) {
        let line = self.source.line(path);
        self.findings
            .push(Finding::new(self.file, line, path, message));
    }

    /// Records a finding that is already placed (e.g. in a policy file).
    pub fn push(&mut self, finding: Finding) {
        self.findings.push(finding);
    }

    /// The findings so far, in the order they were reported.
    pub fn into_findings(self) -> Vec<Finding> {
        self.findings
    }

    /// True when nothing has been reported.
    pub fn is_empty(&self) -> bool {
        self.findings.is_empty()
    }
}
