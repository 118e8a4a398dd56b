//! Liveness: the idle timeout with ping/pong, and a slow consumer cut off while another
//! subscriber's fan-out latency holds.

mod common;

use std::time::Duration;

use accord_engine::protocol::{ErrorCode, Limits, Message, Reassembler, SyncPayload};
use accord_engine::storage::MemoryStorage;
use accord_engine::{DocKind, DocumentId, Op, Path};
use common::*;
use futures_util::StreamExt;
use serde_json::json;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn idle_timeout_drops_the_unresponsive_and_keeps_the_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), false);
    config.idle_timeout = Duration::from_millis(600);
    let server = Server::start(config).await;
    // Both say hello, then send nothing more. `quiet` keeps reading, so tungstenite answers
    // the server's pings; `deaf` never reads again, so its pongs never go out.
    let mut quiet = connect_ws(server.addr).await;
    let mut deaf = connect_ws(server.addr).await;
    hello(&mut quiet, 1).await;
    hello(&mut deaf, 2).await;
    let started = Instant::now();
    let (messages, closed) = read_all(&mut quiet, Duration::from_millis(2_400)).await;
    assert!(!closed, "a quiet client that answers pings stays connected");
    assert!(matches!(messages.first(), Some(Message::Welcome { .. })));
    assert!(started.elapsed() >= Duration::from_millis(2_000));
    // The deaf client was cut off long ago: reading now finds the close.
    let (_, closed) = read_all(&mut deaf, Duration::from_secs(5)).await;
    assert!(closed, "a client that stops answering is disconnected");
    // The quiet one still works.
    let document = DocumentId::from_bytes([3; 16]);
    let subscribe = Message::Subscribe {
        document,
        kind: DocKind::Yrs,
        since_seq: 0,
    };
    send(&mut quiet, &subscribe).await;
    let deadline = Instant::now() + WAIT;
    let mut subscribed = false;
    while !subscribed && Instant::now() < deadline {
        let (messages, closed) = read_all(&mut quiet, Duration::from_millis(200)).await;
        subscribed = messages
            .iter()
            .any(|m| matches!(m, Message::Subscribed { .. }));
        assert!(!closed);
    }
    assert!(subscribed);
    assert_eq!(open_connections(&server), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_cut_off_while_fan_out_latency_holds() {
    const UPDATES: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), false);
    config.outbound_queue = 8;
    let server = Server::start(config).await;
    let document = DocumentId::from_bytes([7; 16]);
    let kind = DocKind::Yrs;
    let mut writer = Client::new(MemoryStorage::new(), 1, replica_config(1 << 20));
    let mut fast = Client::new(MemoryStorage::new(), 2, replica_config(1 << 20));
    for client in [&mut writer, &mut fast] {
        client.replica.create(document, kind).unwrap();
        client.connect(server.addr, None).await;
        client.subscribe(document).await;
        assert!(client.pump_until(WAIT, |c| c.is_subscribed(document)).await);
    }
    // A subscriber that never reads after subscribing.
    let mut slow = connect_ws(server.addr).await;
    subscribe_unread(&mut slow, 3, document).await;
    // Let both finish their sync handshake (the loop below pumps one client at a time).
    for _ in 0..3 {
        writer.pump_for(Duration::from_millis(50)).await;
        fast.pump_for(Duration::from_millis(50)).await;
    }

    // Large updates until the slow consumer's queue overflows, then small ones; the fast
    // subscriber's latency is measured from the writer's send to its receipt of the commit.
    let blob = "z".repeat(64 << 10);
    let mut latencies = Vec::with_capacity(UPDATES);
    for i in 0..UPDATES {
        let cut_off = server.metrics.errors(ErrorCode::Overloaded) > 0;
        let value = if cut_off { json!(i) } else { json!(blob) };
        let ops = vec![Op::Put {
            path: Path::keys(["m".to_string(), format!("k{i}")]),
            value,
        }];
        writer.replica.change(document, &ops).unwrap();
        writer.flush().await;
        let sent = Instant::now();
        let seq = i as u64 + 1;
        assert!(
            fast.pump_until(WAIT, |c| c.acks.contains_key(&seq)).await,
            "the fast subscriber got commit {seq} (closed {}, errors {:?})",
            fast.closed,
            fast.peer_errors()
        );
        latencies.push(sent.elapsed());
        assert!(writer.pump_until(WAIT, |c| c.acks.contains_key(&seq)).await);
    }
    assert!(
        server.metrics.errors(ErrorCode::Overloaded) >= 1,
        "the slow subscriber was cut off"
    );
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let p99 = latencies[latencies.len() * 99 / 100];
    eprintln!("fan-out latency to the fast subscriber: p50 {p50:?}, p99 {p99:?}");
    assert!(p99 < Duration::from_millis(500), "p99 {p99:?}");
    assert!(
        fast.pump_until(WAIT, |c| {
            c.replica.json(document).unwrap()["m"]
                .as_object()
                .is_some_and(|m| m.len() == UPDATES)
        })
        .await,
        "the fast subscriber has every update"
    );
    assert!(!fast.closed && !writer.closed);
    drop(slow);
    server.stop().await;
}

