//! Property test of the invariant layer through the engine's sans-IO pieces: clients edit a trip
//! document offline, an authority (standing in for the server) commits their changes in
//! whatever order they arrive and runs the reconciliation loop after every commit, and changes
//! flow back to the clients at random times. At quiescence every invariant holds, every replica
//! is identical, no entry is voided twice, and every client change is accounted for: its entries
//! count, or a resolution names the change and says why.

mod sim;

use std::collections::{BTreeMap, VecDeque};

use accord_engine::invariant::{read_records, Reconciler, Schema};
use accord_engine::{Change, DocKind, Document, DocumentId, Op, Path, ReplicaId};
use proptest::prelude::*;
use serde_json::json;
use sim::Rng;

const SCHEMA: &str = r#"{
  "document_type": "trip",
  "invariants": [
    {"id": "wallet", "kind": "range", "path": ["wallet", "entries"],
     "fold": {"amount": "amount", "sign": {"field": "kind", "negative": ["spend"]}}, "min": 0, "policy": "compensate"},
    {"id": "seat", "kind": "unique", "path": ["trip", "bookings"], "field": "seat", "policy": "auto"},
    {"id": "status", "kind": "transitions", "path": ["trip", "status"],
     "allowed": {"planning": ["booked", "cancelled"], "booked": ["travelling", "cancelled"], "travelling": ["done"]},
     "order": ["planning", "booked", "travelling", "done"], "policy": "auto"},
    {"id": "payment", "kind": "once", "path": ["trip", "payments"], "key_field": "ref", "policy": "auto"},
    {"id": "bus", "kind": "capacity", "path": ["trip", "bus"], "max": 3, "policy": "reject"}
  ]
}"#;

fn doc_id() -> DocumentId {
    DocumentId::from_bytes([8; 16])
}

struct Client {
    doc: Document,
    /// Changes not yet delivered to the authority, in order.
    outbox: VecDeque<Change>,
}

struct Run {
    hub: Document,
    reconciler: Reconciler,
    seq: u64,
    clients: Vec<Client>,
    /// Every client change: (change, entry paths it added).
    written: Vec<(Change, Vec<(Path, String)>)>,
    next_entry: u64,
}

impl Run {
    fn new(kind: DocKind, clients: usize) -> Self {
        let schema = Schema::from_json(SCHEMA).expect("schema");
        let mut hub = Document::new(kind, ReplicaId::from_bytes([200; 16]), doc_id());
        let init = hub
            .apply_ops(&[
                Op::Put {
                    path: Path::keys(["wallet"]),
                    value: json!({"entries": {"seed": {"amount": 100, "kind": "deposit"}}}),
                },
                Op::Put {
                    path: Path::keys(["trip"]),
                    value: json!({"status": "planning", "bookings": {}, "payments": {}, "bus": {}}),
                },
            ])
            .expect("init")
            .expect("change");
        let mut reconciler = Reconciler::new(&schema, doc_id(), kind, "server", true);
        assert!(reconciler.observe(&mut hub, Some(1), &[init.id]).is_empty());
        let clients = (0..clients)
            .map(|i| Client {
                doc: Document::load(
                    kind,
                    ReplicaId::from_bytes([i as u8 + 1; 16]),
                    doc_id(),
                    None,
                    [init.bytes.as_slice()],
                )
                .expect("fork"),
                outbox: VecDeque::new(),
            })
            .collect();
        Self {
            hub,
            reconciler,
            seq: 1,
            clients,
            written: Vec::new(),
            next_entry: 0,
        }
    }

    fn edit(&mut self, i: usize, rng: &mut Rng) {
        self.next_entry += 1;
        let key = format!("c{i}-{}", self.next_entry);
        let (collection, value) = match rng.below(5) {
            0 => (
                Path::keys(["wallet", "entries"]),
                json!({"amount": 1 + rng.below(60), "kind": if rng.chance(75) { "spend" } else { "deposit" }, "by": format!("c{i}")}),
            ),
            1 => (
                Path::keys(["trip", "bookings"]),
                json!({"seat": format!("{}A", rng.below(3)), "by": format!("c{i}")}),
            ),
            2 => (
                Path::keys(["trip", "payments"]),
                json!({"ref": format!("p-{}", rng.below(3)), "amount": 20}),
            ),
            3 => (Path::keys(["trip", "bus"]), json!({"by": format!("c{i}")})),
            _ => {
                let status =
                    ["planning", "booked", "travelling", "done", "cancelled"][rng.below(5)];
                let op = Op::Put {
                    path: Path::keys(["trip", "status"]),
                    value: json!(status),
                };
                if let Ok(Some(change)) = self.clients[i].doc.apply_ops(&[op]) {
                    self.clients[i].outbox.push_back(change.clone());
                    self.written.push((change, Vec::new()));
                }
                return;
            }
        };
        let op = Op::Put {
            path: collection.clone().key(key.clone()),
            value,
        };
        let change = self.clients[i]
            .doc
            .apply_ops(&[op])
            .expect("edit")
            .expect("change");
        self.clients[i].outbox.push_back(change.clone());
        self.written.push((change, vec![(collection, key)]));
    }

