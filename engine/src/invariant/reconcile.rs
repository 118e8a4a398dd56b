//! The reconciliation loop: observe → compare → act → repeat.
//!
//! A [`Reconciler`] watches one document. [`Reconciler::observe`] looks at the document as it is
//! now (after a merge or a commit), remembers in which commit each collection entry first
//! appeared, and compares the state with every invariant: the result is the open violations.
//! [`Reconciler::act`] turns them into ops by policy: a resolution fact, a restored value, or a
//! conflict for a person. The driver applies the ops as an ordinary change (on the server: a
//! commit like any other) and observes again, until nothing is open; [`Reconciler::reconcile`]
//! does exactly that for a replica that applies ops itself. The loop ends: every action writes
//! the fact keyed by the violation id, after which that violation is no longer open, and a
//! violation that keeps coming back escalates to a conflict for a person.
//!
//! Entry order: the entries of a collection are ranked by the commit sequence number at which
//! the reconciler first saw them, then by key. On the server, which observes after every commit,
//! that is commit order, so "the change later in commit order loses" holds. The server starts a
//! document's reconciler as soon as it loads the document (observing at its head), so what was
//! stored ranks before anything committed after a restart or an eviction. A replica that is not
//! the authority sees a different order and so only detects (to warn its user) and never writes.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;
use smallvec::SmallVec;

use super::collection::{contribution, Collection, EntryMeta, Key};
use super::record::is_reserved;
use super::record::{
    conflict_op, read_records, resolution_op, Action, Conflict, ConflictOption, Records,
    Resolution, ViolationId,
};
use super::relate::{Layout, Relation};
use super::spec::{InvariantSpec, Policy, Rule, Schema};
use crate::doc::{
    Change, ChangeId, DocError, DocKind, Document, FieldValue, Op, Path, Segment, Touched,
};
use crate::ids::DocumentId;

/// A custom rule written in Rust, for what the built-in kinds cannot say.
pub trait Invariant: Send {
    /// A name unique within the document type.
    fn id(&self) -> &str;
    /// What to do when it breaks (`Ask` writes a conflict with the violation's options).
    fn policy(&self) -> Policy;
    /// Checks the document; each violation names what is involved (for its id), why, and the
    /// ops that repair it.
    fn check(&self, doc: &Document) -> Vec<CustomViolation>;
}

/// What a custom rule found.
#[derive(Clone, Debug, PartialEq)]
pub struct CustomViolation {
    /// Ids of what is involved (entry keys, values); the violation id hashes them.
    pub involved: Vec<String>,
    /// The path concerned.
    pub path: Path,
    /// Why, in words.
    pub reason: String,
    /// Ops that repair it.
    pub repair: Vec<Op>,
    /// Options for a person, when the policy is `Ask`.
    pub options: Vec<ConflictOption>,
}

/// A state that breaks an invariant.
#[derive(Clone, Debug, PartialEq)]
pub struct Violation {
    /// Deterministic id.
    pub id: ViolationId,
    /// The invariant's id.
    pub invariant: String,
    /// The rule's kind ("range", "unique", ... or "custom").
    pub kind: &'static str,
    /// The invariant's policy.
    pub policy: Policy,
    /// The collection or value concerned.
    pub path: Path,
    /// Entries the policy would void (collections), latest in commit order first to go.
    pub victims: Vec<String>,
    /// The value a repair would set (value rules).
    pub proposed: Option<Value>,
    /// Why, in words.
    pub reason: String,
    /// What a person would choose between.
    pub options: Vec<ConflictOption>,
    repair: Vec<Op>,
    /// Closes the open conflict with this id: what it asked about no longer breaks the rule.
    withdraws: bool,
    /// For a value rule: the changes that wrote the value a repair overrides.
    writers: Vec<ChangeId>,
}

/// Counters of what the loop did, by rule kind and policy (for metrics).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReconcileStats {
    /// Violations seen for the first time.
    pub found: BTreeMap<(&'static str, &'static str), u64>,
    /// Violations resolved by a fact (void, restore).
    pub resolved: BTreeMap<(&'static str, &'static str), u64>,
    /// Conflicts opened for a person (ask, or escalation).
    pub asked: BTreeMap<(&'static str, &'static str), u64>,
}

/// What [`Reconciler::reconcile`] did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The changes it applied, to send like any local change.
    pub changes: Vec<Change>,
    /// The violations it saw.
    pub violations: Vec<Violation>,
    /// Rounds of observe → act it ran.
    pub rounds: u32,
}

/// For each touched path, the collection whose own path it is (see [`Layout::which`]).
type Exact = SmallVec<[Option<usize>; 8]>;

/// The reconciliation loop of one document. See the [module docs](self).
pub struct Reconciler {
    document: DocumentId,
    kind: DocKind,
    specs: Vec<InvariantSpec>,
    custom: Vec<Box<dyn Invariant>>,
    by: String,
    authority: bool,
    collections: Vec<Collection>,
    /// For each spec, the index of its collection in `collections` (collection rules only).
    collection_of: Vec<Option<usize>>,
    records: Records,
    loaded: bool,
    roots: Vec<String>,
    last_valid: HashMap<String, Value>,
    /// The resolutions of value rules already looked at: a decision makes its value valid at
    /// the look that first sees it, not from any state forever after.
    honored: std::collections::HashSet<String>,
    attempts: HashMap<ViolationId, u32>,
    seen: std::collections::HashSet<ViolationId>,
    local_seq: u64,
    /// The changes of the last observation: who wrote a value when the document cannot tell.
    last_changes: Vec<ChangeId>,
    /// The buffer the document's touched paths are taken into, kept between observations.
    touched: Vec<Touched>,
    /// How the collections' paths relate to each collection and to each rule's path.
    layout: Layout,
    max_rounds: u32,
    stats: ReconcileStats,
}

