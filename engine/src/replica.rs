//! A replica: many documents, their storage, the outbox, and sync with peers, driven sans-IO.
//!
//! The driver (a socket loop, the server, a browser, a test) feeds it frames with
//! [`Replica::handle_frame`] and app edits with [`Replica::change`], then drains
//! [`Replica::poll_transmit`] (frames to send) and [`Replica::poll_event`] (what happened) after
//! every call. The replica never reads a clock, opens a socket or draws randomness.
//!
//! Durability: a local change is written to storage (document and outbox, one batch) before any
//! frame carrying it is queued; a change received from a peer is written before it is relayed.
//! The outbox holds local changes the server has not confirmed; it survives a restart, and an
//! [`Message::Ack`] from the server (its commit sequence number) moves changes out of it.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::doc::{Change, ChangeId, DocError, DocKind, Document, Op};
use crate::ids::{DocumentId, PeerId, ReplicaId};
use crate::invariant::{self, ChooseError, Conflict, Reconciler, Schema};
use crate::protocol::{
    encode_frames, DecodeError, ErrorCode, Limits, Message, Reassembler, PROTOCOL_VERSION,
};
use crate::storage::{Batch, OutboxEntry, SettledEntry, Settlement, Storage, StorageError, Write};
use crate::sync::{DocSync, SyncRole};

/// Tunables, each with a limit.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// Unconfirmed local changes kept at most; an edit past it fails with
    /// [`ReplicaError::OutboxFull`].
    pub max_outbox_changes: usize,
    /// Documents held at most (a peer cannot make a replica create more).
    pub max_documents: usize,
    /// Changes appended to a document before it is compacted into one snapshot.
    pub compact_every: usize,
    /// Frame and message size limits, for decoding and for splitting outgoing messages.
    pub limits: Limits,
    /// Settled changes (confirmed or rejected) whose status is remembered, oldest forgotten first.
    pub max_tracked_statuses: usize,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        Self {
            max_outbox_changes: 100_000,
            max_documents: 100_000,
            compact_every: 500,
            limits: Limits::default(),
            max_tracked_statuses: 100_000,
        }
    }
}

/// What can go wrong in a replica.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// A document refused an edit or a change.
    #[error(transparent)]
    Doc(#[from] DocError),
    /// Storage failed; nothing of the call was kept.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A frame did not decode.
    #[error("bad frame: {0}")]
    Decode(#[from] DecodeError),
    /// Stored bytes of a document did not load.
    #[error("document {document} is corrupt in storage: {error}")]
    CorruptDocument {
        /// Which.
        document: DocumentId,
        /// Why.
        error: DocError,
    },
    /// No such document.
    #[error("unknown document {0}")]
    UnknownDocument(DocumentId),
    /// The document exists already.
    #[error("document {0} exists already")]
    DocumentExists(DocumentId),
    /// The document is of the other kind.
    #[error("document {document} is {actual}, not {expected}")]
    WrongKind {
        /// Which.
        document: DocumentId,
        /// What it is.
        actual: DocKind,
        /// What was asked for.
        expected: DocKind,
    },
    /// The outbox is at its limit.
    #[error("outbox full ({0} unconfirmed changes)")]
    OutboxFull(usize),
    /// The document limit is reached.
    #[error("document limit ({0}) reached")]
    TooManyDocuments(usize),
    /// No such peer.
    #[error("unknown peer {0}")]
    UnknownPeer(PeerId),
    /// A conflict choice that cannot be made.
    #[error(transparent)]
    Choose(#[from] ChooseError),
    /// The peer broke the protocol.
    #[error("protocol violation by {peer}: {reason}")]
    Protocol {
        /// Who.
        peer: PeerId,
        /// What.
        reason: String,
    },
}

/// Where a document change came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// This replica's app.
    Local,
    /// A peer.
    Peer(PeerId),
}

/// Something that happened, for the app.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A document's state changed.
    DocumentChanged {
        /// Which.
        document: DocumentId,
        /// Who changed it.
        origin: Origin,
    },
    /// The server committed one of our changes.
    Confirmed {
        /// The document.
        document: DocumentId,
        /// The change.
        change: ChangeId,
        /// Its commit sequence number.
        seq: u64,
    },
    /// The server refused one of our changes.
    Rejected {
        /// The document.
        document: DocumentId,
        /// The change.
        change: ChangeId,
        /// Why, as a code.
        code: ErrorCode,
        /// Why, in words.
        reason: String,
    },
    /// The server opened the session.
    Connected {
        /// The server.
        peer: PeerId,
    },
    /// The server accepted a subscription.
    Subscribed {
        /// The server.
        peer: PeerId,
        /// The document.
        document: DocumentId,
        /// Its latest commit sequence number.
        head_seq: u64,
        /// Whether we may only read.
        read_only: bool,
    },
    /// The document breaks invariants (checked locally after a change or merge): a warning
    /// for the app ("this may be rejected"); the server decides.
    Violations {
        /// The document.
        document: DocumentId,
        /// (invariant id, reason) of each open violation.
        violations: Vec<(String, String)>,
    },
    /// A resolution of the invariant layer voided or overrode one of this replica's changes.
    Compensated {
        /// The document.
        document: DocumentId,
        /// The change.
        change: ChangeId,
        /// The violation's key.
        violation: String,
        /// Why, in words.
        reason: String,
    },
    /// A peer reported an error.
    PeerError {
        /// Who.
        peer: PeerId,
        /// What, as a code.
        code: ErrorCode,
        /// The document, if one.
        document: Option<DocumentId>,
        /// What, in words.
        message: String,
    },
}

