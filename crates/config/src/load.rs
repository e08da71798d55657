//! Reading a configuration from disk: the TOML file, relative paths resolved
//! against its folder, and the Cedar policy files it names.

use std::path::{Path, PathBuf};

use crate::{Config, Finding, Findings, KeyPath, SourceMap};

/// Largest configuration or policy file read, in bytes.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// Most policy files one configuration may load.
pub const MAX_POLICY_FILES: usize = 10_000;

/// A Cedar policy file named by `[policies] cedar`.
#[derive(Debug, Clone)]
pub struct PolicyFile {
    /// The path as it should be shown to a user.
    pub path: PathBuf,
    /// Its text.
    pub text: String,
    /// The `[policies] cedar` entry that matched it.
    pub entry: usize,
}

/// A configuration with everything it refers to read into memory.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    /// The typed configuration.
    pub config: Config,
    /// The configuration file, as given.
    pub file: PathBuf,
    /// Positions of its keys, for findings.
    pub source: SourceMap,
    /// The folder relative paths resolve from.
    pub base_dir: PathBuf,
    /// The Cedar policy files, in `[policies] cedar` order, then by name.
    pub policies: Vec<PolicyFile>,
    /// Problems met while reading the policy files. They do not stop the
    /// load, so `check` can list them with every other finding; an engine
    /// is never built while there are any.
    pub policy_findings: Vec<Finding>,
    /// The text of `[elevation] auto_approve`, when configured: `Ok(text)`,
    /// or why it could not be read.
    pub auto_approve: Option<Result<String, String>>,
}

impl LoadedConfig {
    /// Parses `text` as the configuration file `file` and reads the policy
    /// files it names, relative to `file`'s folder.
    ///
    /// Errors: the first syntax or type error of the TOML. Problems with
    /// the policy files are kept in [`LoadedConfig::policy_findings`].
    pub fn parse(text: &str, file: &Path) -> Result<Self, Findings> {
        let mut loaded = Self::parse_text(text, file)?;
        loaded.read_policies();
        loaded.auto_approve = loaded
            .config
            .elevation
            .auto_approve
            .clone()
            .map(|f| read_bounded(&loaded.resolve(&f)));
        Ok(loaded)
    }

    /// Parses `text` as the configuration file `file` and touches nothing
    /// else: no file is read, so [`LoadedConfig::policies`] is empty and
    /// [`LoadedConfig::auto_approve`] is `None` until the caller fills them
    /// (with text it holds in memory, or through [`LoadedConfig::parse`],
    /// which reads them from disk). `file` only names the configuration in
    /// findings and gives the folder relative paths resolve from.
    ///
    /// Errors: the first syntax or type error of the TOML.
    pub fn parse_text(text: &str, file: &Path) -> Result<Self, Findings> {
        let source = SourceMap::new(text).unwrap_or_else(SourceMap::empty);
        let config: Config = toml::from_str(text).map_err(|err| {
            let (line, path) = match err.span() {
                Some(span) => (Some(line_of(text, span.start)), source.path_at(span.start)),
                None => (None, KeyPath::root()),
            };
            Finding::new(file, line, path, first_line(err.message()))
        })?;
        // An empty base (a config in the working directory) keeps relative
        // paths as the user wrote them: `policies/a.cedar`, not `./policies/a.cedar`.
        let base_dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(Self {
            config,
            file: file.to_path_buf(),
            source,
            base_dir,
            policies: Vec::new(),
            policy_findings: Vec::new(),
            auto_approve: None,
        })
    }

    /// Reads and parses the configuration at `file`.
    pub fn load(file: &Path) -> Result<Self, Findings> {
        let text = read_bounded(file).map_err(|msg| Finding::new(file, None, "", msg))?;
        Self::parse(&text, file)
    }