impl Reconciler {
    /// A reconciler for `document` under `schema`. `by` names who writes the facts ("server", a
    /// replica id); only an `authority` writes (the server, which gives commit order).
    pub fn new(
        schema: &Schema,
        document: DocumentId,
        kind: DocKind,
        by: impl Into<String>,
        authority: bool,
    ) -> Self {
        let mut collections: Vec<Collection> = Vec::new();
        let mut collection_of = vec![None; schema.invariants.len()];
        for (index, spec) in schema.invariants.iter().enumerate() {
            if !spec.rule.is_collection() {
                continue;
            }
            let path = spec.rule.path();
            let at = match collections.iter().position(|c| *c.path == *path) {
                Some(at) => at,
                None => {
                    collections.push(Collection::new(path.clone()));
                    collections.len() - 1
                }
            };
            collections[at].watch(index, &spec.rule);
            collection_of[index] = Some(at);
        }
        let mut roots: Vec<String> = schema
            .invariants
            .iter()
            .filter_map(|s| match s.rule.path().segments().first() {
                Some(crate::doc::Segment::Key(k)) => Some(k.clone()),
                _ => None,
            })
            .collect();
        roots.push("_accord".to_owned());
        roots.sort();
        roots.dedup();
        let layout = Layout::new(
            collections.iter().map(|c| c.path.clone()).collect(),
            schema
                .invariants
                .iter()
                .map(|s| s.rule.path().clone())
                .collect(),
        );
        Self {
            document,
            kind,
            specs: schema.invariants.clone(),
            custom: Vec::new(),
            by: by.into(),
            authority,
            collections,
            collection_of,
            records: Records::default(),
            loaded: false,
            roots,
            last_valid: HashMap::new(),
            honored: std::collections::HashSet::new(),
            attempts: HashMap::new(),
            seen: std::collections::HashSet::new(),
            local_seq: 0,
            last_changes: Vec::new(),
            touched: Vec::new(),
            layout,
            max_rounds: 8,
            stats: ReconcileStats::default(),
        }
    }

    /// Adds a custom rule.
    pub fn with_rule(mut self, rule: Box<dyn Invariant>) -> Self {
        self.custom.push(rule);
        self
    }

    /// Bounds the rounds of [`Reconciler::reconcile`].
    pub fn with_max_rounds(mut self, rounds: u32) -> Self {
        self.max_rounds = rounds.max(1);
        self
    }

    /// What the loop did so far.
    pub fn stats(&self) -> &ReconcileStats {
        &self.stats
    }

    /// Whether this reconciler writes facts.
    pub fn is_authority(&self) -> bool {
        self.authority
    }

    /// Observes the document after a merge or commit: entries new since the last observation are
    /// ranked at `seq` (the commit's sequence number; a local counter when `None`) and
    /// attributed to `changes`. Returns the open violations (those without a recorded fact).
    ///
    /// Incremental: after the first call only what changed since the previous one is read (the
    /// document tracks changed paths), and rules are checked against running aggregates.
    pub fn observe(
        &mut self,
        doc: &mut Document,
        seq: Option<u64>,
        changes: &[ChangeId],
    ) -> Vec<Violation> {
        let seq = seq.unwrap_or_else(|| {
            self.local_seq += 1;
            self.local_seq
        });
        let meta = EntryMeta {
            seq,
            change: changes.first().copied(),
        };
        self.last_changes.clear();
        self.last_changes.extend_from_slice(changes);
        // The touched paths land in a buffer kept between observations (no allocation per
        // commit); it goes back, emptied, at the end.
        let mut buffer = std::mem::take(&mut self.touched);
        let exact = self.refresh(doc, meta, changes.len() != 1, &mut buffer);
        let touched = exact
            .as_ref()
            .map(|exact| (buffer.as_slice(), exact.as_slice()));
        let mut violations = Vec::new();
        let specs = std::mem::take(&mut self.specs);
        for (index, spec) in specs.iter().enumerate() {
            let found = if spec.rule.is_collection() {
                match self.collection_of[index].and_then(|at| self.collections.get(at)) {
                    Some(collection) => {
                        check_collection(doc, self.document, index, spec, collection)
                    }
                    None => Vec::new(),
                }
            } else if touched.is_none_or(|(touched, exact)| {
                (touched.iter().zip(exact)).any(|(t, e)| self.layout.touches(t, *e, index))
            }) {
                self.check_value(doc, spec)
            } else {
                // Untouched since the last look: nothing new to say about this value.
                Vec::new()
            };
            violations.extend(found);
        }
        self.specs = specs;
        crate::doc::recycle(&mut buffer);
        self.touched = buffer;
        for rule in &self.custom {
            for found in rule.check(doc) {
                violations.push(Violation {
                    id: ViolationId::compute(rule.id(), self.document, &found.involved),
                    invariant: rule.id().to_owned(),
                    kind: "custom",
                    policy: rule.policy(),
                    path: found.path,
                    victims: Vec::new(),
                    proposed: None,
                    reason: found.reason,
                    options: found.options,
                    repair: found.repair,
                    withdraws: false,
                    writers: Vec::new(),
                });
            }
        }
        // The ids found, for closing conflicts no longer found (only when any is open: most
        // looks have none, and this runs after every commit).
        let found_ids: Option<std::collections::HashSet<String>> = (self.authority
            && self.records.open_conflicts().next().is_some())
        .then(|| violations.iter().map(|v| v.id.key()).collect());
        let records = &self.records;
        violations.retain(|v| {
            let key = v.id.key();
            let asked = v.policy == Policy::Ask && records.conflicts.contains_key(&key);
            let escalated = records.conflicts.get(&key).is_some_and(|c| c.escalated);
            !records.resolutions.contains_key(&key) && !asked && !escalated
        });
        for v in &violations {
            if self.seen.insert(v.id) {
                *self
                    .stats
                    .found
                    .entry((v.kind, v.policy.name()))
                    .or_default() += 1;
            }
        }
        if let Some(found) = found_ids {
            self.withdraw_moot_conflicts(&found, &mut violations);
        }
        violations
    }

