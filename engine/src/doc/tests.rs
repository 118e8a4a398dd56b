use serde_json::json;

use super::*;

fn replica(n: u8) -> ReplicaId {
    ReplicaId::from_bytes([n; 16])
}

fn doc_id() -> DocumentId {
    DocumentId::from_bytes([42; 16])
}

fn put(path: &[&str], value: serde_json::Value) -> Op {
    Op::Put {
        path: Path::keys(path.iter().copied()),
        value,
    }
}

fn both() -> [DocKind; 2] {
    [DocKind::Automerge, DocKind::Yrs]
}

#[test]
fn json_api_edits_show_in_the_json_view() {
    for kind in both() {
        let mut doc = Document::new(kind, replica(1), doc_id());
        doc.apply_ops(&[
            put(
                &["trip"],
                json!({"status": "planning", "seats": {}, "tags": ["a"]}),
            ),
            put(&["trip", "seats", "12A"], json!("ana")),
            Op::Insert {
                path: Path::keys(["trip", "tags"]),
                index: 1,
                value: json!("b"),
            },
            Op::Increment {
                path: Path::keys(["trip", "visits"]),
                by: 3,
            },
            Op::Splice {
                path: Path::keys(["trip", "notes"]),
                index: 0,
                delete: 0,
                insert: "héllo".into(),
            },
        ])
        .expect("ops apply")
        .expect("a change");
        doc.apply_ops(&[
            Op::Increment {
                path: Path::keys(["trip", "visits"]),
                by: -1,
            },
            Op::Splice {
                path: Path::keys(["trip", "notes"]),
                index: 1,
                delete: 1,
                insert: "e".into(),
            },
            Op::Delete {
                path: Path::keys(["trip", "status"]),
            },
        ])
        .expect("ops apply");
        assert_eq!(
            doc.to_json(),
            json!({"trip": {"seats": {"12A": "ana"}, "tags": ["a", "b"], "visits": 2, "notes": "hello"}}),
            "{kind}"
        );
        assert_eq!(doc.get(&Path::keys(["trip", "visits"])), Some(json!(2)));
        assert_eq!(
            doc.get(&Path::keys(["trip"])).as_ref(),
            doc.to_json().get("trip"),
            "{kind}"
        );
        assert_eq!(doc.get(&Path::root()), Some(doc.to_json()));
        assert_eq!(doc.get(&Path::keys(["trip", "nope"])), None);
    }
}

#[test]
fn bad_ops_are_typed_errors() {
    for kind in both() {
        let mut doc = Document::new(kind, replica(1), doc_id());
        doc.apply_ops(&[put(&["m"], json!({"s": "x", "l": []}))])
            .expect("setup");
        let missing = doc
            .apply_ops(&[put(&["m", "nope", "k"], json!(1))])
            .unwrap_err();
        assert!(
            matches!(missing.error, DocError::PathNotFound(_)),
            "{kind}: {missing:?}"
        );
        let bounds = doc
            .apply_ops(&[Op::Insert {
                path: Path::keys(["m", "l"]),
                index: 5,
                value: json!(1),
            }])
            .unwrap_err();
        assert!(
            matches!(bounds.error, DocError::OutOfBounds { .. }),
            "{kind}: {bounds:?}"
        );
        let text = doc
            .apply_ops(&[Op::Splice {
                path: Path::keys(["m", "t"]),
                index: 3,
                delete: 0,
                insert: "x".into(),
            }])
            .unwrap_err();
        assert!(
            matches!(text.error, DocError::OutOfBounds { .. }),
            "{kind}: {text:?}"
        );
        assert_eq!(doc.get(&Path::keys(["m", "s"])), Some(json!("x")));
    }
}

