//! The last changes of an Automerge document, in its order, with their dependencies: enough to
//! answer "which changes are not ancestors of these heads" without asking Automerge.
//!
//! The sync protocol asks that question for every message, both ways: the changes since the
//! heads we share with a peer (our Bloom filter), since the peer's last sync (what to send it),
//! and since the peer's heads (which sent changes it now has). Automerge 0.12 answers it
//! (`get_changes_meta`) with a vector-clock walk, then builds each change's metadata from its
//! compressed columns, a cost per change that grows with the history. A relay whose peers lag
//! behind asks about many changes per message: at 128 typists that was over half of the
//! server's CPU, more the further behind it fell.
//!
//! Here the question is answered as `git rev-list ours --not theirs` does: walking back from our
//! heads and from theirs together, newest first, until nothing only ours is left. The walk
//! stays inside the last [`MAX_NODES`] changes (a suffix of the document's order, so every
//! path between two of them stays inside); when it would have to leave (an old change not
//! known to be theirs), it says so and the caller asks Automerge.

use std::collections::VecDeque;

use automerge::{AutoCommit, ChangeHash};

use super::change_hash_set::{ChangeHashMap, ChangeHashSet};

/// At most this many changes are kept.
pub(crate) const MAX_NODES: usize = 8_192;

/// A change: its hash and the hashes it depends on, with their positions (`None` for a change
/// older than the graph).
struct Node {
    hash: ChangeHash,
    deps: Vec<ChangeHash>,
    dep_positions: Vec<Option<u64>>,
}

/// The last changes of a document in its order (each after its dependencies).
#[derive(Default)]
pub(crate) struct RecentGraph {
    nodes: VecDeque<Node>,
    /// The position (counted since the graph started) of `nodes[0]`.
    first: u64,
    /// Position of each kept change.
    by_hash: ChangeHashMap<ChangeHash, u64>,
    /// The document's heads after the last change kept (sorted); `None` before the graph has
    /// seen the document.
    heads: Option<Vec<ChangeHash>>,
}

const OURS: u8 = 1;
const THEIRS: u8 = 2;

impl RecentGraph {
    /// Brings the graph up to `doc`: the changes that entered it since the last call are added
    /// in its order (one Automerge query for those few). A graph that has not seen the document
    /// starts from its current heads, holding no change yet.
    pub(crate) fn catch_up(&mut self, doc: &mut AutoCommit) {
        let now = doc.get_heads();
        let Some(heads) = &self.heads else {
            self.heads = Some(now);
            return;
        };
        if *heads == now {
            return;
        }
        let new: Vec<(ChangeHash, Vec<ChangeHash>)> = doc
            .get_changes_meta(heads)
            .into_iter()
            .map(|m| (m.hash, m.deps))
            .collect();
        for (hash, deps) in new {
            let dep_positions = deps.iter().map(|d| self.by_hash.get(d).copied()).collect();
            self.push(Node {
                hash,
                deps,
                dep_positions,
            });
        }
        self.heads = Some(now);
    }

    fn push(&mut self, node: Node) {
        if self.nodes.len() >= MAX_NODES {
            if let Some(oldest) = self.nodes.pop_front() {
                self.by_hash.remove(&oldest.hash);
                self.first += 1;
            }
        }
        let position = self.first + self.nodes.len() as u64;
        self.by_hash.insert(node.hash, position);
        self.nodes.push_back(node);
    }

    /// Forgets everything (memory included); the next [`RecentGraph::catch_up`] starts over.
    pub(crate) fn clear(&mut self) {
        *self = Self::default();
    }

    /// Whether the change `hash` is kept (then the document holds it).
    pub(crate) fn contains(&self, hash: &ChangeHash) -> bool {
        self.by_hash.contains_key(hash)
    }

    /// Whether each of `hashes` is one of `heads` or a dependency of one: then all of them are
    /// ancestors of `heads` (a quick, partial test: `false` says nothing). Empty `hashes` are
    /// not covered (nothing was sent to cover).
    pub(crate) fn covers(&self, heads: &[ChangeHash], hashes: &[ChangeHash]) -> bool {
        !hashes.is_empty()
            && hashes.iter().all(|h| {
                heads.contains(h)
                    || heads
                        .iter()
                        .filter_map(|k| self.index_of(k).and_then(|i| self.nodes.get(i)))
                        .any(|node| node.deps.contains(h))
            })
    }

