//! The foreign-protocol endpoints end to end over real sockets: a y-websocket client (yrs
//! speaking the y-protocols wire format) next to an Accord `Replica`, raw automerge-repo CBOR
//! frames, tokens in the query string, and bad input on both endpoints.
//! (The real npm clients are exercised by `tests/node/run.sh`.)

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use accord_engine::storage::MemoryStorage;
use accord_engine::{DocKind, DocumentId, Op, Path};
use accord_server::auth::{Rights, Scope};
use ciborium::Value;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use yrs::sync::{Message as YMessage, SyncMessage};
use yrs::types::ToJson;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Map, ReadTxn, Transact};

const WAIT: Duration = Duration::from_secs(10);

async fn connect(url: String) -> Ws {
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

/// What a raw socket received before it closed (or `within` passed).
struct Received {
    frames: Vec<Vec<u8>>,
    close: Option<(u16, String)>,
    closed: bool,
}

async fn read_until_closed(ws: &mut Ws, within: Duration) -> Received {
    let deadline = Instant::now() + within;
    let mut received = Received {
        frames: Vec::new(),
        close: None,
        closed: false,
    };
    while let Ok(next) = timeout(deadline - Instant::now(), ws.next()).await {
        match next {
            Some(Ok(WsMessage::Binary(bytes))) => received.frames.push(bytes.to_vec()),
            Some(Ok(WsMessage::Close(frame))) => {
                received.close = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                received.closed = true;
                return received;
            }
            Some(Ok(_)) => {}
            None | Some(Err(_)) => {
                received.closed = true;
                return received;
            }
        }
    }
    received
}

/// A y-websocket client: a yrs document synced over `/yjs/{room}` with y-protocols frames.
struct YClient {
    ws: Ws,
    doc: yrs::Doc,
    denied: Vec<String>,
    closed: bool,
    /// Sync-update frames received.
    update_frames: usize,
}

impl YClient {
    async fn connect(addr: SocketAddr, room: &str, token: Option<&str>) -> Self {
        let query = token.map(|t| format!("?token={t}")).unwrap_or_default();
        let mut ws = connect(format!("ws://{addr}/yjs/{room}{query}")).await;
        let doc = yrs::Doc::new();
        let sv = doc.transact().state_vector();
        let step1 = YMessage::Sync(SyncMessage::SyncStep1(sv)).encode_v1();
        ws.send(WsMessage::Binary(step1.into())).await.unwrap();
        YClient {
            ws,
            doc,
            denied: Vec::new(),
            closed: false,
            update_frames: 0,
        }
    }

    /// Sets `keys` one transaction (one update) each and sends the updates in one write.
    async fn set_many(&mut self, keys: impl Iterator<Item = (String, i64)>) -> usize {
        let map = self.doc.get_or_insert_map("root");
        let mut sent = 0;
        for (key, value) in keys {
            let update = {
                let mut txn = self.doc.transact_mut();
                map.insert(&mut txn, key, value);
                txn.encode_update_v1()
            };
            let frame = YMessage::Sync(SyncMessage::Update(update)).encode_v1();
            self.ws.feed(WsMessage::Binary(frame.into())).await.unwrap();
            sent += 1;
        }
        self.ws.flush().await.unwrap();
        sent
    }

    async fn set(&mut self, key: &str, value: i64) {
        let map = self.doc.get_or_insert_map("root");
        let update = {
            let mut txn = self.doc.transact_mut();
            map.insert(&mut txn, key, value);
            txn.encode_update_v1()
        };
        let frame = YMessage::Sync(SyncMessage::Update(update)).encode_v1();
        let _ = self.ws.send(WsMessage::Binary(frame.into())).await;
    }

    fn json(&self) -> serde_json::Value {
        let map = self.doc.get_or_insert_map("root");
        let txn = self.doc.transact();
        serde_json::to_value(map.to_json(&txn)).unwrap()
    }

    async fn handle(&mut self, frame: &[u8]) {
        match YMessage::decode_v1(frame).unwrap() {
            YMessage::Sync(SyncMessage::SyncStep1(sv)) => {
                let update = self.doc.transact().encode_state_as_update_v1(&sv);
                let reply = YMessage::Sync(SyncMessage::SyncStep2(update)).encode_v1();
                let _ = self.ws.send(WsMessage::Binary(reply.into())).await;
            }
            YMessage::Sync(SyncMessage::SyncStep2(update) | SyncMessage::Update(update)) => {
                if frame.get(1) == Some(&2) {
                    // `[0, 2, …]`: an update (not a step 2).
                    self.update_frames += 1;
                }
                let update = yrs::Update::decode_v1(&update).unwrap();
                self.doc.transact_mut().apply_update(update).unwrap();
            }
            YMessage::Auth(Some(reason)) => self.denied.push(reason),
            _ => {}
        }
    }

    async fn pump_until(&mut self, within: Duration, done: impl Fn(&Self) -> bool) -> bool {
        let deadline = Instant::now() + within;
        while !done(self) && !self.closed {
            let Ok(next) = timeout(deadline - Instant::now(), self.ws.next()).await else {
                return done(self);
            };
            match next {
                Some(Ok(WsMessage::Binary(bytes))) => self.handle(&bytes).await,
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => self.closed = true,
                Some(Ok(_)) => {}
            }
        }
        done(self)
    }
}

#[tokio::test]
async fn accord_and_yjs_clients_edit_the_same_document() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), false)).await;
    let document = DocumentId::from_bytes([0x42; 16]);
    let room = document.to_string();

    let mut yjs = YClient::connect(server.addr, &room, None).await;
    yjs.set("fromYjs", 1).await;
    let mut accord = Client::new(MemoryStorage::new(), 1, replica_config(1 << 20));
    accord.replica.create(document, DocKind::Yrs).unwrap();
    accord.connect(server.addr, None).await;
    accord.subscribe(document).await;
    assert!(
        accord
            .pump_until(WAIT, |c| c.replica.json(document).unwrap()["root"]
                ["fromYjs"]
                == 1)
            .await,
        "the Accord client sees the Yjs edit: {}",
        accord.replica.json(document).unwrap()
    );
    accord
        .replica
        .change(
            document,
            &[Op::Put {
                path: Path::keys(["root", "fromAccord"]),
                value: json!(2),
            }],
        )
        .unwrap();
    accord.flush().await;
    assert!(
        yjs.pump_until(WAIT, |y| y.json()["fromAccord"] == 2).await,
        "the Yjs client sees the Accord edit: {}",
        yjs.json()
    );
    // The Accord client's change is acknowledged (committed) like any other.
    assert!(accord.pump_until(WAIT, |c| c.outbox_len() == 0).await);
    // Concurrent edits from both converge.
    yjs.set("both", 3).await;
    accord
        .replica
        .change(
            document,
            &[Op::Put {
                path: Path::keys(["root", "both2"]),
                value: json!(4),
            }],
        )
        .unwrap();
    assert!(
        accord
            .pump_until(WAIT, |c| c.replica.json(document).unwrap()["root"]["both"]
                == 3)
            .await
    );
    assert!(yjs.pump_until(WAIT, |y| y.json()["both2"] == 4).await);
    assert_eq!(
        accord.replica.json(document).unwrap()["root"],
        yjs.json(),
        "both sides hold the same state"
    );
    // Relayed before their commits: the commits follow.
    let deadline = Instant::now() + WAIT;
    while server.committed() < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(server.committed() >= 4, "{} commits", server.committed());
    server.stop().await;
}

