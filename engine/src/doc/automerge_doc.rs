//! The Automerge side of [`crate::Document`].
//!
//! Changed paths are derived from the changes themselves, not from Automerge's diff (which costs
//! what the document holds): every change that enters the document (a local commit, a merge, a
//! sync message) is decoded and each of its ops names the object and key it touched. A cache maps
//! object ids to their paths; objects made by a change get their parent's path plus the key, and
//! objects made before tracking started are looked up once through their parents. Objects inside
//! lists and texts are reported as the list or text itself (their index moves).
//!
//! The same decoding also remembers what each new map made under an existing object holds (a new
//! ledger entry, a new booking): every op that ever touched such a map is among the changes just
//! decoded, so while none of its keys was written twice its value is exactly those ops' values,
//! and [`AutomergeDoc::get_json`] answers it after one visibility check instead of walking from
//! the root and reading the map (each step costs microseconds in Automerge 0.12). See
//! [`FreshMap`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use automerge::legacy::{Key as OpKey, ObjectId as LegacyObjId, OpType as LegacyOpType};
use automerge::sync::{BloomFilter, Capability, Have, MessageFlags, MessageVersion, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{
    AutoCommit, ChangeHash, LoadOptions, ObjId, ObjType, Prop, ReadDoc, ScalarValue, TextEncoding,
    Value, ROOT,
};

use super::automerge_apply::{self, Guard};
use super::automerge_sync::{self, Generated};
use super::error::DocError;
use super::ops::{Op, Path, Segment};
use super::recent_changes::RecentChanges;
use super::recent_graph::RecentGraph;
use super::{Change, ChangeId};
use crate::ids::ReplicaId;

/// Text positions count UTF-16 code units, as JavaScript does.
const TEXT_ENCODING: TextEncoding = TextEncoding::Utf16CodeUnit;

/// At most this many distinct touched paths are kept between two takes; beyond, "unknown".
const MAX_TOUCHED: usize = 4096;
/// At most this many object paths are cached; beyond, the cache starts over.
const MAX_OBJECTS: usize = 65_536;
/// At most this many new maps are remembered per take (see [`FreshMap`]); beyond, they are read.
const MAX_FRESH: usize = 256;
/// At most this many keys are remembered per new map; beyond, it is read.
const MAX_FRESH_KEYS: usize = 64;
/// At most this many changes are decoded to find unseen edits (made through [`AutomergeDoc::native`]
/// and committed there); beyond, "unknown".
const MAX_UNSEEN_CHANGES: usize = 1024;

/// An Automerge document with the replica's actor id.
pub struct AutomergeDoc {
    doc: AutoCommit,
    /// Changed paths, when they are being tracked.
    tracking: Option<Tracker>,
    /// The new maps of the last take, whose values are known without reading the document.
    /// Valid only until the document changes: every method that may change it clears this.
    fresh: Vec<FreshMap>,
    /// Whether texts may hold characters outside the BMP, so splice positions must be checked
    /// against surrogate pairs (a scan of the text, skipped while it is known to be BMP-only).
    astral: bool,
    /// The last compacted save and the heads it holds: reused while the heads are unchanged (a
    /// save costs time proportional to the whole history; a fresh sync peer is sent one).
    saved: Option<Saved>,
    /// The bytes of the changes just received or made, so they are not rebuilt from the op set
    /// to be reported or sent on (see [`RecentChanges`]).
    recent: RecentChanges,
    /// The last changes with their dependencies, so the sync protocol's "what is not an
    /// ancestor of these heads" is answered without Automerge (see [`RecentGraph`]).
    graph: RecentGraph,
    /// What a failed apply rebuilds the document from (see [`automerge_apply`]).
    guard: Guard,
}

/// A compacted save of the document at `heads`.
struct Saved {
    heads: Vec<ChangeHash>,
    bytes: Arc<[u8]>,
}

impl AutomergeDoc {
    /// A new empty document whose local changes carry `replica` as actor.
    pub fn new(replica: ReplicaId) -> Self {
        let doc = AutoCommit::new_with_encoding(TEXT_ENCODING)
            .with_actor(automerge::ActorId::from(replica.as_bytes().as_slice()));
        Self {
            doc,
            tracking: None,
            fresh: Vec::new(),
            astral: false,
            saved: None,
            recent: RecentChanges::default(),
            graph: RecentGraph::default(),
            guard: Guard::default(),
        }
    }

    /// Loads a saved document (snapshot and/or changes concatenated).
    pub fn load(replica: ReplicaId, bytes: &[u8]) -> Result<Self, DocError> {
        Self::load_shared(replica, bytes.into())
    }

    /// Loads `bytes` as [`AutomergeDoc::load`] does; they are the first checkpoint of its guard.
    fn load_shared(replica: ReplicaId, bytes: Arc<[u8]>) -> Result<Self, DocError> {
        let options = LoadOptions::new().text_encoding(TEXT_ENCODING);
        let mut doc = automerge_apply::load(&bytes, options)?
            .with_actor(automerge::ActorId::from(replica.as_bytes().as_slice()));
        let mut guard = Guard::default();
        guard.adopt(&mut doc, bytes);
        Ok(Self {
            doc,
            tracking: None,
            fresh: Vec::new(),
            astral: true,
            saved: None,
            recent: RecentChanges::default(),
            graph: RecentGraph::default(),
            guard,
        })
    }

    /// Loads a compacted document as [`AutomergeDoc::save`] wrote it, keeping `bytes` as the
    /// current save (so the first fresh peer is not made to wait for a new one). Bytes that are
    /// not exactly one saved document (changes, or a document followed by more) are loaded the
    /// same way but not kept.
    pub fn load_saved(replica: ReplicaId, bytes: Vec<u8>) -> Result<Self, DocError> {
        let bytes: Arc<[u8]> = bytes.into();
        let mut loaded = Self::load_shared(replica, bytes.clone())?;
        if is_one_document(&bytes) {
            let heads = loaded.doc.get_heads();
            if !heads.is_empty() {
                loaded.saved = Some(Saved { heads, bytes });
            }
        }
        Ok(loaded)
    }

    /// Direct access to the Automerge document, for apps that need all of it. Changes made here
    /// are picked up by [`crate::Replica::change_native`] when it commits.
    pub fn native(&mut self) -> &mut AutoCommit {
        self.astral = true;
        self.fresh.clear();
        &mut self.doc
    }

    /// Read-only access to the Automerge document.
    pub fn native_ref(&self) -> &AutoCommit {
        &self.doc
    }

    /// Applies ops in one change. Returns `None` when they changed nothing.
    pub fn apply_ops(&mut self, ops: &[Op]) -> Result<Option<Change>, DocError> {
        self.fresh.clear();
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
        self.fresh.clear();
        let hash = self.doc.commit()?;
        let change = self.doc.get_change_by_hash(&hash)?;
        automerge_sync::keep_changes(&mut self.recent, change.raw_bytes());
        if let Some(tracker) = &mut self.tracking {
            let mut deps = change.deps().to_vec();
            deps.sort_unstable();
            // Only when nothing unseen came before it; otherwise the next take catches up.
            if deps == tracker.heads {
                tracker.record(&self.doc, &change);
                tracker.heads = vec![hash];
            }
        }
        let bytes = change.raw_bytes().to_vec();
        self.guard.committed(&mut self.doc, &bytes);
        Some(Change {
            id: ChangeId(hash.0),
            bytes,
        })
    }

    /// Applies changes (or a saved document) from elsewhere; returns the changes that were new.
    pub fn apply_changes(&mut self, bytes: &[u8]) -> Result<Vec<Change>, DocError> {
        self.fresh.clear();
        let before = self.doc.get_heads();
        self.astral = true;
        automerge_sync::keep_changes(&mut self.recent, bytes);
        automerge_apply::load_incremental(
            &mut self.doc,
            &mut self.guard,
            bytes,
            "automerge change",
        )?;
        Ok(self.changes_since(&before))
    }

    /// The changes not covered by `before` (the heads before something entered the document), in
    /// the document's order, recorded for tracking. Their bytes come from [`RecentChanges`] when
    /// all are there, else Automerge rebuilds them.
    fn changes_since(&mut self, before: &[ChangeHash]) -> Vec<Change> {
        let mut after = self.doc.get_heads();
        if after == before {
            return Vec::new();
        }
        self.graph.catch_up(&mut self.doc);
        let hashes = automerge_sync::hashes_since(&mut self.doc, &self.graph, before);
        let kept: Option<Vec<Change>> = hashes
            .iter()
            .map(|h| {
                self.recent.get(h).map(|bytes| Change {
                    id: ChangeId(h.0),
                    bytes: bytes.to_vec(),
                })
            })
            .collect();
        let kept = kept.and_then(|changes| {
            if self.tracking.is_none() {
                return Some((changes, Vec::new()));
            }
            // The tracker reads each change's ops: decode the kept bytes.
            let decoded: Option<Vec<automerge::Change>> = changes
                .iter()
                .map(|c| automerge::Change::try_from(c.bytes.as_slice()).ok())
                .collect();
            decoded.map(|d| (changes, d))
        });
        let (changes, natives) = match kept {
            Some(kept) => kept,
            None => {
                let natives = self.doc.get_changes(before);
                let changes = natives
                    .iter()
                    .map(|c| Change {
                        id: ChangeId(c.hash().0),
                        bytes: c.raw_bytes().to_vec(),
                    })
                    .collect();
                (changes, natives)
            }
        };
        if let Some(tracker) = &mut self.tracking {
            let mut before = before.to_vec();
            before.sort_unstable();
            // Only when nothing unseen came before them; otherwise the next take catches up.
            if before == tracker.heads {
                for change in &natives {
                    tracker.record(&self.doc, change);
                }
                after.sort_unstable();
                tracker.heads = after;
            }
        }
        changes
    }

    /// Drops the bytes and graph kept of recent changes (to send them on without rebuilding
    /// them, and to answer the sync protocol without automerge): a relay calls it when
    /// its peers are up to date, so an idle document holds none.
    pub fn forget_recent_changes(&mut self) {
        self.recent.clear();
        self.graph.clear();
    }

    /// The current heads.
    pub fn heads(&mut self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// Everything, compacted (with any changes still waiting for their dependencies after it,
    /// as automerge saves them). The save is kept for fresh sync peers.
    pub fn save(&mut self) -> Vec<u8> {
        let bytes = self.doc.save();
        self.keep_save(bytes.as_slice().into());
        bytes
    }

    /// The compacted document at the current heads: the kept save, or a new one (then kept).
    /// Keyed by heads, so any change (local, merged or made through [`AutomergeDoc::native`])
    /// makes the next call save again.
    fn saved_bytes(&mut self) -> &[u8] {
        let heads = self.doc.get_heads();
        let fresh = self.saved.as_ref().is_some_and(|s| s.heads == heads);
        if !fresh {
            let bytes = self.doc.save();
            self.keep_save(bytes.into());
        }
        self.saved.as_ref().map_or(&[], |s| &s.bytes[..])
    }

    /// Keeps `bytes`, a save of the document as it is now, for fresh peers and as its guard's
    /// checkpoint (a failed apply rebuilds from it: no save of the guard's own).
    fn keep_save(&mut self, bytes: Arc<[u8]>) {
        let heads = self.doc.get_heads();
        self.guard.adopt(&mut self.doc, bytes.clone());
        self.saved = Some(Saved { heads, bytes });
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
        if let Some(fresh) = self.fresh.iter().find(|f| f.path == *path) {
            return Some(fresh.to_json());
        }
        let obj = resolve(&self.doc, parent, path).ok()?;
        let (value, id) = self.doc.get(&obj, prop(last)).ok()??;
        Some(value_to_json(&self.doc, &value, &id))
    }

    /// Starts tracking which paths change (from now on).
    pub fn track_changes(&mut self) {
        if self.tracking.is_none() {
            let mut heads = self.doc.get_heads();
            heads.sort_unstable();
            self.tracking = Some(Tracker::new(heads));
        }
    }

    /// The paths changed since the last call (an op's object path plus its key; for lists and
    /// texts, the list or text), or `None` when that is not known: tracking was not on (it
    /// starts now), too much changed, or a change could not be followed. Then everything must be
    /// assumed changed.
    pub fn take_touched(&mut self) -> Option<Vec<Path>> {
        self.fresh.clear();
        let Some(tracker) = &mut self.tracking else {
            self.track_changes();
            return None;
        };
        let mut heads = self.doc.get_heads();
        heads.sort_unstable();
        if heads != tracker.heads {
            // Changes that came in without passing here (through `native`): decode them now.
            let unseen = self.doc.get_changes(&tracker.heads);
            if unseen.len() > MAX_UNSEEN_CHANGES {
                tracker.overflow = true;
            } else {
                for change in &unseen {
                    tracker.record(&self.doc, change);
                }
            }
            tracker.heads = heads;
        }
        let (touched, fresh) = tracker.take(&self.doc);
        self.fresh = fresh;
        touched
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

    /// Produces the next Automerge sync message for a peer, if one is due. A peer that has
    /// nothing gets the whole document in one message, compacted, from the kept save (see
    /// [`AutomergeDoc::whole_document_message`]).
    pub fn generate_sync_message(&mut self, state: &mut automerge::sync::State) -> Option<Vec<u8>> {
        if automerge_sync::waiting_for_ack(&mut self.doc, state) {
            return None;
        }
        if let Some(message) = self.whole_document_message(state) {
            return Some(message);
        }
        match automerge_sync::generate(&mut self.doc, state, &self.recent, &mut self.graph) {
            Generated::Message(message) => Some(message.encode()),
            Generated::Nothing => None,
            Generated::Automerge => self
                .doc
                .sync()
                .generate_sync_message(state)
                .map(|m| m.encode()),
        }
    }

    /// The message for a peer whose last message said it has nothing (empty heads) and that
    /// reads V2 messages: what automerge 0.12's `generate_sync_message` sends it (its
    /// "send the whole document" case), built here for two reasons:
    ///
    /// - automerge saves the document again for every such message, a cost proportional to the
    ///   whole history (hundreds of milliseconds for 260k edits); here the kept save is reused
    ///   while the heads are unchanged;
    /// - automerge's `have` is a Bloom filter over every change we hold (since the shared heads,
    ///   which are empty), about 10 bits per change, and the peer, once it holds the document,
    ///   tests each of its changes against it to answer. Here `have` says "everything up to our
    ///   heads" (`last_sync` = our heads, an empty filter), which is exact: the peer finds what
    ///   we lack from its change graph without a per-change scan. (It holds those heads when it
    ///   reads `have`: the document travels in the same message.)
    ///
    /// `None` when the case does not apply; then automerge decides. The state is updated as
    /// automerge would, except `sent_hashes` (it only filters later change lists for this peer,
    /// and a peer that answers with empty heads again resets it anyway; keeping every hash of a
    /// large document per fresh peer is the cost avoided).
    fn whole_document_message(&mut self, state: &mut automerge::sync::State) -> Option<Vec<u8>> {
        let fresh_peer = state.their_heads.as_ref().is_some_and(Vec::is_empty)
            && state
                .their_capabilities
                .as_ref()
                .is_some_and(|c| c.contains(&Capability::MessageV2))
            && state.their_need.is_some()
            && !state.peer_read_only
            && !state.needs_reset;
        if !fresh_peer {
            return None;
        }
        // A `have` naming changes we do not know asks for a reset: automerge handles that.
        let their_have = state.their_have.as_ref()?;
        if let Some(first) = their_have.first() {
            if !first
                .last_sync
                .iter()
                .all(|h| self.doc.get_change_meta_by_hash(h).is_some())
            {
                return None;
            }
        }
        let heads = self.doc.get_heads();
        if heads.is_empty() {
            return None;
        }
        // As automerge: nothing new while the last message is unanswered and our heads are the
        // same (it is the same document).
        if state.have_responded && state.last_sent_heads == heads && state.in_flight {
            return None;
        }
        let document = self.saved_bytes().to_vec();
        let mut flags = MessageFlags::new();
        flags.set(MessageFlags::SUPPORTS_SYNC_RESET);
        if state.read_only {
            flags.set(MessageFlags::READ_ONLY);
        }
        let message = automerge::sync::Message {
            heads: heads.clone(),
            // Their heads are empty: nothing of theirs can be missing here.
            need: Vec::new(),
            have: vec![Have {
                last_sync: heads.clone(),
                bloom: BloomFilter::default(),
            }],
            changes: document.into(),
            flags: Some(flags),
            version: MessageVersion::V2,
        };
        state.have_responded = true;
        state.last_sent_heads = heads;
        state.in_flight = true;
        Some(message.encode())
    }

    /// Applies a sync message from a peer; returns the changes that were new here.
    pub fn receive_sync_message(
        &mut self,
        state: &mut automerge::sync::State,
        bytes: &[u8],
    ) -> Result<Vec<Change>, DocError> {
        let message = automerge::sync::Message::decode(bytes)
            .map_err(|e| DocError::malformed("automerge sync message", e))?;
        self.fresh.clear();
        let before = self.doc.get_heads();
        if !message.changes.is_empty() {
            self.astral = true;
        }
        let carried = automerge_sync::keep_carried(&mut self.recent, &message).unwrap_or_default();
        self.receive_decoded(state, message, &carried)?;
        Ok(self.changes_since(&before))
    }

    /// Applies a decoded sync message that carries `carried` (see
    /// [`automerge_sync::receive`]).
    fn receive_decoded(
        &mut self,
        state: &mut automerge::sync::State,
        message: automerge::sync::Message,
        carried: &automerge_sync::Carried,
    ) -> Result<(), DocError> {
        automerge_sync::receive(
            &mut self.doc,
            state,
            message,
            &carried.changes,
            &mut self.graph,
            &mut self.guard,
        )
    }

    /// Applies sync messages from several peers (`states[i]` is the state of the peer that sent
    /// `payloads[i]`), with one Automerge apply for all the changes they carry when that is
    /// possible (see `automerge_sync::receive_batch`), one by one otherwise (a message that does
    /// not decode, or carries a whole document, or fewer than two carry changes). Returns, for
    /// each message, the changes that were new here and came with it, or its error: as one by
    /// one, a change that waited for its dependencies (in this batch or from an earlier one) is
    /// reported with the message that brought the last of them. No change that entered the
    /// document goes unreported: one that cannot be traced to a message (its dependencies no
    /// longer in the recent graph) is reported with the last message that brought changes.
    pub fn receive_sync_messages(
        &mut self,
        states: &mut [&mut automerge::sync::State],
        payloads: &[&[u8]],
    ) -> Vec<Result<Vec<Change>, DocError>> {
        let one_by_one = |this: &mut Self, states: &mut [&mut automerge::sync::State]| {
            states
                .iter_mut()
                .zip(payloads)
                .map(|(state, bytes)| this.receive_sync_message(state, bytes))
                .collect()
        };
        if states.len() != payloads.len() {
            return one_by_one(self, states);
        }
        let mut messages = Vec::with_capacity(payloads.len());
        let mut carried = Vec::with_capacity(payloads.len());
        for bytes in payloads {
            let Ok(message) = automerge::sync::Message::decode(bytes) else {
                return one_by_one(self, states);
            };
            let Some(changes) = automerge_sync::keep_carried(&mut self.recent, &message) else {
                return one_by_one(self, states);
            };
            messages.push(message);
            carried.push(changes);
        }
        if messages.iter().filter(|m| !m.changes.is_empty()).count() < 2 {
            return one_by_one(self, states);
        }
        self.fresh.clear();
        self.astral = true;
        let before = self.doc.get_heads();
        let mut results: Vec<Result<Vec<Change>, DocError>> = match automerge_sync::receive_batch(
            &mut self.doc,
            states,
            &messages,
            &carried,
            &mut self.graph,
            &mut self.guard,
        ) {
            Ok(()) => messages.iter().map(|_| Ok(Vec::new())).collect(),
            // Settle each again on its own: the failing one gets its error.
            Err(_) => states
                .iter_mut()
                .zip(messages)
                .zip(&carried)
                .map(|((state, message), carried)| {
                    self.receive_decoded(state, message, carried)
                        .map(|()| Vec::new())
                })
                .collect(),
        };
        let last = results
            .iter()
            .zip(&carried)
            .rposition(|(r, c)| r.is_ok() && !c.hashes.is_empty())
            .unwrap_or(0);
        // Each change goes with the message that applied it when they are received one by one:
        // the first that carried it, unless it waited for a dependency a later message brought
        // (Automerge queues a change until its dependencies are in), and a change queued from
        // an earlier batch goes with the message that completed it. The changes come in the
        // document's order, each after its dependencies, so theirs are placed already.
        let mut placed: HashMap<ChangeHash, usize> = HashMap::new();
        for change in self.changes_since(&before) {
            let hash = ChangeHash(change.id.0);
            let carrier = carried
                .iter()
                .zip(&results)
                .position(|(c, r)| r.is_ok() && c.hashes.contains(&hash));
            let completed = self
                .graph
                .deps(&hash)
                .and_then(|deps| deps.iter().filter_map(|d| placed.get(d).copied()).max());
            // (`None` orders before any `Some`: the later of the two that exist.)
            let carrier = carrier
                .max(completed)
                .filter(|i| results.get(*i).is_some_and(Result::is_ok))
                .unwrap_or(last);
            placed.insert(hash, carrier);
            match &mut results[carrier] {
                Ok(changes) => changes.push(change),
                // Only when nothing succeeded and yet the document changed: the change is
                // reported rather than the error.
                slot @ Err(_) => *slot = Ok(vec![change]),
            }
        }
        results
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

/// Whether `bytes` are exactly one saved document chunk (type 0, nothing after it), as
/// [`AutomergeDoc::save`] writes.
fn is_one_document(bytes: &[u8]) -> bool {
    const DOCUMENT: u8 = 0;
    matches!(next_chunk(bytes), Some((DOCUMENT, _, rest)) if rest.is_empty())
}

/// The first chunk of Automerge's storage format in `bytes`: its type, the whole chunk (magic,
/// 4 bytes of checksum, the type, the body's length as unsigned LEB128, the body) and what
/// follows it. `None` when `bytes` do not start with a whole chunk.
pub(super) fn next_chunk(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
    let (&kind, mut rest) = bytes.strip_prefix(&MAGIC[..])?.get(4..)?.split_first()?;
    let length = read_uleb(&mut rest)?;
    let end = (bytes.len() - rest.len()).checked_add(usize::try_from(length).ok()?)?;
    Some((kind, bytes.get(..end)?, bytes.get(end..)?))
}

/// Reads an unsigned LEB128 number (at most 64 bits) off the front of `bytes`.
pub(super) fn read_uleb(bytes: &mut &[u8]) -> Option<u64> {
    let mut value: u64 = 0;
    for shift in (0..64).step_by(7) {
        let (&byte, tail) = bytes.split_first()?;
        *bytes = tail;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Where an object lives: its path, exact when only map keys lead there; otherwise the path of
/// the outermost list or text on the way (positions in it move).
#[derive(Clone)]
struct Place {
    path: Path,
    exact: bool,
    /// The take window the object was made in (its making op reported it and all it holds).
    made: Option<u64>,
}

/// Which paths the changes since the last take touched.
struct Tracker {
    /// The heads (sorted) up to which every change was recorded.
    heads: Vec<ChangeHash>,
    touched: HashSet<Path>,
    /// Too much changed, or a change could not be followed: report "unknown".
    overflow: bool,
    /// Object id (counter, actor) to its place.
    objects: HashMap<(u64, automerge::ActorId), Place>,
    /// Counts takes.
    window: u64,
    /// Maps made this window under an object made before it (see [`FreshMap`]).
    pending: Vec<FreshMap>,
    /// Objects older than the window that the document showed at their path (they and every
    /// ancestor won their place) when last checked; one is forgotten as soon as an op writes at
    /// its path or an ancestor's, the only way it can stop being shown. Bounded by [`MAX_SHOWN`].
    shown: Vec<(automerge::ObjId, Path)>,
}

/// At most this many shown objects (collections) are remembered; beyond, they are checked again.
const MAX_SHOWN: usize = 64;

/// A map made in the current take window under an object that existed before (a new entry of a
/// collection), with what its ops wrote. Every op on it was decoded (it is no older than the
/// window, and any op on it depends on the change that made it), so while it stays `clean` (each
/// key put once with a scalar: no two writes, so no concurrent winner to pick; no delete,
/// increment or nested object) its contents are exactly `values`. Whether it is what the document
/// shows at `path` (it may have lost a conflict with another value there, or it or an ancestor
/// may have been deleted or replaced, in this window or, for the ancestors, before) is checked
/// at the take: it must win its place in its parent, and the parent must be shown (known from
/// [`Tracker::shown`], or checked up to the root). Otherwise, or when it is not clean, it is read
/// from the document as before.
struct FreshMap {
    /// The object's id: (counter, actor) of the op that made it.
    id: (u64, automerge::ActorId),
    path: Path,
    values: Vec<(String, ScalarValue)>,
    clean: bool,
}

impl FreshMap {
    /// The JSON the document would show for it (keys in order, as Automerge iterates a map).
    fn to_json(&self) -> serde_json::Value {
        let mut values: Vec<&(String, ScalarValue)> = self.values.iter().collect();
        values.sort_by(|a, b| a.0.cmp(&b.0));
        serde_json::Value::Object(
            values
                .into_iter()
                .map(|(k, v)| (k.clone(), scalar_to_json(v)))
                .collect(),
        )
    }
}

impl Tracker {
    fn new(heads: Vec<ChangeHash>) -> Self {
        Self {
            heads,
            touched: HashSet::new(),
            overflow: false,
            objects: HashMap::new(),
            window: 0,
            pending: Vec::new(),
            shown: Vec::new(),
        }
    }

    /// The touched paths (`None`: unknown) and the clean new maps of the window that `doc` shows
    /// at their path; starts the next window.
    fn take(&mut self, doc: &AutoCommit) -> (Option<Vec<Path>>, Vec<FreshMap>) {
        self.window += 1;
        let touched = std::mem::take(&mut self.touched);
        let mut fresh = std::mem::take(&mut self.pending);
        if std::mem::replace(&mut self.overflow, false) {
            // Some ops were not looked at: what was known shown may no longer be.
            self.shown.clear();
            return (None, Vec::new());
        }
        fresh.retain(|f| f.clean && self.is_shown(doc, f));
        (Some(touched.into_iter().collect()), fresh)
    }

    /// Whether `doc` shows the new map `fresh` at its path: it wins its place in its parent and
    /// the parent is shown (remembered, or checked up to the root and then remembered).
    fn is_shown(&mut self, doc: &AutoCommit, fresh: &FreshMap) -> bool {
        let Ok(id) = doc.import_obj(&format!("{}@{}", fresh.id.0, fresh.id.1)) else {
            return false;
        };
        let Ok(mut parents) = doc.parents(&id) else {
            return false;
        };
        let Some(parent) = parents.next().filter(|p| p.visible) else {
            return false;
        };
        if self.shown.iter().any(|(obj, _)| *obj == parent.obj) {
            return true;
        }
        if !parents.all(|p| p.visible) {
            return false;
        }
        let Some((parent_path, _)) = fresh.path.split_last() else {
            return false;
        };
        if self.shown.len() >= MAX_SHOWN {
            self.shown.clear();
        }
        self.shown.push((parent.obj, Path(parent_path.to_vec())));
        true
    }

    /// An op of a change inside the object `obj`, which was made in this window.
    fn written_inside(&mut self, obj: &LegacyObjId, op: &automerge::legacy::Op) {
        let LegacyObjId::Id(id) = obj else {
            return;
        };
        let Some(fresh) = self
            .pending
            .iter_mut()
            .find(|f| f.id.0 == id.0 && f.id.1 == id.1)
        else {
            return;
        };
        if !fresh.clean {
            return;
        }
        match (&op.key, &op.action) {
            (OpKey::Map(key), LegacyOpType::Put(value))
                if fresh.values.len() < MAX_FRESH_KEYS
                    && !fresh.values.iter().any(|(k, _)| k == key.as_str()) =>
            {
                fresh.values.push((key.to_string(), value.clone()));
            }
            _ => fresh.clean = false,
        }
    }

    fn touch(&mut self, path: Path) {
        if self.overflow {
            return;
        }
        if self.touched.len() >= MAX_TOUCHED && !self.touched.contains(&path) {
            self.overflow = true;
            self.touched.clear();
            return;
        }
        self.touched.insert(path);
    }

    /// Notes the paths one change (already applied to `doc`) touched.
    fn record(&mut self, doc: &AutoCommit, change: &automerge::Change) {
        if self.overflow {
            return;
        }
        // Decoding trusts what the change says; a change Automerge accepted should decode, but
        // nothing from the network may panic the engine: if it does, report "unknown".
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| change.decode()));
        let Ok(expanded) = decoded else {
            self.overflow = true;
            return;
        };
        let start = expanded.start_op.get();
        for (i, op) in expanded.operations.iter().enumerate() {
            let Some(place) = self.place_of(doc, &op.obj) else {
                self.overflow = true;
                return;
            };
            let fresh = place.made == Some(self.window);
            let (path, exact) = match &op.key {
                OpKey::Map(key) if place.exact => (place.path.key(key.as_str()), true),
                _ => (place.path, false),
            };
            if fresh {
                self.written_inside(&op.obj, op);
            } else if exact && !self.shown.is_empty() {
                // A write at a shown object's path or an ancestor's may hide it.
                self.shown.retain(|(_, shown)| !shown.starts_with(&path));
            }
            if let LegacyOpType::Make(kind) = op.action {
                if self.objects.len() >= MAX_OBJECTS {
                    self.objects.clear();
                    // Ops on a forgotten new map would no longer be seen as inside it.
                    self.pending.clear();
                }
                let id = (start + i as u64, expanded.actor_id.clone());
                if !fresh && exact && kind == ObjType::Map && self.pending.len() < MAX_FRESH {
                    self.pending.push(FreshMap {
                        id: id.clone(),
                        path: path.clone(),
                        values: Vec::new(),
                        clean: true,
                    });
                }
                let made = Some(self.window);
                let child = Place {
                    path: path.clone(),
                    exact,
                    made,
                };
                self.objects.insert(id, child);
            }
            // What a fresh object holds was reported with the object.
            if !fresh {
                self.touch(path);
            }
            if self.overflow {
                return;
            }
        }
    }

    /// The place of `obj`: cached, or looked up once through its parents.
    fn place_of(&mut self, doc: &AutoCommit, obj: &LegacyObjId) -> Option<Place> {
        let LegacyObjId::Id(id) = obj else {
            return Some(Place {
                path: Path::root(),
                exact: true,
                made: None,
            });
        };
        let key = (id.0, id.1.clone());
        if let Some(place) = self.objects.get(&key) {
            return Some(place.clone());
        }
        let exid = doc.import_obj(&format!("{}@{}", id.0, id.1)).ok()?;
        let mut props: Vec<Prop> = doc.parents(&exid).ok()?.map(|p| p.prop).collect();
        props.reverse();
        let mut place = Place {
            path: Path::root(),
            exact: true,
            made: None,
        };
        for prop in props {
            match prop {
                Prop::Map(key) if place.exact => place.path.0.push(Segment::Key(key)),
                _ => place.exact = false,
            }
        }
        if self.objects.len() >= MAX_OBJECTS {
            self.objects.clear();
            // Ops on a forgotten new map would no longer be seen as inside it.
            self.pending.clear();
        }
        self.objects.insert(key, place.clone());
        Some(place)
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
        // One pass over the object, rather than a lookup per key or index.
        Value::Object(ObjType::List) => J::Array(
            doc.list_range(id, ..)
                .map(|item| {
                    let child = item.id();
                    value_to_json(doc, &item.value.into_value(), &child)
                })
                .collect(),
        ),
        Value::Object(_) => J::Object(
            doc.map_range(id, ..)
                .map(|item| {
                    let child = item.id();
                    let key = item.key.into_owned();
                    (key, value_to_json(doc, &item.value.into_value(), &child))
                })
                .collect(),
        ),
    }
}

fn scalar_to_json(value: &ScalarValue) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn doc_with(value: serde_json::Value) -> AutomergeDoc {
        let mut doc = AutomergeDoc::new(ReplicaId::from_bytes([1; 16]));
        for (key, value) in value.as_object().expect("an object") {
            doc.apply_ops(&[Op::Put {
                path: Path::keys([key.as_str()]),
                value: value.clone(),
            }])
            .expect("put");
        }
        doc
    }

    fn tracked(doc: &mut AutomergeDoc) {
        doc.track_changes();
        assert_eq!(doc.take_touched(), Some(vec![]));
    }

    #[test]
    fn objects_made_before_tracking_are_found_through_their_parents() {
        let mut a = doc_with(json!({"wallet": {"entries": {"d1": {"amount": 1}}}}));
        let mut b = AutomergeDoc::load(ReplicaId::from_bytes([2; 16]), &a.save()).expect("load");
        tracked(&mut b);
        let change = a
            .apply_ops(&[Op::Put {
                path: Path::keys(["wallet", "entries", "d1", "amount"]),
                value: json!(2),
            }])
            .expect("ops")
            .expect("change");
        b.apply_changes(&change.bytes).expect("merge");
        assert_eq!(
            b.take_touched(),
            Some(vec![Path::keys(["wallet", "entries", "d1", "amount"])])
        );
    }

    #[test]
    fn a_new_object_is_reported_once_not_what_it_holds() {
        let mut doc = doc_with(json!({"wallet": {"entries": {}}}));
        tracked(&mut doc);
        doc.apply_ops(&[Op::Put {
            path: Path::keys(["wallet", "entries", "n1"]),
            value: json!({"amount": 1, "tags": ["x"]}),
        }])
        .expect("ops");
        assert_eq!(
            doc.take_touched(),
            Some(vec![Path::keys(["wallet", "entries", "n1"])])
        );
        doc.apply_ops(&[Op::Put {
            path: Path::keys(["wallet", "entries", "n1", "amount"]),
            value: json!(3),
        }])
        .expect("ops");
        assert_eq!(
            doc.take_touched(),
            Some(vec![Path::keys(["wallet", "entries", "n1", "amount"])])
        );
    }

    #[test]
    fn edits_inside_lists_and_texts_report_the_list_or_text() {
        let mut doc = doc_with(json!({"trip": {"stops": [{"name": "a"}]}}));
        doc.apply_ops(&[Op::Splice {
            path: Path::keys(["trip", "notes"]),
            index: 0,
            delete: 0,
            insert: "hi".into(),
        }])
        .expect("splice");
        let mut b = AutomergeDoc::load(ReplicaId::from_bytes([2; 16]), &doc.save()).expect("load");
        tracked(&mut b);
        for doc in [&mut doc, &mut b] {
            tracked(doc);
            doc.apply_ops(&[
                Op::Put {
                    path: Path(vec![
                        Segment::Key("trip".into()),
                        Segment::Key("stops".into()),
                        Segment::Index(0),
                        Segment::Key("name".into()),
                    ]),
                    value: json!("b"),
                },
                Op::Splice {
                    path: Path::keys(["trip", "notes"]),
                    index: 2,
                    delete: 0,
                    insert: "!".into(),
                },
            ])
            .expect("ops");
            let mut touched = doc.take_touched().expect("tracked");
            touched.sort_by_key(|p| format!("{p:?}"));
            assert_eq!(
                touched,
                vec![Path::keys(["trip", "notes"]), Path::keys(["trip", "stops"])]
            );
        }
    }

    /// What `doc` shows at each touched path equals what a copy that never tracked reads there.
    fn assert_reads_match(doc: &mut AutomergeDoc) -> usize {
        let touched = doc.take_touched().expect("tracked");
        let reference =
            AutomergeDoc::load(ReplicaId::from_bytes([9; 16]), &doc.save()).expect("load");
        for path in &touched {
            assert_eq!(doc.get_json(path), reference.get_json(path), "at {path}");
        }
        touched.len()
    }

    #[test]
    fn new_entries_are_read_from_their_ops() {
        let mut doc = doc_with(json!({"wallet": {"entries": {"d1": {"amount": 1}}}}));
        tracked(&mut doc);
        doc.apply_ops(&[Op::Put {
            path: Path::keys(["wallet", "entries", "n1"]),
            value: json!({"amount": 2.5, "kind": "spend", "by": "ana", "ok": true, "z": null}),
        }])
        .expect("ops");
        doc.take_touched().expect("tracked");
        assert_eq!(doc.fresh.len(), 1, "the new entry is known from its ops");
        let path = Path::keys(["wallet", "entries", "n1"]);
        let reference =
            AutomergeDoc::load(ReplicaId::from_bytes([9; 16]), &doc.save()).expect("load");
        assert_eq!(doc.get_json(&path), reference.get_json(&path));
        // Any change to the document forgets what the ops said.
        doc.apply_ops(&[Op::Put {
            path: Path::keys(["wallet", "entries", "n1", "amount"]),
            value: json!(3),
        }])
        .expect("ops");
        assert!(doc.fresh.is_empty());
        assert_eq!(doc.get_json(&path).expect("entry")["amount"], json!(3));
    }

    #[test]
    fn new_entries_written_twice_nested_or_deleted_are_read_from_the_document() {
        let mut doc = doc_with(json!({"wallet": {"entries": {}}}));
        tracked(&mut doc);
        let entry = |k: &str| Path::keys(["wallet", "entries", k]);
        doc.apply_ops(&[
            Op::Put {
                path: entry("a"),
                value: json!({"amount": 1}),
            },
            Op::Put {
                path: entry("a").key("amount"),
                value: json!(2),
            },
            Op::Put {
                path: entry("b"),
                value: json!({"tags": ["x"]}),
            },
            Op::Put {
                path: entry("c"),
                value: json!({"amount": 1}),
            },
            Op::Delete { path: entry("c") },
            Op::Put {
                path: entry("d"),
                value: json!({"amount": 1}),
            },
            Op::Put {
                path: entry("d"),
                value: json!({"amount": 4}),
            },
        ])
        .expect("ops");
        assert_eq!(assert_reads_match(&mut doc), 4);
    }

    #[test]
    fn new_entries_that_lose_a_conflict_or_sit_in_a_replaced_map_are_read_from_the_document() {
        let bytes = doc_with(json!({"wallet": {"entries": {"d1": {"amount": 1}}}})).save();
        let fork =
            |n: u8| AutomergeDoc::load(ReplicaId::from_bytes([n; 16]), &bytes).expect("load");
        let (mut a, mut b, mut c) = (fork(2), fork(3), fork(4));
        let mut server = fork(5);
        tracked(&mut server);
        // a and b write the same new entry concurrently; c replaces the whole collection.
        let ca = a
            .apply_ops(&[Op::Put {
                path: Path::keys(["wallet", "entries", "n"]),
                value: json!({"amount": 1, "by": "a"}),
            }])
            .expect("ops")
            .expect("change");
        let cb = b
            .apply_ops(&[Op::Put {
                path: Path::keys(["wallet", "entries", "n"]),
                value: json!({"amount": 2, "by": "b"}),
            }])
            .expect("ops")
            .expect("change");
        server.apply_changes(&ca.bytes).expect("merge");
        server.apply_changes(&cb.bytes).expect("merge");
        assert_eq!(assert_reads_match(&mut server), 1);
        let cc = c
            .apply_ops(&[Op::Put {
                path: Path::keys(["wallet", "entries"]),
                value: json!({}),
            }])
            .expect("ops")
            .expect("change");
        let ca2 = a
            .apply_ops(&[Op::Put {
                path: Path::keys(["wallet", "entries", "m"]),
                value: json!({"amount": 3}),
            }])
            .expect("ops")
            .expect("change");
        let mut late = server_copy(&mut server);
        // The replacement and a new entry in the replaced map in one window...
        server.apply_changes(&cc.bytes).expect("merge");
        server.apply_changes(&ca2.bytes).expect("merge");
        assert_eq!(assert_reads_match(&mut server), 2);
        // ... and in two: the replaced map was known shown, and must be forgotten.
        tracked(&mut late);
        late.apply_changes(&cc.bytes).expect("merge");
        assert_eq!(assert_reads_match(&mut late), 1);
        late.apply_changes(&ca2.bytes).expect("merge");
        assert_eq!(assert_reads_match(&mut late), 1);
    }

    /// A tracked copy of `doc` that has seen a new entry of `wallet/entries` (so it knows that
    /// collection is shown).
    fn server_copy(doc: &mut AutomergeDoc) -> AutomergeDoc {
        let mut copy =
            AutomergeDoc::load(ReplicaId::from_bytes([6; 16]), &doc.save()).expect("load");
        tracked(&mut copy);
        copy.apply_ops(&[Op::Put {
            path: Path::keys(["wallet", "entries", "s"]),
            value: json!({"amount": 5}),
        }])
        .expect("ops");
        copy.take_touched().expect("tracked");
        assert_eq!(copy.tracking.as_ref().map(|t| t.shown.len()), Some(1));
        copy
    }

    #[test]
    fn native_commits_are_caught_up_and_floods_are_unknown() {
        let mut doc = doc_with(json!({"wallet": {}}));
        tracked(&mut doc);
        let native = doc.native();
        let (_, wallet) = native.get(ROOT, "wallet").expect("get").expect("wallet");
        native.put(&wallet, "k", 1).expect("put");
        native.commit();
        assert_eq!(doc.commit(), None);
        assert_eq!(doc.take_touched(), Some(vec![Path::keys(["wallet", "k"])]));
        for i in 0..MAX_TOUCHED + 1 {
            doc.apply_ops(&[Op::Put {
                path: Path::keys(["wallet".to_string(), format!("k{i}")]),
                value: json!(i),
            }])
            .expect("ops");
        }
        assert_eq!(doc.take_touched(), None);
        assert_eq!(doc.take_touched(), Some(vec![]));
    }

    /// Sets `b` to 2: one more change.
    fn put_b(doc: &mut AutomergeDoc) -> Change {
        doc.apply_ops(&[Op::Put {
            path: Path::keys(["b"]),
            value: json!(2),
        }])
        .expect("ops")
        .expect("change")
    }

    #[test]
    fn the_save_is_kept_until_the_heads_change() {
        let mut doc = doc_with(json!({"a": 1}));
        let first = doc.save();
        assert!(is_one_document(&first));
        assert_eq!(doc.saved_bytes(), first.as_slice());
        let change = put_b(&mut doc);
        assert!(!is_one_document(&change.bytes));
        let second = doc.saved_bytes().to_vec();
        assert_ne!(second, first, "a change makes a new save");
        let loaded = AutomergeDoc::load(ReplicaId::from_bytes([3; 16]), &second).expect("load");
        assert_eq!(loaded.to_json(), json!({"a": 1, "b": 2}));
        // A change made natively is seen too (the save is keyed by heads).
        let native = doc.native();
        native.put(ROOT, "c", 3).expect("put");
        native.commit();
        let third = doc.saved_bytes().to_vec();
        let loaded = AutomergeDoc::load(ReplicaId::from_bytes([3; 16]), &third).expect("load");
        assert_eq!(loaded.to_json(), json!({"a": 1, "b": 2, "c": 3}));
    }

    #[test]
    fn only_one_whole_document_is_kept_on_load() {
        let mut doc = doc_with(json!({"a": 1}));
        let saved = doc.save();
        let replica = ReplicaId::from_bytes([4; 16]);
        let mut kept = AutomergeDoc::load_saved(replica, saved.clone()).expect("load");
        assert_eq!(
            kept.saved.as_ref().map(|s| s.bytes.to_vec()),
            Some(saved.clone())
        );
        assert_eq!(kept.saved_bytes(), saved.as_slice());
        let change = put_b(&mut doc);
        let mut joined = saved.clone();
        joined.extend_from_slice(&change.bytes);
        let not_kept = AutomergeDoc::load_saved(replica, joined).expect("load");
        assert!(not_kept.saved.is_none());
        assert_eq!(not_kept.to_json(), json!({"a": 1, "b": 2}));
        assert!(!is_one_document(&[]));
        assert!(!is_one_document(&saved[..saved.len() - 1]));
    }
}
