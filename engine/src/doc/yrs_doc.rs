//! The Yrs (Yjs-compatible) side of [`crate::Document`].
//!
//! A Yrs document's top level holds named shared types (maps, arrays, texts), not plain values,
//! so the first segment of every path names a root type: `["wallet", "balance"]` is the key
//! `balance` of the root map `wallet`. Yrs has no counter type; a counter is a map holding one
//! total per writer plus the marker key `$counter`, which the JSON view shows as the sum, so
//! concurrent increments add up as they do in Automerge.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use yrs::types::ToJson;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{
    Any, Array, ArrayPrelim, ArrayRef, Doc, GetString, In, Map, MapPrelim, MapRef, Number,
    OffsetKind, Options, Out, ReadTxn, StateVector, Text, TextRef, Transact, TransactionMut,
    Update, WriteTxn,
};

use super::error::DocError;
use super::ops::{Op, Path, Segment};
use super::{Change, ChangeId, FieldValue, Fields, Touched, TouchedKey};
use crate::ids::{DocumentId, ReplicaId};

/// What the deep observers collected since the last take: the changed paths, bounded (past the
/// limit only "many" is remembered), and the collections whose changed entries are reported with
/// their fields.
#[derive(Debug, Default)]
struct Tracker {
    touched: Vec<Touched>,
    /// Paths in `touched` (a group counts each of its keys).
    paths: usize,
    overflow: bool,
    /// Where in `touched` a key carries fields (group, key), for invalidation.
    valued: Vec<(usize, usize)>,
    /// Collections (map paths) whose changed entries are reported with these fields; a change
    /// to one is reported with this `Arc` as its path.
    entries: Vec<(Arc<Path>, Vec<String>)>,
    /// The paths of maps seen changing, by branch id, each with the index in `entries` of the
    /// collection it is (if it is one). A map nested in maps stays at one path for good (its
    /// item's parent and key never change), so its path is built once instead of at every
    /// change (Yrs walks up to the root and allocates every segment). Paths through a list are
    /// not kept: an index moves as the list changes.
    bases: HashMap<yrs::branch::BranchID, Base, foldhash::quality::RandomState>,
}

/// A changed map's path, and the index in [`Tracker::entries`] of the collection it is, if any.
#[derive(Clone, Debug)]
struct Base {
    path: Arc<Path>,
    entries: Option<usize>,
}

/// Map paths kept in [`Tracker::bases`] before it starts over.
const BASES_MAX: usize = 1024;

/// Paths kept before a change counts as touching everything.
const TOUCHED_MAX: usize = 4096;

/// Entries reported with fields per take window; past that, entries are read back.
const VALUED_MAX: usize = 256;

impl Tracker {
    fn push(&mut self, touched: Touched) {
        let paths = touched.keys.len().max(1);
        if self.paths + paths > TOUCHED_MAX {
            self.overflow = true;
            self.touched.clear();
            self.valued.clear();
            self.paths = 0;
        } else if !self.overflow {
            let group = self.touched.len();
            for (at, key) in touched.keys.iter().enumerate() {
                if key.fields.is_some() {
                    self.valued.push((group, at));
                }
            }
            self.paths += paths;
            self.touched.push(touched);
        }
    }

    /// A later transaction changed the type at `base`: fields kept for an entry at or inside
    /// `base` (replaced or moved), or for an entry `base` lies inside (its content changed), may
    /// no longer be what the document holds, so they are dropped (the entry is read back).
    fn invalidate(&mut self, base: &[Segment]) {
        let touched = &mut self.touched;
        self.valued.retain(|&(group, at)| {
            let Some(group) = touched.get_mut(group) else {
                return false;
            };
            let Some(key) = group.keys.get_mut(at) else {
                return false;
            };
            if super::overlaps(group.path.segments(), Some(&key.key), base) {
                key.fields = None;
                false
            } else {
                true
            }
        });
    }

    /// Whether an entry recorded with fields lies under the root map `root`. Only those can be
    /// changed by `root`'s events: a path under another root is neither inside nor above them.
    fn valued_under(&self, root: &str) -> bool {
        self.valued.iter().any(|&(group, _)| {
            self.touched.get(group).is_some_and(
                |t| matches!(t.path.segments().first(), Some(Segment::Key(k)) if k == root),
            )
        })
    }

    /// The path of the type changed in `event` (under the root `root`), and which of
    /// [`Tracker::entries`] it is.
    fn base_of(&mut self, root: &str, event: &yrs::types::Event) -> Base {
        let yrs::types::Event::Map(map_event) = event else {
            return Base {
                path: Arc::new(event_path(root, event)),
                entries: None,
            };
        };
        let id = AsRef::<yrs::branch::Branch>::as_ref(map_event.target()).id();
        if let Some(base) = self.bases.get(&id) {
            return base.clone();
        }
        let path = event_path(root, event);
        let base = match self.entries.iter().position(|(p, _)| **p == path) {
            Some(at) => Base {
                path: self.entries[at].0.clone(),
                entries: Some(at),
            },
            None => Base {
                path: Arc::new(path),
                entries: None,
            },
        };
        let fixed = base
            .path
            .segments()
            .iter()
            .all(|s| matches!(s, Segment::Key(_)));
        if fixed {
            if self.bases.len() >= BASES_MAX {
                self.bases.clear();
            }
            self.bases.insert(id, base.clone());
        }
        base
    }