/// Updates relayed to a y-websocket client are coalesced: a burst of single-key updates from one
/// client reaches another as a few merged updates (one per group commit, and what a connection
/// takes from its queue in one step), and both hold the same state.
#[tokio::test]
async fn yjs_updates_are_coalesced_and_converge() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), false)).await;
    let room = "coalesce";
    let mut reader = YClient::connect(server.addr, room, None).await;
    let mut writer = YClient::connect(server.addr, room, None).await;
    // Both finish the handshake (the server's step 1 and step 2) before the burst.
    for client in [&mut reader, &mut writer] {
        client
            .pump_until(Duration::from_millis(300), |_| false)
            .await;
    }
    const UPDATES: usize = 400;
    let sent = writer
        .set_many((0..UPDATES).map(|i| (format!("k{}", i % 50), i as i64)))
        .await;
    assert_eq!(sent, UPDATES);
    let expected = writer.json();
    assert!(
        reader.pump_until(WAIT, |y| y.json() == expected).await,
        "the reader converges: {} vs {}",
        reader.json(),
        expected
    );
    assert!(
        reader.update_frames <= UPDATES / 4,
        "{UPDATES} updates arrived in {} frames",
        reader.update_frames
    );
    eprintln!(
        "{UPDATES} updates reached the reader in {} frames",
        reader.update_frames
    );
    // The writer is not sent its own updates back, and whatever it gets changes nothing.
    writer
        .pump_until(Duration::from_millis(200), |_| false)
        .await;
    assert_eq!(writer.json(), expected);
    assert_eq!(server.committed(), UPDATES as u64);
    server.stop().await;
}

/// A room with more subscribers than `GATHER_SUBSCRIBERS` (8): its actor yields before it takes
/// its inbox, so the writers' updates that come in together go out together. Six of twelve
/// clients write at once, round after round; every client ends with every write, and each
/// write is committed once. (Here the 150 updates reach each reader in one frame; without the
/// yield, in two: the first update alone, the rest after its commit.)
#[tokio::test]
async fn a_crowded_yjs_room_with_writers_at_once_converges() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), false)).await;
    const CLIENTS: usize = 12;
    const WRITERS: usize = 6;
    const ROUNDS: usize = 25;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(YClient::connect(server.addr, "crowd", None).await);
    }
    for client in clients.iter_mut() {
        client
            .pump_until(Duration::from_millis(100), |_| false)
            .await;
    }
    for round in 0..ROUNDS {
        for (w, client) in clients.iter_mut().take(WRITERS).enumerate() {
            client
                .set_many(std::iter::once((format!("w{w}-{round}"), round as i64)))
                .await;
        }
    }
    let keys = |y: &YClient| y.json().as_object().map_or(0, |m| m.len());
    for (i, client) in clients.iter_mut().enumerate() {
        assert!(
            client
                .pump_until(WAIT, |y| keys(y) == WRITERS * ROUNDS)
                .await,
            "client {i} holds {} of {} keys",
            keys(client),
            WRITERS * ROUNDS
        );
    }
    let first = clients[0].json();
    assert!(clients.iter().all(|c| c.json() == first));
    // (Writable subscribers hear of changes before their commit: wait for it.)
    let deadline = Instant::now() + WAIT;
    while server.committed() < (WRITERS * ROUNDS) as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.committed(), (WRITERS * ROUNDS) as u64);
    for (i, reader) in clients.iter().enumerate().skip(WRITERS) {
        assert!(
            reader.update_frames <= WRITERS * ROUNDS / 4,
            "reader {i}: {} updates in {} frames",
            WRITERS * ROUNDS,
            reader.update_frames
        );
    }
    let frames: usize = clients.iter().skip(WRITERS).map(|c| c.update_frames).sum();
    eprintln!(
        "{} updates reached each of {} readers in {:.1} frames on average",
        WRITERS * ROUNDS,
        CLIENTS - WRITERS,
        frames as f64 / (CLIENTS - WRITERS) as f64
    );
    server.stop().await;
}

