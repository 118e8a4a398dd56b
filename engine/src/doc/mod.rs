//! Documents: one API over the two CRDT kinds, Automerge and Yrs.
//!
//! A [`Document`] is the unit of ordering (the seed's scope). It can be edited through the small
//! JSON API ([`Op`]) or natively, merges changes from anywhere in any order (idempotently), reports
//! its version (heads or state vector), exports what a peer lacks, and shows its state as JSON.

mod automerge_apply;
mod automerge_doc;
mod automerge_sync;
mod change_hash_set;
mod error;
mod ops;
mod recent_changes;
mod recent_graph;
mod yrs_doc;

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use smallvec::SmallVec;

pub use automerge_doc::AutomergeDoc;
pub use error::DocError;
pub use ops::{Op, Path, Segment};
pub use yrs_doc::{client_id as yrs_client_id, YrsDoc, COUNTER_MARKER};

use crate::ids::{DocumentId, ReplicaId};

/// Which CRDT a document is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DocKind {
    /// An Automerge document.
    Automerge,
    /// A Yrs (Yjs-compatible) document.
    Yrs,
}

impl DocKind {
    /// The kind's wire code.
    pub fn code(self) -> u8 {
        match self {
            DocKind::Automerge => 1,
            DocKind::Yrs => 2,
        }
    }

    /// The kind for a wire code.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(DocKind::Automerge),
            2 => Some(DocKind::Yrs),
            _ => None,
        }
    }
}

impl fmt::Display for DocKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DocKind::Automerge => "automerge",
            DocKind::Yrs => "yrs",
        })
    }
}

/// Identifies a change: the Automerge change hash, or the SHA-256 of a Yrs update as its author
/// sent it. Every replica computes the same id for the same change.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChangeId(pub [u8; 32]);

impl ChangeId {
    /// The SHA-256 of some bytes.
    pub fn of_bytes(bytes: &[u8]) -> Self {
        let digest = Sha256::digest(bytes);
        let mut id = [0u8; 32];
        id.copy_from_slice(&digest);
        Self(id)
    }

    /// The id as lowercase hex.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits.
    pub fn from_hex(hex: &str) -> Option<Self> {
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut id = [0u8; 32];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(id))
    }
}

impl fmt::Debug for ChangeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChangeId({})", &self.to_hex()[..12])
    }
}

impl fmt::Display for ChangeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// One change as it travels and is stored: its id and its encoded bytes (an Automerge change, or
/// a V1 Yrs update).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Its id.
    pub id: ChangeId,
    /// Its bytes, to apply with [`Document::apply_changes`].
    pub bytes: Vec<u8>,
}

/// What a change touched (see [`Document::take_touched_values`]): the value at `path` (a list,
/// a text, or a map key) when `keys` is empty, otherwise the map at `path` at each of `keys`.
#[derive(Clone, Debug, PartialEq)]
pub struct Touched {
    /// The changed value, or the map whose keys changed (shared: a document may hand out the
    /// same path for every change to one map).
    pub path: std::sync::Arc<Path>,
    /// The changed keys of the map at `path` (none: `path` itself changed). Inline for one key,
    /// what a change to a collection almost always sets.
    pub keys: SmallVec<[TouchedKey; 1]>,
}

/// A changed key of a map (see [`Touched`]).
#[derive(Clone, Debug, PartialEq)]
pub struct TouchedKey {
    /// The key (shared with the document's own copy where it has one: Yrs keys are `Arc<str>`).
    pub key: std::sync::Arc<str>,
    /// When the map is a collection given to [`Document::track_entries`] and the document had
    /// the entry at hand: the values of the asked fields as the entry's JSON shows them now, in
    /// the order asked (`None` for a field it lacks). `None`: read the entry.
    pub fields: Option<Fields>,
}

/// The asked fields of a changed entry, in the order asked (see [`TouchedKey::fields`]); inline
/// for up to two, so reporting an entry allocates nothing for them.
pub type Fields = SmallVec<[Option<FieldValue>; 2]>;

/// The value of one field of a changed entry, as its JSON shows it (see [`TouchedKey::fields`]).
///
/// A string is kept apart from other JSON so a document can hand it out without a copy (a Yrs
/// string is an `Arc<str>` in the document); build values with [`FieldValue::from_json`], which
/// never puts a string in [`FieldValue::Json`], so equal values compare equal.
#[derive(Clone, Debug, PartialEq)]
pub enum FieldValue {
    /// A JSON string.
    Text(std::sync::Arc<str>),
    /// Any other JSON value.
    Json(serde_json::Value),
}

impl FieldValue {
    /// The field value for a JSON value (a string becomes [`FieldValue::Text`]).
    pub fn from_json(value: serde_json::Value) -> Self {
        match value {
            serde_json::Value::String(s) => FieldValue::Text(s.into()),
            other => FieldValue::Json(other),
        }
    }

    /// The value as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            FieldValue::Text(s) => serde_json::Value::String(String::from(&**s)),
            FieldValue::Json(value) => value.clone(),
        }
    }
}

