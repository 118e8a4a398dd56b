//! The invariant layer end to end: replicas go offline, make conflicting changes and reconnect
//! through a real server, which commits them in order and reconciles after every commit.
//! Afterwards the invariant holds on every replica, every replica is identical, the resolution
//! is recorded, and the author whose change lost sees what happened to it and why.

mod common;

use std::time::Duration;

use accord_engine::invariant::{folded_total, type_op, Schema};
use accord_engine::replica::{ChangeStatus, Event};
use accord_engine::storage::MemoryStorage;
use accord_engine::{ChangeId, DocKind, DocumentId, Op, Path};
use common::*;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

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

fn schema() -> Schema {
    Schema::from_json(SCHEMA).unwrap()
}

struct Trip {
    server: Server,
    ana: Client<MemoryStorage>,
    ben: Client<MemoryStorage>,
    document: DocumentId,
    kind: DocKind,
    _dir: tempfile::TempDir,
}

async fn trip(kind: DocKind) -> Trip {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), false);
    config.schemas.push(schema());
    let server = Server::start(config).await;
    let document = DocumentId::from_random_bytes([kind.code() + 40; 16]);
    let mut ana = Client::new(MemoryStorage::new(), 1, replica_config(1 << 20));
    let mut ben = Client::new(MemoryStorage::new(), 2, replica_config(1 << 20));
    for client in [&mut ana, &mut ben] {
        client.replica.create(document, kind).unwrap();
        client.replica.add_schema(schema());
    }
    ana.replica
        .change(
            document,
            &[
                type_op(kind, "trip"),
                Op::Put {
                    path: Path::keys(["wallet"]),
                    value: json!({"entries": {"d1": {"amount": 100, "kind": "deposit", "by": "ana"}}}),
                },
                Op::Put {
                    path: Path::keys(["trip"]),
                    value: json!({"status": "planning", "bookings": {}, "payments": {}, "bus": {}}),
                },
            ],
        )
        .unwrap();
    for client in [&mut ana, &mut ben] {
        client.connect(server.addr, None).await;
        client.subscribe(document).await;
    }
    assert!(ana.pump_until(WAIT, |c| c.outbox_len() == 0).await);
    let mut trip = Trip {
        server,
        ana,
        ben,
        document,
        kind,
        _dir: dir,
    };
    trip.settle(|_, _| true).await;
    trip
}

impl Trip {
    /// Pumps both clients until they hold the same state, nothing is pending and `done` holds.
    async fn settle(
        &mut self,
        mut done: impl FnMut(&serde_json::Value, &serde_json::Value) -> bool,
    ) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            self.ana.pump_for(Duration::from_millis(40)).await;
            self.ben.pump_for(Duration::from_millis(40)).await;
            let a = self.ana.replica.json(self.document).unwrap();
            let b = self.ben.replica.json(self.document).unwrap();
            let quiet = self.ana.outbox_len() == 0 && self.ben.outbox_len() == 0;
            if a == b && quiet && done(&a, &b) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{}: did not settle:\nana {a:#}\nben {b:#}",
                self.kind
            );
        }
    }

    fn offline(&mut self) {
        self.ana.drop_connection();
        self.ben.drop_connection();
    }

    /// Both go offline and the server restarts on the same data (documents load from SQLite).
    async fn restart(mut self) -> Trip {
        self.offline();
        let Trip {
            server,
            ana,
            ben,
            document,
            kind,
            _dir,
        } = self;
        server.stop().await;
        let mut config = config(_dir.path(), false);
        config.schemas.push(schema());
        Trip {
            server: Server::start(config).await,
            ana,
            ben,
            document,
            kind,
            _dir,
        }
    }

    /// Ben comes back first (what he did offline is the first thing the server sees), then Ana.
    async fn ben_back_first(&mut self) {
        self.ben.connect(self.server.addr, None).await;
        self.ben.subscribe(self.document).await;
        assert!(self.ben.pump_until(WAIT, |c| c.outbox_len() == 0).await);
        self.ana.connect(self.server.addr, None).await;
        self.ana.subscribe(self.document).await;
    }

    /// Ana comes back first (her changes commit first), then Ben.
    async fn online(&mut self) {
        self.ana.connect(self.server.addr, None).await;
        self.ana.subscribe(self.document).await;
        assert!(self.ana.pump_until(WAIT, |c| c.outbox_len() == 0).await);
        self.ben.connect(self.server.addr, None).await;
        self.ben.subscribe(self.document).await;
        assert!(self.ben.pump_until(WAIT, |c| c.outbox_len() == 0).await);
    }

    fn put(&mut self, who: Who, path: &[&str], value: serde_json::Value) -> ChangeId {
        let client = match who {
            Who::Ana => &mut self.ana,
            Who::Ben => &mut self.ben,
        };
        client
            .replica
            .change(
                self.document,
                &[Op::Put {
                    path: Path::keys(path.iter().copied()),
                    value,
                }],
            )
            .unwrap()
            .unwrap()
    }

    fn status(&mut self, who: Who, change: ChangeId) -> ChangeStatus {
        let client = match who {
            Who::Ana => &mut self.ana,
            Who::Ben => &mut self.ben,
        };
        client.replica.change_status(self.document, change).unwrap()
    }
}

