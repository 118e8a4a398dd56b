//! Accord's sync server: a WebSocket relay where each document is a scope of commit order.
//!
//! Every change the server accepts gets its document's next sequence number, is written to
//! SQLite and committed before the acknowledgement goes back (a Yrs change is relayed to the
//! writable subscribers while its commit is under way, to read-only ones after it). The server
//! drives the engine's own [`accord_engine::sync::DocSync`]: there is no second implementation of
//! the protocol.
//!
//! One file per concern, in the style of tokio's mini-redis:
//! - [`run`] (here): the HTTP side (`/sync`, `/healthz`, `/metrics`) and graceful shutdown.
//! - `rest`: the JSON REST API under `/v1` (documents, ops, the change feed, token minting).
//! - `compat`, `yws`, `amrepo`: unmodified Yjs (`y-websocket`, at `/yjs/{room}`) and
//!   automerge-repo (`/automerge`) clients, adapted onto the same document actors.
//! - `connection`: one WebSocket: hello and auth, limits, the bounded outbound queue.
//! - `document`: one task per loaded document, owning it, its head sequence number and one
//!   sync state per subscriber; group commit; idle eviction.
//! - [`store`]: the SQLite database; [`storage`]: its one writer thread (cross-document group
//!   commit) and few reader threads, shared by every document.
//! - [`auth`]: the HMAC-SHA256 tokens.
//! - [`metrics`]: the Prometheus text.
//!
//! Architecture Invariant: documents share no lock or sequence, and only one queue: the store's
//! (one writer thread commits every document's writes together, one fsync for many documents);
//! a slow client never blocks a document (its queue is bounded and it is disconnected when the
//! queue is full).
//!
//! ```no_run
//! # async fn example() -> Result<(), accord_server::ServerError> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let config = accord_server::Config::new("./accord-data", accord_server::auth::AuthMode::Disabled);
//! accord_server::run(listener, config, tokio::signal::ctrl_c()).await
//! # }
//! ```

#![deny(missing_docs)]

mod actor_inbox;
mod amrepo;
pub mod auth;
mod compat;
mod connection;
mod document;
pub mod metrics;
mod rest;
mod static_files;
pub mod storage;
pub mod store;
mod wake;
mod yws;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State, WebSocketUpgrade};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::auth::AuthMode;
use crate::document::Documents;
use crate::metrics::Metrics;