/// Buffers of touched paths longer than this are not kept for reuse (a burst of changes would
/// otherwise pin its buffer's memory in every loaded document).
const TOUCHED_KEEP: usize = 32;

/// Empties a buffer of touched paths for reuse, or drops it if it grew past [`TOUCHED_KEEP`].
pub(crate) fn recycle(buffer: &mut Vec<Touched>) {
    if buffer.capacity() > TOUCHED_KEEP {
        *buffer = Vec::new();
    } else {
        buffer.clear();
    }
}

/// The flat list of paths `touched` names.
fn flatten(touched: Vec<Touched>) -> Vec<Path> {
    let mut paths = Vec::new();
    for t in touched {
        if t.keys.is_empty() {
            paths.push(std::sync::Arc::unwrap_or_clone(t.path));
        } else {
            for key in t.keys {
                paths.push(Path::clone(&t.path).key(&*key.key));
            }
        }
    }
    paths
}

/// Whether the path `base` (followed by `key`, when given) and the path `other` overlap: one is
/// the other or lies inside it. Compares without building the joined path.
pub(crate) fn overlaps(base: &[Segment], key: Option<&str>, other: &[Segment]) -> bool {
    let Some(key) = key else {
        return base.starts_with(other) || other.starts_with(base);
    };
    if other.len() <= base.len() {
        // `other` is at most as long as `base`: it must be a prefix of `base`.
        return base.starts_with(other);
    }
    other.starts_with(base) && matches!(&other[base.len()], Segment::Key(k) if k == key)
}

/// A document of either kind.
pub enum Document {
    /// Automerge (boxed: it is much larger than the Yrs handle).
    Automerge(Box<AutomergeDoc>),
    /// Yrs.
    Yrs(YrsDoc),
}

impl Document {
    /// A new empty document of `kind`, edited locally as `replica`.
    pub fn new(kind: DocKind, replica: ReplicaId, id: DocumentId) -> Self {
        match kind {
            DocKind::Automerge => Document::Automerge(Box::new(AutomergeDoc::new(replica))),
            DocKind::Yrs => Document::Yrs(YrsDoc::new(replica, id)),
        }
    }

    /// Loads a document from a snapshot followed by changes (each as saved).
    pub fn load<'a>(
        kind: DocKind,
        replica: ReplicaId,
        id: DocumentId,
        snapshot: Option<&[u8]>,
        changes: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Self, DocError> {
        let mut changes = changes.into_iter().peekable();
        let mut doc = match (kind, snapshot) {
            // Nothing after the snapshot: it is the compacted document, kept for fresh peers.
            (DocKind::Automerge, Some(s)) if changes.peek().is_none() => {
                Document::Automerge(Box::new(AutomergeDoc::load_saved(replica, s.to_vec())?))
            }
            (DocKind::Automerge, Some(s)) => {
                Document::Automerge(Box::new(AutomergeDoc::load(replica, s)?))
            }
            (DocKind::Yrs, Some(s)) => Document::Yrs(YrsDoc::load(replica, id, s)?),
            (kind, None) => Document::new(kind, replica, id),
        };
        for change in changes {
            doc.apply_changes(change)?;
        }
        Ok(doc)
    }

    /// Its kind.
    pub fn kind(&self) -> DocKind {
        match self {
            Document::Automerge(_) => DocKind::Automerge,
            Document::Yrs(_) => DocKind::Yrs,
        }
    }

    /// Applies ops as one local change. `Ok(None)` when they changed nothing. On error nothing is
    /// applied for Automerge; for Yrs, see [`YrsDoc::apply_ops`] (the partial change is returned
    /// inside [`PartialChange`]).
    pub fn apply_ops(&mut self, ops: &[Op]) -> Result<Option<Change>, PartialChange> {
        match self {
            Document::Automerge(d) => d.apply_ops(ops).map_err(|error| PartialChange {
                change: None,
                error,
            }),
            Document::Yrs(d) => match d.apply_ops(ops) {
                (change, Ok(())) => Ok(change),
                (change, Err(error)) => Err(PartialChange { change, error }),
            },
        }
    }

    /// Applies changes from elsewhere (idempotent, any order); returns those that were new.
    pub fn apply_changes(&mut self, bytes: &[u8]) -> Result<Vec<Change>, DocError> {
        match self {
            Document::Automerge(d) => d.apply_changes(bytes),
            Document::Yrs(d) => d.apply_changes(bytes),
        }
    }

    /// The version: Automerge heads, or the V1-encoded Yrs state vector.
    pub fn version(&mut self) -> Version {
        match self {
            Document::Automerge(d) => Version::Heads(d.heads().into_iter().map(|h| h.0).collect()),
            Document::Yrs(d) => Version::StateVector(d.state_vector()),
        }
    }