#[test]
fn concurrent_changes_merge_in_any_order_and_twice() {
    for kind in both() {
        let mut base = Document::new(kind, replica(1), doc_id());
        let init = base
            .apply_ops(&[
                put(&["m"], json!({"n": 0})),
                Op::Increment {
                    path: Path::keys(["m", "c"]),
                    by: 0,
                },
            ])
            .expect("ops")
            .expect("change");
        let mut a = Document::load(kind, replica(2), doc_id(), None, [init.bytes.as_slice()])
            .expect("load");
        let mut b = Document::load(kind, replica(3), doc_id(), None, [init.bytes.as_slice()])
            .expect("load");
        let ca = a
            .apply_ops(&[
                put(&["m", "a"], json!(1)),
                Op::Increment {
                    path: Path::keys(["m", "c"]),
                    by: 2,
                },
            ])
            .expect("ops")
            .expect("change");
        let cb = b
            .apply_ops(&[
                put(&["m", "b"], json!(2)),
                Op::Increment {
                    path: Path::keys(["m", "c"]),
                    by: 5,
                },
            ])
            .expect("ops")
            .expect("change");
        assert_eq!(a.apply_changes(&cb.bytes).expect("apply").len(), 1);
        assert!(
            a.apply_changes(&cb.bytes).expect("apply twice").is_empty(),
            "{kind}: duplicate is not new"
        );
        b.apply_changes(&ca.bytes).expect("apply");
        assert_eq!(a.to_json(), b.to_json(), "{kind}");
        assert_eq!(a.get(&Path::keys(["m", "b"])), Some(json!(2)));
        // Concurrent increments of a counter that existed before add up in both kinds.
        assert_eq!(a.get(&Path::keys(["m", "c"])), Some(json!(7)), "{kind}");
        // Reload from a snapshot gives the same state and version.
        let snapshot = a.save();
        let mut reloaded =
            Document::load(kind, replica(2), doc_id(), Some(&snapshot), []).expect("reload");
        assert_eq!(reloaded.to_json(), a.to_json());
        assert_eq!(reloaded.version(), a.version());
        // What a peer lacks, by version.
        let mut fresh = Document::new(kind, replica(4), doc_id());
        let version = fresh.version();
        let missing = a.changes_after(&version).expect("diff");
        fresh.apply_changes(&missing).expect("apply diff");
        assert_eq!(fresh.to_json(), a.to_json());
    }
}

#[test]
fn malformed_bytes_are_typed_errors() {
    for kind in both() {
        let mut doc = Document::new(kind, replica(1), doc_id());
        let error = doc.apply_changes(&[0xff, 0x00, 0x13, 0x37]).unwrap_err();
        assert!(
            matches!(error, DocError::Malformed { .. }),
            "{kind}: {error:?}"
        );
        let load = Document::load(kind, replica(1), doc_id(), Some(&[1, 2, 3, 4, 5]), []);
        assert!(load.is_err(), "{kind}");
    }
}

#[test]
fn automerge_keeps_concurrent_values_with_their_changes() {
    let mut a = Document::new(DocKind::Automerge, replica(1), doc_id());
    let init = a
        .apply_ops(&[put(&["seats"], json!({}))])
        .expect("ops")
        .expect("change");
    let mut b = Document::load(
        DocKind::Automerge,
        replica(2),
        doc_id(),
        None,
        [init.bytes.as_slice()],
    )
    .expect("load");
    let ca = a
        .apply_ops(&[put(&["seats", "12A"], json!("ana"))])
        .expect("ops")
        .expect("change");
    let cb = b
        .apply_ops(&[put(&["seats", "12A"], json!("ben"))])
        .expect("ops")
        .expect("change");
    a.apply_changes(&cb.bytes).expect("merge");
    let Document::Automerge(am) = &a else {
        unreachable!()
    };
    let values = am
        .conflicts_at(&Path::keys(["seats", "12A"]))
        .expect("conflicts");
    assert_eq!(values.len(), 2);
    let ids: Vec<ChangeId> = values.iter().map(|(_, id)| *id).collect();
    assert!(ids.contains(&ca.id) && ids.contains(&cb.id));
}

#[test]
fn change_ids_round_trip_as_hex() {
    let id = ChangeId::of_bytes(b"x");
    assert_eq!(ChangeId::from_hex(&id.to_hex()), Some(id));
    assert_eq!(ChangeId::from_hex("zz"), None);
}