#[tokio::test]
async fn yjs_bad_input_closes_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), false);
    cfg.max_message_bytes = 64 << 10;
    let server = Server::start(cfg).await;
    let mut good = YClient::connect(server.addr, "shared-room", None).await;
    good.set("a", 1).await;
    let cases: Vec<(WsMessage, u16, &str)> = vec![
        (
            WsMessage::Binary(vec![0, 9, 0].into()),
            4001,
            "sync message type",
        ),
        (
            WsMessage::Binary(vec![7, 0].into()),
            4001,
            "unknown y-websocket message type",
        ),
        (
            WsMessage::Binary(vec![0, 0, 50, 1].into()),
            4001,
            "past the end",
        ),
        (
            WsMessage::Binary(vec![0xff; 12].into()),
            4001,
            "over 64 bits",
        ),
        // An update that is not a Yrs update: the document refuses it.
        (
            WsMessage::Binary(vec![0, 2, 3, 0xff, 0xff, 0xff].into()),
            4012,
            "",
        ),
        // Awareness whose state is not JSON.
        (
            WsMessage::Binary(vec![1, 5, 1, 1, 1, 1, b'{'].into()),
            4001,
            "not JSON",
        ),
        (WsMessage::Text("hello".into()), 4001, "text frames"),
        (
            WsMessage::Binary(vec![0; 70 << 10].into()),
            4002,
            "over the limit",
        ),
    ];
    for (frame, code, reason) in cases {
        let mut bad = connect(format!("ws://{}/yjs/shared-room", server.addr)).await;
        bad.send(frame).await.unwrap();
        let received = read_until_closed(&mut bad, WAIT).await;
        assert!(received.closed, "closed after {code}");
        let (got, text) = received.close.expect("a close frame with a reason");
        assert_eq!(got, code, "{text}");
        assert!(text.contains(reason), "{text:?} should say {reason:?}");
    }
    // The good connection is untouched and still syncs.
    good.set("b", 2).await;
    let mut other = YClient::connect(server.addr, "shared-room", None).await;
    assert!(
        other
            .pump_until(WAIT, |y| y.json() == json!({"a": 1, "b": 2}))
            .await,
        "{}",
        other.json()
    );
    assert!(!good.closed);
    good.set("c", 3).await;
    assert!(other.pump_until(WAIT, |y| y.json()["c"] == 3).await);
    server.stop().await;
}

#[tokio::test]
async fn yjs_tokens_travel_in_the_query_string() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), true)).await;
    let document = DocumentId::from_bytes([0x17; 16]);
    let room = document.to_string();
    let doc_token = |rights| token(Scope::Document(document), rights, 600);
    // No token: permission denied, then closed with 4004 (Unauthorized).
    let mut anonymous = connect(format!("ws://{}/yjs/{room}", server.addr)).await;
    let received = read_until_closed(&mut anonymous, WAIT).await;
    assert_eq!(received.close.as_ref().map(|c| c.0), Some(4004));
    assert!(matches!(
        YMessage::decode_v1(&received.frames[0]).unwrap(),
        YMessage::Auth(Some(_))
    ));
    // A token for another document: 4006 (Forbidden).
    let mut elsewhere = connect(format!(
        "ws://{}/yjs/other-room?token={}",
        server.addr,
        doc_token(Rights::Write)
    ))
    .await;
    let received = read_until_closed(&mut elsewhere, WAIT).await;
    assert_eq!(received.close.map(|c| c.0), Some(4006));
    // A read-only token on a room that does not exist yet: refused (it cannot create it).
    let mut early = connect(format!(
        "ws://{}/yjs/{room}?token={}",
        server.addr,
        doc_token(Rights::Read)
    ))
    .await;
    let received = read_until_closed(&mut early, WAIT).await;
    assert_eq!(received.close.map(|c| c.0), Some(4007));
    // A write token creates and writes.
    let write = doc_token(Rights::Write);
    let mut writer = YClient::connect(server.addr, &room, Some(&write)).await;
    writer.set("w", 1).await;
    let read = doc_token(Rights::Read);
    let mut reader = YClient::connect(server.addr, &room, Some(&read)).await;
    assert!(reader.pump_until(WAIT, |y| y.json()["w"] == 1).await);
    // The reader's writes are refused (once told) and never reach anyone.
    reader.set("r", 2).await;
    assert!(reader.pump_until(WAIT, |y| !y.denied.is_empty()).await);
    writer.set("w2", 3).await;
    assert!(writer.pump_until(WAIT, |y| y.json()["w2"] == 3).await);
    let mut late = YClient::connect(server.addr, &room, Some(&write)).await;
    assert!(late.pump_until(WAIT, |y| y.json()["w2"] == 3).await);
    assert_eq!(late.json(), json!({"w": 1, "w2": 3}));
    assert!(!reader.closed, "a refused write does not close the reader");
    // A token that expires during the connection ends it: 4005 (TokenExpired), at its expiry
    // (tokens count whole seconds: 1 to 2 seconds after it opened), not before.
    let brief = token(Scope::Document(document), Rights::Write, 2);
    let mut expiring = connect(format!("ws://{}/yjs/{room}?token={brief}", server.addr)).await;
    let opened = std::time::Instant::now();
    let received = read_until_closed(&mut expiring, Duration::from_secs(5)).await;
    assert_eq!(received.close.map(|c| c.0), Some(4005));
    assert!(
        opened.elapsed() >= Duration::from_millis(500),
        "{:?}",
        opened.elapsed()
    );
    server.stop().await;
}

