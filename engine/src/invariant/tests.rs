//! Scenario tests of the seed's invariants on both CRDT kinds: replicas diverge offline, an
//! authority (standing in for the server) merges their changes in commit order and reconciles,
//! and every replica ends identical with the invariant holding and the resolution recorded.

use serde_json::json;

use super::*;
use crate::doc::{Change, DocKind, Document, Op, Path};
use crate::ids::{DocumentId, ReplicaId};

const SCHEMA: &str = r#"{
  "document_type": "trip",
  "invariants": [
    {"id": "wallet-non-negative", "kind": "range", "path": ["wallet", "entries"],
     "fold": {"amount": "amount", "sign": {"field": "kind", "negative": ["spend"]}},
     "min": 0, "policy": "compensate"},
    {"id": "seat-once", "kind": "unique", "path": ["trip", "bookings"], "field": "seat", "policy": "ask"},
    {"id": "status-forward", "kind": "transitions", "path": ["trip", "status"],
     "allowed": {"planning": ["booked", "cancelled"], "booked": ["travelling", "cancelled"], "travelling": ["done"]},
     "order": ["planning", "booked", "travelling", "done"], "policy": "reject"},
    {"id": "payment-once", "kind": "once", "path": ["trip", "payments"], "key_field": "ref", "policy": "auto"},
    {"id": "bus-capacity", "kind": "capacity", "path": ["trip", "bus"], "max": 2, "policy": "reject"}
  ]
}"#;

const KINDS: [DocKind; 2] = [DocKind::Automerge, DocKind::Yrs];

fn schema() -> Schema {
    Schema::from_json(SCHEMA).expect("schema")
}

fn doc_id() -> DocumentId {
    DocumentId::from_bytes([3; 16])
}

struct World {
    kind: DocKind,
    server: Document,
    reconciler: Reconciler,
    seq: u64,
    replicas: Vec<Document>,
}

impl World {
    fn new(kind: DocKind, clients: usize) -> Self {
        let mut server = Document::new(kind, ReplicaId::from_bytes([100; 16]), doc_id());
        let init = server
            .apply_ops(&[
                Op::Put {
                    path: Path::keys(["wallet"]),
                    value: json!({"entries": {"d1": {"amount": 100, "kind": "deposit", "by": "ana"}}}),
                },
                Op::Put {
                    path: Path::keys(["trip"]),
                    value: json!({"status": "planning", "bookings": {}, "payments": {}, "bus": {}}),
                },
            ])
            .expect("init")
            .expect("change");
        let mut reconciler = Reconciler::new(&schema(), doc_id(), kind, "server", true);
        assert!(reconciler
            .observe(&mut server, Some(1), &[init.id])
            .is_empty());
        let replicas = (0..clients)
            .map(|i| {
                Document::load(
                    kind,
                    ReplicaId::from_bytes([i as u8 + 1; 16]),
                    doc_id(),
                    None,
                    [init.bytes.as_slice()],
                )
                .expect("fork")
            })
            .collect();
        Self {
            kind,
            server,
            reconciler,
            seq: 1,
            replicas,
        }
    }

    fn edit(&mut self, replica: usize, ops: &[Op]) -> Change {
        self.replicas[replica]
            .apply_ops(ops)
            .expect("edit")
            .expect("change")
    }

    /// The server commits `change` (next seq) and runs the loop, as the server does after every
    /// commit; returns the repairs it wrote.
    fn commit(&mut self, change: &Change) -> Vec<Change> {
        self.server.apply_changes(&change.bytes).expect("commit");
        self.seq += 1;
        let outcome = self
            .reconciler
            .reconcile(&mut self.server, Some(self.seq), &[change.id])
            .expect("reconcile");
        self.seq += outcome.changes.len() as u64;
        outcome.changes
    }

    /// Every replica receives everything.
    fn sync_all(&mut self) {
        let everything = self.server.save();
        for r in &mut self.replicas {
            r.apply_changes(&everything).expect("sync");
        }
    }

