//! Foreign sync protocols on Accord's port: what the y-websocket (`yws`) and automerge-repo
//! (`amrepo`) endpoints share.
//!
//! An adapter connection speaks the foreign wire format to its client and, on the other side,
//! subscribes to document actors exactly as a native connection does: with an [`Outbox`] (made
//! with [`Outbox::detached`]) whose messages it reads and translates instead of encoding them.
//! Its changes therefore get commit numbers, are durable before they are acknowledged, and go
//! through the invariant layer like any other; Accord clients of the same document see them.
//!
//! One task per connection ([`serve`]) takes what the documents and the presence relay queued,
//! writes what that step produced, then waits for the socket, a wake-up (something queued, or a
//! close asked for: by a document, a room, or shutdown through the connection [`Registry`], or
//! its next deadline come: a ping, the idle timeout, the token's expiry, told to the server's one
//! clock, [`keep_time`]). Every queue is bounded: the document outbox and the relay queue
//! ([`RelayQueue`]) hold `outbound_queue` items, and a connection that lets either fill is
//! closed with `Overloaded` (documents and rooms never wait for it). An idle connection is kept
//! small (~3.2 KB of RSS in all; see [`serve`]).
//!
//! Presence (y-websocket awareness, automerge-repo ephemeral messages) never reaches the document
//! actors: it is relayed between the foreign connections of a document through a [`Hub`].
//!
//! Errors: a frame that does not decode, is too large or breaks the protocol closes that
//! connection only, after a protocol-specific error message (y-websocket: an auth "permission
//! denied" message for refusals; automerge-repo: `{type: "error"}`), with the WebSocket close
//! code `4000 + n`, `n` being Accord's [`ErrorCode::code`], and the reason as close text.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use accord_engine::protocol::{ErrorCode, Message};
use accord_engine::{DocumentId, ReplicaId};
use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket};
use futures_util::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use tokio::time::{timeout, Instant};

use crate::auth::{unix_now, Grant};
use crate::connection::{within, Admitted, CloseReason, Inbox, Outbox, Registry};
use crate::Shared;

/// How long the last messages and the close frame may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the foreign endpoints share across connections.
pub(crate) struct Compat {
    /// The automerge-repo peer id of this server process.
    pub(crate) server_peer: Arc<str>,
    /// y-websocket awareness by room.
    pub(crate) awareness: crate::yws::AwarenessHub,
    /// automerge-repo ephemeral messages by document.
    pub(crate) ephemeral: crate::amrepo::EphemeralHub,
    /// Wakes the connections whose deadline has come ([`keep_time`]).
    pub(crate) clock: Arc<Clock>,
}

impl Compat {
    pub(crate) fn new() -> Self {
        let mut nonce = [0u8; 8];
        let _ = getrandom::fill(&mut nonce);
        let hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
        Self {
            server_peer: format!("accord-server-{hex}").into(),
            awareness: Hub::default(),
            ephemeral: Hub::default(),
            clock: Arc::default(),
        }
    }
}

/// Why an adapter connection stops: quietly (the client left) or with an error.
#[derive(Clone, Debug)]
pub(crate) struct Stop {
    pub(crate) code: Option<ErrorCode>,
    pub(crate) reason: String,
}

impl Stop {
    /// The client left, or the socket failed: no error to report.
    pub(crate) fn quiet() -> Self {
        Self {
            code: None,
            reason: String::new(),
        }
    }

    /// Closes with `code` and a reason the client can read.
    pub(crate) fn error(code: ErrorCode, reason: impl Into<String>) -> Self {
        Self {
            code: Some(code),
            reason: reason.into(),
        }
    }
}

/// The state of one adapter connection that the protocols use.
pub(crate) struct Conn {
    pub(crate) id: u64,
    pub(crate) shared: Arc<Shared>,
    /// What documents send to; read back by [`serve`].
    pub(crate) outbox: Outbox,
    pub(crate) grant: Grant,
    /// Frames to write after this step.
    out: Vec<WsMessage>,
}

impl Conn {
    /// Queues a binary frame to the client.
    pub(crate) fn send(&mut self, frame: Vec<u8>) {
        self.out.push(WsMessage::Binary(frame.into()));
    }