/// A Yrs change reaches the writable subscribers while its commit still waits on the disk; it
/// is acknowledged to its author, and sent to read-only subscribers, only once it is durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yjs_changes_reach_writers_before_their_commit_and_are_acknowledged_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), true)).await;
    let document = DocumentId::from_bytes([0x18; 16]);
    let room = document.to_string();
    let doc_token = |rights| token(Scope::Document(document), rights, 600);
    let put = |key: &str, value: i64| Op::Put {
        path: Path::keys(["root", key]),
        value: json!(value),
    };
    let mut author = Client::new(MemoryStorage::new(), 1, replica_config(1 << 20));
    author.replica.create(document, DocKind::Yrs).unwrap();
    author
        .connect(server.addr, Some(doc_token(Rights::Write)))
        .await;
    author.subscribe(document).await;
    author.replica.change(document, &[put("a", 1)]).unwrap();
    assert!(author.pump_until(WAIT, |c| c.outbox_len() == 0).await);
    let mut writer = YClient::connect(server.addr, &room, Some(&doc_token(Rights::Write))).await;
    let mut reader = YClient::connect(server.addr, &room, Some(&doc_token(Rights::Read))).await;
    assert!(writer.pump_until(WAIT, |y| y.json()["a"] == 1).await);
    assert!(reader.pump_until(WAIT, |y| y.json()["a"] == 1).await);

    // Another connection holds SQLite's write lock: the server's commits wait for it.
    let lock = rusqlite::Connection::open(dir.path().join("accord.db")).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let committed = server.committed();
    author.replica.change(document, &[put("b", 2)]).unwrap();
    author.flush().await;
    assert!(
        writer.pump_until(WAIT, |y| y.json()["b"] == 2).await,
        "a writable subscriber hears of the change before its commit: {}",
        writer.json()
    );
    author.pump_for(Duration::from_millis(300)).await;
    assert_eq!(
        author.outbox_len(),
        1,
        "not acknowledged before it is durable"
    );
    assert_eq!(server.committed(), committed, "the commit is still waiting");
    assert!(
        !reader
            .pump_until(Duration::from_millis(300), |y| y.json()["b"] == 2)
            .await,
        "a read-only subscriber hears of it only once it is durable"
    );

    lock.execute_batch("ROLLBACK").unwrap();
    assert!(author.pump_until(WAIT, |c| c.outbox_len() == 0).await);
    assert_eq!(server.committed(), committed + 1);
    assert!(reader.pump_until(WAIT, |y| y.json()["b"] == 2).await);
    assert_eq!(reader.json(), writer.json());
    server.stop().await;
}

fn cbor(fields: Vec<(&str, Value)>) -> Vec<u8> {
    let map = Value::Map(
        fields
            .into_iter()
            .map(|(k, v)| (Value::Text(k.into()), v))
            .collect(),
    );
    let mut out = Vec::new();
    ciborium::into_writer(&map, &mut out).unwrap();
    out
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

fn field<'a>(message: &'a Value, key: &str) -> Option<&'a Value> {
    message
        .as_map()?
        .iter()
        .find(|(k, _)| k.as_text() == Some(key))
        .map(|(_, v)| v)
}

fn kind(message: &Value) -> &str {
    field(message, "type")
        .and_then(Value::as_text)
        .unwrap_or("")
}

fn join(peer: &str, version: &str) -> WsMessage {
    WsMessage::Binary(
        cbor(vec![
            ("type", text("join")),
            ("senderId", text(peer)),
            ("peerMetadata", Value::Map(vec![])),
            (
                "supportedProtocolVersions",
                Value::Array(vec![text(version)]),
            ),
        ])
        .into(),
    )
}

async fn next_cbor(ws: &mut Ws) -> Value {
    loop {
        match timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap() {
            WsMessage::Binary(bytes) => return ciborium::from_reader(&bytes[..]).unwrap(),
            WsMessage::Close(frame) => panic!("closed: {frame:?}"),
            _ => {}
        }
    }
}

/// A socket to the automerge-repo endpoint at `url`, joined as `peer` (the server answered).
async fn am_joined(url: String, peer: &str) -> Ws {
    let mut ws = connect(url).await;
    ws.send(join(peer, "1")).await.unwrap();
    assert_eq!(kind(&next_cbor(&mut ws).await), "peer");
    ws
}

fn am_id(document: DocumentId) -> String {
    bs58::encode(document.as_bytes()).with_check().into_string()
}

