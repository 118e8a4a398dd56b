//! End-to-end tests over real sockets on 127.0.0.1.

mod common;

use std::sync::Arc;
use std::time::Duration;

use accord_engine::protocol::{ErrorCode, Message, PROTOCOL_VERSION};
use accord_engine::replica::{ChangeStatus, Event};
use accord_engine::storage::{MemoryStorage, SqliteStorage};
use accord_engine::{DocKind, DocumentId, Op, Path, ReplicaId};
use accord_server::auth::{mint, unix_now, Claims, Rights, Scope};
use common::*;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

/// An edit that touches its own key, so every edit is one new change.
fn edit(kind: DocKind, key: &str, value: i64) -> Vec<Op> {
    let path = match kind {
        DocKind::Automerge => Path::keys([key]),
        DocKind::Yrs => Path::keys(["m", key]),
    };
    vec![Op::Put {
        path,
        value: json!(value),
    }]
}

fn keys(kind: DocKind, json: &serde_json::Value) -> usize {
    let map = match kind {
        DocKind::Automerge => json.as_object(),
        DocKind::Yrs => json.get("m").and_then(|m| m.as_object()),
    };
    map.map_or(0, |m| m.len())
}

fn doc(n: u8) -> DocumentId {
    DocumentId::from_random_bytes([n; 16])
}

/// Ten clients edit one document at once, through a document inbox of `inbox` commands.
async fn concurrent_clients_converge(kind: DocKind, inbox: usize) {
    const CLIENTS: usize = 10;
    const EDITS: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), false);
    config.document_inbox = inbox;
    let server = Server::start(config).await;
    let addr = server.addr;
    let document = doc(kind.code());
    let barrier = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let mut tasks = Vec::new();
    for n in 0..CLIENTS {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut client =
                Client::new(MemoryStorage::new(), n as u8 + 1, replica_config(1 << 20));
            client.replica.create(document, kind).unwrap();
            client.connect(addr, None).await;
            client.subscribe(document).await;
            assert!(client.pump_until(WAIT, |c| c.is_subscribed(document)).await);
            barrier.wait().await;
            for i in 0..EDITS {
                client
                    .replica
                    .change(document, &edit(kind, &format!("c{n}e{i}"), i as i64))
                    .unwrap();
                client.pump_for(Duration::from_millis(5)).await;
            }
            let total = (CLIENTS * EDITS) as u64;
            let done = client
                .pump_until(WAIT, |c| {
                    c.outbox_len() == 0
                        && c.acks.len() as u64 == total
                        && keys(kind, &c.replica.json(document).unwrap()) == CLIENTS * EDITS
                })
                .await;
            assert!(
                done,
                "client {n} did not converge: {} acks, outbox {}",
                client.acks.len(),
                client.outbox_len()
            );
            (client.replica.json(document).unwrap(), client.acks.clone())
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    let (json0, acks0) = &results[0];
    let seqs: Vec<u64> = acks0.keys().copied().collect();
    assert_eq!(
        seqs,
        (1..=(CLIENTS * EDITS) as u64).collect::<Vec<_>>(),
        "gapless"
    );
    for (json, acks) in &results {
        assert_eq!(json, json0, "{kind}: same state everywhere");
        assert_eq!(acks, acks0, "{kind}: same commit order everywhere");
    }
    assert_eq!(server.committed(), (CLIENTS * EDITS) as u64);
    server.stop().await;
}

