//! Accord's native Rust client, for apps that embed Accord.
//!
//! [`Client::start`] spawns one tokio task that owns a [`Replica`] (documents, their durable
//! storage and the outbox of changes the server has not confirmed) and a WebSocket to an
//! `accord-server` at `ws://host/sync`. The app talks to that task through a cloneable
//! [`Client`] handle and reads what happened from a bounded [`Events`] receiver.
//!
//! - Local first: [`Client::change`] commits to local storage and returns at once, online or
//!   not. A change is [`ChangeStatus::Pending`] until the server confirms it with its commit
//!   sequence number ([`ChangeStatus::Confirmed`]) or refuses it ([`ChangeStatus::Rejected`]).
//! - Durable outbox: unconfirmed changes live in the replica's storage (SQLite with
//!   [`StorageConfig::Sqlite`]), so a client dropped and started again on the same file still
//!   delivers them; the server acknowledges a change it already has instead of committing it
//!   twice, so each change is committed exactly once.
//! - Reconnects: a lost connection is retried with exponential backoff and full jitter
//!   ([`BackoffConfig`]); on every new connection each synced document is subscribed again and
//!   the outbox goes out.
//! - Bounded: the command queue, the event queue and the remembered change outcomes all have a
//!   limit (the last in the replica's config); a full event queue drops events and later reports how many with
//!   [`ClientEvent::Lagged`] (the app never blocks the client, and the client never waits for
//!   the app).
//!
//! The task writes to storage on its own thread of the runtime (SQLite writes are short and
//! synchronous); prefer a multi-threaded runtime.
//!
//! ```no_run
//! # async fn example() -> Result<(), accord_client::ClientError> {
//! use accord_client::{Client, ClientConfig, StorageConfig};
//! use accord_engine::{DocKind, DocumentId, Op, Path};
//! let config = ClientConfig::new("ws://127.0.0.1:8787/sync", StorageConfig::Sqlite("app.db".into()));
//! let (client, mut events) = Client::start(config)?;
//! let trip = DocumentId::from_random_bytes([7; 16]);
//! client.subscribe(trip, DocKind::Automerge).await?;
//! let change = client
//!     .change(trip, vec![Op::Put { path: Path::keys(["title"]), value: "Lisbon".into() }])
//!     .await?;
//! while let Some(event) = events.recv().await {
//!     println!("{event:?}");
//! }
//! # let _ = change; Ok(()) }
//! ```

#![deny(missing_docs)]

mod backoff;
mod driver;

use std::path::PathBuf;
use std::time::Duration;

use accord_engine::invariant::{Conflict, Schema};
use accord_engine::protocol::ErrorCode;
use accord_engine::replica::{Replica, ReplicaConfig, ReplicaError};
use accord_engine::storage::{MemoryStorage, SqliteStorage, Storage, StorageError};
use accord_engine::{ChangeId, DocKind, DocumentId, Op, ReplicaId};
use tokio::sync::{mpsc, oneshot, watch};

pub use accord_engine::replica::ChangeStatus;
pub use backoff::{Backoff, BackoffConfig};

/// Where the replica keeps its documents and outbox.
#[derive(Clone, Debug)]
pub enum StorageConfig {
    /// A SQLite file (created if missing); the outbox survives restarts.
    Sqlite(PathBuf),
    /// Memory only; everything is lost when the client stops.
    Memory,
}

/// The client's settings. [`ClientConfig::new`] fills in defaults.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The server's sync endpoint, `ws://host:port/sync`.
    pub url: String,
    /// The token sent in `Hello` (none when the server runs without auth).
    pub token: Option<String>,
    /// Where the replica lives (used by [`Client::start`]).
    pub storage: StorageConfig,
    /// The replica's limits (outbox size, documents, frame and message sizes).
    pub replica: ReplicaConfig,
    /// The reconnect delays.
    pub backoff: BackoffConfig,
    /// Seed of the jitter; `None` draws one at random.
    pub rng_seed: Option<u64>,
    /// How long opening a connection (TCP and WebSocket handshake) may take.
    pub connect_timeout: Duration,
    /// A connection that receives nothing for this long is dropped and reopened (the server
    /// pings more often than that).
    pub idle_timeout: Duration,
    /// Commands waiting for the client task at most; callers wait when it is full.
    pub command_queue: usize,
    /// Events waiting for the app at most; more are dropped and counted in
    /// [`ClientEvent::Lagged`].
    pub event_queue: usize,
    /// Whether every document already in storage is synced from the start (so a restarted
    /// client delivers its outbox without the app subscribing again).
    pub sync_stored_documents: bool,
}

impl ClientConfig {
    /// Defaults for everything but the server and the storage.
    pub fn new(url: impl Into<String>, storage: StorageConfig) -> Self {
        Self {
            url: url.into(),
            token: None,
            storage,
            replica: ReplicaConfig::default(),
            backoff: BackoffConfig::default(),
            rng_seed: None,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            command_queue: 1_024,
            event_queue: 4_096,
            sync_stored_documents: true,
        }
    }
}

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The replica refused the call (unknown document, wrong kind, full outbox, storage...).
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// Opening the storage failed.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// The URL is not a `ws://` URL.
    #[error("invalid server url {url:?}: {reason}")]
    InvalidUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The client task has stopped (after [`Client::shutdown`]).
    #[error("the client has stopped")]
    Stopped,
}