    /// Where the change `hash` is in `nodes`, if kept.
    fn index_of(&self, hash: &ChangeHash) -> Option<usize> {
        let position = self.by_hash.get(hash)?;
        usize::try_from(position.checked_sub(self.first)?).ok()
    }

    /// The changes of the document that are not ancestors of `theirs` (hashes the document
    /// holds), oldest first in the document's order, each with its dependencies: what
    /// Automerge's `get_changes_meta(theirs)` lists. `None` when the answer reaches past the
    /// kept changes, or the graph is not caught up with `doc_heads`: then ask Automerge.
    pub(crate) fn since(
        &self,
        doc_heads: &[ChangeHash],
        theirs: &[ChangeHash],
    ) -> Option<Vec<(ChangeHash, &[ChangeHash])>> {
        if self.heads.as_deref() != Some(doc_heads) {
            return None;
        }
        // Marks are kept from the newest change reached down, only as deep as the walk goes.
        let top = doc_heads
            .iter()
            .chain(theirs)
            .filter_map(|h| self.index_of(h))
            .max();
        let mut walk = Walk {
            top,
            theirs: theirs.iter().copied().collect(),
            ..Walk::default()
        };
        for hash in doc_heads {
            walk.reach(self.index_of(hash), hash, OURS);
        }
        for hash in theirs {
            walk.reach(self.index_of(hash), hash, THEIRS);
        }
        let mut ours = Vec::new();
        // Newest first: when a change is taken, everything after it has been, so its marks are
        // final. Once nothing only ours is left, the rest is theirs; the walk goes on only while
        // some old change reached from ours is not yet known to be theirs.
        let mut index = walk.top;
        while walk.only_ours > 0 || !walk.outside_resolved() {
            let Some(current) = index else {
                break;
            };
            index = current.checked_sub(1);
            let flag = match walk.mark_at(current) {
                0 => continue,
                OURS => {
                    walk.only_ours -= 1;
                    ours.push(current);
                    OURS
                }
                _ => THEIRS,
            };
            let node = self.nodes.get(current)?;
            for (dep, position) in node.deps.iter().zip(&node.dep_positions) {
                let index = position
                    .and_then(|p| p.checked_sub(self.first))
                    .and_then(|i| usize::try_from(i).ok());
                walk.reach(index, dep, flag);
            }
        }
        if !walk.outside_resolved() {
            return None;
        }
        ours.reverse();
        ours.into_iter()
            .map(|i| self.nodes.get(i).map(|n| (n.hash, n.deps.as_slice())))
            .collect()
    }
}

/// The marks of a [`RecentGraph::since`] walk, by index in the kept changes.
#[derive(Default)]
struct Walk {
    /// `marks[k]` is the mark of the change at index `top - k`.
    marks: Vec<u8>,
    /// The newest index that can be marked (that of the newest head, ours or theirs).
    top: Option<usize>,
    /// Marked changes not yet walked that are only ours.
    only_ours: usize,
    /// Their heads.
    theirs: ChangeHashSet<ChangeHash>,
    /// Changes older than the kept ones reached from ours (each must turn out to be theirs),
    /// and those known to be theirs.
    outside_ours: ChangeHashSet<ChangeHash>,
    outside_theirs: ChangeHashSet<ChangeHash>,
}

impl Walk {
    /// Marks the change `hash` (at `index` when kept) as reached from ours or from theirs
    /// (`flag`); an older one is noted.
    fn reach(&mut self, index: Option<usize>, hash: &ChangeHash, flag: u8) {
        let slot = index.zip(self.top).and_then(|(i, top)| top.checked_sub(i));
        if let Some(k) = slot.filter(|k| *k >= self.marks.len()) {
            self.marks.resize(k + 1, 0);
        }
        let Some(marks) = slot.and_then(|k| self.marks.get_mut(k)) else {
            if flag == THEIRS {
                self.outside_theirs.insert(*hash);
            } else if !self.theirs.contains(hash) {
                self.outside_ours.insert(*hash);
            }
            return;
        };
        let before = *marks;
        *marks |= flag;
        match (before, *marks) {
            (0, OURS) => self.only_ours += 1,
            (OURS, m) if m != OURS => self.only_ours -= 1,
            _ => {}
        }
    }

