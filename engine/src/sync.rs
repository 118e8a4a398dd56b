//! Sync state for one document with one peer, for both CRDT kinds.
//!
//! - Automerge: the Automerge sync protocol with one `automerge::sync::State` per peer and
//!   document. [`DocSync::poll`] generates the next message (or nothing when the peer is up to
//!   date or a message is in flight; towards a client, [`SyncRole::Downstream`], nothing before
//!   the client's first message); [`DocSync::receive`] applies one. A peer that has nothing
//!   receives the whole document, compacted, in one message.
//! - Yrs: each side sends its state vector (`YrsStep1`); each answers a step 1 with the update the
//!   other lacks (`YrsStep2`); after that, new changes are queued with [`DocSync::queue_update`]
//!   and sent as `YrsUpdate`. Towards a server ([`SyncRole::Upstream`]) a step 1 is answered by
//!   the replica resending each unconfirmed change on its own (so the server can acknowledge each
//!   by its id), then by the step 2, which then carries only what nothing else covered.
//!
//! ```
//! use accord_engine::sync::{DocSync, SyncRole};
//! use accord_engine::{DocKind, Document, DocumentId, Op, Path, ReplicaId};
//! let id = DocumentId::from_bytes([1; 16]);
//! let mut a = Document::new(DocKind::Automerge, ReplicaId::from_bytes([1; 16]), id);
//! let mut b = Document::new(DocKind::Automerge, ReplicaId::from_bytes([2; 16]), id);
//! a.apply_ops(&[Op::Put { path: Path::keys(["x"]), value: 1.into() }]).unwrap();
//! let (mut a_to_b, mut b_to_a) = (DocSync::new(DocKind::Automerge, SyncRole::Peer),
//!                                 DocSync::new(DocKind::Automerge, SyncRole::Peer));
//! loop {
//!     let from_a = a_to_b.poll(&mut a);
//!     let from_b = b_to_a.poll(&mut b);
//!     if from_a.is_empty() && from_b.is_empty() { break; }
//!     for m in from_a { b_to_a.receive(&mut b, m).unwrap(); }
//!     for m in from_b { a_to_b.receive(&mut a, m).unwrap(); }
//! }
//! assert_eq!(a.to_json(), b.to_json());
//! ```

use std::collections::VecDeque;

use crate::doc::{Change, DocError, DocKind, Document, YrsDoc};
use crate::protocol::SyncPayload;

/// How a replica syncs a document with a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncRole {
    /// Another replica: symmetric, full sync both ways.
    Peer,
    /// The server, which commits and acknowledges each change by id.
    Upstream,
    /// A client, seen from the server.
    Downstream,
}

/// Sync state of one document with one peer.
pub struct DocSync {
    role: SyncRole,
    read_only: bool,
    state: KindState,
}

enum KindState {
    Automerge(Box<automerge::sync::State>),
    Yrs(YrsState),
}

#[derive(Default)]
struct YrsState {
    sent_step1: bool,
    /// Their state vector, when a step 2 is due in answer to their step 1.
    step2_due: Option<Vec<u8>>,
    /// Whether they have told us their state (so new changes are worth forwarding).
    live: bool,
    queued: VecDeque<Vec<u8>>,
}

/// What receiving a payload did.
#[derive(Debug, Default)]
pub struct Received {
    /// The changes that were new to this replica.
    pub changes: Vec<Change>,
    /// Whether the peer asked for what it lacks (a Yrs step 1) and, in the upstream role, the
    /// replica must now resend its unconfirmed changes.
    pub resend_unconfirmed: bool,
    /// Whether a Yrs update was dropped because changes it depends on are missing here. What it
    /// brought is not here: a server must not acknowledge it. A step 1 asking the peer for what
    /// is missing goes out with the next [`DocSync::poll`].
    pub incomplete: bool,
}

impl DocSync {
    /// Fresh state for a document of `kind` with a peer in `role`.
    pub fn new(kind: DocKind, role: SyncRole) -> Self {
        let state = match kind {
            DocKind::Automerge => KindState::Automerge(Box::default()),
            DocKind::Yrs => KindState::Yrs(YrsState::default()),
        };
        Self {
            role,
            read_only: false,
            state,
        }
    }

    /// Makes the peer read-only: its changes are refused. Automerge uses its read-only sync state
    /// (the peer's changes are not applied, ours still flow); a Yrs update from the peer is a
    /// [`DocError::ReadOnly`].
    pub fn set_read_only(&mut self, read_only: bool) {
        self.read_only = read_only;
        if let KindState::Automerge(state) = &mut self.state {
            state.set_read_only(read_only);
        }
    }

    /// Whether the peer is read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The role of the peer.
    pub fn role(&self) -> SyncRole {
        self.role
    }

    /// Whether the peer can usefully be sent live updates yet (always for Automerge).
    pub fn is_live(&self) -> bool {
        match &self.state {
            KindState::Automerge(_) => true,
            KindState::Yrs(y) => y.live,
        }
    }

