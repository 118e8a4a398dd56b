//! Errors of document operations.

use super::ops::Path;

/// What can go wrong when editing, merging or loading a document.
#[derive(Debug, thiserror::Error)]
pub enum DocError {
    /// The path does not lead to an existing container.
    #[error("no container at {0}")]
    PathNotFound(Path),
    /// The value at the path has another type than the op needs.
    #[error("{path} is not {expected}")]
    WrongType {
        /// Where.
        path: Path,
        /// What the op needed ("a map", "a list", "text", "a counter").
        expected: &'static str,
    },
    /// A list index past the end.
    #[error("index {index} out of bounds at {path} (length {len})")]
    OutOfBounds {
        /// The list.
        path: Path,
        /// The index asked for.
        index: usize,
        /// The list's length.
        len: usize,
    },
    /// A text position inside a character (between the halves of a UTF-16 surrogate pair).
    #[error("index {index} at {path} splits a character")]
    SplitsCharacter {
        /// The text.
        path: Path,
        /// The position.
        index: usize,
    },
    /// The op cannot be expressed in this kind of document.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A number outside what the CRDT can hold.
    #[error("number out of range: {0}")]
    NumberOutOfRange(String),
    /// Bytes that should hold a change, a snapshot or a sync message did not decode.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// The underlying decoder's message.
        detail: String,
    },
    /// The Automerge library refused an operation (boxed: the library's error is large).
    #[error("automerge: {0}")]
    Automerge(Box<automerge::AutomergeError>),
    /// The peer may only read this document.
    #[error("the peer may only read this document")]
    ReadOnly,
    /// The sync payload belongs to the other CRDT kind.
    #[error("sync payload for {got:?} sent to a {expected:?} document")]
    KindMismatch {
        /// The document's kind.
        expected: super::DocKind,
        /// The payload's kind.
        got: super::DocKind,
    },
}

impl DocError {
    pub(crate) fn malformed(what: &'static str, detail: impl ToString) -> Self {
        DocError::Malformed {
            what,
            detail: detail.to_string(),
        }
    }
}

impl From<automerge::AutomergeError> for DocError {
    fn from(e: automerge::AutomergeError) -> Self {
        DocError::Automerge(Box::new(e))
    }
}
