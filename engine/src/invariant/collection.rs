//! The reconciler's cached view of one guarded collection: its entries, the rank of each (the
//! commit it first appeared in), which are voided, and running aggregates per rule, so a check
//! costs what the change touched, not what the collection holds.
//!
//! An entry is kept as what it means to the rules ([`Fact`]s: its amount in a fold, the value it
//! claims), not as its JSON: a copy of every entry's JSON cost about a kilobyte an entry, and
//! the memory and allocator traffic of that copy was most of the layer's cost per commit on large
//! documents. A violation, which needs the entries' values for its options, reads them from the
//! document.

use std::collections::{BTreeSet, HashMap, HashSet};

/// The maps keyed by entry keys and claimed values, which are touched after every commit: hashed
/// with foldhash (randomly seeded per process, so keys chosen by clients cannot be aimed at
/// collisions) rather than SipHash, which showed up in profiles of the commit path.
type FastMap<K, V> = HashMap<K, V, foldhash::quality::RandomState>;

use serde_json::Value;

use super::spec::{Fold, Rule};
use crate::doc::{ChangeId, Document, Path};

/// Where an entry came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EntryMeta {
    /// The commit (or local observation) it first appeared in.
    pub seq: u64,
    /// The change that brought it, when known.
    pub change: Option<ChangeId>,
}

/// One entry as last read: where it came from and what it means to each aggregate.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub meta: EntryMeta,
    /// One fact per aggregate of the collection, in the same order.
    facts: Box<[Fact]>,
}

/// The entries that claim one value: almost always one, kept without a set for it (a set per
/// claimed value was a few hundred bytes per entry).
#[derive(Clone, Debug)]
enum Claimants {
    One(String),
    Many(BTreeSet<String>),
}

impl Claimants {
    fn insert(&mut self, key: &str) {
        match self {
            Claimants::One(one) if one == key => {}
            Claimants::One(one) => {
                let first = std::mem::take(one);
                *self = Claimants::Many(BTreeSet::from([first, key.to_owned()]));
            }
            Claimants::Many(keys) => {
                keys.insert(key.to_owned());
            }
        }
    }

    /// Removes `key`; an emptied `One` holds an empty key and has length 0.
    fn remove(&mut self, key: &str) {
        match self {
            Claimants::One(one) if one == key => one.clear(),
            Claimants::One(_) => {}
            Claimants::Many(keys) => {
                keys.remove(key);
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Claimants::One(one) => usize::from(!one.is_empty()),
            Claimants::Many(keys) => keys.len(),
        }
    }

    /// The claimants in key order.
    fn keys(&self) -> Vec<String> {
        match self {
            Claimants::One(one) if one.is_empty() => Vec::new(),
            Claimants::One(one) => vec![one.clone()],
            Claimants::Many(keys) => keys.iter().cloned().collect(),
        }
    }
}

/// What one entry adds to one aggregate, so it can be taken out again when the entry changes.
#[derive(Clone, Debug, PartialEq)]
enum Fact {
    /// Its contribution to a fold.
    Amount(f64),
    /// The value it claims (as JSON text), if any.
    Claim(Option<String>),
    /// Nothing beyond being counted.
    Counted,
}

/// Running aggregate of one rule over the live (not voided) entries.
#[derive(Clone, Debug)]
enum Aggregate {
    /// A ledger's total.
    Fold { fold: Fold, total: f64 },
    /// Who claims each value of `field`, and which values more than one entry claims (kept as
    /// claims change, so finding them does not cost a scan of every value).
    Claims {
        field: String,
        by_value: FastMap<String, Claimants>,
        contested: BTreeSet<String>,
    },
    /// Only the live count matters.
    Count,
}

impl Aggregate {
    /// What `entry` adds to this aggregate.
    fn fact(&self, entry: &Value) -> Fact {
        match self {
            Aggregate::Fold { fold, .. } => Fact::Amount(contribution(fold, entry)),
            Aggregate::Claims { field, .. } => Fact::Claim(
                entry
                    .get(field.as_str())
                    .filter(|v| !v.is_null())
                    .map(Value::to_string),
            ),
            Aggregate::Count => Fact::Counted,
        }
    }

