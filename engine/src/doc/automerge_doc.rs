//! The Automerge side of [`crate::Document`].

use automerge::sync::SyncDoc;
use automerge::transaction::Transactable;
use automerge::{
    AutoCommit, ChangeHash, LoadOptions, ObjId, ObjType, Prop, ReadDoc, ScalarValue, TextEncoding,
    Value, ROOT,
};

use super::error::DocError;
use super::ops::{Op, Path, Segment};
use super::{Change, ChangeId};
use crate::ids::ReplicaId;

/// Text positions count UTF-16 code units, as JavaScript does.
const TEXT_ENCODING: TextEncoding = TextEncoding::Utf16CodeUnit;

/// An Automerge document with the replica's actor id.
pub struct AutomergeDoc {
    doc: AutoCommit,
    /// Whether changed paths are being tracked (the diff cursor is on).
    tracking: bool,
    /// Whether texts may hold characters outside the BMP, so splice positions must be checked
    /// against surrogate pairs (a scan of the text, skipped while it is known to be BMP-only).
    astral: bool,
}

impl AutomergeDoc {
    /// A new empty document whose local changes carry `replica` as actor.
    pub fn new(replica: ReplicaId) -> Self {
        let doc = AutoCommit::new_with_encoding(TEXT_ENCODING)
            .with_actor(automerge::ActorId::from(replica.as_bytes().as_slice()));
        Self {
            doc,
            tracking: false,
            astral: false,
        }
    }

    /// Loads a saved document (snapshot and/or changes concatenated).
    pub fn load(replica: ReplicaId, bytes: &[u8]) -> Result<Self, DocError> {
        let options = LoadOptions::new().text_encoding(TEXT_ENCODING);
        let doc = AutoCommit::load_with_options(bytes, options)
            .map_err(|e| DocError::malformed("automerge document", e))?
            .with_actor(automerge::ActorId::from(replica.as_bytes().as_slice()));
        Ok(Self {
            doc,
            tracking: false,
            astral: true,
        })
    }

    /// Direct access to the Automerge document, for apps that need all of it. Changes made here
    /// are picked up by [`crate::Replica::change_native`] when it commits.
    pub fn native(&mut self) -> &mut AutoCommit {
        self.astral = true;
        &mut self.doc
    }

    /// Read-only access to the Automerge document.
    pub fn native_ref(&self) -> &AutoCommit {
        &self.doc
    }

    /// Applies ops in one change. Returns `None` when they changed nothing.
    pub fn apply_ops(&mut self, ops: &[Op]) -> Result<Option<Change>, DocError> {
        for op in ops {
            if let Op::Splice { insert, .. } = op {
                self.astral |= super::ops::has_astral(insert);
            }
            if let Err(e) = apply_op(&mut self.doc, op, self.astral) {
                self.doc.rollback();
                return Err(e);
            }
        }
        Ok(self.commit())
    }

    /// Commits whatever is pending in the native document as one change.
    pub fn commit(&mut self) -> Option<Change> {
        let hash = self.doc.commit()?;
        let change = self.doc.get_change_by_hash(&hash)?;
        Some(Change {
            id: ChangeId(hash.0),
            bytes: change.raw_bytes().to_vec(),
        })
    }

    /// Applies changes (or a saved document) from elsewhere; returns the changes that were new.
    pub fn apply_changes(&mut self, bytes: &[u8]) -> Result<Vec<Change>, DocError> {
        let before = self.doc.get_heads();
        self.astral = true;
        self.doc
            .load_incremental(bytes)
            .map_err(|e| DocError::malformed("automerge change", e))?;
        Ok(self.changes_since(&before))
    }

    fn changes_since(&mut self, before: &[ChangeHash]) -> Vec<Change> {
        if self.doc.get_heads() == before {
            return Vec::new();
        }
        self.doc
            .get_changes(before)
            .into_iter()
            .map(|c| Change {
                id: ChangeId(c.hash().0),
                bytes: c.raw_bytes().to_vec(),
            })
            .collect()
    }