    /// Writes what is queued: every frame is fed to the socket's write buffer and the buffer is
    /// flushed once (one write for the whole step). False when the socket failed or one frame (or
    /// the flush) made no progress for the idle timeout: a slow but live client catching up on
    /// many large frames is not cut off for the size of its backlog. The frames' vector is
    /// dropped afterwards, so an idle connection keeps no capacity from its last step.
    async fn flush(&mut self, socket: &mut WebSocket) -> bool {
        if self.out.is_empty() {
            return true;
        }
        let stall = self.shared.config.idle_timeout;
        let out = std::mem::take(&mut self.out);
        let mut bytes = 0u64;
        let written: Result<(), ()> = async {
            for frame in out {
                if let WsMessage::Binary(b) = &frame {
                    bytes += b.len() as u64;
                }
                within(stall, socket.feed(frame)).await?;
            }
            within(stall, socket.flush()).await
        }
        .await;
        match written {
            Ok(()) => {
                self.shared
                    .metrics
                    .bytes_out
                    .fetch_add(bytes, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }
}

/// Messages taken from a connection's queues in one step before its frames are written: what
/// piled up while the connection waited goes out in one write (and, for y-websocket, as one
/// merged update). Bounded so one step's frames stay bounded too.
const DRAIN_PER_STEP: usize = 256;

/// One foreign protocol.
pub(crate) trait Protocol: Send + 'static {
    /// What its presence relay delivers to a member connection.
    type Relayed: Send + 'static;

    /// Runs once the connection is authenticated (e.g. y-websocket subscribes to its room).
    fn start(&mut self, conn: &mut Conn) -> impl Future<Output = Result<(), Stop>> + Send;

    /// A binary frame from the client (at most `max_message_bytes`).
    fn frame(
        &mut self,
        conn: &mut Conn,
        bytes: Bytes,
    ) -> impl Future<Output = Result<(), Stop>> + Send;

    /// A message a document actor sent to this connection.
    fn document(&mut self, conn: &mut Conn, message: Message) -> Result<(), Stop>;

    /// Something the presence relay delivered.
    fn relayed(&mut self, conn: &mut Conn, item: Self::Relayed) -> Result<(), Stop>;

    /// Called before the frames of a step are written: a protocol that holds back what it can
    /// coalesce (y-websocket merges the document updates of one step) queues it now.
    fn coalesce(&mut self, _conn: &mut Conn) {}

    /// The frames telling the client why it is closed (sent before the close frame).
    fn farewell(&mut self, stop: &Stop) -> Vec<Vec<u8>>;

    /// Unsubscribes from documents and leaves rooms.
    fn finish(&mut self, conn: &mut Conn) -> impl Future<Output = ()> + Send;
}

/// The largest WebSocket message the adapter endpoints let through to their own check: foreign
/// protocols have no chunking, so a whole message may be up to `max_message_bytes` (the limit
/// the native endpoint applies after joining chunks); a little more reaches [`serve`], which
/// answers with a clear `MessageTooLarge` instead of a bare socket error.
pub(crate) fn socket_limit(shared: &Shared) -> usize {
    shared.config.max_message_bytes.saturating_add(64 << 10)
}

/// Serves one upgraded WebSocket of a foreign protocol until it closes. `make` builds the
/// protocol state from the connection's relay queue.
///
/// Kept small while idle, because every idle connection holds this future in its task: the
/// phases that do not wait for long (opening, the protocol's start, closing) and a frame's
/// handling run boxed, so their futures take heap only while they run instead of room in this
/// one for the connection's lifetime; the socket is not split (writes happen between waits,
/// never during one); the pings, the idle timeout and the token's expiry need no timer here (the
/// server's one clock, [`keep_time`], wakes the connection when the earliest is due); and the
/// documents, the presence relay, a close request and the clock all wake the task through one
/// wake-up in the connection's outbox (a [`crate::wake::WakeOne`], whose wait is one pointer
/// where tokio's `Notified` is 64 bytes); the deadlines are kept in milliseconds. The result:
/// 640 bytes for a y-websocket connection in release builds (1,672 in session 10, 888 in
/// session 12, 760 with a timer of its own in session 18), in a task cell of 768 bytes (tokio's
/// cells are 128-byte aligned, with ~104 bytes of their own: 664 bytes is the most that fits).
///
/// Not an `async fn`: one moves its arguments into locals when it starts, so the socket (~370
/// bytes) would be stored twice; the block keeps it where it was captured.
#[allow(clippy::manual_async_fn)]
pub(crate) fn serve<P: Protocol, F>(
    mut socket: WebSocket,
    shared: Arc<Shared>,
    token: Option<String>,
    make: F,
) -> impl Future<Output = ()> + Send
where
    F: FnOnce(RelayQueue<P::Relayed>) -> P + Send + 'static,
{
    // Boxed: what the future captures stays in it for its whole life (captures are never
    // overlapped with later state), though only opening uses it.
    let opening = Box::new(Opening {
        shared,
        token,
        make,
    });
    async move {
        let _alive = opening.shared.alive.clone();
        let Some(session) = Box::pin(open(&mut socket, opening)).await else {
            return;
        };
        // (The session goes through the start and comes back: a start's result kept here
        // would take room in this future for the connection's life, and push what follows.)
        let Some(mut session) = Box::pin(start(&mut socket, session)).await else {
            return;
        };
        let stop = run(&mut socket, &mut session).await;
        Box::pin(finish(&mut socket, session, stop)).await;
    }
}

/// What opening a connection needs (see [`serve`]).
struct Opening<F> {
    shared: Arc<Shared>,
    token: Option<String>,
    make: F,
}

/// One accepted connection of a foreign protocol.
struct Session<P: Protocol> {
    conn: Conn,
    protocol: P,
    inbox: Inbox,
    relay: RelayQueue<P::Relayed>,
    _admitted: Admitted,
}

/// Takes a connection slot and checks the token; refuses the connection (and returns `None`)
/// when either fails.
async fn open<P: Protocol, F>(
    socket: &mut WebSocket,
    opening: Box<Opening<F>>,
) -> Option<Session<P>>
where
    F: FnOnce(RelayQueue<P::Relayed>) -> P,
{
    let Opening {
        shared,
        token,
        make,
    } = *opening;
    let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
    let queue = shared.config.outbound_queue.max(1);
    let (outbox, inbox) = Outbox::detached(id, queue);
    let relay = RelayQueue::new(queue, outbox.clone());
    let mut protocol = make(relay.clone());
    let admitted = match Registry::admit(&shared, &outbox) {
        Ok(admitted) => admitted,
        Err(code) => {
            let stop = if code == ErrorCode::ShuttingDown {
                Stop::error(code, "the server is shutting down")
            } else {
                tracing::warn!(connection = id, "connection limit reached");
                Stop::error(code, "the server is at its connection limit")
            };
            refuse(&shared, socket, protocol.farewell(&stop), &stop).await;
            return None;
        }
    };
    let grant = match Grant::check(&shared.config.auth, token.as_deref(), unix_now()) {
        Ok(grant) => grant,
        Err(error) => {
            let stop = Stop::error(error.code(), error.to_string());
            refuse(&shared, socket, protocol.farewell(&stop), &stop).await;
            return None;
        }
    };
    Some(Session {
        conn: Conn {
            id,
            shared,
            outbox,
            grant,
            out: Vec::new(),
        },
        protocol,
        inbox,
        relay,
        _admitted: admitted,
    })
}

/// Starts the protocol of `session`: the session back, or `None` when the start failed and the
/// connection was finished.
async fn start<P: Protocol>(socket: &mut WebSocket, mut session: Session<P>) -> Option<Session<P>> {
    match session.protocol.start(&mut session.conn).await {
        Ok(()) => Some(session),
        Err(stop) => {
            finish(socket, session, stop).await;
            None
        }
    }
}

/// Leaves documents and rooms, then writes the last frames and the close frame.
async fn finish<P: Protocol>(socket: &mut WebSocket, mut session: Session<P>, stop: Stop) {
    let Session { conn, protocol, .. } = &mut session;
    if let Some(code) = stop.code {
        tracing::debug!(connection = conn.id, ?code, reason = %stop.reason, "closing");
    }
    protocol.finish(conn).await;
    protocol.coalesce(conn);
    let mut last = std::mem::take(&mut conn.out);
    if stop.code.is_some() {
        // An error: what was queued no longer matters; the error does.
        last.retain(|m| !matches!(m, WsMessage::Ping(_)));
    }
    for frame in protocol.farewell(&stop) {
        last.push(WsMessage::Binary(frame.into()));
    }
    close(&conn.shared, socket, last, &stop).await;
}

/// The timers of one connection, served by one `Sleep`: pings at a third of the idle timeout,
/// the idle timeout since the last frame heard, and the token's expiry.
/// (The idle timeout is read from the config each time: a copy would be 16 more bytes in
/// every connection's task.)
struct Deadlines {
    next_ping: Millis,
    heard: Millis,
    /// [`Millis::NEVER`] without an expiring token.
    expires: Millis,
}

impl Deadlines {
    /// The deadlines of a connection that starts now.
    fn new(conn: &Conn) -> Self {
        let now = Millis::now();
        Self {
            next_ping: now.after(ping_every(conn.shared.config.idle_timeout)),
            heard: now,
            expires: conn
                .grant
                .expires_at()
                .and_then(|exp| crate::connection::expiry(exp, unix_now()))
                .map_or(Millis::NEVER, Millis::at),
        }
    }

    /// The timer fired: stops on the token's expiry or the idle timeout, queues a ping when
    /// one is due.
    fn fired(&mut self, conn: &mut Conn) -> Result<(), Stop> {
        let idle = conn.shared.config.idle_timeout;
        let now = Millis::now();
        if now >= self.expires {
            return Err(Stop::error(ErrorCode::TokenExpired, "the token expired"));
        }
        if now >= self.heard.after(idle) {
            tracing::debug!(connection = conn.id, "idle timeout");
            return Err(Stop::quiet());
        }
        if now >= self.next_ping {
            conn.out.push(WsMessage::Ping(Bytes::new()));
            self.next_ping = now.after(ping_every(idle));
        }
        Ok(())
    }

    /// The earliest deadline of `conn`.
    fn next(&self, conn: &Conn) -> Millis {
        self.next_ping
            .min(self.heard.after(conn.shared.config.idle_timeout))
            .min(self.expires)
    }
}

/// The one clock of every foreign-protocol connection's deadlines: each connection tells its
/// mailbox when it next has something to do by itself ([`Inbox::wake_at`]) and, when that is
/// earlier than the clock planned to look, the clock ([`Clock::tell`]); this task sleeps until
/// the earliest deadline and wakes the connections whose time has come. It looks at most once a
/// [`tick`] (a quarter of the ping interval, at most 250 ms, so a deadline is met that much late
/// at most, and deadlines close together are served by one look), and not at all while no
/// deadline is near: a server without connections does not wake. A tokio timer per connection
/// would take 112 bytes in each connection's task for its whole life (BENCHMARKS.md,
/// session 19). Holds the server weakly and ends with it.
pub(crate) async fn keep_time(shared: std::sync::Weak<Shared>) {
    let Some((clock, every, mut shutdown)) = shared.upgrade().map(|s| {
        (
            s.compat.clock.clone(),
            tick(s.config.idle_timeout),
            s.shutdown.clone(),
        )
    }) else {
        return;
    };
    clock
        .run(every, &mut shutdown, |now| {
            Some(shared.upgrade()?.open.wake_due(now))
        })
        .await;
}

/// When [`keep_time`] next looks at the connections' deadlines, and what wakes it earlier.
pub(crate) struct Clock {
    /// The earliest deadline it knows of, in [`Millis`]; `u64::MAX` while it knows of none (and
    /// while it looks, so that a deadline told during the look is not lost).
    next: AtomicU64,
    /// Wakes the clock after a connection lowered `next` (a permit is kept if it is not waiting).
    lowered: tokio::sync::Notify,
}

impl Default for Clock {
    fn default() -> Self {
        Self {
            next: AtomicU64::new(u64::MAX),
            lowered: tokio::sync::Notify::new(),
        }
    }
}

impl Clock {
    /// A connection's deadline is now `at` ([`Millis`]): the clock looks by then (or a tick
    /// after its last look, if that is later).
    pub(crate) fn tell(&self, at: u64) {
        // AcqRel: the look that takes `next` back to `u64::MAX` (a swap) sees the deadline the
        // connection stored before telling, or this lowers the `u64::MAX` it left.
        if self.next.fetch_min(at, Ordering::AcqRel) > at {
            self.lowered.notify_one();
        }
    }

    /// Until `look` returns `None` or `shutdown` turns true: sleeps until the earliest deadline
    /// told (at least `tick` after the last look), then calls `look` with the time, which wakes
    /// the connections due and returns the earliest deadline of the others.
    async fn run(
        &self,
        tick: Duration,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
        mut look: impl FnMut(u64) -> Option<u64>,
    ) {
        let mut last = Millis::now();
        let sleep = tokio::time::sleep_until(Instant::now());
        tokio::pin!(sleep);
        loop {
            if *shutdown.borrow() {
                return;
            }
            let next = self.next.load(Ordering::Acquire);
            // (A deadline too far for an `Instant` is never.)
            let at = (next != u64::MAX)
                .then(|| Millis(next).max(last.after(tick)))
                .and_then(|at| Millis::epoch().checked_add(Duration::from_millis(at.0)));
            let planned = at.is_some();
            if let Some(at) = at {
                sleep.as_mut().reset(at);
            }
            tokio::select! {
                biased;
                // (Looked at again at the top; a sender gone is a shutdown too.)
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
                () = self.lowered.notified() => continue,
                () = &mut sleep, if planned => {}
            }
            // Told from here on, a deadline lowers `u64::MAX` and is kept for the next sleep.
            self.next.swap(u64::MAX, Ordering::AcqRel);
            last = Millis::now();
            let Some(earliest) = look(last.0) else {
                return;
            };
            self.next.fetch_min(earliest, Ordering::AcqRel);
        }
    }
}

/// How often [`keep_time`] looks at the deadlines.
fn tick(idle: Duration) -> Duration {
    (ping_every(idle) / 4).clamp(Duration::from_millis(5), Duration::from_millis(250))
}

/// A time in milliseconds since the process first read this clock: a deadline in 8 bytes,
/// where an `Instant` takes 16 (three of them are stored in every connection's task).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Millis(u64);

impl Millis {
    /// Later than any deadline.
    const NEVER: Millis = Millis(u64::MAX);

    fn epoch() -> Instant {
        static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *EPOCH.get_or_init(Instant::now)
    }

    fn now() -> Self {
        Self::at(Instant::now())
    }

    /// `instant`, rounded down to the millisecond (an instant before the clock's first
    /// reading is its start).
    fn at(instant: Instant) -> Self {
        let since = instant.saturating_duration_since(Self::epoch()).as_millis();
        Millis(u64::try_from(since).map_or(u64::MAX - 1, |m| m.min(u64::MAX - 1)))
    }

    fn after(self, duration: Duration) -> Self {
        let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        Millis(self.0.saturating_add(millis))
    }
}

/// How often an idle connection is pinged: a third of the idle timeout.
fn ping_every(idle: Duration) -> Duration {
    (idle / 3).max(Duration::from_millis(10))
}

/// The main loop of [`serve`]: until the connection stops, takes what documents and the relay
/// queued, writes the step's frames, then waits for the socket, a wake-up or a deadline.
///
/// Only the wait's state lives in this future across the connection's idle time: the steps
/// before it are plain functions, and a frame's handling and a step's write run boxed.
///
/// Not an `async fn`: one moves its arguments into locals when it starts, so the two references
/// would be stored twice.
#[allow(clippy::manual_async_fn)]
fn run<'a, P: Protocol>(
    socket: &'a mut WebSocket,
    session: &'a mut Session<P>,
) -> impl Future<Output = Stop> + Send + 'a {
    async move {
        let mut deadlines = Deadlines::new(&session.conn);
        loop {
            // Woken by the server's clock ([`keep_time`]) or by anything else: a deadline due
            // is handled first (frames heard move the idle deadline later, so the one told to
            // the clock may have come early: it is told again).
            let mut due = deadlines.next(&session.conn);
            if Millis::now() >= due {
                // (Shutdown closes the connection through its outbox: see `Registry`.)
                if let Err(stop) = deadlines.fired(&mut session.conn) {
                    return stop;
                }
                due = deadlines.next(&session.conn);
            }
            if session.inbox.wake_at(due.0) {
                session.conn.shared.compat.clock.tell(due.0);
            }
            let more = match take_queued(session) {
                Ok(more) => more,
                Err(stop) => return stop,
            };
            let conn = &mut session.conn;
            if !conn.out.is_empty() && !Box::pin(conn.flush(socket)).await {
                return Stop::quiet();
            }
            // A frame's handling is made in the select and awaited after it, so that nothing of
            // the select (its output holds the frame) stays stored while the handling waits.
            let frame = tokio::select! {
                biased;
                next = socket.next() => {
                    deadlines.heard = Millis::now();
                    Some(Box::pin(on_frame(session, next)))
                }
                // A batch cut at its maximum leaves more queued, whose wake-up may be spent: go on
                // at once (after the socket had its turn).
                _ = std::future::ready(()), if more => None,
                _ = session.inbox.notified(), if !more => None,
            };
            if let Some(frame) = frame {
                if let Err(stop) = frame.await {
                    return stop;
                }
            }
        }
    }
}