    /// Adds, for each open conflict of a collection rule that this look no longer finds (the
    /// claims it asked about changed: one was withdrawn, a third arrived), a violation that
    /// closes it, so the inbox never asks about a question that no longer stands. Collection
    /// rules are checked on every look, so "not found" means gone. (A value rule is checked
    /// only when its value changes; its conflicts stay until a person answers.)
    fn withdraw_moot_conflicts(
        &self,
        found: &std::collections::HashSet<String>,
        violations: &mut Vec<Violation>,
    ) {
        for (key, conflict) in self.records.open_conflicts() {
            if found.contains(key) {
                continue;
            }
            let Some(spec) = self.specs.iter().find(|s| s.id == conflict.invariant) else {
                continue;
            };
            if !spec.rule.is_collection() {
                continue;
            }
            let Some(id) = ViolationId::from_key(key) else {
                continue;
            };
            violations.push(Violation {
                id,
                invariant: spec.id.clone(),
                kind: spec.rule.kind(),
                policy: spec.policy,
                path: conflict.path.clone(),
                victims: Vec::new(),
                proposed: None,
                reason: format!("withdrawn: {} no longer applies", conflict.question),
                options: Vec::new(),
                repair: Vec::new(),
                withdraws: true,
                writers: Vec::new(),
            });
        }
    }