    /// Records what `event` (under the root `root`) changed, at `base`.
    fn record(&mut self, txn: &TransactionMut, event: &yrs::types::Event, base: Base) {
        let yrs::types::Event::Map(map_event) = event else {
            self.push(Touched {
                path: base.path,
                keys: smallvec::SmallVec::new(),
            });
            return;
        };
        let changes = map_event.keys(txn);
        if changes.is_empty() {
            return;
        }
        let fields = base
            .entries
            .and_then(|at| self.entries.get(at))
            .map(|(_, fields)| fields)
            .filter(|_| self.valued.len() + changes.len() <= VALUED_MAX);
        let keys = changes
            .iter()
            .map(|(key, change)| TouchedKey {
                key: key.clone(),
                fields: match change {
                    yrs::types::EntryChange::Inserted(value)
                    | yrs::types::EntryChange::Updated(_, value) => {
                        fields.and_then(|fields| project(txn, value, fields))
                    }
                    yrs::types::EntryChange::Removed(_) => None,
                },
            })
            .collect();
        self.push(Touched {
            path: base.path,
            keys,
        });
    }

    /// What changed since the last take, into `into` (cleared; its buffer is kept for the next
    /// window). `false` when too much changed to list.
    fn take_into(&mut self, into: &mut Vec<Touched>) -> bool {
        super::recycle(into);
        std::mem::swap(&mut self.touched, into);
        self.valued.clear();
        self.paths = 0;
        if std::mem::take(&mut self.overflow) {
            into.clear();
            return false;
        }
        true
    }
}

/// The path of the type that changed in `event`, observed deeply from the root map `root`.
fn event_path(root: &str, event: &yrs::types::Event) -> Path {
    let relative = event.path();
    let mut path = Vec::with_capacity(relative.len() + 1);
    path.push(Segment::Key(root.to_owned()));
    for segment in relative {
        path.push(match segment {
            yrs::types::PathSegment::Key(k) => Segment::Key(String::from(&*k)),
            yrs::types::PathSegment::Index(i) => Segment::Index(i as usize),
        });
    }
    Path(path)
}

/// The fields `fields` of the entry `value` as its JSON would show them (a map's keys; nothing
/// for a counter, which shows as a number, or for any other scalar), or `None` for a kind of
/// value this does not project (the entry is then read back). Strings are shared with the
/// document, not copied.
fn project<T: ReadTxn>(txn: &T, value: &Out, fields: &[String]) -> Option<Fields> {
    let mut projected = absent(fields.len());
    match value {
        Out::YMap(map) => {
            for (key, value) in map.iter(txn) {
                if key == COUNTER_MARKER {
                    return Some(absent(fields.len()));
                }
                if let Some(at) = fields.iter().position(|f| f == key) {
                    projected[at] = Some(match value {
                        Out::Any(any) => any_field(&any),
                        other => FieldValue::from_json(out_to_json(txn, &other)),
                    });
                }
            }
        }
        Out::Any(Any::Map(map)) => {
            for (at, field) in fields.iter().enumerate() {
                projected[at] = map.get(field.as_str()).map(any_field);
            }
        }
        Out::Any(_) => {}
        _ => return None,
    }
    Some(projected)
}

/// `n` absent fields (built in place for the usual one or two).
fn absent(n: usize) -> Fields {
    match n {
        0..=2 => Fields::from_buf_and_len([None, None], n),
        _ => smallvec::smallvec![None; n],
    }
}

/// A field value as its JSON shows it; a string is shared, not copied.
fn any_field(any: &Any) -> FieldValue {
    match any {
        Any::String(s) => FieldValue::Text(s.clone()),
        other => FieldValue::from_json(any_to_json(other)),
    }
}

/// The key that marks a map as a counter.
pub const COUNTER_MARKER: &str = "$counter";

/// A Yrs document with a client id derived from the replica and the document.
pub struct YrsDoc {
    doc: Doc,
    /// Root maps observed for changed paths, and what the observers collected.
    tracked: std::collections::BTreeSet<String>,
    /// Made with the first tracked root (most documents have none: ~0.2 KB saved in each).
    touched: Option<std::sync::Arc<std::sync::Mutex<Tracker>>>,
    /// Whether texts may hold characters outside the BMP (see `AutomergeDoc`).
    astral: bool,
    /// Whether an update was dropped for lack of its dependencies since the last
    /// [`YrsDoc::take_incomplete`]: the sender should be asked again from our state vector.
    incomplete: bool,
    /// The whole document encoded, kept while no transaction commits (see [`FullState`]).
    full: FullState,
}

/// The whole document as one V1 update, kept between changes: every fresh peer (an empty state
/// vector: a new tab, a cold load) and every snapshot asks for exactly that, and encoding a large
/// document costs milliseconds each time. A transaction observer counts commits, so a change
/// made any way (through [`YrsDoc::native`] too) makes the kept encoding stale. Only encodings
/// of [`FullState::KEEP_FROM`] bytes or more are kept: smaller ones are cheap to redo and not
/// worth the memory. The observer is registered with the first encoding that large: in a small
/// document (most of a server's) it would cost ~0.6 KB for nothing.
struct FullState {
    /// Transactions committed since the observer was registered (bumped by it).
    commits: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    /// The encoding and the commit count it was made at.
    kept: std::sync::Mutex<Option<(u64, std::sync::Arc<[u8]>)>>,
}

impl FullState {
    const KEEP_FROM: usize = 16 * 1024;

    fn new() -> Self {
        Self {
            commits: std::sync::OnceLock::new(),
            kept: std::sync::Mutex::new(None),
        }
    }