/// A y-websocket connection (`/yjs/{room}`) that has sent its sync step 1.
async fn yjs(addr: std::net::SocketAddr, room: &str) -> Ws {
    use futures_util::SinkExt;
    let url = format!("ws://{addr}/yjs/{room}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    // Sync step 1 with an empty state vector.
    let step1 = vec![0, 0, 1, 0];
    ws.send(tokio_tungstenite::tungstenite::Message::Binary(
        step1.into(),
    ))
    .await
    .unwrap();
    ws
}

/// Reads a raw socket until it closes or `within` passes: the close code, if it closed.
async fn close_code(ws: &mut Ws, within: Duration) -> Option<u16> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    let deadline = Instant::now() + within;
    while let Ok(next) = tokio::time::timeout(deadline - Instant::now(), ws.next()).await {
        match next {
            Some(Ok(WsMessage::Close(frame))) => {
                return Some(frame.map_or(1005, |f| f.code.into()))
            }
            None | Some(Err(_)) => return Some(1006),
            Some(Ok(_)) => {}
        }
    }
    None
}

#[tokio::test]
async fn yjs_idle_timeout_drops_the_unresponsive_and_keeps_the_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), false);
    config.idle_timeout = Duration::from_millis(600);
    let server = Server::start(config).await;
    // `quiet` keeps reading, so tungstenite answers the server's pings; `deaf` never reads.
    let mut quiet = yjs(server.addr, "idle-room").await;
    let mut deaf = yjs(server.addr, "idle-room").await;
    let started = Instant::now();
    assert_eq!(
        close_code(&mut quiet, Duration::from_millis(2_400)).await,
        None,
        "a quiet client that answers pings stays connected"
    );
    assert!(started.elapsed() >= Duration::from_millis(2_000));
    assert!(
        close_code(&mut deaf, Duration::from_secs(5))
            .await
            .is_some(),
        "a client that stops answering is disconnected"
    );
    assert_eq!(open_connections(&server), 1);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_every_connection_with_shutting_down() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), false)).await;
    let mut native = connect_ws(server.addr).await;
    hello(&mut native, 1).await;
    let (messages, _) = read_all(&mut native, Duration::from_millis(300)).await;
    assert!(matches!(messages.first(), Some(Message::Welcome { .. })));
    let mut yws = yjs(server.addr, "shutdown-room").await;
    let (mut automerge, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/automerge", server.addr))
            .await
            .unwrap();
    // Everyone is connected and idle.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopping = tokio::spawn(server.stop());
    let (messages, closed) = read_all(&mut native, WAIT).await;
    assert!(closed);
    assert_eq!(error_codes(&messages), vec![ErrorCode::ShuttingDown]);
    let shutting_down = 4000 + ErrorCode::ShuttingDown.code();
    assert_eq!(close_code(&mut yws, WAIT).await, Some(shutting_down));
    assert_eq!(close_code(&mut automerge, WAIT).await, Some(shutting_down));
    stopping.await.unwrap();
}

