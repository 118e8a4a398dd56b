//! One task per loaded document: the only place its state, head sequence number and subscribers
//! live.
//!
//! The actor drains every queued command of its document, applies the Sync payloads through one
//! [`DocSync`] per subscriber (role [`SyncRole::Downstream`]), gives each new change the next
//! sequence number and commits them all in one SQLite transaction (group commit). Only after the
//! commit does it acknowledge them to every subscriber and relay them; nothing is polled from a
//! sync state while uncommitted changes sit in the document. A document with no subscribers for
//! `idle_evict` is dropped from memory and reloaded from SQLite on next use.
//!
//! Architecture Invariant: no lock or sequence is shared across documents; the registry's lock is
//! held only to find or start an actor. The one queue they share is the store's (`storage`): its
//! writer thread commits the writes of every document queued at once in one transaction.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use accord_engine::invariant::{self, Conflict, Reconciler};
use accord_engine::protocol::{Commit, ErrorCode, Message, SyncPayload};
use accord_engine::sync::{DocSync, SyncRole};
use accord_engine::{Change, ChangeId, DocKind, Document, DocumentId, Op, ReplicaId};
use tokio::sync::{mpsc, oneshot};

use crate::actor_inbox::ActorInbox;
use crate::connection::{CloseReason, Outbox};
use crate::metrics::Metrics;
use crate::storage::Storage;
use crate::store::{NewCommit, StoreError, StoredDocument};
use crate::Config;

/// The server's own replica id: the author of the changes made over the REST API. Only a
/// document's actor edits it, so one fixed id serves every document.
pub(crate) fn server_replica() -> ReplicaId {
    ReplicaId::from_bytes([0; 16])
}

/// The connection id of REST changes (WebSocket connections count from 1).
const REST_CONNECTION: u64 = 0;

/// The "connection" of changes the reconciliation loop writes.
const RECONCILER_CONNECTION: u64 = u64::MAX;

/// Rounds of observe → act after one change; every round writes a fact that closes what it
/// acted on, so a second round is rare and a third means a rule keeps breaking.
const MAX_RECONCILE_ROUNDS: usize = 4;

/// The reconciliation period doubles at most this many times while violations stay open.
const MAX_BACKOFF: u8 = 4;

/// How long an actor whose document is not loaded (unknown, or refused) lingers.
const UNLOADED_LINGER: Duration = Duration::from_millis(100);

/// From this many subscribers on, an actor woken by a command yields once before it takes its
/// inbox: the runtime first runs the tasks already woken and looks for ready sockets, so the
/// other writers' updates of a burst that reached the server together join the first one's
/// relay instead of waiting behind its commit for a relay of their own. A relay costs every
/// subscriber a frame and a write; the yield costs the actor one more poll. Fan-out (100
/// subscribers, 10 writers, 5,000 and 6,000 changes a second): median 1.2-1.3 ms against
/// 1.6-1.7, p99 3.5-4.4 ms against 4.6-5.7, server CPU 0.77-0.82 cores against 0.83-0.89 (three
/// runs of each, alternated). With three subscribers a document rarely has a burst to gather, and the 1,000
/// documents load measured 0.21-0.23 cores against 0.19-0.22 with a yield on every wake-up
/// (BENCHMARKS.md, issue 8, session 18). Only Yrs documents: an Automerge document's relays
/// already go out in rounds (`sync_due`), not one per wake-up.
const GATHER_SUBSCRIBERS: usize = 8;

/// Commits per Ack message on catch-up.
const ACK_CHUNK: usize = 8_192;

/// A connection's request to follow a document.
pub(crate) struct SubscribeRequest {
    pub(crate) out: Outbox,
    pub(crate) replica: ReplicaId,
    pub(crate) kind: DocKind,
    pub(crate) since_seq: u64,
    pub(crate) read_only: bool,
    pub(crate) may_create: bool,
    /// Whether the connection wants [`Message::Ack`]s (the foreign protocols have no word for
    /// them: sending them would only wake the connection to drop them, once per commit).
    pub(crate) acks: bool,
}

/// The committed state of a document, for the REST API.
pub(crate) struct DocState {
    pub(crate) kind: DocKind,
    pub(crate) head_seq: u64,
    pub(crate) json: serde_json::Value,
}

/// What became of ops sent over the REST API.
pub(crate) enum Applied {
    /// They made one change, committed at `seq`.
    Committed { seq: u64, change: ChangeId },
    /// They changed nothing; the head is still `head_seq`.
    Unchanged { head_seq: u64 },
}

/// Why a REST request to a document failed.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// The document does not exist.
    Missing,
    /// The ops do not apply (nothing was committed).
    BadOps(String),
    /// Storage failed.
    Storage(String),
}

/// What a connection or a REST request asks of a document.
pub(crate) enum Command {
    /// Subscribe a connection.
    Subscribe {
        request: SubscribeRequest,
        reply: oneshot::Sender<bool>,
    },
    /// Read the committed state (REST).
    Read {
        reply: oneshot::Sender<Result<DocState, Refusal>>,
    },
    /// Apply ops as one change made by the server, committed, acknowledged and relayed like
    /// any other (REST).
    Apply {
        ops: Vec<Op>,
        reply: oneshot::Sender<Result<Applied, Refusal>>,
    },
    /// CRDT data from a subscribed connection.
    Sync {
        connection: u64,
        payload: SyncPayload,
    },
    /// The connection no longer follows the document.
    Unsubscribe { connection: u64 },
    /// The open conflicts (REST).
    Conflicts {
        reply: oneshot::Sender<Result<Vec<(String, Conflict)>, Refusal>>,
    },
    /// Settle an open conflict with one of its options, decided by `by` (REST).
    Choose {
        key: String,
        choice: usize,
        by: String,
        reply: oneshot::Sender<Result<Applied, Refusal>>,
    },
}

/// An actor's inbox of boxed commands (boxed: a queue of pointers stays small however large a
/// `Command` is).
type CommandInbox = ActorInbox<Box<Command>>;

/// The registry of document actors.
pub(crate) struct Documents {
    /// Shared by every actor (one copy of the schemas, not one per document).
    config: Arc<Config>,
    storage: Storage,
    metrics: Arc<Metrics>,
    alive: Mutex<Option<mpsc::Sender<()>>>,
    /// Each running actor's inbox (which counts its leases).
    entries: Mutex<HashMap<DocumentId, Arc<CommandInbox>>>,
}

/// A connection's hold on a document actor: while any lease is held the actor is not evicted.
pub(crate) struct Lease {
    inbox: Arc<CommandInbox>,
}

impl Lease {
    /// Sends a command, waiting for room in the document's inbox. False when the actor is gone.
    pub(crate) async fn send(&self, command: Command) -> bool {
        self.inbox.send(Box::new(command)).await
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.inbox.release();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Documents {
    pub(crate) fn new(
        config: Config,
        storage: Storage,
        metrics: Arc<Metrics>,
        alive: mpsc::Sender<()>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config: Arc::new(config),
            storage,
            metrics,
            alive: Mutex::new(Some(alive)),
            entries: Mutex::new(HashMap::new()),
        })
    }

    /// A lease on `document`'s actor, starting it if needed. `None` once shutting down.
    pub(crate) fn acquire(self: &Arc<Self>, document: DocumentId) -> Option<Lease> {
        let mut entries = lock(&self.entries);
        if let Some(inbox) = entries.get(&document) {
            if !inbox.is_closed() {
                inbox.lease();
                return Some(Lease {
                    inbox: inbox.clone(),
                });
            }
        }
        let alive = lock(&self.alive).clone()?;
        let inbox = Arc::new(ActorInbox::new(self.config.document_inbox, 1));
        entries.insert(document, inbox.clone());
        let actor = Actor {
            document,
            documents: self.clone(),
            state: None,
            subscribers: BTreeMap::new(),
            pending: Pending::default(),
            backoff: 0,
            held: BTreeSet::new(),
            sync_due: None,
            last_round: None,
            stash: Vec::new(),
        };
        tokio::spawn(actor.run(inbox.clone(), alive));
        Some(Lease { inbox })
    }