#[tokio::test]
async fn automerge_repo_protocol_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), false)).await;
    let url = format!("ws://{}/automerge", server.addr);

    // Handshake.
    let mut good = connect(url.clone()).await;
    good.send(join("good-peer", "1")).await.unwrap();
    let peer = next_cbor(&mut good).await;
    assert_eq!(kind(&peer), "peer");
    assert_eq!(
        field(&peer, "selectedProtocolVersion").and_then(Value::as_text),
        Some("1")
    );
    assert_eq!(
        field(&peer, "targetId").and_then(Value::as_text),
        Some("good-peer")
    );

    // A request for a document nobody has: doc-unavailable, and it is not created.
    let missing = DocumentId::from_bytes([0x55; 16]);
    let hello = empty_sync_message();
    let request = |document: DocumentId, kind: &str, data: Vec<u8>| {
        WsMessage::Binary(
            cbor(vec![
                ("type", text(kind)),
                ("senderId", text("good-peer")),
                ("targetId", field(&peer, "senderId").unwrap().clone()),
                ("documentId", text(&am_id(document))),
                ("data", Value::Bytes(data)),
            ])
            .into(),
        )
    };
    good.send(request(missing, "request", hello.clone()))
        .await
        .unwrap();
    let answer = next_cbor(&mut good).await;
    assert_eq!(kind(&answer), "doc-unavailable");
    assert_eq!(
        field(&answer, "documentId").and_then(Value::as_text),
        Some(am_id(missing).as_str())
    );
    // A sync for a new document creates it (the token allows writing) and is answered.
    let created = DocumentId::from_bytes([0x56; 16]);
    good.send(request(created, "sync", hello)).await.unwrap();
    let answer = next_cbor(&mut good).await;
    assert_eq!(kind(&answer), "sync", "{answer:?}");

    // Bad input: an error message and a close, for that connection only.
    let cases: Vec<(Vec<WsMessage>, u16, &str)> = vec![
        (
            vec![WsMessage::Binary(vec![0xff, 0x00, 0x13].into())],
            4001,
            "not an automerge-repo message",
        ),
        (
            vec![WsMessage::Binary(cbor(vec![("no", text("type"))]).into())],
            4001,
            "not an automerge-repo message",
        ),
        (
            vec![request(created, "sync", vec![1, 2, 3])],
            4010,
            "first message must be join",
        ),
        (vec![join("p2", "2")], 4003, "unsupported protocol version"),
        (
            vec![
                join("p3", "1"),
                WsMessage::Binary(
                    cbor(vec![
                        ("type", text("sync")),
                        ("senderId", text("p3")),
                        ("documentId", text("not-bs58check")),
                        ("data", Value::Bytes(vec![1])),
                    ])
                    .into(),
                ),
            ],
            4001,
            "bs58check",
        ),
        (
            vec![
                join("p4", "1"),
                request(created, "sync", vec![0x42, 1, 2, 3]),
            ],
            4012,
            "",
        ),
        (vec![WsMessage::Text("{}".into())], 4001, "text frames"),
    ];
    for (frames, code, reason) in cases {
        let mut bad = connect(url.clone()).await;
        for frame in frames {
            bad.send(frame).await.unwrap();
        }
        let received = read_until_closed(&mut bad, WAIT).await;
        assert!(received.closed);
        let (got, text_reason) = received.close.expect("a close frame");
        assert_eq!(got, code, "{text_reason}");
        assert!(
            text_reason.contains(reason),
            "{text_reason:?} should say {reason:?}"
        );
        let last: Value =
            ciborium::from_reader(&received.frames.last().expect("an error message")[..]).unwrap();
        assert_eq!(kind(&last), "error");
        if code == 4003 {
            assert_eq!(
                field(&last, "message").and_then(Value::as_text),
                Some("unsupported protocol version")
            );
        }
    }

    // The good connection still works: ephemeral messages are relayed between peers of the
    // document, once.
    let mut other = am_joined(url.clone(), "other-peer").await;
    let hello = empty_sync_message();
    other
        .send(WsMessage::Binary(
            cbor(vec![
                ("type", text("request")),
                ("senderId", text("other-peer")),
                ("documentId", text(&am_id(created))),
                ("data", Value::Bytes(hello)),
            ])
            .into(),
        ))
        .await
        .unwrap();
    assert_eq!(kind(&next_cbor(&mut other).await), "sync");
    let ephemeral = |count: u64| {
        WsMessage::Binary(
            cbor(vec![
                ("type", text("ephemeral")),
                ("senderId", text("good-peer")),
                ("sessionId", text("s1")),
                ("count", Value::Integer(count.into())),
                ("documentId", text(&am_id(created))),
                ("data", Value::Bytes(vec![0xa0])),
            ])
            .into(),
        )
    };
    good.send(ephemeral(1)).await.unwrap();
    good.send(ephemeral(1)).await.unwrap(); // a repeat: dropped
    good.send(ephemeral(2)).await.unwrap();
    let mut counts = Vec::new();
    while counts.len() < 2 {
        let message = next_cbor(&mut other).await;
        if kind(&message) == "ephemeral" {
            assert_eq!(
                field(&message, "senderId").and_then(Value::as_text),
                Some("good-peer")
            );
            assert_eq!(
                field(&message, "targetId").and_then(Value::as_text),
                Some("other-peer")
            );
            counts.push(
                field(&message, "count")
                    .and_then(Value::as_integer)
                    .map(u64::try_from),
            );
        }
    }
    assert_eq!(counts, vec![Some(Ok(1)), Some(Ok(2))]);
    let extra = read_until_closed(&mut other, Duration::from_millis(300)).await;
    assert!(
        extra.frames.iter().all(|f| {
            let v: Value = ciborium::from_reader(&f[..]).unwrap();
            kind(&v) != "ephemeral"
        }),
        "the repeat was not relayed"
    );
    // leave: closed quietly.
    good.send(WsMessage::Binary(
        cbor(vec![
            ("type", text("leave")),
            ("senderId", text("good-peer")),
        ])
        .into(),
    ))
    .await
    .unwrap();
    let received = read_until_closed(&mut good, WAIT).await;
    assert_eq!(received.close.map(|c| c.0), Some(1000));
    server.stop().await;
}

/// The first sync message of a peer that has nothing.
fn empty_sync_message() -> Vec<u8> {
    use automerge::sync::SyncDoc;
    let doc = automerge::Automerge::new();
    let mut state = automerge::sync::State::new();
    doc.generate_sync_message(&mut state).unwrap().encode()
}

/// Exchanges Automerge sync messages for `document` with the server over a joined
/// automerge-repo socket until neither side has anything to say; returns the non-sync
/// messages seen (their types).
async fn am_sync(
    ws: &mut Ws,
    peer: &str,
    document: DocumentId,
    doc: &mut automerge::Automerge,
    state: &mut automerge::sync::State,
) -> Vec<String> {
    am_sync_rounds(ws, peer, document, doc, state, None).await
}

/// [`am_sync`], giving up after `rounds` exchanges when given (else failing after 50).
async fn am_sync_rounds(
    ws: &mut Ws,
    peer: &str,
    document: DocumentId,
    doc: &mut automerge::Automerge,
    state: &mut automerge::sync::State,
    rounds: Option<usize>,
) -> Vec<String> {
    use automerge::sync::SyncDoc;
    let mut others = Vec::new();
    for round in 0.. {
        if rounds == Some(round) {
            return others;
        }
        assert!(round < 50, "the sync exchange does not settle");
        am_send(ws, peer, document, doc, state).await;
        let Ok(Some(Ok(next))) = timeout(Duration::from_millis(300), ws.next()).await else {
            return others;
        };
        let WsMessage::Binary(bytes) = next else {
            continue;
        };
        let message: Value = ciborium::from_reader(&bytes[..]).unwrap();
        if kind(&message) == "sync" {
            let data = field(&message, "data").and_then(Value::as_bytes).unwrap();
            let decoded = automerge::sync::Message::decode(data).unwrap();
            doc.receive_sync_message(state, decoded).unwrap();
        } else {
            others.push(kind(&message).to_owned());
        }
    }
    others
}

