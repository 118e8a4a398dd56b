//! `accord-loadgen relay-floor`: a y-websocket relay that does no document work, the floor of
//! the fan-out benchmark.
//!
//! Not a server: it holds no document. Every sync step 2 or update a client sends is forwarded,
//! as the bytes it came in, to every other client of the same URL path; a sync step 1 is
//! answered with an empty update; everything else is ignored. Each connection is one task that
//! reads its socket and writes what is queued for it, everything queued in one flush (as
//! Accord's connections do), so a fan-out load against it measures the sockets, the WebSocket
//! framing, the runtime's wake-ups and the load generator itself: what a relay costs on this
//! machine before any CRDT, storage or ordering work. It does not merge updates (Accord does),
//! so its subscribers read more frames than Accord's do.
//!
//! Bounded: 127.0.0.1 only, 16 MiB per message, 4,096 frames queued per connection (a
//! connection that falls that far behind is dropped), 4,096 connections at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::{Bytes, Message as WsMessage};

use crate::conn::Result;

/// Frames queued for one connection at most.
const QUEUE: usize = 4_096;
/// Connections at once at most; more are closed as they are accepted.
const MAX_CONNECTIONS: usize = 4_096;
/// The largest message read.
const MAX_MESSAGE: usize = 16 << 20;
/// `[0, 1, varUint8Array([0, 0])]`: sync step 2 carrying an empty update.
const EMPTY_STEP2: [u8; 5] = [0, 1, 2, 0, 0];
/// `[0, 0, varUint8Array([0])]`: sync step 1 with an empty state vector.
const EMPTY_STEP1: [u8; 4] = [0, 0, 1, 0];

/// One URL path's connections: their ids and queues.
type Room = Vec<(u64, mpsc::Sender<Bytes>)>;

#[derive(Default)]
struct Rooms {
    next_id: u64,
    open: usize,
    by_path: HashMap<String, Room>,
}

/// Serves the relay on `listener` until the process ends.
pub async fn serve(listener: TcpListener) -> Result<()> {
    let rooms = Arc::new(Mutex::new(Rooms::default()));
    loop {
        let (stream, peer) = listener
            .accept()
            .await
            .map_err(|e| format!("accept: {e}"))?;
        if !peer.ip().is_loopback() {
            continue;
        }
        let rooms = rooms.clone();
        tokio::spawn(async move {
            if let Err(error) = connection(stream, rooms).await {
                eprintln!("relay-floor: {error}");
            }
        });
    }
}

// The handshake callback's `Result` is tungstenite's own type (its error is an HTTP response).
#[allow(clippy::result_large_err)]
async fn connection(stream: TcpStream, rooms: Arc<Mutex<Rooms>>) -> Result<()> {
    let _ = stream.set_nodelay(true);
    let mut path = String::new();
    // The load generator's own reads (4 KiB at a time), with the relay's message limit.
    let config = crate::conn::ws_config()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let ws = tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        |request: &Request, response: Response| {
            path = request.uri().path().to_string();
            Ok(response)
        },
        Some(config),
    )
    .await
    .map_err(|e| format!("handshake: {e}"))?;
    let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUE);
    let id = {
        let mut rooms = rooms.lock().map_err(|_| "rooms poisoned")?;
        if rooms.open >= MAX_CONNECTIONS {
            return Err("too many connections".into());
        }
        rooms.open += 1;
        rooms.next_id += 1;
        let id = rooms.next_id;
        rooms
            .by_path
            .entry(path.clone())
            .or_default()
            .push((id, tx));
        id
    };
    let result = relay(ws, &mut rx, &rooms, &path, id).await;
    if let Ok(mut rooms) = rooms.lock() {
        rooms.open -= 1;
        if let Some(room) = rooms.by_path.get_mut(&path) {
            room.retain(|(other, _)| *other != id);
            if room.is_empty() {
                rooms.by_path.remove(&path);
            }
        }
    }
    result
}