    /// Stops starting actors and tells every running one to stop (shutdown). Through their
    /// inboxes, not a `watch` channel: its receiver and `wait_for` future would be ~0.1 KB more
    /// in every loaded document's task.
    pub(crate) fn close(&self) {
        lock(&self.alive).take();
        for inbox in lock(&self.entries).values() {
            inbox.stop();
        }
    }

    /// Removes the actor of `document` if nobody holds a lease; true when removed.
    fn try_evict(&self, document: DocumentId, inbox: &Arc<CommandInbox>) -> bool {
        let mut entries = lock(&self.entries);
        if inbox.leased() != 0 {
            return false;
        }
        if entries
            .get(&document)
            .is_some_and(|e| Arc::ptr_eq(e, inbox))
        {
            entries.remove(&document);
        }
        true
    }

    /// Forgets the actor of `document` (it stopped).
    fn remove(&self, document: DocumentId, inbox: &Arc<CommandInbox>) {
        let mut entries = lock(&self.entries);
        if entries
            .get(&document)
            .is_some_and(|e| Arc::ptr_eq(e, inbox))
        {
            entries.remove(&document);
        }
    }
}

struct Loaded {
    /// The reconciliation loop, once the document declared a type the server has rules for
    /// (boxed: most documents have none, and it is ~400 bytes in place).
    reconciler: Option<Box<Reconciler>>,
    /// Whether the document's type was looked for already.
    typed: bool,
    doc: Document,
    kind: DocKind,
    head_seq: u64,
    head_change: Option<ChangeId>,
    since_snapshot: u64,
    /// Bytes of the changes stored since the last snapshot.
    bytes_since_snapshot: u64,
    /// Bytes of the last snapshot stored (0 for none).
    snapshot_bytes: u64,
}

struct Subscriber {
    out: Outbox,
    sync: DocSync,
    read_only: bool,
    replica: ReplicaId,
    /// Whether it is sent [`Message::Ack`]s.
    acks: bool,
    /// Whether it has been sent a sync message (until then it does not wait for a round).
    synced: bool,
}

struct PendingChange {
    connection: u64,
    author: ReplicaId,
    change: Change,
    /// For a repair: when the violation it repairs was detected.
    detected: Option<Instant>,
}

#[derive(Default)]
struct Pending {
    changes: Vec<PendingChange>,
    /// Yrs updates (sent on their own, so their author tracks their id) that brought nothing
    /// new: acknowledged with the sequence number they were committed at (or the head, if they
    /// arrived inside another update) so the author's outbox clears.
    duplicates: Vec<(u64, ChangeId)>,
    /// Subscribers whose sync state may have something due.
    dirty: BTreeSet<u64>,
    /// REST requests waiting for the commit of `changes[index]`.
    replies: Vec<(usize, oneshot::Sender<Result<Applied, Refusal>>)>,
    /// How many of `changes` (the first ones) went to the writable subscribers already (Yrs
    /// updates received while the last commit was in flight).
    relayed: usize,
}

impl Pending {
    /// Queues the changes `connection` sent (written by `author`) for the next commit, and
    /// notes their ids in `ids`.
    fn received(
        &mut self,
        connection: u64,
        author: ReplicaId,
        changes: Vec<Change>,
        ids: &mut Vec<ChangeId>,
    ) {
        for change in changes {
            ids.push(change.id);
            self.changes.push(PendingChange {
                connection,
                author,
                change,
                detected: None,
            });
        }
    }
}

/// The actor's timer as something to wait for: its deadline, or never without one.
struct Alarm<'a>(&'a mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>);

impl std::future::Future for Alarm<'_> {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        match self.0.as_mut() {
            Some(timer) => timer.as_mut().poll(cx),
            None => std::task::Poll::Pending,
        }
    }
}

/// (The config, the store and the metrics are reached through `documents`, which holds them:
/// three more pointers in every loaded document's task would cost a task cell size class.)
struct Actor {
    document: DocumentId,
    documents: Arc<Documents>,
    state: Option<Loaded>,
    /// Boxed: a B-tree node holds 11 entries, so one or two subscribers in place cost 1.4 KB.
    subscribers: BTreeMap<u64, Box<Subscriber>>,
    pending: Pending,
    /// The level-triggered reconciliation period is the config's doubled this many times (at
    /// most [`MAX_BACKOFF`]) while violations stay open.
    backoff: u8,
    /// Subscribers whose Automerge sync message waits for the next round (see
    /// [`Config::automerge_sync_interval`]), and when it is due.
    held: BTreeSet<u64>,
    sync_due: Option<Instant>,
    /// When the last round of Automerge sync messages went out.
    last_round: Option<Instant>,
    /// Automerge sync messages received while a round is not yet due: applied together just
    /// before it (see [`Actor::stash`]).
    stash: Vec<(u64, SyncPayload)>,
}

enum Found {
    Stored(StoredDocument),
    Created(DocKind),
    Missing,
}

