//! Where a key sits in the config file: key paths, and their line and column.
//!
//! The file is parsed once into `toml`'s spanned document, which both feeds serde and answers
//! "which line holds `clusters.api.timeouts.connect_timeout_ms`?" for errors found after
//! deserialisation (by `validate`), so every error can name file, line and key.

use std::{fmt, ops::Range};

use toml::de::{DeTable, DeValue};

/// A dotted key path, e.g. `clusters.api.endpoints[0]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyPath(Vec<Seg>);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

impl KeyPath {
    pub fn root() -> Self {
        KeyPath(Vec::new())
    }

    /// `KeyPath::parse("router.upstream.timeouts")`; a segment that is a number is an index.
    pub fn parse(dotted: &str) -> Self {
        KeyPath(
            dotted
                .split('.')
                .filter(|s| !s.is_empty())
                .map(|s| match s.parse() {
                    Ok(i) => Seg::Index(i),
                    Err(_) => Seg::Key(s.to_owned()),
                })
                .collect(),
        )
    }

    pub fn key(&self, k: &str) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Key(k.to_owned()));
        p
    }

    pub fn index(&self, i: usize) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// From `serde_path_to_error`'s path of the failing value.
    pub(crate) fn from_serde(path: &serde_path_to_error::Path) -> Self {
        use serde_path_to_error::Segment;
        KeyPath(
            path.iter()
                .filter_map(|s| match s {
                    Segment::Map { key } | Segment::Enum { variant: key } => {
                        Some(Seg::Key(key.clone()))
                    }
                    Segment::Seq { index } => Some(Seg::Index(*index)),
                    Segment::Unknown => None,
                })
                .collect(),
        )
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A 1-based line and column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// The config text and its spanned parse.
pub(crate) struct Source<'a> {
    pub text: &'a str,
    pub doc: Option<toml::Spanned<DeTable<'a>>>,
}

impl<'a> Source<'a> {
    pub fn position(&self, offset: usize) -> Position {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = self.text[line_start..offset].chars().count() + 1;
        Position { line, column }
    }

    /// The text of a 1-based line, for showing next to an error.
    pub fn line_text(&self, line: usize) -> Option<&'a str> {
        self.text.lines().nth(line.checked_sub(1)?)
    }

    /// Span of the deepest part of `path` present in the file: the key for a table entry, the
    /// value for an array element. A default that was not written points at its parent table.
    pub fn span_of(&self, path: &KeyPath) -> Option<Range<usize>> {
        let doc = self.doc.as_ref()?;
        let mut table: Option<&DeTable<'a>> = Some(doc.get_ref());
        let mut value: Option<&DeValue<'a>> = None;
        let mut best: Option<Range<usize>> = None;
        for seg in &path.0 {
            match seg {
                Seg::Key(k) => {
                    let t = match (table, value) {
                        (Some(t), _) => t,
                        (None, Some(v)) => match v.as_table() {
                            Some(t) => t,
                            None => break,
                        },
                        (None, None) => break,
                    };
                    let Some((key, v)) = t.iter().find(|(key, _)| key.get_ref() == k) else {
                        break;
                    };
                    best = Some(key.span());
                    table = None;
                    value = Some(v.get_ref());
                }
                Seg::Index(i) => {
                    let Some(item) = value.and_then(|v| v.as_array()).and_then(|a| a.get(*i))
                    else {
                        break;
                    };
                    best = Some(item.span());
                    table = None;
                    value = Some(item.get_ref());
                }
            }
        }
        best
    }

    pub fn position_of(&self, path: &KeyPath) -> Option<Position> {
        self.span_of(path).map(|s| self.position(s.start))
    }
}