/// Where one of this replica's changes stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeStatus {
    /// Not yet confirmed by the server.
    Pending,
    /// Committed by the server with this sequence number.
    Confirmed {
        /// The commit sequence number.
        seq: u64,
    },
    /// Refused by the server.
    Rejected {
        /// Why, as a code.
        code: ErrorCode,
        /// Why, in words.
        reason: String,
    },
    /// Committed, then repaired by the invariant layer: a resolution voided or overrode it.
    Compensated {
        /// The violation's key (the resolution's key in the document).
        violation: String,
        /// The invariant.
        invariant: String,
        /// Why, in words.
        reason: String,
        /// Who decided.
        by: String,
    },
    /// Not a change this replica knows about (or its status was forgotten).
    Unknown,
}

/// A frame to send to a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// To whom.
    pub peer: PeerId,
    /// The encoded frame.
    pub frame: Vec<u8>,
}

struct DocEntry {
    doc: Document,
    appended_since_snapshot: usize,
    last_seq: u64,
}

struct Peer {
    role: SyncRole,
    token: Option<String>,
    welcomed: bool,
    wanted: Vec<DocumentId>,
    docs: HashMap<DocumentId, DocSync>,
    reassembler: Reassembler,
    /// The largest frame to send this peer: ours, or the server's if smaller (from `Welcome`).
    max_frame_bytes: usize,
}

/// The smallest frame limit a server can impose on us (a smaller one would shatter messages).
const MIN_FRAME_BYTES: usize = 4096;

/// A replica of many documents. See the [module docs](self).
pub struct Replica<S: Storage> {
    id: ReplicaId,
    config: ReplicaConfig,
    storage: S,
    docs: HashMap<DocumentId, DocEntry>,
    kinds: BTreeMap<DocumentId, DocKind>,
    peers: BTreeMap<PeerId, Peer>,
    outbox: BTreeMap<u64, OutboxEntry>,
    outbox_index: HashMap<(DocumentId, ChangeId), u64>,
    outbox_next: u64,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    next_stream: u32,
    statuses: HashMap<(DocumentId, ChangeId), Settlement>,
    status_order: VecDeque<(DocumentId, ChangeId)>,
    schemas: BTreeMap<String, Schema>,
    checkers: HashMap<DocumentId, Reconciler>,
    /// Resolutions already looked at for our changes, per document (bounded with the statuses).
    seen_resolutions: HashMap<DocumentId, std::collections::HashSet<String>>,
}

impl<S: Storage> Replica<S> {
    /// Opens a replica on `storage`. Its id is the stored one, or `new_id` (fresh randomness from
    /// the caller) for a new store, which is then stored.
    pub fn open(
        mut storage: S,
        new_id: ReplicaId,
        config: ReplicaConfig,
    ) -> Result<Self, ReplicaError> {
        let id = match storage.replica_id()? {
            Some(id) => id,
            None => {
                storage.write(&Batch {
                    writes: vec![Write::SetReplicaId(new_id)],
                })?;
                new_id
            }
        };
        let kinds = storage.documents()?.into_iter().collect();
        let mut replica = Self {
            id,
            config,
            storage,
            docs: HashMap::new(),
            kinds,
            peers: BTreeMap::new(),
            outbox: BTreeMap::new(),
            outbox_index: HashMap::new(),
            outbox_next: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            next_stream: 0,
            statuses: HashMap::new(),
            status_order: VecDeque::new(),
            schemas: BTreeMap::new(),
            checkers: HashMap::new(),
            seen_resolutions: HashMap::new(),
        };
        for entry in replica.storage.outbox()? {
            replica.outbox_insert(entry);
        }
        // Statuses settled before a restart read the same after it. They are advisory: a store
        // whose statuses do not read back still opens (its documents and outbox are what
        // matter), and its changes read `Unknown` until settled again.
        let stored = replica.storage.settled().unwrap_or_default();
        let mut forget = Batch::default();
        for entry in stored {
            for (document, change) in
                replica.remember(entry.document, entry.change, entry.settlement)
            {
                forget.push(Write::ForgetSettled { document, change });
            }
        }
        replica.storage.write(&forget)?;
        Ok(replica)
    }