/// A full document inbox holds its senders back (their connections stop reading) and loses
/// nothing: with room for one command, ten writers still converge on a gapless order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_inbox_of_one_holds_writers_back_and_loses_nothing() {
    concurrent_clients_converge(DocKind::Yrs, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_clients_converge_automerge() {
    concurrent_clients_converge(DocKind::Automerge, 1_024).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_clients_converge_yrs() {
    concurrent_clients_converge(DocKind::Yrs, 1_024).await;
}

async fn reconnect_acks_outbox(kind: DocKind) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), false)).await;
    let document = doc(10 + kind.code());
    let db = dir.path().join(format!("client-{kind}.db"));
    let mut watcher = Client::new(MemoryStorage::new(), 2, replica_config(1 << 20));
    watcher.replica.create(document, kind).unwrap();
    watcher.connect(server.addr, None).await;
    watcher.subscribe(document).await;
    assert!(
        watcher
            .pump_until(WAIT, |c| c.is_subscribed(document))
            .await
    );
    let first;
    {
        let mut writer = Client::new(
            SqliteStorage::open(&db).unwrap(),
            1,
            replica_config(1 << 20),
        );
        writer.replica.create(document, kind).unwrap();
        writer.connect(server.addr, None).await;
        writer.subscribe(document).await;
        first = writer
            .replica
            .change(document, &edit(kind, "a", 1))
            .unwrap()
            .unwrap();
        assert!(writer.pump_until(WAIT, |c| c.outbox_len() == 0).await);
        // Two edits go out, and the connection drops before any ack comes back.
        writer
            .replica
            .change(document, &edit(kind, "b", 2))
            .unwrap();
        writer
            .replica
            .change(document, &edit(kind, "c", 3))
            .unwrap();
        writer.flush().await;
        writer.drop_connection();
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.committed() < 3 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.committed(), 3);
    // The client restarts from its storage, edits offline, reconnects.
    let mut writer = Client::new(
        SqliteStorage::open(&db).unwrap(),
        1,
        replica_config(1 << 20),
    );
    assert_eq!(writer.outbox_len(), 2, "b and c were never acknowledged");
    assert_eq!(
        writer.replica.change_status(document, first).unwrap(),
        ChangeStatus::Confirmed { seq: 1 },
        "{kind}: a status settled before the restart reads the same after it"
    );
    let last = writer
        .replica
        .change(document, &edit(kind, "d", 4))
        .unwrap()
        .unwrap();
    writer.connect(server.addr, None).await;
    writer.subscribe(document).await;
    assert!(
        writer.pump_until(WAIT, |c| c.outbox_len() == 0).await,
        "{kind}: outbox acked"
    );
    assert!(
        watcher
            .pump_until(WAIT, |c| keys(kind, &c.replica.json(document).unwrap())
                == 4
                && c.acks.len() == 4)
            .await,
        "{kind}: the watcher sees every edit"
    );
    watcher.pump_for(Duration::from_millis(100)).await;
    assert_eq!(
        server.committed(),
        4,
        "{kind}: each change committed exactly once"
    );
    assert_eq!(
        watcher.acks.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(
        writer.replica.json(document).unwrap(),
        watcher.replica.json(document).unwrap()
    );
    assert_eq!(
        writer.replica.change_status(document, last).unwrap(),
        ChangeStatus::Confirmed { seq: 4 }
    );
    drop(writer);
    let mut reopened = Client::new(
        SqliteStorage::open(&db).unwrap(),
        1,
        replica_config(1 << 20),
    );
    assert_eq!(
        reopened.replica.change_status(document, last).unwrap(),
        ChangeStatus::Confirmed { seq: 4 },
        "{kind}: statuses survive a restart"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_returning_client_learns_the_fate_of_its_outbox_automerge() {
    reconnect_acks_outbox(DocKind::Automerge).await;
}

#[tokio::test]
async fn a_returning_client_learns_the_fate_of_its_outbox_yrs() {
    reconnect_acks_outbox(DocKind::Yrs).await;
}

#[tokio::test]
async fn bad_frames_close_only_their_connection_and_large_updates_travel_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), false);
    config.max_frame_bytes = 16 << 10;
    config.max_message_bytes = 1 << 20;
    let server = Server::start(config).await;
    let document = doc(20);
    let mut clients = Vec::new();
    for id in [1, 2] {
        let mut client = Client::new(MemoryStorage::new(), id, replica_config(16 << 10));
        client.replica.create(document, DocKind::Yrs).unwrap();
        client.connect(server.addr, None).await;
        client.subscribe(document).await;
        assert!(client.pump_until(WAIT, |c| c.is_subscribed(document)).await);
        clients.push(client);
    }
    let hello = Message::Hello {
        protocol_version: PROTOCOL_VERSION,
        replica: ReplicaId::from_bytes([9; 16]),
        token: None,
    };
    // Garbage after hello.
    let mut bad = connect_ws(server.addr).await;
    send(&mut bad, &hello).await;
    futures_util::SinkExt::send(
        &mut bad,
        tokio_tungstenite::tungstenite::Message::Binary(vec![0xee, 1, 2].into()),
    )
    .await
    .unwrap();
    let (messages, closed) = read_all(&mut bad, WAIT).await;
    assert_eq!(error_codes(&messages), vec![ErrorCode::MalformedFrame]);
    assert!(closed);
    // A truncated message.
    let mut truncated = connect_ws(server.addr).await;
    let bytes = accord_engine::protocol::encode(&hello);
    futures_util::SinkExt::send(
        &mut truncated,
        tokio_tungstenite::tungstenite::Message::Binary(bytes[..bytes.len() - 3].to_vec().into()),
    )
    .await
    .unwrap();
    let (messages, closed) = read_all(&mut truncated, WAIT).await;
    assert_eq!(error_codes(&messages), vec![ErrorCode::MalformedFrame]);
    assert!(closed);
    // An oversized frame.
    let mut big = connect_ws(server.addr).await;
    send(&mut big, &hello).await;
    let oversized = Message::Sync {
        document,
        payload: accord_engine::protocol::SyncPayload::YrsUpdate(vec![0; 20 << 10]),
    };
    send(&mut big, &oversized).await;
    let (messages, closed) = read_all(&mut big, WAIT).await;
    assert_eq!(error_codes(&messages), vec![ErrorCode::MessageTooLarge]);
    assert!(closed);
    // A message before hello, and a wrong protocol version.
    let mut early = connect_ws(server.addr).await;
    send(&mut early, &Message::Unsubscribe { document }).await;
    let (messages, _) = read_all(&mut early, WAIT).await;
    assert_eq!(error_codes(&messages), vec![ErrorCode::ProtocolViolation]);
    let mut old = connect_ws(server.addr).await;
    send(
        &mut old,
        &Message::Hello {
            protocol_version: 99,
            replica: ReplicaId::from_bytes([9; 16]),
            token: None,
        },
    )
    .await;
    let (messages, _) = read_all(&mut old, WAIT).await;
    assert_eq!(error_codes(&messages), vec![ErrorCode::UnsupportedVersion]);
    // The others keep working, and a 100 KB update crosses 16 KB frames both ways.
    let large = "x".repeat(100 << 10);
    let ops = vec![Op::Put {
        path: Path::keys(["m", "large"]),
        value: json!(large),
    }];
    clients[0].replica.change(document, &ops).unwrap();
    assert!(clients[0].pump_until(WAIT, |c| c.outbox_len() == 0).await);
    assert!(
        clients[1]
            .pump_until(WAIT, |c| c.replica.json(document).unwrap()["m"]["large"]
                == json!(large))
            .await
    );
    assert!(clients.iter().all(|c| c.peer_errors().is_empty()));
    assert!(server.metrics.errors(ErrorCode::MalformedFrame) >= 2);
    server.stop().await;
}