    /// Adds (`sign` 1) or takes out (`sign` -1) the entry `key` whose fact is `fact`.
    fn add(&mut self, key: &str, fact: &Fact, sign: f64) {
        match (self, fact) {
            (Aggregate::Fold { total, .. }, Fact::Amount(amount)) => *total += sign * amount,
            (
                Aggregate::Claims {
                    by_value,
                    contested,
                    ..
                },
                Fact::Claim(Some(value)),
            ) => {
                if sign > 0.0 {
                    match by_value.get_mut(value.as_str()) {
                        Some(claims) => {
                            claims.insert(key);
                            if claims.len() > 1 {
                                contested.insert(value.clone());
                            }
                        }
                        // The first claim (the common case): no one else, so not contested.
                        None => {
                            by_value.insert(value.clone(), Claimants::One(key.to_owned()));
                        }
                    }
                } else if let Some(claims) = by_value.get_mut(value.as_str()) {
                    claims.remove(key);
                    match claims.len() {
                        0 => {
                            by_value.remove(value.as_str());
                            contested.remove(value.as_str());
                        }
                        1 => {
                            contested.remove(value.as_str());
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
            Aggregate::Fold { total, .. } => *total = 0.0,
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
    pub path: Path,
    entries: FastMap<String, Entry>,
    voided: HashSet<String>,
    live: usize,
    /// (index of the rule in the schema, its aggregate)
    aggregates: Vec<(usize, Aggregate)>,
}

impl Collection {
    /// An empty view of the collection at `path`.
    pub fn new(path: Path) -> Self {
        Self {
            path,
            entries: FastMap::default(),
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
                fold: fold.clone(),
                total: 0.0,
            },
            Rule::Unique { field, .. }
            | Rule::Once {
                key_field: field, ..
            } => Aggregate::Claims {
                field: field.clone(),
                by_value: FastMap::default(),
                contested: BTreeSet::new(),
            },
            _ => Aggregate::Count,
        };
        self.aggregates.push((index, aggregate));
    }

    /// Reads the whole collection again (first observation, or an ancestor was replaced).
    /// Entries already known keep their rank; new ones get `meta`.
    pub fn load(&mut self, doc: &Document, meta: EntryMeta) {
        let fresh = match doc.get(&self.path) {
            Some(Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        let mut entries = FastMap::with_capacity_and_hasher(fresh.len(), Default::default());
        for (key, value) in fresh {
            let meta = self.entries.get(&key).map_or(meta, |e| e.meta);
            let facts = self.facts(&value);
            entries.insert(key, Entry { meta, facts });
        }
        self.entries = entries;
        self.rebuild();
    }

    /// Reads one entry again after a change touched it; `path` is the entry's (this
    /// collection's path and `key`).
    pub fn refresh(&mut self, doc: &Document, key: &str, path: &Path, meta: EntryMeta) {
        let fresh = doc.get(path).map(|value| self.facts(&value));
        let live = !self.voided.contains(key);
        if let Some(old) = self.entries.remove(key) {
            if live {
                self.live -= 1;
                for ((_, aggregate), fact) in self.aggregates.iter_mut().zip(old.facts.iter()) {
                    aggregate.add(key, fact, -1.0);
                }
            }
            if let Some(facts) = fresh {
                self.insert(key, facts, old.meta, live);
            }
        } else if let Some(facts) = fresh {
            self.insert(key, facts, meta, live);
        }
    }

    /// What `value` means to each aggregate, in order.
    fn facts(&self, value: &Value) -> Box<[Fact]> {
        self.aggregates.iter().map(|(_, a)| a.fact(value)).collect()
    }

    fn insert(&mut self, key: &str, facts: Box<[Fact]>, meta: EntryMeta, live: bool) {
        if live {
            self.live += 1;
            for ((_, aggregate), fact) in self.aggregates.iter_mut().zip(facts.iter()) {
                aggregate.add(key, fact, 1.0);
            }
        }
        self.entries.insert(key.to_owned(), Entry { meta, facts });
    }

    /// The contribution of `entry` to the fold of rule `index` (0 when the rule has none).
    pub fn amount(&self, entry: &Entry, index: usize) -> f64 {
        self.aggregates
            .iter()
            .position(|(i, a)| *i == index && matches!(a, Aggregate::Fold { .. }))
            .and_then(|at| match entry.facts.get(at) {
                Some(Fact::Amount(amount)) => Some(*amount),
                _ => None,
            })
            .unwrap_or(0.0)
    }

    /// The value of entry `key` as the document holds it now (`null` if it is gone): read only
    /// for a violation, which shows the entries' values in its options.
    pub fn value(&self, doc: &Document, key: &str) -> Value {
        doc.get(&self.path.clone().key(key)).unwrap_or(Value::Null)
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
        for (key, entry) in &self.entries {
            if self.voided.contains(key) {
                continue;
            }
            self.live += 1;
            for ((_, aggregate), fact) in self.aggregates.iter_mut().zip(entry.facts.iter()) {
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
        self.aggregates
            .iter()
            .find_map(|(i, a)| match a {
                Aggregate::Fold { total, .. } if *i == index => Some(*total),
                _ => None,
            })
            .unwrap_or(0.0)
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
                        Some((v.clone(), keys.keys()))
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
    pub fn ranked_live(&self) -> Vec<(&String, &Entry)> {
        let mut live: Vec<(&String, &Entry)> = self
            .entries
            .iter()
            .filter(|(k, _)| !self.voided.contains(k.as_str()))
            .collect();
        live.sort_by(|a, b| (a.1.meta.seq, a.0).cmp(&(b.1.meta.seq, b.0)));
        live
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claimants_grow_from_one_and_shrink_to_none() {
        let mut claims = Claimants::One("b".into());
        claims.insert("b");
        assert_eq!((claims.len(), claims.keys()), (1, vec!["b".to_string()]));
        claims.insert("a");
        assert_eq!(claims.keys(), vec!["a".to_string(), "b".to_string()]);
        claims.remove("b");
        claims.remove("a");
        assert_eq!((claims.len(), claims.keys()), (0, Vec::<String>::new()));
        let mut one = Claimants::One("a".into());
        one.remove("x");
        assert_eq!(one.len(), 1);
        one.remove("a");
        assert_eq!((one.len(), one.keys()), (0, Vec::<String>::new()));
    }

    #[test]
    fn claims_are_contested_while_two_entries_hold_a_value() {
        let mut aggregate = Aggregate::Claims {
            field: "seat".into(),
            by_value: FastMap::default(),
            contested: BTreeSet::new(),
        };
        let fact = aggregate.fact(&serde_json::json!({"seat": "12A"}));
        aggregate.add("x", &fact, 1.0);
        aggregate.add("y", &fact, 1.0);
        let contested = |a: &Aggregate| match a {
            Aggregate::Claims { contested, .. } => contested.len(),
            _ => 0,
        };
        assert_eq!(contested(&aggregate), 1);
        aggregate.add("x", &fact, -1.0);
        assert_eq!(contested(&aggregate), 0);
        aggregate.add("y", &fact, -1.0);
        assert!(matches!(&aggregate, Aggregate::Claims { by_value, .. } if by_value.is_empty()));
    }
}