    /// Brings the cached records and collections up to date with what changed, which it puts
    /// in `touched`. Returns which collection's own path each change is at (see
    /// [`Layout::which`]), or `None` when everything must be assumed changed (`touched` is then
    /// empty). With `several_changes`, each touched entry is credited to the change that wrote
    /// it (when the document can tell) rather than to the first change of the batch.
    fn refresh(
        &mut self,
        doc: &mut Document,
        meta: EntryMeta,
        several_changes: bool,
        touched: &mut Vec<Touched>,
    ) -> Option<Exact> {
        let known = if self.loaded {
            doc.take_touched_into(touched)
        } else {
            doc.track_changes(&self.roots);
            for collection in &self.collections {
                doc.track_entries(&collection.path, collection.fields());
            }
            let _ = doc.take_touched();
            self.loaded = true;
            touched.clear();
            false
        };
        if !known {
            self.records = read_records(doc);
            for collection in &mut self.collections {
                collection.load(doc, meta);
                collection.set_voided(voided_of(&self.records, &collection.path));
            }
            return None;
        }
        let touched = &touched[..];
        let exact: Exact = touched.iter().map(|t| self.layout.which(&t.path)).collect();
        let records_touched = touched.iter().any(|t| match t.path.segments().first() {
            Some(Segment::Key(k)) => is_reserved(k),
            // A group at the root: each key is a top-level path.
            None => t.keys.iter().any(|k| is_reserved(&k.key)),
            _ => false,
        });
        if records_touched {
            self.records = read_records(doc);
            for collection in &mut self.collections {
                collection.set_voided(voided_of(&self.records, &collection.path));
            }
        }
        // The touched entries of each collection, borrowed from `touched` (no copies on this
        // path, which runs after every commit): the key, and the entry's fields when the
        // document reported them.
        type Touch<'t> = (&'t str, Option<&'t Key>, Option<&'t [Option<FieldValue>]>);
        let mut keys: SmallVec<[Touch; 8]> = SmallVec::new();
        let layout = &self.layout;
        for (c, collection) in self.collections.iter_mut().enumerate() {
            let at = collection.path.segments();
            let depth = at.len();
            keys.clear();
            let mut reload = false;
            for (t, which) in touched.iter().zip(&exact) {
                let path = t.path.segments();
                // Read from the layout's table when `path` is a collection's own (this runs
                // for every collection and every changed map after every commit).
                let relation = layout.relation(*which, path, c);
                if t.keys.is_empty() {
                    // `path` itself changed.
                    match relation {
                        Relation::Inside => {
                            if let Some(Segment::Key(key)) = path.get(depth) {
                                keys.push((key.as_str(), None, None));
                            }
                        }
                        Relation::Same | Relation::Above => reload = true,
                        Relation::Unrelated => {}
                    }
                    continue;
                }
                match relation {
                    // Entries of this collection were set or removed.
                    Relation::Same => {
                        for key in &t.keys {
                            keys.push((&key.key, Some(&key.key), key.fields.as_deref()));
                        }
                    }
                    // A change inside one entry.
                    Relation::Inside => {
                        if let Some(Segment::Key(key)) = path.get(depth) {
                            keys.push((key.as_str(), None, None));
                        }
                    }
                    // A key of an ancestor: the collection itself if it is on the way.
                    Relation::Above => {
                        if let Some(Segment::Key(next)) = at.get(path.len()) {
                            reload |= t.keys.iter().any(|k| *k.key == **next);
                        }
                    }
                    Relation::Unrelated => {}
                }
            }
            if reload {
                collection.load(doc, meta);
                continue;
            }
            // Each entry once, in key order, the one with fields first (fields are dropped
            // when a later change in the same window may have changed the entry, so any left
            // are current).
            keys.sort_unstable_by(|a, b| (a.0, a.2.is_none()).cmp(&(b.0, b.2.is_none())));
            keys.dedup_by(|a, b| a.0 == b.0);
            for &(key, shared, fields) in &keys {
                // Several changes may have arrived together: credit the one that wrote this
                // entry when the document can tell (Automerge).
                let meta = if several_changes && doc.kind() == DocKind::Automerge {
                    EntryMeta {
                        change: writer_of(doc, &Path::clone(&collection.path).key(key))
                            .or(meta.change),
                        ..meta
                    }
                } else {
                    meta
                };
                collection.refresh(doc, key, shared, fields, meta);
            }
        }
        Some(exact)
    }

    /// The ops that act on `violations` by their policies (nothing unless this reconciler is the
    /// authority). `seq` is the commit the decision is based on.
    pub fn act(&mut self, violations: &[Violation], seq: Option<u64>) -> Vec<Op> {
        if !self.authority {
            return Vec::new();
        }
        let mut ops = Vec::new();
        for v in violations {
            if v.withdraws {
                let resolution = Resolution {
                    invariant: v.invariant.clone(),
                    policy: v.policy,
                    action: Action::Void,
                    path: v.path.clone(),
                    victims: Vec::new(),
                    victim_changes: Vec::new(),
                    value: None,
                    reason: v.reason.clone(),
                    by: self.by.clone(),
                    seq,
                };
                ops.push(resolution_op(self.kind, &v.id, &resolution));
                continue;
            }
            let attempts = self.attempts.entry(v.id).or_default();
            *attempts += 1;
            let max_attempts = self
                .specs
                .iter()
                .find(|s| s.id == v.invariant)
                .map_or(3, |s| s.max_attempts);
            let escalate = *attempts > max_attempts;
            // Nothing a machine could do (a number rule holding text): a person decides, rather
            // than a fact that changes nothing and closes the violation.
            let helpless = v.proposed.is_none() && v.repair.is_empty() && v.victims.is_empty();
            if v.policy == Policy::Ask || escalate || helpless {
                let conflict = Conflict {
                    invariant: v.invariant.clone(),
                    path: v.path.clone(),
                    question: v.reason.clone(),
                    options: v.options.clone(),
                    escalated: escalate,
                };
                ops.push(conflict_op(self.kind, &v.id, &conflict));
                *self
                    .stats
                    .asked
                    .entry((v.kind, v.policy.name()))
                    .or_default() += 1;
                continue;
            }
            let (action, value) = match &v.proposed {
                Some(value) => {
                    ops.push(Op::Put {
                        path: v.path.clone(),
                        value: value.clone(),
                    });
                    self.last_valid.insert(v.invariant.clone(), value.clone());
                    (Action::Restore, Some(value.clone()))
                }
                None if !v.repair.is_empty() => {
                    ops.extend(v.repair.iter().cloned());
                    (Action::Restore, None)
                }
                None => (Action::Void, None),
            };
            let victim_changes = if v.proposed.is_some() {
                // A value rule: the change that wrote the value being overridden.
                v.writers.iter().map(|c| c.to_hex()).collect()
            } else {
                self.victim_changes(&v.path, &v.victims)
            };
            let resolution = Resolution {
                invariant: v.invariant.clone(),
                policy: v.policy,
                action,
                path: v.path.clone(),
                victims: v.victims.clone(),
                victim_changes,
                value,
                reason: v.reason.clone(),
                by: self.by.clone(),
                seq,
            };
            ops.push(resolution_op(self.kind, &v.id, &resolution));
            *self
                .stats
                .resolved
                .entry((v.kind, v.policy.name()))
                .or_default() += 1;
        }
        ops
    }

    /// Runs the loop on a document this replica edits itself: observe, act, apply the ops as a
    /// change, and again, until nothing is open or the round limit is reached.
    pub fn reconcile(
        &mut self,
        doc: &mut Document,
        seq: Option<u64>,
        changes: &[ChangeId],
    ) -> Result<Outcome, DocError> {
        let mut outcome = Outcome::default();
        let mut attribution = changes.to_vec();
        for _ in 0..self.max_rounds {
            outcome.rounds += 1;
            let violations = self.observe(doc, seq, &attribution);
            if violations.is_empty() {
                break;
            }
            let ops = self.act(&violations, seq);
            outcome.violations.extend(violations);
            if ops.is_empty() {
                break;
            }
            match doc.apply_ops(&ops) {
                Ok(Some(change)) => {
                    attribution = vec![change.id];
                    outcome.changes.push(change);
                }
                Ok(None) => break,
                Err(partial) => {
                    if let Some(change) = partial.change {
                        outcome.changes.push(change);
                    }
                    return Err(partial.error);
                }
            }
        }
        Ok(outcome)
    }

    /// The ops that settle the open conflict `key` with option `choice`, decided by `by`.
    pub fn choose(
        &self,
        doc: &Document,
        key: &str,
        choice: usize,
        by: &str,
    ) -> Result<Vec<Op>, ChooseError> {
        choose(doc, key, choice, by)
    }

    fn victim_changes(&self, path: &Path, victims: &[String]) -> Vec<String> {
        let Some(collection) = self.collections.iter().find(|c| *c.path == *path) else {
            return Vec::new();
        };
        let mut out: Vec<String> = victims
            .iter()
            .filter_map(|k| collection.entry(k).and_then(|e| e.meta.change))
            .map(|c| c.to_hex())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    fn check_value(&mut self, doc: &Document, spec: &InvariantSpec) -> Vec<Violation> {
        let records = &self.records;
        let path = spec.rule.path();
        let Some(current) = doc.get(path) else {
            return Vec::new();
        };
        // A value a recorded decision set is valid by definition, when the decision is new (a
        // person's choice, a restore): the look that first sees a decision honours it once.
        // Later, that value is judged like any other (a status restored to "booked" once may
        // not come back to "booked" from "done").
        let mut decided = false;
        let mut decisions = 0usize;
        for (key, r) in &records.resolutions {
            if r.invariant != spec.id {
                continue;
            }
            decisions += 1;
            if !self.honored.contains(key) {
                self.honored.insert(key.clone());
                decided |= r.value.as_ref() == Some(&current);
            }
        }
        let last = self.last_valid.get(&spec.id).cloned();
        let verdict = match &spec.rule {
            Rule::Range { min, max, .. } => {
                let n = current.as_f64();
                let ok =
                    n.is_some_and(|n| min.is_none_or(|lo| n >= lo) && max.is_none_or(|hi| n <= hi));
                if ok || decided {
                    None
                } else {
                    let fallback = n.map(|n| {
                        let n = min.map_or(n, |lo| n.max(lo));
                        let n = max.map_or(n, |hi| n.min(hi));
                        serde_json::json!(n)
                    });
                    let proposed = last.clone().or(fallback);
                    Some((format!("{path} is {current}, outside its bounds"), proposed))
                }
            }
            Rule::Transitions { allowed, order, .. } => {
                let ok = match &last {
                    None => true,
                    Some(prev) if *prev == current => true,
                    Some(prev) => prev
                        .as_str()
                        .and_then(|p| allowed.get(p))
                        .is_some_and(|next| {
                            current
                                .as_str()
                                .is_some_and(|c| next.iter().any(|n| n == c))
                        }),
                };
                if ok || decided {
                    None
                } else {
                    let prev = last.clone().unwrap_or(Value::Null);
                    let proposed = match spec.policy {
                        Policy::Auto => {
                            let rank = |v: &Value| {
                                v.as_str()
                                    .and_then(|s| order.iter().position(|o| o == s))
                                    .map_or(-1, |p| p as i64)
                            };
                            if rank(&current) >= rank(&prev) {
                                current.clone()
                            } else {
                                prev.clone()
                            }
                        }
                        _ => prev.clone(),
                    };
                    Some((
                        format!("{path} cannot go from {prev} to {current}"),
                        Some(proposed),
                    ))
                }
            }
            _ => None,
        };
        // Who wrote the value (Automerge can tell; otherwise the changes of this look).
        let writers = match (&verdict, writer_of(doc, path)) {
            (None, _) => Vec::new(),
            (Some(_), Some(writer)) => vec![writer],
            (Some(_), None) => self.last_changes.clone(),
        };
        let Some((reason, proposed)) = verdict else {
            self.last_valid.insert(spec.id.clone(), current);
            return Vec::new();
        };
        // Auto may accept the new value as it is (a forward jump): then nothing is wrong.
        if proposed.as_ref() == Some(&current) {
            self.last_valid.insert(spec.id.clone(), current);
            return Vec::new();
        }
        let previous = last.unwrap_or(Value::Null);
        // The same move can break the rule again after it was repaired; the decisions recorded
        // for this rule so far tell the occurrences apart (every replica with the same records
        // computes the same id, and a repaired occurrence stays closed).
        let involved = vec![
            format!("{path}={current}"),
            format!("from={previous}"),
            format!("after={decisions}"),
        ];
        let options = vec![
            ConflictOption {
                entry: None,
                value: previous,
                author: None,
                at: None,
                change: None,
                seq: None,
            },
            ConflictOption {
                entry: None,
                value: current,
                author: None,
                at: None,
                change: None,
                seq: None,
            },
        ];
        vec![Violation {
            id: ViolationId::compute(&spec.id, self.document, &involved),
            invariant: spec.id.clone(),
            kind: spec.rule.kind(),
            policy: spec.policy,
            path: path.clone(),
            victims: Vec::new(),
            proposed,
            reason,
            options,
            repair: Vec::new(),
            withdraws: false,
            writers,
        }]
    }
}

