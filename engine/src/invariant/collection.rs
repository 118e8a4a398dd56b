//! The reconciler's cached view of one guarded collection: its entries, the rank of each (the
//! commit it first appeared in), which are voided, and running aggregates per rule, so a check
//! costs what the change touched, not what the collection holds.
//!
//! An entry is kept as what it means to the rules ([`Fact`]s: its amount in a fold, the value it
//! claims), not as its JSON: a copy of every entry's JSON cost about a kilobyte an entry, and
//! the memory and allocator traffic of that copy was most of the layer's cost per commit on large
//! documents. A violation, which needs the entries' values for its options, reads them from the
//! document.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use hashbrown::hash_table;

use super::claim::{Claim, FieldRef};
use super::table::KeyedTable;
use serde_json::Value;

use super::spec::{Fold, Rule};
use crate::doc::{ChangeId, Document, FieldValue, Path};

/// Where an entry came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EntryMeta {
    /// The commit (or local observation) it first appeared in.
    pub seq: u64,
    /// The change that brought it, when known.
    pub change: Option<ChangeId>,
}

/// An entry key or a claimed value's JSON text: shared (one allocation) between the entries
/// map, the claims index and the facts that name it, and taken as is from a Yrs change's key.
pub(crate) type Key = Arc<str>;

/// One entry as last read: where it came from and what it means to each aggregate.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub meta: EntryMeta,
    /// One fact per aggregate of the collection, in the same order.
    facts: Facts,
}

/// An entry's facts: one in place (a collection is usually watched by one rule with an
/// aggregate, and this saves an allocation per entry), or several.
#[derive(Clone, Debug)]
enum Facts {
    One(Fact),
    Many(Box<[Fact]>),
}

impl Facts {
    fn as_slice(&self) -> &[Fact] {
        match self {
            Facts::One(fact) => std::slice::from_ref(fact),
            Facts::Many(facts) => facts,
        }
    }
}

/// The entries that claim one value: almost always one, kept without a set for it (a set per
/// claimed value was a few hundred bytes per entry).
#[derive(Clone, Debug)]
enum Claimants {
    None,
    One(Key),
    Many(BTreeSet<Key>),
}

impl Claimants {
    fn insert(&mut self, key: &Key) {
        match self {
            Claimants::None => *self = Claimants::One(key.clone()),
            Claimants::One(one) if one == key => {}
            Claimants::One(one) => {
                let first = one.clone();
                *self = Claimants::Many(BTreeSet::from([first, key.clone()]));
            }
            Claimants::Many(keys) => {
                keys.insert(key.clone());
            }
        }
    }

    fn remove(&mut self, key: &str) {
        match self {
            Claimants::One(one) if &**one == key => *self = Claimants::None,
            Claimants::None | Claimants::One(_) => {}
            Claimants::Many(keys) => {
                keys.remove(key);
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Claimants::None => 0,
            Claimants::One(_) => 1,
            Claimants::Many(keys) => keys.len(),
        }
    }

    /// The claimants in key order.
    fn keys(&self) -> Vec<String> {
        match self {
            Claimants::None => Vec::new(),
            Claimants::One(one) => vec![one.to_string()],
            Claimants::Many(keys) => keys.iter().map(|k| k.to_string()).collect(),
        }
    }
}

/// What one entry adds to one aggregate, so it can be taken out again when the entry changes.
#[derive(Clone, Debug, PartialEq)]
enum Fact {
    /// Its contribution to a fold.
    Amount(f64),
    /// The value it claims, if any.
    Claim(Option<Claim>),
    /// Nothing beyond being counted.
    Counted,
}

/// Running aggregate of one rule over the live (not voided) entries. Fields are named by their
/// index in the collection's [`Collection::fields`].
#[derive(Clone, Debug)]
enum Aggregate {
    /// A ledger's total: the sum of field `amount`, negated for entries whose field `sign` is
    /// one of `negative`.
    Fold {
        amount: usize,
        sign: Option<(usize, Vec<String>)>,
        total: f64,
        /// The sum of the amounts' magnitudes: bounds the rounding error of `total`, which
        /// depends on the order entries were added and taken out in.
        magnitude: f64,
    },
    /// Who claims each value of `field`, and which values more than one entry claims (kept as
    /// claims change, so finding them does not cost a scan of every value).
    Claims {
        field: usize,
        by_value: KeyedTable<Claim, Claimants>,
        contested: BTreeSet<Claim>,
    },
    /// Only the live count matters.
    Count,
}

impl Aggregate {
    /// What an entry adds to this aggregate, given the entry's fields by index (the same as
    /// [`contribution`] and a claim read from the entry's JSON).
    fn fact<'v>(&self, field: &impl Fn(usize) -> Option<FieldRef<'v>>) -> Fact {
        match self {
            Aggregate::Fold { amount, sign, .. } => {
                let amount = field(*amount).and_then(FieldRef::as_f64).unwrap_or(0.0);
                let negative = sign.as_ref().is_some_and(|(at, negative)| {
                    field(*at)
                        .and_then(FieldRef::as_str)
                        .is_some_and(|v| negative.iter().any(|n| n == v))
                });
                Fact::Amount(if negative { -amount } else { amount })
            }
            Aggregate::Claims { field: at, .. } => {
                Fact::Claim(field(*at).filter(|v| !v.is_null()).map(FieldRef::claim))
            }
            Aggregate::Count => Fact::Counted,
        }
    }

