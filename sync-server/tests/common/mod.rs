//! Test helpers: the real server on 127.0.0.1:0, and a client that drives the engine's
//! `Replica` over a tokio-tungstenite WebSocket.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use accord_engine::protocol::{
    decode, encode, ErrorCode, Limits, Message, Reassembler, SyncPayload, PROTOCOL_VERSION,
};
use accord_engine::replica::{Event, Replica, ReplicaConfig};
use accord_engine::storage::Storage;
use accord_engine::{ChangeId, DocKind, DocumentId, PeerId, ReplicaId};
use accord_server::auth::{mint, unix_now, AuthMode, Claims, Rights, Scope};
use accord_server::metrics::Metrics;
use accord_server::Config;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub const SECRET: &[u8] = b"test-secret";

/// A server running in this process.
pub struct Server {
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

pub fn config(dir: &Path, auth: bool) -> Config {
    let auth = if auth {
        AuthMode::Secret(SECRET.to_vec())
    } else {
        AuthMode::Disabled
    };
    let mut config = Config::new(dir, auth);
    config.shutdown_grace = Duration::from_secs(5);
    config
}

/// A token signed with [`SECRET`] for `scope` with `rights`, expiring `ttl` seconds from now.
pub fn token(scope: Scope, rights: Rights, ttl: u64) -> String {
    mint(
        SECRET,
        &Claims {
            scope,
            rights,
            exp: unix_now() + ttl,
        },
    )
}

impl Server {
    pub async fn start(config: Config) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(accord_server::run_with_metrics(
            listener,
            config,
            metrics.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        let task = tokio::spawn(async move {
            task.await.unwrap().unwrap();
        });
        Server {
            addr,
            metrics,
            stop: Some(stop),
            task,
        }
    }

    /// Graceful shutdown, waiting for it to finish.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        timeout(Duration::from_secs(20), &mut self.task)
            .await
            .unwrap()
            .unwrap();
    }

