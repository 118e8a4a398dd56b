//! The Automerge sync protocol's two steps, receiving a message and generating the next one,
//! without automerge's per-message walks of the history.
//!
//! Written by hand because automerge 0.12 makes a relay pay for its whole history on every
//! message, in three ways:
//!
//! - `receive_sync_message` walks every ancestor of the peer's heads (`filter_changes` →
//!   `ChangeGraph::remove_ancestors`, with no early exit, even when there is nothing to filter):
//!   18% of the server's CPU with 8 automerge-repo typists, quadratic as typists are added;
//! - "the changes not ancestors of these heads" (our Bloom filter, what to send, what the peer
//!   has seen) costs a vector-clock walk plus, per change listed, metadata read back from
//!   compressed columns; with peers lagging behind, over half the CPU at 128 typists;
//! - every change sent is rebuilt from the op set, once per peer it is sent to.
//!
//! [`receive`] and [`generate`] reproduce `receive_sync_message_inner` and
//! `generate_sync_message` step by step through automerge's public API, with three
//! substitutions: the sent hashes the peer has seen are found from what is not an ancestor of
//! its heads (nothing to do when it has ours); "not an ancestor of" is answered by
//! [`RecentGraph`] (the last changes with their dependencies) when it can, by automerge
//! otherwise; and the changes to send come from [`RecentChanges`] (their bytes as they came)
//! when they are there. The cases that need automerge's internals are left to it
//! ([`Generated::Automerge`]). The tests below run random multi-peer sessions through both
//! paths, with V1 and V2 peers and the kept changes dropped at random, and require identical
//! documents, states and messages.

use automerge::sync::{
    BloomFilter, Capability, Have, Message, MessageFlags, MessageVersion, State,
};
use automerge::{AutoCommit, ChangeHash, ReadDoc};

use super::automerge_apply::{self, Guard};
use super::change_hash_set::ChangeHashSet;
use super::error::DocError;
use super::recent_changes::RecentChanges;
use super::recent_graph::{ChangeMeta, RecentGraph};

/// What the changes of a sync message are called in an error.
const SYNC_MESSAGE: &str = "automerge sync message";

/// Applies a decoded sync `message` from a peer to `doc` and its `state`, exactly as
/// `doc.sync().receive_sync_message(state, message)` would. `carried` are the changes it
/// carries, read from their bytes (see [`keep_carried`]; none: the graph asks Automerge).
pub(crate) fn receive(
    doc: &mut AutoCommit,
    state: &mut State,
    message: Message,
    carried: &[ChangeMeta],
    graph: &mut RecentGraph,
    guard: &mut Guard,
) -> Result<(), DocError> {
    graph.catch_up(doc);
    let before_heads = doc.get_heads();
    begin(state, &message);
    let changes_is_empty = message.changes.is_empty();
    if !changes_is_empty && !state.read_only {
        automerge_apply::load_incremental(doc, guard, &joined_changes(&[&message]), SYNC_MESSAGE)?;
        graph.catch_up_with(doc, &carried.iter().collect::<Vec<_>>());
        let after_heads = doc.get_heads();
        state.shared_heads = advance_heads(&before_heads, &after_heads, &state.shared_heads);
    }
    let Message {
        heads, need, have, ..
    } = message;
    finish(
        (doc, graph),
        state,
        &before_heads,
        heads,
        need,
        have,
        changes_is_empty,
    );
    Ok(())
}