/// One step's intake: a close asked for (by a document, a room, shutdown) stops the connection;
/// otherwise the messages documents queued and the relayed presence (each at most
/// [`DRAIN_PER_STEP`]) are translated into frames. `Ok(true)` when more are left queued.
fn take_queued<P: Protocol>(session: &mut Session<P>) -> Result<bool, Stop> {
    let Session {
        conn,
        protocol,
        inbox,
        relay,
        ..
    } = session;
    if let Some(reason) = inbox.close_reason() {
        return Err(match reason.message() {
            Some(Message::Error { code, message, .. }) => Stop::error(*code, message.clone()),
            Some(_) => Stop::quiet(),
            None => {
                // "Send what is queued, then close" (a failed commit queues its error first):
                // translate what is queued; an error in it is the stop.
                loop {
                    let taken = inbox.take(DRAIN_PER_STEP);
                    if taken.messages.is_empty() {
                        break Stop::quiet();
                    }
                    if let Err(stop) = taken
                        .messages
                        .into_iter()
                        .try_for_each(|message| protocol.document(conn, message))
                    {
                        break stop;
                    }
                }
            }
        });
    }
    let documents = inbox.take(DRAIN_PER_STEP);
    documents
        .messages
        .into_iter()
        .try_for_each(|message| protocol.document(conn, message))?;
    let (relayed, more) = relay.take(DRAIN_PER_STEP);
    relayed
        .into_iter()
        .try_for_each(|item| protocol.relayed(conn, item))?;
    protocol.coalesce(conn);
    Ok(documents.more || more)
}