    fn assert_identical(&self) {
        for r in &self.replicas {
            assert_eq!(r.to_json(), self.server.to_json(), "{}", self.kind);
        }
    }
}

fn spec(id: &str) -> InvariantSpec {
    schema()
        .invariants
        .into_iter()
        .find(|s| s.id == id)
        .expect("spec")
}

#[test]
fn a_balance_never_below_zero_is_compensated_once() {
    for kind in KINDS {
        let mut w = World::new(kind, 2);
        let ana = w.edit(
            0,
            &[Op::Put {
                path: Path::keys(["wallet", "entries", "s-ana"]),
                value: json!({"amount": 80, "kind": "spend", "by": "ana"}),
            }],
        );
        let ben = w.edit(
            1,
            &[Op::Put {
                path: Path::keys(["wallet", "entries", "s-ben"]),
                value: json!({"amount": 70, "kind": "spend", "by": "ben"}),
            }],
        );
        assert!(w.commit(&ana).is_empty(), "ana's spend fits");
        let repairs = w.commit(&ben);
        assert_eq!(repairs.len(), 1, "{kind}: one compensation");
        w.sync_all();
        w.assert_identical();
        for r in w.replicas.iter().chain([&w.server]) {
            assert_eq!(
                folded_total(r, &spec("wallet-non-negative")),
                Some(20.0),
                "{kind}"
            );
        }
        let records = read_records(&w.server);
        let ben_hex = ben.id.to_hex();
        let affecting: Vec<_> = records.affecting_change(&ben_hex).collect();
        assert_eq!(
            affecting.len(),
            1,
            "{kind}: ben can see what happened to his spend"
        );
        assert_eq!(affecting[0].1.victims, vec!["s-ben".to_string()]);
        assert!(
            affecting[0].1.reason.contains("-50"),
            "{}",
            affecting[0].1.reason
        );
        assert_eq!(records.affecting_change(&ana.id.to_hex()).count(), 0);
        // The entries themselves are untouched: a compensation is a fact, not a delta.
        assert!(w
            .server
            .get(&Path::keys(["wallet", "entries", "s-ben"]))
            .is_some());
        assert_eq!(
            w.reconciler.stats().resolved.get(&("range", "compensate")),
            Some(&1)
        );
    }
}

#[test]
fn double_repair_applies_the_compensation_once() {
    for kind in KINDS {
        let mut w = World::new(kind, 4);
        let ana = w.edit(
            0,
            &[Op::Put {
                path: Path::keys(["wallet", "entries", "s-ana"]),
                value: json!({"amount": 80, "kind": "spend", "by": "ana"}),
            }],
        );
        let ben = w.edit(
            1,
            &[Op::Put {
                path: Path::keys(["wallet", "entries", "s-ben"]),
                value: json!({"amount": 70, "kind": "spend", "by": "ben"}),
            }],
        );
        // Two clients (2 and 3) also reconcile: they received the commits in commit order, as
        // the server relays them, so they rank the entries as the server does.
        let mut repairs = Vec::new();
        for client in 2..4 {
            let mut reconciler =
                Reconciler::new(&schema(), doc_id(), kind, format!("client-{client}"), true);
            let doc = &mut w.replicas[client];
            reconciler.observe(doc, Some(1), &[]);
            doc.apply_changes(&ana.bytes).expect("ana");
            assert!(reconciler
                .reconcile(doc, Some(2), &[ana.id])
                .expect("loop")
                .changes
                .is_empty());
            doc.apply_changes(&ben.bytes).expect("ben");
            let outcome = reconciler.reconcile(doc, Some(3), &[ben.id]).expect("loop");
            assert_eq!(outcome.changes.len(), 1);
            repairs.extend(outcome.changes);
        }
        assert!(w.commit(&ana).is_empty());
        repairs.extend(w.commit(&ben));
        assert_eq!(repairs.len(), 3, "three replicas repaired concurrently");
        for repair in &repairs {
            w.server
                .apply_changes(&repair.bytes)
                .expect("merge repairs");
        }
        w.sync_all();
        w.assert_identical();
        let records = read_records(&w.server);
        assert_eq!(
            records.resolutions.len(),
            1,
            "{kind}: one resolution for one violation"
        );
        for r in w.replicas.iter().chain([&w.server]) {
            assert_eq!(
                folded_total(r, &spec("wallet-non-negative")),
                Some(20.0),
                "{kind}: refunded once"
            );
        }
        let mut again = Reconciler::new(&schema(), doc_id(), kind, "late", true);
        assert!(
            again
                .reconcile(&mut w.server, Some(99), &[])
                .expect("loop")
                .changes
                .is_empty(),
            "check before acting"
        );
    }
}