/// The server's settings. Every limit has a default; see [`Config::new`].
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the database lives (created if missing).
    pub data_dir: PathBuf,
    /// How clients are authenticated.
    pub auth: AuthMode,
    /// The largest WebSocket frame accepted and sent, in bytes (larger messages travel in chunks).
    pub max_frame_bytes: usize,
    /// The largest message after joining chunks, in bytes.
    pub max_message_bytes: usize,
    /// Documents one connection may subscribe at once.
    pub max_documents_per_connection: usize,
    /// Open connections at once; more are refused with `Overloaded`.
    pub max_connections: usize,
    /// Messages waiting to be sent to one connection; a connection whose queue is full is closed
    /// with `Overloaded`.
    pub outbound_queue: usize,
    /// Commands waiting for one document.
    pub document_inbox: usize,
    /// Commands one document handles before it commits (the group commit batch); also the most
    /// Automerge sync messages that wait for a document's next round of sync messages.
    pub max_batch: usize,
    /// A connection that sends nothing (not even a pong) for this long is closed; pings go out
    /// at a third of it.
    pub idle_timeout: Duration,
    /// A document with no subscribers for this long is dropped from memory.
    pub idle_evict: Duration,
    /// Changes appended after a snapshot before a new snapshot is stored.
    pub compact_every: u64,
    /// Commits of its own a returning client is told about at most, on subscribe.
    pub max_catchup_acks: usize,
    /// How long shutdown waits for connections and documents to finish.
    pub shutdown_grace: Duration,
    /// The largest REST request body, in bytes (larger ones get 413).
    pub max_rest_body_bytes: usize,
    /// REST requests served at once; more get 503 `overloaded`.
    pub max_rest_in_flight: usize,
    /// Invariants by document type: a document that declares its type
    /// (`accord_engine::invariant::type_op`) is reconciled by the server after every commit.
    pub schemas: Vec<accord_engine::invariant::Schema>,
    /// How often a loaded document with invariants is re-checked even without commits (the
    /// level-triggered half of the loop); doubled while violations persist, up to 16 times.
    pub reconcile_interval: Duration,
    /// The shortest time between two rounds of Automerge sync messages for one document (zero:
    /// no limit); in a round every peer with something due gets one message. Changes that
    /// arrive meanwhile are applied together just before the next round and go out together in
    /// it, so with many typists each peer gets one message (and sends one reply) per interval
    /// instead of one per keystroke, and Automerge walks the document once per round instead of
    /// once per keystroke. A document quiet for this long answers at once. The automerge-repo
    /// client and its sync server throttle the same way, at 100 ms.
    ///
    /// The default, 75 ms, is the trade between latency and CPU: most of a round's cost is per
    /// round (one walk of the text, one fsync, one message each way per peer), so the CPU per
    /// typist follows the rounds per second. At 8 typists it puts the median writer-to-peer
    /// latency level with automerge-repo's sync server and its p99 below it, at 1/11 to 1/13 of
    /// its CPU per typist (BENCHMARKS.md, session 14); 50 ms cuts the wait by a third for about a
    /// third more CPU there. With 128 typists 50 ms is the cheaper setting (measured; the cause
    /// was not profiled).
    pub automerge_sync_interval: Duration,
    /// An admin token for `POST /v1/tokens`, besides the one derived from the secret
    /// ([`auth::admin_token`]).
    pub admin_token: Option<auth::AdminToken>,
    /// A directory of static files (the demo app) served at `/` for paths no route takes;
    /// `None` (the default) serves nothing.
    pub demo_dir: Option<PathBuf>,
    /// The store's reader threads and queues ([`storage`]).
    pub storage: storage::StorageConfig,
}

impl Config {
    /// Defaults for everything but the data directory and auth.
    pub fn new(data_dir: impl Into<PathBuf>, auth: AuthMode) -> Self {
        Self {
            data_dir: data_dir.into(),
            auth,
            max_frame_bytes: 1 << 20,
            max_message_bytes: 64 << 20,
            max_documents_per_connection: 1_000,
            max_connections: 10_000,
            outbound_queue: 4_096,
            document_inbox: 1_024,
            max_batch: 4_096,
            idle_timeout: Duration::from_secs(60),
            idle_evict: Duration::from_secs(30),
            compact_every: 1_000,
            max_catchup_acks: 100_000,
            shutdown_grace: Duration::from_secs(10),
            max_rest_body_bytes: 1 << 20,
            max_rest_in_flight: 256,
            admin_token: None,
            demo_dir: None,
            schemas: Vec::new(),
            reconcile_interval: Duration::from_secs(5),
            automerge_sync_interval: Duration::from_millis(75),
            storage: storage::StorageConfig::default(),
        }
    }

    /// The path of the SQLite database.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("accord.db")
    }

    fn limits(&self) -> accord_engine::protocol::Limits {
        accord_engine::protocol::Limits {
            max_frame_bytes: self.max_frame_bytes,
            max_message_bytes: self.max_message_bytes,
        }
    }
}

/// What can stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Socket or file I/O failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The database could not be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// Two loaded schemas declare the same document type (which rules apply would be a guess).
    #[error("two schemas declare the document type {0:?}")]
    DuplicateSchema(String),
}