#[tokio::test]
async fn tokens_are_checked_and_read_only_writes_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), true)).await;
    let hello = |token: Option<String>| Message::Hello {
        protocol_version: PROTOCOL_VERSION,
        replica: ReplicaId::from_bytes([9; 16]),
        token,
    };
    let any = Scope::Prefix(String::new());
    // No token, a bad signature, an expired token.
    for (token, code) in [
        (None, ErrorCode::Unauthorized),
        (
            Some(mint(
                b"wrong",
                &Claims {
                    scope: any.clone(),
                    rights: Rights::Write,
                    exp: unix_now() + 60,
                },
            )),
            ErrorCode::Unauthorized,
        ),
        (
            Some(mint(
                SECRET,
                &Claims {
                    scope: any.clone(),
                    rights: Rights::Write,
                    exp: unix_now() - 1,
                },
            )),
            ErrorCode::TokenExpired,
        ),
    ] {
        let mut ws = connect_ws(server.addr).await;
        send(&mut ws, &hello(token)).await;
        let (messages, closed) = read_all(&mut ws, WAIT).await;
        assert_eq!(error_codes(&messages), vec![code]);
        assert!(closed);
    }
    for kind in [DocKind::Automerge, DocKind::Yrs] {
        let document = doc(30 + kind.code());
        let other = doc(40 + kind.code());
        // A token for another document is refused for this one; the connection stays usable.
        let mut writer = Client::new(MemoryStorage::new(), 1, replica_config(1 << 20));
        writer.replica.create(document, kind).unwrap();
        writer.replica.create(other, kind).unwrap();
        writer
            .connect(
                server.addr,
                Some(token(Scope::Document(other), Rights::Write, 60)),
            )
            .await;
        writer.subscribe(document).await;
        writer.subscribe(other).await;
        assert!(writer.pump_until(WAIT, |c| c.is_subscribed(other)).await);
        assert_eq!(writer.peer_errors(), vec![ErrorCode::Forbidden]);
        writer.drop_connection();
        // A read-only reader of an unknown document is told it does not exist.
        let mut reader = Client::new(MemoryStorage::new(), 2, replica_config(1 << 20));
        reader.replica.create(document, kind).unwrap();
        reader
            .connect(
                server.addr,
                Some(token(Scope::Document(document), Rights::Read, 60)),
            )
            .await;
        reader.subscribe(document).await;
        assert!(
            reader
                .pump_until(WAIT, |c| !c.peer_errors().is_empty())
                .await
        );
        assert_eq!(reader.peer_errors(), vec![ErrorCode::UnknownDocument]);
        reader.drop_connection();
        // A writer creates it and edits; the reader sees the edit and its own write is refused.
        writer
            .connect(
                server.addr,
                Some(token(Scope::Document(document), Rights::Write, 60)),
            )
            .await;
        writer.subscribe(document).await;
        writer
            .replica
            .change(document, &edit(kind, "w", 1))
            .unwrap();
        assert!(writer.pump_until(WAIT, |c| c.outbox_len() == 0).await);
        let committed = server.committed();
        reader
            .connect(
                server.addr,
                Some(token(Scope::Document(document), Rights::Read, 60)),
            )
            .await;
        reader.events.clear();
        reader.subscribe(document).await;
        assert!(
            reader
                .pump_until(WAIT, |c| keys(kind, &c.replica.json(document).unwrap())
                    == 1)
                .await
        );
        reader
            .replica
            .change(document, &edit(kind, "r", 2))
            .unwrap();
        assert!(
            reader
                .pump_until(WAIT, |c| c.events.iter().any(|e| matches!(
                    e,
                    Event::Rejected {
                        code: ErrorCode::Forbidden,
                        ..
                    }
                )))
                .await,
            "{kind}: read-only write rejected"
        );
        writer.pump_for(Duration::from_millis(200)).await;
        assert_eq!(
            server.committed(),
            committed,
            "{kind}: nothing committed for the reader"
        );
        assert_eq!(keys(kind, &writer.replica.json(document).unwrap()), 1);
        assert_eq!(
            reader.outbox_len(),
            0,
            "{kind}: {:?} outbox {:?}",
            reader.events,
            reader
                .replica
                .outbox()
                .map(|e| e.change)
                .collect::<Vec<_>>()
        );
    }
    // A token that expires during the connection ends it.
    let document = doc(50);
    let mut client = Client::new(MemoryStorage::new(), 3, replica_config(1 << 20));
    client.replica.create(document, DocKind::Yrs).unwrap();
    client
        .connect(
            server.addr,
            Some(token(Scope::Document(document), Rights::Write, 2)),
        )
        .await;
    client.subscribe(document).await;
    assert!(client.pump_until(WAIT, |c| c.is_subscribed(document)).await);
    assert!(
        client
            .pump_until(Duration::from_secs(5), |c| c.closed)
            .await
    );
    assert_eq!(client.peer_errors(), vec![ErrorCode::TokenExpired]);
    server.stop().await;
}

