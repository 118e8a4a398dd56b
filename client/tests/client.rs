//! End-to-end tests of `accord-client` against the real `accord-server` on 127.0.0.1.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use accord_client::{
    BackoffConfig, ChangeStatus, Client, ClientConfig, ClientEvent, Events, Status, StorageConfig,
};
use accord_engine::storage::{SqliteStorage, Storage};
use accord_engine::{DocKind, DocumentId, Op, Path as DocPath};
use accord_server::auth::AuthMode;
use accord_server::metrics::Metrics;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

const WAIT: Duration = Duration::from_secs(20);

/// A server embedded in the test, auth disabled.
struct Server {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Server {
    /// Starts on `addr` (port 0 for any), retrying briefly while a previous server's port is
    /// released.
    async fn start(data: &Path, addr: SocketAddr) -> Server {
        let deadline = Instant::now() + WAIT;
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(error) if Instant::now() < deadline => {
                    eprintln!("bind {addr}: {error}; retrying");
                    sleep(Duration::from_millis(50)).await;
                }
                Err(error) => panic!("bind {addr}: {error}"),
            }
        };
        let addr = listener.local_addr().unwrap();
        let mut config = accord_server::Config::new(data, AuthMode::Disabled);
        config.shutdown_grace = Duration::from_secs(5);
        let metrics = Arc::new(Metrics::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn({
            let metrics = metrics.clone();
            async move {
                accord_server::run_with_metrics(listener, config, metrics, async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            }
        });
        Server {
            addr,
            metrics,
            stop,
            task,
        }
    }

    fn url(&self) -> String {
        format!("ws://{}/sync", self.addr)
    }

    fn committed(&self) -> u64 {
        self.metrics.changes_committed.load(Ordering::Relaxed)
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        timeout(WAIT, self.task).await.unwrap().unwrap();
    }
}

fn config(url: &str, storage: StorageConfig) -> ClientConfig {
    let mut config = ClientConfig::new(url, storage);
    config.backoff = BackoffConfig {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(400),
    };
    config.rng_seed = Some(42);
    config.connect_timeout = Duration::from_secs(2);
    config
}

fn doc(n: u8) -> DocumentId {
    DocumentId::from_random_bytes([n; 16])
}

/// An edit that touches its own key, so every edit is one new change.
fn edit(kind: DocKind, key: &str, value: i64) -> Vec<Op> {
    let path = match kind {
        DocKind::Automerge => DocPath::keys([key]),
        DocKind::Yrs => DocPath::keys(["m", key]),
    };
    vec![Op::Put {
        path,
        value: json!(value),
    }]
}

fn keys(kind: DocKind, json: &serde_json::Value) -> usize {
    let map = match kind {
        DocKind::Automerge => json.as_object(),
        DocKind::Yrs => json.get("m").and_then(|m| m.as_object()),
    };
    map.map_or(0, |m| m.len())
}

/// Polls `check` until it holds or `WAIT` passes.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

async fn wait_connected(client: &Client) {
    let mut status = client.status_watch();
    timeout(WAIT, status.wait_for(|s| *s == Status::Connected))
        .await
        .expect("connected in time")
        .expect("client running");
}

/// Drains the events received so far.
fn drain(events: &mut Events) -> Vec<ClientEvent> {
    std::iter::from_fn(|| events.try_recv().ok()).collect()
}

async fn two_clients_converge(kind: DocKind) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), "127.0.0.1:0".parse().unwrap()).await;
    let document = doc(kind.code());
    let (a, mut a_events) = Client::start(config(
        &server.url(),
        StorageConfig::Sqlite(dir.path().join("a.db")),
    ))
    .unwrap();
    let (b, _b_events) = Client::start(config(&server.url(), StorageConfig::Memory)).unwrap();
    a.create(document, kind).await.unwrap();
    b.subscribe(document, kind).await.unwrap();
    wait_connected(&a).await;
    wait_connected(&b).await;
    let mut changes = Vec::new();
    for i in 0..5 {
        let change = a
            .change(document, edit(kind, &format!("a{i}"), i))
            .await
            .unwrap()
            .expect("a change");
        changes.push(change);
        b.change(document, edit(kind, &format!("b{i}"), i))
            .await
            .unwrap()
            .expect("a change");
    }
    eventually("both clients hold all ten keys", || async {
        let (ja, jb) = (
            a.json(document).await.unwrap(),
            b.json(document).await.unwrap(),
        );
        keys(kind, &ja) == 10 && ja == jb
    })
    .await;
    eventually("both outboxes empty", || async {
        a.outbox_len().await.unwrap() == 0 && b.outbox_len().await.unwrap() == 0
    })
    .await;
    let mut seqs = Vec::new();
    for change in &changes {
        match a.change_status(document, *change).await.unwrap() {
            ChangeStatus::Confirmed { seq } => seqs.push(seq),
            other => panic!("{kind}: change not confirmed: {other:?}"),
        }
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?} in order");
    assert_eq!(a.last_seq(document).await.unwrap(), 10);
    assert_eq!(server.committed(), 10);
    let events = drain(&mut a_events);
    assert!(events.contains(&ClientEvent::Status(Status::Connected)));
    let confirmed = events
        .iter()
        .filter(|e| matches!(e, ClientEvent::Confirmed { .. }))
        .count();
    assert_eq!(confirmed, 5, "{kind}: one confirmation per change of a");
    assert!(events
        .iter()
        .any(|e| matches!(e, ClientEvent::DocumentChanged { remote: true, .. })));
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    assert_eq!(a.status(), Status::Stopped);
    assert!(matches!(
        a.json(document).await,
        Err(accord_client::ClientError::Stopped)
    ));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_converge_automerge() {
    two_clients_converge(DocKind::Automerge).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_converge_yrs() {
    two_clients_converge(DocKind::Yrs).await;
}

async fn offline_edits_arrive_once_after_the_server_returns(kind: DocKind) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let server = Server::start(&data, "127.0.0.1:0".parse().unwrap()).await;
    let addr = server.addr;
    let url = server.url();
    let document = doc(20 + kind.code());
    let (a, mut a_events) =
        Client::start(config(&url, StorageConfig::Sqlite(dir.path().join("a.db")))).unwrap();
    let (b, _b_events) =
        Client::start(config(&url, StorageConfig::Sqlite(dir.path().join("b.db")))).unwrap();
    a.create(document, kind).await.unwrap();
    b.subscribe(document, kind).await.unwrap();
    wait_connected(&a).await;
    a.change(document, edit(kind, "before", 0)).await.unwrap();
    eventually("b has the first edit", || async {
        keys(kind, &b.json(document).await.unwrap()) == 1
    })
    .await;
    eventually("a's first edit confirmed", || async {
        a.outbox_len().await.unwrap() == 0
    })
    .await;

    server.stop().await;
    let mut status = a.status_watch();
    timeout(
        WAIT,
        status.wait_for(|s| matches!(s, Status::Offline { .. })),
    )
    .await
    .unwrap()
    .unwrap();
    drain(&mut a_events);
    let mut offline = Vec::new();
    for i in 0..4 {
        let change = a
            .change(document, edit(kind, &format!("offline{i}"), i))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            a.change_status(document, change).await.unwrap(),
            ChangeStatus::Pending
        );
        offline.push(change);
    }
    assert_eq!(a.outbox_len().await.unwrap(), 4);
    // Let a fail a few times, so it is backing off when the server returns.
    sleep(Duration::from_millis(300)).await;
    let retries = drain(&mut a_events)
        .iter()
        .filter(|e| matches!(e, ClientEvent::Status(Status::Offline { .. })))
        .count();
    assert!(
        retries >= 2,
        "a retried with backoff ({retries} offline periods)"
    );

    let server = Server::start(&data, addr).await;
    wait_connected(&a).await;
    eventually("a's outbox delivered", || async {
        a.outbox_len().await.unwrap() == 0
    })
    .await;
    eventually("b has every edit", || async {
        let (ja, jb) = (
            a.json(document).await.unwrap(),
            b.json(document).await.unwrap(),
        );
        keys(kind, &jb) == 5 && ja == jb
    })
    .await;
    for change in offline {
        assert!(matches!(
            a.change_status(document, change).await.unwrap(),
            ChangeStatus::Confirmed { .. }
        ));
    }
    sleep(Duration::from_millis(200)).await;
    assert_eq!(
        server.committed(),
        4,
        "{kind}: each offline edit committed exactly once"
    );
    assert_eq!(a.last_seq(document).await.unwrap(), 5);
    assert_eq!(b.last_seq(document).await.unwrap(), 5);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_edits_reach_the_other_client_once_after_the_server_returns_automerge() {
    offline_edits_arrive_once_after_the_server_returns(DocKind::Automerge).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_edits_reach_the_other_client_once_after_the_server_returns_yrs() {
    offline_edits_arrive_once_after_the_server_returns(DocKind::Yrs).await;
}

async fn a_restarted_client_delivers_its_outbox(kind: DocKind) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let server = Server::start(&data, "127.0.0.1:0".parse().unwrap()).await;
    let (addr, url) = (server.addr, server.url());
    let document = doc(40 + kind.code());
    let a_db = dir.path().join("a.db");
    let (b, _b_events) = Client::start(config(&url, StorageConfig::Memory)).unwrap();
    b.subscribe(document, kind).await.unwrap();
    {
        let (a, _a_events) =
            Client::start(config(&url, StorageConfig::Sqlite(a_db.clone()))).unwrap();
        a.create(document, kind).await.unwrap();
        a.change(document, edit(kind, "first", 1)).await.unwrap();
        eventually("first edit confirmed", || async {
            a.outbox_len().await.unwrap() == 0
        })
        .await;
        server.stop().await;
        for i in 0..3 {
            a.change(document, edit(kind, &format!("kept{i}"), i))
                .await
                .unwrap();
        }
        a.shutdown().await.unwrap();
    }
    let stored = SqliteStorage::open(&a_db).unwrap().outbox().unwrap();
    assert_eq!(stored.len(), 3, "the outbox is on disk");

    let server = Server::start(&data, addr).await;
    // The app starts again: it only opens the client; stored documents sync by themselves.
    let (a, _a_events) = Client::start(config(&url, StorageConfig::Sqlite(a_db.clone()))).unwrap();
    eventually("the restarted outbox is delivered", || async {
        a.outbox_len().await.unwrap() == 0
    })
    .await;
    eventually("b has every edit", || async {
        let (ja, jb) = (
            a.json(document).await.unwrap(),
            b.json(document).await.unwrap(),
        );
        keys(kind, &jb) == 4 && ja == jb
    })
    .await;
    sleep(Duration::from_millis(200)).await;
    assert_eq!(
        server.committed(),
        3,
        "{kind}: each kept edit committed exactly once"
    );
    assert_eq!(b.last_seq(document).await.unwrap(), 4);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_client_delivers_its_outbox_automerge() {
    a_restarted_client_delivers_its_outbox(DocKind::Automerge).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_client_delivers_its_outbox_yrs() {
    a_restarted_client_delivers_its_outbox(DocKind::Yrs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_event_queue_drops_and_counts_instead_of_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), "127.0.0.1:0".parse().unwrap()).await;
    let mut cfg = config(&server.url(), StorageConfig::Memory);
    cfg.event_queue = 2;
    let (a, mut events) = Client::start(cfg).unwrap();
    let document = doc(60);
    a.create(document, DocKind::Yrs).await.unwrap();
    for i in 0..20 {
        a.change(document, edit(DocKind::Yrs, &format!("k{i}"), i))
            .await
            .unwrap();
    }
    eventually("confirmed while nobody reads events", || async {
        a.outbox_len().await.unwrap() == 0
    })
    .await;
    let _ = drain(&mut events);
    a.change(document, edit(DocKind::Yrs, "late", 1))
        .await
        .unwrap();
    let next = timeout(WAIT, events.recv()).await.unwrap().unwrap();
    assert!(
        matches!(next, ClientEvent::Lagged { missed } if missed > 0),
        "{next:?}"
    );
    a.shutdown().await.unwrap();
    server.stop().await;
}