/// The connection, as the app sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Opening a connection; `attempt` counts the failed tries since the last session.
    Connecting {
        /// Failed tries since the last good session.
        attempt: u32,
    },
    /// The server welcomed us; edits go out as they are made.
    Connected,
    /// No connection; the next try is after a backoff delay. Edits are kept meanwhile.
    Offline {
        /// Failed tries since the last good session.
        attempt: u32,
        /// The delay until the next try.
        retry_in: Duration,
    },
    /// The client task has stopped.
    Stopped,
}

/// Something that happened, for the app.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// The connection status changed.
    Status(Status),
    /// The server accepted a subscription.
    Subscribed {
        /// The document.
        document: DocumentId,
        /// Its latest commit sequence number at the server.
        head_seq: u64,
        /// Whether our token only lets us read it.
        read_only: bool,
    },
    /// A document changed, by a local edit or by changes from the server.
    DocumentChanged {
        /// The document.
        document: DocumentId,
        /// Whether the change came from the server (another replica).
        remote: bool,
    },
    /// The server committed one of our changes.
    Confirmed {
        /// The document.
        document: DocumentId,
        /// The change.
        change: ChangeId,
        /// Its commit sequence number.
        seq: u64,
    },
    /// The server refused one of our changes.
    Rejected {
        /// The document.
        document: DocumentId,
        /// The change.
        change: ChangeId,
        /// The error code.
        code: ErrorCode,
        /// Why, in words.
        reason: String,
    },
    /// The server reported an error.
    ServerError {
        /// The error code.
        code: ErrorCode,
        /// The document, if one.
        document: Option<DocumentId>,
        /// What, in words.
        message: String,
    },
    /// The document breaks invariants, as checked locally after a change or a merge: a warning
    /// ("this may be repaired or rejected"); the server decides.
    Violations {
        /// The document.
        document: DocumentId,
        /// (invariant id, reason) of each open violation.
        violations: Vec<(String, String)>,
    },
    /// A resolution of the invariant layer voided or overrode one of this client's changes.
    Compensated {
        /// The document.
        document: DocumentId,
        /// The change.
        change: ChangeId,
        /// The violation's key.
        violation: String,
        /// Why, in words.
        reason: String,
    },
    /// This many events were dropped because the event queue was full.
    Lagged {
        /// How many.
        missed: u64,
    },
}

/// The receiver of a client's events (bounded; see [`ClientConfig::event_queue`]).
pub type Events = mpsc::Receiver<ClientEvent>;

type Reply<T> = oneshot::Sender<Result<T, ClientError>>;

/// A request to the client task.
pub(crate) enum Command {
    Create(DocumentId, DocKind, Reply<()>),
    Subscribe(DocumentId, DocKind, Reply<()>),
    Change(DocumentId, Vec<Op>, Reply<Option<ChangeId>>),
    Json(DocumentId, Reply<serde_json::Value>),
    LastSeq(DocumentId, Reply<u64>),
    ChangeStatus(DocumentId, ChangeId, Reply<ChangeStatus>),
    OutboxLen(oneshot::Sender<usize>),
    Conflicts(DocumentId, Reply<Vec<(String, Conflict)>>),
    ResolveConflict(DocumentId, String, usize, String, Reply<Option<ChangeId>>),
    AddSchema(Box<Schema>, oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

/// A cloneable handle to a running client. Dropping every handle stops the client task.
#[derive(Clone, Debug)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<Status>,
    replica_id: ReplicaId,
}

impl Client {
    /// Opens the storage named in `config` and starts the client task on the current tokio
    /// runtime. It connects right away and keeps reconnecting until [`Client::shutdown`].
    pub fn start(config: ClientConfig) -> Result<(Client, Events), ClientError> {
        match config.storage.clone() {
            StorageConfig::Sqlite(path) => {
                Self::start_with_storage(config, SqliteStorage::open(path)?)
            }
            StorageConfig::Memory => Self::start_with_storage(config, MemoryStorage::new()),
        }
    }

    /// Starts the client task on `storage` (any [`Storage`]); `config.storage` is ignored.
    pub fn start_with_storage<S>(
        config: ClientConfig,
        storage: S,
    ) -> Result<(Client, Events), ClientError>
    where
        S: Storage + Send + 'static,
    {
        check_url(&config.url)?;
        let replica = Replica::open(
            storage,
            ReplicaId::from_random_bytes(rand::random()),
            config.replica.clone(),
        )?;
        let replica_id = replica.id();
        let (commands, command_rx) = mpsc::channel(config.command_queue.max(1));
        let (events, event_rx) = mpsc::channel(config.event_queue.max(1));
        let (status_tx, status) = watch::channel(Status::Connecting { attempt: 0 });
        let driver = driver::Driver::new(config, replica, events, status_tx);
        tokio::spawn(driver.run(command_rx));
        Ok((
            Client {
                commands,
                status,
                replica_id,
            },
            event_rx,
        ))
    }

