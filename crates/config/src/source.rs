//! Source positions for configuration findings.
//!
//! serde gives us typed structs but forgets where each value came from. To
//! name `portcullis.toml:42 agents[1].tools[3]` in a finding, we keep a second,
//! untyped view of the document: a tree of keys and array items with their
//! byte spans, built once from `toml`'s spanned parser. Lookups go both ways:
//! key path → line (semantic findings) and byte offset → key path (serde
//! errors, which know the offset but not the path).

use std::fmt;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// A table key.
    Key(String),
    /// An array index.
    Index(usize),
}

/// A path to a value in the document, e.g. `agents[1].tools[3]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(Vec<Segment>);

impl KeyPath {
    /// The document root.
    pub const fn root() -> Self {
        Self(Vec::new())
    }

    /// This path extended by a key.
    #[must_use]
    pub fn key(&self, key: impl Into<String>) -> Self {
        let mut next = self.0.clone();
        next.push(Segment::Key(key.into()));
        Self(next)
    }

    /// This path extended by an array index.
    #[must_use]
    pub fn index(&self, index: usize) -> Self {
        let mut next = self.0.clone();
        next.push(Segment::Index(index));
        Self(next)
    }

    /// The segments, outermost first.
    pub fn segments(&self) -> &[Segment] {
        &self.0
    }

    /// True for the document root.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) => {
                    if n > 0 {
                        f.write_str(".")?;
                    }
                    let bare = !key.is_empty()
                        && key
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                    if bare {
                        f.write_str(key)?;
                    } else {
                        write!(f, "{key:?}")?;
                    }
                }
                Segment::Index(i) => write!(f, "[{i}]")?,
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum Node {
    Table(Vec<(String, Range<usize>, Node)>),
    Array(Vec<(Range<usize>, Node)>),
    Leaf,
}

impl Node {
    /// The node for `value`, and the byte range that it and everything
    /// nested in it cover. (A table header's span covers only the header;
    /// the extent is what a lookup by offset needs.)
    fn from_value(value: &Spanned<DeValue<'_>>) -> (Self, Range<usize>) {
        let mut extent = value.span();
        let node = match value.get_ref() {
            DeValue::Table(table) => {
                let (node, inner) = Self::from_table(table);
                extent = union(&extent, &inner);
                node
            }
            DeValue::Array(items) => Self::Array(
                items
                    .iter()
                    .map(|item| {
                        let (child, inner) = Self::from_value(item);
                        extent = union(&extent, &inner);
                        (inner, child)
                    })
                    .collect(),
            ),
            _ => Self::Leaf,
        };
        (node, extent)
    }

    fn from_table(table: &DeTable<'_>) -> (Self, Range<usize>) {
        let mut extent: Option<Range<usize>> = None;
        let entries = table
            .iter()
            .map(|(key, value)| {
                let (child, inner) = Self::from_value(value);
                let span = union(&key.span(), &inner);
                extent = Some(match &extent {
                    Some(e) => union(e, &span),
                    None => span.clone(),
                });
                (key.get_ref().to_string(), span, child)
            })
            .collect();
        (Self::Table(entries), extent.unwrap_or(0..0))
    }
}

fn union(a: &Range<usize>, b: &Range<usize>) -> Range<usize> {
    a.start.min(b.start)..a.end.max(b.end)
}

/// A parsed configuration text with the positions of its keys.
#[derive(Debug, Clone)]
pub struct SourceMap {
    root: Node,
    line_starts: Vec<usize>,
}

impl SourceMap {
    /// Builds the map of `text`; `None` when the text is not valid TOML (the
    /// caller reports the syntax error, which carries its own position).
    pub fn new(text: &str) -> Option<Self> {
        let table: Spanned<DeTable<'_>> = DeTable::parse(text).ok()?;
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Some(Self {
            root: Node::from_table(table.get_ref()).0,
            line_starts,
        })
    }

    /// A map that knows no positions, for configs built in code.
    pub fn empty() -> Self {
        Self {
            root: Node::Leaf,
            line_starts: vec![0],
        }
    }

    /// The 1-based line of byte `offset`.
    pub fn line_of(&self, offset: usize) -> usize {
        self.line_starts.partition_point(|&start| start <= offset)
    }

    /// The 1-based line where the value at `path` (or its nearest existing
    /// ancestor) starts.
    pub fn line(&self, path: &KeyPath) -> Option<usize> {
        self.span(path).map(|span| self.line_of(span.start))
    }

    /// The span of the value at `path`, or of its nearest existing ancestor.
    pub fn span(&self, path: &KeyPath) -> Option<Range<usize>> {
        let mut node = &self.root;
        let mut found = None;
        for segment in path.segments() {
            let next = match (node, segment) {
                (Node::Table(entries), Segment::Key(key)) => entries
                    .iter()
                    .find(|(k, _, _)| k == key)
                    .map(|(_, span, child)| (span.clone(), child)),
                (Node::Array(items), Segment::Index(i)) => {
                    items.get(*i).map(|(span, child)| (span.clone(), child))
                }
                _ => None,
            };
            match next {
                Some((span, child)) => {
                    found = Some(span);
                    node = child;
                }
                None => break,
            }
        }
        found
    }

    /// The deepest key path whose value covers byte `offset`.
    pub fn path_at(&self, offset: usize) -> KeyPath {
        let mut path = KeyPath::root();
        let mut node = &self.root;
        loop {
            let next = match node {
                Node::Table(entries) => entries
                    .iter()
                    .find(|(_, span, _)| span.contains(&offset))
                    .map(|(key, _, child)| (Segment::Key(key.clone()), child)),
                Node::Array(items) => items
                    .iter()
                    .position(|(span, _)| span.contains(&offset))
                    .and_then(|i| items.get(i).map(|(_, child)| (Segment::Index(i), child))),
                Node::Leaf => None,
            };
            match next {
                Some((segment, child)) => {
                    path.0.push(segment);
                    node = child;
                }
                None => return path,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "[server]\nlisten = \"x\"\n\n[[agents]]\nid = \"a\"\ntools = [\"t1\",\n  \"t2\"]\n\n[[agents]]\nid = \"b\"\n";

    #[test]
    fn path_to_line() {
        let map = SourceMap::new(DOC).unwrap_or_else(SourceMap::empty);
        let p = KeyPath::root().key("agents").index(0).key("tools").index(1);
        assert_eq!(map.line(&p), Some(7));
        assert_eq!(p.to_string(), "agents[0].tools[1]");
        assert_eq!(
            map.line(&KeyPath::root().key("agents").index(1).key("id")),
            Some(10)
        );
        assert_eq!(
            map.line(&KeyPath::root().key("server").key("listen")),
            Some(2)
        );
    }

    #[test]
    fn offset_to_path() {
        let map = SourceMap::new(DOC).unwrap_or_else(SourceMap::empty);
        let offset = DOC.find("\"t2\"").unwrap_or(0);
        assert_eq!(map.path_at(offset).to_string(), "agents[0].tools[1]");
    }

    #[test]
    fn quoted_keys_display() {
        let p = KeyPath::root()
            .key("agents")
            .index(0)
            .key("limits")
            .key("per_tool")
            .key("wh.insert");
        assert_eq!(p.to_string(), "agents[0].limits.per_tool.\"wh.insert\"");
    }
}