/// State shared by every connection and document of one server.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) documents: Arc<Documents>,
    pub(crate) connections: Arc<Semaphore>,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Every connection task holds a clone; shutdown waits until all are dropped.
    pub(crate) alive: mpsc::Sender<()>,
    pub(crate) next_connection: std::sync::atomic::AtomicU64,
    /// The store, for REST requests that do not go through an actor.
    pub(crate) storage: storage::Storage,
    /// Permits for REST requests in flight.
    pub(crate) rest_permits: Arc<Semaphore>,
    /// Permits for REST change-feed reads (large, up to `FEED_MAX_BYTES`): one fewer than the
    /// store's reader threads, so documents' loads and catch-ups always find a reader free.
    pub(crate) feed_permits: Semaphore,
    /// Presence relays and the peer id of the foreign-protocol endpoints.
    pub(crate) compat: compat::Compat,
    /// Every open WebSocket connection, closed at shutdown.
    pub(crate) open: connection::Registry,
}

/// Runs the server on `listener` until `shutdown` completes, then stops accepting, lets each
/// document finish its in-flight commit, sends every client an error `ShuttingDown` and a close
/// frame, and returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future,
) -> Result<(), ServerError> {
    let metrics = Arc::new(Metrics::default());
    run_with_metrics(listener, config, metrics, shutdown).await
}

/// [`run`], reporting into `metrics` (so an embedding app or a test can read them).
pub async fn run_with_metrics(
    listener: TcpListener,
    config: Config,
    metrics: Arc<Metrics>,
    shutdown: impl Future,
) -> Result<(), ServerError> {
    let mut types = std::collections::HashSet::new();
    for schema in &config.schemas {
        if !types.insert(schema.document_type.as_str()) {
            return Err(ServerError::DuplicateSchema(schema.document_type.clone()));
        }
    }
    std::fs::create_dir_all(&config.data_dir)?;
    let database = config.database_path();
    let storage_config = config.storage.clone();
    let storage_metrics = metrics.clone();
    let storage = tokio::task::spawn_blocking(move || {
        storage::Storage::open(&database, &storage_config, storage_metrics)
    })
    .await
    .map_err(|e| store::StoreError::Task(e.to_string()))??;
    if matches!(config.auth, AuthMode::Disabled) {
        tracing::warn!("AUTH IS DISABLED: EVERY CLIENT MAY READ AND WRITE EVERY DOCUMENT");
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let documents = Documents::new(
        config.clone(),
        storage.clone(),
        metrics.clone(),
        alive_tx.clone(),
    );
    let shared = Arc::new(Shared {
        connections: Arc::new(Semaphore::new(config.max_connections)),
        rest_permits: Arc::new(Semaphore::new(config.max_rest_in_flight.max(1))),
        feed_permits: Semaphore::new(config.storage.readers.saturating_sub(1).max(1)),
        config,
        metrics,
        documents,
        shutdown: shutdown_rx,
        alive: alive_tx,
        next_connection: std::sync::atomic::AtomicU64::new(1),
        storage,
        compat: compat::Compat::new(),
        open: connection::Registry::default(),
    });
    // The deadlines of the foreign-protocol connections (pings, idle timeouts, token expiry).
    tokio::spawn(compat::keep_time(Arc::downgrade(&shared)));
    let grace = shared.config.shutdown_grace;
    let app = Router::new()
        .route("/sync", get(sync_handler))
        // Foreign protocols on the same port (see `compat`): y-websocket clients use the server
        // URL `ws://host:port/yjs` (the provider appends `/{room}`), automerge-repo clients
        // `ws://host:port/automerge`; both take `?token=`.
        .route("/yjs/{*room}", get(yws_handler))
        .route("/automerge", get(amrepo_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics_handler))
        .merge(rest::router(&shared))
        .with_state(shared.clone());
    let app = static_files::mount(app, shared.config.demo_dir.clone());
    tracing::info!(address = ?listener.local_addr().ok(), "accord-server listening");
    let mut stop = shared.shutdown.clone();
    // Small frames (a keystroke, an ack) go out at once: without TCP_NODELAY, Nagle's algorithm
    // holds a frame written while the previous one is unacknowledged until the peer's delayed ACK.
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY not set on an accepted connection");
        }
    });
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = stop.wait_for(|stop| *stop).await;
    });
    let mut server = Box::pin(std::future::IntoFuture::into_future(server));
    let served = tokio::select! {
        served = &mut server => served,
        _ = shutdown => {
            tracing::info!("shutting down");
            let _ = shutdown_tx.send(true);
            shared.open.close_all();
            (&mut server).await
        }
    };
    drop(server);
    let _ = shutdown_tx.send(true);
    shared.open.close_all();
    shared.documents.close();
    drop(shared);
    // Wait for every connection and document task to finish (each holds an `alive` sender).
    let _ = tokio::time::timeout(grace, alive_rx.recv()).await;
    served?;
    Ok(())
}