    /// The payloads due now. Call after connecting, after every local change and after every
    /// receive, until it returns nothing.
    pub fn poll(&mut self, doc: &mut Document) -> Vec<SyncPayload> {
        let mut out = Vec::new();
        match (&mut self.state, doc) {
            (KindState::Automerge(state), Document::Automerge(d)) => {
                // Towards a client, wait for its first message: every client speaks first (its
                // sync state always has a first message), and before hearing it our message
                // could only carry our heads and a Bloom filter over every change we hold (for
                // a large document, hundreds of KB computed and sent for nothing); after it, a
                // client that has nothing gets the whole document in one message.
                if self.role == SyncRole::Downstream && state.their_heads.is_none() {
                    return out;
                }
                if let Some(message) = d.generate_sync_message(state) {
                    out.push(SyncPayload::Automerge(message));
                }
            }
            (KindState::Yrs(state), Document::Yrs(d)) => {
                if !state.sent_step1 {
                    state.sent_step1 = true;
                    out.push(SyncPayload::YrsStep1(d.state_vector()));
                }
                // Queued updates go before the step 2: towards a server they are the unconfirmed
                // changes resent one by one (each acknowledged by its id), and the step 2 after
                // them then carries only what nothing else covers.
                // Taken, buffer and all: a relay's peer holds a queue only while it has
                // something to send (a drained `VecDeque` would keep its slots in every
                // subscriber of every idle document).
                out.extend(
                    std::mem::take(&mut state.queued)
                        .into_iter()
                        .map(SyncPayload::YrsUpdate),
                );
                if let Some(their_sv) = state.step2_due.take() {
                    // A state vector that was valid on receipt stays valid.
                    if let Ok(update) = d.changes_after(&their_sv) {
                        out.push(SyncPayload::YrsStep2(update));
                    }
                }
            }
            _ => {}
        }
        out
    }

    /// Queues a Yrs change for the peer (ignored for Automerge, whose sync protocol finds new
    /// changes by itself, and before the peer has said what it has).
    pub fn queue_update(&mut self, bytes: &[u8]) {
        if let KindState::Yrs(state) = &mut self.state {
            if state.live {
                state.queued.push_back(bytes.to_vec());
            }
        }
    }

    /// Queues a Yrs change even before the handshake (used to resend unconfirmed changes).
    pub fn queue_update_now(&mut self, bytes: &[u8]) {
        if let KindState::Yrs(state) = &mut self.state {
            state.queued.push_back(bytes.to_vec());
        }
    }

    /// Number of Yrs updates waiting to be sent.
    pub fn queued_updates(&self) -> usize {
        match &self.state {
            KindState::Yrs(y) => y.queued.len(),
            KindState::Automerge(_) => 0,
        }
    }

    /// Applies payloads from several peers of `doc` at once: `peers[i]` sent `payloads[i]`.
    /// For Automerge the changes they carry are applied together (one walk of Automerge's op
    /// set instead of one per message, which is what a relay under load needs: see
    /// `AutomergeDoc::receive_sync_messages`); otherwise, or for Yrs, each is received in turn.
    /// The result for each is what [`DocSync::receive`] would return for it.
    pub fn receive_many(
        doc: &mut Document,
        peers: &mut [&mut DocSync],
        payloads: Vec<SyncPayload>,
    ) -> Vec<Result<Received, DocError>> {
        let all_automerge = peers.len() == payloads.len()
            && payloads
                .iter()
                .all(|p| matches!(p, SyncPayload::Automerge(_)))
            && peers
                .iter()
                .all(|p| matches!(p.state, KindState::Automerge(_)));
        let Document::Automerge(d) = doc else {
            return Self::receive_each(doc, peers, payloads);
        };
        if !all_automerge {
            return Self::receive_each(doc, peers, payloads);
        }
        let bytes: Vec<&[u8]> = payloads
            .iter()
            .filter_map(|p| match p {
                SyncPayload::Automerge(b) => Some(b.as_slice()),
                _ => None,
            })
            .collect();
        let mut states: Vec<&mut automerge::sync::State> = peers
            .iter_mut()
            .filter_map(|p| match &mut p.state {
                KindState::Automerge(state) => Some(&mut **state),
                KindState::Yrs(_) => None,
            })
            .collect();
        d.receive_sync_messages(&mut states, &bytes)
            .into_iter()
            .map(|r| {
                r.map(|changes| Received {
                    changes,
                    ..Received::default()
                })
            })
            .collect()
    }

    fn receive_each(
        doc: &mut Document,
        peers: &mut [&mut DocSync],
        payloads: Vec<SyncPayload>,
    ) -> Vec<Result<Received, DocError>> {
        peers
            .iter_mut()
            .zip(payloads)
            .map(|(peer, payload)| peer.receive(doc, payload))
            .collect()
    }

    /// Applies a payload from the peer to `doc`.
    pub fn receive(
        &mut self,
        doc: &mut Document,
        payload: SyncPayload,
    ) -> Result<Received, DocError> {
        let mut received = Received::default();
        match (&mut self.state, doc, payload) {
            (
                KindState::Automerge(state),
                Document::Automerge(d),
                SyncPayload::Automerge(bytes),
            ) => {
                received.changes = d.receive_sync_message(state, &bytes)?;
            }
            (KindState::Yrs(state), Document::Yrs(_), SyncPayload::YrsStep1(sv)) => {
                // Check it now so a bad state vector is this message's error, not a silent skip.
                YrsDoc::check_state_vector(&sv)?;
                state.live = true;
                // Towards a server, unconfirmed changes are resent one by one first; the step 2
                // still follows so nothing the server lacks can be left out.
                received.resend_unconfirmed = self.role == SyncRole::Upstream;
                state.step2_due = Some(sv);
            }
            (
                KindState::Yrs(state),
                Document::Yrs(d),
                SyncPayload::YrsStep2(bytes) | SyncPayload::YrsUpdate(bytes),
            ) => {
                if self.read_only {
                    return Err(DocError::ReadOnly);
                }
                received.changes = d.apply_changes(&bytes)?;
                if d.take_incomplete() {
                    // Something before it was lost: ask for everything after our state again.
                    state.sent_step1 = false;
                    received.incomplete = true;
                }
            }
            (_, doc, payload) => {
                return Err(DocError::KindMismatch {
                    expected: doc.kind(),
                    got: payload.kind(),
                })
            }
        }
        Ok(received)
    }
}

#[cfg(test)]
mod tests;