/// The sign (-1, 0, 1) of `Σ values − bound`, computed exactly, so the same whatever the
/// order of `values`. Shewchuk's non-overlapping partials (the algorithm of Python's
/// `math.fsum`), written out here because it is a dozen lines: the partials always add up to
/// the exact sum, and the largest of them has its sign.
fn exact_sign(values: impl Iterator<Item = f64>, bound: f64) -> i8 {
    let mut partials: Vec<f64> = Vec::new();
    for value in values.chain(std::iter::once(-bound)) {
        if !value.is_finite() {
            continue;
        }
        let mut x = value;
        let mut kept = 0;
        for at in 0..partials.len() {
            let mut y = partials[at];
            if x.abs() < y.abs() {
                std::mem::swap(&mut x, &mut y);
            }
            let hi = x + y;
            let lo = y - (hi - x);
            if lo != 0.0 {
                partials[kept] = lo;
                kept += 1;
            }
            x = hi;
        }
        partials.truncate(kept);
        partials.push(x);
    }
    match partials.iter().rev().find(|p| **p != 0.0) {
        Some(p) if *p > 0.0 => 1,
        Some(_) => -1,
        None => 0,
    }
}

/// The total a `range` rule with a fold derives from its ledger: the sum over entries that no
/// resolution voided. Apps show this (the balance), never a stored running total.
pub fn folded_total(doc: &Document, spec: &InvariantSpec) -> Option<f64> {
    let Rule::Range {
        path,
        fold: Some(fold),
        ..
    } = &spec.rule
    else {
        return None;
    };
    let records = read_records(doc);
    let voided = records.voided(path);
    let Some(Value::Object(entries)) = doc.get(path) else {
        return Some(0.0);
    };
    Some(
        entries
            .iter()
            .filter(|(k, _)| !voided.contains(k.as_str()))
            .map(|(_, e)| contribution(fold, e))
            .sum(),
    )
}