    /// A path from the configuration, resolved against its folder.
    pub fn resolve(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The line of `path` in the configuration file, when known.
    pub fn line(&self, path: &KeyPath) -> Option<usize> {
        self.source.line(path)
    }

    fn read_policies(&mut self) {
        let mut findings = Vec::new();
        let mut seen: Vec<(PathBuf, usize)> = Vec::new();
        for (entry, pattern) in self.config.policies.cedar.iter().enumerate() {
            let key = KeyPath::root().key("policies").key("cedar").index(entry);
            let here = |msg: String| Finding::new(&self.file, self.source.line(&key), &key, msg);
            match expand(&self.resolve(pattern)) {
                Ok(paths) if paths.is_empty() => {
                    findings.push(here(format!("{pattern:?} matches no file")));
                }
                Ok(paths) => {
                    for path in paths {
                        let canonical =
                            std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
                        if let Some((_, first)) = seen.iter().find(|(c, _)| c == &canonical) {
                            findings.push(here(format!(
                                "{} is already loaded by policies.cedar[{first}]",
                                path.display()
                            )));
                            continue;
                        }
                        if self.policies.len() >= MAX_POLICY_FILES {
                            findings
                                .push(here(format!("more than {MAX_POLICY_FILES} policy files")));
                            self.policy_findings = findings;
                            return;
                        }
                        match read_bounded(&path) {
                            Ok(text) => {
                                seen.push((canonical, entry));
                                self.policies.push(PolicyFile { path, text, entry });
                            }
                            Err(msg) => findings.push(Finding::new(&path, None, "", msg)),
                        }
                    }
                }
                Err(msg) => findings.push(here(msg)),
            }
        }
        self.policy_findings = findings;
    }
}

/// The 1-based line of byte `offset` in `text`.
pub fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(offset)
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or(message).trim().to_owned()
}

fn read_bounded(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".to_owned());
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "file is {} bytes, more than the limit of {MAX_FILE_BYTES}",
            meta.len()
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))
}

/// Expands a `*`/`?` wildcard in the last path component. Other components
/// are taken literally. The result is sorted, so load order is stable.
fn expand(pattern: &Path) -> Result<Vec<PathBuf>, String> {
    let Some(name) = pattern.file_name().and_then(|n| n.to_str()) else {
        return Err(format!("{} is not a file pattern", pattern.display()));
    };
    if !name.contains(['*', '?']) {
        return Ok(if pattern.exists() {
            vec![pattern.to_path_buf()]
        } else {
            Vec::new()
        });
    }
    // Paths are built from the folder as written, so findings show
    // `policies/a.cedar`; only the listing itself needs "." for an empty one.
    let dir = pattern.parent().unwrap_or(Path::new(""));
    if dir.to_str().is_some_and(|d| d.contains(['*', '?'])) {
        return Err("a wildcard may only stand in the file name".to_owned());
    }
    let listed = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let entries =
        std::fs::read_dir(listed).map_err(|e| format!("cannot list {}: {e}", listed.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .filter(|n| wildcard(name, n))
                .map(|n| dir.join(n))
        })
        .collect();
    paths.sort();
    Ok(paths)
}