    /// The current heads.
    pub fn heads(&mut self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// Everything, compacted.
    pub fn save(&mut self) -> Vec<u8> {
        self.doc.save()
    }

    /// The changes a peer that has `heads` lacks.
    pub fn changes_after(&mut self, heads: &[ChangeHash]) -> Vec<u8> {
        self.doc.save_after(heads)
    }

    /// A JSON view of the whole document.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(automerge::AutoSerde::from(&self.doc))
            .unwrap_or(serde_json::Value::Null)
    }

    /// The JSON of the value at `path` only (walks there and serializes that subtree).
    pub fn get_json(&self, path: &Path) -> Option<serde_json::Value> {
        let Some((parent, last)) = path.split_last() else {
            return Some(self.to_json());
        };
        let obj = resolve(&self.doc, parent, path).ok()?;
        let (value, id) = self.doc.get(&obj, prop(last)).ok()??;
        Some(value_to_json(&self.doc, &value, &id))
    }

    /// Starts tracking which paths change (Automerge's indexed diff cursor).
    pub fn track_changes(&mut self) {
        if !self.tracking {
            self.doc.update_diff_cursor();
            self.tracking = !self.doc.diff_cursor().is_empty();
        }
    }

    /// The paths changed since the last call, or `None` when tracking was not on (then
    /// everything must be assumed changed, and tracking starts now).
    pub fn take_touched(&mut self) -> Option<Vec<Path>> {
        if !self.tracking {
            self.track_changes();
            return None;
        }
        let patches = self.doc.diff_incremental();
        Some(patches.iter().map(patch_path).collect())
    }

    /// The keys of the map at `path` (the root's keys for the root path).
    pub fn keys(&self, path: &Path) -> Vec<String> {
        let obj = match resolve(&self.doc, path.segments(), path) {
            Ok(obj) => obj,
            Err(_) => return Vec::new(),
        };
        match self.doc.object_type(&obj) {
            Ok(ObjType::Map) | Ok(ObjType::Table) => self.doc.keys(&obj).collect(),
            _ => Vec::new(),
        }
    }

    /// Produces the next Automerge sync message for a peer, if one is due.
    pub fn generate_sync_message(&mut self, state: &mut automerge::sync::State) -> Option<Vec<u8>> {
        self.doc
            .sync()
            .generate_sync_message(state)
            .map(|m| m.encode())
    }

    /// Applies a sync message from a peer; returns the changes that were new here.
    pub fn receive_sync_message(
        &mut self,
        state: &mut automerge::sync::State,
        bytes: &[u8],
    ) -> Result<Vec<Change>, DocError> {
        let message = automerge::sync::Message::decode(bytes)
            .map_err(|e| DocError::malformed("automerge sync message", e))?;
        let before = self.doc.get_heads();
        self.astral = true;
        self.doc
            .sync()
            .receive_sync_message(state, message)
            .map_err(|e| DocError::malformed("automerge sync message", e))?;
        Ok(self.changes_since(&before))
    }

    /// Every value written concurrently at `path` (Automerge keeps them all), with the change that
    /// wrote each, winner first.
    pub fn conflicts_at(
        &self,
        path: &Path,
    ) -> Result<Vec<(serde_json::Value, ChangeId)>, DocError> {
        let Some((parent, last)) = path.split_last() else {
            return Ok(Vec::new());
        };
        let obj = resolve(&self.doc, parent, path)?;
        let values = self.doc.get_all(&obj, prop(last))?;
        let mut out = Vec::with_capacity(values.len());
        for (value, id) in values {
            let json = match &value {
                Value::Scalar(s) => scalar_to_json(s),
                Value::Object(_) => serde_json::Value::Null,
            };
            if let Some(hash) = self.doc.hash_for_opid(&id) {
                out.push((json, ChangeId(hash.0)));
            }
        }
        Ok(out)
    }
}