/// The ops that settle the open conflict `key` of `doc` with option `choice`, decided by `by`:
/// a resolution naming the losing options (and, for a value, the chosen value written back).
pub fn choose(doc: &Document, key: &str, choice: usize, by: &str) -> Result<Vec<Op>, ChooseError> {
    let records = read_records(doc);
    if records.resolutions.contains_key(key) {
        return Err(ChooseError::AlreadyResolved(key.to_owned()));
    }
    let conflict = records
        .conflicts
        .get(key)
        .ok_or_else(|| ChooseError::UnknownConflict(key.to_owned()))?;
    let chosen = conflict
        .options
        .get(choice)
        .ok_or(ChooseError::UnknownOption(choice))?;
    let mut ops = Vec::new();
    let victims: Vec<String> = conflict
        .options
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != choice)
        .filter_map(|(_, o)| o.entry.clone())
        .collect();
    let victim_changes: Vec<String> = conflict
        .options
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != choice)
        .filter_map(|(_, o)| o.change.clone())
        .collect();
    let value = if chosen.entry.is_none() {
        ops.push(Op::Put {
            path: conflict.path.clone(),
            value: chosen.value.clone(),
        });
        Some(chosen.value.clone())
    } else {
        None
    };
    let id = parse_key(key).ok_or_else(|| ChooseError::UnknownConflict(key.to_owned()))?;
    let resolution = Resolution {
        invariant: conflict.invariant.clone(),
        policy: Policy::Ask,
        action: Action::Chosen,
        path: conflict.path.clone(),
        victims,
        victim_changes,
        value,
        reason: format!("{} chose {}", by, describe(chosen)),
        by: by.to_owned(),
        seq: None,
    };
    ops.push(resolution_op(doc.kind(), &id, &resolution));
    Ok(ops)
}

/// The change that wrote the value at `path`, when the document keeps that (Automerge keeps the
/// op behind every value; Yrs does not expose it).
fn writer_of(doc: &Document, path: &Path) -> Option<ChangeId> {
    use automerge::ReadDoc;
    let Document::Automerge(am) = doc else {
        return None;
    };
    let native = am.native_ref();
    let mut obj = automerge::ROOT;
    let (last, parents) = path.segments().split_last()?;
    let prop = |segment: &crate::doc::Segment| match segment {
        crate::doc::Segment::Key(k) => automerge::Prop::Map(k.clone()),
        crate::doc::Segment::Index(i) => automerge::Prop::Seq(*i),
    };
    for segment in parents {
        let (_, id) = native.get(&obj, prop(segment)).ok()??;
        obj = id;
    }
    let (_, id) = native.get(&obj, prop(last)).ok()??;
    native.hash_for_opid(&id).map(|h| ChangeId(h.0))
}

/// Why a conflict choice failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChooseError {
    /// No conflict with that key.
    #[error("no conflict {0}")]
    UnknownConflict(String),
    /// The conflict is settled already.
    #[error("conflict {0} is already resolved")]
    AlreadyResolved(String),
    /// The option does not exist.
    #[error("no option {0}")]
    UnknownOption(usize),
}

