//! The reconciler's cached view of one guarded collection: its entries, the rank of each (the
//! commit it first appeared in), which are voided, and running aggregates per rule, so a check
//! costs what the change touched, not what the collection holds.

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

/// One entry as last read.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub value: Value,
    pub meta: EntryMeta,
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
        by_value: FastMap<String, BTreeSet<String>>,
        contested: BTreeSet<String>,
    },
    /// Only the live count matters.
    Count,
}

impl Aggregate {
    fn add(&mut self, key: &str, entry: &Value, sign: f64) {
        match self {
            Aggregate::Fold { fold, total } => *total += sign * contribution(fold, entry),
            Aggregate::Claims {
                field,
                by_value,
                contested,
            } => {
                let Some(value) = entry.get(field.as_str()).filter(|v| !v.is_null()) else {
                    return;
                };
                let value = value.to_string();
                if sign > 0.0 {
                    match by_value.get_mut(&value) {
                        Some(claims) => {
                            claims.insert(key.to_owned());
                            if claims.len() > 1 {
                                contested.insert(value);
                            }
                        }
                        // The first claim (the common case): no one else, so not contested.
                        None => {
                            by_value.insert(value, BTreeSet::from([key.to_owned()]));
                        }
                    }
                } else if let Some(claims) = by_value.get_mut(&value) {
                    claims.remove(key);
                    match claims.len() {
                        0 => {
                            by_value.remove(&value);
                            contested.remove(&value);
                        }
                        1 => {
                            contested.remove(&value);
                        }
                        _ => {}
                    }
                }
            }
            Aggregate::Count => {}
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
            entries.insert(key, Entry { value, meta });
        }
        self.entries = entries;
        self.rebuild();
    }

    /// Reads one entry again after a change touched it; `path` is the entry's (this
    /// collection's path and `key`).
    pub fn refresh(&mut self, doc: &Document, key: &str, path: &Path, meta: EntryMeta) {
        let fresh = doc.get(path);
        let live = !self.voided.contains(key);
        if let Some(old) = self.entries.remove(key) {
            if live {
                self.live -= 1;
                for (_, aggregate) in &mut self.aggregates {
                    aggregate.add(key, &old.value, -1.0);
                }
            }
            if let Some(value) = fresh {
                self.insert(key, value, old.meta, live);
            }
        } else if let Some(value) = fresh {
            self.insert(key, value, meta, live);
        }
    }

    fn insert(&mut self, key: &str, value: Value, meta: EntryMeta, live: bool) {
        if live {
            self.live += 1;
            for (_, aggregate) in &mut self.aggregates {
                aggregate.add(key, &value, 1.0);
            }
        }
        self.entries.insert(key.to_owned(), Entry { value, meta });
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
            for (_, aggregate) in &mut self.aggregates {
                aggregate.add(key, &entry.value, 1.0);
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
                        Some((v.clone(), keys.iter().cloned().collect()))
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
