//! One WebSocket connection: hello and auth, limits, subscriptions, and the bounded outbound
//! queue.
//!
//! The reader (this task) joins frames with a [`Reassembler`] under the configured limits and
//! hands Sync payloads to document actors. A writer task owns the socket's sending half and
//! drains the connection's bounded queue (an [`Outbox`]/[`Inbox`] pair, also used by the foreign
//! protocols of `compat`); documents queue messages without waiting, and when the queue is full
//! the connection is closed with `Overloaded`: a slow client never blocks a document. Shutdown
//! closes every connection through the [`Registry`].
//! Outgoing messages larger than the frame limit are split with [`encode_frames`].
//! A malformed or oversized frame gets an error and closes this connection only.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use accord_engine::protocol::{
    encode_frames, DecodeError, ErrorCode, Message, Reassembler, PROTOCOL_VERSION,
};
use accord_engine::{DocKind, DocumentId, ReplicaId};
use axum::extract::ws::{Message as WsMessage, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{oneshot, Notify};
use tokio::time::{timeout, Instant};

use crate::auth::{unix_now, Grant};
use crate::document::{server_replica, Command, Lease, SubscribeRequest};
use crate::wake::{Wait, WakeOne};
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

    /// Send what is queued, then `message`, then close (shutdown).
    pub(crate) fn after(message: Message) -> Self {
        Self {
            message: Some(message),
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

/// A queued message.
pub(crate) type Queued = Message;

/// What a connection shares with the documents (and presence rooms) that send to it: the bounded
/// queue of messages, the close reason and the wake-ups, in one allocation.
///
/// Written by hand instead of a tokio `mpsc` channel plus a `watch` for the close: the channel
/// allocates its shared state (cache-padded, ~0.5 KB) and a first block of 32 slots (~0.3 KB)
/// when it is created, and the `watch` another ~0.4 KB, all of which every idle connection held
/// (BENCHMARKS.md, "5. Idle connections"). Here an idle connection holds this struct (~0.2 KB)
/// and the queue allocates only while it holds messages (the receiver takes the whole buffer).
/// The bound and the behaviour when it is reached (the connection is closed with `Overloaded`)
/// are the channel's.
struct Mailbox {
    id: u64,
    /// Messages the queue holds at most.
    bound: usize,
    state: Mutex<MailboxState>,
    /// Wakes the one task that drains the queue (a permit is kept when it is busy).
    wake: WakeOne,
    /// Wakes every task waiting for the close (`notify_waiters`; waiters check `state` after
    /// registering, so none misses it).
    closing: Notify,
    /// When the connection's task next has something to do by itself (a ping, the idle timeout,
    /// its token's expiry), as `compat`'s clock counts (milliseconds); `u64::MAX` for never.
    /// The server's one clock task wakes it then ([`Registry::wake_due`]), instead of a tokio
    /// timer in every connection's task (112 bytes for as long as the connection lives).
    deadline: AtomicU64,
}

struct MailboxState {
    queue: VecDeque<Queued>,
    /// Boxed: a reason holds a whole `Message`, and most connections never get one.
    close: Option<Box<CloseReason>>,
    /// The receiving side is gone: sends fail, as on a closed channel.
    gone: bool,
}

/// The sending side of a connection, as documents hold it.
#[derive(Clone)]
pub(crate) struct Outbox(Arc<Mailbox>);

/// The receiving side of a connection's queue: the task that writes to its socket.
pub(crate) struct Inbox(Arc<Mailbox>);

/// What [`Inbox::take`] took.
pub(crate) struct Taken {
    /// The messages, oldest first.
    pub(crate) messages: VecDeque<Queued>,
    /// Whether more are queued (the batch was cut at its maximum).
    pub(crate) more: bool,
}

impl CloseReason {
    /// The last message, if any (the foreign-protocol adapters of `compat` translate it).
    pub(crate) fn message(&self) -> Option<&Message> {
        self.message.as_ref()
    }
}

impl Mailbox {
    fn lock(&self) -> MutexGuard<'_, MailboxState> {
        // Nothing panics while holding it; a poisoned lock still holds consistent state.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Outbox {
    /// A connection's queue of at most `capacity` messages: the outbox documents send to, and
    /// the inbox its socket's writer (a native writer task, or a foreign-protocol adapter of
    /// `compat`, which translates what arrives) reads.
    pub(crate) fn detached(id: u64, capacity: usize) -> (Self, Inbox) {
        let mailbox = Arc::new(Mailbox {
            id,
            bound: capacity.max(1),
            state: Mutex::new(MailboxState {
                queue: VecDeque::new(),
                close: None,
                gone: false,
            }),
            wake: WakeOne::default(),
            closing: Notify::new(),
            deadline: AtomicU64::new(u64::MAX),
        });
        (Outbox(mailbox.clone()), Inbox(mailbox))
    }

    /// The connection's id.
    pub(crate) fn id(&self) -> u64 {
        self.0.id
    }

    /// Queues a message without waiting. False when the connection is gone or its queue is full
    /// (then it is being closed with `Overloaded`).
    pub(crate) fn send(&self, message: Message) -> bool {
        let mut state = self.0.lock();
        if state.gone {
            return false;
        }
        if state.queue.len() >= self.0.bound {
            drop(state);
            self.close_with(CloseReason::now(Message::Error {
                code: ErrorCode::Overloaded,
                document: None,
                message: "the connection did not keep up with its outbound queue".into(),
            }));
            return false;
        }
        state.queue.push_back(message);
        drop(state);
        self.0.wake.notify();
        true
    }

    /// Asks the connection to close (the first reason wins).
    pub(crate) fn close_with(&self, reason: CloseReason) {
        let mut state = self.0.lock();
        if state.close.is_some() {
            return;
        }
        state.close = Some(Box::new(reason));
        drop(state);
        self.0.wake.notify();
        self.0.closing.notify_waiters();
    }

    /// Wakes the connection's task (e.g. a presence relay queued something for it).
    pub(crate) fn wake(&self) {
        self.0.wake.notify();
    }

    /// Whether a close was asked for.
    pub(crate) fn is_closing(&self) -> bool {
        self.0.lock().close.is_some()
    }

    /// Completes once a close is asked for (at once if it was already).
    pub(crate) async fn closed(&self) {
        loop {
            let notified = self.0.closing.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.is_closing() {
                return;
            }
            notified.await;
        }
    }
}

impl Inbox {
    /// Takes up to `max` queued messages. A batch that takes the whole queue takes its buffer
    /// too, so an idle connection holds no queue memory.
    pub(crate) fn take(&self, max: usize) -> Taken {
        let mut state = self.0.lock();
        if state.queue.len() <= max {
            return Taken {
                messages: std::mem::take(&mut state.queue),
                more: false,
            };
        }
        let messages = state.queue.drain(..max).collect();
        Taken {
            messages,
            more: true,
        }
    }

    /// The close reason, once a close was asked for.
    pub(crate) fn close_reason(&self) -> Option<CloseReason> {
        self.0.lock().close.as_deref().cloned()
    }

    /// Completes when something was queued or a close was asked for since the last call (or
    /// spuriously: callers check [`Inbox::take`] and [`Inbox::close_reason`] after it).
    pub(crate) fn notified(&self) -> Wait<'_> {
        // (Not an `async fn`: its future would be larger, in every idle connection.)
        self.0.wake.wait()
    }

    /// Asks [`Registry::wake_due`] to wake this connection once its clock reads `at` (see
    /// [`Mailbox::deadline`]); `u64::MAX` for never. True when that changed the deadline.
    pub(crate) fn wake_at(&self, at: u64) -> bool {
        // Read first: most steps leave the deadline as it was, and a load keeps the line shared.
        if self.0.deadline.load(Ordering::Relaxed) == at {
            return false;
        }
        self.0.deadline.store(at, Ordering::Relaxed);
        true
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        // The reader is gone: later sends fail (documents drop the subscriber), and what is
        // queued is freed now rather than with the last outbox clone.
        let queue = {
            let mut state = self.0.lock();
            state.gone = true;
            std::mem::take(&mut state.queue)
        };
        drop(queue);
    }
}

/// Every open connection's outbox, so that shutdown closes them all with `ShuttingDown`.
///
/// Instead of each connection task waiting on the shutdown flag: that wait's future (~130
/// bytes with the receiver) sits in every idle connection's task, while an entry here is ~20.
#[derive(Default)]
pub(crate) struct Registry {
    state: Mutex<RegistryState>,
}

#[derive(Default)]
struct RegistryState {
    open: HashMap<u64, Outbox>,
    closing: bool,
}

/// The error a connection gets when the server shuts down.
pub(crate) fn shutting_down() -> Message {
    Message::Error {
        code: ErrorCode::ShuttingDown,
        document: None,
        message: "the server is shutting down".into(),
    }
}

/// An admitted connection: it holds one of the `max_connections` slots, counts in the
/// connections gauge and is in the [`Registry`]; dropping it gives all three back. One guard
/// (16 bytes in the connection's task) instead of a semaphore permit, a gauge guard and a
/// registry entry (40).
pub(crate) struct Admitted {
    shared: Arc<Shared>,
    id: u64,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, RegistryState> {
        // Nothing panics while holding it; a poisoned lock still holds consistent state.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Admits the connection of `outbox` to the server of `shared`: `Overloaded` when every
    /// connection slot is taken, `ShuttingDown` once the server is shutting down.
    pub(crate) fn admit(shared: &Arc<Shared>, outbox: &Outbox) -> Result<Admitted, ErrorCode> {
        let Ok(permit) = shared.connections.try_acquire() else {
            return Err(ErrorCode::Overloaded);
        };
        {
            let mut state = shared.open.lock();
            if state.closing {
                return Err(ErrorCode::ShuttingDown);
            }
            state.open.insert(outbox.id(), outbox.clone());
        }
        // Given back by `Admitted::drop`.
        permit.forget();
        shared.metrics.connections.fetch_add(1, Ordering::Relaxed);
        Ok(Admitted {
            shared: shared.clone(),
            id: outbox.id(),
        })
    }

    /// Wakes every open connection whose deadline ([`Inbox::wake_at`]) is `now` or earlier, and
    /// returns the earliest deadline of the others (`u64::MAX` when none has one). The server's
    /// clock task calls it when that deadline comes; a connection woken before it has moved its
    /// deadline is woken again, which costs it a look at the clock.
    pub(crate) fn wake_due(&self, now: u64) -> u64 {
        let state = self.lock();
        let mut earliest = u64::MAX;
        for outbox in state.open.values() {
            let deadline = outbox.0.deadline.load(Ordering::Relaxed);
            if deadline <= now {
                outbox.0.wake.notify();
            } else {
                earliest = earliest.min(deadline);
            }
        }
        earliest
    }

    /// Closes every open connection (after what is queued for it) with `ShuttingDown`, and
    /// refuses connections registering later.
    pub(crate) fn close_all(&self) {
        let open = {
            let mut state = self.lock();
            state.closing = true;
            std::mem::take(&mut state.open)
        };
        for outbox in open.values() {
            outbox.close_with(CloseReason::after(shutting_down()));
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.shared.open.lock().open.remove(&self.id);
        self.shared
            .metrics
            .connections
            .fetch_sub(1, Ordering::Relaxed);
        self.shared.connections.add_permits(1);
    }
}

struct Subscription {
    lease: Lease,
}

/// Serves one upgraded WebSocket until it closes.
pub(crate) async fn serve(socket: WebSocket, shared: Arc<Shared>) {
    let _alive = shared.alive.clone();
    let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
    let (mut sink, stream) = socket.split();
    let (outbox, inbox) = Outbox::detached(id, shared.config.outbound_queue);
    let _admitted = match Registry::admit(&shared, &outbox) {
        Ok(admitted) => admitted,
        Err(code) => {
            let refusal = if code == ErrorCode::ShuttingDown {
                shutting_down()
            } else {
                tracing::warn!(connection = id, "connection limit reached");
                Message::Error {
                    code,
                    document: None,
                    message: "the server is at its connection limit".into(),
                }
            };
            shared.metrics.count_error(code);
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
        }
    };
    let writer = tokio::spawn(write_loop(sink, inbox, outbox.clone(), shared.clone()));
    let mut reader = Reader {
        reassembler: Reassembler::new(shared.config.limits()),
        shared: shared.clone(),
        outbox,
        grant: None,
        replica: None,
        expires: None,
        subscriptions: HashMap::new(),
    };
    reader.run(stream).await;
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
    async fn run(&mut self, mut stream: SplitStream<WebSocket>) {
        let idle = self.shared.config.idle_timeout;
        loop {
            let expires = self.expires;
            let far = Instant::now() + Duration::from_secs(86_400 * 365);
            let next = tokio::select! {
                biased;
                _ = self.outbox.closed() => return,
                _ = tokio::time::sleep_until(expires.unwrap_or(far)), if expires.is_some() => {
                    self.fail(ErrorCode::TokenExpired, None, "the token expired");
                    return;
                }
                next = timeout(idle, stream.next()) => next,
            };
            let message = match next {
                Err(_) => {
                    tracing::debug!(connection = self.outbox.id(), "idle timeout");
                    self.outbox.close_with(CloseReason::flush());
                    return;
                }
                Ok(None) => return,
                Ok(Some(Err(error))) => {
                    tracing::debug!(connection = self.outbox.id(), %error, "socket error");
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
                    // Boxed: a frame's handling (subscribing, waiting for a document's inbox)
                    // needs more room than the wait for the next frame; held in place it would
                    // size every idle connection's task.
                    Box::pin(self.frame(&bytes)).await
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
                tracing::debug!(connection = self.outbox.id(), %error, "bad frame");
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
                    let connection = self.outbox.id();
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
                    connection: self.outbox.id(),
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
                self.expires = grant.expires_at().and_then(|exp| expiry(exp, now));
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
                acks: true,
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

/// When a token expiring at `exp` (Unix seconds) runs out, as an `Instant`; `None` (no expiry
/// timer) when that is too far to represent.
pub(crate) fn expiry(exp: u64, now: u64) -> Option<Instant> {
    Instant::now().checked_add(Duration::from_secs(exp.saturating_sub(now)))
}

type Sink = SplitSink<WebSocket, WsMessage>;

/// Writes what documents queue for one native connection, pings it, and closes it.
async fn write_loop(mut sink: Sink, inbox: Inbox, outbox: Outbox, shared: Arc<Shared>) {
    let mut writer = Writer { stream: 0, shared };
    let ping_every = (writer.shared.config.idle_timeout / 3).max(Duration::from_millis(10));
    let ping = tokio::time::sleep(ping_every);
    let mut ping = std::pin::pin!(ping);
    let mut more = false;
    loop {
        if inbox.close_reason().is_some() {
            break;
        }
        let taken = inbox.take(WRITE_PER_FLUSH);
        if taken.messages.is_empty() {
            if more {
                // The last batch was cut at its maximum: the permit that announced what is
                // left may be spent.
                more = false;
                continue;
            }
            tokio::select! {
                biased;
                _ = inbox.notified() => {}
                _ = ping.as_mut() => {
                    ping.as_mut().reset(Instant::now() + ping_every);
                    let ping = sink.send(WsMessage::Ping(Default::default()));
                    let sent = Box::pin(timeout(writer.shared.config.idle_timeout, ping)).await;
                    if !matches!(sent, Ok(Ok(()))) {
                        // The socket failed: nothing more can be written to it.
                        outbox.close_with(CloseReason::flush());
                        return;
                    }
                }
            }
            continue;
        }
        more = taken.more;
        let written = {
            // Boxed, like the close below: only the idle wait stays in the task's future.
            let mut write = Box::pin(writer.write_queued(&mut sink, taken.messages));
            tokio::select! {
                biased;
                _ = outbox.closed() => {
                    // A close that sends what is queued first lets the batch in hand finish
                    // (each message has its own stall timeout): cutting it here would drop
                    // the rest of the batch and leave a hole in the middle of the stream.
                    if !inbox.close_reason().is_some_and(|reason| reason.flush) {
                        break;
                    }
                    write.await
                }
                written = &mut write => written,
            }
        };
        if !written {
            outbox.close_with(CloseReason::flush());
            return;
        }
    }
    let reason = inbox.close_reason().unwrap_or_else(CloseReason::flush);
    let _ = Box::pin(timeout(CLOSE_TIMEOUT, async {
        if reason.flush {
            loop {
                let taken = inbox.take(WRITE_PER_FLUSH);
                if taken.messages.is_empty() {
                    break;
                }
                for message in &taken.messages {
                    if !writer.write(&mut sink, message).await {
                        return;
                    }
                }
            }
        }
        if let Some(message) = &reason.message {
            writer.write(&mut sink, message).await;
        }
        let _ = sink.send(WsMessage::Close(None)).await;
        let _ = sink.close().await;
    }))
    .await;
}

/// One step of a write (a feed or a flush), failed when it failed or made no progress for
/// `stall`: a slow but live client gets `stall` per step, not per batch.
pub(crate) async fn within<E>(
    stall: Duration,
    step: impl std::future::Future<Output = Result<(), E>>,
) -> Result<(), ()> {
    timeout(stall, step).await.map_err(drop)?.map_err(drop)
}

/// Messages written in one step of the writer before the socket is flushed: what piled up in the
/// queue goes out in one write (bounded, so the write buffer is too).
const WRITE_PER_FLUSH: usize = 256;

struct Writer {
    stream: u32,
    shared: Arc<Shared>,
}

impl Writer {
    /// Writes a batch taken from the queue (at most [`WRITE_PER_FLUSH`] messages), flushing the
    /// socket once; false when the socket failed or one message (or the flush) made no progress
    /// for the idle timeout, so a long backlog to a slow but live client is not mistaken for a
    /// stall.
    async fn write_queued(&mut self, sink: &mut Sink, batch: VecDeque<Queued>) -> bool {
        let stall = self.shared.config.idle_timeout;
        let written: Result<(), ()> = async {
            for message in &batch {
                within(stall, self.feed(sink, message)).await?;
            }
            within(stall, sink.flush()).await
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A message that says which it is.
    fn ack(seq: u8) -> Message {
        Message::Unsubscribe {
            document: DocumentId::from_bytes([seq; 16]),
        }
    }

    fn overloaded(reason: Option<CloseReason>) -> bool {
        matches!(
            reason.as_ref().and_then(CloseReason::message),
            Some(Message::Error {
                code: ErrorCode::Overloaded,
                ..
            })
        ) && reason.is_some_and(|r| !r.flush)
    }

    #[test]
    fn a_full_outbox_closes_the_connection_with_overloaded() {
        let (outbox, inbox) = Outbox::detached(7, 3);
        assert_eq!(outbox.id(), 7);
        for seq in 0..3 {
            assert!(outbox.send(ack(seq)));
        }
        assert!(inbox.close_reason().is_none());
        assert!(!outbox.send(ack(3)), "the fourth message is over the bound");
        assert!(overloaded(inbox.close_reason()));
        // The first reason wins.
        outbox.close_with(CloseReason::flush());
        assert!(overloaded(inbox.close_reason()));
        // What was queued before is still there, in order.
        let taken = inbox.take(10);
        assert!(!taken.more);
        let seqs: Vec<u8> = taken
            .messages
            .iter()
            .map(|m| match m {
                Message::Unsubscribe { document } => document.as_bytes()[0],
                _ => u8::MAX,
            })
            .collect();
        assert_eq!(seqs, vec![0, 1, 2]);
    }

    #[test]
    fn taking_everything_takes_the_buffer_and_batches_are_bounded() {
        let (outbox, inbox) = Outbox::detached(1, 100);
        for seq in 0..10 {
            assert!(outbox.send(ack(seq)));
        }
        let first = inbox.take(4);
        assert_eq!(first.messages.len(), 4);
        assert!(first.more);
        let rest = inbox.take(100);
        assert_eq!(rest.messages.len(), 6);
        assert!(!rest.more);
        assert_eq!(
            outbox.0.lock().queue.capacity(),
            0,
            "an empty queue holds no buffer"
        );
    }

    #[test]
    fn sends_fail_once_the_inbox_is_gone() {
        let (outbox, inbox) = Outbox::detached(1, 4);
        assert!(outbox.send(ack(1)));
        drop(inbox);
        assert!(!outbox.send(ack(2)));
        assert!(
            !outbox.is_closing(),
            "a gone connection is not closed by a send"
        );
    }

    #[tokio::test]
    async fn the_clock_wakes_the_connections_whose_deadline_has_come() {
        let registry = Registry::default();
        let due = Outbox::detached(1, 4);
        let later = Outbox::detached(2, 4);
        let never = Outbox::detached(3, 4);
        for (outbox, _) in [&due, &later, &never] {
            registry.lock().open.insert(outbox.id(), outbox.clone());
        }
        assert!(due.1.wake_at(1_000));
        assert!(!due.1.wake_at(1_000), "unchanged");
        assert!(later.1.wake_at(1_001));
        assert_eq!(registry.wake_due(1_000), 1_001, "the earliest not yet due");
        let now = Duration::from_millis(50);
        assert!(timeout(now, due.1.notified()).await.is_ok(), "due at 1,000");
        assert!(
            timeout(now, later.1.notified()).await.is_err(),
            "due at 1,001"
        );
        assert!(
            timeout(now, never.1.notified()).await.is_err(),
            "no deadline"
        );
        // Woken again at every tick until it tells a later deadline.
        assert_eq!(registry.wake_due(1_001), u64::MAX, "none left");
        assert!(timeout(now, due.1.notified()).await.is_ok());
        assert!(timeout(now, later.1.notified()).await.is_ok());
        due.1.wake_at(u64::MAX);
        assert_eq!(registry.wake_due(u64::MAX - 1), u64::MAX);
        assert!(timeout(now, due.1.notified()).await.is_err());
        assert!(timeout(now, never.1.notified()).await.is_err());
    }

    #[tokio::test]
    async fn sends_and_closes_wake_the_connection() {
        let (outbox, inbox) = Outbox::detached(1, 4);
        let sender = outbox.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            sender.send(ack(1));
            tokio::time::sleep(Duration::from_millis(20)).await;
            sender.close_with(CloseReason::flush());
        });
        let wait = Duration::from_secs(5);
        timeout(wait, inbox.notified())
            .await
            .expect("woken by the send");
        assert_eq!(inbox.take(4).messages.len(), 1);
        // Two waiters for the close: both complete.
        let (a, b) = tokio::join!(
            timeout(wait, outbox.closed()),
            timeout(wait, outbox.closed())
        );
        assert!(a.is_ok() && b.is_ok());
        assert!(inbox.close_reason().is_some_and(|r| r.flush));
        // Closed already: completes at once.
        timeout(wait, outbox.closed())
            .await
            .expect("already closed");
        task.await.unwrap();
    }
}