    /// This replica's id (stored with its data, the same across restarts).
    pub fn replica_id(&self) -> ReplicaId {
        self.replica_id
    }

    /// The connection status now.
    pub fn status(&self) -> Status {
        *self.status.borrow()
    }

    /// A receiver of status changes (for `wait_for`).
    pub fn status_watch(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| ClientError::Stopped)?;
        rx.await.map_err(|_| ClientError::Stopped)?
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| ClientError::Stopped)?;
        rx.await.map_err(|_| ClientError::Stopped)
    }

    /// Creates a new, empty document here and syncs it (the server creates it on subscribe).
    /// Fails with [`ReplicaError::DocumentExists`] if this replica has it already.
    pub async fn create(&self, document: DocumentId, kind: DocKind) -> Result<(), ClientError> {
        self.call(|reply| Command::Create(document, kind, reply))
            .await
    }

    /// Syncs `document` with the server from now on, creating an empty local copy of `kind` if
    /// this replica does not have it. Synced documents are subscribed again on every reconnect.
    pub async fn subscribe(&self, document: DocumentId, kind: DocKind) -> Result<(), ClientError> {
        self.call(|reply| Command::Subscribe(document, kind, reply))
            .await
    }

    /// Edits `document` with JSON ops as one change, stored locally (with its outbox entry)
    /// before this returns, and sent when connected. Returns the change's id, or `None` when the
    /// ops changed nothing.
    pub async fn change(
        &self,
        document: DocumentId,
        ops: Vec<Op>,
    ) -> Result<Option<ChangeId>, ClientError> {
        self.call(|reply| Command::Change(document, ops, reply))
            .await
    }

    /// The document's whole state as JSON.
    pub async fn json(&self, document: DocumentId) -> Result<serde_json::Value, ClientError> {
        self.call(|reply| Command::Json(document, reply)).await
    }

    /// The highest commit sequence number this replica has learned for `document`.
    pub async fn last_seq(&self, document: DocumentId) -> Result<u64, ClientError> {
        self.call(|reply| Command::LastSeq(document, reply)).await
    }

    /// The fate of a local change: pending, confirmed with its sequence number, rejected with
    /// a reason, compensated by the invariant layer, or unknown (forgotten: the replica
    /// remembers `ReplicaConfig::max_tracked_statuses` outcomes, in memory only).
    pub async fn change_status(
        &self,
        document: DocumentId,
        change: ChangeId,
    ) -> Result<ChangeStatus, ClientError> {
        self.call(|reply| Command::ChangeStatus(document, change, reply))
            .await
    }

    /// Local changes not yet confirmed by the server.
    pub async fn outbox_len(&self) -> Result<usize, ClientError> {
        self.ask(Command::OutboxLen).await
    }

    /// Registers an invariant schema with the replica, so local edits and merges are checked
    /// (and reported with [`ClientEvent::Violations`]); the server stays the judge.
    pub async fn add_schema(&self, schema: Schema) -> Result<(), ClientError> {
        self.ask(|reply| Command::AddSchema(Box::new(schema), reply))
            .await
    }

    /// The open conflicts of `document` (its conflict inbox), by key.
    pub async fn conflicts(
        &self,
        document: DocumentId,
    ) -> Result<Vec<(String, Conflict)>, ClientError> {
        self.call(|reply| Command::Conflicts(document, reply)).await
    }

    /// Settles the open conflict `key` of `document` with option `choice`, decided by `by`: a
    /// change like any other (returned), which closes the conflict everywhere once it syncs.
    pub async fn resolve_conflict(
        &self,
        document: DocumentId,
        key: impl Into<String>,
        choice: usize,
        by: impl Into<String>,
    ) -> Result<Option<ChangeId>, ClientError> {
        let (key, by) = (key.into(), by.into());
        self.call(|reply| Command::ResolveConflict(document, key, choice, by, reply))
            .await
    }

    /// Closes the connection, stops the task and waits until its storage is closed (so the same
    /// SQLite file can be opened again). Other handles get [`ClientError::Stopped`] afterwards.
    pub async fn shutdown(&self) -> Result<(), ClientError> {
        self.ask(Command::Shutdown).await
    }
}

fn check_url(url: &str) -> Result<(), ClientError> {
    let invalid = |reason: &str| ClientError::InvalidUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| invalid("only ws:// is supported (put TLS in front of the server)"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(invalid("no host"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ws_urls_with_a_host_are_accepted() {
        assert!(check_url("ws://127.0.0.1:8787/sync").is_ok());
        assert!(matches!(
            check_url("http://127.0.0.1/sync"),
            Err(ClientError::InvalidUrl { .. })
        ));
        assert!(check_url("wss://example/sync").is_err());
        assert!(check_url("ws:///sync").is_err());
    }
}