    /// The mark of the change at `index` (0: not reached).
    fn mark_at(&self, index: usize) -> u8 {
        self.top
            .and_then(|top| top.checked_sub(index))
            .and_then(|k| self.marks.get(k))
            .copied()
            .unwrap_or(0)
    }

    /// Whether every old change reached from ours is known to be theirs.
    fn outside_resolved(&self) -> bool {
        self.outside_ours.is_subset(&self.outside_theirs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::ROOT;
    use proptest::prelude::*;

    /// Documents on `n` actors editing and merging at random; after each step the graph's
    /// answers for every change's and every head set's "since" match automerge's.
    fn check_all(doc: &mut AutoCommit, graph: &RecentGraph, probes: &[Vec<ChangeHash>]) -> usize {
        let heads = doc.get_heads();
        let mut answered = 0;
        for theirs in probes {
            let expected: Vec<(ChangeHash, Vec<ChangeHash>)> = doc
                .get_changes_meta(theirs)
                .into_iter()
                .map(|m| (m.hash, m.deps))
                .collect();
            if let Some(got) = graph.since(&heads, theirs) {
                let got: Vec<(ChangeHash, Vec<ChangeHash>)> =
                    got.into_iter().map(|(h, d)| (h, d.to_vec())).collect();
                assert_eq!(got, expected, "since {theirs:?}");
                answered += 1;
            }
        }
        answered
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn since_matches_automerge(steps in proptest::collection::vec((0..3usize, 0..4u8), 1..80)) {
            let mut docs: Vec<AutoCommit> = (0..3u8)
                .map(|i| AutoCommit::new().with_actor(automerge::ActorId::from([i + 1; 16])))
                .collect();
            let mut graph = RecentGraph::default();
            graph.catch_up(&mut docs[0]);
            let mut probes: Vec<Vec<ChangeHash>> = vec![Vec::new()];
            let mut answered = 0;
            for (i, (who, what)) in steps.into_iter().enumerate() {
                match what {
                    0 | 1 => {
                        docs[who].put(ROOT, format!("k{i}"), i as i64).expect("put");
                        docs[who].commit();
                    }
                    2 if who != 0 => {
                        let (a, b) = if who == 1 { (0, 1) } else { (0, 2) };
                        let (left, right) = docs.split_at_mut(b);
                        left[a].merge(&mut right[0]).expect("merge");
                    }
                    _ => {
                        let other = (who + 1) % 3;
                        let mut theirs = docs[other].clone();
                        docs[who].merge(&mut theirs).expect("merge");
                    }
                }
                probes.push(docs[who].get_heads());
                graph.catch_up(&mut docs[0]);
                let heads = docs[0].get_heads();
                let known: Vec<Vec<ChangeHash>> = probes
                    .iter()
                    .filter(|p| p.iter().all(|h| docs[0].get_change_meta_by_hash(h).is_some()))
                    .cloned()
                    .collect();
                answered += check_all(&mut docs[0], &graph, &known);
                prop_assert!(graph.since(&heads, &heads).is_some_and(|s| s.is_empty()));
            }
            prop_assert!(answered > 0);
        }
    }

    #[test]
    fn a_graph_behind_the_document_or_past_its_limit_says_so() {
        let mut doc = AutoCommit::new();
        let mut graph = RecentGraph::default();
        graph.catch_up(&mut doc);
        doc.put(ROOT, "a", 1).expect("put");
        doc.commit();
        let first = doc.get_heads();
        assert!(graph.since(&first, &[]).is_none(), "not caught up");
        graph.catch_up(&mut doc);
        assert_eq!(
            graph.since(&first, &[]).map(|s| s.len()),
            Some(1),
            "everything since an empty document"
        );
        for i in 0..MAX_NODES + 5 {
            doc.put(ROOT, "a", i as i64).expect("put");
            doc.commit();
            graph.catch_up(&mut doc);
        }
        let heads = doc.get_heads();
        assert_eq!(graph.nodes.len(), MAX_NODES, "bounded");
        assert!(
            graph.since(&heads, &first).is_none(),
            "the first change is no longer kept"
        );
        assert_eq!(graph.since(&heads, &heads).map(|s| s.len()), Some(0));
        graph.clear();
        assert!(graph.since(&heads, &heads).is_none(), "cleared");
    }
}