    /// Counts `doc`'s commits that change it from now on. A transaction that moves no state
    /// vector and deletes nothing leaves the document as it was, and the kept encoding with it:
    /// every y-websocket client that joins sends such a transaction (its sync step 2 to the
    /// server's step 1, empty when it is fresh), and counting it made each cold load after a
    /// join encode the whole document again (0.5-0.6 ms for the 289 KB automerge-paper text,
    /// about half of the server's answer).
    fn observe(doc: &Doc) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        let commits = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = commits.clone();
        // Fails only if the key is taken, and this is the only observer under this key.
        let _ = doc.observe_after_transaction("accord-full-state", move |txn| {
            if changed(txn) {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        commits
    }

    /// The whole of `doc` as one V1 update, from the kept encoding when nothing committed since.
    fn get(&self, doc: &Doc) -> Vec<u8> {
        // Read before encoding: a commit in between makes the kept encoding look older than it
        // is (encoded again next time), never newer.
        let now = self
            .commits
            .get()
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed));
        let Ok(mut kept) = self.kept.lock() else {
            return doc
                .transact()
                .encode_state_as_update_v1(&StateVector::default());
        };
        if let (Some(now), Some((at, bytes))) = (now, kept.as_ref()) {
            if *at == now {
                return bytes.to_vec();
            }
        }
        let bytes = doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        *kept = match now {
            Some(now) if bytes.len() >= Self::KEEP_FROM => Some((now, bytes.as_slice().into())),
            None if bytes.len() >= Self::KEEP_FROM => {
                // The first encoding this large: count commits from here and keep the next
                // one (a commit between this encoding and the observer would go unseen).
                self.commits.get_or_init(|| Self::observe(doc));
                None
            }
            _ => None,
        };
        bytes
    }
}

/// The Yrs client id for a replica editing a document: stable across restarts (the replica
/// persists every change before it leaves), distinct per document, and below 2^53 so Yjs in
/// JavaScript holds it exactly.
pub fn client_id(replica: ReplicaId, document: DocumentId) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(replica.as_bytes());
    hasher.update(document.as_bytes());
    let digest = hasher.finalize();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(bytes) & ((1u64 << 53) - 1)
}

impl YrsDoc {
    /// A new empty document.
    pub fn new(replica: ReplicaId, document: DocumentId) -> Self {
        let options = Options {
            client_id: yrs::ClientID::new(client_id(replica, document)),
            offset_kind: OffsetKind::Utf16,
            ..Options::default()
        };
        let doc = Doc::with_options(options);
        Self {
            full: FullState::new(),
            doc,
            tracked: std::collections::BTreeSet::new(),
            touched: None,
            astral: false,
            incomplete: false,
        }
    }

    /// Loads a document from a V1 update (a snapshot or any merge of updates).
    pub fn load(replica: ReplicaId, document: DocumentId, bytes: &[u8]) -> Result<Self, DocError> {
        let mut doc = Self::new(replica, document);
        doc.apply_changes(bytes)?;
        Ok(doc)
    }

    /// Direct access to the Yrs document, for apps that need all of it.
    pub fn native(&self) -> &Doc {
        &self.doc
    }

    /// Applies ops in one transaction. Yrs cannot roll back: when an op fails, the ops before it
    /// stay applied and are returned as the change alongside the error.
    pub fn apply_ops(&mut self, ops: &[Op]) -> (Option<Change>, Result<(), DocError>) {
        let client = self.doc.client_id().get();
        let mut txn = self.doc.transact_mut();
        let mut result = Ok(());
        for op in ops {
            if let Op::Splice { insert, .. } = op {
                self.astral |= super::ops::has_astral(insert);
            }
            if let Err(e) = apply_op(&mut txn, client, op, self.astral) {
                result = Err(e);
                break;
            }
        }
        (local_change(&txn), result)
    }

    /// Runs `f` on a native transaction and returns what it changed as one change.
    pub fn change_native<R>(
        &mut self,
        f: impl FnOnce(&mut TransactionMut) -> R,
    ) -> (Option<Change>, R) {
        self.astral = true;
        let mut txn = self.doc.transact_mut();
        let result = f(&mut txn);
        (local_change(&txn), result)
    }

    /// Applies a V1 update from elsewhere; returns what was new here, as one change whose id is
    /// the hash of the update as received (so its sender can recognise it).
    pub fn apply_changes(&mut self, bytes: &[u8]) -> Result<Vec<Change>, DocError> {
        let update = Update::decode_v1(bytes).map_err(|e| DocError::malformed("yrs update", e))?;
        self.astral = true;
        let mut txn = self.doc.transact_mut();
        // yrs 0.28 integrates a block that starts past our clock for its client (a gap) without
        // marking anything missing, leaving a state vector that hides the gap. Refuse such an
        // update whole and ask again from our state vector.
        let ours = txn.state_vector();
        let gap = update
            .state_vector_lower()
            .iter()
            .any(|(client, clock)| *clock > ours.get(client));
        if gap {
            self.incomplete = true;
            return Ok(Vec::new());
        }
        txn.apply_update(update)
            .map_err(|e| DocError::malformed("yrs update", e))?;
        // An update whose other dependencies (an origin item, a deleted item) have not arrived
        // would wait in Yrs's pending set. Drop it instead and ask again from our state vector:
        // what the state vector says we have is then always exactly what we have.
        if txn.has_missing_updates() {
            txn.prune_pending();
            self.incomplete = true;
        }
        if !changed(&txn) {
            return Ok(Vec::new());
        }
        Ok(vec![Change {
            id: ChangeId::of_bytes(bytes),
            bytes: txn.encode_update_v1(),
        }])
    }

    /// Whether an update was dropped for missing dependencies since the last call (and resets it).
    pub fn take_incomplete(&mut self) -> bool {
        std::mem::take(&mut self.incomplete)
    }