    pub fn committed(&self) -> u64 {
        self.metrics
            .changes_committed
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn loaded(&self) -> i64 {
        self.metrics
            .documents_loaded
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

pub async fn connect_ws(addr: SocketAddr) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/sync"))
        .await
        .unwrap();
    ws
}

/// A raw connection to `/sync` whose socket receives into a small kernel buffer (no
/// autotuning), so a client that stops reading stalls the server's writes quickly.
pub async fn connect_ws_small_buffer(addr: SocketAddr, bytes: u32) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(bytes).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (ws, _) =
        tokio_tungstenite::client_async(format!("ws://{addr}/sync"), MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
    ws
}

/// A replica connected to the server.
pub struct Client<S: Storage> {
    pub replica: Replica<S>,
    ws: Option<Ws>,
    peer: PeerId,
    observer: Reassembler,
    /// Every commit this client was told about, by sequence number.
    pub acks: BTreeMap<u64, ChangeId>,
    pub events: Vec<Event>,
    pub closed: bool,
}

pub fn replica_config(max_frame_bytes: usize) -> ReplicaConfig {
    ReplicaConfig {
        limits: Limits {
            max_frame_bytes,
            ..Limits::default()
        },
        ..ReplicaConfig::default()
    }
}

impl<S: Storage> Client<S> {
    pub fn new(storage: S, id: u8, config: ReplicaConfig) -> Self {
        let replica = Replica::open(storage, ReplicaId::from_bytes([id; 16]), config).unwrap();
        Client {
            replica,
            ws: None,
            peer: PeerId(1),
            observer: Reassembler::new(Limits::default()),
            acks: BTreeMap::new(),
            events: Vec::new(),
            closed: false,
        }
    }

    pub async fn connect(&mut self, addr: SocketAddr, token: Option<String>) {
        self.ws = Some(connect_ws(addr).await);
        self.closed = false;
        self.observer = Reassembler::new(Limits::default());
        self.replica.connect_upstream(self.peer, token);
        self.flush().await;
    }

    /// Drops the connection without a goodbye.
    pub fn drop_connection(&mut self) {
        self.ws = None;
        self.replica.disconnect(self.peer);
    }

    pub async fn subscribe(&mut self, document: DocumentId) {
        self.replica.sync_document(self.peer, document).unwrap();
        self.flush().await;
    }

    /// Sends every frame the replica has due.
    pub async fn flush(&mut self) {
        while let Some(transmit) = self.replica.poll_transmit() {
            let Some(ws) = self.ws.as_mut() else { continue };
            if ws
                .send(WsMessage::Binary(transmit.frame.into()))
                .await
                .is_err()
            {
                self.closed = true;
            }
        }
        self.events
            .extend(std::iter::from_fn(|| self.replica.poll_event()));
    }

    fn handle(&mut self, frame: &[u8]) {
        if let Ok(Some(Message::Ack { commits, .. })) = self.observer.push(frame) {
            for commit in commits {
                if let Some(previous) = self.acks.insert(commit.seq, commit.change) {
                    assert_eq!(
                        previous, commit.change,
                        "seq {} acked with two changes",
                        commit.seq
                    );
                }
            }
        }
        if let Err(error) = self.replica.handle_frame(self.peer, frame) {
            panic!("client failed on a server frame: {error}");
        }
    }

    /// Exchanges frames until `done` holds or `within` passes; returns whether it held.
    pub async fn pump_until(
        &mut self,
        within: Duration,
        mut done: impl FnMut(&mut Self) -> bool,
    ) -> bool {
        let deadline = Instant::now() + within;
        loop {
            self.flush().await;
            if done(self) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || self.closed {
                return done(self);
            }
            let wait = (deadline - now).min(Duration::from_millis(50));
            let Some(ws) = self.ws.as_mut() else {
                tokio::time::sleep(wait).await;
                continue;
            };
            match timeout(wait, ws.next()).await {
                Err(_) => {}
                Ok(Some(Ok(WsMessage::Binary(bytes)))) => self.handle(&bytes),
                Ok(Some(Ok(WsMessage::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => {
                    self.closed = true
                }
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Exchanges frames for `time`.
    pub async fn pump_for(&mut self, time: Duration) {
        self.pump_until(time, |_| false).await;
    }

    pub fn peer_errors(&self) -> Vec<ErrorCode> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::PeerError { code, .. } => Some(*code),
                _ => None,
            })
            .collect()
    }

    pub fn is_subscribed(&self, document: DocumentId) -> bool {
        self.events
            .iter()
            .any(|e| matches!(e, Event::Subscribed { document: d, .. } if *d == document))
    }

    pub fn outbox_len(&self) -> usize {
        self.replica.outbox().count()
    }
}

/// Reads messages from a raw socket until it closes or `within` passes.
pub async fn read_all(ws: &mut Ws, within: Duration) -> (Vec<Message>, bool) {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    let mut reassembler = Reassembler::new(Limits::default());
    loop {
        let now = Instant::now();
        if now >= deadline {
            return (out, false);
        }
        match timeout(deadline - now, ws.next()).await {
            Err(_) => return (out, false),
            Ok(Some(Ok(WsMessage::Binary(bytes)))) => {
                if let Ok(Some(m)) = reassembler.push(&bytes) {
                    out.push(m);
                }
            }
            Ok(Some(Ok(WsMessage::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => return (out, true),
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Says hello as replica `[id; 16]` (no token).
pub async fn hello(ws: &mut Ws, id: u8) {
    let hello = Message::Hello {
        protocol_version: PROTOCOL_VERSION,
        replica: ReplicaId::from_bytes([id; 16]),
        token: None,
    };
    send(ws, &hello).await;
}

/// Says hello as replica `[id; 16]` and subscribes to the Yrs `document` from its start (step 1
/// with an empty state vector), reading nothing back: a subscriber that never reads.
pub async fn subscribe_unread(ws: &mut Ws, id: u8, document: DocumentId) {
    hello(ws, id).await;
    let subscribe = Message::Subscribe {
        document,
        kind: DocKind::Yrs,
        since_seq: 0,
    };
    send(ws, &subscribe).await;
    let step1 = Message::Sync {
        document,
        payload: SyncPayload::YrsStep1(vec![0]),
    };
    send(ws, &step1).await;
}

pub async fn send(ws: &mut Ws, message: &Message) {
    ws.send(WsMessage::Binary(encode(message).into()))
        .await
        .unwrap();
}

pub fn decode_default(bytes: &[u8]) -> Message {
    decode(bytes, &Limits::default()).unwrap()
}

pub fn error_codes(messages: &[Message]) -> Vec<ErrorCode> {
    messages
        .iter()
        .filter_map(|m| match m {
            Message::Error { code, .. } => Some(*code),
            _ => None,
        })
        .collect()
}

/// A response of [`http`].
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl HttpResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// The `code` of a JSON error body.
    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_string()
    }
}

/// One HTTP/1.1 request with `Connection: close` (enough for tests; no client crate needed).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
) -> HttpResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    let body = body.unwrap_or_default();
    request.push_str(&format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    ));
    stream.write_all(request.as_bytes()).await.unwrap();
    // The server may answer (413) before reading all of a large body.
    let _ = stream.write_all(body).await;
    let mut raw = Vec::new();
    timeout(Duration::from_secs(20), stream.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "chunked bodies are not parsed here"
    );
    HttpResponse {
        status,
        headers: head.to_string(),
        body: body.to_string(),
    }
}

/// Parses a JSON-lines change feed into `(seq, change hex, the whole line)`.
pub fn feed_lines(body: &str) -> Vec<serde_json::Value> {
    body.lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
