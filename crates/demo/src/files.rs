//! The `files` tool set: a directory tree under one root.
//!
//! Paths look absolute (`/data/in.csv`) and resolve under the root
//! (`<root>/data/in.csv`). A path with a `..` component is refused
//! outright; every other path is canonicalised (following symlinks) and
//! must still lie under the canonical root, so a symlink pointing out of
//! the tree is refused too.

use std::io::Read as _;
use std::path::{Component, Path, PathBuf};

use serde_json::{Value, json};

use crate::args::{Args, ToolError, quote};
use crate::tools::ToolOutput;

/// Longest path argument, in bytes.
pub(crate) const MAX_PATH: usize = 1024;
/// Most bytes `read` returns.
const MAX_READ: u64 = 1 << 20;
/// Most entries `list` returns.
const MAX_ENTRIES: usize = 1000;

/// The file tree and the tools over it.
#[derive(Debug)]
pub(crate) struct Files {
    root: PathBuf,
}

impl Files {
    /// A tree rooted at `root`, which must be a directory.
    pub(crate) fn open(root: &Path) -> std::io::Result<Self> {
        let root = root.canonicalize()?;
        if !root.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                "not a directory",
            ));
        }
        Ok(Self { root })
    }

    /// The real path `path` names under the root.
    fn resolve(&self, path: &str) -> Result<PathBuf, ToolError> {
        if path.contains('\0') {
            return Err(ToolError::Refused("a path cannot contain NUL".to_owned()));
        }
        let mut joined = self.root.clone();
        for part in Path::new(path).components() {
            match part {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(p) => joined.push(p),
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(ToolError::Refused(format!(
                        "{:?} escapes the server's root",
                        quote(path)
                    )));
                }
            }
        }
        let real = joined
            .canonicalize()
            .map_err(|e| ToolError::Io(format!("{}: {}", quote(path), io_reason(&e))))?;
        if !real.starts_with(&self.root) {
            return Err(ToolError::Refused(format!(
                "{:?} escapes the server's root (through a symlink)",
                quote(path)
            )));
        }
        Ok(real)
    }

    /// `read {path, limit?}`: a text file, at most 1 MiB or `limit` lines.
    pub(crate) fn read(&self, args: &Value) -> Result<ToolOutput, ToolError> {
        let a = Args::new(args, &["path", "limit"])?;
        let path = a.str("path", MAX_PATH)?;
        let limit = a.opt_positive("limit")?;
        let real = self.resolve(path)?;
        let io = |e: std::io::Error| ToolError::Io(format!("{}: {}", quote(path), io_reason(&e)));
        let file = std::fs::File::open(&real).map_err(io)?;
        if !file.metadata().map_err(io)?.is_file() {
            return Err(ToolError::Refused(format!(
                "{:?} is not a regular file",
                quote(path)
            )));
        }
        let mut bytes = Vec::new();
        file.take(MAX_READ + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        let mut truncated = bytes.len() as u64 > MAX_READ;
        bytes.truncate(usize::try_from(MAX_READ).unwrap_or(usize::MAX));
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if let Some(limit) = limit {
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            if let Some((end, _)) = text.match_indices('\n').nth(limit.saturating_sub(1)) {
                if end + 1 < text.len() {
                    truncated = true;
                }
                text.truncate(end + 1);
            }
        }
        let lines = text.lines().count();
        let size = text.len();
        Ok(ToolOutput::ok(text).with_structured(json!({
            "path": path,
            "bytes": size,
            "lines": lines,
            "truncated": truncated,
        })))
    }

    /// `list {path}`: a directory's entries, sorted by name.
    pub(crate) fn list(&self, args: &Value) -> Result<ToolOutput, ToolError> {
        let path = Args::new(args, &["path"])?.str("path", MAX_PATH)?;
        let real = self.resolve(path)?;
        let io = |e: std::io::Error| ToolError::Io(format!("{}: {}", quote(path), io_reason(&e)));
        let mut entries = Vec::new();
        let mut truncated = false;
        for entry in std::fs::read_dir(&real).map_err(io)? {
            let entry = entry.map_err(io)?;
            if entries.len() >= MAX_ENTRIES {
                truncated = true;
                break;
            }
            let kind = match entry.file_type() {
                Ok(t) if t.is_dir() => "dir",
                Ok(t) if t.is_file() => "file",
                Ok(t) if t.is_symlink() => "symlink",
                _ => "other",
            };
            let size = entry
                .metadata()
                .ok()
                .filter(|m| m.is_file())
                .map(|m| m.len());
            entries.push((entry.file_name().to_string_lossy().into_owned(), kind, size));
        }
        entries.sort();
        let mut text = String::new();
        for (name, kind, _) in &entries {
            text.push_str(name);
            text.push_str(match *kind {
                "dir" => "/",
                "symlink" => "@",
                _ => "",
            });
            text.push('\n');
        }
        let entries: Vec<Value> = entries
            .into_iter()
            .map(|(name, kind, size)| json!({ "name": name, "type": kind, "size": size }))
            .collect();
        Ok(ToolOutput::ok(text).with_structured(json!({
            "path": path,
            "entries": entries,
            "truncated": truncated,
        })))
    }
}