#[derive(Clone, Copy)]
enum Who {
    Ana,
    Ben,
}

fn spec(id: &str) -> accord_engine::invariant::InvariantSpec {
    schema()
        .invariants
        .into_iter()
        .find(|s| s.id == id)
        .unwrap()
}

/// Every `victims` list in a document's JSON, wherever its records are kept.
fn all_victims<'a>(json: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
    match json {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                if key == "victims" {
                    out.push(value);
                } else {
                    all_victims(value, out);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| all_victims(v, out)),
        _ => {}
    }
}

fn has_resolution(json: &serde_json::Value) -> bool {
    json.to_string().contains("\"victims\"")
}

async fn wallet(kind: DocKind) {
    let mut t = trip(kind).await;
    t.offline();
    let ana = t.put(
        Who::Ana,
        &["wallet", "entries", "s-ana"],
        json!({"amount": 80, "kind": "spend", "by": "ana"}),
    );
    let ben = t.put(
        Who::Ben,
        &["wallet", "entries", "s-ben"],
        json!({"amount": 70, "kind": "spend", "by": "ben"}),
    );
    t.online().await;
    t.settle(|a, _| has_resolution(a)).await;
    for client in [&mut t.ana, &mut t.ben] {
        let doc = client.replica.document(t.document).unwrap();
        assert_eq!(
            folded_total(doc, &spec("wallet-non-negative")),
            Some(20.0),
            "{kind}"
        );
    }
    assert!(
        matches!(t.status(Who::Ana, ana), ChangeStatus::Confirmed { .. }),
        "{kind}"
    );
    match t.status(Who::Ben, ben) {
        ChangeStatus::Compensated {
            invariant,
            reason,
            by,
            ..
        } => {
            assert_eq!(invariant, "wallet-non-negative");
            assert!(reason.contains("-50"), "{reason}");
            assert_eq!(by, "server");
        }
        other => panic!("{kind}: ben's spend is {other:?}"),
    }
    assert!(
        t.ben
            .events
            .iter()
            .any(|e| matches!(e, Event::Compensated { change, .. } if *change == ben)),
        "{kind}: ben's app is told"
    );
    let metrics = &t.server.metrics;
    assert_eq!(
        metrics.invariant_count("range", "compensate", "resolved"),
        1,
        "{kind}"
    );
    t.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balance_never_below_zero_automerge() {
    wallet(DocKind::Automerge).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balance_never_below_zero_yrs() {
    wallet(DocKind::Yrs).await;
}

async fn seat(kind: DocKind) {
    let mut t = trip(kind).await;
    t.offline();
    let ana = t.put(
        Who::Ana,
        &["trip", "bookings", "b-ana"],
        json!({"seat": "12A", "by": "ana"}),
    );
    let ben = t.put(
        Who::Ben,
        &["trip", "bookings", "b-ben"],
        json!({"seat": "12A", "by": "ben"}),
    );
    t.online().await;
    t.settle(|a, _| a.to_string().contains("all claimed")).await;
    let open = t.ben.replica.conflicts(t.document).unwrap();
    assert_eq!(open.len(), 1, "{kind}: one conflict in the inbox");
    let (key, conflict) = &open[0];
    assert!(
        conflict.question.contains("ana and ben"),
        "{}",
        conflict.question
    );
    let ana_option = conflict
        .options
        .iter()
        .position(|o| o.author.as_deref() == Some("ana"))
        .unwrap();
    // Ben gives the seat to Ana; the choice is a change like any other.
    t.ben
        .replica
        .resolve_conflict(t.document, key, ana_option, "ben")
        .unwrap();
    t.settle(|a, _| a.to_string().contains("chose")).await;
    for client in [&mut t.ana, &mut t.ben] {
        assert!(
            client.replica.conflicts(t.document).unwrap().is_empty(),
            "{kind}"
        );
    }
    assert!(
        matches!(t.status(Who::Ben, ben), ChangeStatus::Compensated { .. }),
        "{kind}"
    );
    assert!(
        matches!(t.status(Who::Ana, ana), ChangeStatus::Confirmed { .. }),
        "{kind}"
    );
    assert_eq!(
        t.server.metrics.invariant_count("unique", "ask", "asked"),
        1
    );
    t.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seat_booked_once_automerge() {
    seat(DocKind::Automerge).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seat_booked_once_yrs() {
    seat(DocKind::Yrs).await;
}

async fn status_payments_capacity(kind: DocKind) {
    let mut t = trip(kind).await;
    t.put(Who::Ana, &["trip", "status"], json!("booked"));
    t.settle(|a, _| a.to_string().contains("booked")).await;
    t.offline();
    t.put(
        Who::Ana,
        &["trip", "payments", "p1"],
        json!({"ref": "p-991", "amount": 20}),
    );
    t.put(Who::Ana, &["trip", "bus", "ana"], json!({"by": "ana"}));
    t.put(Who::Ana, &["trip", "bus", "cy"], json!({"by": "cy"}));
    let back = t.put(Who::Ben, &["trip", "status"], json!("planning"));
    let paid = t.put(
        Who::Ben,
        &["trip", "payments", "p2"],
        json!({"ref": "p-991", "amount": 20}),
    );
    let seat = t.put(Who::Ben, &["trip", "bus", "ben"], json!({"by": "ben"}));
    t.online().await;
    t.settle(|a, _| a.to_string().matches("\"victims\"").count() >= 3)
        .await;
    let json = t.ana.replica.json(t.document).unwrap();
    let status = match kind {
        DocKind::Automerge => json["trip"]["status"].clone(),
        DocKind::Yrs => json["trip"]["status"].clone(),
    };
    assert_eq!(
        status,
        json!("booked"),
        "{kind}: the status did not go backwards"
    );
    for change in [back, paid, seat] {
        assert!(
            matches!(t.status(Who::Ben, change), ChangeStatus::Compensated { .. }),
            "{kind}: {:?}",
            t.status(Who::Ben, change)
        );
    }
    t.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_payment_and_capacity_automerge() {
    status_payments_capacity(DocKind::Automerge).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_payment_and_capacity_yrs() {
    status_payments_capacity(DocKind::Yrs).await;
}

/// "The later change in commit order loses" across a restart: entries already in a stored
/// document rank before anything committed after it is loaded again, whatever their keys, and
/// a status stored before the restart is what a transition is checked against.
async fn first_committed_wins_after_a_restart(kind: DocKind) {
    let mut t = trip(kind).await;
    let zoe = t.put(Who::Ana, &["trip", "bus", "zoe"], json!({"by": "zoe"}));
    t.put(Who::Ana, &["trip", "bus", "yann"], json!({"by": "yann"}));
    t.put(Who::Ana, &["trip", "status"], json!("booked"));
    t.settle(|a, _| a.to_string().contains("zoe") && a["trip"]["status"] == "booked")
        .await;
    assert!(!has_resolution(&t.ana.replica.json(t.document).unwrap()));
    // The server restarts: the document is loaded from SQLite on the next subscription.
    let mut t = t.restart().await;
    // Offline, Ben adds a third passenger whose key sorts before both of the others, and is
    // the first to come back: his change is the first thing the reloaded document sees.
    let abe = t.put(Who::Ben, &["trip", "bus", "abe"], json!({"by": "abe"}));
    // And moves the status backwards: the rule knows what the stored document said.
    let back = t.put(Who::Ben, &["trip", "status"], json!("planning"));
    t.ben_back_first().await;
    t.settle(|a, _| a.to_string().matches("\"victims\"").count() >= 2)
        .await;
    let json = t.ana.replica.json(t.document).unwrap();
    assert_eq!(json["trip"]["status"], "booked", "{kind}: {json:#}");
    assert!(
        matches!(t.status(Who::Ben, back), ChangeStatus::Compensated { .. }),
        "{kind}: {:?}",
        t.status(Who::Ben, back)
    );
    let mut victims = Vec::new();
    all_victims(&json, &mut victims);
    assert!(
        victims.contains(&&json!(["abe"]))
            && !victims.iter().any(|v| v.to_string().contains("zoe")),
        "{kind}: the entry committed last is the victim, not one loaded from storage: {json:#}"
    );
    assert!(
        matches!(t.status(Who::Ben, abe), ChangeStatus::Compensated { .. }),
        "{kind}: the change committed last is the one refused: {:?}",
        t.status(Who::Ben, abe)
    );
    assert!(
        matches!(t.status(Who::Ana, zoe), ChangeStatus::Confirmed { .. }),
        "{kind}: {:?}",
        t.status(Who::Ana, zoe)
    );
    assert_eq!(t.server.loaded(), 1);
    t.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_committed_wins_after_a_restart_automerge() {
    first_committed_wins_after_a_restart(DocKind::Automerge).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_committed_wins_after_a_restart_yrs() {
    first_committed_wins_after_a_restart(DocKind::Yrs).await;
}

/// After a restart the stored ledger's entries rank before a new spend, and among themselves a
/// deposit counts before the spends committed with it: the overdraft is the new spend, not an
/// old one whose key sorts first.
async fn a_ledger_after_a_restart_voids_the_new_spend(kind: DocKind) {
    let mut t = trip(kind).await;
    t.put(
        Who::Ana,
        &["wallet", "entries", "a1"],
        json!({"amount": 50, "kind": "spend", "by": "ana"}),
    );
    t.settle(|a, _| a.to_string().contains("\"a1\"")).await;
    assert!(!has_resolution(&t.ana.replica.json(t.document).unwrap()));
    let mut t = t.restart().await;
    t.put(
        Who::Ben,
        &["wallet", "entries", "s-ben"],
        json!({"amount": 80, "kind": "spend", "by": "ben"}),
    );
    t.ben_back_first().await;
    t.settle(|a, _| has_resolution(a)).await;
    let json = t.ana.replica.json(t.document).unwrap();
    let mut victims = Vec::new();
    all_victims(&json, &mut victims);
    assert_eq!(victims, vec![&json!(["s-ben"])], "{kind}");
    t.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_after_a_restart_voids_the_new_spend_automerge() {
    a_ledger_after_a_restart_voids_the_new_spend(DocKind::Automerge).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_after_a_restart_voids_the_new_spend_yrs() {
    a_ledger_after_a_restart_voids_the_new_spend(DocKind::Yrs).await;
}

#[tokio::test]
async fn two_schemas_for_one_document_type_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), false);
    config.schemas.push(schema());
    config.schemas.push(schema());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let result = accord_server::run(listener, config, std::future::pending::<()>()).await;
    match result {
        Err(accord_server::ServerError::DuplicateSchema(document_type)) => {
            assert_eq!(document_type, "trip")
        }
        other => panic!("expected a duplicate schema error, got {other:?}"),
    }
}
