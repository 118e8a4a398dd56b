//! The small path-based JSON editing API shared by both CRDT kinds.
//!
//! A [`Path`] names a place in a document as a list of map keys and list indexes. An [`Op`] is
//! one edit at a path. Ops serialize to JSON (`{"op":"put","path":["seats","12A"],"value":"ana"}`)
//! so back ends that hold no replica can send them over the REST API.
//!
//! Text positions count UTF-16 code units, as JavaScript, Yjs and Automerge-JS do, so an index
//! means the same thing in every client.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One step of a [`Path`]: a key in a map or a position in a list.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Segment {
    /// A key of a map.
    Key(String),
    /// A position in a list.
    Index(usize),
}

/// A place in a document: map keys and list indexes from the root.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Path(pub Vec<Segment>);

impl Path {
    /// The root of the document.
    pub fn root() -> Self {
        Self(Vec::new())
    }

    /// Builds a path of map keys only, the common case: `Path::keys(["wallet", "entries"])`.
    pub fn keys<I, S>(keys: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self(keys.into_iter().map(|k| Segment::Key(k.into())).collect())
    }

    /// This path extended by one map key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.0.push(Segment::Key(key.into()));
        self
    }

    /// This path extended by one list index.
    pub fn index(mut self, index: usize) -> Self {
        self.0.push(Segment::Index(index));
        self
    }

    /// The segments from the root.
    pub fn segments(&self) -> &[Segment] {
        &self.0
    }

    /// The parent path and the last segment, or `None` at the root.
    pub fn split_last(&self) -> Option<(&[Segment], &Segment)> {
        self.0.split_last().map(|(last, parent)| (parent, last))
    }

    /// Whether `self` is `other` or lies inside it.
    pub fn starts_with(&self, other: &Path) -> bool {
        self.0.starts_with(&other.0)
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("/");
        }
        for segment in &self.0 {
            match segment {
                Segment::Key(key) => write!(f, "/{}", key.replace('~', "~0").replace('/', "~1"))?,
                Segment::Index(index) => write!(f, "/{index}")?,
            }
        }
        Ok(())
    }
}

impl<S: Into<String>> FromIterator<S> for Path {
    fn from_iter<T: IntoIterator<Item = S>>(iter: T) -> Self {
        Path::keys(iter)
    }
}

/// One edit of a document through the JSON API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Sets the value at `path` (a map key, or an existing list position). Objects and arrays
    /// become nested maps and lists; strings become plain (not collaborative) strings.
    Put {
        /// Where to write; the parent must exist.
        path: Path,
        /// The JSON value to write.
        value: serde_json::Value,
    },
    /// Removes the map key or list element at `path`.
    Delete {
        /// What to remove.
        path: Path,
    },
    /// Inserts `value` into the list at `path` before position `index` (`index == len` appends).
    Insert {
        /// The list.
        path: Path,
        /// Where to insert.
        index: usize,
        /// The JSON value to insert.
        value: serde_json::Value,
    },
    /// Adds `by` to the counter at `path`, creating a counter at 0 when the key is missing.
    /// Concurrent increments add up on every replica.
    Increment {
        /// The counter.
        path: Path,
        /// How much to add (negative subtracts).
        by: i64,
    },
    /// Edits the collaborative text at `path` (created empty when the key is missing): deletes
    /// `delete` units at `index`, then inserts `insert` there.
    Splice {
        /// The text.
        path: Path,
        /// Position in UTF-16 code units.
        index: usize,
        /// How many UTF-16 code units to delete.
        delete: usize,
        /// What to insert.
        #[serde(default)]
        insert: String,
    },
}

impl Op {
    /// The path this op writes at.
    pub fn path(&self) -> &Path {
        match self {
            Op::Put { path, .. }
            | Op::Delete { path }
            | Op::Insert { path, .. }
            | Op::Increment { path, .. }
            | Op::Splice { path, .. } => path,
        }
    }
}

/// Whether UTF-16 position `index` of `text` falls between the two halves of a surrogate pair
/// (inside one character). Splitting there would corrupt the text, so splices refuse it.
pub(crate) fn splits_character(text: &str, index: usize) -> bool {
    let mut at = 0;
    for c in text.chars() {
        if at >= index {
            return false;
        }
        at += c.len_utf16();
        if at > index {
            return true;
        }
    }
    false
}

/// Whether a string holds characters outside the Basic Multilingual Plane.
pub(crate) fn has_astral(text: &str) -> bool {
    text.chars().any(|c| c.len_utf16() == 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn surrogate_pairs_are_not_split() {
        assert!(splits_character("a🙂b", 2));
        assert!(!splits_character("a🙂b", 1));
        assert!(!splits_character("a🙂b", 3));
        assert!(!splits_character("a🙂b", 4));
    }

    #[test]
    fn ops_round_trip_through_json() {
        let op: Op = serde_json::from_str(r#"{"op":"put","path":["seats","12A"],"value":"ana"}"#)
            .expect("parse");
        assert_eq!(
            op,
            Op::Put {
                path: Path::keys(["seats", "12A"]),
                value: serde_json::json!("ana"),
            }
        );
        let splice: Op = serde_json::from_str(
            r#"{"op":"splice","path":["notes"],"index":0,"delete":0,"insert":"hi"}"#,
        )
        .expect("parse");
        assert_eq!(splice.path().to_string(), "/notes");
        let list: Op =
            serde_json::from_str(r#"{"op":"delete","path":["items",2]}"#).expect("parse");
        assert_eq!(list.path().segments()[1], Segment::Index(2));
    }
}