fn parse_key(key: &str) -> Option<ViolationId> {
    if key.len() != 32 || !key.is_ascii() {
        return None;
    }
    let mut id = [0u8; 32];
    for (i, byte) in id.iter_mut().take(16).enumerate() {
        *byte = u8::from_str_radix(&key[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(ViolationId(id))
}

fn describe(option: &ConflictOption) -> String {
    match (&option.author, &option.entry) {
        (Some(author), _) => format!("{author}'s {}", option.value),
        (None, Some(entry)) => format!("entry {entry}"),
        (None, None) => option.value.to_string(),
    }
}

fn author_of(entry: &Value) -> Option<String> {
    ["by", "author", "holder"]
        .iter()
        .find_map(|f| entry.get(*f).and_then(Value::as_str).map(str::to_owned))
}

fn option_for(key: &str, entry: &Value, value: Value, meta: &EntryMeta) -> ConflictOption {
    ConflictOption {
        entry: Some(key.to_owned()),
        value,
        author: author_of(entry),
        at: entry.get("at").cloned(),
        change: meta.change.map(|c| c.to_hex()),
        seq: Some(meta.seq),
    }
}

fn voided_of(records: &Records, path: &Path) -> std::collections::HashSet<String> {
    records
        .voided(path)
        .into_iter()
        .map(str::to_owned)
        .collect()
}

/// Checks rule `index` over its collection using the running aggregates; only a broken rule
/// pays for ranking the entries.
fn check_collection(
    doc: &Document,
    document: DocumentId,
    index: usize,
    spec: &InvariantSpec,
    collection: &Collection,
) -> Vec<Violation> {
    let path = spec.rule.path();
    let violation = |involved: Vec<String>,
                     victims: Vec<String>,
                     reason: String,
                     options: Vec<ConflictOption>| Violation {
        id: ViolationId::compute(&spec.id, document, &involved),
        invariant: spec.id.clone(),
        kind: spec.rule.kind(),
        policy: spec.policy,
        path: path.clone(),
        victims,
        proposed: None,
        reason,
        options,
        repair: Vec::new(),
        withdraws: false,
        writers: Vec::new(),
    };
    match &spec.rule {
        Rule::Range {
            fold: Some(_),
            min,
            max,
            ..
        } => {
            let total = collection.total(index);
            let slack = collection.total_slack(index);
            let near = |bound: &Option<f64>| bound.is_some_and(|b| (total - b).abs() <= slack);
            let within = if near(min) || near(max) {
                // So close to a bound the running total's rounding (which depends on the order
                // entries came in) could decide: compare the exact sum instead, which every
                // replica computes alike.
                let amounts: Vec<f64> = collection
                    .ranked_live()
                    .into_iter()
                    .map(|(_, entry)| collection.amount(entry, index))
                    .collect();
                let against = |bound: f64| exact_sign(amounts.iter().copied(), bound);
                min.is_none_or(|lo| against(lo) >= 0) && max.is_none_or(|hi| against(hi) <= 0)
            } else {
                min.is_none_or(|lo| total >= lo) && max.is_none_or(|hi| total <= hi)
            };
            if within {
                return Vec::new();
            }
            // Keep the longest run in commit order that holds; what would break it goes.
            // Entries of one rank have no order among them (one message's changes; what a
            // loaded document held): those that cannot break a bound count first (for a floor,
            // the deposits before the spends), then the others by key. By key alone, an old
            // spend whose key sorts before its deposit would go instead of the new overdraft.
            let can_break = |c: f64| (c < 0.0 && min.is_some()) || (c > 0.0 && max.is_some());
            let mut ranked: Vec<_> = collection
                .ranked_live()
                .into_iter()
                .map(|(key, entry)| (key, entry, collection.amount(entry, index)))
                .collect();
            ranked.sort_by(|a, b| {
                (a.1.meta.seq, can_break(a.2), a.0).cmp(&(b.1.meta.seq, can_break(b.2), b.0))
            });
            let mut running = 0.0;
            let mut victims = Vec::new();
            let mut options = Vec::new();
            for (key, entry, c) in ranked {
                let breaks = (c < 0.0 && min.is_some_and(|lo| running + c < lo))
                    || (c > 0.0 && max.is_some_and(|hi| running + c > hi));
                if breaks {
                    victims.push(key.to_string());
                    let value = collection.value(doc, key);
                    options.push(option_for(key, &value, value.clone(), &entry.meta));
                } else {
                    running += c;
                }
            }
            if victims.is_empty() {
                return Vec::new();
            }
            let reason = format!(
                "{path} would come to {total}; {} voided to keep it at {running}",
                victims.join(", ")
            );
            vec![violation(victims.clone(), victims, reason, options)]
        }
        Rule::Unique { .. } | Rule::Once { .. } if !collection.is_contested(index) => Vec::new(),
        Rule::Unique { field, .. }
        | Rule::Once {
            key_field: field, ..
        } => collection
            .contested(index)
            .into_iter()
            .map(|(value, keys)| {
                let mut claims: Vec<(&String, &super::collection::Entry, Value)> = keys
                    .iter()
                    .filter_map(|k| {
                        collection
                            .entry(k)
                            .map(|e| (k, e, collection.value(doc, k)))
                    })
                    .collect();
                claims.sort_by(|a, b| (a.1.meta.seq, a.0).cmp(&(b.1.meta.seq, b.0)));
                let involved: Vec<String> = claims.iter().map(|(k, _, _)| (*k).clone()).collect();
                let victims: Vec<String> = involved[1..].to_vec();
                let options = claims
                    .iter()
                    .map(|(k, e, value)| option_for(k, value, value.clone(), &e.meta))
                    .collect();
                let reason = match &spec.rule {
                    Rule::Once { .. } => format!(
                        "{field} {value} was recorded {} times; it counts once",
                        claims.len()
                    ),
                    _ => {
                        let who: Vec<String> = claims
                            .iter()
                            .map(|(k, _, value)| author_of(value).unwrap_or_else(|| (*k).clone()))
                            .collect();
                        format!("{} all claimed {field} {value}", who.join(" and "))
                    }
                };
                violation(involved, victims, reason, options)
            })
            .collect(),
        Rule::Capacity { max, .. } => {
            if collection.live_count() <= *max {
                return Vec::new();
            }
            let ranked = collection.ranked_live();
            let over = &ranked[*max..];
            let victims: Vec<String> = over.iter().map(|(k, _)| k.to_string()).collect();
            let options = over
                .iter()
                .map(|(k, e)| {
                    let value = collection.value(doc, k);
                    option_for(k, &value, value.clone(), &e.meta)
                })
                .collect();
            let reason = format!(
                "{path} holds {} entries, at most {max} allowed",
                ranked.len()
            );
            vec![violation(victims.clone(), victims, reason, options)]
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod exact_tests {
    use super::*;
    use crate::doc::{DocKind, Document, Op, Path};
    use crate::ids::ReplicaId;
    use crate::invariant::collection::{Collection, EntryMeta};
    use crate::invariant::Schema;
    use serde_json::json;

    #[test]
    fn the_exact_sign_does_not_depend_on_the_order() {
        // The doubles nearest 0.1 and 0.3 add up to slightly less than the one nearest 0.4, so
        // the exact sum is negative, though 0.1 + 0.3 − 0.4 rounds to 0 in that order (and to
        // −5.6e-17 in another). Expected signs checked with exact rationals.
        for order in [[0.1, -0.4, 0.3], [0.1, 0.3, -0.4], [-0.4, 0.3, 0.1]] {
            assert_eq!(exact_sign(order.into_iter(), 0.0), -1, "{order:?}");
        }
        assert_eq!(exact_sign([0.3, -0.1, -0.2].into_iter(), 0.0), -1);
        assert_eq!(exact_sign([0.25, 0.5, -0.75].into_iter(), 0.0), 0);
        assert_eq!(exact_sign([1e16, 1.0, -1e16].into_iter(), 0.0), 1);
        assert_eq!(exact_sign([1e16, 1.0, -1e16].into_iter(), 2.0), -1);
        assert_eq!(exact_sign(std::iter::empty(), 0.0), 0);
        assert_eq!(exact_sign([5.0].into_iter(), 5.0), 0);
    }

    #[test]
    fn a_ledger_at_its_bound_is_judged_alike_whatever_order_its_total_was_kept_in() {
        // Two replicas hold the same three entries with the same commit order (0.1, then
        // −0.4, then 0.3) but kept their running totals in different orders: −5.6e-17 and 0.
        // Both must find the same violation.
        let schema = Schema::from_json(
            r#"{"document_type": "ledger", "invariants": [
                {"id": "non-negative", "kind": "range", "path": ["wallet", "entries"],
                 "fold": {"amount": "amount"}, "min": 0, "policy": "compensate"}]}"#,
        )
        .expect("schema");
        let spec = &schema.invariants[0];
        let document = DocumentId::from_bytes([4; 16]);
        let mut doc = Document::new(DocKind::Yrs, ReplicaId::from_bytes([1; 16]), document);
        doc.apply_ops(&[Op::Put {
            path: Path::keys(["wallet"]),
            value: json!({"entries": {"a": {"amount": 0.1}, "b": {"amount": 0.3}, "c": {"amount": -0.4}}}),
        }])
        .expect("edit");
        let seq = |key: &str| EntryMeta {
            seq: match key {
                "a" => 1,
                "c" => 2,
                _ => 3,
            },
            change: None,
        };
        let view = |order: [&str; 3]| {
            let mut collection = Collection::new(spec.rule.path().clone());
            collection.watch(0, &spec.rule);
            for key in order {
                collection.refresh(&doc, key, None, None, seq(key));
            }
            collection
        };
        let (in_commit_order, by_key) = (view(["a", "c", "b"]), view(["a", "b", "c"]));
        assert!(in_commit_order.total(0) < 0.0 && by_key.total(0) == 0.0);
        let ids = |collection: &Collection| {
            check_collection(&doc, document, 0, spec, collection)
                .into_iter()
                .map(|v| v.id)
                .collect::<Vec<_>>()
        };
        let found = ids(&in_commit_order);
        assert_eq!(found.len(), 1, "the exact sum is below zero");
        assert_eq!(found, ids(&by_key));
    }
}