/// What the socket gave: a binary frame goes to the protocol; the end, an error, a text frame
/// or a close frame stop the connection.
async fn on_frame<P: Protocol>(
    session: &mut Session<P>,
    next: Option<Result<WsMessage, axum::Error>>,
) -> Result<(), Stop> {
    let conn = &mut session.conn;
    match next {
        None => Err(Stop::quiet()),
        Some(Err(error)) => {
            tracing::debug!(connection = conn.id, %error, "socket error");
            Err(socket_error(&error.to_string()))
        }
        Some(Ok(WsMessage::Binary(bytes))) => {
            let shared = &conn.shared;
            shared
                .metrics
                .bytes_in
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            let limit = shared.config.max_message_bytes;
            if bytes.len() > limit {
                return Err(Stop::error(
                    ErrorCode::MessageTooLarge,
                    format!(
                        "a message of {} bytes is over the limit of {limit}",
                        bytes.len()
                    ),
                ));
            }
            session.protocol.frame(conn, bytes).await
        }
        Some(Ok(WsMessage::Text(_))) => Err(Stop::error(
            ErrorCode::MalformedFrame,
            "text frames are not part of the protocol",
        )),
        Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => Ok(()),
        Some(Ok(WsMessage::Close(_))) => Err(Stop::quiet()),
    }
}

