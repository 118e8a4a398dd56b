//! The trip document and change that the invariant-cost bench (`benches/invariants.rs`) and
//! example (`examples/invariant_cost.rs`) both measure: a ledger and a booking collection of
//! `entries` entries each, checked by all five built-in kinds.

use accord_engine::{DocKind, Document, DocumentId, Op, Path, ReplicaId};
use serde_json::json;

/// The five invariants checked on every commit.
pub const SCHEMA: &str = r#"{
  "document_type": "trip",
  "invariants": [
    {"id": "wallet", "kind": "range", "path": ["wallet", "entries"],
     "fold": {"amount": "amount", "sign": {"field": "kind", "negative": ["spend"]}}, "min": 0, "policy": "compensate"},
    {"id": "seat", "kind": "unique", "path": ["trip", "bookings"], "field": "seat", "policy": "ask"},
    {"id": "status", "kind": "transitions", "path": ["trip", "status"],
     "allowed": {"planning": ["booked"]}, "order": ["planning", "booked"], "policy": "reject"},
    {"id": "payment", "kind": "once", "path": ["trip", "payments"], "key_field": "ref", "policy": "auto"},
    {"id": "bus", "kind": "capacity", "path": ["trip", "bookings"], "max": 10000000, "policy": "reject"}
  ]
}"#;

/// A trip document with `entries` ledger entries and `entries` bookings.
pub fn document(kind: DocKind, entries: usize) -> Document {
    let mut doc = Document::new(
        kind,
        ReplicaId::from_bytes([1; 16]),
        DocumentId::from_bytes([1; 16]),
    );
    let wallet: serde_json::Map<String, serde_json::Value> = (0..entries)
        .map(|i| (format!("e{i}"), json!({"amount": 10, "kind": "deposit"})))
        .collect();
    let bookings: serde_json::Map<String, serde_json::Value> = (0..entries)
        .map(|i| (format!("b{i}"), json!({"seat": format!("s{i}")})))
        .collect();
    doc.apply_ops(&[
        Op::Put {
            path: Path::keys(["wallet"]),
            value: json!({"entries": wallet}),
        },
        Op::Put {
            path: Path::keys(["trip"]),
            value: json!({"status": "planning", "bookings": bookings, "payments": {}}),
        },
    ])
    .expect("setup");
    doc
}

/// Change `i`: a new ledger entry (spends and deposits alternate, so the wallet never runs dry)
/// and a new booking.
pub fn change(i: usize) -> Vec<Op> {
    let kind = if i.is_multiple_of(2) {
        "spend"
    } else {
        "deposit"
    };
    vec![
        Op::Put {
            path: Path::keys(["wallet".to_string(), "entries".to_string(), format!("n{i}")]),
            value: json!({"amount": 1, "kind": kind}),
        },
        Op::Put {
            path: Path::keys(["trip".to_string(), "bookings".to_string(), format!("n{i}")]),
            value: json!({"seat": format!("n{i}")}),
        },
    ]
}