    /// The state vector (what this replica has seen of each client), V1-encoded.
    pub fn state_vector(&self) -> Vec<u8> {
        self.doc.transact().state_vector().encode_v1()
    }

    /// Everything, as one V1 update.
    pub fn save(&self) -> Vec<u8> {
        self.full.get(&self.doc)
    }

    /// Checks that `their_state_vector` is a V1 state vector, without computing what it lacks
    /// (a sync step 1 is checked when it arrives and answered later: for an empty state vector
    /// the answer is the whole document, which the check need not copy).
    pub fn check_state_vector(their_state_vector: &[u8]) -> Result<(), DocError> {
        Self::decode_state_vector(their_state_vector).map(drop)
    }

    fn decode_state_vector(their_state_vector: &[u8]) -> Result<StateVector, DocError> {
        StateVector::decode_v1(their_state_vector)
            .map_err(|e| DocError::malformed("yrs state vector", e))
    }

    /// What a peer whose V1 state vector is `their_state_vector` lacks, as one V1 update.
    pub fn changes_after(&self, their_state_vector: &[u8]) -> Result<Vec<u8>, DocError> {
        let sv = Self::decode_state_vector(their_state_vector)?;
        if sv.is_empty() {
            return Ok(self.full.get(&self.doc));
        }
        Ok(self.doc.transact().encode_state_as_update_v1(&sv))
    }

    /// The JSON of the value at `path` only (walks there and serializes that subtree).
    pub fn get_json(&self, path: &Path) -> Option<serde_json::Value> {
        let Some((first, rest)) = path.segments().split_first() else {
            return Some(self.to_json());
        };
        let txn = self.doc.transact();
        let Segment::Key(name) = first else {
            return None;
        };
        let mut out = txn
            .root_refs()
            .find(|(root, _)| *root == name.as_str())
            .map(|(_, value)| value)?;
        for segment in rest {
            out = match (&out, segment) {
                (Out::YMap(m), Segment::Key(k)) => m.get(&txn, k)?,
                (Out::YArray(a), Segment::Index(i)) => a.get(&txn, u32::try_from(*i).ok()?)?,
                (Out::UndefinedRef(b), Segment::Key(k)) => MapRef::from(*b).get(&txn, k)?,
                _ => return None,
            };
        }
        Some(out_to_json(&txn, &out))
    }

    /// Starts tracking which paths under the root maps `roots` change (deep observers).
    ///
    /// An entry a transaction sets in a collection given to [`YrsDoc::track_entries`] is
    /// reported with the asked fields as they are at the end of that transaction (taken from the
    /// value its event already carries), unless a later transaction of the same take window
    /// changed anything at, inside or above it: the reader (the invariant layer, which reads
    /// every entry a change touched) then need not walk the document from the root for it nor
    /// convert all of it to JSON. Types made inside a transaction raise no events of their own,
    /// so a new entry is complete when its parent's event reports it.
    pub fn track_changes(&mut self, roots: &[String]) {
        for root in roots {
            if self.tracked.contains(root) {
                continue;
            }
            self.tracked.insert(root.clone());
            let map = self.doc.get_or_insert_map(root.as_str());
            let tracker = self.touched.get_or_insert_with(Default::default).clone();
            let name = root.clone();
            yrs::DeepObservable::observe_deep(&map, "accord-track", move |txn, events| {
                let Ok(mut tracker) = tracker.lock() else {
                    return;
                };
                // All of one transaction's events under this root come in this one call, and
                // they describe its end state: first drop what earlier transactions of the
                // window left under this root that these events may have changed (if any carry
                // fields), then record these. Paths are cached per map, so the second look-up
                // is a probe.
                if tracker.valued_under(&name) {
                    for event in events.iter() {
                        let base = tracker.base_of(&name, event);
                        tracker.invalidate(base.path.segments());
                    }
                }
                for event in events.iter() {
                    let base = tracker.base_of(&name, event);
                    tracker.record(txn, event, base);
                }
            });
        }
    }

    /// Reports the entries a change sets in the map at `collection` with their `fields` (see
    /// [`super::Document::track_entries`]); `collection` must lie under a tracked root.
    /// Changes to the collection's map are reported with `collection` itself as their path.
    pub fn track_entries(&mut self, collection: &Arc<Path>, fields: &[String]) {
        let touched = self.touched.get_or_insert_with(Default::default);
        let Ok(mut tracker) = touched.lock() else {
            return;
        };
        tracker.entries.retain(|(path, _)| **path != **collection);
        tracker.entries.push((collection.clone(), fields.to_vec()));
        // The collections' places in `entries` moved: look them up again.
        tracker.bases.clear();
    }

    /// The paths changed under tracked roots since the last call, or `None` when too many
    /// changed to list (then everything must be assumed changed).
    pub fn take_touched(&mut self) -> Option<Vec<Path>> {
        self.take_touched_values().map(super::flatten)
    }

    /// [`YrsDoc::take_touched`], grouped by changed map, with the fields of entries of the
    /// collections given to [`YrsDoc::track_entries`] (see [`YrsDoc::track_changes`]).
    pub fn take_touched_values(&mut self) -> Option<Vec<Touched>> {
        let mut touched = Vec::new();
        self.take_touched_into(&mut touched).then_some(touched)
    }