async fn sync_handler(
    State(shared): State<Arc<Shared>>,
    upgrade: WebSocketUpgrade,
) -> impl IntoResponse {
    let frame_limit = shared
        .config
        .max_frame_bytes
        .saturating_mul(2)
        .saturating_add(1024);
    upgrade
        .max_frame_size(frame_limit)
        .max_message_size(frame_limit)
        .read_buffer_size(READ_BUFFER_BYTES)
        .on_upgrade(move |socket| own_task(connection::serve(socket, shared)))
}

/// The query string of the foreign-protocol endpoints.
#[derive(serde::Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// Longest y-websocket room name accepted, in bytes.
const MAX_ROOM_BYTES: usize = 1024;

async fn yws_handler(
    State(shared): State<Arc<Shared>>,
    Path(room): Path<String>,
    Query(query): Query<TokenQuery>,
    upgrade: WebSocketUpgrade,
) -> axum::response::Response {
    if room.is_empty() || room.len() > MAX_ROOM_BYTES {
        let text = format!("a room name is 1 to {MAX_ROOM_BYTES} bytes");
        return (axum::http::StatusCode::BAD_REQUEST, text).into_response();
    }
    let limit = compat::socket_limit(&shared);
    upgrade
        .max_frame_size(limit)
        .max_message_size(limit)
        .read_buffer_size(READ_BUFFER_BYTES)
        .on_upgrade(move |socket| {
            own_task(compat::serve(socket, shared, query.token, move |relay| {
                yws::Yws::new(&room, relay)
            }))
        })
        .into_response()
}

async fn amrepo_handler(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<TokenQuery>,
    upgrade: WebSocketUpgrade,
) -> impl IntoResponse {
    let limit = compat::socket_limit(&shared);
    let peer = shared.compat.server_peer.clone();
    upgrade
        .max_frame_size(limit)
        .max_message_size(limit)
        .read_buffer_size(READ_BUFFER_BYTES)
        .on_upgrade(move |socket| {
            own_task(compat::serve(socket, shared, query.token, move |relay| {
                amrepo::AmRepo::new(peer, relay)
            }))
        })
}

/// Runs a connection in a task of its own and lets axum's upgrade task end at once. axum's
/// task wraps the connection's future with what it captured for the upgrade (the WebSocket
/// config, the callback, the protocol header), and a task keeps its captures for its whole
/// life: every connection held them (when measured, in session 10: a task cell of 1,280 bytes
/// instead of 1,152).
fn own_task<F>(connection: F) -> impl std::future::Future<Output = ()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(connection);
    std::future::ready(())
}

/// The read buffer of one WebSocket. tungstenite's default (128 KiB) is zero-filled on every
/// read: it made an idle connection cost 144 KB and was 19% of the fan-out profile
/// (BENCHMARKS.md, "Cause 1"). The patched tungstenite (vendor/tungstenite/ACCORD.md) takes it
/// for a burst of frames and lets it go while the connection waits, so it is one allocation per
/// burst; small, because it is one `read` call's worth: 512 bytes. Larger frames still arrive:
/// the buffer grows to the frame, read at most this much per `read` call, so a large incoming
/// message costs one `read` per 512 bytes (a 1 MB upload ~2,000 calls); large messages mostly
/// go out (cold loads), and writes are not limited by this.
const READ_BUFFER_BYTES: usize = 512;

async fn metrics_handler(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        shared.metrics.render(),
    )
}