/// Applies decoded sync messages from several peers (each with its own state; a peer appears
/// once) with one `load_incremental` for all the changes they carry, then settles each peer's
/// state as [`receive`] would have. Applying costs Automerge a walk over the whole object each
/// time (linear in the text since 0.7), so under load, when messages queue up, one walk for all
/// of them instead of one each. `carried[i]` are the hashes of the changes in `messages[i]`.
///
/// What differs from receiving them one by one: each peer's state sees the document after all
/// of the changes, not after those before it (which is only what the order of arrival made
/// it); a peer's shared heads advance by its own changes only. On an error nothing is settled
/// (some changes may be in the document): receive each message again, one by one.
pub(crate) fn receive_batch(
    doc: &mut AutoCommit,
    states: &mut [&mut State],
    messages: &[Message],
    carried: &[Carried],
    graph: &mut RecentGraph,
    guard: &mut Guard,
) -> Result<(), DocError> {
    graph.catch_up(doc);
    let before_heads = doc.get_heads();
    let (applied, metas): (Vec<&Message>, Vec<&[ChangeMeta]>) = messages
        .iter()
        .zip(states.iter())
        .zip(carried)
        .filter(|((m, s), _)| !m.changes.is_empty() && !s.read_only)
        .map(|((m, _), c)| (m, c.changes.as_slice()))
        .unzip();
    if !applied.is_empty() {
        automerge_apply::load_incremental(doc, guard, &joined_changes(&applied), SYNC_MESSAGE)?;
        graph.catch_up_with(
            doc,
            &metas.iter().flat_map(|m| m.iter()).collect::<Vec<_>>(),
        );
    }
    let after_heads = doc.get_heads();
    for ((state, message), carried) in states.iter_mut().zip(messages).zip(carried) {
        begin(state, message);
        let changes_is_empty = message.changes.is_empty();
        if !changes_is_empty && !state.read_only {
            // Our new heads that came with its changes, and the shared heads still heads.
            state.shared_heads = after_heads
                .iter()
                .filter(|h| {
                    (carried.hashes.contains(h) && !before_heads.contains(h))
                        || state.shared_heads.contains(h)
                })
                .copied()
                .collect();
        }
        finish(
            (&mut *doc, &*graph),
            state,
            &after_heads,
            message.heads.clone(),
            message.need.clone(),
            message.have.clone(),
            changes_is_empty,
        );
    }
    Ok(())
}

/// The change chunks of `messages`, one after the other (what `load_incremental` takes).
fn joined_changes(messages: &[&Message]) -> Vec<u8> {
    let size = messages
        .iter()
        .flat_map(|m| m.changes.iter())
        .map(<[u8]>::len)
        .sum();
    let mut joined = Vec::with_capacity(size);
    for chunk in messages.iter().flat_map(|m| m.changes.iter()) {
        joined.extend_from_slice(chunk);
    }
    joined
}

/// What a message settles before its changes are applied: nothing is in flight any more, and
/// what its flags say.
fn begin(state: &mut State, message: &Message) {
    state.in_flight = false;
    if let Some(flags) = message.flags {
        // A peer that sends flags supports V2 messages (they came together).
        let mut caps = vec![Capability::MessageV2];
        if flags.contains(MessageFlags::SUPPORTS_SYNC_RESET) {
            caps.push(Capability::SyncReset);
        }
        state.their_capabilities = Some(caps);
        if flags.contains(MessageFlags::SYNC_RESET) {
            state.sent_hashes.clear();
        }
        state.peer_read_only = flags.contains(MessageFlags::READ_ONLY);
    }
}

/// What a message settles once its changes are in: the sent hashes it acknowledges, the shared
/// heads, and what the peer has, needs and holds (the message's `heads`, `need` and `have`).
/// `before_heads` are our heads before its changes.
fn finish(
    (doc, graph): (&mut AutoCommit, &RecentGraph),
    state: &mut State,
    before_heads: &[ChangeHash],
    heads: Vec<ChangeHash>,
    need: Vec<ChangeHash>,
    have: Vec<automerge::sync::Have>,
    changes_is_empty: bool,
) {
    let known_heads: Vec<ChangeHash> = heads
        .iter()
        .filter(|h| has_change(doc, graph, h))
        .copied()
        .collect();
    // Trim the sent hashes to those the peer has not seen: not ancestors of its known heads.
    // None when it has our heads, or the heads we last sent it (every change we sent it is an
    // ancestor of those: our heads only grow), which a relay finds in almost every answer.
    if !state.sent_hashes.is_empty() && !known_heads.is_empty() {
        let mut sorted = known_heads.clone();
        sorted.sort();
        if sorted == doc.get_heads() || graph.covers(&known_heads, &state.last_sent_heads) {
            state.sent_hashes.clear();
        } else if let Some(seen) = graph.ancestors_among(&known_heads, &state.sent_hashes) {
            state.sent_hashes.retain(|h| !seen.contains(h));
        } else {
            let unseen: ChangeHashSet<ChangeHash> =
                hashes_since(doc, graph, &known_heads).into_iter().collect();
            state.sent_hashes.retain(|h| unseen.contains(h));
        }
    }

    if changes_is_empty && heads == before_heads {
        state.last_sent_heads.clone_from(&heads);
    }
    if known_heads.len() == heads.len() {
        state.shared_heads.clone_from(&heads);
        // A peer that lost all its data: start over.
        if heads.is_empty() {
            state.last_sent_heads = Vec::new();
            state.sent_hashes.clear();
        }
    } else {
        let mut shared: Vec<ChangeHash> = state
            .shared_heads
            .iter()
            .chain(known_heads.iter())
            .copied()
            .collect();
        shared.sort();
        shared.dedup();
        state.shared_heads = shared;
    }
    state.their_have = Some(have);
    state.their_heads = Some(heads);
    state.their_need = Some(need);
}