/// What a socket error means: a message over tungstenite's limit is `MessageTooLarge`; a reset
/// or an I/O error is the client going away; anything else is a bad frame.
fn socket_error(text: &str) -> Stop {
    let lower = text.to_ascii_lowercase();
    if lower.contains("too long") || lower.contains("space limit") {
        Stop::error(
            ErrorCode::MessageTooLarge,
            format!("message too large: {text}"),
        )
    } else if lower.contains("reset")
        || lower.contains("closing handshake")
        || lower.contains("i/o")
        || lower.contains("io error")
        || lower.contains("connection closed")
        || lower.contains("broken pipe")
    {
        Stop::quiet()
    } else {
        Stop::error(
            ErrorCode::MalformedFrame,
            format!("bad WebSocket frame: {text}"),
        )
    }
}

/// Refuses a connection before it starts.
async fn refuse(shared: &Shared, socket: &mut WebSocket, frames: Vec<Vec<u8>>, stop: &Stop) {
    let frames = frames
        .into_iter()
        .map(|f| WsMessage::Binary(f.into()))
        .collect();
    close(shared, socket, frames, stop).await;
}

/// Sends the last frames and a close frame carrying the error, within [`CLOSE_TIMEOUT`].
async fn close(shared: &Shared, socket: &mut WebSocket, frames: Vec<WsMessage>, stop: &Stop) {
    if let Some(code) = stop.code {
        shared.metrics.count_error(code);
    }
    let frame = match stop.code {
        Some(code) => CloseFrame {
            code: 4000 + code.code().min(999),
            reason: truncate(&stop.reason, 120).into(),
        },
        None => CloseFrame {
            code: 1000,
            reason: "".into(),
        },
    };
    let _ = timeout(CLOSE_TIMEOUT, async {
        for message in frames {
            if socket.send(message).await.is_err() {
                return;
            }
        }
        let _ = socket.send(WsMessage::Close(Some(frame))).await;
        let _ = socket.close().await;
    })
    .await;
}