    /// The authority commits the next change of client `i` and reconciles.
    fn commit_from(&mut self, i: usize) {
        let Some(change) = self.clients[i].outbox.pop_front() else {
            return;
        };
        self.hub.apply_changes(&change.bytes).expect("commit");
        self.seq += 1;
        let outcome = self
            .reconciler
            .reconcile(&mut self.hub, Some(self.seq), &[change.id])
            .expect("reconcile");
        self.seq += outcome.changes.len() as u64;
    }

    /// Client `i` receives what the authority has that it lacks.
    fn pull(&mut self, i: usize) {
        let version = self.clients[i].doc.version();
        let missing = self.hub.changes_after(&version).expect("diff");
        self.clients[i].doc.apply_changes(&missing).expect("pull");
    }

    fn step(&mut self, rng: &mut Rng) {
        let i = rng.below(self.clients.len());
        match rng.below(3) {
            0 => self.edit(i, rng),
            1 => self.commit_from(i),
            _ => self.pull(i),
        }
    }

    fn quiesce(&mut self) {
        for i in 0..self.clients.len() {
            while !self.clients[i].outbox.is_empty() {
                self.commit_from(i);
            }
        }
        for i in 0..self.clients.len() {
            self.pull(i);
        }
    }
}

fn check(kind: DocKind, seed: u64, steps: usize) -> Result<(), TestCaseError> {
    let mut rng = Rng::new(seed);
    let mut run = Run::new(kind, 3);
    for _ in 0..steps {
        run.step(&mut rng);
    }
    run.quiesce();
    let hub_json = run.hub.to_json();
    for (i, client) in run.clients.iter().enumerate() {
        prop_assert_eq!(
            &client.doc.to_json(),
            &hub_json,
            "{} seed {}: client {} differs",
            kind,
            seed,
            i
        );
    }
    // Every invariant holds on every replica, seen by a fresh checker.
    let schema = Schema::from_json(SCHEMA).expect("schema");
    for doc in run
        .clients
        .iter_mut()
        .map(|c| &mut c.doc)
        .chain([&mut run.hub])
    {
        let mut checker = Reconciler::new(&schema, doc_id(), kind, "checker", false);
        let open = checker.observe(doc, None, &[]);
        prop_assert!(
            open.is_empty(),
            "{} seed {}: open violations {:?}",
            kind,
            seed,
            open
        );
    }
    // No entry is voided by two resolutions.
    let records = read_records(&run.hub);
    let mut voided: BTreeMap<(String, String), usize> = BTreeMap::new();
    for r in records.resolutions.values() {
        for v in &r.victims {
            *voided.entry((r.path.to_string(), v.clone())).or_default() += 1;
        }
    }
    prop_assert!(
        voided.values().all(|n| *n == 1),
        "{} seed {}: voided twice: {:?}",
        kind,
        seed,
        voided
    );
    // Every change is accounted for: its entries are there, and if voided a resolution names it.
    for (change, entries) in &run.written {
        for (collection, key) in entries {
            prop_assert!(
                run.hub.get(&collection.clone().key(key.clone())).is_some(),
                "{} seed {}: entry {} lost",
                kind,
                seed,
                key
            );
            if voided.contains_key(&(collection.to_string(), key.clone())) {
                let named = records.affecting_change(&change.id.to_hex()).count();
                prop_assert!(
                    named > 0,
                    "{} seed {}: {} voided but its change is not named",
                    kind,
                    seed,
                    key
                );
            }
        }
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("ACCORD_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn automerge_invariants_hold_at_quiescence(seed in any::<u64>(), steps in 10usize..120) {
        check(DocKind::Automerge, seed, steps)?;
    }

    #[test]
    fn yrs_invariants_hold_at_quiescence(seed in any::<u64>(), steps in 10usize..120) {
        check(DocKind::Yrs, seed, steps)?;
    }
}