#[test]
fn every_effective_edit_is_a_change() {
    for kind in both() {
        let mut doc = Document::new(kind, replica(1), doc_id());
        assert!(
            doc.apply_ops(&[put(&["m"], json!({"a": 0}))])
                .expect("first")
                .is_some(),
            "{kind}"
        );
        assert!(
            doc.apply_ops(&[put(&["m", "x"], json!(1))])
                .expect("second")
                .is_some(),
            "{kind}"
        );
        assert!(
            doc.apply_ops(&[put(&["m", "x"], json!(2))])
                .expect("third")
                .is_some(),
            "{kind}"
        );
    }
}

#[test]
fn changed_paths_are_tracked_for_local_edits_and_merges() {
    for kind in both() {
        let mut a = Document::new(kind, replica(1), doc_id());
        let init = a
            .apply_ops(&[put(&["wallet"], json!({"entries": {"d1": {"amount": 1}}}))])
            .expect("ops")
            .expect("change");
        let mut b = Document::load(kind, replica(2), doc_id(), None, [init.bytes.as_slice()])
            .expect("load");
        let roots = vec!["wallet".to_string()];
        b.track_changes(&roots);
        let first = b.take_touched();
        assert!(
            first.is_none() || first == Some(vec![]),
            "{kind}: {first:?}"
        );
        let change = a
            .apply_ops(&[put(&["wallet", "entries", "s1"], json!({"amount": 5}))])
            .expect("ops")
            .expect("change");
        b.apply_changes(&change.bytes).expect("merge");
        b.apply_ops(&[put(&["wallet", "entries", "d1"], json!({"amount": 2}))])
            .expect("local");
        let touched = b.take_touched().expect("tracked");
        for key in ["s1", "d1"] {
            assert!(
                touched.contains(&Path::keys(["wallet", "entries", key])),
                "{kind}: {key} in {touched:?}"
            );
        }
        assert_eq!(b.take_touched(), Some(vec![]), "{kind}: drained");
    }
}

/// A small deterministic generator for the randomized tests below (xorshift; no dependency).
struct Xorshift(u64);

impl Xorshift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// What [`TouchedKey::fields`] must hold for an entry whose JSON is `value`.
fn projection(
    value: Option<&serde_json::Value>,
    fields: &[String],
) -> Vec<Option<serde_json::Value>> {
    fields
        .iter()
        .map(|f| value.and_then(|v| v.get(f.as_str())).cloned())
        .collect()
}

/// Reported fields as JSON, to compare with [`projection`].
fn as_json(fields: &Option<super::Fields>) -> Option<Vec<Option<serde_json::Value>>> {
    fields.as_ref().map(|fields| {
        fields
            .iter()
            .map(|f| f.as_ref().map(super::FieldValue::to_json))
            .collect()
    })
}

/// A Yrs document with an empty `wallet.entries` ledger whose `amount` and `kind` fields are
/// tracked, nothing touched yet; with the ledger's path and the tracked fields.
fn tracked_ledger() -> (Document, Path, Vec<String>) {
    let entries = Path::keys(["wallet", "entries"]);
    let fields = vec!["amount".to_string(), "kind".to_string()];
    let mut doc = Document::new(DocKind::Yrs, replica(1), doc_id());
    doc.apply_ops(&[put(&["wallet"], json!({"entries": {}}))])
        .expect("init");
    doc.track_changes(&["wallet".to_string()]);
    doc.track_entries(&std::sync::Arc::new(entries.clone()), &fields);
    let _ = doc.take_touched_values();
    (doc, entries, fields)
}