/// Keeps the changes a sync message carries in `recent` (see [`keep_changes_into`]) and returns
/// them, or `None` when it carries anything but change chunks (a whole document) or they do
/// not parse.
pub(crate) fn keep_carried(recent: &mut RecentChanges, message: &Message) -> Option<Carried> {
    let mut carried = Carried::default();
    for bytes in message.changes.iter() {
        keep_changes_into(recent, bytes, &mut carried)?;
    }
    Some(carried)
}

/// The changes a sync message carries: their hashes, and each with its dependencies in the
/// message's order (what [`RecentGraph::catch_up_with`] takes).
#[derive(Debug, Default)]
pub(crate) struct Carried {
    pub(crate) hashes: ChangeHashSet<ChangeHash>,
    pub(crate) changes: Vec<ChangeMeta>,
}

/// Keeps the uncompressed changes in `bytes` in `recent` (see [`keep_changes_into`]); bytes
/// that are not change chunks (a whole document) keep nothing.
pub(crate) fn keep_changes(recent: &mut RecentChanges, bytes: &[u8]) {
    let _ = keep_changes_into(recent, bytes, &mut Carried::default());
}

/// Keeps the changes in `bytes` (change chunks one after the other, as a sync message or
/// `load_incremental` carries them) in `recent`, each uncompressed one whose checksum matches
/// (the bytes Automerge itself would produce for its hash), and adds every one of them to
/// `carried`, with the dependencies its header names; `None` when `bytes` hold anything but
/// change chunks (a whole document) or do not parse. An uncompressed change's hash is the
/// SHA-256 of its chunk after the magic bytes and checksum (type, length, body), as automerge
/// computes it; a compressed one is decoded to find it.
fn keep_changes_into(
    recent: &mut RecentChanges,
    mut bytes: &[u8],
    carried: &mut Carried,
) -> Option<()> {
    use sha2::Digest;
    const CHANGE: u8 = 1;
    const COMPRESSED_CHANGE: u8 = 2;
    while !bytes.is_empty() {
        let (kind, chunk, after) = super::automerge_doc::next_chunk(bytes)?;
        let (hash, deps) = match kind {
            CHANGE => {
                let hash = ChangeHash(sha2::Sha256::digest(chunk.get(8..)?).into());
                if chunk.get(4..8) == Some(&hash.0[..4]) {
                    recent.insert(hash, chunk);
                }
                (hash, change_deps(chunk)?)
            }
            COMPRESSED_CHANGE => {
                let change = automerge::Change::try_from(chunk).ok()?;
                (change.hash(), change.deps().to_vec())
            }
            _ => return None,
        };
        carried.hashes.insert(hash);
        carried.changes.push((hash, deps));
        bytes = after;
    }
    Some(())
}

/// The dependencies an uncompressed change chunk names: the body (after the magic bytes,
/// checksum, type and length) starts with their count and the 32-byte hashes.
fn change_deps(chunk: &[u8]) -> Option<Vec<ChangeHash>> {
    let mut rest = chunk.get(9..)?;
    super::automerge_doc::read_uleb(&mut rest)?;
    let count = usize::try_from(super::automerge_doc::read_uleb(&mut rest)?).ok()?;
    let hashes = rest.get(..count.checked_mul(32)?)?;
    hashes
        .chunks_exact(32)
        .map(|h| <[u8; 32]>::try_from(h).ok().map(ChangeHash))
        .collect()
}

/// At most this many changes missing from [`RecentChanges`] are rebuilt one by one for a
/// message; beyond, automerge builds it (it rebuilds them in one walk).
const MAX_REBUILT: usize = 4;

/// What [`generate`] decided.
#[derive(Debug)]
pub(crate) enum Generated {
    /// The message automerge would send now.
    Message(Message),
    /// No message is due (automerge would return `None`).
    Nothing,
    /// A case left to automerge: a reset, the whole document, a peer lacking more than a third
    /// of the changes, changes waiting for their dependencies, or many changes to rebuild.
    Automerge,
}