#[test]
fn a_seat_booked_twice_asks_and_a_choice_settles_it_everywhere() {
    for kind in KINDS {
        let mut w = World::new(kind, 2);
        let ana = w.edit(
            0,
            &[Op::Put {
                path: Path::keys(["trip", "bookings", "b-ana"]),
                value: json!({"seat": "12A", "by": "ana"}),
            }],
        );
        let ben = w.edit(
            1,
            &[Op::Put {
                path: Path::keys(["trip", "bookings", "b-ben"]),
                value: json!({"seat": "12A", "by": "ben"}),
            }],
        );
        w.commit(&ana);
        assert_eq!(w.commit(&ben).len(), 1, "a conflict record");
        w.sync_all();
        let records = read_records(&w.replicas[0]);
        let open: Vec<_> = records.open_conflicts().collect();
        assert_eq!(open.len(), 1, "{kind}");
        let (key, conflict) = open[0];
        assert!(
            conflict.question.contains("ana and ben"),
            "{}",
            conflict.question
        );
        assert_eq!(conflict.options.len(), 2);
        let ben_option = conflict
            .options
            .iter()
            .position(|o| o.author.as_deref() == Some("ben"))
            .expect("ben's option");
        // Ana's app resolves it: Ben keeps the seat.
        let reconciler = Reconciler::new(&schema(), doc_id(), kind, "ana", false);
        let ops = reconciler
            .choose(&w.replicas[0], key, ben_option, "ana")
            .expect("choose");
        let choice = w.replicas[0]
            .apply_ops(&ops)
            .expect("apply")
            .expect("change");
        assert_eq!(
            reconciler.choose(&w.replicas[0], key, 0, "ana"),
            Err(ChooseError::AlreadyResolved(key.clone()))
        );
        w.commit(&choice);
        w.sync_all();
        w.assert_identical();
        let records = read_records(&w.server);
        assert_eq!(records.open_conflicts().count(), 0, "{kind}");
        assert_eq!(
            records.affecting_change(&ana.id.to_hex()).count(),
            1,
            "ana's booking lost"
        );
        let mut check = Reconciler::new(&schema(), doc_id(), kind, "check", false);
        assert!(
            check.observe(&mut w.server, None, &[]).is_empty(),
            "{kind}: nothing open"
        );
    }
}

#[test]
fn a_status_never_goes_backwards() {
    for kind in KINDS {
        let mut w = World::new(kind, 2);
        let booked = w.edit(
            0,
            &[Op::Put {
                path: Path::keys(["trip", "status"]),
                value: json!("booked"),
            }],
        );
        assert!(w.commit(&booked).is_empty());
        w.sync_all();
        let back = w.edit(
            1,
            &[Op::Put {
                path: Path::keys(["trip", "status"]),
                value: json!("planning"),
            }],
        );
        assert_eq!(w.commit(&back).len(), 1, "{kind}: rejected and restored");
        w.sync_all();
        w.assert_identical();
        assert_eq!(
            w.server.get(&Path::keys(["trip", "status"])),
            Some(json!("booked"))
        );
        let records = read_records(&w.server);
        let r = records.resolutions.values().next().expect("resolution");
        assert_eq!((r.action, r.policy), (Action::Restore, Policy::Reject));
        assert!(r.reason.contains("planning"), "{}", r.reason);
        // Forward moves pass.
        let on = w.edit(
            1,
            &[Op::Put {
                path: Path::keys(["trip", "status"]),
                value: json!("travelling"),
            }],
        );
        assert!(w.commit(&on).is_empty(), "{kind}");
    }
}