#[tokio::test]
async fn data_survives_restart_compaction_and_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), false);
    config.compact_every = 7;
    config.idle_evict = Duration::from_millis(200);
    for kind in [DocKind::Automerge, DocKind::Yrs] {
        let document = doc(60 + kind.code());
        let server = Server::start(config.clone()).await;
        let mut writer = Client::new(MemoryStorage::new(), 1, replica_config(1 << 20));
        writer.replica.create(document, kind).unwrap();
        writer.connect(server.addr, None).await;
        writer.subscribe(document).await;
        for i in 0..20 {
            writer
                .replica
                .change(document, &edit(kind, &format!("k{i}"), i))
                .unwrap();
            writer.pump_for(Duration::from_millis(2)).await;
        }
        assert!(writer.pump_until(WAIT, |c| c.outbox_len() == 0).await);
        let expected = writer.replica.json(document).unwrap();
        // Idle eviction: the document leaves memory and comes back intact.
        writer.drop_connection();
        let deadline = tokio::time::Instant::now() + WAIT;
        while server.loaded() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(server.loaded(), 0, "{kind}: evicted");
        let mut again = Client::new(MemoryStorage::new(), 2, replica_config(1 << 20));
        again.replica.create(document, kind).unwrap();
        again.connect(server.addr, None).await;
        again.subscribe(document).await;
        assert!(
            again
                .pump_until(WAIT, |c| c.replica.json(document).unwrap() == expected)
                .await
        );
        server.stop().await;
        // A new server on the same data directory has everything, with the same head.
        let server = Server::start(config.clone()).await;
        let mut fresh = Client::new(MemoryStorage::new(), 3, replica_config(1 << 20));
        fresh.replica.create(document, kind).unwrap();
        fresh.connect(server.addr, None).await;
        fresh.subscribe(document).await;
        assert!(
            fresh
                .pump_until(WAIT, |c| c.replica.json(document).unwrap() == expected)
                .await,
            "{kind}"
        );
        let head = fresh.events.iter().find_map(|e| match e {
            Event::Subscribed { head_seq, .. } => Some(*head_seq),
            _ => None,
        });
        assert_eq!(head, Some(20));
        fresh
            .replica
            .change(document, &edit(kind, "after", 1))
            .unwrap();
        assert!(fresh.pump_until(WAIT, |c| c.outbox_len() == 0).await);
        assert_eq!(fresh.acks.keys().last(), Some(&21));
        server.stop().await;
    }
}

