//! The server's commit path for one Yrs change, without sockets or SQLite, for instruction counts:
//! a remote update (a wallet entry, a booking and a payment, as `accord-loadgen commits
//! --trip-changes` sends) is applied with [`Document::apply_changes`], then, when checked, the
//! reconciler observes it under the demo trip schema. Deterministic, so it can be compared under
//! `valgrind --tool=callgrind` (which counts instructions, unaffected by the machine's load):
//!
//! ```text
//! cargo build --release -p accord-engine --example invariant_server_path
//! valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*invariant_server_path*measure*' \
//!     target/release/examples/invariant_server_path checked 10000 2000
//! ```
//!
//! Arguments: `bare`, `tracked` or `checked`, the entries per collection the document starts
//! with, and the changes measured. `tracked` is the document's share of `checked`: the changed
//! paths tracked as the reconciler asks (Yrs deep observers, the fields of new entries) and
//! taken after every change, but nothing checked. Without valgrind it prints the mean time per
//! change as well.

use std::time::Instant;

use accord_engine::invariant::{type_op, Reconciler, Schema};
use accord_engine::{DocKind, Document, DocumentId, Op, Path, ReplicaId};
use serde_json::json;

const SCHEMA: &str = include_str!("../../sync-server/examples/trip.schema.json");

fn ops(tag: &str, i: usize) -> Vec<Op> {
    let key = |root: &str, collection: &str, entry: String| {
        Path::keys([root.to_string(), collection.to_string(), entry])
    };
    let (amount, kind) = if i % 2 == 1 {
        (2, "deposit")
    } else {
        (1, "spend")
    };
    vec![
        Op::Put {
            path: key("wallet", "entries", format!("e{tag}-{i}")),
            value: json!({"amount": amount, "kind": kind}),
        },
        Op::Put {
            path: key("trip", "bookings", format!("b{tag}-{i}")),
            value: json!({"seat": format!("s{tag}-{i}")}),
        },
        Op::Put {
            path: key("trip", "payments", format!("p{tag}-{i}")),
            value: json!({"ref": format!("r{tag}-{i}"), "amount": 1}),
        },
    ]
}

/// The server's document with `entries` entries per collection, and `count` updates a client
/// made on top of it.
fn setup(entries: usize, count: usize) -> (Document, Vec<Vec<u8>>) {
    let document = DocumentId::from_bytes([1; 16]);
    let mut server = Document::new(DocKind::Yrs, ReplicaId::from_bytes([0; 16]), document);
    let mut client = Document::new(DocKind::Yrs, ReplicaId::from_bytes([2; 16]), document);
    let first = client
        .apply_ops(&[
            type_op(DocKind::Yrs, "trip"),
            Op::Put {
                path: Path::keys(["wallet"]),
                value: json!({"entries": {}}),
            },
            Op::Put {
                path: Path::keys(["trip"]),
                value: json!({"status": "planning", "bookings": {}, "payments": {}}),
            },
        ])
        .expect("setup")
        .expect("a change");
    server.apply_changes(&first.bytes).expect("setup");
    for i in 0..entries {
        let change = client
            .apply_ops(&ops("old", i))
            .expect("setup")
            .expect("a change");
        server.apply_changes(&change.bytes).expect("setup");
    }
    let updates = (0..count)
        .map(|i| {
            client
                .apply_ops(&ops("new", i))
                .expect("change")
                .expect("a change")
                .bytes
        })
        .collect();
    (server, updates)
}

#[inline(never)]
fn measure(
    doc: &mut Document,
    reconciler: Option<&mut Reconciler>,
    updates: &[Vec<u8>],
    take: bool,
) {
    let mut reconciler = reconciler;
    let mut touched = Vec::new();
    for (i, update) in updates.iter().enumerate() {
        let changes = doc.apply_changes(update).expect("apply");
        if let Some(reconciler) = reconciler.as_deref_mut() {
            let ids: Vec<_> = changes.iter().map(|c| c.id).collect();
            let violations = reconciler.observe(doc, Some(i as u64 + 10), &ids);
            assert!(violations.is_empty(), "{violations:?}");
        } else if take {
            assert!(doc.take_touched_into(&mut touched));
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map_or("bare", String::as_str);
    let checked = mode == "checked";
    let entries: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let count: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(2_000);
    let schema = Schema::from_json(SCHEMA).expect("schema");
    let (mut doc, updates) = setup(entries, count);
    let mut reconciler = checked.then(|| {
        let mut r = Reconciler::new(
            &schema,
            DocumentId::from_bytes([1; 16]),
            DocKind::Yrs,
            "server",
            true,
        );
        assert!(r.observe(&mut doc, Some(1), &[]).is_empty());
        r
    });
    let tracked = mode == "tracked";
    if tracked {
        // What the reconciler asks of the document (see `Reconciler::observe`).
        let roots = ["_accord", "trip", "wallet"].map(String::from);
        doc.track_changes(&roots);
        let collection = |root: &str, key: &str| std::sync::Arc::new(Path::keys([root, key]));
        doc.track_entries(
            &collection("wallet", "entries"),
            &["amount", "kind"].map(String::from),
        );
        doc.track_entries(&collection("trip", "bookings"), &["seat".to_string()]);
        doc.track_entries(&collection("trip", "payments"), &["ref".to_string()]);
        doc.track_entries(&collection("trip", "bus"), &[]);
        let _ = doc.take_touched();
    }
    let started = Instant::now();
    measure(&mut doc, reconciler.as_mut(), &updates, tracked);
    let micros = started.elapsed().as_secs_f64() * 1e6 / count as f64;
    println!("{mode} entries={entries} changes={count}: {micros:.2} us a change");
}