#[test]
fn a_payment_counts_once_and_capacity_holds() {
    for kind in KINDS {
        let mut w = World::new(kind, 2);
        let a = w.edit(
            0,
            &[
                Op::Put {
                    path: Path::keys(["trip", "payments", "p1"]),
                    value: json!({"ref": "p-991", "amount": 20}),
                },
                Op::Put {
                    path: Path::keys(["trip", "bus", "ana"]),
                    value: json!({"by": "ana"}),
                },
                Op::Put {
                    path: Path::keys(["trip", "bus", "cy"]),
                    value: json!({"by": "cy"}),
                },
            ],
        );
        let b = w.edit(
            1,
            &[
                Op::Put {
                    path: Path::keys(["trip", "payments", "p2"]),
                    value: json!({"ref": "p-991", "amount": 20}),
                },
                Op::Put {
                    path: Path::keys(["trip", "bus", "ben"]),
                    value: json!({"by": "ben"}),
                },
            ],
        );
        w.commit(&a);
        let repairs = w.commit(&b);
        assert_eq!(repairs.len(), 1, "{kind}: both repairs in one change");
        w.sync_all();
        w.assert_identical();
        let records = read_records(&w.server);
        let victims: Vec<(&str, Vec<String>)> = records
            .resolutions
            .values()
            .map(|r| (r.invariant.as_str(), r.victims.clone()))
            .collect();
        assert!(
            victims.contains(&("payment-once", vec!["p2".to_string()])),
            "{victims:?}"
        );
        assert!(
            victims.contains(&("bus-capacity", vec!["ben".to_string()])),
            "{victims:?}"
        );
        assert_eq!(records.affecting_change(&b.id.to_hex()).count(), 2);
    }
}

#[test]
fn schemas_are_validated() {
    assert!(matches!(Schema::from_json("{"), Err(SchemaError::Json(_))));
    let dup = r#"{"document_type":"t","invariants":[
        {"id":"a","kind":"capacity","path":["x"],"max":1,"policy":"reject"},
        {"id":"a","kind":"capacity","path":["y"],"max":1,"policy":"reject"}]}"#;
    assert!(matches!(
        Schema::from_json(dup),
        Err(SchemaError::DuplicateId(_))
    ));
    let unbounded = r#"{"document_type":"t","invariants":[
        {"id":"a","kind":"range","path":["x"],"policy":"auto"}]}"#;
    assert!(matches!(
        Schema::from_json(unbounded),
        Err(SchemaError::Invalid { .. })
    ));
    assert_eq!(schema().invariants.len(), 5);
}

/// Several changes may reach a document before the reconciler looks (a replica merging a
/// batch): an entry set by the first and changed by a later one is checked as it ends, not as
/// the first change left it (the Yrs tracker reports new entries with their fields; a later
/// change to the entry must drop them).
#[test]
fn an_entry_changed_again_before_the_look_is_checked_as_it_ends() {
    for kind in KINDS {
        for later in [
            // Inside the entry.
            vec![
                Op::Put {
                    path: Path::keys(["wallet", "entries", "e1", "kind"]),
                    value: json!("spend"),
                },
                Op::Put {
                    path: Path::keys(["wallet", "entries", "e1", "amount"]),
                    value: json!(500),
                },
            ],
            // The whole entry.
            vec![Op::Put {
                path: Path::keys(["wallet", "entries", "e1"]),
                value: json!({"amount": 500, "kind": "spend"}),
            }],
        ] {
            let mut w = World::new(kind, 1);
            let first = w
                .server
                .apply_ops(&[Op::Put {
                    path: Path::keys(["wallet", "entries", "e1"]),
                    value: json!({"amount": 5, "kind": "deposit"}),
                }])
                .expect("first")
                .expect("change");
            let second = w.server.apply_ops(&later).expect("second").expect("change");
            let violations = w
                .reconciler
                .observe(&mut w.server, Some(2), &[first.id, second.id]);
            assert_eq!(
                violations.iter().map(|v| v.kind).collect::<Vec<_>>(),
                vec!["range"],
                "{kind}: 100 - 500 is below zero"
            );
        }
    }
}