    /// [`YrsDoc::take_touched_values`] into `into`, whose buffer the document keeps for the next
    /// changes (see [`super::Document::take_touched_into`]).
    pub fn take_touched_into(&mut self, into: &mut Vec<Touched>) -> bool {
        let Some(touched) = &self.touched else {
            // Nothing tracked: nothing changed under a tracked root.
            super::recycle(into);
            return true;
        };
        let Ok(mut tracker) = touched.lock() else {
            into.clear();
            return false;
        };
        tracker.take_into(into)
    }

    /// The keys of the map at `path` (the root type names for the root path).
    pub fn keys(&self, path: &Path) -> Vec<String> {
        let txn = self.doc.transact();
        let Some((first, rest)) = path.segments().split_first() else {
            return txn.root_refs().map(|(name, _)| name.to_owned()).collect();
        };
        let Segment::Key(name) = first else {
            return Vec::new();
        };
        let Some(mut out) = txn
            .root_refs()
            .find(|(root, _)| *root == name.as_str())
            .map(|(_, value)| value)
        else {
            return Vec::new();
        };
        for segment in rest {
            let next = match (&out, segment) {
                (Out::YMap(m), Segment::Key(k)) => m.get(&txn, k),
                (Out::UndefinedRef(b), Segment::Key(k)) => MapRef::from(*b).get(&txn, k),
                (Out::YArray(a), Segment::Index(i)) => {
                    u32::try_from(*i).ok().and_then(|i| a.get(&txn, i))
                }
                _ => None,
            };
            match next {
                Some(next) => out = next,
                None => return Vec::new(),
            }
        }
        match out {
            Out::YMap(m) => m.keys(&txn).map(str::to_owned).collect(),
            Out::UndefinedRef(b) => MapRef::from(b).keys(&txn).map(str::to_owned).collect(),
            _ => Vec::new(),
        }
    }

    /// A JSON view: each non-empty root type by name. Empty roots are left out because Yrs syncs
    /// a root's contents, not its existence.
    pub fn to_json(&self) -> serde_json::Value {
        let txn = self.doc.transact();
        let mut roots = BTreeMap::new();
        for (name, value) in txn.root_refs() {
            let json = out_to_json(&txn, &value);
            let empty = match &json {
                serde_json::Value::Object(m) => m.is_empty(),
                serde_json::Value::Array(a) => a.is_empty(),
                serde_json::Value::String(s) => s.is_empty(),
                serde_json::Value::Null => true,
                _ => false,
            };
            if !empty {
                roots.insert(name.to_string(), json);
            }
        }
        serde_json::Value::Object(roots.into_iter().collect())
    }
}

fn changed(txn: &TransactionMut) -> bool {
    txn.before_state() != txn.after_state() || !txn.delete_set().is_empty()
}

fn local_change(txn: &TransactionMut) -> Option<Change> {
    if !changed(txn) {
        return None;
    }
    let bytes = txn.encode_update_v1();
    Some(Change {
        id: ChangeId::of_bytes(&bytes),
        bytes,
    })
}

/// A container reached by a path.
enum Node {
    Map(MapRef),
    Array(ArrayRef),
    Text(TextRef),
}

fn node_of(out: Out) -> Option<Node> {
    match out {
        Out::YMap(m) => Some(Node::Map(m)),
        Out::YArray(a) => Some(Node::Array(a)),
        Out::YText(t) => Some(Node::Text(t)),
        _ => None,
    }
}

/// The root type named by the first segment, typed by what comes next.
fn root_node(txn: &mut TransactionMut, path: &Path, next: RootKind) -> Result<Node, DocError> {
    let Some(Segment::Key(name)) = path.segments().first() else {
        return Err(DocError::Unsupported(
            "a Yrs document's top level holds named shared types: start the path with a name"
                .into(),
        ));
    };
    let name = name.as_str();
    Ok(match next {
        RootKind::Map => Node::Map(txn.get_or_insert_map(name)),
        RootKind::Array => Node::Array(txn.get_or_insert_array(name)),
        RootKind::Text => Node::Text(txn.get_or_insert_text(name)),
    })
}

#[derive(Clone, Copy)]
enum RootKind {
    Map,
    Array,
    Text,
}

fn kind_for(segment: Option<&Segment>, fallback: RootKind) -> RootKind {
    match segment {
        Some(Segment::Key(_)) => RootKind::Map,
        Some(Segment::Index(_)) => RootKind::Array,
        None => fallback,
    }
}

/// Walks to the container at `segments[..depth]`; `leaf` types the root when depth is 1.
fn resolve(
    txn: &mut TransactionMut,
    path: &Path,
    depth: usize,
    leaf: RootKind,
) -> Result<Node, DocError> {
    let segments = path.segments();
    let mut node = root_node(txn, path, kind_for(segments.get(1), leaf))?;
    for segment in &segments[1..depth] {
        let child = match (&node, segment) {
            (Node::Map(m), Segment::Key(k)) => m.get(txn, k),
            (Node::Array(a), Segment::Index(i)) => {
                let index =
                    u32::try_from(*i).map_err(|_| DocError::NumberOutOfRange(i.to_string()))?;
                a.get(txn, index)
            }
            _ => None,
        };
        node = child
            .and_then(node_of)
            .ok_or_else(|| DocError::PathNotFound(path.clone()))?;
    }
    Ok(node)
}

fn to_u32(value: usize) -> Result<u32, DocError> {
    u32::try_from(value).map_err(|_| DocError::NumberOutOfRange(value.to_string()))
}