#[test]
fn yrs_reports_new_entries_with_their_fields() {
    let (mut doc, entries, _) = tracked_ledger();
    let mut other = Document::new(DocKind::Yrs, replica(2), doc_id());
    other.apply_changes(&doc.save()).expect("fork");
    let change = other
        .apply_ops(&[put(
            &["wallet", "entries", "e1"],
            json!({"amount": 3, "kind": "spend", "note": "not asked"}),
        )])
        .expect("ops")
        .expect("change");
    doc.apply_changes(&change.bytes).expect("merge");
    let touched = doc.take_touched_values().expect("tracked");
    assert_eq!(touched.len(), 1, "{touched:?}");
    assert_eq!(*touched[0].path, entries);
    assert_eq!(&*touched[0].keys[0].key, "e1");
    // The fast path is taken (a merge of one new entry), and says what a read would.
    assert_eq!(
        as_json(&touched[0].keys[0].fields),
        Some(vec![Some(json!(3)), Some(json!("spend"))])
    );
    // Strings are reported as such (shared with the document, not as JSON).
    assert!(matches!(
        &touched[0].keys[0].fields.as_ref().expect("fields")[1],
        Some(super::FieldValue::Text(s)) if &**s == "spend"
    ));
}

/// A change to a collection given to `track_entries` is reported with the caller's own `Arc`
/// (the reconciler recognises its collections by pointer); another map gets its own path.
#[test]
fn yrs_reports_a_tracked_collection_with_the_callers_path() {
    let mut doc = Document::new(DocKind::Yrs, replica(1), doc_id());
    doc.apply_ops(&[put(&["trip"], json!({"bookings": {}, "notes": {}}))])
        .expect("init");
    doc.track_changes(&["trip".to_string()]);
    let bookings = std::sync::Arc::new(Path::keys(["trip", "bookings"]));
    doc.track_entries(&bookings, &["seat".to_string()]);
    let _ = doc.take_touched_values();
    for round in 0..2 {
        doc.apply_ops(&[
            put(
                &["trip", "bookings", &format!("b{round}")],
                json!({"seat": "1A"}),
            ),
            put(&["trip", "notes", &format!("n{round}")], json!("hi")),
        ])
        .expect("edit");
        let mut touched = Vec::new();
        assert!(doc.take_touched_into(&mut touched));
        let at = |path: &Path| touched.iter().find(|t| *t.path == *path).expect("touched");
        assert!(std::sync::Arc::ptr_eq(&at(&bookings).path, &bookings));
        assert!(!std::sync::Arc::ptr_eq(
            &at(&Path::keys(["trip", "notes"])).path,
            &bookings
        ));
    }
}

/// However many fields are asked (none, one, or more than fit inline), each is reported.
#[test]
fn yrs_reports_any_number_of_fields() {
    let value = json!({"amount": 3, "kind": "spend", "note": "n", "at": 7});
    for count in 0..=4 {
        let fields: Vec<String> = ["amount", "kind", "note", "at"][..count]
            .iter()
            .map(|f| f.to_string())
            .collect();
        let mut doc = Document::new(DocKind::Yrs, replica(1), doc_id());
        doc.apply_ops(&[put(&["wallet"], json!({"entries": {}}))])
            .expect("init");
        doc.track_changes(&["wallet".to_string()]);
        let entries = Path::keys(["wallet", "entries"]);
        doc.track_entries(&std::sync::Arc::new(entries.clone()), &fields);
        let _ = doc.take_touched_values();
        doc.apply_ops(&[put(&["wallet", "entries", "e1"], value.clone())])
            .expect("edit");
        let touched = doc.take_touched_values().expect("tracked");
        assert_eq!(
            as_json(&touched[0].keys[0].fields),
            Some(projection(Some(&value), &fields)),
            "{count} fields"
        );
    }
}

