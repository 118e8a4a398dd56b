//! Receiving an Automerge sync message without automerge's history walk.
//!
//! Written by hand because automerge 0.12's `receive_sync_message` walks every ancestor of the
//! peer's heads on each message (`filter_changes` → `ChangeGraph::remove_ancestors` visits the
//! whole change graph, with no early exit, even when there is nothing to filter). A relay
//! receives one message from every peer for every change it forwards, so that walk made the cost
//! of each keystroke grow with the document's history times the number of peers (18% of the
//! server's CPU with 8 automerge-repo typists, and quadratic as typists are added).
//!
//! [`receive`] reproduces `receive_sync_message_inner` step by step through automerge's public
//! API; the one difference is how it trims `sent_hashes` to what the peer has not seen: instead
//! of walking back from the peer's heads, it asks for the changes *not* covered by those heads
//! (`get_changes_meta`, answered from automerge's cached vector clocks in time proportional to
//! the answer) and keeps the sent hashes among them. When there is nothing to trim it does
//! nothing. The tests below run random multi-peer sessions through both paths and require
//! identical documents, states and next messages.

use std::collections::HashSet;

use automerge::sync::{Capability, Message, MessageFlags, State};
use automerge::{AutoCommit, AutomergeError, ChangeHash};

/// Applies a decoded sync `message` from a peer to `doc` and its `state`, exactly as
/// `doc.sync().receive_sync_message(state, message)` would.
pub(crate) fn receive(
    doc: &mut AutoCommit,
    state: &mut State,
    message: Message,
) -> Result<(), AutomergeError> {
    state.in_flight = false;
    let before_heads = doc.get_heads();
    let Message {
        heads,
        changes,
        need,
        have,
        flags,
        ..
    } = message;
    if let Some(flags) = flags {
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
    let changes_is_empty = changes.is_empty();
    if !changes_is_empty && !state.read_only {
        let mut joined = Vec::with_capacity(changes.iter().map(<[u8]>::len).sum());
        for chunk in changes.iter() {
            joined.extend_from_slice(chunk);
        }
        doc.load_incremental(&joined)?;
        let after_heads = doc.get_heads();
        state.shared_heads = advance_heads(&before_heads, &after_heads, &state.shared_heads);
    }

    let known_heads: Vec<ChangeHash> = heads
        .iter()
        .filter(|h| doc.get_change_meta_by_hash(h).is_some())
        .copied()
        .collect();
    // Trim the sent hashes to those the peer has not seen: not ancestors of its known heads.
    if !state.sent_hashes.is_empty() && !known_heads.is_empty() {
        let unseen: HashSet<ChangeHash> = doc
            .get_changes_meta(&known_heads)
            .into_iter()
            .map(|m| m.hash)
            .collect();
        state.sent_hashes.retain(|h| unseen.contains(h));
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
    Ok(())
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
    let old: HashSet<&ChangeHash> = old.iter().collect();
    let new_set: HashSet<&ChangeHash> = new.iter().collect();
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

    /// One peer kept twice: `fast` receives through [`receive`], `slow` through automerge.
    struct Twin {
        fast: AutoCommit,
        slow: AutoCommit,
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
    }

    impl Session {
        fn new(n: usize) -> Self {
            Self {
                hub: Twin {
                    fast: AutoCommit::new(),
                    slow: AutoCommit::new(),
                },
                hub_fast: vec![State::new(); n],
                hub_slow: vec![State::new(); n],
                spokes: (0..n).map(|_| AutoCommit::new()).collect(),
                spoke_states: vec![State::new(); n],
                inbox: vec![Vec::new(); n],
                waits: 0,
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
        }

        fn spoke_sends(&mut self, spoke: usize) {
            if let Some(m) = self.spokes[spoke]
                .sync()
                .generate_sync_message(&mut self.spoke_states[spoke])
            {
                self.inbox[spoke].push(m);
            }
        }

        /// The hub takes the oldest message from `spoke` through both paths, then answers it.
        fn hub_receives(&mut self, spoke: usize) {
            if self.inbox[spoke].is_empty() {
                return;
            }
            let m = self.inbox[spoke].remove(0);
            receive(&mut self.hub.fast, &mut self.hub_fast[spoke], m.clone()).expect("fast");
            self.hub
                .slow
                .sync()
                .receive_sync_message(&mut self.hub_slow[spoke], m)
                .expect("slow");
            self.check(spoke);
        }

        fn hub_answers(&mut self, spoke: usize) {
            let waiting = waiting_for_ack(&mut self.hub.fast, &self.hub_fast[spoke]);
            let fast = self
                .hub
                .fast
                .sync()
                .generate_sync_message(&mut self.hub_fast[spoke]);
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
    }

    fn step(n: usize) -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..n, any::<u8>()).prop_map(|(s, k)| Step::Edit(s, k)),
            any::<u8>().prop_map(Step::HubEdit),
            (0..n).prop_map(Step::Send),
            (0..n).prop_map(Step::Receive),
            (0..n).prop_map(Step::Answer),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn receive_matches_automerge_in_random_sessions(steps in proptest::collection::vec(step(3), 1..120)) {
            let mut session = Session::new(3);
            for s in steps {
                match s {
                    Step::Edit(i, k) => session.edit(i, k),
                    Step::HubEdit(k) => session.hub_edit(k),
                    Step::Send(i) => session.spoke_sends(i),
                    Step::Receive(i) => session.hub_receives(i),
                    Step::Answer(i) => session.hub_answers(i),
                }
            }
            // Then everyone talks until quiet: the same end either way, and converged.
            for _ in 0..20 {
                for i in 0..3 {
                    session.spoke_sends(i);
                    while !session.inbox[i].is_empty() {
                        session.hub_receives(i);
                    }
                    session.hub_answers(i);
                }
            }
            for i in 0..3 {
                prop_assert_eq!(session.spokes[i].get_heads(), session.hub.fast.get_heads());
            }
        }
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