#[tokio::test]
async fn automerge_repo_tokens_and_read_only() {
    use automerge::transaction::Transactable;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), true)).await;
    let document = DocumentId::from_bytes([0x61; 16]);
    let doc_token = |rights| token(Scope::Document(document), rights, 600);
    let url = |token: &str| format!("ws://{}/automerge?token={token}", server.addr);
    // No token: an error message and 4004 (Unauthorized).
    let mut anonymous = connect(format!("ws://{}/automerge", server.addr)).await;
    let received = read_until_closed(&mut anonymous, WAIT).await;
    assert_eq!(received.close.map(|c| c.0), Some(4004));
    let error: Value = ciborium::from_reader(&received.frames[0][..]).unwrap();
    assert_eq!(kind(&error), "error");

    // Read-only on a missing document: unavailable (it cannot create it).
    let mut reader = am_joined(url(&doc_token(Rights::Read)), "reader").await;
    let mut theirs = automerge::Automerge::new();
    theirs
        .transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.put(automerge::ROOT, "by", "reader")?;
            Ok(())
        })
        .unwrap();
    let mut reader_state = automerge::sync::State::new();
    let others = am_sync(
        &mut reader,
        "reader",
        document,
        &mut theirs,
        &mut reader_state,
    )
    .await;
    assert!(others.contains(&"doc-unavailable".to_owned()), "{others:?}");
    assert_eq!(server.committed(), 0);

    // A writer creates it.
    let mut writer = am_joined(url(&doc_token(Rights::Write)), "writer").await;
    let mut ours = automerge::Automerge::new();
    ours.transact::<_, _, automerge::AutomergeError>(|tx| {
        tx.put(automerge::ROOT, "by", "writer")?;
        Ok(())
    })
    .unwrap();
    let mut writer_state = automerge::sync::State::new();
    am_sync(
        &mut writer,
        "writer",
        document,
        &mut ours,
        &mut writer_state,
    )
    .await;
    assert_eq!(server.committed(), 1);

    // The reader syncs it, but its own change is not committed (and its connection stays).
    let mut reader_doc = automerge::Automerge::new();
    let mut state = automerge::sync::State::new();
    let others = am_sync(&mut reader, "reader", document, &mut reader_doc, &mut state).await;
    assert!(others.is_empty(), "{others:?}");
    let by = |doc: &automerge::Automerge| {
        use automerge::ReadDoc;
        doc.get(automerge::ROOT, "by")
            .unwrap()
            .map(|(v, _)| v.to_string())
    };
    assert_eq!(by(&reader_doc).as_deref(), Some("\"writer\""));
    reader_doc
        .transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.put(automerge::ROOT, "reader", true)?;
            Ok(())
        })
        .unwrap();
    // The exchange settles (the server's read-only sync state stops asking for the refused
    // change; `am_sync_rounds` fails past 50 rounds).
    am_sync_rounds(
        &mut reader,
        "reader",
        document,
        &mut reader_doc,
        &mut state,
        None,
    )
    .await;
    assert_eq!(
        server.committed(),
        1,
        "a read-only token's change is not committed"
    );
    server.stop().await;
}

/// Joins as a fresh automerge-repo peer that has nothing, asks for `document`, and checks the
/// first answer is the whole document in one V2 message (one chunk: the compacted document);
/// then says what it has and checks the server has nothing more to send. Returns the socket
/// and what it loaded.
async fn fresh_load(
    url: &str,
    peer: &str,
    document: DocumentId,
) -> (Ws, automerge::Automerge, automerge::sync::State) {
    use automerge::sync::SyncDoc;
    let mut ws = am_joined(url.to_owned(), peer).await;
    let mut doc = automerge::Automerge::new();
    let mut state = automerge::sync::State::new();
    let hello = doc.generate_sync_message(&mut state).unwrap().encode();
    let request = cbor(vec![
        ("type", text("request")),
        ("senderId", text(peer)),
        ("documentId", text(&am_id(document))),
        ("data", Value::Bytes(hello)),
    ]);
    ws.send(WsMessage::Binary(request.into())).await.unwrap();
    let answer = next_cbor(&mut ws).await;
    assert_eq!(kind(&answer), "sync", "{answer:?}");
    let data = field(&answer, "data").and_then(Value::as_bytes).unwrap();
    let message = automerge::sync::Message::decode(data).unwrap();
    assert_eq!(message.version, automerge::sync::MessageVersion::V2);
    assert_eq!(message.changes.len(), 1, "one chunk");
    let chunk = message.changes.iter().next().unwrap().to_vec();
    assert_eq!(chunk[8], 0, "a document chunk, not changes");
    let heads = message.heads.clone();
    doc.receive_sync_message(&mut state, message).unwrap();
    assert_eq!(doc.get_heads(), heads, "it holds the server's heads");
    assert_eq!(
        automerge::Automerge::load(&chunk).unwrap().get_heads(),
        heads
    );
    // It answers with what it now has; the server has nothing more to say.
    let reply = doc.generate_sync_message(&mut state).unwrap().encode();
    let sync = cbor(vec![
        ("type", text("sync")),
        ("senderId", text(peer)),
        ("documentId", text(&am_id(document))),
        ("data", Value::Bytes(reply)),
    ]);
    ws.send(WsMessage::Binary(sync.into())).await.unwrap();
    let more = read_until_closed(&mut ws, Duration::from_millis(400)).await;
    assert!(!more.closed);
    assert!(
        more.frames.is_empty(),
        "nothing after the document: {} frames",
        more.frames.len()
    );
    (ws, doc, state)
}