/// At most `max` bytes of `text`, cut at a character boundary (close reasons are limited).
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// A replica id derived from a label (the author recorded in the commit log for changes that
/// come through an adapter). Never the all-zero id of the server.
pub(crate) fn derived_replica(label: &str) -> ReplicaId {
    let digest = Sha256::digest(label.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[0] |= 0x80;
    ReplicaId::from_bytes(bytes)
}

/// A fresh random replica id (a y-websocket connection has no stable identity of its own).
pub(crate) fn random_replica() -> ReplicaId {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // No randomness: fall back to something unique in this process.
        return derived_replica(&format!("{:?}", std::time::SystemTime::now()));
    }
    bytes[0] |= 0x80;
    ReplicaId::from_bytes(bytes)
}

/// The namespace of y-websocket room names (a fixed, random UUID).
const ROOM_NAMESPACE: [u8; 16] = [
    0x6b, 0x1f, 0x3c, 0x2a, 0x9e, 0x47, 0x4d, 0x85, 0xa3, 0x0c, 0x51, 0x7e, 0x28, 0xd6, 0x94, 0x13,
];

/// The document of a y-websocket room: a room named by a UUID (any form `uuid` parses, e.g.
/// `0b4a…-…`) is that document; any other name is the name-based UUIDv8 of RFC 9562 (appendix
/// B.2): SHA-256 over the namespace `6b1f3c2a-9e47-4d85-a30c-517e28d69413` and the UTF-8 name,
/// the first 16 bytes with version 8 and the RFC variant set. Stable forever: it names stored
/// documents.
pub(crate) fn room_document(room: &str) -> DocumentId {
    if let Ok(id) = room.parse::<DocumentId>() {
        return id;
    }
    let mut hasher = Sha256::new();
    hasher.update(ROOM_NAMESPACE);
    hasher.update(room.as_bytes());
    let digest = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    DocumentId::from_bytes(bytes)
}

/// A relay of presence between the foreign connections of each document: members with a bounded
/// queue each, and per-room state `S`. The lock is held only to update a room and `try_send`
/// to its members; a member whose queue is full is closed with `Overloaded`.
pub(crate) struct Hub<T, S> {
    rooms: Mutex<HashMap<DocumentId, Room<T, S>>>,
}

/// One document's members and state.
pub(crate) struct Room<T, S> {
    /// By connection id, unordered. A `Vec`, not a `BTreeMap`: a map's first node holds room
    /// for 11 members (~0.2 KB), a room mostly has a few, and every loaded document has one.
    members: Vec<(u64, Member<T>)>,
    pub(crate) state: S,
}

struct Member<T> {
    queue: RelayQueue<T>,
}

/// A connection's queue of relayed presence: bounded like its outbox, and allocated only while
/// it holds items (the connection takes the whole buffer). Pushing wakes the connection through
/// its outbox.
///
/// Written by hand instead of a tokio `mpsc` channel, which allocates its shared state
/// (cache-padded, ~0.5 KB) and a first block of 32 slots when it is created: every idle
/// connection paid ~1 KB for a queue that is empty nearly always.
pub(crate) struct RelayQueue<T>(Arc<RelayInner<T>>);

struct RelayInner<T> {
    items: Mutex<VecDeque<T>>,
    /// Items it holds at most.
    bound: usize,
    /// The connection: woken on a push, closed when the queue is full.
    outbox: Outbox,
}