async fn relay(
    mut ws: tokio_tungstenite::WebSocketStream<TcpStream>,
    rx: &mut mpsc::Receiver<Bytes>,
    rooms: &Mutex<Rooms>,
    path: &str,
    id: u64,
) -> Result<()> {
    let send_err = |e| format!("send: {e}");
    ws.send(WsMessage::Binary(Bytes::from_static(&EMPTY_STEP1)))
        .await
        .map_err(send_err)?;
    loop {
        tokio::select! {
            queued = rx.recv() => {
                // None: this connection fell `QUEUE` frames behind and was dropped.
                let Some(frame) = queued else { return Err("fell behind".into()) };
                ws.feed(WsMessage::Binary(frame)).await.map_err(send_err)?;
                while let Ok(frame) = rx.try_recv() {
                    ws.feed(WsMessage::Binary(frame)).await.map_err(send_err)?;
                }
                ws.flush().await.map_err(send_err)?;
            }
            read = ws.next() => {
                let payload = match read {
                    Some(Ok(WsMessage::Binary(payload))) => payload,
                    Some(Ok(WsMessage::Close(_))) | None => return Ok(()),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(format!("receive: {e}")),
                };
                match payload.get(..2) {
                    Some([0, 0]) => {
                        ws.send(WsMessage::Binary(Bytes::from_static(&EMPTY_STEP2)))
                            .await
                            .map_err(send_err)?;
                    }
                    Some([0, 1 | 2]) => forward(rooms, path, id, payload)?,
                    _ => {}
                }
            }
        }
    }
}

/// Queues `frame` for every other connection of `path`; one whose queue is full is dropped
/// from the room (its task ends once it has written what it holds).
fn forward(rooms: &Mutex<Rooms>, path: &str, from: u64, frame: Bytes) -> Result<()> {
    let mut rooms = rooms.lock().map_err(|_| "rooms poisoned")?;
    if let Some(room) = rooms.by_path.get_mut(path) {
        room.retain(|(id, tx)| *id == from || tx.try_send(frame.clone()).is_ok());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yws::{Proto, Target};

    async fn start() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(serve(listener));
        format!("ws://127.0.0.1:{port}/yjs/{{room}}")
    }

    #[tokio::test]
    async fn a_writers_updates_reach_every_other_client_of_the_room_and_no_other_room() {
        let template = start().await;
        // A client of another room, reading everything it is sent.
        let (mut other, _) =
            tokio_tungstenite::connect_async(template.replace("{room}", "elsewhere").as_str())
                .await
                .expect("connect");
        other
            .send(WsMessage::Binary(Bytes::from_static(&EMPTY_STEP1)))
            .await
            .expect("step 1");
        let target = Target {
            template,
            proto: Proto::Yws,
            server_pid: None,
        };
        // The fan-out load itself: every change sent reaches every subscriber.
        let step = crate::yws::fanout_step(&target, 5, 2, 200.0, 0.5, 0)
            .await
            .expect("fan-out step");
        assert!(step.sent > 50, "sent {}", step.sent);
        assert_eq!(step.lost, 0);
        assert_eq!(step.delivered, step.expected);
        assert_eq!(step.expected, step.sent * 5);
        // Updates are forwarded as they came: one frame each.
        assert_eq!(step.frames, step.delivered);
        // The other room heard the relay's step 1 and its answer to its own, nothing else.
        let mut heard = Vec::new();
        while let Ok(Some(Ok(WsMessage::Binary(frame)))) =
            tokio::time::timeout(std::time::Duration::from_millis(200), other.next()).await
        {
            heard.push(frame.to_vec());
        }
        assert_eq!(heard, vec![EMPTY_STEP1.to_vec(), EMPTY_STEP2.to_vec()]);
    }

    #[tokio::test]
    async fn a_connection_that_falls_behind_is_dropped_and_the_others_go_on() {
        let rooms = Mutex::new(Rooms::default());
        let (slow, _slow_rx) = mpsc::channel(1);
        let (fast, mut fast_rx) = mpsc::channel(8);
        rooms
            .lock()
            .expect("lock")
            .by_path
            .insert("/r".into(), vec![(1, slow), (2, fast)]);
        for i in 0..3u8 {
            forward(&rooms, "/r", 3, Bytes::from(vec![0, 2, i])).expect("forward");
        }
        let ids: Vec<u64> = rooms.lock().expect("lock").by_path["/r"]
            .iter()
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(ids, vec![2]);
        for i in 0..3u8 {
            assert_eq!(fast_rx.recv().await.expect("frame")[2], i);
        }
    }
}
