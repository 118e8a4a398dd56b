//! Invariants as data: what a document type declares, loadable from JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::doc::Path;

/// The invariants of one document type, as an app declares them (a JSON file the server loads at
/// start and clients can fetch).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schema {
    /// The document type these rules are for (e.g. "trip").
    pub document_type: String,
    /// The rules.
    pub invariants: Vec<InvariantSpec>,
}

/// One declared rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InvariantSpec {
    /// A name unique within the schema; part of every violation id.
    pub id: String,
    /// What must hold.
    #[serde(flatten)]
    pub rule: Rule,
    /// What to do when it does not.
    pub policy: Policy,
    /// Repair attempts before a violation escalates to the user (`ask`).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
}

fn default_attempts() -> u32 {
    3
}

/// What must hold. Collections are maps of entries keyed by entry id; entries voided by a
/// resolution do not count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Rule {
    /// A number stays within bounds: the number at `path`, or (with `fold`) the sum folded over
    /// the entries of the collection at `path` (a ledger's balance).
    Range {
        /// The number, or the collection.
        path: Path,
        /// How entries add up, for a collection.
        #[serde(default)]
        fold: Option<Fold>,
        /// Lower bound, inclusive.
        #[serde(default)]
        min: Option<f64>,
        /// Upper bound, inclusive.
        #[serde(default)]
        max: Option<f64>,
    },
    /// A value is claimed at most once: no two entries of the collection at `path` hold the same
    /// `field` (a seat booked once, a username).
    Unique {
        /// The collection.
        path: Path,
        /// The claimed field of each entry.
        field: String,
    },
    /// The value at `path` only moves along `allowed` edges (a status never goes backwards).
    Transitions {
        /// The value.
        path: Path,
        /// From each value, the values it may move to.
        allowed: BTreeMap<String, Vec<String>>,
        /// The order used by `auto` to pick the furthest value; values not listed come first.
        #[serde(default)]
        order: Vec<String>,
    },
    /// An entry identified by `key_field` takes effect once (a payment applied once): later
    /// entries with the same key are duplicates.
    Once {
        /// The collection.
        path: Path,
        /// The identifying field of each entry (e.g. the bank's payment reference).
        key_field: String,
    },
    /// The collection at `path` holds at most `max` entries.
    Capacity {
        /// The collection.
        path: Path,
        /// The most entries it may hold.
        max: usize,
    },
}

impl Rule {
    /// The path the rule watches.
    pub fn path(&self) -> &Path {
        match self {
            Rule::Range { path, .. }
            | Rule::Unique { path, .. }
            | Rule::Transitions { path, .. }
            | Rule::Once { path, .. }
            | Rule::Capacity { path, .. } => path,
        }
    }

    /// The rule's kind, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Rule::Range { .. } => "range",
            Rule::Unique { .. } => "unique",
            Rule::Transitions { .. } => "transitions",
            Rule::Once { .. } => "once",
            Rule::Capacity { .. } => "capacity",
        }
    }

    /// Whether the path holds a collection of entries (rather than one value).
    pub fn is_collection(&self) -> bool {
        match self {
            Rule::Range { fold, .. } => fold.is_some(),
            Rule::Transitions { .. } => false,
            Rule::Unique { .. } | Rule::Once { .. } | Rule::Capacity { .. } => true,
        }
    }
}

/// How the entries of a ledger add up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fold {
    /// The numeric field of each entry.
    pub amount: String,
    /// Entries whose `field` is one of `negative` count negatively (spends), others positively.
    #[serde(default)]
    pub sign: Option<Sign>,
}

/// Which entries subtract.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sign {
    /// The field that says.
    pub field: String,
    /// The values that subtract.
    pub negative: Vec<String>,
}

/// What to do about a violation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// A deterministic merge rule: the furthest status in the order; the first committed wins.
    Auto,
    /// The change later in commit order is refused; its author is told why.
    Reject,
    /// A compensating fact keyed by the violation id voids the offending entries.
    Compensate,
    /// A conflict record with the options goes to the conflict inbox; a person chooses.
    Ask,
}

impl Policy {
    /// The policy's name, for metrics and records.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Auto => "auto",
            Policy::Reject => "reject",
            Policy::Compensate => "compensate",
            Policy::Ask => "ask",
        }
    }
}

/// Why a schema is refused.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The JSON does not describe a schema.
    #[error("invalid schema JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Two invariants share an id.
    #[error("duplicate invariant id {0}")]
    DuplicateId(String),
    /// A rule that cannot hold or cannot be checked.
    #[error("invariant {id}: {reason}")]
    Invalid {
        /// Which.
        id: String,
        /// Why.
        reason: String,
    },
}

impl Schema {
    /// Parses and validates a schema from JSON.
    pub fn from_json(json: &str) -> Result<Self, SchemaError> {
        let schema: Schema = serde_json::from_str(json)?;
        schema.validate()?;
        Ok(schema)
    }

    /// Checks ids are unique and every rule makes sense.
    pub fn validate(&self) -> Result<(), SchemaError> {
        let mut seen = std::collections::BTreeSet::new();
        for spec in &self.invariants {
            if !seen.insert(spec.id.as_str()) {
                return Err(SchemaError::DuplicateId(spec.id.clone()));
            }
            let invalid = |reason: &str| SchemaError::Invalid {
                id: spec.id.clone(),
                reason: reason.to_owned(),
            };
            if spec.rule.path().segments().is_empty() {
                return Err(invalid("the path is empty"));
            }
            match &spec.rule {
                Rule::Range { min, max, .. } => {
                    if min.is_none() && max.is_none() {
                        return Err(invalid("a range needs min or max"));
                    }
                    if let (Some(lo), Some(hi)) = (min, max) {
                        if lo > hi {
                            return Err(invalid("min is above max"));
                        }
                    }
                }
                Rule::Transitions { allowed, .. } if allowed.is_empty() => {
                    return Err(invalid("no transitions allowed"));
                }
                _ => {}
            }
        }
        Ok(())
    }
}