#[tokio::test]
async fn a_fresh_automerge_repo_peer_receives_the_whole_document_in_one_message() {
    use automerge::transaction::Transactable;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), false);
    config.compact_every = 100;
    config.idle_evict = Duration::from_millis(200);
    let server = Server::start(config).await;
    let url = format!("ws://{}/automerge", server.addr);
    let document = DocumentId::from_bytes([0x71; 16]);

    // A writer makes the document out of 300 changes, then leaves.
    let mut writer = am_joined(url.clone(), "writer").await;
    let mut ours = automerge::Automerge::new();
    for i in 0..300i64 {
        ours.transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.put(automerge::ROOT, format!("k{}", i % 17), i)?;
            Ok(())
        })
        .unwrap();
    }
    let mut state = automerge::sync::State::new();
    am_sync(&mut writer, "writer", document, &mut ours, &mut state).await;
    assert_eq!(server.committed(), 300);
    drop(writer);
    // Evicted: the next peer loads it from the stored snapshot.
    let deadline = Instant::now() + WAIT;
    while server.loaded() > 0 {
        assert!(Instant::now() < deadline, "the document stays loaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (mut first, mut doc, mut state) = fresh_load(&url, "fresh-1", document).await;
    assert_eq!(doc.get_heads(), ours.get_heads());
    // It edits; the server commits that, and the next fresh peer gets a document with it
    // (the kept save is not reused once the heads moved).
    doc.transact::<_, _, automerge::AutomergeError>(|tx| {
        tx.put(automerge::ROOT, "late", true)?;
        Ok(())
    })
    .unwrap();
    am_sync(&mut first, "fresh-1", document, &mut doc, &mut state).await;
    assert_eq!(server.committed(), 301);
    let (_second, second_doc, _) = fresh_load(&url, "fresh-2", document).await;
    assert_eq!(second_doc.get_heads(), doc.get_heads());
    server.stop().await;
}

/// Sends `doc`'s next sync message for `document`, if it has one.
async fn am_send(
    ws: &mut Ws,
    peer: &str,
    document: DocumentId,
    doc: &mut automerge::Automerge,
    state: &mut automerge::sync::State,
) {
    use automerge::sync::SyncDoc;
    if let Some(message) = doc.generate_sync_message(state) {
        let frame = cbor(vec![
            ("type", text("sync")),
            ("senderId", text(peer)),
            ("documentId", text(&am_id(document))),
            ("data", Value::Bytes(message.encode())),
        ]);
        ws.send(WsMessage::Binary(frame.into())).await.unwrap();
    }
}

#[tokio::test]
async fn automerge_repo_peers_get_one_sync_message_per_interval_and_every_change() {
    use automerge::sync::SyncDoc;
    use automerge::transaction::Transactable;
    const CHANGES: i64 = 40;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), false);
    config.automerge_sync_interval = Duration::from_millis(250);
    let server = Server::start(config).await;
    let url = format!("ws://{}/automerge", server.addr);
    let document = DocumentId::from_bytes([0x72; 16]);

    // The writer creates the document; the reader loads it.
    let mut writer = am_joined(url.clone(), "writer").await;
    let mut ours = automerge::Automerge::new();
    ours.transact::<_, _, automerge::AutomergeError>(|tx| tx.put(automerge::ROOT, "n", 0))
        .unwrap();
    let mut writer_state = automerge::sync::State::new();
    am_sync(
        &mut writer,
        "writer",
        document,
        &mut ours,
        &mut writer_state,
    )
    .await;
    let mut reader = am_joined(url.clone(), "reader").await;
    let mut theirs = automerge::Automerge::new();
    let mut reader_state = automerge::sync::State::new();
    am_sync(
        &mut reader,
        "reader",
        document,
        &mut theirs,
        &mut reader_state,
    )
    .await;
    assert_eq!(theirs.get_heads(), ours.get_heads());

    // The writer types: a change every 10 ms, each in a sync message of its own.
    let started = Instant::now();
    for i in 1..=CHANGES {
        ours.transact::<_, _, automerge::AutomergeError>(|tx| tx.put(automerge::ROOT, "n", i))
            .unwrap();
        am_send(
            &mut writer,
            "writer",
            document,
            &mut ours,
            &mut writer_state,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The reader answers every message, as automerge-repo does, until it has every change.
    let mut messages = 0;
    while theirs.get_heads() != ours.get_heads() {
        assert!(
            started.elapsed() < WAIT,
            "the reader never gets every change"
        );
        let message = next_cbor(&mut reader).await;
        if kind(&message) != "sync" {
            continue;
        }
        messages += 1;
        let data = field(&message, "data").and_then(Value::as_bytes).unwrap();
        let decoded = automerge::sync::Message::decode(data).unwrap();
        theirs
            .receive_sync_message(&mut reader_state, decoded)
            .unwrap();
        am_send(
            &mut reader,
            "reader",
            document,
            &mut theirs,
            &mut reader_state,
        )
        .await;
    }
    let took = started.elapsed();
    assert_eq!(server.committed(), CHANGES as u64 + 1);
    // One message at once, then at most one per interval (and the answers to the reader's
    // last replies): far fewer messages than changes (without the throttle: about one each).
    let allowed = 4 + (took.as_millis() / 250) as usize;
    assert!(
        messages <= allowed,
        "{messages} sync messages for {CHANGES} changes in {took:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn automerge_repo_changes_queued_together_are_applied_together() {
    let dir = tempfile::tempdir().unwrap();
    let document = DocumentId::from_bytes([0x73; 16]);
    // Four peers hold the document: a text.
    let (server, mut peers) = am_typists(config(dir.path(), false), document).await;
    assert_eq!(server.committed(), 1);

    // The first writes a text, the others a character each, right behind it: their messages
    // queue up for the document while it applies the first (this test's runtime has one
    // thread: the server runs once they are all sent).
    for (i, peer) in peers.iter_mut().enumerate() {
        let typed = if i == 0 {
            "x".repeat(2_000)
        } else {
            format!("{i}")
        };
        am_type(peer, document, &typed).await;
    }
    let texts = am_settle(&mut peers, document).await;
    assert_eq!(texts[0].len(), 2_003);
    assert!(texts.iter().all(|t| *t == texts[0]), "the peers converge");
    assert_eq!(server.committed(), 5, "every change durable once");
    let together = server
        .metrics
        .automerge_applied_together
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        together >= 2,
        "the typed characters were applied together ({together})"
    );
    server.stop().await;
}

/// Four automerge-repo peers of one text, each synced with the server.
async fn am_typists(
    config: accord_server::Config,
    document: DocumentId,
) -> (
    Server,
    Vec<(String, Ws, automerge::Automerge, automerge::sync::State)>,
) {
    use automerge::transaction::Transactable;
    let server = Server::start(config).await;
    let url = format!("ws://{}/automerge", server.addr);
    let mut seed = automerge::Automerge::new();
    seed.transact::<_, _, automerge::AutomergeError>(|tx| {
        tx.put_object(automerge::ROOT, "text", automerge::ObjType::Text)
    })
    .unwrap();
    let mut peers = Vec::new();
    for i in 0..4 {
        let name = format!("typist-{i}");
        let mut ws = am_joined(url.clone(), &name).await;
        let mut doc = seed
            .fork()
            .with_actor(automerge::ActorId::from([i as u8 + 1; 16]));
        let mut state = automerge::sync::State::new();
        am_sync(&mut ws, &name, document, &mut doc, &mut state).await;
        peers.push((name, ws, doc, state));
    }
    (server, peers)
}

/// Types `typed` at the start of the peer's text and sends the peer's sync message.
async fn am_type(
    peer: &mut (String, Ws, automerge::Automerge, automerge::sync::State),
    document: DocumentId,
    typed: &str,
) {
    use automerge::transaction::Transactable;
    use automerge::ReadDoc;
    let (name, ws, doc, state) = peer;
    doc.transact::<_, _, automerge::AutomergeError>(|tx| {
        let (_, text) = tx.get(automerge::ROOT, "text")?.expect("text");
        tx.splice_text(&text, 0, 0, typed)
    })
    .unwrap();
    am_send(ws, name, document, doc, state).await;
}

/// Everyone syncs until nobody has anything to say. Returns the texts.
async fn am_settle(
    peers: &mut [(String, Ws, automerge::Automerge, automerge::sync::State)],
    document: DocumentId,
) -> Vec<String> {
    use automerge::ReadDoc;
    for _ in 0..3 {
        for (name, ws, doc, state) in peers.iter_mut() {
            am_sync(ws, name, document, doc, state).await;
        }
    }
    peers
        .iter()
        .map(|(_, _, doc, _)| {
            let (_, text) = doc.get(automerge::ROOT, "text").unwrap().unwrap();
            doc.text(&text).unwrap()
        })
        .collect()
}

/// Each peer types one character, `pause` apart; then everyone syncs until quiet. Returns the
/// texts.
async fn am_type_one_each(
    peers: &mut [(String, Ws, automerge::Automerge, automerge::sync::State)],
    document: DocumentId,
    pause: Duration,
) -> Vec<String> {
    for (i, peer) in peers.iter_mut().enumerate() {
        am_type(peer, document, &format!("{i}")).await;
        tokio::time::sleep(pause).await;
    }
    am_settle(peers, document).await
}

#[tokio::test]
async fn automerge_repo_changes_arriving_between_rounds_are_applied_together() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), false);
    config.automerge_sync_interval = Duration::from_millis(400);
    let document = DocumentId::from_bytes([0x74; 16]);
    let (server, mut peers) = am_typists(config, document).await;
    assert_eq!(server.committed(), 1);
    // Keystrokes 20 ms apart, well inside one interval: none is applied before the round
    // (each would have been applied on its own as it came), all of them together.
    let texts = am_type_one_each(&mut peers, document, Duration::from_millis(20)).await;
    assert_eq!(texts[0].len(), 4);
    assert!(texts.iter().all(|t| *t == texts[0]), "the peers converge");
    assert_eq!(server.committed(), 5, "every change durable once");
    let together = server
        .metrics
        .automerge_applied_together
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        together >= 3,
        "keystrokes between rounds were applied together ({together})"
    );
    server.stop().await;
}