fn apply_op(
    txn: &mut TransactionMut,
    client: u64,
    op: &Op,
    check_characters: bool,
) -> Result<(), DocError> {
    let path = op.path();
    let depth = path.segments().len();
    if depth == 0 {
        return Err(DocError::Unsupported("an op at the root".into()));
    }
    match op {
        Op::Put { value, .. } if depth == 1 => put_root(txn, path, value),
        Op::Delete { .. } if depth == 1 => {
            let Some(Segment::Key(name)) = path.segments().first() else {
                return Err(DocError::PathNotFound(path.clone()));
            };
            if let Some(map) = txn.get_map(name.as_str()) {
                map.clear(txn);
            }
            Ok(())
        }
        Op::Put { value, .. } => {
            let parent = resolve(txn, path, depth - 1, RootKind::Map)?;
            match (parent, &path.segments()[depth - 1]) {
                (Node::Map(m), Segment::Key(k)) => {
                    m.insert(txn, k.as_str(), json_to_in(value)?);
                    Ok(())
                }
                (Node::Array(a), Segment::Index(i)) => {
                    let index = to_u32(*i)?;
                    check_len(a.len(txn), index, false, path)?;
                    a.remove(txn, index);
                    a.insert(txn, index, json_to_in(value)?);
                    Ok(())
                }
                _ => Err(DocError::PathNotFound(path.clone())),
            }
        }
        Op::Delete { .. } => {
            let parent = resolve(txn, path, depth - 1, RootKind::Map)?;
            match (parent, &path.segments()[depth - 1]) {
                (Node::Map(m), Segment::Key(k)) => {
                    m.remove(txn, k);
                    Ok(())
                }
                (Node::Array(a), Segment::Index(i)) => {
                    let index = to_u32(*i)?;
                    check_len(a.len(txn), index, false, path)?;
                    a.remove(txn, index);
                    Ok(())
                }
                (Node::Text(_), _) => Err(DocError::WrongType {
                    path: path.clone(),
                    expected: "a map or a list",
                }),
                _ => Err(DocError::PathNotFound(path.clone())),
            }
        }
        Op::Insert { index, value, .. } => match resolve(txn, path, depth, RootKind::Array)? {
            Node::Array(a) => {
                let index = to_u32(*index)?;
                check_len(a.len(txn), index, true, path)?;
                a.insert(txn, index, json_to_in(value)?);
                Ok(())
            }
            _ => Err(DocError::WrongType {
                path: path.clone(),
                expected: "a list",
            }),
        },
        Op::Increment { by, .. } => {
            let counter = if depth == 1 {
                match resolve(txn, path, 1, RootKind::Map)? {
                    Node::Map(m) => m,
                    _ => unreachable_kind(path)?,
                }
            } else {
                let Node::Map(parent) = resolve(txn, path, depth - 1, RootKind::Map)? else {
                    return Err(DocError::WrongType {
                        path: path.clone(),
                        expected: "inside a map",
                    });
                };
                let Segment::Key(key) = &path.segments()[depth - 1] else {
                    return Err(DocError::PathNotFound(path.clone()));
                };
                match parent.get(txn, key) {
                    Some(Out::YMap(m)) => m,
                    None => parent.insert(txn, key.as_str(), MapPrelim::default()),
                    Some(_) => {
                        return Err(DocError::WrongType {
                            path: path.clone(),
                            expected: "a counter",
                        })
                    }
                }
            };
            // A counter holds the marker and one number per writer. The marker can be missing
            // for a while (its item still in flight while its deletion arrived), so a map
            // holding only numbers counts as a counter too.
            let is_counter = counter
                .iter(txn)
                .all(|(k, v)| k == COUNTER_MARKER || matches!(v, Out::Any(Any::Number(_))));
            if !is_counter {
                return Err(DocError::WrongType {
                    path: path.clone(),
                    expected: "a counter",
                });
            }
            if counter.get(txn, COUNTER_MARKER).is_none() {
                counter.insert(txn, COUNTER_MARKER, true);
            }
            let key = client.to_string();
            let current = match counter.get(txn, &key) {
                Some(Out::Any(any)) => any_to_i64(&any).unwrap_or(0),
                _ => 0,
            };
            let total = current
                .checked_add(*by)
                .ok_or_else(|| DocError::NumberOutOfRange(format!("{current} + {by}")))?;
            counter.insert(txn, key, Any::Number(Number::Int(total)));
            Ok(())
        }
        Op::Splice {
            index,
            delete,
            insert,
            ..
        } => {
            let text = if depth == 1 {
                match resolve(txn, path, 1, RootKind::Text)? {
                    Node::Text(t) => t,
                    _ => unreachable_kind(path)?,
                }
            } else {
                let Node::Map(parent) = resolve(txn, path, depth - 1, RootKind::Map)? else {
                    return Err(DocError::WrongType {
                        path: path.clone(),
                        expected: "inside a map",
                    });
                };
                let Segment::Key(key) = &path.segments()[depth - 1] else {
                    return Err(DocError::PathNotFound(path.clone()));
                };
                match parent.get(txn, key) {
                    Some(Out::YText(t)) => t,
                    None => parent.insert(txn, key.as_str(), yrs::TextPrelim::new("")),
                    Some(_) => {
                        return Err(DocError::WrongType {
                            path: path.clone(),
                            expected: "text",
                        })
                    }
                }
            };
            let index = to_u32(*index)?;
            let delete = to_u32(*delete)?;
            let len = text.len(txn);
            if index > len || index.saturating_add(delete) > len {
                return Err(DocError::OutOfBounds {
                    path: path.clone(),
                    index: index.saturating_add(delete) as usize,
                    len: len as usize,
                });
            }
            if check_characters {
                let current = text.get_string(txn);
                for at in [index, index.saturating_add(delete)] {
                    if super::ops::splits_character(&current, at as usize) {
                        return Err(DocError::SplitsCharacter {
                            path: path.clone(),
                            index: at as usize,
                        });
                    }
                }
            }
            if delete > 0 {
                text.remove_range(txn, index, delete);
            }
            if !insert.is_empty() {
                text.insert(txn, index, insert);
            }
            Ok(())
        }
    }
}