/// Matches `text` against `pattern`, where `*` is any run and `?` any one
/// character. Iterative, with one backtrack point: linear in practice, never
/// exponential.
fn wildcard(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || Some(&c) == t.get(ti) => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p.get(pi..)
        .is_some_and(|rest| rest.iter().all(|&c| c == '*'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(wildcard("*.cedar", "a.cedar"));
        assert!(wildcard("*.cedar", ".cedar"));
        assert!(!wildcard("*.cedar", "a.cedar.bak"));
        assert!(wildcard("p?.cedar", "p1.cedar"));
        assert!(wildcard("*", "anything"));
        assert!(!wildcard("a*b*c", "aXbY"));
        assert!(wildcard("a*b*c", "aXbYc"));
    }

    #[test]
    fn parse_text_reads_no_file() {
        // The policy pattern and the auto-approve file name paths that do
        // not exist: parse_text must not look for them, parse must.
        let text = "[policies]\ncedar = [\"no-such-dir/*.cedar\"]\n\n[elevation]\nauto_approve = \"no-such-file.cedar\"\n";
        let pure = LoadedConfig::parse_text(text, Path::new("x.toml")).ok();
        let pure = pure.as_ref();
        assert_eq!(pure.map(|l| l.policies.len()), Some(0));
        assert_eq!(pure.map(|l| l.policy_findings.len()), Some(0));
        assert!(pure.is_some_and(|l| l.auto_approve.is_none()));
        let read = LoadedConfig::parse(text, Path::new("x.toml")).ok();
        let read = read.as_ref();
        assert_eq!(read.map(|l| l.policy_findings.len()), Some(1));
        assert!(read.is_some_and(|l| matches!(l.auto_approve, Some(Err(_)))));
    }

    #[test]
    fn syntax_error_has_line() {
        let err = LoadedConfig::parse("[server]\nlisten = \n", Path::new("x.toml"))
            .err()
            .map(|f| f.to_string())
            .unwrap_or_default();
        assert!(err.starts_with("x.toml:2"), "{err}");
    }

    #[test]
    fn unknown_key_has_path_and_line() {
        let text = "[server]\nlisten = \"127.0.0.1:1\"\n\n[[agents]]\nid = \"a\"\ntype = \"t\"\ntools = []\ncolour = \"red\"\n";
        let err = LoadedConfig::parse(text, Path::new("x.toml"))
            .err()
            .map(|f| f.to_string())
            .unwrap_or_default();
        assert!(
            err.starts_with("x.toml:8 agents[0].colour: unknown field `colour`"),
            "{err}"
        );
    }

    #[test]
    fn wrong_type_has_path_and_line() {
        let text = "[tokens]\naccess_ttl = 10\n";
        let err = LoadedConfig::parse(text, Path::new("x.toml"))
            .err()
            .map(|f| f.to_string())
            .unwrap_or_default();
        assert!(err.starts_with("x.toml:2 tokens.access_ttl: "), "{err}");
    }

    #[test]
    fn bad_duration_is_reported() {
        let text = "[tokens]\naccess_ttl = \"ten minutes\"\n";
        let err = LoadedConfig::parse(text, Path::new("x.toml"))
            .err()
            .map(|f| f.to_string())
            .unwrap_or_default();
        assert!(err.contains("tokens.access_ttl: invalid duration"), "{err}");
    }

    #[test]
    fn policies_resolve_relative_to_config() {
        let dir = tempfile::tempdir().ok();
        let Some(dir) = dir else { return };
        let pdir = dir.path().join("policies");
        assert!(std::fs::create_dir(&pdir).is_ok());
        assert!(std::fs::write(pdir.join("b.cedar"), "// b").is_ok());
        assert!(std::fs::write(pdir.join("a.cedar"), "// a").is_ok());
        assert!(std::fs::write(pdir.join("skip.txt"), "").is_ok());
        let cfg = dir.path().join("portcullis.toml");
        assert!(std::fs::write(&cfg, "[policies]\ncedar = [\"policies/*.cedar\"]\n").is_ok());
        let loaded = LoadedConfig::load(&cfg);
        let names: Vec<String> = loaded
            .map(|l| l.policies.iter().map(|p| p.text.clone()).collect())
            .unwrap_or_default();
        assert_eq!(names, ["// a", "// b"]);
    }

    #[test]
    fn glob_matching_nothing_is_a_finding() {
        let dir = tempfile::tempdir().ok();
        let Some(dir) = dir else { return };
        let cfg = dir.path().join("c.toml");
        assert!(std::fs::write(&cfg, "[policies]\ncedar = [\"nope/*.cedar\"]\n").is_ok());
        let err = LoadedConfig::load(&cfg)
            .map(|l| Findings(l.policy_findings).to_string())
            .unwrap_or_default();
        assert!(err.contains(":2 policies.cedar[0]: "), "{err}");
    }
}