// Found in review (session 5): each failed before its fix.

fn put(path: &[&str], value: serde_json::Value) -> Op {
    Op::Put {
        path: Path::keys(path.iter().copied()),
        value,
    }
}

fn status(w: &World) -> serde_json::Value {
    w.server.get(&Path::keys(["trip", "status"])).unwrap()
}

#[test]
fn the_same_backward_move_twice_is_repaired_twice() {
    for kind in [DocKind::Automerge, DocKind::Yrs] {
        let mut w = World::new(kind, 1);
        let c = w.edit(0, &[put(&["trip", "status"], json!("booked"))]);
        assert!(w.commit(&c).is_empty());
        w.sync_all();
        let c = w.edit(0, &[put(&["trip", "status"], json!("planning"))]);
        assert_eq!(
            w.commit(&c).len(),
            1,
            "{kind}: first backward move repaired"
        );
        w.sync_all();
        assert_eq!(status(&w), json!("booked"));
        let c = w.edit(0, &[put(&["trip", "status"], json!("planning"))]);
        let repairs = w.commit(&c);
        assert_eq!(
            repairs.len(),
            1,
            "{kind}: second identical backward move repaired"
        );
    }
}

#[test]
fn a_restored_value_is_not_valid_from_everywhere() {
    for kind in [DocKind::Automerge, DocKind::Yrs] {
        let mut w = World::new(kind, 1);
        for (s, repaired) in [
            ("booked", 0),
            ("planning", 1),
            ("travelling", 0),
            ("done", 0),
        ] {
            w.sync_all();
            let c = w.edit(0, &[put(&["trip", "status"], json!(s))]);
            assert_eq!(w.commit(&c).len(), repaired, "{kind} {s}");
        }
        w.sync_all();
        let c = w.edit(0, &[put(&["trip", "status"], json!("booked"))]);
        let repairs = w.commit(&c);
        assert_eq!(repairs.len(), 1, "{kind}: done -> booked must be rejected");
    }
}

#[test]
fn a_reloaded_ledger_voids_the_new_spend_not_an_old_one() {
    for kind in [DocKind::Automerge, DocKind::Yrs] {
        let mut w = World::new(kind, 1);
        // seq 2: Ana spends 50 (funded by d1, committed at seq 1); key "a1" sorts before "d1".
        let c = w.edit(
            0,
            &[put(
                &["wallet", "entries", "a1"],
                json!({"amount": 50, "kind": "spend", "by": "ana"}),
            )],
        );
        assert!(w.commit(&c).is_empty());
        // Restart / eviction: a new reconciler observes the stored document at its head.
        let mut fresh = Reconciler::new(&schema(), doc_id(), kind, "server", true);
        assert!(fresh.observe(&mut w.server, Some(w.seq), &[]).is_empty());
        w.reconciler = fresh;
        let c = w.edit(
            0,
            &[put(
                &["wallet", "entries", "s-ben"],
                json!({"amount": 80, "kind": "spend", "by": "ben"}),
            )],
        );
        w.commit(&c);
        let records = read_records(&w.server);
        let victims: Vec<Vec<String>> = records
            .resolutions
            .values()
            .map(|r| r.victims.clone())
            .collect();
        assert_eq!(victims, vec![vec!["s-ben".to_string()]], "{kind}");
    }
}

#[test]
fn a_conflict_whose_violation_went_away_is_closed() {
    for kind in [DocKind::Automerge, DocKind::Yrs] {
        let mut w = World::new(kind, 1);
        let c = w.edit(
            0,
            &[
                put(
                    &["trip", "bookings", "b-ana"],
                    json!({"seat": "12A", "by": "ana"}),
                ),
                put(
                    &["trip", "bookings", "b-ben"],
                    json!({"seat": "12A", "by": "ben"}),
                ),
            ],
        );
        assert_eq!(w.commit(&c).len(), 1);
        w.sync_all();
        // Ben gives up the seat himself.
        let c = w.edit(
            0,
            &[Op::Delete {
                path: Path::keys(["trip", "bookings", "b-ben"]),
            }],
        );
        w.commit(&c);
        let open = read_records(&w.server).open_conflicts().count();
        assert_eq!(
            open, 0,
            "{kind}: the inbox still asks about a contest that no longer exists"
        );
    }
}