/// Shutdown reaches every loaded document's actor (through its inbox) without waiting out the
/// grace period: the server stops at once and nothing stays loaded.
#[tokio::test]
async fn shutdown_stops_every_loaded_document_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), false);
    config.shutdown_grace = Duration::from_secs(60);
    config.idle_evict = Duration::from_secs(60);
    let server = Server::start(config).await;
    let mut client = Client::new(MemoryStorage::new(), 1, replica_config(1 << 20));
    client.connect(server.addr, None).await;
    for n in 1..=3u8 {
        let document = DocumentId::from_bytes([n; 16]);
        client.replica.create(document, DocKind::Yrs).unwrap();
        client.subscribe(document).await;
        assert!(client.pump_until(WAIT, |c| c.is_subscribed(document)).await);
    }
    assert_eq!(server.loaded(), 3);
    // Idle documents, no subscribers: each actor only waits in its inbox.
    client.drop_connection();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        server.loaded(),
        3,
        "still loaded (eviction is a minute away)"
    );
    let metrics = server.metrics.clone();
    let started = Instant::now();
    server.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stopped without waiting out the grace period ({:?})",
        started.elapsed()
    );
    assert_eq!(
        metrics
            .documents_loaded
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn a_close_after_the_queue_leaves_no_hole_in_a_stalled_stream() {
    // A subscriber that does not read while ~6.5 MB of commits are relayed to it: its
    // connection's writer stalls mid-batch on the full socket. Shutdown then closes it "after
    // what is queued": everything must arrive in commit order with no gap, then ShuttingDown.
    const COMMITS: u64 = 100;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), false);
    config.outbound_queue = 4 * COMMITS as usize;
    let server = Server::start(config).await;
    let document = DocumentId::from_bytes([9; 16]);
    let kind = DocKind::Yrs;
    let mut writer = Client::new(MemoryStorage::new(), 1, replica_config(1 << 20));
    writer.replica.create(document, kind).unwrap();
    writer.connect(server.addr, None).await;
    writer.subscribe(document).await;
    assert!(writer.pump_until(WAIT, |c| c.is_subscribed(document)).await);
    let mut slow = connect_ws_small_buffer(server.addr, 64 << 10).await;
    subscribe_unread(&mut slow, 3, document).await;
    writer.pump_for(Duration::from_millis(200)).await;
    let blob = "y".repeat(64 << 10);
    for i in 0..COMMITS {
        let ops = vec![Op::Put {
            path: Path::keys(["m".to_string(), format!("k{i}")]),
            value: json!(blob),
        }];
        writer.replica.change(document, &ops).unwrap();
        writer.flush().await;
        assert!(
            writer
                .pump_until(WAIT, |c| c.acks.contains_key(&(i + 1)))
                .await
        );
    }
    // Read a little: the writer finishes its stalled batch, takes a long one from what piled
    // up meanwhile, and stalls in the middle of it.
    let mut reassembler = Reassembler::new(Limits::default());
    let mut messages = Vec::new();
    while messages.len() < 20 {
        match slow.next().await {
            Some(Ok(WsMessage::Binary(bytes))) => {
                if let Ok(Some(m)) = reassembler.push(&bytes) {
                    messages.push(m);
                }
            }
            Some(Ok(_)) => {}
            other => panic!("the connection ended early: {other:?}"),
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopping = tokio::spawn(server.stop());
    // The close reaches the writer while it is stalled (nothing more is read yet).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rest, closed) = read_all(&mut slow, WAIT).await;
    messages.extend(rest);
    assert!(closed, "the connection was closed");
    // Every relayed update arrived (the blobs are what makes them large).
    let relayed: usize = messages
        .iter()
        .filter_map(|m| match m {
            Message::Sync {
                payload: SyncPayload::YrsUpdate(update),
                ..
            } => Some(update.len()),
            _ => None,
        })
        .sum();
    assert!(
        relayed >= COMMITS as usize * blob.len(),
        "relayed {relayed} bytes of updates"
    );
    let seqs: Vec<u64> = messages
        .iter()
        .filter_map(|m| match m {
            Message::Ack { commits, .. } => Some(commits.iter().map(|c| c.seq)),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(
        seqs,
        (1..=COMMITS).collect::<Vec<_>>(),
        "every commit, in order, no gap"
    );
    assert_eq!(error_codes(&messages), vec![ErrorCode::ShuttingDown]);
    assert!(matches!(messages.last(), Some(Message::Error { .. })));
    stopping.await.unwrap();
}

fn open_connections(server: &Server) -> i64 {
    server
        .metrics
        .connections
        .load(std::sync::atomic::Ordering::Relaxed)
}