    /// This replica's id.
    pub fn id(&self) -> ReplicaId {
        self.id
    }

    /// The storage (to inspect or close it).
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// Every document this replica holds, with its kind.
    pub fn documents(&self) -> impl Iterator<Item = (DocumentId, DocKind)> + '_ {
        self.kinds.iter().map(|(id, kind)| (*id, *kind))
    }

    /// Creates an empty document.
    pub fn create(&mut self, document: DocumentId, kind: DocKind) -> Result<(), ReplicaError> {
        if self.kinds.contains_key(&document) {
            return Err(ReplicaError::DocumentExists(document));
        }
        self.create_unchecked(document, kind)
    }

    fn create_unchecked(
        &mut self,
        document: DocumentId,
        kind: DocKind,
    ) -> Result<(), ReplicaError> {
        if self.kinds.len() >= self.config.max_documents {
            return Err(ReplicaError::TooManyDocuments(self.config.max_documents));
        }
        self.storage.write(&Batch {
            writes: vec![Write::CreateDocument { document, kind }],
        })?;
        self.kinds.insert(document, kind);
        self.docs.insert(
            document,
            DocEntry {
                doc: Document::new(kind, self.id, document),
                appended_since_snapshot: 0,
                last_seq: 0,
            },
        );
        Ok(())
    }

    /// Whether the replica holds `document`.
    pub fn contains(&self, document: DocumentId) -> bool {
        self.kinds.contains_key(&document)
    }

    /// The document, loading it from storage on first use.
    pub fn document(&mut self, document: DocumentId) -> Result<&mut Document, ReplicaError> {
        Ok(&mut self.entry(document)?.doc)
    }

    /// The document's whole state as JSON.
    pub fn json(&mut self, document: DocumentId) -> Result<serde_json::Value, ReplicaError> {
        Ok(self.entry(document)?.doc.to_json())
    }

    /// The highest commit sequence number learned for `document`.
    pub fn last_seq(&mut self, document: DocumentId) -> Result<u64, ReplicaError> {
        Ok(self.entry(document)?.last_seq)
    }

    /// Unloads a document from memory (it stays in storage).
    pub fn unload(&mut self, document: DocumentId) {
        self.docs.remove(&document);
        // Its local checker followed the unloaded document's changes; a reload starts afresh.
        self.checkers.remove(&document);
    }

    fn entry(&mut self, document: DocumentId) -> Result<&mut DocEntry, ReplicaError> {
        load(&mut self.docs, &mut self.storage, self.id, document)
    }

    /// Local changes not yet confirmed by the server, oldest first.
    pub fn outbox(&self) -> impl Iterator<Item = &OutboxEntry> {
        self.outbox.values()
    }

    /// Whether `change` of `document` still waits for the server.
    pub fn is_pending(&self, document: DocumentId, change: ChangeId) -> bool {
        self.outbox_index.contains_key(&(document, change))
    }

    /// Edits a document through the JSON API, as one change. Returns its id, or `None` when the
    /// ops changed nothing.
    pub fn change(
        &mut self,
        document: DocumentId,
        ops: &[Op],
    ) -> Result<Option<ChangeId>, ReplicaError> {
        self.check_outbox_room()?;
        let result = self.entry(document)?.doc.apply_ops(ops);
        match result {
            Ok(change) => change.map(|c| self.record_local(document, c)).transpose(),
            Err(partial) => {
                if let Some(change) = partial.change {
                    self.record_local(document, change)?;
                }
                Err(partial.error.into())
            }
        }
    }

    /// Edits an Automerge document natively; whatever `f` did is committed as one change.
    pub fn change_automerge<R>(
        &mut self,
        document: DocumentId,
        f: impl FnOnce(&mut automerge::AutoCommit) -> R,
    ) -> Result<(R, Option<ChangeId>), ReplicaError> {
        self.check_outbox_room()?;
        let entry = self.entry(document)?;
        let Document::Automerge(doc) = &mut entry.doc else {
            return Err(ReplicaError::WrongKind {
                document,
                actual: entry.doc.kind(),
                expected: DocKind::Automerge,
            });
        };
        let result = f(doc.native());
        let change = doc.commit();
        let id = change.map(|c| self.record_local(document, c)).transpose()?;
        Ok((result, id))
    }

    /// Edits a Yrs document natively in one transaction, committed as one change.
    pub fn change_yrs<R>(
        &mut self,
        document: DocumentId,
        f: impl FnOnce(&mut yrs::TransactionMut) -> R,
    ) -> Result<(R, Option<ChangeId>), ReplicaError> {
        self.check_outbox_room()?;
        let entry = self.entry(document)?;
        let Document::Yrs(doc) = &mut entry.doc else {
            return Err(ReplicaError::WrongKind {
                document,
                actual: entry.doc.kind(),
                expected: DocKind::Yrs,
            });
        };
        let (change, result) = doc.change_native(f);
        let id = change.map(|c| self.record_local(document, c)).transpose()?;
        Ok((result, id))
    }

    fn check_outbox_room(&self) -> Result<(), ReplicaError> {
        if self.outbox.len() >= self.config.max_outbox_changes {
            return Err(ReplicaError::OutboxFull(self.config.max_outbox_changes));
        }
        Ok(())
    }

    /// Persists a local change with its outbox entry, then offers it to every peer.
    fn record_local(
        &mut self,
        document: DocumentId,
        change: Change,
    ) -> Result<ChangeId, ReplicaError> {
        let entry = OutboxEntry {
            document,
            change: change.id,
            bytes: change.bytes.clone(),
        };
        let mut batch = Batch::default();
        batch.push(Write::AppendChange {
            document,
            bytes: change.bytes.clone(),
        });
        batch.push(Write::PushOutbox(entry.clone()));
        self.persist(document, batch, 1)?;
        self.outbox_insert(entry);
        self.events.push_back(Event::DocumentChanged {
            document,
            origin: Origin::Local,
        });
        self.warn(document);
        self.offer(document, std::slice::from_ref(&change), None)?;
        Ok(change.id)
    }

    /// Writes a batch that appended `appended` changes to `document`, compacting when due. On
    /// failure the in-memory document is dropped so memory never runs ahead of storage.
    fn persist(
        &mut self,
        document: DocumentId,
        mut batch: Batch,
        appended: usize,
    ) -> Result<(), ReplicaError> {
        let compact_every = self.config.compact_every;
        if let Some(entry) = self.docs.get_mut(&document) {
            if entry.appended_since_snapshot + appended >= compact_every {
                batch
                    .writes
                    .retain(|w| !matches!(w, Write::AppendChange { .. }));
                batch.push(Write::Snapshot {
                    document,
                    bytes: entry.doc.save(),
                });
            }
        }
        match self.storage.write(&batch) {
            Ok(()) => {
                if let Some(entry) = self.docs.get_mut(&document) {
                    let compacted = batch
                        .writes
                        .iter()
                        .any(|w| matches!(w, Write::Snapshot { .. }));
                    entry.appended_since_snapshot = if compacted {
                        0
                    } else {
                        entry.appended_since_snapshot + appended
                    };
                }
                Ok(())
            }
            Err(e) => {
                self.docs.remove(&document);
                Err(e.into())
            }
        }
    }

    fn outbox_insert(&mut self, entry: OutboxEntry) {
        let key = (entry.document, entry.change);
        if self.outbox_index.contains_key(&key) {
            return;
        }
        let order = self.outbox_next;
        self.outbox_next += 1;
        self.outbox_index.insert(key, order);
        self.outbox.insert(order, entry);
    }

    /// Starts a session with a server: sends hello; documents are subscribed with
    /// [`Replica::sync_document`].
    pub fn connect_upstream(&mut self, peer: PeerId, token: Option<String>) {
        self.peers
            .insert(peer, self.new_peer(SyncRole::Upstream, token.clone()));
        self.send(
            peer,
            &Message::Hello {
                protocol_version: PROTOCOL_VERSION,
                replica: self.id,
                token,
            },
        );
    }

    /// Starts syncing with another replica directly.
    pub fn connect_peer(&mut self, peer: PeerId) {
        let mut state = self.new_peer(SyncRole::Peer, None);
        state.welcomed = true;
        self.peers.insert(peer, state);
    }

    fn new_peer(&self, role: SyncRole, token: Option<String>) -> Peer {
        Peer {
            role,
            token,
            welcomed: false,
            wanted: Vec::new(),
            docs: HashMap::new(),
            reassembler: Reassembler::new(self.config.limits),
            max_frame_bytes: self.config.limits.max_frame_bytes,
        }
    }

    /// Forgets a peer's session state (after its connection closed). The documents and the outbox
    /// stay; a new session starts again with a fresh handshake.
    pub fn disconnect(&mut self, peer: PeerId) {
        self.peers.remove(&peer);
    }

    /// Whether `peer` is connected.
    pub fn is_connected(&self, peer: PeerId) -> bool {
        self.peers.contains_key(&peer)
    }

    /// Syncs `document` with `peer`: subscribes at a server, or starts the sync protocol with
    /// another replica.
    pub fn sync_document(
        &mut self,
        peer: PeerId,
        document: DocumentId,
    ) -> Result<(), ReplicaError> {
        let kind = *self
            .kinds
            .get(&document)
            .ok_or(ReplicaError::UnknownDocument(document))?;
        let state = self
            .peers
            .get_mut(&peer)
            .ok_or(ReplicaError::UnknownPeer(peer))?;
        match state.role {
            SyncRole::Upstream => {
                if !state.wanted.contains(&document) {
                    state.wanted.push(document);
                }
                if state.welcomed {
                    let since_seq = self.entry(document)?.last_seq;
                    self.send(
                        peer,
                        &Message::Subscribe {
                            document,
                            kind,
                            since_seq,
                        },
                    );
                }
                Ok(())
            }
            SyncRole::Peer | SyncRole::Downstream => {
                state
                    .docs
                    .entry(document)
                    .or_insert_with(|| DocSync::new(kind, state.role));
                self.flush(peer, document)
            }
        }
    }

    /// Handles one frame from `peer`. On error the frame is dropped and the caller should close
    /// the connection; nothing already stored is lost.
    pub fn handle_frame(&mut self, peer: PeerId, frame: &[u8]) -> Result<(), ReplicaError> {
        let state = self
            .peers
            .get_mut(&peer)
            .ok_or(ReplicaError::UnknownPeer(peer))?;
        match state.reassembler.push(frame)? {
            Some(message) => self.handle_message(peer, message),
            None => Ok(()),
        }
    }

    /// Handles one decoded message from `peer`.
    pub fn handle_message(&mut self, peer: PeerId, message: Message) -> Result<(), ReplicaError> {
        let role = self
            .peers
            .get(&peer)
            .ok_or(ReplicaError::UnknownPeer(peer))?
            .role;
        match message {
            Message::Welcome {
                max_frame_bytes, ..
            } if role == SyncRole::Upstream => {
                let wanted = match self.peers.get_mut(&peer) {
                    Some(state) => {
                        state.welcomed = true;
                        let theirs = usize::try_from(max_frame_bytes).unwrap_or(usize::MAX);
                        state.max_frame_bytes =
                            state.max_frame_bytes.min(theirs).max(MIN_FRAME_BYTES);
                        state.wanted.clone()
                    }
                    None => Vec::new(),
                };
                self.events.push_back(Event::Connected { peer });
                for document in wanted {
                    self.sync_document(peer, document)?;
                }
                Ok(())
            }
            Message::Subscribed {
                document,
                kind,
                head_seq,
                read_only,
            } if role == SyncRole::Upstream => {
                let ours = *self
                    .kinds
                    .get(&document)
                    .ok_or(ReplicaError::UnknownDocument(document))?;
                if ours != kind {
                    return Err(ReplicaError::WrongKind {
                        document,
                        actual: ours,
                        expected: kind,
                    });
                }
                if let Some(state) = self.peers.get_mut(&peer) {
                    state
                        .docs
                        .insert(document, DocSync::new(kind, SyncRole::Upstream));
                }
                self.events.push_back(Event::Subscribed {
                    peer,
                    document,
                    head_seq,
                    read_only,
                });
                self.flush(peer, document)
            }
            Message::Sync { document, payload } => self.handle_sync(peer, role, document, payload),
            Message::Ack { document, commits } if role == SyncRole::Upstream => {
                let mut batch = Batch::default();
                let mut confirmed = Vec::new();
                let mut highest = 0;
                for commit in commits {
                    highest = highest.max(commit.seq);
                    if self.outbox_index.contains_key(&(document, commit.change)) {
                        batch.push(Write::RemoveOutbox {
                            document,
                            change: commit.change,
                        });
                        if self.config.max_tracked_statuses > 0 {
                            batch.push(Write::Settle(SettledEntry {
                                document,
                                change: commit.change,
                                settlement: Settlement::Confirmed { seq: commit.seq },
                            }));
                        }
                        confirmed.push(commit);
                    }
                }
                if self.kinds.contains_key(&document) {
                    batch.push(Write::SetLastSeq {
                        document,
                        seq: highest,
                    });
                }
                let settled: Vec<_> = confirmed.iter().map(|c| (document, c.change)).collect();
                self.forget_to_make_room(&settled, &mut batch);
                self.storage.write(&batch)?;
                if let Some(entry) = self.docs.get_mut(&document) {
                    entry.last_seq = entry.last_seq.max(highest);
                }
                for commit in &confirmed {
                    self.outbox_remove(document, commit.change);
                    self.remember(
                        document,
                        commit.change,
                        Settlement::Confirmed { seq: commit.seq },
                    );
                }
                for commit in confirmed {
                    self.events.push_back(Event::Confirmed {
                        document,
                        change: commit.change,
                        seq: commit.seq,
                    });
                }
                Ok(())
            }
            Message::Reject {
                document,
                change,
                code,
                reason,
            } if role == SyncRole::Upstream => {
                let settlement = Settlement::Rejected {
                    code,
                    reason: reason.clone(),
                };
                let mut batch = Batch::default();
                let ours = self.outbox_index.contains_key(&(document, change));
                if ours {
                    batch.push(Write::RemoveOutbox { document, change });
                }
                if self.config.max_tracked_statuses > 0 {
                    batch.push(Write::Settle(SettledEntry {
                        document,
                        change,
                        settlement: settlement.clone(),
                    }));
                }
                self.forget_to_make_room(&[(document, change)], &mut batch);
                self.storage.write(&batch)?;
                if ours {
                    self.outbox_remove(document, change);
                }
                self.remember(document, change, settlement);
                self.events.push_back(Event::Rejected {
                    document,
                    change,
                    code,
                    reason,
                });
                Ok(())
            }
            Message::Error {
                code,
                document,
                message,
            } => {
                self.events.push_back(Event::PeerError {
                    peer,
                    code,
                    document,
                    message,
                });
                Ok(())
            }
            other => Err(ReplicaError::Protocol {
                peer,
                reason: format!("unexpected {} message", other.name()),
            }),
        }
    }

    fn outbox_remove(&mut self, document: DocumentId, change: ChangeId) {
        if let Some(order) = self.outbox_index.remove(&(document, change)) {
            self.outbox.remove(&order);
        }
    }

    fn handle_sync(
        &mut self,
        peer: PeerId,
        role: SyncRole,
        document: DocumentId,
        payload: crate::protocol::SyncPayload,
    ) -> Result<(), ReplicaError> {
        if !self.kinds.contains_key(&document) {
            if role == SyncRole::Upstream {
                return Err(ReplicaError::UnknownDocument(document));
            }
            self.create_unchecked(document, payload.kind())?;
        }
        let kind = self.kinds[&document];
        if payload.kind() != kind {
            return Err(DocError::KindMismatch {
                expected: kind,
                got: payload.kind(),
            }
            .into());
        }
        let entry = load(&mut self.docs, &mut self.storage, self.id, document)?;
        let Some(state) = self.peers.get_mut(&peer) else {
            return Err(ReplicaError::UnknownPeer(peer));
        };
        if role == SyncRole::Upstream && !state.docs.contains_key(&document) {
            return Err(ReplicaError::Protocol {
                peer,
                reason: format!("sync for {document} before it was subscribed"),
            });
        }
        let sync = state
            .docs
            .entry(document)
            .or_insert_with(|| DocSync::new(kind, role));
        let received = sync.receive(&mut entry.doc, payload)?;
        if received.resend_unconfirmed {
            for outbox_entry in self.outbox.values().filter(|e| e.document == document) {
                sync.queue_update_now(&outbox_entry.bytes);
            }
        }
        if !received.changes.is_empty() {
            let mut batch = Batch::default();
            for change in &received.changes {
                batch.push(Write::AppendChange {
                    document,
                    bytes: change.bytes.clone(),
                });
            }
            self.persist(document, batch, received.changes.len())?;
            self.events.push_back(Event::DocumentChanged {
                document,
                origin: Origin::Peer(peer),
            });
            self.warn(document);
            self.notice_compensations(document);
        }
        self.offer(document, &received.changes, Some(peer))?;
        self.flush(peer, document)
    }

    /// Offers new changes of `document` to every peer syncing it, except `except`.
    fn offer(
        &mut self,
        document: DocumentId,
        changes: &[Change],
        except: Option<PeerId>,
    ) -> Result<(), ReplicaError> {
        let peers: Vec<PeerId> = self
            .peers
            .iter_mut()
            .filter(|(id, _)| Some(**id) != except)
            .filter_map(|(id, state)| {
                let sync = state.docs.get_mut(&document)?;
                for change in changes {
                    sync.queue_update(&change.bytes);
                }
                Some(*id)
            })
            .collect();
        for peer in peers {
            self.flush(peer, document)?;
        }
        Ok(())
    }

    /// Sends whatever the sync state of (`peer`, `document`) has due.
    fn flush(&mut self, peer: PeerId, document: DocumentId) -> Result<(), ReplicaError> {
        let entry = load(&mut self.docs, &mut self.storage, self.id, document)?;
        let Some(sync) = self
            .peers
            .get_mut(&peer)
            .and_then(|p| p.docs.get_mut(&document))
        else {
            return Ok(());
        };
        let payloads = sync.poll(&mut entry.doc);
        for payload in payloads {
            self.send(peer, &Message::Sync { document, payload });
        }
        Ok(())
    }

    fn send(&mut self, peer: PeerId, message: &Message) {
        self.next_stream = self.next_stream.wrapping_add(1);
        let max_frame_bytes = self
            .peers
            .get(&peer)
            .map_or(self.config.limits.max_frame_bytes, |p| p.max_frame_bytes);
        for frame in encode_frames(message, max_frame_bytes, self.next_stream) {
            self.transmits.push_back(Transmit { peer, frame });
        }
    }

    /// The next frame to send, if any. Drain after every call into the replica.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event, if any. Drain after every call into the replica.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Adds the invariants of a document type. Documents that declare that type
    /// ([`invariant::type_op`]) are then checked after every change and merge, and
    /// [`Event::Violations`] warns the app; the server remains the one that repairs.
    pub fn add_schema(&mut self, schema: Schema) {
        self.schemas.insert(schema.document_type.clone(), schema);
        self.checkers.clear();
    }

    /// The open violations of `document` under its schema (empty without one).
    pub fn check_invariants(
        &mut self,
        document: DocumentId,
    ) -> Result<Vec<invariant::Violation>, ReplicaError> {
        let kind = *self
            .kinds
            .get(&document)
            .ok_or(ReplicaError::UnknownDocument(document))?;
        let entry = load(&mut self.docs, &mut self.storage, self.id, document)?;
        if !self.checkers.contains_key(&document) {
            let Some(schema) = invariant::read_type(&entry.doc).and_then(|t| self.schemas.get(&t))
            else {
                return Ok(Vec::new());
            };
            let checker = Reconciler::new(schema, document, kind, self.id.to_string(), false);
            self.checkers.insert(document, checker);
        }
        Ok(match self.checkers.get_mut(&document) {
            Some(checker) => checker.observe(&mut entry.doc, None, &[]),
            None => Vec::new(),
        })
    }

    fn warn(&mut self, document: DocumentId) {
        if self.schemas.is_empty() {
            return;
        }
        if let Ok(violations) = self.check_invariants(document) {
            if !violations.is_empty() {
                self.events.push_back(Event::Violations {
                    document,
                    violations: violations
                        .into_iter()
                        .map(|v| (v.invariant, v.reason))
                        .collect(),
                });
            }
        }
    }

    /// The storage, mutably (for drivers that move its writes elsewhere, e.g. to IndexedDB).
    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.storage
    }

    /// Raises [`Event::Compensated`] for new resolutions that name one of our changes.
    fn notice_compensations(&mut self, document: DocumentId) {
        let Some(entry) = self.docs.get(&document) else {
            return;
        };
        let records = invariant::read_records(&entry.doc);
        let seen = self.seen_resolutions.entry(document).or_default();
        let mut found = Vec::new();
        for (key, resolution) in &records.resolutions {
            if !seen.insert(key.clone()) {
                continue;
            }
            for hex in &resolution.victim_changes {
                let Some(change) = ChangeId::from_hex(hex) else {
                    continue;
                };
                let ours = self.statuses.contains_key(&(document, change))
                    || self.outbox_index.contains_key(&(document, change));
                if ours {
                    found.push(Event::Compensated {
                        document,
                        change,
                        violation: key.clone(),
                        reason: resolution.reason.clone(),
                    });
                }
            }
        }
        self.events.extend(found);
    }

    /// Where one of this replica's changes stands: pending, confirmed, rejected, or compensated
    /// by a resolution of the invariant layer (with the reason).
    pub fn change_status(
        &mut self,
        document: DocumentId,
        change: ChangeId,
    ) -> Result<ChangeStatus, ReplicaError> {
        let entry = self.entry(document)?;
        let records = invariant::read_records(&entry.doc);
        let hex = change.to_hex();
        if let Some((key, r)) = records.affecting_change(&hex).next() {
            return Ok(ChangeStatus::Compensated {
                violation: key.clone(),
                invariant: r.invariant.clone(),
                reason: r.reason.clone(),
                by: r.by.clone(),
            });
        }
        Ok(match self.statuses.get(&(document, change)) {
            Some(Settlement::Confirmed { seq }) => ChangeStatus::Confirmed { seq: *seq },
            Some(Settlement::Rejected { code, reason }) => ChangeStatus::Rejected {
                code: *code,
                reason: reason.clone(),
            },
            None if self.is_pending(document, change) => ChangeStatus::Pending,
            None => ChangeStatus::Unknown,
        })
    }

    /// The open conflicts of `document` (the conflict inbox), by key.
    pub fn conflicts(
        &mut self,
        document: DocumentId,
    ) -> Result<Vec<(String, Conflict)>, ReplicaError> {
        let entry = self.entry(document)?;
        let records = invariant::read_records(&entry.doc);
        Ok(records
            .open_conflicts()
            .map(|(k, c)| (k.clone(), c.clone()))
            .collect())
    }

    /// Settles the open conflict `key` with option `choice`, decided by `by`: a change like any
    /// other, which closes the conflict on every replica once it syncs.
    pub fn resolve_conflict(
        &mut self,
        document: DocumentId,
        key: &str,
        choice: usize,
        by: &str,
    ) -> Result<Option<ChangeId>, ReplicaError> {
        let entry = self.entry(document)?;
        let ops = invariant::choose(&entry.doc, key, choice, by)?;
        self.change(document, &ops)
    }

    /// Remembers a settled status in memory, bounded by `max_tracked_statuses`; returns the
    /// statuses it forgot to stay within the bound, oldest first.
    fn remember(
        &mut self,
        document: DocumentId,
        change: ChangeId,
        settlement: Settlement,
    ) -> Vec<(DocumentId, ChangeId)> {
        let mut forgotten = Vec::new();
        if self.config.max_tracked_statuses == 0 {
            return forgotten;
        }
        if self
            .statuses
            .insert((document, change), settlement)
            .is_none()
        {
            self.status_order.push_back((document, change));
        }
        while self.status_order.len() > self.config.max_tracked_statuses {
            if let Some(old) = self.status_order.pop_front() {
                self.statuses.remove(&old);
                forgotten.push(old);
            }
        }
        forgotten
    }

    /// Adds to `batch` the `ForgetSettled` writes that [`Replica::remember`] will need when
    /// `settling` is remembered next, so the statuses on disk and in memory stay the same set
    /// with one write.
    fn forget_to_make_room(&self, settling: &[(DocumentId, ChangeId)], batch: &mut Batch) {
        let max = self.config.max_tracked_statuses;
        if max == 0 {
            return;
        }
        let mut new = std::collections::HashSet::new();
        for key in settling {
            if !self.statuses.contains_key(key) {
                new.insert(*key);
            }
        }
        let over = (self.status_order.len() + new.len()).saturating_sub(max);
        for (document, change) in self.status_order.iter().take(over) {
            batch.push(Write::ForgetSettled {
                document: *document,
                change: *change,
            });
        }
    }

    /// The token given for an upstream peer.
    pub fn token(&self, peer: PeerId) -> Option<&str> {
        self.peers.get(&peer).and_then(|p| p.token.as_deref())
    }
}

/// Loads a document into `docs` on first use.
fn load<'a, S: Storage>(
    docs: &'a mut HashMap<DocumentId, DocEntry>,
    storage: &mut S,
    replica: ReplicaId,
    document: DocumentId,
) -> Result<&'a mut DocEntry, ReplicaError> {
    use std::collections::hash_map::Entry;
    match docs.entry(document) {
        Entry::Occupied(e) => Ok(e.into_mut()),
        Entry::Vacant(v) => {
            let stored = storage
                .load_document(document)?
                .ok_or(ReplicaError::UnknownDocument(document))?;
            let doc = Document::load(
                stored.kind,
                replica,
                document,
                stored.snapshot.as_deref(),
                stored.changes.iter().map(Vec::as_slice),
            )
            .map_err(|error| ReplicaError::CorruptDocument { document, error })?;
            Ok(v.insert(DocEntry {
                doc,
                appended_since_snapshot: stored.changes.len(),
                last_seq: stored.last_seq,
            }))
        }
    }
}

#[cfg(test)]
mod tests;