#[test]
fn two_value_rules_broken_at_once_each_name_their_own_writer() {
    // Automerge tells which change wrote a value; each repair must name that one, not the
    // writer of whichever rule was checked last.
    let schema = Schema::from_json(
        r#"{"document_type": "trip", "invariants": [
            {"id": "status-forward", "kind": "transitions", "path": ["trip", "status"],
             "allowed": {"planning": ["booked"], "booked": ["done"]}, "policy": "reject"},
            {"id": "seats", "kind": "range", "path": ["trip", "seats_left"], "min": 0,
             "policy": "reject"}]}"#,
    )
    .expect("schema");
    let kind = DocKind::Automerge;
    let mut server = Document::new(kind, ReplicaId::from_bytes([100; 16]), doc_id());
    let init = server
        .apply_ops(&[Op::Put {
            path: Path::keys(["trip"]),
            value: json!({"status": "booked", "seats_left": 3}),
        }])
        .expect("init")
        .expect("change");
    let mut reconciler = Reconciler::new(&schema, doc_id(), kind, "server", true);
    assert!(reconciler
        .observe(&mut server, Some(1), &[init.id])
        .is_empty());
    let mut replica = |n: u8| {
        Document::load(
            kind,
            ReplicaId::from_bytes([n; 16]),
            doc_id(),
            None,
            [server.save().as_slice()],
        )
        .expect("load")
    };
    let (mut ana, mut ben) = (replica(1), replica(2));
    let back = ana
        .apply_ops(&[Op::Put {
            path: Path::keys(["trip", "status"]),
            value: json!("planning"),
        }])
        .expect("edit")
        .expect("change");
    let over = ben
        .apply_ops(&[Op::Put {
            path: Path::keys(["trip", "seats_left"]),
            value: json!(-1),
        }])
        .expect("edit")
        .expect("change");
    server.apply_changes(&back.bytes).expect("merge");
    server.apply_changes(&over.bytes).expect("merge");
    let outcome = reconciler
        .reconcile(&mut server, Some(2), &[back.id, over.id])
        .expect("reconcile");
    assert_eq!(outcome.violations.len(), 2);
    let records = read_records(&server);
    let named = |rule: &str| {
        records
            .resolutions
            .values()
            .find(|r| r.invariant == rule)
            .map(|r| r.victim_changes.clone())
            .expect("resolution")
    };
    assert_eq!(named("status-forward"), vec![back.id.to_hex()]);
    assert_eq!(named("seats"), vec![over.id.to_hex()]);
}

#[test]
fn a_value_no_rule_can_repair_goes_to_a_person() {
    let schema = Schema::from_json(
        r#"{"document_type": "trip", "invariants": [
            {"id": "seats", "kind": "range", "path": ["trip", "seats_left"], "min": 0,
             "policy": "reject"}]}"#,
    )
    .expect("schema");
    for kind in KINDS {
        let mut doc = Document::new(kind, ReplicaId::from_bytes([100; 16]), doc_id());
        let mut reconciler = Reconciler::new(&schema, doc_id(), kind, "server", true);
        let change = doc
            .apply_ops(&[Op::Put {
                path: Path::keys(["trip"]),
                value: json!({"seats_left": "lots"}),
            }])
            .expect("edit")
            .expect("change");
        reconciler
            .reconcile(&mut doc, Some(1), &[change.id])
            .expect("reconcile");
        let records = read_records(&doc);
        assert!(
            records.resolutions.is_empty(),
            "{kind}: no fact that fixes nothing"
        );
        assert_eq!(
            records.open_conflicts().count(),
            1,
            "{kind}: a question instead"
        );
    }
}