/// The next sync message for a peer, exactly as automerge 0.12's `generate_sync_message` builds
/// it (the same message, the same state afterwards), except that the changes it carries come
/// from `recent` when they are there instead of being rebuilt from automerge's op set one walk
/// per message. A relay sends each new change to every peer, so automerge rebuilt it once per
/// peer: with 32 typists that was a third of the relay's CPU, and at 128 what held it back.
/// Mirrors `generate_sync_message` step by step through automerge's public API; the cases that
/// need its internals are [`Generated::Automerge`].
pub(crate) fn generate(
    doc: &mut AutoCommit,
    state: &mut State,
    recent: &RecentChanges,
    graph: &mut RecentGraph,
) -> Generated {
    graph.catch_up(doc);
    // With changes waiting for their dependencies, what we need depends on them: automerge's.
    if !doc.get_missing_deps(&[]).is_empty() {
        return Generated::Automerge;
    }
    let our_heads = doc.get_heads();
    let our_need: Vec<ChangeHash> = if state.read_only {
        Vec::new()
    } else {
        // Their heads we lack (with nothing queued, that is all automerge's walk finds).
        let mut need: Vec<ChangeHash> = state
            .their_heads
            .iter()
            .flatten()
            .filter(|h| !has_change(doc, graph, h))
            .copied()
            .collect();
        need.sort();
        need.dedup();
        need
    };
    let their_heads: ChangeHashSet<&ChangeHash> = state.their_heads.iter().flatten().collect();
    let our_have = if our_need.iter().all(|h| their_heads.contains(h)) {
        let since = hashes_since(doc, graph, &state.shared_heads);
        vec![Have {
            last_sync: state.shared_heads.clone(),
            bloom: BloomFilter::from_hashes(since.iter()),
        }]
    } else {
        Vec::new()
    };
    if let Some(first) = state.their_have.as_ref().and_then(|h| h.first()) {
        if !first.last_sync.iter().all(|h| has_change(doc, graph, h)) {
            return Generated::Automerge;
        }
    }
    let supports_v2 = state
        .their_capabilities
        .as_ref()
        .is_some_and(|c| c.contains(&Capability::MessageV2));
    let hashes: Vec<ChangeHash> = match (&state.their_have, &state.their_need) {
        _ if state.peer_read_only => Vec::new(),
        (Some(have), Some(need)) => {
            if supports_v2 && state.their_heads.as_deref() == Some(&[]) {
                return Generated::Automerge;
            }
            let hashes: Vec<ChangeHash> = hashes_to_send(doc, graph, have, need)
                .into_iter()
                .filter(|h| !state.sent_hashes.contains(h))
                .collect();
            if supports_v2 && hashes.len() as u64 > doc.stats().num_changes / 3 {
                return Generated::Automerge;
            }
            hashes
        }
        _ => Vec::new(),
    };
    let heads_unchanged = state.last_sent_heads == our_heads;
    let heads_equal = state.their_heads.as_ref() == Some(&our_heads);
    if heads_unchanged && state.have_responded {
        if (heads_equal || state.read_only) && hashes.is_empty() {
            return Generated::Nothing;
        }
        if state.in_flight {
            return Generated::Nothing;
        }
    }
    // The changes' bytes: one chunk each for a V1 peer, one chunk of all for a V2 peer.
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut joined: Vec<u8> = Vec::new();
    let mut rebuilt = 0;
    for hash in &hashes {
        let rebuilt_change;
        let bytes = match recent.get(hash) {
            Some(bytes) => bytes,
            None => {
                rebuilt += 1;
                if rebuilt > MAX_REBUILT {
                    return Generated::Automerge;
                }
                let Some(change) = doc.get_change_by_hash(hash) else {
                    return Generated::Automerge;
                };
                rebuilt_change = change;
                rebuilt_change.raw_bytes()
            }
        };
        if supports_v2 {
            joined.extend_from_slice(bytes);
        } else {
            chunks.push(bytes.to_vec());
        }
    }
    state.have_responded = true;
    state.last_sent_heads.clone_from(&our_heads);
    state.sent_hashes.extend(hashes.iter().copied());

    let mut flags = MessageFlags::new();
    flags.set(MessageFlags::SUPPORTS_SYNC_RESET);
    if state.read_only {
        flags.set(MessageFlags::READ_ONLY);
    }
    let heads = if state.needs_reset {
        state.needs_reset = false;
        let supports_reset = state
            .their_capabilities
            .as_ref()
            .is_some_and(|c| c.contains(&Capability::SyncReset));
        if supports_reset {
            flags.set(MessageFlags::SYNC_RESET);
            our_heads
        } else {
            Vec::new()
        }
    } else {
        our_heads
    };
    let (changes, version) = if !supports_v2 {
        (chunks.into(), MessageVersion::V1)
    } else if joined.is_empty() {
        (Vec::<Vec<u8>>::new().into(), MessageVersion::V2)
    } else {
        (joined.into(), MessageVersion::V2)
    };
    state.in_flight = true;
    Generated::Message(Message {
        heads,
        need: our_need,
        have: our_have,
        changes,
        flags: Some(flags),
        version,
    })
}