#[tokio::test]
async fn limits_slow_consumer_connections_and_documents() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), false);
    config.outbound_queue = 4;
    config.max_connections = 3;
    config.max_documents_per_connection = 1;
    let server = Server::start(config).await;
    let document = doc(70);
    let mut writer = Client::new(MemoryStorage::new(), 1, replica_config(1 << 20));
    writer.replica.create(document, DocKind::Yrs).unwrap();
    writer.replica.create(doc(71), DocKind::Yrs).unwrap();
    writer.connect(server.addr, None).await;
    writer.subscribe(document).await;
    writer.subscribe(doc(71)).await;
    assert!(writer.pump_until(WAIT, |c| c.is_subscribed(document)).await);
    assert!(
        writer
            .pump_until(WAIT, |c| !c.peer_errors().is_empty())
            .await
    );
    assert_eq!(writer.peer_errors(), vec![ErrorCode::TooManyDocuments]);
    // A subscriber that never reads.
    let mut slow = connect_ws(server.addr).await;
    subscribe_unread(&mut slow, 9, document).await;
    // The connection limit (writer and slow hold two of three).
    let _third = connect_ws(server.addr).await;
    let mut fourth = connect_ws(server.addr).await;
    let (messages, closed) = read_all(&mut fourth, WAIT).await;
    assert_eq!(error_codes(&messages), vec![ErrorCode::Overloaded]);
    assert!(closed);
    let blob = "y".repeat(64 << 10);
    for i in 0..200 {
        let ops = vec![Op::Put {
            path: Path::keys(["m", &format!("k{i}")]),
            value: json!(blob),
        }];
        writer.replica.change(document, &ops).unwrap();
        writer.pump_for(Duration::from_millis(1)).await;
        if server.metrics.errors(ErrorCode::Overloaded) >= 2 {
            break;
        }
    }
    assert!(
        writer.pump_until(WAIT, |c| c.outbox_len() == 0).await,
        "the writer is not held up"
    );
    assert!(
        server.metrics.errors(ErrorCode::Overloaded) >= 2,
        "the slow subscriber was cut off"
    );
    drop(slow);
    server.stop().await;
}

