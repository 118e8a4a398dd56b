//! The cost of the invariant layer on commit throughput: one change (a new ledger entry and a
//! new booking) applied to documents holding 1,000, 10,000 and 100,000 entries, with and
//! without the reconciler observing after it. The per-change cost must not grow with the
//! document. Run: `cargo bench -p accord-engine --bench invariants`.

use accord_engine::invariant::{Reconciler, Schema};
use accord_engine::{DocKind, Document, DocumentId, Op, Path, ReplicaId};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use serde_json::json;

const SCHEMA: &str = r#"{
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

fn document(kind: DocKind, entries: usize) -> Document {
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

fn change(i: usize) -> Vec<Op> {
    // Spends and deposits alternate, so the wallet never runs dry however long the bench runs.
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

fn bench(c: &mut Criterion) {
    let schema = Schema::from_json(SCHEMA).expect("schema");
    for kind in [DocKind::Automerge, DocKind::Yrs] {
        let mut group = c.benchmark_group(format!("commit one change ({kind})"));
        group.sample_size(20);
        for entries in [1_000usize, 10_000, 100_000] {
            let mut plain = document(kind, entries);
            let mut i = 0;
            group.bench_with_input(
                BenchmarkId::new("without invariants", entries),
                &entries,
                |b, _| {
                    b.iter(|| {
                        i += 1;
                        plain.apply_ops(&change(i)).expect("change")
                    })
                },
            );
            let mut checked = document(kind, entries);
            let mut reconciler = Reconciler::new(
                &schema,
                DocumentId::from_bytes([1; 16]),
                kind,
                "server",
                true,
            );
            assert!(reconciler.observe(&mut checked, Some(1), &[]).is_empty());
            let mut seq = 1;
            group.bench_with_input(
                BenchmarkId::new("with all five invariants", entries),
                &entries,
                |b, _| {
                    b.iter(|| {
                        seq += 1;
                        let applied = checked.apply_ops(&change(seq as usize)).expect("change");
                        // As the server does: the change just committed is named.
                        let ids: Vec<_> = applied.iter().map(|c| c.id).collect();
                        let violations = reconciler.observe(&mut checked, Some(seq), &ids);
                        assert!(violations.is_empty());
                        applied
                    })
                },
            );
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