/// Whether `doc` holds the change `hash` (applied, not waiting for its dependencies): known
/// from the recent graph, or asked of automerge.
fn has_change(doc: &mut AutoCommit, graph: &RecentGraph, hash: &ChangeHash) -> bool {
    graph.contains(hash) || doc.get_change_meta_by_hash(hash).is_some()
}

/// The hashes of the changes of `doc` that are not ancestors of `theirs`, in its order (see
/// [`changes_since`]).
pub(crate) fn hashes_since(
    doc: &mut AutoCommit,
    graph: &RecentGraph,
    theirs: &[ChangeHash],
) -> Vec<ChangeHash> {
    if let Some(since) = graph.since(&doc.get_heads(), theirs) {
        return since.into_iter().map(|(hash, _)| hash).collect();
    }
    doc.get_changes_meta(theirs)
        .into_iter()
        .map(|m| m.hash)
        .collect()
}

/// The changes of `doc` that are not ancestors of `theirs` (hashes it holds), in its order, with
/// their dependencies: from the recent graph when it can tell, else from automerge.
pub(crate) fn changes_since(
    doc: &mut AutoCommit,
    graph: &RecentGraph,
    theirs: &[ChangeHash],
) -> Vec<(ChangeHash, Vec<ChangeHash>)> {
    if let Some(since) = graph.since(&doc.get_heads(), theirs) {
        return since
            .into_iter()
            .map(|(hash, deps)| (hash, deps.to_vec()))
            .collect();
    }
    doc.get_changes_meta(theirs)
        .into_iter()
        .map(|m| (m.hash, m.deps))
        .collect()
}

/// The changes a peer lacks given what it has (`have`: its last sync heads and a Bloom filter of
/// its changes since) and asks for (`need`), in automerge's order (automerge's private
/// `get_hashes_to_send`): what it asked for that we have, then, in our change order, each change
/// since its last sync not in its filter, with every change that depends on one of those.
fn hashes_to_send(
    doc: &mut AutoCommit,
    graph: &RecentGraph,
    have: &[Have],
    need: &[ChangeHash],
) -> Vec<ChangeHash> {
    let need: Vec<ChangeHash> = need
        .iter()
        .filter(|h| has_change(doc, graph, h))
        .copied()
        .collect();
    if have.is_empty() {
        return need;
    }
    let last_sync: Vec<ChangeHash> = have
        .iter()
        .flat_map(|h| h.last_sync.iter().copied())
        .collect::<ChangeHashSet<_>>()
        .into_iter()
        .collect();
    let since = changes_since(doc, graph, &last_sync);
    // What their Bloom filters lack, and everything that depends on it. Automerge indexes every
    // change's dependents and walks them from each change to send; `since` is in causal order
    // (each change after its dependencies), so one pass in it finds the same set, looking at
    // dependencies only for the few changes the filters hold. With many typists a change names
    // dozens of dependencies: the index was most of the cost of a relay's messages.
    let mut to_send: ChangeHashSet<ChangeHash> = ChangeHashSet::default();
    for (hash, deps) in &since {
        if have.iter().all(|h| !h.bloom.contains_hash(hash))
            || deps.iter().any(|d| to_send.contains(d))
        {
            to_send.insert(*hash);
        }
    }
    let mut hashes: Vec<ChangeHash> = need.into_iter().filter(|h| !to_send.contains(h)).collect();
    hashes.extend(
        since
            .iter()
            .map(|(hash, _)| *hash)
            .filter(|h| to_send.contains(h)),
    );
    hashes
}

