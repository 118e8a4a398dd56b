//! What the invariant layer writes into a document: resolutions and conflicts, as facts keyed by
//! the violation id.
//!
//! A fact is never a delta: voiding a spend writes `resolution:<id> = {victims: [entry]}`, and
//! derived values (a balance) fold over the entries no resolution voids. Two replicas that repair
//! the same violation write the same key, so the repair takes effect once.
//!
//! Where the facts live: in an Automerge document, root keys `_accord:resolution:<id>` and
//! `_accord:conflict:<id>` (flat keys, because two replicas creating a shared `_accord` map at the
//! same time would make two maps and one would hide the other); in a Yrs document, the root map
//! `_accord` (root maps merge by name) with keys `resolution:<id>` and `conflict:<id>`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::spec::Policy;
use crate::doc::{DocKind, Document, Op, Path};
use crate::ids::DocumentId;

/// Identifies a violation: the same on every replica that saw the same changes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ViolationId(pub [u8; 32]);

impl ViolationId {
    /// The hash of the invariant, the document and the sorted ids of what is involved.
    pub fn compute(invariant: &str, document: DocumentId, involved: &[String]) -> Self {
        let mut sorted: Vec<&String> = involved.iter().collect();
        sorted.sort();
        sorted.dedup();
        let mut hasher = Sha256::new();
        hasher.update((invariant.len() as u64).to_le_bytes());
        hasher.update(invariant.as_bytes());
        hasher.update(document.as_bytes());
        for id in sorted {
            hasher.update((id.len() as u64).to_le_bytes());
            hasher.update(id.as_bytes());
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(&hasher.finalize());
        Self(out)
    }

    /// The first 16 bytes as hex: the key used in documents (128 bits is plenty to be unique
    /// within one document and keeps keys short).
    pub fn key(&self) -> String {
        self.0[..16].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The id a document key names (its first 16 bytes; the rest zero), so that
    /// `from_key(k)?.key() == k`; `None` for anything that is not 32 hex digits.
    pub fn from_key(key: &str) -> Option<Self> {
        if key.len() != 32 || !key.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (at, byte) in out.iter_mut().take(16).enumerate() {
            *byte = u8::from_str_radix(key.get(2 * at..2 * at + 2)?, 16).ok()?;
        }
        Some(Self(out))
    }
}

impl fmt::Debug for ViolationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ViolationId({})", self.key())
    }
}

impl fmt::Display for ViolationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

/// What a resolution did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// The victim entries no longer count (compensate, auto, reject on a collection).
    Void,
    /// The value at the path was set back (or forward) to `value`.
    Restore,
    /// A person chose an option of a conflict.
    Chosen,
}

/// A recorded resolution of one violation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Resolution {
    /// The invariant's id.
    pub invariant: String,
    /// The policy that acted.
    pub policy: Policy,
    /// What it did.
    pub action: Action,
    /// The collection or value concerned.
    pub path: Path,
    /// Entry keys that no longer count.
    #[serde(default)]
    pub victims: Vec<String>,
    /// Ids (hex) of the changes that wrote the victims, so their authors can see what happened.
    #[serde(default)]
    pub victim_changes: Vec<String>,
    /// The value restored or chosen, for value rules.
    #[serde(default)]
    pub value: Option<serde_json::Value>,
    /// Why, in words a user can read.
    pub reason: String,
    /// Who decided: "server", a replica id, or a user.
    pub by: String,
    /// The commit sequence number the decision was based on, when known.
    #[serde(default)]
    pub seq: Option<u64>,
}

/// One choice of a conflict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConflictOption {
    /// The entry this option keeps (for collections).
    #[serde(default)]
    pub entry: Option<String>,
    /// The value it stands for.
    pub value: serde_json::Value,
    /// Who wrote it, when the entry says (`by`, `author` fields).
    #[serde(default)]
    pub author: Option<String>,
    /// When, when the entry says (`at` field; for display only).
    #[serde(default)]
    pub at: Option<serde_json::Value>,
    /// The change that wrote it (hex), when known.
    #[serde(default)]
    pub change: Option<String>,
    /// Its commit sequence number, when known.
    #[serde(default)]
    pub seq: Option<u64>,
}

/// A question for a person: a violation no policy may settle alone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conflict {
    /// The invariant's id.
    pub invariant: String,
    /// The collection or value concerned.
    pub path: Path,
    /// The question, in plain words.
    pub question: String,
    /// The options.
    pub options: Vec<ConflictOption>,
    /// Whether it was escalated after repairs kept failing.
    #[serde(default)]
    pub escalated: bool,
}

/// The facts of a document.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Records {
    /// Resolutions by violation key.
    pub resolutions: BTreeMap<String, Resolution>,
    /// Conflicts by violation key (open while no resolution has the same key).
    pub conflicts: BTreeMap<String, Conflict>,
}

const AUTOMERGE_RESOLUTION: &str = "_accord:resolution:";
const AUTOMERGE_CONFLICT: &str = "_accord:conflict:";
const YRS_ROOT: &str = "_accord";
const YRS_RESOLUTION: &str = "resolution:";
const YRS_CONFLICT: &str = "conflict:";

