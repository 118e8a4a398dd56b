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

use std::collections::{BTreeSet, VecDeque};

use automerge::{AutoCommit, ChangeHash};

use super::change_hash_set::{ChangeHashMap, ChangeHashSet};

/// The position of a dependency older than the graph.
const OLDER: u64 = u64::MAX;

/// A change's hash and the hashes of the changes it depends on.
pub(crate) type ChangeMeta = (ChangeHash, Vec<ChangeHash>);

/// At most this many changes are kept.
pub(crate) const MAX_NODES: usize = 8_192;

/// A change: its hash and the hashes it depends on, with their positions (`None` for a change
/// older than the graph).
struct Node {
    hash: ChangeHash,
    deps: Vec<ChangeHash>,
    /// Position of each dependency, [`OLDER`] for one older than the graph (8 bytes each, not
    /// the 16 of an `Option<u64>`: at 128 typists a change has ~40 dependencies, and the graph
    /// keeps up to [`MAX_NODES`] changes).
    dep_positions: Box<[u64]>,
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
    /// Whether Automerge held changes waiting for their dependencies at the last
    /// [`RecentGraph::catch_up`]: an apply may then add some of them, in Automerge's own
    /// order, which [`RecentGraph::catch_up_with`] does not reproduce.
    queued: bool,
}

const OURS: u8 = 1;
const THEIRS: u8 = 2;