/// Whether automerge's `generate_sync_message` would return `None` because a message to this
/// peer is in flight and our heads have not moved since: the peer is asked for nothing until it
/// answers. Checked before calling automerge, which otherwise computes a bloom filter and the
/// changes to send (a vector-clock walk) only to drop them; a relay asks after every commit for
/// every peer. Mirrors automerge's order: a peer whose last `have` names changes we lack gets a
/// reset message, so that case is left to automerge.
pub(crate) fn waiting_for_ack(doc: &mut AutoCommit, state: &State) -> bool {
    if !(state.in_flight && state.have_responded) {
        return false;
    }
    if let Some(first) = state.their_have.as_ref().and_then(|h| h.first()) {
        if first
            .last_sync
            .iter()
            .any(|h| doc.get_change_meta_by_hash(h).is_none())
        {
            return false;
        }
    }
    state.last_sent_heads == doc.get_heads()
}

/// The shared heads after our heads moved from `old` to `new` (automerge's `advance_heads`):
/// our new heads plus the old shared heads that are still heads, sorted.
fn advance_heads(old: &[ChangeHash], new: &[ChangeHash], shared: &[ChangeHash]) -> Vec<ChangeHash> {
    let old: ChangeHashSet<&ChangeHash> = old.iter().collect();
    let new_set: ChangeHashSet<&ChangeHash> = new.iter().collect();
    let mut advanced: Vec<ChangeHash> = new
        .iter()
        .filter(|h| !old.contains(h))
        .chain(shared.iter().filter(|h| new_set.contains(h)))
        .copied()
        .collect();
    advanced.sort();
    advanced.dedup();
    advanced
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::sync::SyncDoc;
    use automerge::transaction::Transactable;
    use automerge::ROOT;
    use proptest::prelude::*;

    /// One peer kept twice: `fast` receives through [`receive`] and sends through [`generate`]
    /// (with the changes it saw kept in `recent`), `slow` does both through automerge.
    struct Twin {
        fast: AutoCommit,
        slow: AutoCommit,
        recent: RecentChanges,
        graph: RecentGraph,
        guard: Guard,
    }

    /// A hub (the relay) and `n` spokes; the hub's sync states for each spoke, kept twice.
    struct Session {
        hub: Twin,
        hub_fast: Vec<State>,
        hub_slow: Vec<State>,
        spokes: Vec<AutoCommit>,
        spoke_states: Vec<State>,
        /// Messages from each spoke not yet delivered to the hub, oldest first.
        inbox: Vec<Vec<Message>>,
        /// How often the hub was found waiting for an answer.
        waits: usize,
        /// How often [`generate`] built the hub's message itself, and how often it left it to
        /// automerge.
        generated: usize,
        left: usize,
    }

    impl Session {
        fn new(n: usize) -> Self {
            Self {
                hub: Twin {
                    fast: AutoCommit::new(),
                    slow: AutoCommit::new(),
                    recent: RecentChanges::default(),
                    graph: RecentGraph::default(),
                    guard: Guard::default(),
                },
                hub_fast: vec![State::new(); n],
                hub_slow: vec![State::new(); n],
                spokes: (0..n).map(|_| AutoCommit::new()).collect(),
                spoke_states: vec![State::new(); n],
                inbox: vec![Vec::new(); n],
                waits: 0,
                generated: 0,
                left: 0,
            }
        }

        fn edit(&mut self, spoke: usize, key: u8) {
            self.spokes[spoke]
                .put(ROOT, format!("k{key}"), i64::from(key))
                .expect("put");
        }

        fn hub_edit(&mut self, key: u8) {
            for doc in [&mut self.hub.fast, &mut self.hub.slow] {
                doc.set_actor(automerge::ActorId::from([9u8; 16]));
                doc.put(ROOT, format!("h{key}"), i64::from(key))
                    .expect("put");
            }
            if let Some(change) = self.hub.fast.get_last_local_change() {
                keep_changes(&mut self.hub.recent, change.raw_bytes());
            }
        }

        fn spoke_sends(&mut self, spoke: usize) {
            if let Some(m) = self.spokes[spoke]
                .sync()
                .generate_sync_message(&mut self.spoke_states[spoke])
            {
                // The last spoke speaks the first sync protocol (no flags: no V2 messages).
                let mut m = m;
                if spoke == 2 {
                    m.flags = None;
                    m.version = MessageVersion::V1;
                }
                self.inbox[spoke].push(m);
            }
        }

        /// The hub takes the oldest message from `spoke` through both paths, then answers it.
        fn hub_receives(&mut self, spoke: usize) {
            if self.inbox[spoke].is_empty() {
                return;
            }
            let m = self.inbox[spoke].remove(0);
            let carried = keep_carried(&mut self.hub.recent, &m).unwrap_or_default();
            receive(
                &mut self.hub.fast,
                &mut self.hub_fast[spoke],
                m.clone(),
                &carried.changes,
                &mut self.hub.graph,
                &mut self.hub.guard,
            )
            .expect("fast");
            self.hub
                .slow
                .sync()
                .receive_sync_message(&mut self.hub_slow[spoke], m)
                .expect("slow");
            self.check(spoke);
        }

        fn hub_answers(&mut self, spoke: usize) {
            let waiting = waiting_for_ack(&mut self.hub.fast, &self.hub_fast[spoke]);
            let fast = match generate(
                &mut self.hub.fast,
                &mut self.hub_fast[spoke],
                &self.hub.recent,
                &mut self.hub.graph,
            ) {
                Generated::Message(m) => {
                    self.generated += 1;
                    Some(m)
                }
                Generated::Nothing => None,
                Generated::Automerge => {
                    self.left += 1;
                    self.hub
                        .fast
                        .sync()
                        .generate_sync_message(&mut self.hub_fast[spoke])
                }
            };
            let slow = self
                .hub
                .slow
                .sync()
                .generate_sync_message(&mut self.hub_slow[spoke]);
            assert_eq!(fast, slow, "the hub's next message is the same either way");
            if waiting {
                assert_eq!(fast, None, "nothing is sent while waiting for an answer");
                self.waits += 1;
            }
            self.check(spoke);
            if let Some(m) = fast {
                self.spokes[spoke]
                    .sync()
                    .receive_sync_message(&mut self.spoke_states[spoke], m)
                    .expect("spoke receives");
            }
        }

        /// Everyone talks until quiet.
        fn settle(&mut self) {
            for _ in 0..20 {
                for i in 0..self.spokes.len() {
                    self.spoke_sends(i);
                    while !self.inbox[i].is_empty() {
                        self.hub_receives(i);
                    }
                    self.hub_answers(i);
                }
            }
        }

        fn check(&mut self, spoke: usize) {
            assert_eq!(self.hub.fast.get_heads(), self.hub.slow.get_heads());
            assert_eq!(self.hub_fast[spoke], self.hub_slow[spoke]);
        }
    }

    #[derive(Clone, Debug)]
    enum Step {
        Edit(usize, u8),
        HubEdit(u8),
        Send(usize),
        Receive(usize),
        Answer(usize),
        /// The hub drops the changes it kept.
        Forget,
    }

    fn step(n: usize) -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..n, any::<u8>()).prop_map(|(s, k)| Step::Edit(s, k)),
            any::<u8>().prop_map(Step::HubEdit),
            (0..n).prop_map(Step::Send),
            (0..n).prop_map(Step::Receive),
            (0..n).prop_map(Step::Answer),
            Just(Step::Forget),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(32)))]
        #[test]
        fn receive_and_generate_match_automerge_in_random_sessions(steps in proptest::collection::vec(step(3), 1..120)) {
            let mut session = Session::new(3);
            for s in steps {
                match s {
                    Step::Edit(i, k) => session.edit(i, k),
                    Step::HubEdit(k) => session.hub_edit(k),
                    Step::Send(i) => session.spoke_sends(i),
                    Step::Receive(i) => session.hub_receives(i),
                    Step::Answer(i) => session.hub_answers(i),
                    Step::Forget => {
                        session.hub.recent.clear();
                        session.hub.graph.clear();
                    }
                }
            }
            // Then everyone talks until quiet: the same end either way, and converged.
            session.settle();
            for i in 0..3 {
                prop_assert_eq!(session.spokes[i].get_heads(), session.hub.fast.get_heads());
            }
        }
    }

    #[test]
    fn relayed_changes_are_sent_from_the_kept_bytes_and_rebuilt_when_not_kept() {
        let mut session = Session::new(3);
        // A document with some history, everywhere (a peer lacking more than a third of the
        // changes gets the whole document, from automerge).
        for key in 0..40 {
            session.hub_edit(key);
        }
        for _ in 0..3 {
            for i in 0..3 {
                session.spoke_sends(i);
                session.hub_receives(i);
                session.hub_answers(i);
            }
        }
        (session.generated, session.left) = (0, 0);
        // Every spoke types; the hub takes it all in and relays it to each (V2 and V1 peers).
        for round in 0..4u8 {
            for i in 0..3 {
                session.edit(i, round * 3 + i as u8);
                session.spoke_sends(i);
                session.hub_receives(i);
            }
            for i in 0..3 {
                session.hub_answers(i);
                session.spoke_sends(i);
                session.hub_receives(i);
            }
        }
        assert!(session.generated >= 12, "{} built here", session.generated);
        let heads = session.hub.fast.get_heads();
        for state in &session.hub_fast {
            assert!(
                session
                    .hub
                    .graph
                    .since(&heads, &state.shared_heads)
                    .is_some(),
                "the recent graph answers without automerge"
            );
        }
        assert_eq!(session.left, 0, "nothing left to automerge");
        session.settle();
        assert_eq!(session.left, 0, "nothing left to automerge");
        for i in 0..3 {
            assert_eq!(session.spokes[i].get_heads(), session.hub.fast.get_heads());
        }
        // Kept bytes dropped: a few changes are rebuilt here, many are left to automerge.
        session.hub.recent.clear();
        for key in 100..100 + MAX_REBUILT as u8 + 1 {
            session.edit(0, key);
            session.spokes[0].commit();
        }
        session.spoke_sends(0);
        session.hub_receives(0);
        session.hub.recent.clear();
        session.hub_answers(1);
        assert_eq!(session.left, 1, "too many to rebuild one by one");
        session.edit(0, 200);
        session.spoke_sends(0);
        session.hub_receives(0);
        session.hub.recent.clear();
        let before = session.generated;
        session.spoke_sends(1);
        session.hub_receives(1);
        session.hub_answers(1);
        assert_eq!(session.generated, before + 1, "one change rebuilt here");
        assert_eq!(session.spokes[1].get_heads(), session.hub.fast.get_heads());
    }

    #[test]
    fn a_change_chunk_names_its_dependencies_as_automerge_reads_them() {
        let mut a = AutoCommit::new().with_actor(automerge::ActorId::from([1; 16]));
        let mut b = AutoCommit::new().with_actor(automerge::ActorId::from([2; 16]));
        a.put(ROOT, "a", 1).expect("put");
        a.commit();
        b.put(ROOT, "b", 2).expect("put");
        b.commit();
        a.merge(&mut b).expect("merge");
        a.put(ROOT, "c", 3).expect("put");
        a.commit();
        for change in a.get_changes(&[]) {
            let bytes = change.raw_bytes();
            assert_eq!(change_deps(bytes), Some(change.deps().to_vec()));
            let mut recent = RecentChanges::default();
            let carried = keep_carried(
                &mut recent,
                &Message {
                    heads: Vec::new(),
                    need: Vec::new(),
                    have: Vec::new(),
                    changes: vec![bytes.to_vec()].into(),
                    flags: None,
                    version: MessageVersion::V1,
                },
            )
            .expect("change chunks");
            assert_eq!(
                carried.changes,
                vec![(change.hash(), change.deps().to_vec())]
            );
        }
        let merged = a.get_last_local_change().expect("a change");
        assert_eq!(merged.deps().len(), 2, "the last change depends on both");
        // Cut short inside the dependencies: no answer, no panic.
        let bytes = merged.raw_bytes();
        assert_eq!(change_deps(&bytes[..bytes.len().min(40)]), None);
        assert_eq!(change_deps(&[]), None);
    }

    #[test]
    fn an_up_to_date_peer_empties_the_sent_hashes() {
        let mut session = Session::new(1);
        session.edit(0, 1);
        session.spoke_sends(0);
        session.hub_receives(0);
        session.hub_answers(0);
        session.hub_edit(2);
        session.hub_answers(0);
        assert!(!session.hub_fast[0].sent_hashes.is_empty());
        session.hub_answers(0);
        assert_eq!(
            session.waits, 1,
            "a second ask before the answer sends nothing"
        );
        session.spoke_sends(0);
        session.hub_receives(0);
        assert!(session.hub_fast[0].sent_hashes.is_empty());
    }
}