/// A put at the top level sets a whole root type: an object becomes the root map's entries, an
/// array the root array's items. Scalars cannot stand at a Yrs document's top level.
fn put_root(
    txn: &mut TransactionMut,
    path: &Path,
    value: &serde_json::Value,
) -> Result<(), DocError> {
    let Some(Segment::Key(name)) = path.segments().first() else {
        return Err(DocError::PathNotFound(path.clone()));
    };
    match value {
        serde_json::Value::Object(entries) => {
            let map = txn.get_or_insert_map(name.as_str());
            let stale: Vec<String> = map
                .keys(txn)
                .filter(|k| !entries.contains_key(*k))
                .map(str::to_owned)
                .collect();
            for key in stale {
                map.remove(txn, &key);
            }
            for (key, v) in entries {
                map.insert(txn, key.as_str(), json_to_in(v)?);
            }
            Ok(())
        }
        serde_json::Value::Array(items) => {
            let array = txn.get_or_insert_array(name.as_str());
            let len = array.len(txn);
            if len > 0 {
                array.remove_range(txn, 0, len);
            }
            for (i, v) in items.iter().enumerate() {
                array.insert(txn, to_u32(i)?, json_to_in(v)?);
            }
            Ok(())
        }
        _ => Err(DocError::Unsupported(
            "a Yrs document's top level holds shared types: put an object or an array there".into(),
        )),
    }
}

fn unreachable_kind<T>(path: &Path) -> Result<T, DocError> {
    Err(DocError::PathNotFound(path.clone()))
}

fn check_len(len: u32, index: u32, inserting: bool, path: &Path) -> Result<(), DocError> {
    let ok = if inserting { index <= len } else { index < len };
    if ok {
        Ok(())
    } else {
        Err(DocError::OutOfBounds {
            path: path.clone(),
            index: index as usize,
            len: len as usize,
        })
    }
}

fn json_to_in(value: &serde_json::Value) -> Result<In, DocError> {
    use serde_json::Value as J;
    Ok(match value {
        J::Object(map) => {
            let mut entries = Vec::with_capacity(map.len());
            for (k, v) in map {
                entries.push((k.as_str(), json_to_in(v)?));
            }
            In::Map(entries.into_iter().collect::<MapPrelim>())
        }
        J::Array(items) => {
            let mut values = Vec::with_capacity(items.len());
            for v in items {
                values.push(json_to_in(v)?);
            }
            In::Array(values.into_iter().collect::<ArrayPrelim>())
        }
        J::Null => In::Any(Any::Null),
        J::Bool(b) => In::Any(Any::Bool(*b)),
        J::String(s) => In::Any(Any::from(s.as_str())),
        J::Number(n) => {
            if let Some(i) = n.as_i64() {
                In::Any(Any::Number(Number::Int(i)))
            } else if let Some(f) = n.as_f64() {
                In::Any(Any::Number(Number::Float(f)))
            } else {
                return Err(DocError::NumberOutOfRange(n.to_string()));
            }
        }
    })
}

fn any_to_i64(any: &Any) -> Option<i64> {
    match any {
        Any::Number(n) => n.as_i64(),
        _ => None,
    }
}

/// Converts a Yrs value to JSON; integral numbers print as integers.
pub(crate) fn any_to_json(any: &Any) -> serde_json::Value {
    use serde_json::Value as J;
    match any {
        Any::Null | Any::Undefined => J::Null,
        Any::Bool(b) => J::Bool(*b),
        Any::Number(n) => match n.as_i64() {
            Some(i) => J::from(i),
            None => n
                .as_f64()
                .and_then(serde_json::Number::from_f64)
                .map_or(J::Null, J::Number),
        },
        // `String::from`, not `to_string`: on an `Arc<str>` that goes through `Display`.
        Any::String(s) => J::String(String::from(&**s)),
        Any::Buffer(b) => J::Array(b.iter().map(|x| J::from(*x)).collect()),
        Any::Array(items) => J::Array(items.iter().map(any_to_json).collect()),
        Any::Map(map) => J::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), any_to_json(v)))
                .collect::<BTreeMap<_, _>>()
                .into_iter()
                .collect(),
        ),
    }
}

fn out_to_json<T: ReadTxn>(txn: &T, out: &Out) -> serde_json::Value {
    use serde_json::Value as J;
    match out {
        Out::Any(any) => any_to_json(any),
        Out::YText(t) => J::String(t.get_string(txn)),
        Out::YArray(a) => J::Array(a.iter(txn).map(|v| out_to_json(txn, &v)).collect()),
        Out::YMap(m) => map_to_json(txn, m),
        Out::UndefinedRef(branch) => match yrs::types::AsPrelim::as_prelim(out, txn) {
            In::Map(_) => map_to_json(txn, &MapRef::from(*branch)),
            In::Array(_) => out_to_json(txn, &Out::YArray(ArrayRef::from(*branch))),
            In::Text(_) => J::String(TextRef::from(*branch).get_string(txn)),
            _ => any_to_json(&out.to_json(txn)),
        },
        other => any_to_json(&other.to_json(txn)),
    }
}