    /// What a peer at `version` lacks, as bytes for [`Document::apply_changes`].
    pub fn changes_after(&mut self, version: &Version) -> Result<Vec<u8>, DocError> {
        match (self, version) {
            (Document::Automerge(d), Version::Heads(heads)) => {
                let heads: Vec<automerge::ChangeHash> =
                    heads.iter().map(|h| automerge::ChangeHash(*h)).collect();
                Ok(d.changes_after(&heads))
            }
            (Document::Yrs(d), Version::StateVector(sv)) => d.changes_after(sv),
            (doc, _) => Err(DocError::Unsupported(format!(
                "a version of the other kind for a {} document",
                doc.kind()
            ))),
        }
    }

    /// Everything, compacted into one snapshot.
    pub fn save(&mut self) -> Vec<u8> {
        match self {
            Document::Automerge(d) => d.save(),
            Document::Yrs(d) => d.save(),
        }
    }

    /// Drops what the document keeps of its recent changes to send them on quickly (Automerge
    /// keeps their bytes; see `AutomergeDoc::forget_recent_changes`). A relay calls it when every
    /// peer is up to date.
    pub fn forget_recent_changes(&mut self) {
        if let Document::Automerge(d) = self {
            d.forget_recent_changes();
        }
    }

    /// The whole state as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Document::Automerge(d) => d.to_json(),
            Document::Yrs(d) => d.to_json(),
        }
    }

    /// Starts tracking which paths change. For Yrs, only paths under the root maps `roots`.
    pub fn track_changes(&mut self, roots: &[String]) {
        match self {
            Document::Automerge(d) => d.track_changes(),
            Document::Yrs(d) => d.track_changes(roots),
        }
    }

    /// The paths changed (by local edits or merges) since the last call, or `None` when that is
    /// not known (tracking just started, or too much changed): then assume everything changed.
    pub fn take_touched(&mut self) -> Option<Vec<Path>> {
        match self {
            Document::Automerge(d) => d.take_touched(),
            Document::Yrs(d) => d.take_touched(),
        }
    }

    /// Also report the entries a change sets in the map at `collection` with the values of
    /// `fields` ([`TouchedKey::fields`]), when the document has them at hand (Yrs: from the
    /// change's events, instead of a walk from the root and a conversion of the whole entry).
    /// Automerge answers [`Document::get`] for new entries from its decoded changes instead.
    /// A Yrs document reports changes to the collection's map with this very `Arc`
    /// ([`Touched::path`]), so a caller can recognise it by pointer.
    pub fn track_entries(&mut self, collection: &std::sync::Arc<Path>, fields: &[String]) {
        match self {
            Document::Automerge(_) => {}
            Document::Yrs(d) => d.track_entries(collection, fields),
        }
    }

    /// [`Document::take_touched`], grouped by changed map where the document reports maps
    /// (Yrs), with the fields of new entries of collections given to
    /// [`Document::track_entries`].
    pub fn take_touched_values(&mut self) -> Option<Vec<Touched>> {
        match self {
            Document::Automerge(d) => d.take_touched().map(|paths| {
                paths
                    .into_iter()
                    .map(|path| Touched {
                        path: std::sync::Arc::new(path),
                        keys: SmallVec::new(),
                    })
                    .collect()
            }),
            Document::Yrs(d) => d.take_touched_values(),
        }
    }

    /// [`Document::take_touched_values`] into `into` (cleared first), which the document keeps
    /// the old buffer of for the next changes: no allocation per take once both have grown.
    /// Returns `false` when what changed is not known (see [`Document::take_touched`]; `into` is
    /// then empty).
    pub fn take_touched_into(&mut self, into: &mut Vec<Touched>) -> bool {
        match self {
            Document::Yrs(d) => d.take_touched_into(into),
            Document::Automerge(_) => {
                recycle(into);
                match self.take_touched_values() {
                    Some(touched) => {
                        into.extend(touched);
                        true
                    }
                    None => false,
                }
            }
        }
    }

    /// The keys of the map at `path` (for the root: the top-level keys, or Yrs root names).
    pub fn keys(&self, path: &Path) -> Vec<String> {
        match self {
            Document::Automerge(d) => d.keys(path),
            Document::Yrs(d) => d.keys(path),
        }
    }

    /// The value at `path` in the JSON view, if any. Only that subtree is serialized.
    pub fn get(&self, path: &Path) -> Option<serde_json::Value> {
        match self {
            Document::Automerge(d) => d.get_json(path),
            Document::Yrs(d) => d.get_json(path),
        }
    }
}

/// Ops that failed part-way: the error, and what a Yrs document had already applied.
#[derive(Debug)]
pub struct PartialChange {
    /// What was applied before the failing op (Yrs only; Automerge rolls back).
    pub change: Option<Change>,
    /// Why it failed.
    pub error: DocError,
}

/// A document's version: what it has seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Version {
    /// Automerge heads (change hashes).
    Heads(Vec<[u8; 32]>),
    /// A V1-encoded Yrs state vector.
    StateVector(Vec<u8>),
}

#[cfg(test)]
mod tests;