impl RecentGraph {
    /// Brings the graph up to `doc`: the changes that entered it since the last call are added
    /// in its order (one Automerge query for those few). A graph that has not seen the document
    /// starts from its current heads, holding no change yet.
    pub(crate) fn catch_up(&mut self, doc: &mut AutoCommit) {
        self.queued = !doc.get_missing_deps(&[]).is_empty();
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
            let dep_positions = deps
                .iter()
                .map(|d| self.by_hash.get(d).copied().unwrap_or(OLDER))
                .collect();
            self.push(Node {
                hash,
                deps,
                dep_positions,
            });
        }
        self.heads = Some(now);
    }

    /// [`RecentGraph::catch_up`] after `applied` (changes read from their bytes) went into
    /// `doc`, called with the graph caught up just before the apply: when they account exactly
    /// for the document's new heads, they are added in the order Automerge added them, without
    /// asking Automerge; otherwise (or when Automerge had changes waiting before the apply)
    /// Automerge is asked. Returns whether `applied` sufficed (also when nothing changed).
    ///
    /// Automerge answers with a vector-clock computation over the history (6% of the relay's
    /// CPU at 128 typists); the changes just applied already say everything needed.
    pub(crate) fn catch_up_with(&mut self, doc: &mut AutoCommit, applied: &[&ChangeMeta]) -> bool {
        let now = doc.get_heads();
        let Some(heads) = &self.heads else {
            self.heads = Some(now);
            return true;
        };
        if *heads == now {
            return true;
        }
        let Some(order) = self.explain(heads, &now, applied).filter(|_| !self.queued) else {
            self.catch_up(doc);
            return false;
        };
        for index in order {
            let Some(&(hash, deps)) = applied.get(index) else {
                continue;
            };
            let dep_positions = deps
                .iter()
                .map(|d| self.by_hash.get(d).copied().unwrap_or(OLDER))
                .collect();
            self.push(Node {
                hash: *hash,
                deps: deps.clone(),
                dep_positions,
            });
        }
        self.heads = Some(now);
        true
    }

    /// The order (indexes into `applied`) in which Automerge adds the changes of `applied` it
    /// does not hold yet, if they all follow changes the graph keeps (or `heads`) or each
    /// other, and together take the document from `heads` to exactly `now`. Automerge 0.12
    /// orders a batch with Kahn's algorithm, ready changes first in the order they came, each
    /// change's dependents queued behind it as they become ready (`pop_topo_sorted_ready`);
    /// the graph must list changes in the order Automerge does.
    fn explain(
        &self,
        heads: &[ChangeHash],
        now: &[ChangeHash],
        applied: &[&ChangeMeta],
    ) -> Option<Vec<usize>> {
        let mut seen = ChangeHashSet::default();
        let new: Vec<usize> = (0..applied.len())
            .filter(|&i| !self.by_hash.contains_key(&applied[i].0) && seen.insert(applied[i].0))
            .collect();
        let mut unsatisfied = vec![0usize; new.len()];
        let mut waiting_on: ChangeHashMap<ChangeHash, Vec<usize>> = ChangeHashMap::default();
        for (k, &i) in new.iter().enumerate() {
            // A change the graph does not keep may still be an old one sent again, which
            // Automerge skipped. Not when it depends on a kept change, a head or a new change
            // (the graph is a suffix of the document's order, and nothing depends on a head):
            // a change with no dependencies at all (a document's first) could be; so is a
            // chain of them sent again on top of it. Those are left to Automerge.
            if applied[i].1.is_empty() {
                return None;
            }
            for dep in &applied[i].1 {
                if self.by_hash.contains_key(dep) || heads.contains(dep) {
                    continue;
                }
                // Neither kept nor in this batch: older than the graph, or missing.
                if !seen.contains(dep) {
                    return None;
                }
                unsatisfied[k] += 1;
                waiting_on.entry(*dep).or_default().push(k);
            }
        }
        let mut ready: VecDeque<usize> = (0..new.len()).filter(|&k| unsatisfied[k] == 0).collect();
        let mut order = Vec::with_capacity(new.len());
        let mut expected: ChangeHashSet<ChangeHash> = heads.iter().copied().collect();
        while let Some(k) = ready.pop_front() {
            let (hash, deps) = applied[new[k]];
            order.push(new[k]);
            for dep in deps {
                expected.remove(dep);
            }
            expected.insert(*hash);
            for &dependent in waiting_on.get(hash).into_iter().flatten() {
                unsatisfied[dependent] -= 1;
                if unsatisfied[dependent] == 0 {
                    ready.push_back(dependent);
                }
            }
        }
        if order.len() != new.len() {
            return None;
        }
        let mut expected: Vec<ChangeHash> = expected.into_iter().collect();
        expected.sort_unstable();
        (expected == now).then_some(order)
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

    /// The dependencies of the kept change `hash`; `None` when it is not kept.
    pub(crate) fn deps(&self, hash: &ChangeHash) -> Option<&[ChangeHash]> {
        let node = self.nodes.get(self.index_of(hash)?)?;
        Some(&node.deps)
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

    /// Which of `candidates` (changes the document holds) are ancestors of `heads` or among
    /// them: a walk back from `heads` that goes no further back than the oldest candidate.
    /// `None` when a candidate is not kept. (Which sent changes a peer's heads acknowledge: the
    /// changes sent in the last round or two, so the walk is short, where walking everything
    /// since `heads` from the document's heads takes in all that came after.)
    pub(crate) fn ancestors_among(
        &self,
        heads: &[ChangeHash],
        candidates: &BTreeSet<ChangeHash>,
    ) -> Option<ChangeHashSet<ChangeHash>> {
        let mut floor = u64::MAX;
        for candidate in candidates {
            floor = floor.min(*self.by_hash.get(candidate)?);
        }
        let mut found = ChangeHashSet::default();
        let end = self.first + self.nodes.len() as u64;
        let mut visited = vec![false; usize::try_from(end.checked_sub(floor)?).ok()?];
        // A head older than every candidate (or than the graph) has none of them as ancestor:
        // a change comes after its dependencies.
        let mut stack: Vec<u64> = heads
            .iter()
            .filter_map(|h| self.by_hash.get(h).copied())
            .filter(|p| *p >= floor)
            .collect();
        while let Some(position) = stack.pop() {
            let slot = usize::try_from(position - floor).ok()?;
            if std::mem::replace(visited.get_mut(slot)?, true) {
                continue;
            }
            let node = self
                .nodes
                .get(usize::try_from(position - self.first).ok()?)?;
            if candidates.contains(&node.hash) {
                found.insert(node.hash);
                if found.len() == candidates.len() {
                    break;
                }
            }
            stack.extend(
                node.dep_positions
                    .iter()
                    .filter(|p| **p != OLDER && **p >= floor),
            );
        }
        Some(found)
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
                let index = Some(*position)
                    .filter(|p| *p != OLDER)
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

    /// The kept changes' hashes, in the graph's order.
    fn order(g: &RecentGraph) -> Vec<ChangeHash> {
        g.nodes.iter().map(|n| n.hash).collect()
    }

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
            // Which of the last few changes are ancestors of `theirs`: those automerge does
            // not list.
            let candidates: BTreeSet<ChangeHash> =
                graph.nodes.iter().rev().take(6).map(|n| n.hash).collect();
            if let Some(seen) = graph.ancestors_among(theirs, &candidates) {
                let unseen: Vec<ChangeHash> = expected.iter().map(|(h, _)| *h).collect();
                let want: ChangeHashSet<ChangeHash> = candidates
                    .iter()
                    .filter(|c| !unseen.contains(c))
                    .copied()
                    .collect();
                assert_eq!(seen, want, "ancestors of {theirs:?} among {candidates:?}");
            }
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
        #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(48)))]
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(48)))]
        /// A hub takes the changes of several peers in one `load_incremental` (as a relay
        /// applies a round of messages together): caught up from those changes as they came,
        /// the graph lists exactly what caught up from Automerge lists, in the same order,
        /// whenever it says the changes sufficed; and they suffice when every dependency is
        /// kept or among them (and every change has one).
        #[test]
        fn catching_up_from_applied_changes_matches_automerge(
            steps in proptest::collection::vec((1..4usize, 0..4u8, 0..8u8), 1..60),
        ) {
            let mut docs: Vec<AutoCommit> = (0..4u8)
                .map(|i| AutoCommit::new().with_actor(automerge::ActorId::from([i + 1; 16])))
                .collect();
            let mut fast = RecentGraph::default();
            let mut reference = RecentGraph::default();
            fast.catch_up(&mut docs[0]);
            reference.catch_up(&mut docs[0]);
            for (i, (who, what, peers)) in steps.into_iter().enumerate() {
                match what {
                    0 | 1 => {
                        docs[who].put(ROOT, format!("k{i}"), i as i64).expect("put");
                        docs[who].commit();
                    }
                    2 => {
                        // Peers merge among themselves (and from the hub): dependencies cross.
                        let other = if who == 3 { 1 } else { who + 1 };
                        let mut theirs = docs[if peers % 2 == 0 { 0 } else { other }].clone();
                        docs[who].merge(&mut theirs).expect("merge");
                    }
                    _ => {
                        // The hub takes what the chosen peers have and it lacks, in one apply.
                        let hub_heads = docs[0].get_heads();
                        let mut bytes = Vec::new();
                        let mut applied = Vec::new();
                        for peer in (1..4).filter(|p| peers & (1 << (p - 1)) != 0) {
                            let known: Vec<ChangeHash> = hub_heads
                                .iter()
                                .filter(|h| docs[peer].get_change_meta_by_hash(h).is_some())
                                .copied()
                                .collect();
                            for change in docs[peer].get_changes(&known) {
                                bytes.extend_from_slice(change.raw_bytes());
                                applied.push((change.hash(), change.deps().to_vec()));
                            }
                        }
                        // (A change with no dependencies could be an old one sent again:
                        // always left to Automerge.)
                        let causal = applied.iter().all(|(_, deps)| {
                            !deps.is_empty() && deps.iter().all(|d| {
                                docs[0].get_change_meta_by_hash(d).is_some()
                                    || applied.iter().any(|(h, _)| h == d)
                            })
                        });
                        docs[0].load_incremental(&bytes).expect("load");
                        let refs: Vec<&ChangeMeta> = applied.iter().collect();
                        let ok = fast.catch_up_with(&mut docs[0], &refs);
                        prop_assert!(ok || !causal, "changes in causal order suffice");
                    }
                }
                reference.catch_up(&mut docs[0]);
                fast.catch_up(&mut docs[0]);
                prop_assert_eq!(order(&fast), order(&reference));
            }
        }
    }

    /// A peer sends the document's first change again with a new one on top: Automerge skips
    /// the old one, and the graph must not add it (found in review).
    #[test]
    fn an_old_change_sent_again_is_not_taken_for_a_new_one() {
        let mut hub = AutoCommit::new().with_actor(automerge::ActorId::from([1; 16]));
        hub.put(ROOT, "a", 1).expect("put");
        hub.commit();
        let root = hub.get_last_local_change().expect("a change").clone();
        let mut peer = hub.fork().with_actor(automerge::ActorId::from([2; 16]));
        let (mut fast, mut reference) = (RecentGraph::default(), RecentGraph::default());
        fast.catch_up(&mut hub);
        reference.catch_up(&mut hub);
        hub.put(ROOT, "c1", 1).expect("put");
        hub.commit();
        fast.catch_up(&mut hub);
        reference.catch_up(&mut hub);
        peer.put(ROOT, "n", 2).expect("put");
        peer.commit();
        let new = peer.get_last_local_change().expect("a change").clone();
        let mut bytes = root.raw_bytes().to_vec();
        bytes.extend_from_slice(new.raw_bytes());
        hub.load_incremental(&bytes).expect("load");
        let applied = [
            (root.hash(), root.deps().to_vec()),
            (new.hash(), new.deps().to_vec()),
        ];
        let refs: Vec<&ChangeMeta> = applied.iter().collect();
        assert!(!fast.catch_up_with(&mut hub, &refs), "left to Automerge");
        reference.catch_up(&mut hub);
        assert_eq!(order(&fast), order(&reference));
    }

    /// A change Automerge queued (its dependency missing) arrives again with that dependency
    /// and another change: Automerge applies the queued one first, so the graph asks it.
    #[test]
    fn changes_waiting_in_automerge_are_left_to_automerge() {
        let mut hub = AutoCommit::new().with_actor(automerge::ActorId::from([1; 16]));
        hub.put(ROOT, "a", 1).expect("put");
        hub.commit();
        let mut p = hub.fork().with_actor(automerge::ActorId::from([2; 16]));
        let mut q = hub.fork().with_actor(automerge::ActorId::from([3; 16]));
        p.put(ROOT, "d", 1).expect("put");
        p.commit();
        let d = p.get_last_local_change().expect("a change").clone();
        q.merge(&mut p).expect("merge");
        p.put(ROOT, "q", 1).expect("put");
        p.commit();
        let waits = p.get_last_local_change().expect("a change").clone();
        q.put(ROOT, "r", 1).expect("put");
        q.commit();
        let r = q.get_last_local_change().expect("a change").clone();
        let (mut fast, mut reference) = (RecentGraph::default(), RecentGraph::default());
        fast.catch_up(&mut hub);
        reference.catch_up(&mut hub);
        hub.load_incremental(waits.raw_bytes()).expect("load");
        let first = [(waits.hash(), waits.deps().to_vec())];
        fast.catch_up_with(&mut hub, &first.iter().collect::<Vec<_>>());
        reference.catch_up(&mut hub);
        fast.catch_up(&mut hub);
        let mut bytes = r.raw_bytes().to_vec();
        bytes.extend_from_slice(d.raw_bytes());
        bytes.extend_from_slice(waits.raw_bytes());
        hub.load_incremental(&bytes).expect("load");
        let applied = [
            (r.hash(), r.deps().to_vec()),
            (d.hash(), d.deps().to_vec()),
            (waits.hash(), waits.deps().to_vec()),
        ];
        assert!(!fast.catch_up_with(&mut hub, &applied.iter().collect::<Vec<_>>()));
        reference.catch_up(&mut hub);
        assert_eq!(order(&fast), order(&reference));
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