/// Says what went wrong without naming the server's own paths.
fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file or directory".to_owned(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        std::io::ErrorKind::NotADirectory => "not a directory".to_owned(),
        std::io::ErrorKind::IsADirectory => "is a directory".to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn tree() -> (tempfile::TempDir, Files) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("data/sub")).unwrap();
        std::fs::write(root.join("data/in.csv"), "id,name\n1,a\n2,b\n").unwrap();
        std::fs::write(dir.path().join("secret.txt"), "outside").unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(dir.path().join("secret.txt"), root.join("data/out"))
                .unwrap();
            std::os::unix::fs::symlink(root.join("data/in.csv"), root.join("data/alias")).unwrap();
        }
        let files = Files::open(&root).unwrap();
        (dir, files)
    }

    #[test]
    fn reads_under_the_root() {
        let (_dir, f) = tree();
        let out = f.read(&json!({"path": "/data/in.csv"})).unwrap();
        assert_eq!(out.text, "id,name\n1,a\n2,b\n");
        let out = f
            .read(&json!({"path": "/data/in.csv", "limit": 2}))
            .unwrap();
        assert_eq!(out.text, "id,name\n1,a\n");
        assert_eq!(out.structured.unwrap()["truncated"], true);
        let out = f.read(&json!({"path": "data/in.csv", "limit": 9})).unwrap();
        assert_eq!(out.structured.unwrap()["truncated"], false);
    }

    #[test]
    fn traversal_is_refused() {
        let (_dir, f) = tree();
        for path in [
            "/../secret.txt",
            "/data/../../secret.txt",
            "../secret.txt",
            "/data/../data/in.csv",
        ] {
            let e = f.read(&json!({ "path": path })).unwrap_err();
            assert!(e.to_string().contains("escapes"), "{path}: {e}");
        }
        #[cfg(unix)]
        {
            let e = f.read(&json!({"path": "/data/out"})).unwrap_err();
            assert!(e.to_string().contains("symlink"), "{e}");
            // A link that stays inside is fine.
            assert!(f.read(&json!({"path": "/data/alias"})).is_ok());
        }
        let e = f.read(&json!({"path": "/etc/passwd"})).unwrap_err();
        assert!(e.to_string().contains("no such file"), "{e}");
        assert!(f.read(&json!({"path": "/data"})).is_err());
        assert!(f.read(&json!({"path": "/data/in.csv", "x": 1})).is_err());
    }

    #[test]
    fn lists_entries() {
        let (_dir, f) = tree();
        let out = f.list(&json!({"path": "/data"})).unwrap();
        assert!(out.text.contains("in.csv\n"), "{}", out.text);
        assert!(out.text.contains("sub/\n"), "{}", out.text);
        let s = out.structured.unwrap();
        let names: Vec<&str> = s["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted);
        assert!(f.list(&json!({"path": "/.."})).is_err());
        assert!(f.list(&json!({"path": "/"})).is_ok());
    }
}