/// A commit that stalls (here: another connection holds SQLite's write lock) does not hold
/// back the Yrs updates writers send meanwhile: they reach the other writers while it is
/// stalled, at most `max_batch` of them (then the inbox holds the writers back again), and
/// nothing is acknowledged before it is durable. `during` updates are sent during the stall.
async fn updates_during_a_stalled_commit(max_batch: usize, during: usize) {
    let kind = DocKind::Yrs;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), false);
    config.max_batch = max_batch;
    let server = Server::start(config).await;
    let document = doc(40);
    let mut a = Client::new(MemoryStorage::new(), 1, replica_config(1 << 20));
    let mut b = Client::new(MemoryStorage::new(), 2, replica_config(1 << 20));
    a.replica.create(document, kind).unwrap();
    b.replica.create(document, kind).unwrap();
    for client in [&mut a, &mut b] {
        client.connect(server.addr, None).await;
        client.subscribe(document).await;
        assert!(client.pump_until(WAIT, |c| c.is_subscribed(document)).await);
    }
    let b_keys = |c: &mut Client<MemoryStorage>| keys(kind, &c.replica.json(document).unwrap());
    a.replica.change(document, &edit(kind, "first", 1)).unwrap();
    assert!(a.pump_until(WAIT, |c| c.acks.len() == 1).await);
    assert!(b.pump_until(WAIT, |c| b_keys(c) == 1).await);

    // Stall the writer: its next transaction waits for this lock.
    let lock = rusqlite::Connection::open(dir.path().join("accord.db")).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    // The first update goes out before its commit (as always), which then stalls.
    a.replica
        .change(document, &edit(kind, "stalled", 2))
        .unwrap();
    a.pump_for(Duration::from_millis(100)).await;
    // The others come while that commit is stalled.
    for n in 0..during {
        a.replica
            .change(document, &edit(kind, &format!("during{n}"), 3))
            .unwrap();
        a.pump_for(Duration::from_millis(20)).await;
    }
    let relayed = 2 + during.min(max_batch);
    assert!(
        b.pump_until(Duration::from_secs(2), |c| b_keys(c) == relayed)
            .await,
        "updates sent during a stalled commit waited for it: {} of {relayed}",
        b_keys(&mut b)
    );
    b.pump_for(Duration::from_millis(100)).await;
    assert_eq!(
        b_keys(&mut b),
        relayed,
        "more than a batch taken during the stall"
    );
    assert_eq!(
        server
            .metrics
            .yrs_relayed_during_commit
            .load(std::sync::atomic::Ordering::Relaxed),
        during.min(max_batch) as u64
    );
    a.pump_for(Duration::from_millis(50)).await;
    assert_eq!(a.acks.len(), 1, "acknowledged before it was durable");

    lock.execute_batch("ROLLBACK").unwrap();
    let total = 2 + during;
    assert!(
        a.pump_until(WAIT, |c| c.acks.len() == total && c.outbox_len() == 0)
            .await,
        "the stalled changes were not committed after the stall"
    );
    assert_eq!(
        a.acks.keys().copied().collect::<Vec<_>>(),
        (1..=total as u64).collect::<Vec<_>>()
    );
    assert!(b.pump_until(WAIT, |c| b_keys(c) == total).await);
    assert_eq!(server.committed(), total as u64);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yrs_updates_reach_writers_while_a_commit_stalls() {
    updates_during_a_stalled_commit(4_096, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_a_batch_of_updates_is_taken_while_a_commit_stalls() {
    updates_during_a_stalled_commit(2, 5).await;
}

#[tokio::test]
async fn a_forged_automerge_change_is_refused_and_the_document_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), false)).await;
    let document = doc(30);
    let kind = DocKind::Automerge;
    let mut writer = Client::new(MemoryStorage::new(), 1, replica_config(1 << 20));
    writer.replica.create(document, kind).unwrap();
    writer
        .replica
        .change(document, &edit(kind, "before", 1))
        .unwrap();
    writer.connect(server.addr, None).await;
    writer.subscribe(document).await;
    assert!(writer.pump_until(WAIT, |c| c.outbox_len() == 0).await);

    // A raw connection sends a sync message carrying the forged change.
    let mut bad = connect_ws(server.addr).await;
    hello(&mut bad, 9).await;
    send(
        &mut bad,
        &Message::Subscribe {
            document,
            kind,
            since_seq: 0,
        },
    )
    .await;
    send(
        &mut bad,
        &Message::Sync {
            document,
            payload: accord_engine::protocol::SyncPayload::Automerge(
                accord_engine::testing::forged_automerge_sync_message(),
            ),
        },
    )
    .await;
    let (messages, _) = read_all(&mut bad, Duration::from_secs(1)).await;
    assert!(
        error_codes(&messages).contains(&ErrorCode::InvalidChange),
        "the forged change is refused: {messages:?}"
    );

    // The document lives on: the writer's next change is acknowledged, and a new reader gets
    // both changes and nothing of the forged one.
    writer
        .replica
        .change(document, &edit(kind, "after", 2))
        .unwrap();
    assert!(
        writer
            .pump_until(WAIT, |c| c.outbox_len() == 0 && c.acks.len() == 2)
            .await,
        "the writer's change after the forged one is acknowledged"
    );
    let want = json!({"before": 1, "after": 2});
    assert!(
        reads(server.addr, 2, document, &want).await,
        "a reader gets the document without the forged change"
    );
    server.stop().await;

    // And it loads again from the store.
    let server = Server::start(config(dir.path(), false)).await;
    assert!(
        reads(server.addr, 3, document, &want).await,
        "the document loads after a restart"
    );
    server.stop().await;
}

/// Whether a new client (replica `[id; 16]`) that subscribes to the Automerge `document` gets
/// `want`.
async fn reads(
    addr: std::net::SocketAddr,
    id: u8,
    document: DocumentId,
    want: &serde_json::Value,
) -> bool {
    let mut reader = Client::new(MemoryStorage::new(), id, replica_config(1 << 20));
    reader.replica.create(document, DocKind::Automerge).unwrap();
    reader.connect(addr, None).await;
    reader.subscribe(document).await;
    reader
        .pump_until(WAIT, |c| {
            c.replica.json(document).ok().as_ref() == Some(want)
        })
        .await
}
