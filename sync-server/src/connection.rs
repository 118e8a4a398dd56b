//! One WebSocket connection: hello and auth, limits, subscriptions, and the bounded outbound
//! queue.
//!
//! The reader (this task) joins frames with a [`Reassembler`] under the configured limits and
//! hands Sync payloads to document actors. A writer task owns the socket's sending half and a
//! bounded queue of messages; documents put messages in with `try_send`, and when the queue is
//! full the connection is closed with `Overloaded`: a slow client never blocks a document.
//! Outgoing messages larger than the frame limit are split with [`encode_frames`].
//! A malformed or oversized frame gets an error and closes this connection only.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use accord_engine::protocol::{
    encode_frames, DecodeError, ErrorCode, Message, Reassembler, PROTOCOL_VERSION,
};
use accord_engine::{DocKind, DocumentId, ReplicaId};
use axum::extract::ws::{Message as WsMessage, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{timeout, Instant};

use crate::auth::{unix_now, Grant};
use crate::document::{server_replica, Command, Lease, SubscribeRequest};
use crate::Shared;

/// How long a close (last messages, then a close frame) may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why and how a connection closes.
#[derive(Clone, Debug)]
pub(crate) struct CloseReason {
    /// A last message sent after the queue (or instead of it).
    message: Option<Message>,
    /// Whether the messages already queued are sent first.
    flush: bool,
}

impl CloseReason {
    /// Send what is queued, then close.
    pub(crate) fn flush() -> Self {
        Self {
            message: None,
            flush: true,
        }
    }

    /// Drop what is queued, send `message`, close. (Also used by the foreign-protocol relays
    /// of `compat` to close a slow member.)
    pub(crate) fn now(message: Message) -> Self {
        Self {
            message: Some(message),
            flush: false,
        }
    }
}

/// A queued message. Boxed: tokio's channel allocates its first block of 32 slots when it is
/// created, so every idle connection pays for 32 slots; 32 pointers instead of 32 `Message`s
/// (~80 bytes each) saves ~2 KB per connection for one small allocation per message sent.
pub(crate) type Queued = Box<Message>;

/// The sending side of a connection, as documents hold it.
#[derive(Clone)]
pub(crate) struct Outbox {
    id: u64,
    tx: mpsc::Sender<Queued>,
    close: Arc<watch::Sender<Option<CloseReason>>>,
}

impl CloseReason {
    /// The last message, if any (the foreign-protocol adapters of `compat` translate it).
    pub(crate) fn message(&self) -> Option<&Message> {
        self.message.as_ref()
    }
}

impl Outbox {
    /// An outbox whose messages are read by the caller instead of a native writer task: the
    /// foreign-protocol adapters (`compat`) subscribe to documents with it and translate what
    /// arrives. Returns the outbox, its queue and its close signal.
    pub(crate) fn detached(
        id: u64,
        capacity: usize,
    ) -> (
        Self,
        mpsc::Receiver<Queued>,
        watch::Receiver<Option<CloseReason>>,
    ) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let (close_tx, close_rx) = watch::channel(None);
        let outbox = Outbox {
            id,
            tx,
            close: Arc::new(close_tx),
        };
        (outbox, rx, close_rx)
    }

    /// The connection's id.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Queues a message without waiting. False when the connection is gone or its queue is full
    /// (then it is being closed with `Overloaded`).
    pub(crate) fn send(&self, message: Message) -> bool {
        match self.tx.try_send(Box::new(message)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.close_with(CloseReason::now(Message::Error {
                    code: ErrorCode::Overloaded,
                    document: None,
                    message: "the connection did not keep up with its outbound queue".into(),
                }));
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Asks the connection to close (the first reason wins).
    pub(crate) fn close_with(&self, reason: CloseReason) {
        close_once(&self.close, reason);
    }
}

/// Records `reason` unless a reason is already recorded (the first one wins).
fn close_once(close: &watch::Sender<Option<CloseReason>>, reason: CloseReason) {
    close.send_if_modified(|current| {
        let first = current.is_none();
        if first {
            *current = Some(reason);
        }
        first
    });
}

struct Subscription {
    lease: Lease,
}

/// Decrements the connection gauge when dropped.
struct Counted(Arc<crate::metrics::Metrics>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one upgraded WebSocket until it closes.
pub(crate) async fn serve(socket: WebSocket, shared: Arc<Shared>) {
    let _alive = shared.alive.clone();
    let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
    let (mut sink, stream) = socket.split();
    let Ok(_permit) = shared.connections.clone().try_acquire_owned() else {
        tracing::warn!(connection = id, "connection limit reached");
        let refusal = Message::Error {
            code: ErrorCode::Overloaded,
            document: None,
            message: "the server is at its connection limit".into(),
        };
        shared.metrics.count_error(ErrorCode::Overloaded);
        let _ = timeout(CLOSE_TIMEOUT, async {
            let _ = sink
                .send(WsMessage::Binary(
                    accord_engine::protocol::encode(&refusal).into(),
                ))
                .await;
            let _ = sink.send(WsMessage::Close(None)).await;
        })
        .await;
        return;
    };
    shared.metrics.connections.fetch_add(1, Ordering::Relaxed);
    let _counted = Counted(shared.metrics.clone());
    let (tx, rx) = mpsc::channel(shared.config.outbound_queue.max(1));
    let (close_tx, close_rx) = watch::channel(None);
    let outbox = Outbox {
        id,
        tx,
        close: Arc::new(close_tx),
    };
    let writer = tokio::spawn(write_loop(
        sink,
        rx,
        close_rx.clone(),
        outbox.close.clone(),
        shared.clone(),
    ));
    let mut reader = Reader {
        reassembler: Reassembler::new(shared.config.limits()),
        shared: shared.clone(),
        outbox,
        grant: None,
        replica: None,
        expires: None,
        subscriptions: HashMap::new(),
    };
    reader.run(stream, close_rx).await;
    reader.outbox.close_with(CloseReason::flush());
    for (_, subscription) in reader.subscriptions.drain() {
        let unsubscribe = Command::Unsubscribe { connection: id };
        let _ = timeout(CLOSE_TIMEOUT, subscription.lease.send(unsubscribe)).await;
    }
    drop(reader);
    let _ = writer.await;
    tracing::debug!(connection = id, "closed");
}

struct Reader {
    reassembler: Reassembler,
    shared: Arc<Shared>,
    outbox: Outbox,
    grant: Option<Grant>,
    replica: Option<ReplicaId>,
    expires: Option<Instant>,
    subscriptions: HashMap<DocumentId, Subscription>,
}

impl Reader {
    async fn run(
        &mut self,
        mut stream: SplitStream<WebSocket>,
        mut closed: watch::Receiver<Option<CloseReason>>,
    ) {
        let mut shutdown = self.shared.shutdown.clone();
        let idle = self.shared.config.idle_timeout;
        loop {
            let expires = self.expires;
            let far = Instant::now() + Duration::from_secs(86_400 * 365);
            let next = tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => {
                    self.fail(ErrorCode::ShuttingDown, None, "the server is shutting down");
                    return;
                }
                _ = closed.changed() => return,
                _ = tokio::time::sleep_until(expires.unwrap_or(far)), if expires.is_some() => {
                    self.fail(ErrorCode::TokenExpired, None, "the token expired");
                    return;
                }
                next = timeout(idle, stream.next()) => next,
            };
            let message = match next {
                Err(_) => {
                    tracing::debug!(connection = self.outbox.id, "idle timeout");
                    self.outbox.close_with(CloseReason::flush());
                    return;
                }
                Ok(None) => return,
                Ok(Some(Err(error))) => {
                    tracing::debug!(connection = self.outbox.id, %error, "socket error");
                    return;
                }
                Ok(Some(Ok(message))) => message,
            };
            let keep_going = match message {
                WsMessage::Binary(bytes) => {
                    self.shared
                        .metrics
                        .bytes_in
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    self.frame(&bytes).await
                }
                WsMessage::Text(_) => {
                    self.fail(
                        ErrorCode::MalformedFrame,
                        None,
                        "text frames are not part of the protocol",
                    );
                    false
                }
                WsMessage::Ping(_) | WsMessage::Pong(_) => true,
                WsMessage::Close(_) => false,
            };
            if !keep_going {
                return;
            }
        }
    }

    /// Sends an error and closes the connection after what is queued.
    fn fail(&self, code: ErrorCode, document: Option<DocumentId>, message: impl Into<String>) {
        let _ = self.outbox.send(Message::Error {
            code,
            document,
            message: message.into(),
        });
        self.outbox.close_with(CloseReason::flush());
    }

    /// Sends an error about one document; the connection stays open.
    fn refuse(&self, code: ErrorCode, document: DocumentId, message: impl Into<String>) {
        let _ = self.outbox.send(Message::Error {
            code,
            document: Some(document),
            message: message.into(),
        });
    }

    /// Handles one frame; false when the connection must close.
    async fn frame(&mut self, bytes: &[u8]) -> bool {
        if self.grant.as_ref().is_some_and(|g| g.expired(unix_now())) {
            self.fail(ErrorCode::TokenExpired, None, "the token expired");
            return false;
        }
        match self.reassembler.push(bytes) {
            Ok(None) => true,
            Ok(Some(message)) => self.message(message).await,
            Err(error) => {
                let code = match error {
                    DecodeError::TooLarge { .. } => ErrorCode::MessageTooLarge,
                    _ => ErrorCode::MalformedFrame,
                };
                tracing::debug!(connection = self.outbox.id, %error, "bad frame");
                self.fail(code, None, error.to_string());
                false
            }
        }
    }

    async fn message(&mut self, message: Message) -> bool {
        let Some(grant) = self.grant.clone() else {
            return match message {
                Message::Hello {
                    protocol_version,
                    replica,
                    token,
                } => self.hello(protocol_version, replica, token),
                other => {
                    let text = format!("the first message must be hello, not {}", other.name());
                    self.fail(ErrorCode::ProtocolViolation, None, text);
                    false
                }
            };
        };
        match message {
            Message::Subscribe {
                document,
                kind,
                since_seq,
            } => self.subscribe(&grant, document, kind, since_seq).await,
            Message::Unsubscribe { document } => {
                if let Some(subscription) = self.subscriptions.remove(&document) {
                    let connection = self.outbox.id;
                    subscription
                        .lease
                        .send(Command::Unsubscribe { connection })
                        .await;
                }
                true
            }
            Message::Sync { document, payload } => {
                let Some(subscription) = self.subscriptions.get(&document) else {
                    self.refuse(
                        ErrorCode::ProtocolViolation,
                        document,
                        "sync before subscribe",
                    );
                    return true;
                };
                let command = Command::Sync {
                    connection: self.outbox.id,
                    payload,
                };
                if !subscription.lease.send(command).await {
                    self.subscriptions.remove(&document);
                    self.refuse(
                        ErrorCode::Storage,
                        document,
                        "the document stopped; subscribe again",
                    );
                }
                true
            }
            other => {
                let text = format!("unexpected {} message", other.name());
                self.fail(ErrorCode::ProtocolViolation, None, text);
                false
            }
        }
    }

    fn hello(&mut self, protocol_version: u32, replica: ReplicaId, token: Option<String>) -> bool {
        if protocol_version != PROTOCOL_VERSION {
            let text =
                format!("this server speaks protocol {PROTOCOL_VERSION}, not {protocol_version}");
            self.fail(ErrorCode::UnsupportedVersion, None, text);
            return false;
        }
        if replica == server_replica() {
            let text = "the all-zero replica id is the server's own (it authors REST changes)";
            self.fail(ErrorCode::ProtocolViolation, None, text);
            return false;
        }
        let now = unix_now();
        match Grant::check(&self.shared.config.auth, token.as_deref(), now) {
            Ok(grant) => {
                self.expires = grant
                    .expires_at()
                    .map(|exp| Instant::now() + Duration::from_secs(exp.saturating_sub(now)));
                self.grant = Some(grant);
                self.replica = Some(replica);
                let config = &self.shared.config;
                self.outbox.send(Message::Welcome {
                    protocol_version: PROTOCOL_VERSION,
                    max_frame_bytes: config.max_frame_bytes as u64,
                    max_message_bytes: config.max_message_bytes as u64,
                })
            }
            Err(error) => {
                self.fail(error.code(), None, error.to_string());
                false
            }
        }
    }

    async fn subscribe(
        &mut self,
        grant: &Grant,
        document: DocumentId,
        kind: DocKind,
        since_seq: u64,
    ) -> bool {
        if !grant.covers(document) {
            self.refuse(
                ErrorCode::Forbidden,
                document,
                "the token does not cover this document",
            );
            return true;
        }
        if self.subscriptions.contains_key(&document) {
            self.refuse(ErrorCode::ProtocolViolation, document, "already subscribed");
            return true;
        }
        let limit = self.shared.config.max_documents_per_connection;
        if self.subscriptions.len() >= limit {
            let text = format!("at most {limit} documents per connection");
            self.refuse(ErrorCode::TooManyDocuments, document, text);
            return true;
        }
        let Some(lease) = self.shared.documents.acquire(document) else {
            self.fail(ErrorCode::ShuttingDown, None, "the server is shutting down");
            return false;
        };
        let (reply, answer) = oneshot::channel();
        let read_only = !grant.can_write();
        let command = Command::Subscribe {
            request: SubscribeRequest {
                out: self.outbox.clone(),
                replica: self.replica.unwrap_or_else(server_replica),
                kind,
                since_seq,
                read_only,
                may_create: !read_only,
            },
            reply,
        };
        if !lease.send(command).await {
            self.refuse(ErrorCode::Storage, document, "the document is unavailable");
            return true;
        }
        if answer.await == Ok(true) {
            self.subscriptions.insert(document, Subscription { lease });
        }
        true
    }
}

type Sink = SplitSink<WebSocket, WsMessage>;

async fn write_loop(
    mut sink: Sink,
    mut rx: mpsc::Receiver<Queued>,
    mut closed: watch::Receiver<Option<CloseReason>>,
    close: Arc<watch::Sender<Option<CloseReason>>>,
    shared: Arc<Shared>,
) {
    let mut writer = Writer { stream: 0, shared };
    let ping_every = (writer.shared.config.idle_timeout / 3).max(Duration::from_millis(10));
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    loop {
        tokio::select! {
            biased;
            _ = closed.changed() => break,
            message = rx.recv() => {
                let Some(message) = message else { break };
                let written = tokio::select! {
                    biased;
                    _ = closed.changed() => break,
                    written = writer.write_queued(&mut sink, message, &mut rx) => written,
                };
                if !written {
                    close_once(&close, CloseReason::flush());
                    return;
                }
            }
            _ = ping.tick() => {
                let sent = timeout(writer.shared.config.idle_timeout, sink.send(WsMessage::Ping(Default::default()))).await;
                if !matches!(sent, Ok(Ok(()))) {
                    close_once(&close, CloseReason::flush());
                    return;
                }
            }
        }
    }
    let reason = closed
        .borrow_and_update()
        .clone()
        .unwrap_or_else(CloseReason::flush);
    let _ = timeout(CLOSE_TIMEOUT, async {
        if reason.flush {
            while let Ok(message) = rx.try_recv() {
                if !writer.write(&mut sink, &message).await {
                    return;
                }
            }
        }
        if let Some(message) = &reason.message {
            writer.write(&mut sink, message).await;
        }
        let _ = sink.send(WsMessage::Close(None)).await;
        let _ = sink.close().await;
    })
    .await;
}

/// Messages written in one step of the writer before the socket is flushed: what piled up in the
/// queue goes out in one write (bounded, so the write buffer is too).
const WRITE_PER_FLUSH: usize = 256;

struct Writer {
    stream: u32,
    shared: Arc<Shared>,
}

impl Writer {
    /// Writes `first` and then whatever else is queued (up to [`WRITE_PER_FLUSH`] messages),
    /// flushing the socket once; false when the socket failed or one message (or the flush) made
    /// no progress for the idle timeout, so a long backlog to a slow but live client is not
    /// mistaken for a stall.
    async fn write_queued(
        &mut self,
        sink: &mut Sink,
        first: Queued,
        rx: &mut mpsc::Receiver<Queued>,
    ) -> bool {
        let stall = self.shared.config.idle_timeout;
        let written: Result<(), ()> = async {
            timeout(stall, self.feed(sink, &first))
                .await
                .map_err(drop)?
                .map_err(drop)?;
            for _ in 1..WRITE_PER_FLUSH {
                let Ok(message) = rx.try_recv() else { break };
                timeout(stall, self.feed(sink, &message))
                    .await
                    .map_err(drop)?
                    .map_err(drop)?;
            }
            timeout(stall, sink.flush())
                .await
                .map_err(drop)?
                .map_err(drop)
        }
        .await;
        written.is_ok()
    }

    /// Puts one message into the socket's write buffer as one or more frames.
    async fn feed(&mut self, sink: &mut Sink, message: &Message) -> Result<(), axum::Error> {
        match message {
            Message::Error { code, .. } | Message::Reject { code, .. } => {
                self.shared.metrics.count_error(*code)
            }
            _ => {}
        }
        self.stream = self.stream.wrapping_add(1);
        for frame in encode_frames(message, self.shared.config.max_frame_bytes, self.stream) {
            let len = frame.len() as u64;
            sink.feed(WsMessage::Binary(frame.into())).await?;
            self.shared
                .metrics
                .bytes_out
                .fetch_add(len, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Writes one message as one or more frames; false when the socket failed or stalled.
    async fn write(&mut self, sink: &mut Sink, message: &Message) -> bool {
        match message {
            Message::Error { code, .. } | Message::Reject { code, .. } => {
                self.shared.metrics.count_error(*code)
            }
            _ => {}
        }
        self.stream = self.stream.wrapping_add(1);
        let frames = encode_frames(message, self.shared.config.max_frame_bytes, self.stream);
        let stall = self.shared.config.idle_timeout;
        for frame in frames {
            let len = frame.len() as u64;
            match timeout(stall, sink.send(WsMessage::Binary(frame.into()))).await {
                Ok(Ok(())) => {
                    self.shared
                        .metrics
                        .bytes_out
                        .fetch_add(len, Ordering::Relaxed);
                }
                _ => return false,
            }
        }
        true
    }
}