/// The path a patch touched: the object's path, plus the key or index it changed.
fn patch_path(patch: &automerge::Patch) -> Path {
    use automerge::PatchAction as A;
    let mut path = Path(patch.path.iter().map(|(_, p)| segment(p)).collect());
    let last = match &patch.action {
        A::PutMap { key, .. } | A::DeleteMap { key } => Some(Segment::Key(key.clone())),
        A::Increment { prop, .. } | A::Conflict { prop } => Some(segment(prop)),
        A::PutSeq { index, .. } | A::Insert { index, .. } | A::DeleteSeq { index, .. } => {
            Some(Segment::Index(*index))
        }
        A::SpliceText { .. } | A::Mark { .. } => None,
    };
    path.0.extend(last);
    path
}

fn segment(prop: &Prop) -> Segment {
    match prop {
        Prop::Map(key) => Segment::Key(key.clone()),
        Prop::Seq(index) => Segment::Index(*index),
    }
}

fn prop(segment: &Segment) -> Prop {
    match segment {
        Segment::Key(key) => Prop::Map(key.clone()),
        Segment::Index(index) => Prop::Seq(*index),
    }
}

/// Walks `segments` from the root to a container.
fn resolve(doc: &AutoCommit, segments: &[Segment], full: &Path) -> Result<ObjId, DocError> {
    let mut obj = ROOT;
    for segment in segments {
        match doc.get(&obj, prop(segment))? {
            Some((Value::Object(_), id)) => obj = id,
            _ => return Err(DocError::PathNotFound(full.clone())),
        }
    }
    Ok(obj)
}

fn apply_op(doc: &mut AutoCommit, op: &Op, check_characters: bool) -> Result<(), DocError> {
    match op {
        Op::Put { path, value } => {
            let (parent, last) = path.split_last().ok_or_else(|| {
                DocError::Unsupported("put at the root; put its keys instead".into())
            })?;
            let obj = resolve(doc, parent, path)?;
            if let Segment::Index(index) = last {
                check_index(doc, &obj, path, *index, false)?;
            }
            put_json(doc, &obj, prop(last), value, false)
        }
        Op::Delete { path } => {
            let (parent, last) = path
                .split_last()
                .ok_or_else(|| DocError::Unsupported("delete of the root".into()))?;
            let obj = resolve(doc, parent, path)?;
            if let Segment::Index(index) = last {
                check_index(doc, &obj, path, *index, false)?;
            }
            doc.delete(&obj, prop(last))?;
            Ok(())
        }
        Op::Insert { path, index, value } => {
            let obj = resolve(doc, path.segments(), path)?;
            if doc.object_type(&obj)? != ObjType::List {
                return Err(DocError::WrongType {
                    path: path.clone(),
                    expected: "a list",
                });
            }
            check_index(doc, &obj, path, *index, true)?;
            put_json(doc, &obj, Prop::Seq(*index), value, true)
        }
        Op::Increment { path, by } => {
            let (parent, last) = path
                .split_last()
                .ok_or_else(|| DocError::Unsupported("increment of the root".into()))?;
            let obj = resolve(doc, parent, path)?;
            match doc.get(&obj, prop(last))? {
                Some((Value::Scalar(s), _)) if matches!(s.as_ref(), ScalarValue::Counter(_)) => {}
                None => doc.put(&obj, prop(last), ScalarValue::counter(0))?,
                Some(_) => {
                    return Err(DocError::WrongType {
                        path: path.clone(),
                        expected: "a counter",
                    })
                }
            }
            doc.increment(&obj, prop(last), *by)?;
            Ok(())
        }
        Op::Splice {
            path,
            index,
            delete,
            insert,
        } => {
            let (parent, last) = path
                .split_last()
                .ok_or_else(|| DocError::Unsupported("splice at the root".into()))?;
            let obj = resolve(doc, parent, path)?;
            let text = match doc.get(&obj, prop(last))? {
                Some((Value::Object(ObjType::Text), id)) => id,
                None => doc.put_object(&obj, prop(last), ObjType::Text)?,
                Some(_) => {
                    return Err(DocError::WrongType {
                        path: path.clone(),
                        expected: "text",
                    })
                }
            };
            let len = doc.length(&text);
            if *index > len || index + delete > len {
                return Err(DocError::OutOfBounds {
                    path: path.clone(),
                    index: index + delete,
                    len,
                });
            }
            if check_characters {
                let current = doc.text(&text)?;
                for at in [*index, index + delete] {
                    if super::ops::splits_character(&current, at) {
                        return Err(DocError::SplitsCharacter {
                            path: path.clone(),
                            index: at,
                        });
                    }
                }
            }
            let delete = isize::try_from(*delete)
                .map_err(|_| DocError::NumberOutOfRange(delete.to_string()))?;
            doc.splice_text(&text, *index, delete, insert)?;
            Ok(())
        }
    }
}