impl Actor {
    /// The actor's life: commands in, commits, acknowledgements and relays out, until it is
    /// evicted, shut down or its storage fails.
    ///
    /// Not an `async fn`: one moves its arguments into locals when it starts, so the actor
    /// (~400 bytes) would be stored twice in every loaded document's task; the block keeps it
    /// where it was captured (as `compat::serve` does with its socket). The future is 592 bytes
    /// in release builds (920 in session 12, 784 in session 18), which fits tokio's task cell of
    /// 768 bytes (664 at most): the wait for a command is one pointer
    /// ([`crate::wake::WakeOne`]), the next wake-up is computed outside it
    /// ([`Actor::next_wake`]) and its timer is on the heap while one is due.
    #[allow(clippy::manual_async_fn)]
    fn run(
        mut self,
        inbox: Arc<CommandInbox>,
        alive: mpsc::Sender<()>,
    ) -> impl std::future::Future<Output = ()> + Send {
        async move {
            // (Held by this future without a local of its own: a local would be a second copy.)
            let _ = &alive;
            // On the heap, and only while a wake-up is due: a document with subscribers and no
            // rules to reconcile has none, and a timer in this future would take 112 bytes of
            // every loaded document's task.
            let mut timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
            loop {
                // Computed outside this future: the locals of the computation would be stored
                // in it while it waits.
                let (wake, evict_at) = self.next_wake();
                match (wake, timer.as_mut()) {
                    (Some(at), Some(timer)) => timer.as_mut().reset(at.into()),
                    (Some(at), None) => timer = Some(Box::pin(tokio::time::sleep_until(at.into()))),
                    (None, _) => timer = None,
                }
                let command = tokio::select! {
                    biased;
                    command = inbox.recv() => match command {
                        Some(command) => Some(command),
                        // Shutdown.
                        None => break,
                    },
                    () = Alarm(&mut timer) => None,
                };
                let first = match command {
                    Some(command) => command,
                    None if self.sync_due.is_some_and(|due| due <= Instant::now()) => {
                        // A round of sync messages is due: what came meanwhile goes in first.
                        self.drain_stash();
                        if let Err(error) = Box::pin(self.flush()).await {
                            self.fail(&error);
                            break;
                        }
                        continue;
                    }
                    None if evict_at.is_some_and(|at| at <= Instant::now()) => {
                        if self.documents.try_evict(self.document, &inbox) {
                            tracing::debug!(document = %self.document, "evicted");
                            break;
                        }
                        continue;
                    }
                    None => {
                        // Level-triggered: look again even though nothing was committed.
                        self.drain_stash();
                        let open = self.reconcile(Vec::new());
                        self.backoff = if open {
                            (self.backoff + 1).min(MAX_BACKOFF)
                        } else {
                            0
                        };
                        if let Err(error) = Box::pin(self.flush()).await {
                            self.fail(&error);
                            break;
                        }
                        continue;
                    }
                };
                if self.subscribers.len() >= GATHER_SUBSCRIBERS
                    && self.state.as_ref().is_some_and(|s| s.kind == DocKind::Yrs)
                {
                    // Let the rest of a burst come in first (see `GATHER_SUBSCRIBERS`).
                    tokio::task::yield_now().await;
                }
                let mut batch = vec![first];
                while batch.len() < self.documents.config.max_batch {
                    match inbox.try_recv() {
                        Some(command) => batch.push(command),
                        None => break,
                    }
                }
                // The error boxed: stored across the handling's await, a `StoreError` (88 bytes)
                // would take room in every loaded document's task.
                let mut result: Result<(), Box<StoreError>> = Ok(());
                let mut commands = batch.into_iter().peekable();
                while let Some(command) = commands.next() {
                    // Automerge sync messages queued back to back from different connections are
                    // received together: one apply for all their changes (see `receive_together`).
                    if let Command::Sync {
                        connection,
                        payload: payload @ SyncPayload::Automerge(_),
                    } = *command
                    {
                        let mut run = vec![(connection, payload)];
                        while let Some(next) = commands.next_if(|next| {
                            matches!(&**next, Command::Sync {
                                connection,
                                payload: SyncPayload::Automerge(_),
                            } if run.iter().all(|(c, _)| c != connection))
                        }) {
                            if let Command::Sync {
                                connection,
                                payload,
                            } = *next
                            {
                                run.push((connection, payload));
                            }
                        }
                        if !self.stash(&mut run) {
                            self.drain_stash();
                            self.receive_together(run);
                        }
                        continue;
                    }
                    self.drain_stash();
                    // Boxed (like the flushes below): the futures of a command's handling are
                    // larger than the idle actor; held in place they would size every actor's task.
                    result = Box::pin(self.handle(*command)).await.map_err(Box::new);
                    if result.is_err() {
                        break;
                    }
                }
                if result.is_ok() {
                    result = Box::pin(self.flush_relaying(&inbox))
                        .await
                        .map_err(Box::new);
                }
                if let Err(error) = result {
                    self.fail(&error);
                    break;
                }
            }
            self.documents.remove(self.document, &inbox);
            inbox.close();
            if self.state.take().is_some() {
                self.documents
                    .metrics
                    .documents_loaded
                    .fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// A commit failed: nothing of it was acknowledged. Every subscriber's connection is closed
    /// so its client resyncs from what is durable.
    fn fail(&mut self, error: &StoreError) {
        tracing::error!(document = %self.document, %error, "document stopped");
        for subscriber in self.subscribers.values() {
            let _ = subscriber.out.send(Message::Error {
                code: ErrorCode::Storage,
                document: Some(self.document),
                message: format!("storage failed; nothing was acknowledged: {error}"),
            });
            subscriber.out.close_with(CloseReason::flush());
        }
        self.subscribers.clear();
    }

    async fn handle(&mut self, command: Command) -> Result<(), StoreError> {
        match command {
            Command::Subscribe { request, reply } => {
                self.flush().await?;
                let ok = self.subscribe(request).await?;
                let _ = reply.send(ok);
                Ok(())
            }
            Command::Read { reply } => {
                self.flush().await?;
                let read = self.ensure_loaded().await.map(|()| {
                    let state = self.state.as_ref();
                    DocState {
                        kind: state.map_or(DocKind::Automerge, |s| s.kind),
                        head_seq: state.map_or(0, |s| s.head_seq),
                        json: state.map_or(serde_json::Value::Null, |s| s.doc.to_json()),
                    }
                });
                let _ = reply.send(read);
                Ok(())
            }
            Command::Apply { ops, reply } => self.apply(ops, reply).await,
            Command::Sync {
                connection,
                payload,
            } => {
                self.receive(connection, payload);
                Ok(())
            }
            Command::Conflicts { reply } => {
                self.flush().await?;
                let answer = self.ensure_loaded().await.map(|()| {
                    self.state.as_ref().map_or_else(Vec::new, |state| {
                        invariant::read_records(&state.doc)
                            .open_conflicts()
                            .map(|(k, c)| (k.clone(), c.clone()))
                            .collect()
                    })
                });
                let _ = reply.send(answer);
                Ok(())
            }
            Command::Choose {
                key,
                choice,
                by,
                reply,
            } => {
                self.flush().await?;
                if let Err(refusal) = self.ensure_loaded().await {
                    let _ = reply.send(Err(refusal));
                    return Ok(());
                }
                let ops = match self.state.as_ref() {
                    Some(state) => invariant::choose(&state.doc, &key, choice, &by),
                    None => {
                        let _ = reply.send(Err(Refusal::Missing));
                        return Ok(());
                    }
                };
                match ops {
                    Ok(ops) => self.apply(ops, reply).await,
                    Err(error) => {
                        let _ = reply.send(Err(Refusal::BadOps(error.to_string())));
                        Ok(())
                    }
                }
            }
            Command::Unsubscribe { connection } => {
                self.subscribers.remove(&connection);
                self.pending.dirty.remove(&connection);
                Ok(())
            }
        }
    }

    fn error(&self, out: &Outbox, code: ErrorCode, message: impl Into<String>) {
        let _ = out.send(Message::Error {
            code,
            document: Some(self.document),
            message: message.into(),
        });
    }

    /// Loads the document, creating it as `create` when it is missing and that is given.
    async fn load(&mut self, create: Option<DocKind>) -> Result<Option<Loaded>, StoreError> {
        let document = self.document;
        let mut found = match self
            .documents
            .storage
            .read(move |store| store.load(document))
            .await?
        {
            Some(stored) => Found::Stored(stored),
            None => Found::Missing,
        };
        if let (Found::Missing, Some(kind)) = (&found, create) {
            found = if self.documents.storage.create(document, kind).await? {
                Found::Created(kind)
            } else {
                // Created meanwhile (over REST): load what is stored.
                match self
                    .documents
                    .storage
                    .read(move |store| store.load(document))
                    .await?
                {
                    Some(stored) => Found::Stored(stored),
                    None => Found::Missing,
                }
            };
        }
        let loaded = match found {
            Found::Missing => return Ok(None),
            Found::Created(kind) => Loaded {
                reconciler: None,
                typed: false,
                doc: Document::new(kind, server_replica(), document),
                kind,
                head_seq: 0,
                head_change: None,
                since_snapshot: 0,
                bytes_since_snapshot: 0,
                snapshot_bytes: 0,
            },
            Found::Stored(stored) => {
                let doc = Document::load(
                    stored.kind,
                    server_replica(),
                    document,
                    stored.snapshot.as_deref(),
                    stored.changes.iter().map(Vec::as_slice),
                )
                .map_err(|e| StoreError::Corrupt {
                    document: document.to_string(),
                    detail: e.to_string(),
                })?;
                Loaded {
                    reconciler: None,
                    typed: false,
                    doc,
                    kind: stored.kind,
                    head_seq: stored.head_seq,
                    head_change: stored.head_change,
                    since_snapshot: stored.changes.len() as u64,
                    bytes_since_snapshot: stored.changes.iter().map(|c| c.len() as u64).sum(),
                    snapshot_bytes: stored.snapshot.as_ref().map_or(0, |s| s.len() as u64),
                }
            }
        };
        self.documents
            .metrics
            .documents_loaded
            .fetch_add(1, Ordering::Relaxed);
        Ok(Some(loaded))
    }

    /// Makes a loaded document the actor's, and starts its reconciliation loop at once: the
    /// entries a stored document already holds rank at its head, before anything committed from
    /// now on. (Started lazily at the first change instead, the loop would rank them together
    /// with that change, and "the later change loses" would pick among them by key: after a
    /// restart or an eviction, an entry committed long ago could lose to a new one.)
    fn install(&mut self, loaded: Loaded) {
        self.state = Some(loaded);
        // Anything found open here is acted on like the timer's findings (its repair commits
        // with the next flush); whether something stays open only matters to the timer.
        let _ = self.reconcile(Vec::new());
    }

    /// Loads the document if needed (never creating it), for the REST API.
    async fn ensure_loaded(&mut self) -> Result<(), Refusal> {
        if self.state.is_some() {
            return Ok(());
        }
        match self.load(None).await {
            Ok(Some(loaded)) => {
                self.install(loaded);
                Ok(())
            }
            Ok(None) => Err(Refusal::Missing),
            Err(error) => {
                tracing::error!(document = %self.document, %error, "load failed");
                Err(Refusal::Storage(format!(
                    "the document does not load: {error}"
                )))
            }
        }
    }

    /// Applies REST ops as one change of the server's; it waits in `pending` for the commit,
    /// which answers `reply`. Ops that fail leave nothing behind: a Yrs document that took part
    /// of them is reloaded from storage (it was flushed first, so only that part is lost).
    async fn apply(
        &mut self,
        ops: Vec<Op>,
        reply: oneshot::Sender<Result<Applied, Refusal>>,
    ) -> Result<(), StoreError> {
        if self.state.as_ref().is_some_and(|s| s.kind == DocKind::Yrs) {
            self.flush().await?;
        }
        if let Err(refusal) = self.ensure_loaded().await {
            let _ = reply.send(Err(refusal));
            return Ok(());
        }
        // Nothing is pending for a Yrs document here: it was flushed above, or it was not loaded
        // (and nothing is received for a document that is not loaded).
        let Some(state) = self.state.as_mut() else {
            let _ = reply.send(Err(Refusal::Missing));
            return Ok(());
        };
        match state.doc.apply_ops(&ops) {
            Ok(Some(change)) => {
                self.pending
                    .replies
                    .push((self.pending.changes.len(), reply));
                self.pending.changes.push(PendingChange {
                    connection: REST_CONNECTION,
                    author: server_replica(),
                    change: change.clone(),
                    detected: None,
                });
                self.reconcile(vec![change.id]);
            }
            Ok(None) => {
                let head_seq = state.head_seq;
                let _ = reply.send(Ok(Applied::Unchanged { head_seq }));
            }
            Err(partial) => {
                if partial.change.is_some() {
                    // Memory never runs ahead of storage: drop the half-applied document.
                    self.state = None;
                    self.documents
                        .metrics
                        .documents_loaded
                        .fetch_sub(1, Ordering::Relaxed);
                    let Some(loaded) = self.load(None).await? else {
                        return Err(StoreError::Corrupt {
                            document: self.document.to_string(),
                            detail: "vanished while loaded".into(),
                        });
                    };
                    self.install(loaded);
                }
                let _ = reply.send(Err(Refusal::BadOps(partial.error.to_string())));
            }
        }
        Ok(())
    }

    /// Subscribes a connection; false when refused (the connection was told why). Only a failed
    /// commit is an error; a failed load or read is reported to this subscriber alone.
    async fn subscribe(&mut self, request: SubscribeRequest) -> Result<bool, StoreError> {
        let SubscribeRequest {
            out,
            replica,
            kind,
            since_seq,
            read_only,
            may_create,
            acks,
        } = request;
        if self.state.is_none() {
            match self.load(may_create.then_some(kind)).await {
                Ok(Some(loaded)) => self.install(loaded),
                Ok(None) => {
                    self.error(&out, ErrorCode::UnknownDocument, "no such document");
                    return Ok(false);
                }
                Err(error) => {
                    tracing::error!(document = %self.document, %error, "load failed");
                    self.error(
                        &out,
                        ErrorCode::Storage,
                        format!("the document does not load: {error}"),
                    );
                    return Ok(false);
                }
            }
        }
        let Some(state) = self.state.as_ref() else {
            return Ok(false);
        };
        if state.kind != kind {
            let message = format!("the document is {}, not {kind}", state.kind);
            self.error(&out, ErrorCode::KindMismatch, message);
            return Ok(false);
        }
        let (head_seq, head_change) = (state.head_seq, state.head_change);
        let document = self.document;
        let limit = self.documents.config.max_catchup_acks;
        let own = if since_seq < head_seq {
            match self
                .documents
                .storage
                .read(move |store| store.commits_by(document, since_seq, replica, limit))
                .await
            {
                Ok(own) => own,
                Err(error) => {
                    self.error(
                        &out,
                        ErrorCode::Storage,
                        format!("the commit log does not read: {error}"),
                    );
                    return Ok(false);
                }
            }
        } else {
            Vec::new()
        };
        let mut commits: Vec<Commit> = own
            .into_iter()
            .map(|(seq, change)| Commit { seq, change })
            .collect();
        if let Some(change) = head_change.filter(|_| head_seq > since_seq) {
            if commits.last().map(|c| c.seq) != Some(head_seq) {
                commits.push(Commit {
                    seq: head_seq,
                    change,
                });
            }
        }
        let subscribed = out.send(Message::Subscribed {
            document,
            kind,
            head_seq,
            read_only,
        });
        for chunk in commits.chunks(ACK_CHUNK) {
            let _ = out.send(Message::Ack {
                document,
                commits: chunk.to_vec(),
            });
        }
        if !subscribed {
            return Ok(false);
        }
        let connection = out.id();
        self.subscribers.insert(
            connection,
            Box::new(Subscriber {
                out,
                sync: DocSync::new(kind, SyncRole::Downstream),
                read_only,
                replica,
                acks,
                synced: false,
            }),
        );
        self.pending.dirty.insert(connection);
        Ok(true)
    }

    /// Applies a payload from a subscriber; new changes wait in `pending` for the commit.
    fn receive(&mut self, connection: u64, payload: SyncPayload) {
        let document = self.document;
        let (Some(state), Some(subscriber)) =
            (self.state.as_mut(), self.subscribers.get_mut(&connection))
        else {
            return;
        };
        if payload.kind() != state.kind {
            let _ = subscriber.out.send(Message::Error {
                code: ErrorCode::KindMismatch,
                document: Some(document),
                message: format!(
                    "sync data for {} sent to a {} document",
                    payload.kind(),
                    state.kind
                ),
            });
            return;
        }
        let update_id = match &payload {
            SyncPayload::YrsUpdate(bytes) | SyncPayload::YrsStep2(bytes) => {
                Some(ChangeId::of_bytes(bytes))
            }
            _ => None,
        };
        // A step 2 is a merge its sender does not track by id: it is never acknowledged as such;
        // nor is anything sent by a connection that takes no acknowledgements.
        let single_update = subscriber.acks && matches!(payload, SyncPayload::YrsUpdate(_));
        let payload = if subscriber.read_only {
            let (payload, refused) =
                refuse_writes(document, &mut state.doc, &subscriber.out, payload);
            if refused && state.kind == DocKind::Automerge {
                // Its writes were refused (each with `Forbidden`): from now on the read-only
                // sync state stops asking the peer for them, which it would otherwise do again
                // every round, forever.
                subscriber.sync.set_read_only(true);
            }
            match payload {
                Some(payload) => payload,
                None => return,
            }
        } else {
            payload
        };
        match subscriber.sync.receive(&mut state.doc, payload) {
            Ok(received) => {
                // An incomplete update (its dependencies are missing) is not here: no ack.
                if received.changes.is_empty() && single_update && !received.incomplete {
                    if let Some(id) = update_id {
                        self.pending.duplicates.push((connection, id));
                    }
                }
                let mut ids = Vec::new();
                self.pending
                    .received(connection, subscriber.replica, received.changes, &mut ids);
                // The whole message is in the document now: reconcile once, naming all of it
                // (the reconciler credits each entry to the change that wrote it).
                if !ids.is_empty() {
                    self.reconcile(ids);
                }
                return self.mark_dirty(connection);
            }
            Err(error) => {
                let message = match update_id {
                    Some(change) => Message::Reject {
                        document,
                        change,
                        code: ErrorCode::InvalidChange,
                        reason: error.to_string(),
                    },
                    None => Message::Error {
                        code: ErrorCode::InvalidChange,
                        document: Some(document),
                        message: error.to_string(),
                    },
                };
                let _ = subscriber.out.send(message);
            }
        }
        self.pending.dirty.insert(connection);
    }

    /// Keeps Automerge sync messages (`run`, taken from it) for the next round of sync messages
    /// when one is not yet due: the peers would not hear of their changes before it anyway, and
    /// applied together just before it they cost Automerge one walk of the document instead of
    /// one each (a walk of the whole text per apply since Automerge 0.7). Under load that is
    /// most of the server's work: with 32 typists, half its CPU was applying keystrokes one by
    /// one. Returns `false` (and leaves `run`) when a round is due now, or the stash would hold
    /// more than [`Config::max_batch`] messages.
    fn stash(&mut self, run: &mut Vec<(u64, SyncPayload)>) -> bool {
        let automerge = self
            .state
            .as_ref()
            .is_some_and(|s| s.kind == DocKind::Automerge);
        let Some(next) = self
            .next_round()
            .filter(|next| automerge && Instant::now() < *next)
        else {
            return false;
        };
        // At most a batch's worth waits; beyond, everything is received at once.
        if self.stash.len() + run.len() > self.documents.config.max_batch {
            return false;
        }
        self.stash.append(run);
        self.sync_due = Some(self.sync_due.map_or(next, |due| due.min(next)));
        true
    }

    /// The earliest time the next round of Automerge sync messages may go out (`None`: any
    /// time).
    fn next_round(&self) -> Option<Instant> {
        next_round(
            self.last_round,
            self.documents.config.automerge_sync_interval,
        )
    }

    /// Receives the stashed Automerge sync messages together, in as few runs as one peer has
    /// messages ([`runs_by_rank`]): a peer's second message is received after its first.
    fn drain_stash(&mut self) {
        for run in runs_by_rank(std::mem::take(&mut self.stash)) {
            self.receive_together(run);
        }
    }

    /// Automerge sync messages from different connections, received together: their changes
    /// go into the document with one apply ([`DocSync::receive_many`]), which under load (when
    /// messages queue up behind an apply) spares Automerge a walk of the whole text for every
    /// message. One message, or any that is not from a writable subscriber of a loaded
    /// Automerge document, is received on its own as before.
    fn receive_together(&mut self, mut run: Vec<(u64, SyncPayload)>) {
        let together = run.len() > 1
            && self
                .state
                .as_ref()
                .is_some_and(|s| s.kind == DocKind::Automerge)
            && run.iter().all(|(connection, _)| {
                self.subscribers
                    .get(connection)
                    .is_some_and(|s| !s.read_only)
            });
        if !together {
            for (connection, payload) in run {
                self.receive(connection, payload);
            }
            return;
        }
        // The subscribers come out of the map in the order of their ids: the messages too.
        run.sort_by_key(|(connection, _)| *connection);
        let (connections, payloads): (Vec<u64>, Vec<SyncPayload>) = run.into_iter().unzip();
        let Some(state) = self.state.as_mut() else {
            return;
        };
        let mut peers: Vec<&mut DocSync> = self
            .subscribers
            .iter_mut()
            .filter(|(id, _)| connections.binary_search(id).is_ok())
            .map(|(_, s)| &mut s.sync)
            .collect();
        let results = DocSync::receive_many(&mut state.doc, &mut peers, payloads);
        let with_changes = results
            .iter()
            .filter(|r| r.as_ref().is_ok_and(|r| !r.changes.is_empty()))
            .count();
        if with_changes > 1 {
            self.documents
                .metrics
                .automerge_applied_together
                .fetch_add(with_changes as u64, Ordering::Relaxed);
        }
        let mut ids = Vec::new();
        for (connection, result) in connections.into_iter().zip(results) {
            let Some(subscriber) = self.subscribers.get(&connection) else {
                continue;
            };
            match result {
                Ok(received) => {
                    self.pending.received(
                        connection,
                        subscriber.replica,
                        received.changes,
                        &mut ids,
                    );
                }
                Err(error) => {
                    let _ = subscriber.out.send(Message::Error {
                        code: ErrorCode::InvalidChange,
                        document: Some(self.document),
                        message: error.to_string(),
                    });
                }
            }
            self.mark_dirty(connection);
        }
        // Everything is in the document now: reconcile once, naming all of it.
        if !ids.is_empty() {
            self.reconcile(ids);
        }
    }

    /// When the actor wakes up if no command comes first, and when that is to evict the idle
    /// document: one timer for the reconciliation period, the sync throttle and the eviction
    /// (each timer is ~0.1 KB in every actor's task).
    fn next_wake(&self) -> (Option<Instant>, Option<Instant>) {
        let idle = self.subscribers.is_empty();
        let linger = if self.state.is_some() {
            self.documents.config.idle_evict
        } else {
            self.documents.config.idle_evict.min(UNLOADED_LINGER)
        };
        let now = Instant::now();
        let tick = self.documents.config.reconcile_interval * (1u32 << self.backoff);
        let reconcile_at = (!idle && self.reconciling()).then(|| now + tick);
        let evict_at = idle.then(|| now + linger);
        let wake = reconcile_at
            .into_iter()
            .chain(self.sync_due)
            .chain(evict_at)
            .min();
        (wake, evict_at)
    }

    fn reconciling(&self) -> bool {
        self.state.as_ref().is_some_and(|s| s.reconciler.is_some())
    }

    fn mark_dirty(&mut self, connection: u64) {
        self.pending.dirty.insert(connection);
    }

    /// The reconciliation loop after the changes just queued (one message's worth; they commit
    /// as the next sequence numbers): observe, compare, act, and again, bounded. Repairs queue
    /// behind them in the same
    /// group commit, so they are durable before anything about them is acknowledged. Returns
    /// whether violations stay open (waiting for a person, or failing to repair).
    fn reconcile(&mut self, changes: Vec<ChangeId>) -> bool {
        let document = self.document;
        let Some(state) = self.state.as_mut() else {
            return false;
        };
        if state.reconciler.is_none() && !state.typed {
            if let Some(document_type) = invariant::read_type(&state.doc) {
                state.typed = true;
                if let Some(schema) = self
                    .documents
                    .config
                    .schemas
                    .iter()
                    .find(|s| s.document_type == document_type)
                {
                    state.reconciler = Some(Box::new(Reconciler::new(
                        schema, document, state.kind, "server", true,
                    )));
                }
            }
        }
        let Some(reconciler) = state.reconciler.as_mut() else {
            return false;
        };
        let mut changes = changes;
        // The first round ranks what arrived at the first sequence number of the batch.
        let mut batch = changes.len().max(1) as u64 - 1;
        for _ in 0..MAX_RECONCILE_ROUNDS {
            let seq = state.head_seq + self.pending.changes.len() as u64 - batch;
            batch = 0;
            let violations = reconciler.observe(&mut state.doc, Some(seq), &changes);
            if violations.is_empty() {
                return false;
            }
            // Read the clock only when there is something to repair (not after every change).
            let detected = Instant::now();
            let before = reconciler.stats().clone();
            let ops = reconciler.act(&violations, Some(seq));
            let after = reconciler.stats();
            for v in &violations {
                self.documents
                    .metrics
                    .count_invariant(v.kind, v.policy.name(), "found");
            }
            for (outcome, now, then) in [
                ("resolved", &after.resolved, &before.resolved),
                ("asked", &after.asked, &before.asked),
            ] {
                for ((kind, policy), n) in now {
                    for _ in then.get(&(*kind, *policy)).copied().unwrap_or(0)..*n {
                        self.documents
                            .metrics
                            .count_invariant(kind, policy, outcome);
                    }
                }
            }
            if ops.is_empty() {
                return true;
            }
            match state.doc.apply_ops(&ops) {
                Ok(Some(repair)) => {
                    tracing::info!(%document, seq, repairs = violations.len(), "reconciled");
                    changes = vec![repair.id];
                    self.pending.changes.push(PendingChange {
                        connection: RECONCILER_CONNECTION,
                        author: server_replica(),
                        change: repair,
                        detected: Some(detected),
                    });
                }
                Ok(None) => return true,
                Err(partial) => {
                    tracing::error!(%document, error = %partial.error, "a repair did not apply");
                    if let Some(repair) = partial.change {
                        // Applied in part (Yrs): it is in the document, so it is committed.
                        self.pending.changes.push(PendingChange {
                            connection: RECONCILER_CONNECTION,
                            author: server_replica(),
                            change: repair,
                            detected: Some(detected),
                        });
                    }
                    return true;
                }
            }
        }
        true
    }

    /// Commits what is pending in one transaction, then acknowledges, relays and polls.
    async fn flush(&mut self) -> Result<(), StoreError> {
        self.flush_with(None).await
    }

    /// [`Actor::flush`], taking Yrs updates from `inbox` while a slow commit is in flight (see
    /// [`Actor::relay_while_committing`]), then committing those, and so on until nothing
    /// waits for a commit.
    async fn flush_relaying(&mut self, inbox: &CommandInbox) -> Result<(), StoreError> {
        loop {
            self.flush_with(Some(inbox)).await?;
            let pending = &self.pending;
            if pending.changes.is_empty()
                && pending.duplicates.is_empty()
                && pending.dirty.is_empty()
            {
                return Ok(());
            }
        }
    }

    /// While `commit` is in flight past [`RELAY_DURING_COMMIT`], takes the Yrs updates that
    /// writable subscribers sent meanwhile (the oldest commands in `inbox`, while they are such
    /// updates), applies them and relays them to the writable subscribers together, and again
    /// every [`RELAY_DURING_COMMIT`] until the commit is done; they are committed (and
    /// acknowledged) by the next flush. Otherwise the actor waits for each commit before it
    /// looks at its inbox again, so a slow commit (a disk whose fsync takes milliseconds, a
    /// stall) held back every change that arrived during it, though writers hear of changes
    /// before their commit. A commit faster than that changes nothing: what came during it is
    /// relayed after it in one batch, as before (relaying each update as it came cost a frame
    /// per update per subscriber: 1.6 cores instead of 0.9 at 8,000 updates a second to 100
    /// subscribers). Anything else in the inbox (and everything behind it) waits for the
    /// commit, so each connection's commands keep their order, and so does everything once
    /// [`Config::max_batch`] changes wait for the next commit (the writers are held back by the
    /// full inbox again). Only for a Yrs document without invariants to check (the reconciler
    /// numbers what it observes by commit order).
    async fn relay_while_committing(
        &mut self,
        commit: impl std::future::Future<Output = Result<(), StoreError>>,
        inbox: &CommandInbox,
    ) -> Result<(), StoreError> {
        // The subscribers do not change during the commit (only commands change them).
        let writable: Vec<u64> = self
            .subscribers
            .iter()
            .filter(|(_, s)| !s.read_only)
            .map(|(id, _)| *id)
            .collect();
        let mut commit = std::pin::pin!(commit);
        loop {
            tokio::select! {
                biased;
                result = &mut commit => return result,
                () = tokio::time::sleep(RELAY_DURING_COMMIT) => {}
            }
            // At most a batch waits for the next commit; beyond, the inbox fills and holds the
            // writers back, as it does while the actor waits.
            let room = self.documents.config.max_batch;
            while self.pending.changes.len() + self.pending.duplicates.len() < room {
                let Some(command) = inbox.try_recv_if(|c| is_update_from(c, &writable)) else {
                    break;
                };
                if let Command::Sync {
                    connection,
                    payload,
                } = *command
                {
                    self.receive(connection, payload);
                }
            }
            self.relay_received();
        }
    }

    /// Relays the Yrs changes received since the last relay to the writable subscribers (see
    /// [`Actor::relay_while_committing`]).
    fn relay_received(&mut self) {
        let document = self.document;
        let Some(state) = self.state.as_mut() else {
            return;
        };
        let Some(fresh) = self
            .pending
            .changes
            .get(self.pending.relayed..)
            .filter(|fresh| !fresh.is_empty())
        else {
            return;
        };
        let gone = relay_to_writers(
            fresh,
            &mut self.subscribers,
            &mut state.doc,
            document,
            &mut None,
        );
        self.documents
            .metrics
            .yrs_relayed_during_commit
            .fetch_add(fresh.len() as u64, Ordering::Relaxed);
        self.pending.relayed = self.pending.changes.len();
        // The next flush finds them gone and drops them.
        self.pending.dirty.extend(gone);
    }

    /// [`Actor::flush`]; with `inbox`, Yrs updates are taken from it while a slow commit is in
    /// flight ([`Actor::relay_while_committing`]).
    async fn flush_with(&mut self, inbox: Option<&CommandInbox>) -> Result<(), StoreError> {
        // A round due now takes what waits for it first (stashed before the round came due).
        if !self.stash.is_empty() && self.next_round().is_none_or(|next| next <= Instant::now()) {
            self.drain_stash();
        }
        let pending = std::mem::take(&mut self.pending);
        let Some(state) = self.state.as_mut() else {
            return Ok(());
        };
        let document = self.document;
        let mut dirty = pending.dirty;
        let mut dead = Vec::new();
        if !pending.changes.is_empty() {
            let head = state.head_seq;
            let commits: Vec<NewCommit> = pending
                .changes
                .iter()
                .zip(head + 1..)
                .map(|(p, seq)| NewCommit {
                    seq,
                    change: p.change.id,
                    author: p.author,
                    bytes: p.change.bytes.clone(),
                })
                .collect();
            let count = commits.len() as u64;
            let since_snapshot = state.since_snapshot + count;
            let bytes_since = state.bytes_since_snapshot
                + commits.iter().map(|c| c.bytes.len() as u64).sum::<u64>();
            let snapshot = compaction_due(
                since_snapshot,
                bytes_since,
                state.snapshot_bytes,
                self.documents.config.compact_every,
            )
            .then(|| state.doc.save());
            let snapshot_len = snapshot.as_ref().map(|s| s.len() as u64);
            let compacted = snapshot.is_some();
            let acked: Vec<Commit> = commits
                .iter()
                .map(|c| Commit {
                    seq: c.seq,
                    change: c.change,
                })
                .collect();
            // Yrs changes reach the writable subscribers before their commit, not after it: the
            // commit (an fsync) is most of a relay's latency. Nothing is acknowledged before it
            // is durable, and a relayed change the server then loses is not lost: its author
            // resends it until acknowledged, and every writable subscriber that holds it gives
            // it back on its next sync (both sides of a Yrs or Automerge sync send what the
            // other lacks). A read-only subscriber could not give it back (its writes are
            // refused), so it hears of changes only once they are durable.
            // (What came in while the last commit was in flight went to them then: see
            // `relay_while_committing`.)
            let mut merged = None;
            if state.kind == DocKind::Yrs {
                // The merge is kept for the read-only subscribers only if it covers everything.
                let mut merged_rest = None;
                let (unrelayed, merge) = match pending.relayed {
                    0 => (pending.changes.as_slice(), &mut merged),
                    relayed => (
                        pending.changes.get(relayed..).unwrap_or_default(),
                        &mut merged_rest,
                    ),
                };
                dead.extend(relay_to_writers(
                    unrelayed,
                    &mut self.subscribers,
                    &mut state.doc,
                    document,
                    merge,
                ));
            }
            let relaying = state.kind == DocKind::Yrs
                && state.reconciler.is_none()
                && (state.typed || self.documents.config.schemas.is_empty());
            let started = Instant::now();
            let documents = Arc::clone(&self.documents);
            let commit = async move {
                documents
                    .storage
                    .commit(document, head, commits, snapshot)
                    .await
            };
            match inbox.filter(|_| relaying) {
                Some(inbox) => self.relay_while_committing(commit, inbox).await?,
                None => commit.await?,
            }
            let Some(state) = self.state.as_mut() else {
                return Ok(());
            };
            self.documents.metrics.observe_commit(started.elapsed());
            for change in &pending.changes {
                if let Some(detected) = change.detected {
                    self.documents.metrics.observe_repair(detected.elapsed());
                }
            }
            self.documents
                .metrics
                .commits
                .fetch_add(1, Ordering::Relaxed);
            self.documents
                .metrics
                .changes_committed
                .fetch_add(count, Ordering::Relaxed);
            state.head_seq = head + count;
            state.head_change = acked.last().map(|c| c.change);
            for (index, reply) in pending.replies {
                if let Some(commit) = acked.get(index) {
                    let _ = reply.send(Ok(Applied::Committed {
                        seq: commit.seq,
                        change: commit.change,
                    }));
                }
            }
            state.since_snapshot = if compacted { 0 } else { since_snapshot };
            state.bytes_since_snapshot = if compacted { 0 } else { bytes_since };
            if let Some(len) = snapshot_len {
                state.snapshot_bytes = len;
            }
            let ack = Message::Ack {
                document,
                commits: acked,
            };
            for (id, subscriber) in &self.subscribers {
                if subscriber.acks && !subscriber.out.send(ack.clone()) {
                    dead.push(*id);
                }
            }
            if state.kind == DocKind::Yrs {
                relay_yrs(&pending.changes, &mut self.subscribers, true, &mut merged);
            }
            dirty.extend(self.subscribers.keys().copied());
        }
        let Some(state) = self.state.as_mut() else {
            return Ok(());
        };
        let duplicates = if pending.duplicates.is_empty() {
            Vec::new()
        } else {
            let ids: Vec<ChangeId> = pending.duplicates.iter().map(|(_, id)| *id).collect();
            let found = self
                .documents
                .storage
                .read(move |store| store.seqs_of(document, &ids))
                .await;
            match found {
                Ok(seqs) => pending.duplicates.into_iter().zip(seqs).collect(),
                Err(error) => {
                    // Not acknowledged now; the author resends them on its next sync.
                    tracing::warn!(document = %document, %error, "duplicate lookup failed");
                    Vec::new()
                }
            }
        };
        for ((connection, change), seq) in duplicates {
            if let Some(subscriber) = self.subscribers.get(&connection).filter(|s| s.acks) {
                let ack = Message::Ack {
                    document,
                    commits: vec![Commit {
                        seq: seq.unwrap_or(state.head_seq),
                        change,
                    }],
                };
                if !subscriber.out.send(ack) {
                    dead.push(connection);
                }
            }
        }
        // Automerge peers get sync messages in rounds, at most one round per interval: what is
        // due meanwhile waits (in `held`) and goes out together, each peer one message. Nothing
        // is lost by waiting: a sync state computes its message from the document and what
        // the peer has, not from a queue. One round for all peers (not one interval per peer)
        // so that what arrives between rounds is applied together (see `stash`).
        let interval = self.documents.config.automerge_sync_interval;
        let rounds = state.kind == DocKind::Automerge && !interval.is_zero();
        let now = Instant::now();
        dirty.append(&mut self.held);
        self.sync_due = None;
        if let Some(next) =
            next_round(self.last_round, interval).filter(|next| rounds && now < *next)
        {
            // A peer never sent anything yet (a new subscriber) is answered at once.
            let (fresh, waiting): (BTreeSet<u64>, BTreeSet<u64>) = std::mem::take(&mut dirty)
                .into_iter()
                .partition(|c| self.subscribers.get(c).is_some_and(|s| !s.synced));
            dirty = fresh;
            if !waiting.is_empty() {
                self.held = waiting;
                self.sync_due = Some(next);
            }
        }
        let mut sent = false;
        for connection in dirty {
            let Some(subscriber) = self.subscribers.get_mut(&connection) else {
                continue;
            };
            match send_due(subscriber, &mut state.doc, document) {
                Due::Nothing => {}
                Due::Sent => sent = true,
                Due::Gone => dead.push(connection),
            }
        }
        if sent && rounds {
            self.last_round = Some(now);
        }
        // Stashed messages are received before the next round, whether or not a peer waits.
        if !self.stash.is_empty() && self.sync_due.is_none() {
            self.sync_due = Some(next_round(self.last_round, interval).unwrap_or(now));
        }
        for connection in dead {
            self.subscribers.remove(&connection);
        }
        // Nothing new came in, nothing went out and nothing waits: the peers that answered are
        // up to date, so the bytes kept to send recent changes on are dropped (an idle
        // document keeps none; a peer that still lacks one gets it rebuilt).
        if pending.changes.is_empty() && !sent && self.held.is_empty() && self.stash.is_empty() {
            state.doc.forget_recent_changes();
        }
        Ok(())
    }
}

/// Splits `messages` (connection, message) into runs of distinct connections: each
/// connection's first message in the first run, its second in the second, and so on, in arrival
/// order within a run. Each connection's messages keep their order, and there are only as many
/// runs (applies, walks of the text) as one connection has messages. Cutting the arrival order
/// wherever a connection came again made a run per repeat instead: with 128 typists a round's
/// stash holds each typist's keystroke and its reply to the last round, and the walks per round
/// grew with the typists. Messages of different connections commute (a change whose
/// dependencies have not arrived waits inside Automerge until they do).
fn runs_by_rank<T>(messages: Vec<(u64, T)>) -> Vec<Vec<(u64, T)>> {
    let mut ranks: HashMap<u64, usize> = HashMap::new();
    let mut runs: Vec<Vec<(u64, T)>> = Vec::new();
    for (connection, message) in messages {
        let rank = ranks.entry(connection).or_insert(0);
        match runs.get_mut(*rank) {
            Some(run) => run.push((connection, message)),
            None => runs.push(vec![(connection, message)]),
        }
        *rank += 1;
    }
    runs
}

/// Whether `command` is a Yrs update from one of `writable` (sorted connection ids).
fn is_update_from(command: &Command, writable: &[u64]) -> bool {
    matches!(command, Command::Sync {
        connection,
        payload: SyncPayload::YrsUpdate(_),
    } if writable.binary_search(connection).is_ok())
}

/// How long a Yrs document's commit may take before the updates that came during it are
/// relayed without waiting for its end (see `Actor::relay_while_committing`): above this
/// machine's commit p99 (~2.5 ms at 8,000 updates a second), so only slow commits do it.
const RELAY_DURING_COMMIT: Duration = Duration::from_millis(3);

/// The earliest time the next round of Automerge sync messages may go out after one at
/// `last_round`, `interval` apart (`None`: any time).
fn next_round(last_round: Option<Instant>, interval: Duration) -> Option<Instant> {
    last_round
        .filter(|_| !interval.is_zero())
        .map(|at| at + interval)
}

/// Whether a flush stores a new snapshot: after `compact_every` changes, once the changes since
/// the last snapshot hold at least a quarter of its bytes. A snapshot costs the whole document
/// (saving it, writing it), so a fixed count made a large document pay more per change the
/// larger it grew; tied to the bytes, compaction costs a bounded multiple of what the changes
/// themselves cost, and loading reads at most ~1.25 times the snapshot. Past 16 times
/// `compact_every` changes it is due anyway, so a load never replays too many changes one by
/// one.
fn compaction_due(changes: u64, bytes: u64, snapshot_bytes: u64, compact_every: u64) -> bool {
    changes >= compact_every
        && (bytes.saturating_mul(4) >= snapshot_bytes
            || changes >= compact_every.saturating_mul(16))
}

/// Queues a group commit's Yrs changes for every subscriber, coalesced: each subscriber gets one
/// update, the merge (`yrs::merge_updates_v1`, Yjs' `Y.mergeUpdates`) of the batch's changes, so
/// a batch of `n` changes costs each subscriber one message, one frame and one write instead of
/// `n`. The merge is computed once per batch for all subscribers. A subscriber that authored
/// every change of the batch gets nothing; one that authored some of them gets them back inside
/// the merge (Yjs and the engine skip what they have, as with the y-websocket server, which
/// echoes every update to its author): a merge per author would cost as much as all the rest of
/// the relay (`yrs` merges in time quadratic in the number of updates).
///
/// Only to the subscribers whose `read_only` is as given (the writable ones hear of changes
/// before their commit, the read-only ones after it); `merged` keeps the merge for the other
/// call.
fn relay_yrs(
    changes: &[PendingChange],
    subscribers: &mut BTreeMap<u64, Box<Subscriber>>,
    read_only: bool,
    merged: &mut Option<Option<Vec<u8>>>,
) {
    let Some(first) = changes.first() else {
        return;
    };
    // The author of every change of the batch, if there is only one.
    let sole_author = changes
        .iter()
        .all(|c| c.connection == first.connection)
        .then_some(first.connection);
    for (id, subscriber) in subscribers.iter_mut() {
        if subscriber.read_only != read_only {
            continue;
        }
        if !subscriber.sync.is_live() || sole_author == Some(*id) {
            // Not told what it has yet (its step 2 will carry everything), or nothing is new to
            // it.
            continue;
        }
        let merged = merged.get_or_insert_with(|| merge(changes));
        match merged {
            Some(bytes) => subscriber.sync.queue_update(bytes),
            None => {
                for change in changes.iter().filter(|c| c.connection != *id) {
                    subscriber.sync.queue_update(&change.change.bytes);
                }
            }
        }
    }
}

/// Relays Yrs `changes` to the writable subscribers (see [`relay_yrs`]) and sends each what is
/// due; returns the ones whose outbox is gone.
fn relay_to_writers(
    changes: &[PendingChange],
    subscribers: &mut BTreeMap<u64, Box<Subscriber>>,
    doc: &mut Document,
    document: DocumentId,
    merged: &mut Option<Option<Vec<u8>>>,
) -> Vec<u64> {
    relay_yrs(changes, subscribers, false, merged);
    let mut gone = Vec::new();
    for (id, subscriber) in subscribers.iter_mut() {
        if !subscriber.read_only && send_due(subscriber, doc, document) == Due::Gone {
            gone.push(*id);
        }
    }
    gone
}

/// What [`send_due`] did.
#[derive(Debug, PartialEq, Eq)]
enum Due {
    /// Nothing was due.
    Nothing,
    /// Sync payloads went out.
    Sent,
    /// The subscriber's outbox is gone (closed, or closed now for not keeping up).
    Gone,
}

/// Sends `subscriber` the sync payloads its state has due (marking it synced if any).
fn send_due(subscriber: &mut Subscriber, doc: &mut Document, document: DocumentId) -> Due {
    let payloads = subscriber.sync.poll(doc);
    if payloads.is_empty() {
        return Due::Nothing;
    }
    subscriber.synced = true;
    for payload in payloads {
        if !subscriber.out.send(Message::Sync { document, payload }) {
            return Due::Gone;
        }
    }
    Due::Sent
}

/// The changes' Yrs updates as one; `None` when the merge failed.
fn merge(changes: &[PendingChange]) -> Option<Vec<u8>> {
    if let [one] = changes {
        return Some(one.change.bytes.clone());
    }
    match merge_yrs_updates(changes.iter().map(|c| c.change.bytes.as_slice())) {
        Ok(bytes) => Some(bytes),
        Err(error) => {
            // The server encoded every part itself, so this does not happen; should it, the merge
            // is only an optimisation and the parts go out one by one.
            tracing::error!(%error, "merging Yrs updates failed");
            None
        }
    }
}

/// Strips the writes out of a read-only subscriber's payload, rejecting each change it brought
/// that the document lacks. Returns what is left to apply, if anything.
fn refuse_writes(
    document: DocumentId,
    doc: &mut Document,
    out: &Outbox,
    payload: SyncPayload,
) -> (Option<SyncPayload>, bool) {
    let reject = |change: ChangeId| {
        let _ = out.send(Message::Reject {
            document,
            change,
            code: ErrorCode::Forbidden,
            reason: "this connection's token is read-only".into(),
        });
    };
    match payload {
        SyncPayload::YrsUpdate(bytes) => {
            reject(ChangeId::of_bytes(&bytes));
            (None, true)
        }
        // A step 2 is a merge its sender does not track by id (its own changes travel as single
        // updates, each rejected above): ignored, not rejected.
        SyncPayload::YrsStep2(_) => (None, false),
        SyncPayload::YrsStep1(_) => (Some(payload), false),
        SyncPayload::Automerge(bytes) => {
            let Ok(mut message) = automerge::sync::Message::decode(&bytes) else {
                // Let the sync state report the malformed message.
                return (Some(SyncPayload::Automerge(bytes)), false);
            };
            if message.changes.is_empty() {
                return (Some(SyncPayload::Automerge(bytes)), false);
            }
            let Document::Automerge(am) = doc else {
                return (None, false);
            };
            // The chunks may be single changes or bundles: find what they would add on a fork.
            let mut fork = am.native().fork();
            let before = fork.get_heads();
            for chunk in message.changes.iter() {
                if fork.load_incremental(chunk).is_err() {
                    reject(ChangeId::of_bytes(chunk));
                }
            }
            for change in fork.get_changes(&before) {
                reject(ChangeId(change.hash().0));
            }
            message.changes = automerge::sync::ChunkList::empty();
            (Some(SyncPayload::Automerge(message.encode())), true)
        }
    }
}

/// `yrs::merge_updates_v1`, with a panic inside yrs (its merge has `unwrap`s) turned into an
/// error: the merge only saves frames, so a failure sends the parts one by one instead of
/// taking down the document actor or the connection.
pub(crate) fn merge_yrs_updates<'a>(
    parts: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<u8>, String> {
    let parts: Vec<&[u8]> = parts.into_iter().collect();
    std::panic::catch_unwind(|| yrs::merge_updates_v1(parts.iter().copied()))
        .map_err(|_| "the Yrs merge panicked".to_owned())?
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::{compaction_due, merge_yrs_updates, runs_by_rank};
    use yrs::updates::decoder::Decode;
    use yrs::{Doc, GetString, ReadTxn, Text, Transact, Update};

    #[test]
    fn stashed_messages_go_in_runs_by_their_rank_per_connection() {
        // Typists 1 and 2 each sent a keystroke and a reply; 3 a keystroke only.
        let stash = vec![(1, "1a"), (2, "2a"), (1, "1b"), (3, "3a"), (2, "2b")];
        let runs = runs_by_rank(stash);
        // Two runs (as many as one connection's messages), not three (a cut at each repeat).
        assert_eq!(
            runs,
            vec![
                vec![(1, "1a"), (2, "2a"), (3, "3a")],
                vec![(1, "1b"), (2, "2b")]
            ]
        );
        // Each connection's messages keep their order, and no connection is twice in a run.
        for run in &runs {
            let mut connections: Vec<u64> = run.iter().map(|(c, _)| *c).collect();
            connections.sort_unstable();
            connections.dedup();
            assert_eq!(connections.len(), run.len());
        }
        assert!(runs_by_rank(Vec::<(u64, ())>::new()).is_empty());
    }

    #[test]
    fn compaction_follows_the_bytes_since_the_last_snapshot() {
        // A small document compacts every `compact_every` changes, as before.
        assert!(!compaction_due(999, 30_000, 10_000, 1_000));
        assert!(compaction_due(1_000, 30_000, 10_000, 1_000));
        // A large one waits until the log holds a quarter of the snapshot's bytes...
        assert!(!compaction_due(1_000, 30_000, 1_000_000, 1_000));
        assert!(compaction_due(8_400, 252_000, 1_000_000, 1_000));
        // ...but never past 16 times the count.
        assert!(compaction_due(16_000, 480_000, 100_000_000, 1_000));
        assert!(!compaction_due(15_999, 479_970, 100_000_000, 1_000));
    }

    #[test]
    fn merged_updates_apply_like_their_parts_and_garbage_is_an_error_not_a_panic() {
        let doc = Doc::with_client_id(1);
        let text = doc.get_or_insert_text("t");
        let mut parts = Vec::new();
        for word in ["a", "b", "c"] {
            let before = doc.transact().state_vector();
            let mut txn = doc.transact_mut();
            text.push(&mut txn, word);
            drop(txn);
            parts.push(doc.transact().encode_state_as_update_v1(&before));
        }
        let merged = merge_yrs_updates(parts.iter().map(Vec::as_slice)).expect("merge");
        let other = Doc::with_client_id(2);
        let other_text = other.get_or_insert_text("t");
        other
            .transact_mut()
            .apply_update(Update::decode_v1(&merged).expect("decode"))
            .expect("apply");
        assert_eq!(other_text.get_string(&other.transact()), "abc");
        assert!(merge_yrs_updates([&[0xff, 0xff, 0xff][..], &[7, 1, 2][..]]).is_err());
    }
}