fn map_to_json<T: ReadTxn>(txn: &T, map: &MapRef) -> serde_json::Value {
    // One pass: the counter marker is noticed on the way (a lookup of it first hashed the key
    // with SipHash for every map, and this runs for every entry the invariant layer reads).
    let mut entries = serde_json::Map::new();
    for (k, v) in map.iter(txn) {
        if k == COUNTER_MARKER {
            return counter_total(txn, map);
        }
        entries.insert(String::from(k), out_to_json(txn, &v));
    }
    // Key order must not depend on each replica's Yrs map order: claims on object values are
    // compared as text. A no-op with serde_json's default (sorted) map; sorts if an app's
    // dependency tree turns on `preserve_order`.
    entries.sort_keys();
    serde_json::Value::Object(entries)
}

/// A counter map's value: the sum of every writer's total.
fn counter_total<T: ReadTxn>(txn: &T, map: &MapRef) -> serde_json::Value {
    let sum: i64 = map
        .iter(txn)
        .filter(|(k, _)| *k != COUNTER_MARKER)
        .filter_map(|(_, v)| match v {
            Out::Any(any) => any_to_i64(&any),
            _ => None,
        })
        .fold(0i64, |a, b| a.saturating_add(b));
    serde_json::Value::from(sum)
}

#[cfg(test)]
mod full_state_tests {
    use super::*;

    fn fresh() -> YrsDoc {
        YrsDoc::new(
            ReplicaId::from_bytes([1; 16]),
            DocumentId::from_bytes([2; 16]),
        )
    }

    /// A document whose whole encoding is large enough to be kept, and its text.
    fn large() -> (YrsDoc, yrs::TextRef) {
        let doc = fresh();
        let text = doc.native().get_or_insert_text("t");
        {
            let mut txn = doc.native().transact_mut();
            text.insert(&mut txn, 0, &"x".repeat(40_000));
        }
        (doc, text)
    }

    /// What a fresh peer gets, compared with encoding the document anew.
    fn check(doc: &YrsDoc) -> Vec<u8> {
        let empty = StateVector::default().encode_v1();
        let served = doc.changes_after(&empty).expect("empty state vector");
        let encoded = doc
            .native()
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        assert_eq!(served, encoded, "the kept encoding is stale");
        assert_eq!(doc.save(), encoded);
        served
    }

    #[test]
    fn the_kept_whole_document_follows_every_kind_of_change() {
        let (mut doc, text) = large();
        let first = check(&doc);
        assert!(
            first.len() >= FullState::KEEP_FROM,
            "large enough to be kept"
        );
        // (`check` encodes twice: the first registers the observer, the second is kept.)
        assert!(doc.full.kept.lock().expect("lock").is_some());
        assert!(doc.full.commits.get().is_some());
        // A deletion moves no state vector, yet the kept encoding must go.
        {
            let mut txn = doc.native().transact_mut();
            text.remove_range(&mut txn, 0, 10);
        }
        assert_ne!(check(&doc), first);
        // A JSON op, then an update from elsewhere.
        let put = Op::Put {
            path: super::super::ops::Path::keys(["m", "k"]),
            value: serde_json::json!(1),
        };
        let (change, result) = doc.apply_ops(&[put]);
        result.expect("op applies");
        assert!(change.is_some());
        check(&doc);
        let mut other = fresh();
        other.apply_changes(&doc.save()).expect("load");
        let remote = other.native().get_or_insert_text("t");
        let update = {
            let mut txn = other.native().transact_mut();
            remote.insert(&mut txn, 0, "remote ");
            txn.encode_update_v1()
        };
        doc.apply_changes(&update).expect("remote update");
        let after = check(&doc);
        let mut reader = fresh();
        reader.apply_changes(&after).expect("fresh peer loads it");
        assert!(reader.to_json()["t"]
            .as_str()
            .is_some_and(|t| t.starts_with("remote ")));
    }

    /// The kept encoding itself (not a copy of it), if any.
    fn kept(doc: &YrsDoc) -> Option<std::sync::Arc<[u8]>> {
        doc.full
            .kept
            .lock()
            .expect("lock")
            .as_ref()
            .map(|(_, bytes)| bytes.clone())
    }

    #[test]
    fn a_transaction_that_changes_nothing_keeps_the_kept_encoding() {
        let (mut doc, text) = large();
        // (The first encoding registers the observer, the second is kept.)
        check(&doc);
        check(&doc);
        let before = kept(&doc).expect("kept");
        // What a fresh y-websocket client answers the server's sync step 1 with: an empty update.
        let empty = Doc::new()
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        assert!(doc.apply_changes(&empty).expect("empty update").is_empty());
        // An update the document already holds, and a transaction that writes nothing.
        let known = doc.save();
        assert!(doc.apply_changes(&known).expect("known update").is_empty());
        drop(doc.native().transact_mut());
        assert_eq!(check(&doc), known);
        let after = kept(&doc).expect("still kept");
        assert!(
            std::sync::Arc::ptr_eq(&before, &after),
            "the whole document was encoded again though nothing changed"
        );
        // A change still makes it stale.
        {
            let mut txn = doc.native().transact_mut();
            text.insert(&mut txn, 0, "y");
        }
        assert_ne!(check(&doc), known);
        assert!(!std::sync::Arc::ptr_eq(
            &before,
            &kept(&doc).expect("kept again")
        ));
    }

    #[test]
    fn a_small_document_is_not_kept() {
        let mut doc = fresh();
        let put = Op::Put {
            path: super::super::ops::Path::keys(["m", "k"]),
            value: serde_json::json!("v"),
        };
        doc.apply_ops(&[put]).1.expect("op applies");
        check(&doc);
        assert!(doc.full.kept.lock().expect("lock").is_none());
        assert!(doc.full.commits.get().is_none(), "no observer either");
    }
}