fn check_index(
    doc: &AutoCommit,
    obj: &ObjId,
    path: &Path,
    index: usize,
    inserting: bool,
) -> Result<(), DocError> {
    let len = doc.length(obj);
    let ok = if inserting { index <= len } else { index < len };
    if ok {
        Ok(())
    } else {
        Err(DocError::OutOfBounds {
            path: path.clone(),
            index,
            len,
        })
    }
}

/// Writes a JSON value at `prop` of `obj`; `insert` inserts into a list instead of overwriting.
fn put_json(
    doc: &mut AutoCommit,
    obj: &ObjId,
    prop: Prop,
    value: &serde_json::Value,
    insert: bool,
) -> Result<(), DocError> {
    use serde_json::Value as J;
    let object = match value {
        J::Object(_) => Some(ObjType::Map),
        J::Array(_) => Some(ObjType::List),
        _ => None,
    };
    let child = match (object, &prop) {
        (Some(kind), Prop::Seq(index)) if insert => Some(doc.insert_object(obj, *index, kind)?),
        (Some(kind), _) => Some(doc.put_object(obj, prop.clone(), kind)?),
        (None, Prop::Seq(index)) if insert => {
            doc.insert(obj, *index, json_to_scalar(value)?)?;
            None
        }
        (None, _) => {
            doc.put(obj, prop.clone(), json_to_scalar(value)?)?;
            None
        }
    };
    match (value, child) {
        (J::Object(map), Some(child)) => {
            for (key, v) in map {
                put_json(doc, &child, Prop::Map(key.clone()), v, false)?;
            }
        }
        (J::Array(items), Some(child)) => {
            for (i, v) in items.iter().enumerate() {
                put_json(doc, &child, Prop::Seq(i), v, true)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn json_to_scalar(value: &serde_json::Value) -> Result<ScalarValue, DocError> {
    use serde_json::Value as J;
    Ok(match value {
        J::Null => ScalarValue::Null,
        J::Bool(b) => ScalarValue::Boolean(*b),
        J::Number(n) => {
            if let Some(i) = n.as_i64() {
                ScalarValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                ScalarValue::Uint(u)
            } else if let Some(f) = n.as_f64() {
                ScalarValue::F64(f)
            } else {
                return Err(DocError::NumberOutOfRange(n.to_string()));
            }
        }
        J::String(s) => ScalarValue::Str(s.as_str().into()),
        J::Object(_) | J::Array(_) => {
            return Err(DocError::Unsupported(
                "nested value where a scalar was expected".into(),
            ))
        }
    })
}

fn value_to_json(doc: &AutoCommit, value: &Value<'_>, id: &ObjId) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        Value::Scalar(s) => scalar_to_json(s),
        Value::Object(ObjType::Text) => J::String(doc.text(id).unwrap_or_default()),
        Value::Object(ObjType::List) => J::Array(
            (0..doc.length(id))
                .filter_map(|i| doc.get(id, i).ok().flatten())
                .map(|(v, child)| value_to_json(doc, &v, &child))
                .collect(),
        ),
        Value::Object(_) => J::Object(
            doc.keys(id)
                .filter_map(|k| {
                    let (v, child) = doc.get(id, k.as_str()).ok().flatten()?;
                    Some((k, value_to_json(doc, &v, &child)))
                })
                .collect(),
        ),
    }
}

fn scalar_to_json(value: &ScalarValue) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}