/// Every field value the tracker reports with a touched entry is what the document holds when
/// the touched paths are taken, however the window's transactions changed the entry after it
/// was set (inside it, replacing it, deleting it, replacing its collection or an ancestor).
#[test]
fn yrs_reported_entry_fields_are_current_when_taken() {
    let mut reported = 0;
    for seed in 1..40u64 {
        let mut rng = Xorshift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let (mut doc, entries, fields) = tracked_ledger();
        for _window in 0..30 {
            for _txn in 0..=rng.below(3) {
                let key = format!("e{}", rng.below(4));
                let amount = rng.below(100);
                let op = match rng.below(8) {
                    0..=2 => put(
                        &["wallet", "entries", &key],
                        json!({"amount": amount, "kind": "deposit", "x": 1}),
                    ),
                    3 => put(&["wallet", "entries", &key, "amount"], json!(amount)),
                    4 => Op::Delete {
                        path: Path::keys(["wallet", "entries", key.as_str()]),
                    },
                    5 => put(
                        &["wallet", "entries"],
                        json!({"e0": {"amount": amount, "kind": "spend"}}),
                    ),
                    6 => put(&["wallet"], json!({"entries": {"e1": {"amount": amount}}})),
                    _ => put(&["wallet", "entries", &key], json!(amount)),
                };
                // Ops on entries that are gone fail: that is fine, the next one may not.
                let _ = doc.apply_ops(&[op]);
            }
            let touched = doc.take_touched_values().expect("tracked");
            for t in &touched {
                for key in &t.keys {
                    let Some(got) = as_json(&key.fields) else {
                        continue;
                    };
                    assert_eq!(*t.path, entries, "only asked collections carry fields");
                    reported += 1;
                    let now = doc.get(&Path::clone(&t.path).key(&*key.key));
                    assert_eq!(
                        got,
                        projection(now.as_ref(), &fields),
                        "seed {seed}: {} in {touched:?}",
                        key.key
                    );
                }
            }
        }
    }
    assert!(reported > 100, "the fast path was taken {reported} times");
}

/// Paths through a list are not remembered per map: a map whose index moves is reported at its
/// new index.
#[test]
fn yrs_touched_paths_follow_a_map_that_moves_in_a_list() {
    let mut doc = Document::new(DocKind::Yrs, replica(1), doc_id());
    doc.apply_ops(&[put(&["lists"], json!({"items": [{"x": 1}]}))])
        .expect("init");
    doc.track_changes(&["lists".to_string()]);
    let _ = doc.take_touched();
    let x_at = |i: usize| Path::keys(["lists", "items"]).index(i).key("x");
    doc.apply_ops(&[Op::Put {
        path: x_at(0),
        value: json!(2),
    }])
    .expect("edit");
    assert_eq!(doc.take_touched(), Some(vec![x_at(0)]));
    doc.apply_ops(&[Op::Insert {
        path: Path::keys(["lists", "items"]),
        index: 0,
        value: json!({"x": 0}),
    }])
    .expect("insert");
    let _ = doc.take_touched();
    doc.apply_ops(&[Op::Put {
        path: x_at(1),
        value: json!(3),
    }])
    .expect("edit");
    assert_eq!(doc.take_touched(), Some(vec![x_at(1)]));
}

/// An entry a Yjs client sets as a plain object (an `Any` map, not a nested shared map) is
/// reported with the same fields a read shows.
#[test]
fn yrs_reports_fields_of_plain_object_entries() {
    use yrs::{Any, Map, Out, WriteTxn};
    let (mut doc, entries, fields) = tracked_ledger();
    let Document::Yrs(yrs_doc) = &mut doc else {
        panic!("a Yrs document");
    };
    let (change, ()) = yrs_doc.change_native(|txn| {
        let wallet = txn.get_or_insert_map("wallet");
        let Some(Out::YMap(entries)) = wallet.get(txn, "entries") else {
            panic!("entries is a map");
        };
        let object = std::collections::HashMap::from([
            ("amount".to_string(), Any::from(7)),
            ("kind".to_string(), Any::from("spend")),
        ]);
        entries.insert(txn, "e1", Any::from(object));
    });
    assert!(change.is_some());
    let touched = doc.take_touched_values().expect("tracked");
    let now = doc.get(&entries.clone().key("e1"));
    assert_eq!(now, Some(json!({"amount": 7, "kind": "spend"})));
    assert_eq!(
        as_json(&touched[0].keys[0].fields),
        Some(projection(now.as_ref(), &fields))
    );
}