    /// Adds (`sign` 1) or takes out (`sign` -1) the entry `key` whose fact is `fact`.
    fn add(&mut self, key: &Key, fact: &Fact, sign: f64) {
        match (self, fact) {
            (
                Aggregate::Fold {
                    total, magnitude, ..
                },
                Fact::Amount(amount),
            ) => {
                *total += sign * amount;
                *magnitude += sign * amount.abs();
            }
            (
                Aggregate::Claims {
                    by_value,
                    contested,
                    ..
                },
                Fact::Claim(Some(value)),
            ) => {
                if sign > 0.0 {
                    match by_value.entry(value) {
                        (_, hash_table::Entry::Occupied(mut slot)) => {
                            let claims = &mut slot.get_mut().2;
                            claims.insert(key);
                            if claims.len() > 1 {
                                contested.insert(value.clone());
                            }
                        }
                        // The first claim (the common case): no one else, so not contested.
                        (hash, hash_table::Entry::Vacant(slot)) => {
                            slot.insert((hash, value.clone(), Claimants::One(key.clone())));
                        }
                    }
                } else if let Some(mut slot) = by_value.find_entry(value) {
                    let claims = &mut slot.get_mut().2;
                    claims.remove(key);
                    match claims.len() {
                        0 => {
                            slot.remove();
                            contested.remove(value);
                        }
                        1 => {
                            contested.remove(value);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }

    fn reset(&mut self) {
        match self {
            Aggregate::Fold {
                total, magnitude, ..
            } => {
                *total = 0.0;
                *magnitude = 0.0;
            }
            Aggregate::Claims {
                by_value,
                contested,
                ..
            } => {
                by_value.clear();
                contested.clear();
            }
            Aggregate::Count => {}
        }
    }
}

/// What one ledger entry adds to a fold.
pub(crate) fn contribution(fold: &Fold, entry: &Value) -> f64 {
    let amount = entry
        .get(&fold.amount)
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    let negative = fold.sign.as_ref().is_some_and(|s| {
        entry
            .get(&s.field)
            .and_then(Value::as_str)
            .is_some_and(|v| s.negative.iter().any(|n| n == v))
    });
    if negative {
        -amount
    } else {
        amount
    }
}

/// A guarded collection and the aggregates of the rules that watch it.
pub(crate) struct Collection {
    /// Where it is: the very `Arc` the document is asked to track (see [`super::relate`]).
    pub path: Arc<Path>,
    /// The entry fields the aggregates read (each once).
    fields: Vec<String>,
    entries: KeyedTable<Key, Entry>,
    voided: HashSet<String>,
    live: usize,
    /// (index of the rule in the schema, its aggregate)
    aggregates: Vec<(usize, Aggregate)>,
}

impl Collection {
    /// An empty view of the collection at `path`.
    pub fn new(path: Path) -> Self {
        Self {
            path: Arc::new(path),
            fields: Vec::new(),
            entries: KeyedTable::default(),
            voided: HashSet::new(),
            live: 0,
            aggregates: Vec::new(),
        }
    }

    /// Adds the aggregate a rule needs.
    pub fn watch(&mut self, index: usize, rule: &Rule) {
        let aggregate = match rule {
            Rule::Range {
                fold: Some(fold), ..
            } => Aggregate::Fold {
                amount: self.field(&fold.amount),
                sign: fold
                    .sign
                    .as_ref()
                    .map(|sign| (self.field(&sign.field), sign.negative.clone())),
                total: 0.0,
                magnitude: 0.0,
            },
            Rule::Unique { field, .. }
            | Rule::Once {
                key_field: field, ..
            } => Aggregate::Claims {
                field: self.field(field),
                by_value: KeyedTable::default(),
                contested: BTreeSet::new(),
            },
            _ => Aggregate::Count,
        };
        self.aggregates.push((index, aggregate));
    }

    /// The index of entry field `name` in [`Collection::fields`], added if new.
    fn field(&mut self, name: &str) -> usize {
        match self.fields.iter().position(|f| f == name) {
            Some(at) => at,
            None => {
                self.fields.push(name.to_owned());
                self.fields.len() - 1
            }
        }
    }

    /// The entry fields the rules read, in the order [`Collection::refresh`] takes them.
    pub fn fields(&self) -> &[String] {
        &self.fields
    }

    /// Reads the whole collection again (first observation, or an ancestor was replaced).
    /// Entries already known keep their rank; new ones get `meta`.
    pub fn load(&mut self, doc: &Document, meta: EntryMeta) {
        let fresh = match doc.get(&self.path) {
            Some(Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        let mut entries = KeyedTable::with_capacity(fresh.len());
        for (key, value) in fresh {
            let meta = self.entries.get(key.as_str()).map_or(meta, |e| e.meta);
            let facts = self.facts_of(&value);
            entries.insert(Key::from(key), Entry { meta, facts });
        }
        self.entries = entries;
        self.rebuild();
    }

    /// Reads one entry again after a change touched it. `fields` are the entry's
    /// [`Collection::fields`] when the document reported them with the change (then the entry
    /// is not read back); otherwise it is read at the collection's path and `key`. `shared` is
    /// `key` as a shared key when the caller has one (kept for a new entry instead of a copy).
    pub fn refresh(
        &mut self,
        doc: &Document,
        key: &str,
        shared: Option<&Key>,
        fields: Option<&[Option<FieldValue>]>,
        meta: EntryMeta,
    ) {
        let fresh = match fields {
            Some(fields) => {
                Some(self.facts(|at| fields.get(at).and_then(Option::as_ref).map(FieldRef::of)))
            }
            None => doc
                .get(&Path::clone(&self.path).key(key))
                .map(|value| self.facts_of(&value)),
        };
        // Nothing voided is the common case: no hashing of the key then.
        let live = self.voided.is_empty() || !self.voided.contains(key);
        let aggregates = &mut self.aggregates;
        // Adds (`sign` 1) or takes out (-1) one entry's facts from the aggregates.
        let count = |aggregates: &mut Vec<(usize, Aggregate)>, key: &Key, facts: &Facts, sign| {
            for ((_, aggregate), fact) in aggregates.iter_mut().zip(facts.as_slice()) {
                aggregate.add(key, fact, sign);
            }
        };
        match self.entries.entry(key) {
            (_, hash_table::Entry::Occupied(mut slot)) => {
                let (_, old_key, old) = slot.get_mut();
                if live {
                    self.live -= 1;
                    count(aggregates, old_key, &old.facts, -1.0);
                }
                match fresh {
                    // The entry keeps its rank (the commit it first appeared in).
                    Some(facts) => {
                        old.facts = facts;
                        if live {
                            self.live += 1;
                            count(aggregates, old_key, &old.facts, 1.0);
                        }
                    }
                    None => {
                        slot.remove();
                    }
                }
            }
            (hash, hash_table::Entry::Vacant(slot)) => {
                if let Some(facts) = fresh {
                    let key = shared.cloned().unwrap_or_else(|| Key::from(key));
                    if live {
                        self.live += 1;
                        count(aggregates, &key, &facts, 1.0);
                    }
                    slot.insert((hash, key, Entry { meta, facts }));
                }
            }
        }
    }

    /// What an entry means to each aggregate, in order, given its fields by index.
    fn facts<'v>(&self, field: impl Fn(usize) -> Option<FieldRef<'v>>) -> Facts {
        match self.aggregates.as_slice() {
            [(_, aggregate)] => Facts::One(aggregate.fact(&field)),
            aggregates => Facts::Many(aggregates.iter().map(|(_, a)| a.fact(&field)).collect()),
        }
    }

    /// What the entry `value` means to each aggregate, in order.
    fn facts_of(&self, value: &Value) -> Facts {
        self.facts(|at| {
            self.fields
                .get(at)
                .and_then(|f| value.get(f.as_str()))
                .map(FieldRef::Json)
        })
    }

    /// The contribution of `entry` to the fold of rule `index` (0 when the rule has none).
    pub fn amount(&self, entry: &Entry, index: usize) -> f64 {
        self.aggregates
            .iter()
            .position(|(i, a)| *i == index && matches!(a, Aggregate::Fold { .. }))
            .and_then(|at| match entry.facts.as_slice().get(at) {
                Some(Fact::Amount(amount)) => Some(*amount),
                _ => None,
            })
            .unwrap_or(0.0)
    }

    /// The value of entry `key` as the document holds it now (`null` if it is gone): read only
    /// for a violation, which shows the entries' values in its options.
    pub fn value(&self, doc: &Document, key: &str) -> Value {
        doc.get(&Path::clone(&self.path).key(key))
            .unwrap_or(Value::Null)
    }

    /// Sets which entries resolutions voided; aggregates are rebuilt only when that changed.
    pub fn set_voided(&mut self, voided: HashSet<String>) {
        if voided != self.voided {
            self.voided = voided;
            self.rebuild();
        }
    }

    fn rebuild(&mut self) {
        self.live = 0;
        for (_, aggregate) in &mut self.aggregates {
            aggregate.reset();
        }
        for (key, entry) in self.entries.iter() {
            if self.voided.contains(&**key) {
                continue;
            }
            self.live += 1;
            for ((_, aggregate), fact) in self
                .aggregates
                .iter_mut()
                .zip(entry.facts.as_slice().iter())
            {
                aggregate.add(key, fact, 1.0);
            }
        }
    }

    /// Live entries.
    pub fn live_count(&self) -> usize {
        self.live
    }

    /// The running total of rule `index` (a fold).
    pub fn total(&self, index: usize) -> f64 {
        self.fold_sums(index).0
    }

    /// How far the running total of rule `index` may be from the exact sum: it is kept by
    /// adding and taking out amounts in the order they came (and rebuilt in table order), so
    /// its last bits differ between replicas that hold the same entries.
    pub fn total_slack(&self, index: usize) -> f64 {
        // n·ε·Σ|x| bounds the error of n additions; 1e-9 covers millions of entries.
        self.fold_sums(index).1 * 1e-9
    }

    fn fold_sums(&self, index: usize) -> (f64, f64) {
        self.aggregates
            .iter()
            .find_map(|(i, a)| match a {
                Aggregate::Fold {
                    total, magnitude, ..
                } if *i == index => Some((*total, magnitude.max(0.0))),
                _ => None,
            })
            .unwrap_or((0.0, 0.0))
    }

    /// Whether rule `index` (unique, once) has a value claimed by more than one live entry: the
    /// check after every commit, before [`Collection::contested`] lists them.
    pub fn is_contested(&self, index: usize) -> bool {
        self.aggregates.iter().any(|(i, a)| {
            *i == index && matches!(a, Aggregate::Claims { contested, .. } if !contested.is_empty())
        })
    }

    /// The values of rule `index` (unique, once) claimed by more than one live entry, with the
    /// claimants.
    pub fn contested(&self, index: usize) -> Vec<(String, Vec<String>)> {
        self.aggregates
            .iter()
            .filter(|(i, _)| *i == index)
            .flat_map(|(_, a)| match a {
                Aggregate::Claims {
                    by_value,
                    contested,
                    ..
                } => contested
                    .iter()
                    .filter_map(|v| {
                        let keys = by_value.get(v).filter(|keys| keys.len() > 1)?;
                        Some((v.json_text(), keys.keys()))
                    })
                    .collect::<Vec<_>>(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// One entry.
    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// The live entries in rank order (commit order, then key). Costs a sort: call it only
    /// when a rule is broken.
    pub fn ranked_live(&self) -> Vec<(&Key, &Entry)> {
        let mut live: Vec<(&Key, &Entry)> = self
            .entries
            .iter()
            .filter(|(k, _)| !self.voided.contains(&***k))
            .collect();
        live.sort_by(|a, b| (a.1.meta.seq, a.0).cmp(&(b.1.meta.seq, b.0)));
        live
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn claimants_grow_from_one_and_shrink_to_none() {
        let (a, b): (Key, Key) = ("a".into(), "b".into());
        let mut claims = Claimants::One(b.clone());
        claims.insert(&b);
        assert_eq!((claims.len(), claims.keys()), (1, vec!["b".to_string()]));
        claims.insert(&a);
        assert_eq!(claims.keys(), vec!["a".to_string(), "b".to_string()]);
        claims.remove("b");
        claims.remove("a");
        assert_eq!((claims.len(), claims.keys()), (0, Vec::<String>::new()));
        let mut one = Claimants::One(a.clone());
        one.remove("x");
        assert_eq!(one.len(), 1);
        one.remove("a");
        assert_eq!((one.len(), one.keys()), (0, Vec::<String>::new()));
        one.insert(&b);
        assert_eq!(one.keys(), vec!["b".to_string()]);
    }

    #[test]
    fn facts_from_fields_match_facts_from_the_entry() {
        let mut collection = Collection::new(Path::keys(["wallet", "entries"]));
        let fold: Rule = serde_json::from_value(json!({
            "kind": "range", "path": ["wallet", "entries"], "min": 0,
            "fold": {"amount": "amount", "sign": {"field": "kind", "negative": ["spend"]}}
        }))
        .expect("rule");
        let unique: Rule = serde_json::from_value(json!({
            "kind": "unique", "path": ["wallet", "entries"], "field": "ref"
        }))
        .expect("rule");
        collection.watch(0, &fold);
        collection.watch(1, &unique);
        assert_eq!(collection.fields(), ["amount", "kind", "ref"]);
        for entry in [
            json!({"amount": 2, "kind": "spend", "ref": "r1", "note": "x"}),
            json!({"amount": 2.5, "kind": "deposit"}),
            json!({"amount": "2", "ref": null}),
            json!({"ref": {"nested": true}}),
            json!("a scalar"),
            json!([1, 2]),
        ] {
            // As a change reports them: strings apart from other JSON.
            let fields: Vec<Option<FieldValue>> = collection
                .fields()
                .iter()
                .map(|f| entry.get(f.as_str()).cloned().map(FieldValue::from_json))
                .collect();
            let projected =
                collection.facts(|at| fields.get(at).and_then(Option::as_ref).map(FieldRef::of));
            let read = collection.facts_of(&entry);
            assert_eq!(projected.as_slice(), read.as_slice(), "{entry}");
        }
    }

    #[test]
    fn claims_are_contested_while_two_entries_hold_a_value() {
        let mut aggregate = Aggregate::Claims {
            field: 0,
            by_value: KeyedTable::default(),
            contested: BTreeSet::new(),
        };
        let seat = serde_json::json!("12A");
        let fact = aggregate.fact(&|_| Some(FieldRef::Json(&seat)));
        aggregate.add(&Key::from("x"), &fact, 1.0);
        aggregate.add(&Key::from("y"), &fact, 1.0);
        let contested = |a: &Aggregate| match a {
            Aggregate::Claims { contested, .. } => contested.len(),
            _ => 0,
        };
        assert_eq!(contested(&aggregate), 1);
        aggregate.add(&Key::from("x"), &fact, -1.0);
        assert_eq!(contested(&aggregate), 0);
        aggregate.add(&Key::from("y"), &fact, -1.0);
        assert!(
            matches!(&aggregate, Aggregate::Claims { by_value, .. } if by_value.iter().next().is_none())
        );
    }
}