#[tokio::test]
async fn automerge_stashed_messages_are_applied_in_runs_by_rank() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), false);
    config.automerge_sync_interval = Duration::from_millis(400);
    let document = DocumentId::from_bytes([0x76; 16]);
    let (server, mut peers) = am_typists(config, document).await;
    // Quiet for an interval: the next keystroke is answered at once, and opens an interval.
    tokio::time::sleep(Duration::from_millis(450)).await;
    am_type(&mut peers[3], document, "d").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Inside it, peer 0 sends two messages, then peer 1 two: both wait for the round. Cut
    // wherever a peer came again, they were [0], [0, 1], [1] (three applies, and only two of
    // the messages applied with another); by rank they are [0, 1], [0, 1].
    am_type(&mut peers[0], document, "a").await;
    am_type(&mut peers[0], document, "A").await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    am_type(&mut peers[1], document, "b").await;
    am_type(&mut peers[1], document, "B").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let together = server
        .metrics
        .automerge_applied_together
        .load(std::sync::atomic::Ordering::Relaxed);
    let texts = am_settle(&mut peers, document).await;
    assert_eq!(texts[0].len(), 5);
    assert!(texts.iter().all(|t| *t == texts[0]), "the peers converge");
    assert_eq!(server.committed(), 6, "every change durable once");
    assert_eq!(
        together, 4,
        "each of the four stashed keystrokes was applied with another peer's"
    );
    server.stop().await;
}

#[tokio::test]
async fn automerge_messages_beyond_the_stash_limit_are_received_at_once_and_none_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), false);
    config.automerge_sync_interval = Duration::from_millis(400);
    // At most one message waits for the round: the second empties the stash.
    config.max_batch = 1;
    let document = DocumentId::from_bytes([0x75; 16]);
    let (server, mut peers) = am_typists(config, document).await;
    let texts = am_type_one_each(&mut peers, document, Duration::from_millis(20)).await;
    assert_eq!(texts[0].len(), 4);
    assert!(texts.iter().all(|t| *t == texts[0]), "the peers converge");
    assert_eq!(server.committed(), 5, "every change durable once");
    let together = server
        .metrics
        .automerge_applied_together
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        together <= 2,
        "no more than the limit waited to be applied together ({together})"
    );
    server.stop().await;
}