fn record_path(kind: DocKind, prefix_automerge: &str, prefix_yrs: &str, key: &str) -> Path {
    match kind {
        DocKind::Automerge => Path::keys([format!("{prefix_automerge}{key}")]),
        DocKind::Yrs => Path::keys([YRS_ROOT.to_owned(), format!("{prefix_yrs}{key}")]),
    }
}

/// The op that records `resolution` under `id`.
pub fn resolution_op(kind: DocKind, id: &ViolationId, resolution: &Resolution) -> Op {
    Op::Put {
        path: record_path(kind, AUTOMERGE_RESOLUTION, YRS_RESOLUTION, &id.key()),
        value: serde_json::to_value(resolution).unwrap_or(serde_json::Value::Null),
    }
}

/// The op that records `conflict` under `id`.
pub fn conflict_op(kind: DocKind, id: &ViolationId, conflict: &Conflict) -> Op {
    Op::Put {
        path: record_path(kind, AUTOMERGE_CONFLICT, YRS_CONFLICT, &id.key()),
        value: serde_json::to_value(conflict).unwrap_or(serde_json::Value::Null),
    }
}

const AUTOMERGE_TYPE: &str = "_accord:type";
const YRS_TYPE: &str = "type";

fn type_path(kind: DocKind) -> Path {
    match kind {
        DocKind::Automerge => Path::keys([AUTOMERGE_TYPE]),
        DocKind::Yrs => Path::keys([YRS_ROOT, YRS_TYPE]),
    }
}

/// The op that declares a document's type (which [`super::Schema`] governs it). Write it once,
/// when the document is created.
pub fn type_op(kind: DocKind, document_type: &str) -> Op {
    Op::Put {
        path: type_path(kind),
        value: serde_json::Value::String(document_type.to_owned()),
    }
}

/// The document's declared type, if any.
pub fn read_type(doc: &Document) -> Option<String> {
    doc.get(&type_path(doc.kind()))
        .and_then(|v| v.as_str().map(str::to_owned))
}

/// Whether a top-level key (Automerge) or root name (Yrs) belongs to the invariant layer.
pub fn is_reserved(key: &str) -> bool {
    key == YRS_ROOT || key.starts_with("_accord:")
}

/// Reads every resolution and conflict of a document. Records that do not parse (written by a
/// newer or broken replica) are skipped, never fatal.
pub fn read_records(doc: &Document) -> Records {
    let mut records = Records::default();
    let (base, resolution_prefix, conflict_prefix) = match doc.kind() {
        DocKind::Automerge => (Path::root(), AUTOMERGE_RESOLUTION, AUTOMERGE_CONFLICT),
        DocKind::Yrs => (Path::keys([YRS_ROOT]), YRS_RESOLUTION, YRS_CONFLICT),
    };
    for key in doc.keys(&base) {
        let path = base.clone().key(key.clone());
        if let Some(id) = key.strip_prefix(resolution_prefix) {
            if let Some(r) = doc.get(&path).and_then(|v| serde_json::from_value(v).ok()) {
                records.resolutions.insert(id.to_owned(), r);
            }
        } else if let Some(id) = key.strip_prefix(conflict_prefix) {
            if let Some(c) = doc.get(&path).and_then(|v| serde_json::from_value(v).ok()) {
                records.conflicts.insert(id.to_owned(), c);
            }
        }
    }
    records
}

impl Records {
    /// The entries of the collection at `path` that resolutions voided.
    pub fn voided(&self, path: &Path) -> BTreeSet<&str> {
        self.resolutions
            .values()
            .filter(|r| &r.path == path && matches!(r.action, Action::Void | Action::Chosen))
            .flat_map(|r| r.victims.iter().map(String::as_str))
            .collect()
    }

    /// Conflicts no resolution has closed yet.
    pub fn open_conflicts(&self) -> impl Iterator<Item = (&String, &Conflict)> {
        self.conflicts
            .iter()
            .filter(|(id, _)| !self.resolutions.contains_key(*id))
    }

    /// The resolutions that voided or overrode what the change `change` (hex id) wrote.
    pub fn affecting_change<'a>(
        &'a self,
        change: &'a str,
    ) -> impl Iterator<Item = (&'a String, &'a Resolution)> {
        self.resolutions
            .iter()
            .filter(move |(_, r)| r.victim_changes.iter().any(|c| c == change))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_violation_key_names_its_id_and_nothing_else_parses() {
        let id = ViolationId::compute("seat-once", DocumentId::from_bytes([3; 16]), &["a".into()]);
        let key = id.key();
        let back = ViolationId::from_key(&key).unwrap();
        assert_eq!(back.key(), key);
        for bad in [
            "",
            "zz",
            &key[..30],
            &format!("{key}00"),
            &key.replace(&key[..2], "g1"),
        ] {
            assert!(ViolationId::from_key(bad).is_none(), "{bad:?}");
        }
        // Not ASCII, though 32 bytes long: refused, not a panic on a char boundary.
        assert!(ViolationId::from_key("é0000000000000000000000000000000").is_none());
    }
}