impl<T> Clone for RelayQueue<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> RelayQueue<T> {
    /// An empty queue of at most `bound` items for the connection of `outbox`.
    pub(crate) fn new(bound: usize, outbox: Outbox) -> Self {
        Self(Arc::new(RelayInner {
            items: Mutex::new(VecDeque::new()),
            bound: bound.max(1),
            outbox,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<T>> {
        // Nothing panics while holding it; a poisoned lock still holds consistent state.
        self.0
            .items
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `item` and wakes the connection; when the queue is full, drops it and closes the
    /// connection with `Overloaded` instead. False when it was full.
    pub(crate) fn push(&self, item: T) -> bool {
        let mut items = self.lock();
        if items.len() >= self.0.bound {
            drop(items);
            self.0.outbox.close_with(CloseReason::now(Message::Error {
                code: ErrorCode::Overloaded,
                document: None,
                message: "the connection did not keep up with presence updates".into(),
            }));
            return false;
        }
        items.push_back(item);
        drop(items);
        self.0.outbox.wake();
        true
    }

    /// Takes up to `max` items, oldest first, and whether more are left. Taking them all takes
    /// the buffer too.
    pub(crate) fn take(&self, max: usize) -> (VecDeque<T>, bool) {
        let mut items = self.lock();
        if items.len() <= max {
            return (std::mem::take(&mut *items), false);
        }
        (items.drain(..max).collect(), true)
    }
}

impl<T, S: Default> Default for Hub<T, S> {
    fn default() -> Self {
        Self {
            rooms: Mutex::new(HashMap::new()),
        }
    }
}

impl<T: Clone, S: Default> Hub<T, S> {
    fn lock(&self) -> MutexGuard<'_, HashMap<DocumentId, Room<T, S>>> {
        self.rooms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a member (its connection id and relay queue) and runs `f` on the room.
    pub(crate) fn join<R>(
        &self,
        room: DocumentId,
        member: u64,
        queue: RelayQueue<T>,
        f: impl FnOnce(&mut Room<T, S>) -> R,
    ) -> R {
        let mut rooms = self.lock();
        let room = rooms.entry(room).or_insert_with(|| Room {
            members: Vec::new(),
            state: S::default(),
        });
        let queue = Member { queue };
        match room.members.iter_mut().find(|(id, _)| *id == member) {
            Some((_, slot)) => *slot = queue,
            None => room.members.push((member, queue)),
        }
        f(room)
    }

    /// Runs `f` on the room, if it has members.
    pub(crate) fn with<R>(
        &self,
        room: DocumentId,
        f: impl FnOnce(&mut Room<T, S>) -> R,
    ) -> Option<R> {
        self.lock().get_mut(&room).map(f)
    }

    /// Removes a member, runs `f` on what is left, and drops the room when it is empty.
    pub(crate) fn leave(&self, room: DocumentId, member: u64, f: impl FnOnce(&mut Room<T, S>)) {
        let mut rooms = self.lock();
        let Some(entry) = rooms.get_mut(&room) else {
            return;
        };
        if let Some(at) = entry.members.iter().position(|(id, _)| *id == member) {
            entry.members.swap_remove(at);
        }
        f(entry);
        if entry.members.is_empty() {
            rooms.remove(&room);
        }
    }

    /// Rooms with members (for tests and metrics).
    #[allow(dead_code)]
    pub(crate) fn rooms(&self) -> usize {
        self.lock().len()
    }
}

impl<T: Clone, S> Room<T, S> {
    /// Sends `item` to every member but `except`, without waiting.
    pub(crate) fn broadcast(&self, except: u64, item: &T) {
        for (id, member) in &self.members {
            if *id == except {
                continue;
            }
            // A full queue closes that member with `Overloaded` (in `push`).
            member.queue.push(item.clone());
        }
    }

    /// How many members the room has.
    #[allow(dead_code)]
    pub(crate) fn len(&self) -> usize {
        self.members.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_in_milliseconds_keep_the_order_and_distance_of_instants() {
        // (Instants before the clock's first reading count as its start.)
        let _ = Millis::now();
        let earlier = Instant::now();
        let later = earlier + Duration::from_millis(1500);
        let (a, b) = (Millis::at(earlier), Millis::at(later));
        assert_eq!(b.0 - a.0, 1500);
        assert_eq!(a.after(Duration::from_millis(1500)), b);
        assert!(b < Millis::NEVER);
        assert_eq!(Millis::NEVER.after(Duration::from_secs(1)), Millis::NEVER);
    }

    #[tokio::test]
    async fn the_clock_sleeps_until_the_earliest_deadline_told() {
        /// A connection's deadline as the clock's `look` sees it, and when it was woken.
        type Deadline = (u64, Option<u64>);
        let deadlines: Arc<Mutex<Vec<Deadline>>> = Arc::default();
        let looks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let clock = Arc::new(Clock::default());
        let (stop, mut shutdown) = tokio::sync::watch::channel(false);
        let task = tokio::spawn({
            let (clock, deadlines, looks) = (clock.clone(), deadlines.clone(), looks.clone());
            async move {
                clock
                    .run(Duration::from_millis(5), &mut shutdown, |now| {
                        looks.fetch_add(1, Ordering::Relaxed);
                        let mut earliest = u64::MAX;
                        for (deadline, woken) in deadlines.lock().expect("lock").iter_mut() {
                            if *deadline <= now {
                                woken.get_or_insert(now);
                            } else {
                                earliest = earliest.min(*deadline);
                            }
                        }
                        Some(earliest)
                    })
                    .await;
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(looks.load(Ordering::Relaxed), 0, "no deadline: no look");

        // Two deadlines told (the later first); each is served when it comes, not before.
        let start = Millis::now();
        for after in [120, 60] {
            let at = start.after(Duration::from_millis(after)).0;
            deadlines.lock().expect("lock").push((at, None));
            clock.tell(at);
        }
        // (Waited for with a generous bound: a busy test machine may run the clock late.)
        let all_woken = || {
            deadlines
                .lock()
                .expect("lock")
                .iter()
                .all(|d| d.1.is_some())
        };
        for _ in 0..500 {
            if all_woken() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for (deadline, woken) in deadlines.lock().expect("lock").iter() {
            let woken = woken.expect("woken");
            assert!(woken >= *deadline, "woken at {woken}, before {deadline}");
        }
        let looked = looks.load(Ordering::Relaxed);
        assert!(
            (1..=4).contains(&looked),
            "{looked} looks for two deadlines"
        );

        // Nothing left: it sleeps again, and shutdown ends it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(looks.load(Ordering::Relaxed), looked);
        let _ = stop.send(true);
        assert!(timeout(Duration::from_secs(5), task).await.is_ok());
    }

    #[test]
    fn the_clock_ticks_four_times_a_ping_interval_within_bounds() {
        // The default idle timeout (60 s, a ping every 20 s): the ceiling.
        assert_eq!(tick(Duration::from_secs(60)), Duration::from_millis(250));
        // 600 ms (a ping every 200 ms): 50 ms.
        assert_eq!(tick(Duration::from_millis(600)), Duration::from_millis(50));
        // Tiny timeouts: the floor.
        assert_eq!(tick(Duration::from_millis(1)), Duration::from_millis(5));
    }

    #[test]
    fn room_names_map_stably() {
        let uuid = "0b4a1e4c-7d2e-4f61-9a8b-1c2d3e4f5a6b";
        assert_eq!(room_document(uuid).to_string(), uuid);
        let a = room_document("my-room");
        assert_eq!(a, room_document("my-room"));
        assert_ne!(a, room_document("my-room2"));
        let text = a.to_string();
        assert_eq!(&text[14..15], "8", "version 8: {text}");
        assert!(matches!(&text[19..20], "8" | "9" | "a" | "b"), "{text}");
        // Pinned (stored documents are named by this mapping; tests/node/helpers.js
        // computes the same in JavaScript).
        assert_eq!(text, "ddc3a3b1-1645-8205-9a30-226baafa1263");
    }

    #[test]
    fn a_full_relay_queue_closes_its_connection_with_overloaded() {
        let (outbox, inbox) = Outbox::detached(1, 16);
        let relay = RelayQueue::new(3, outbox.clone());
        for i in 0..3u8 {
            assert!(relay.push(i));
        }
        assert!(inbox.close_reason().is_none());
        assert!(!relay.push(3), "the fourth item is over the bound");
        let reason = inbox.close_reason().expect("closed");
        assert!(matches!(
            reason.message(),
            Some(Message::Error {
                code: ErrorCode::Overloaded,
                ..
            })
        ));
        let (first, more) = relay.take(2);
        assert_eq!((Vec::from(first), more), (vec![0, 1], true));
        let (rest, more) = relay.take(2);
        assert_eq!((Vec::from(rest), more), (vec![2], false));
        assert_eq!(relay.lock().capacity(), 0, "an empty queue holds no buffer");
    }

    #[test]
    fn a_room_relays_to_every_member_but_the_sender() {
        let hub: Hub<u8, ()> = Hub::default();
        let room = DocumentId::from_bytes([5; 16]);
        let queues: Vec<_> = (0..3u64)
            .map(|id| {
                let (outbox, inbox) = Outbox::detached(id, 4);
                let queue = RelayQueue::new(1, outbox);
                hub.join(room, id, queue.clone(), |_| ());
                (queue, inbox)
            })
            .collect();
        hub.with(room, |room| room.broadcast(0, &9));
        assert_eq!(Vec::from(queues[0].0.take(8).0), Vec::<u8>::new());
        assert_eq!(Vec::from(queues[1].0.take(8).0), vec![9]);
        // Member 2 did not take its item: its queue (bound 1) is full, and the next item
        // closes it.
        hub.with(room, |room| room.broadcast(0, &10));
        assert!(queues[1].1.close_reason().is_none());
        assert!(queues[2].1.close_reason().is_some());
        for id in 0..3 {
            hub.leave(room, id, |_| ());
        }
        assert_eq!(hub.rooms(), 0);
    }

    #[test]
    fn truncates_at_char_boundary() {
        assert_eq!(truncate("ééé", 3), "é");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
