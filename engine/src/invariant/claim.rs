//! How the reconciler reads an entry's fields ([`FieldRef`]) and keys the values entries claim
//! ([`Claim`]), without copying what a document already shares.

use std::cmp::Ordering;
use std::sync::Arc;

use serde_json::Value;

use crate::doc::FieldValue;

/// One field of an entry as the rules read it: a string a document reported with a change
/// (shared with the document, not copied), or a JSON value (read from the entry's JSON).
#[derive(Clone, Copy, Debug)]
pub(crate) enum FieldRef<'v> {
    Shared(&'v Arc<str>),
    Json(&'v Value),
}

impl<'v> FieldRef<'v> {
    /// The field as a reported change carries it.
    pub fn of(value: &'v FieldValue) -> Self {
        match value {
            FieldValue::Text(s) => FieldRef::Shared(s),
            FieldValue::Json(value) => FieldRef::Json(value),
        }
    }

    /// The number it holds (as `Value::as_f64`).
    pub fn as_f64(self) -> Option<f64> {
        match self {
            FieldRef::Shared(_) => None,
            FieldRef::Json(value) => value.as_f64(),
        }
    }

    /// The string it holds (as `Value::as_str`).
    pub fn as_str(self) -> Option<&'v str> {
        match self {
            FieldRef::Shared(s) => Some(s),
            FieldRef::Json(value) => value.as_str(),
        }
    }

    /// Whether it is JSON `null`.
    pub fn is_null(self) -> bool {
        matches!(self, FieldRef::Json(Value::Null))
    }

    /// The value it claims. A string reported with a change is kept as the document shares it
    /// (no allocation, no copy); this runs for every claim a change makes.
    pub fn claim(self) -> Claim {
        match self {
            FieldRef::Shared(s) => Claim::Text(s.clone()),
            FieldRef::Json(Value::String(s)) => Claim::Text(Arc::from(s.as_str())),
            FieldRef::Json(value) => Claim::Json(Arc::from(value.to_string())),
        }
    }
}

/// A value claimed by an entry (unique, once): a string as it is, or the JSON text of any other
/// value. Two claims are the same value exactly when their JSON texts are equal, and they are
/// ordered by their JSON texts (the order violations were reported in when claims were kept as
/// text).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Claim {
    /// A JSON string (never in [`Claim::Json`]).
    Text(Arc<str>),
    /// The JSON text of a value that is not a string.
    Json(Arc<str>),
}

impl Claim {
    /// The JSON text of the value (what `Value::to_string` gives).
    pub fn json_text(&self) -> String {
        match self {
            Claim::Text(s) => Value::from(&**s).to_string(),
            Claim::Json(text) => text.to_string(),
        }
    }
}

impl Ord for Claim {
    /// By JSON text. Only sets of contested values are ordered, so the texts are built here.
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Claim::Json(a), Claim::Json(b)) => a.cmp(b),
            _ => self.json_text().cmp(&other.json_text()),
        }
    }
}

impl PartialOrd for Claim {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn values() -> Vec<Value> {
        vec![
            json!("12A"),
            json!(""),
            json!("a\"b"),
            json!("back\\slash"),
            json!("tab\there"),
            json!("\u{1f}"),
            json!("\u{7f} del"),
            json!("é ü 日本 🎉"),
            json!("x".repeat(63)),
            json!("12"),
            json!(12),
            json!(1.5),
            json!(true),
            json!(null),
            json!({"b": 1, "a": [2, "x"]}),
        ]
    }

    #[test]
    fn a_claim_is_the_same_however_its_value_was_read() {
        for value in values() {
            let read = FieldRef::Json(&value).claim();
            let reported = FieldValue::from_json(value.clone());
            assert_eq!(FieldRef::of(&reported).claim(), read, "{value}");
            assert_eq!(read.json_text(), value.to_string(), "{value}");
        }
    }

    #[test]
    fn claims_are_equal_and_ordered_as_their_json_texts() {
        let values = values();
        for a in &values {
            for b in &values {
                let (ca, cb) = (FieldRef::Json(a).claim(), FieldRef::Json(b).claim());
                let (ta, tb) = (a.to_string(), b.to_string());
                assert_eq!(ca == cb, ta == tb, "{a} {b}");
                assert_eq!(ca.cmp(&cb), ta.cmp(&tb), "{a} {b}");
            }
        }
    }

    #[test]
    fn a_reported_string_is_shared_not_copied() {
        let shared: Arc<str> = Arc::from("seat 12A");
        let reported = FieldValue::Text(shared.clone());
        match FieldRef::of(&reported).claim() {
            Claim::Text(text) => assert!(Arc::ptr_eq(&text, &shared)),
            other => panic!("{other:?}"),
        }
    }
}
