//! SQLite access shared by every document: one writer thread and a few reader threads.
//!
//! - Writes ([`Storage::commit`], [`Storage::create`]) go over one bounded queue to the writer
//!   thread, which owns the only writing connection. It takes everything queued (up to
//!   [`StorageConfig::max_group`] writes) and commits it in ONE transaction with
//!   `synchronous=FULL`: one fsync for the writes of many documents (cross-document group
//!   commit); while writes of other documents keep coming it first lingers up to
//!   [`StorageConfig::commit_window`] for more. Each write runs in its own savepoint, so one
//!   document's failure (a head mismatch) does not fail the others. A write's reply is sent
//!   only after `COMMIT` returned, and the document actors acknowledge only after the reply:
//!   nothing acknowledged can be lost.
//! - Reads ([`Storage::read`]: load, catch-up, the change feed) go over one bounded queue to
//!   [`StorageConfig::readers`] threads, each owning a read-only connection; in WAL mode they see
//!   the last commit and neither wait for the writer nor block it.
//!
//! Before, each document actor opened its own connection (its own page cache, schema and
//! statements: most of an idle document's memory) and the connections queued on SQLite's
//! single write lock (busy-handler sleeps: ack p99 above a second under load).
//!
//! - Checkpoints (copying the WAL into the database file) run on a checkpoint thread with its
//!   own connection, a second after commits (under a steady load about once a second), never
//!   inside one. SQLite's default checkpoints inside the commit that takes the WAL past 1,000
//!   pages, and under a steady write load that is several times a second: each time one group
//!   commit also writes the pages into the database file and fsyncs it, and every
//!   acknowledgement waiting on it is late (the tail of the commit latency). A passive
//!   checkpoint runs beside the writer and blocks nobody. Under a steady load the WAL cannot
//!   start over by itself (a new commit always lands before a checkpoint ends), so when it
//!   passes [`StorageConfig::wal_limit_frames`] the checkpoint thread asks the writer, which
//!   runs a restart checkpoint between two groups, after their acknowledgements: little is left
//!   to copy by then, and the WAL file stays bounded.
//!
//! Both queues are bounded: a full queue makes the caller wait (back-pressure to the document
//! actors, and from them to the connections). When every [`Storage`] handle is dropped the
//! threads finish what is queued and exit; the checkpointer then empties the WAL.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use accord_engine::{DocKind, DocumentId};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::store::{CheckpointMode, NewCommit, Store, StoreError, Write, Written};

/// The sizes of the shared store's threads and queues.
#[derive(Clone, Debug)]
pub struct StorageConfig {
    /// Reader threads (each with its own connection).
    pub readers: usize,
    /// Writes waiting for the writer thread; a full queue makes writers wait.
    pub write_queue: usize,
    /// Reads waiting for a reader thread; a full queue makes readers wait.
    pub read_queue: usize,
    /// Writes committed in one transaction at most.
    pub max_group: usize,
    /// How long the writer lingers to gather writes of other documents when they keep coming
    /// (see [`write_loop`]); zero: never.
    pub commit_window: Duration,
    /// How long the writer waits for a lock held by another process before failing.
    pub busy_timeout: Duration,
    /// How long after a commit the checkpointer copies the WAL into the database file (the
    /// commits of that time are checkpointed together).
    pub checkpoint_delay: Duration,
    /// WAL frames (pages) past which the writer restarts the WAL (between two groups).
    pub wal_limit_frames: i64,
    /// The page cache of each SQLite connection (the writer, the checkpointer and every
    /// reader), in KiB.
    pub page_cache_kib: u32,
}

/// [`StorageConfig::page_cache_kib`] by default: a quarter of SQLite's own default (2,000 KiB).
/// The writer's working set is small: the `documents` rows and the last leaf of each document's
/// log (snapshots live apart from the rows every commit updates, see `store`). Against 2,000 KiB,
/// 1,000 active documents take ~2 MB less RSS, and the commits load (8 documents, 1M changes)
/// makes ~6% fewer durable changes/s (177k against 188k on average, within its run-to-run
/// spread; BENCHMARKS.md, issue 8, session 16). `--sqlite-cache-kib` raises it for a server that
/// mostly writes large documents.
pub const DEFAULT_PAGE_CACHE_KIB: u32 = 512;

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            readers: 2,
            write_queue: 1_024,
            read_queue: 1_024,
            max_group: 1_024,
            // 1,000 documents typed into (1,500 changes a second): 1.4 changes per transaction
            // without it, 2.4 with 1 ms, 4 with 2 ms, 7.5 with 4 ms; the server's CPU 0.32,
            // 0.27-0.29, 0.24 and 0.24 cores (BENCHMARKS.md, issue 8, session 11). It delays
            // only what waits for a commit (acknowledgements, Automerge relays), by at most
            // this, and only while many documents write.
            commit_window: Duration::from_millis(2),
            busy_timeout: Duration::from_secs(30),
            // Each checkpoint writes the pages changed since the last one into the database
            // file and fsyncs it: once a second instead of every 50 ms measured 5% less server
            // CPU for 1,000 documents typed into (each page is copied once for many commits),
            // with the same fan-out latency and commit throughput; the WAL peaked at 90 MB
            // instead of 72 MB under the commits load (the restart at `wal_limit_frames` waits
            // for the next checkpoint to notice it).
            checkpoint_delay: Duration::from_secs(1),
            // 16k pages of 4 KiB: 64 MiB.
            wal_limit_frames: 16_384,
            page_cache_kib: DEFAULT_PAGE_CACHE_KIB,
        }
    }
}

type ReadJob = Box<dyn FnOnce(&mut Store) + Send>;

struct WriteRequest {
    write: Write,
    reply: oneshot::Sender<Result<Written, StoreError>>,
}

/// A handle on the shared store; cheap to clone (one per document actor).
#[derive(Clone)]
pub struct Storage {
    writes: mpsc::Sender<WriteRequest>,
    reads: mpsc::Sender<ReadJob>,
}

impl Storage {
    /// Opens the database at `path` (creating it) and starts the writer and reader threads; the
    /// writer counts its transactions in `metrics`. Blocks while opening: call it from a
    /// blocking context.
    pub fn open(
        path: &Path,
        config: &StorageConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let writer = Store::open_writer(path, config.busy_timeout)?;
        writer.leave_checkpoints_to_others()?;
        writer.limit_wal_file(config.wal_limit_frames.max(1).saturating_mul(4096))?;
        let checkpointer = Store::open_checkpointer(path, config.busy_timeout)?;
        let readers = (0..config.readers.max(1))
            .map(|_| Store::open_reader(path))
            .collect::<Result<Vec<_>, _>>()?;
        for store in readers.iter().chain([&writer, &checkpointer]) {
            store.limit_page_cache(config.page_cache_kib)?;
        }
        let (writes, write_rx) = mpsc::channel(config.write_queue.max(1));
        let (reads, read_rx) = mpsc::channel::<ReadJob>(config.read_queue.max(1));
        let (max_group, window) = (config.max_group.max(1), config.commit_window);
        // One slot: a commit made while a checkpoint is already due adds nothing to wait for.
        let (committed, commits) = std::sync::mpsc::sync_channel(1);
        let (writer_alive, writer_gone) = std::sync::mpsc::channel();
        let restart = Arc::new(AtomicBool::new(false));
        let checkpoints = Checkpoints {
            committed,
            restart: restart.clone(),
            _alive: writer_alive,
        };
        let (delay, limit) = (config.checkpoint_delay, config.wal_limit_frames.max(1));
        let signals = CheckpointSignals {
            commits,
            writer_gone,
        };
        std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpointer, &signals, &restart, delay, limit))
            .map_err(|e| StoreError::Task(format!("no checkpoint thread: {e}")))?;
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || write_loop(writer, write_rx, max_group, window, &metrics, &checkpoints))
            .map_err(|e| StoreError::Task(format!("no writer thread: {e}")))?;
        let read_rx = Arc::new(Mutex::new(read_rx));
        for (index, reader) in readers.into_iter().enumerate() {
            let read_rx = read_rx.clone();
            std::thread::Builder::new()
                .name(format!("store-reader-{index}"))
                .spawn(move || read_loop(reader, &read_rx))
                .map_err(|e| StoreError::Task(format!("no reader thread: {e}")))?;
        }
        Ok(Self { writes, reads })
    }

    /// Commits `commits` (consecutive, after `head_seq`) of `document` and, when given, the
    /// snapshot covering the last of them. Returns once the transaction holding them is durable.
    pub async fn commit(
        &self,
        document: DocumentId,
        head_seq: u64,
        commits: Vec<NewCommit>,
        snapshot: Option<Vec<u8>>,
    ) -> Result<(), StoreError> {
        let write = Write::Commit {
            document,
            head_seq,
            commits,
            snapshot,
        };
        match self.write(write).await? {
            Written::Committed => Ok(()),
            Written::Created(_) => Err(StoreError::Task(
                "the writer answered a commit with a create".into(),
            )),
        }
    }

    /// Creates an empty document unless one with this id exists; false when it existed.
    pub async fn create(&self, document: DocumentId, kind: DocKind) -> Result<bool, StoreError> {
        match self.write(Write::Create { document, kind }).await? {
            Written::Created(created) => Ok(created),
            Written::Committed => Err(StoreError::Task(
                "the writer answered a create with a commit".into(),
            )),
        }
    }

    async fn write(&self, write: Write) -> Result<Written, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writes
            .send(WriteRequest { write, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` on a reader's connection (read-only: writes fail) and returns its result.
    pub async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: ReadJob = Box::new(move |store| {
            let _ = reply.send(f(store));
        });
        self.reads.send(job).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

/// The documents of the last group (to tell many documents writing from one writing often).
#[derive(Default)]
struct LastGroup {
    documents: Vec<DocumentId>,
    ended: Option<Instant>,
}

impl LastGroup {
    /// Whether writes of other documents are likely to come within `window`: the last group
    /// committed less than `window` before this one began (writes keep coming) and this group
    /// has a document the last one did not. One document writing back to back (its actor waits
    /// for each commit before the next) has nobody to wait for, and a quiet server waits for
    /// nobody, so neither pays the window.
    fn expects_others(&self, group: &[WriteRequest], began: Instant, window: Duration) -> bool {
        !window.is_zero()
            && self
                .ended
                .is_some_and(|ended| began.saturating_duration_since(ended) < window)
            // (The first few writes tell: a look at each of a thousand would cost more than
            // it saves.)
            && group
                .iter()
                .take(8)
                .any(|r| !self.documents.contains(&r.write.document()))
    }

    fn record(&mut self, writes: &[Write], ended: Instant) {
        self.documents.clear();
        self.documents.extend(writes.iter().map(Write::document));
        self.ended = Some(ended);
    }
}

/// Moves what is queued into `group`, up to `max_group` writes.
fn take_queued(rx: &mut mpsc::Receiver<WriteRequest>, group: &mut Vec<WriteRequest>, max: usize) {
    while group.len() < max {
        match rx.try_recv() {
            Ok(request) => group.push(request),
            Err(_) => break,
        }
    }
}

/// The writer thread: takes what is queued, commits it in one transaction, replies.
///
/// Each transaction costs an fsync however few writes it holds, and many documents written
/// at a steady rate arrive one at a time (1,000 documents typed into, 1,500 changes a second:
/// 1.4 writes per transaction, the writer thread ~45% of the server's CPU). So when writes of
/// other documents keep coming ([`LastGroup::expects_others`]) the writer lingers up to the
/// commit window before committing, and what came meanwhile goes in the same transaction.
/// A sleep, not a timed receive: the writes come over a tokio channel, which a plain thread can
/// only wait on without a timeout.
fn write_loop(
    mut store: Store,
    mut rx: mpsc::Receiver<WriteRequest>,
    max_group: usize,
    window: Duration,
    metrics: &Metrics,
    checkpoints: &Checkpoints,
) {
    let mut group = Vec::with_capacity(max_group.min(64));
    let mut last = LastGroup::default();
    while let Some(first) = rx.blocking_recv() {
        let began = Instant::now();
        group.push(first);
        take_queued(&mut rx, &mut group, max_group);
        if group.len() < max_group && last.expects_others(&group, began, window) {
            std::thread::sleep(window);
            take_queued(&mut rx, &mut group, max_group);
            metrics.store_lingers.fetch_add(1, Ordering::Relaxed);
        }
        let (writes, replies): (Vec<Write>, Vec<_>) =
            group.drain(..).map(|r| (r.write, r.reply)).unzip();
        let result = store.write_group(&writes);
        last.record(&writes, Instant::now());
        metrics.store_transactions.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(results) => {
                let _ = checkpoints.committed.try_send(());
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
                if checkpoints.restart.swap(false, Ordering::Relaxed) {
                    match store.checkpoint(CheckpointMode::Restart) {
                        Ok(done) if done.busy => tracing::debug!("WAL restart: busy"),
                        Ok(_) => {}
                        Err(error) => tracing::warn!(%error, "WAL restart checkpoint failed"),
                    }
                }
            }
            Err(error) => {
                tracing::error!(%error, writes = writes.len(), "group commit failed");
                let error = Arc::new(error);
                for reply in replies {
                    let _ = reply.send(Err(StoreError::GroupCommit(error.clone())));
                }
            }
        }
    }
}

/// What the writer thread tells the checkpoint thread, and what it is asked back.
struct Checkpoints {
    /// A transaction committed (one slot; full means a checkpoint is already due).
    committed: std::sync::mpsc::SyncSender<()>,
    /// The WAL passed its limit: the writer restarts it after its current group.
    restart: Arc<AtomicBool>,
    /// Never sent on: dropped with the writer, which tells the checkpoint thread it is gone.
    _alive: std::sync::mpsc::Sender<()>,
}

/// What the checkpoint thread waits on.
struct CheckpointSignals {
    /// A commit was made (see [`Checkpoints::committed`]).
    commits: std::sync::mpsc::Receiver<()>,
    /// Disconnected once the writer thread is gone.
    writer_gone: std::sync::mpsc::Receiver<()>,
}

/// The checkpoint thread: a while after each commit (`delay`, so the commits of that time go
/// together), copies the WAL into the database file without blocking anyone; when the WAL has
/// grown past `limit` frames, asks the writer to restart it. Failures are logged and retried
/// after the next commit: nothing committed depends on a checkpoint (the WAL holds it durably).
/// When the writer is gone, empties the WAL and exits.
fn checkpoint_loop(
    mut store: Store,
    signals: &CheckpointSignals,
    restart: &AtomicBool,
    delay: Duration,
    limit: i64,
) {
    while signals.commits.recv().is_ok() {
        // Wait out the delay, but not past the writer's exit: shutdown does not wait for it.
        // The commits made meanwhile do not wake this thread (it used to take each one: a
        // wake-up per commit, ~20 a second with 8 typists, for nothing).
        match signals.writer_gone.recv_timeout(delay) {
            Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        // What was committed so far goes into this checkpoint.
        while signals.commits.try_recv().is_ok() {}
        match store.checkpoint(CheckpointMode::Passive) {
            Ok(done) if done.wal_frames > limit => {
                tracing::debug!(frames = done.wal_frames, "WAL past its limit");
                restart.store(true, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "WAL checkpoint failed"),
        }
    }
    if let Err(error) = store.checkpoint(CheckpointMode::Truncate) {
        tracing::warn!(%error, "final WAL checkpoint failed");
    }
}

/// A reader thread: runs read jobs on its connection until the queue closes.
fn read_loop(mut store: Store, rx: &Mutex<mpsc::Receiver<ReadJob>>) {
    loop {
        let job = {
            let mut rx = rx.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            rx.blocking_recv()
        };
        let Some(job) = job else { return };
        // A panicking job drops its reply (its caller gets `Closed`); the thread goes on.
        if catch_unwind(AssertUnwindSafe(|| job(&mut store))).is_err() {
            tracing::error!("a store read panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use accord_engine::{ChangeId, ReplicaId};
    use rusqlite::Connection;

    fn commit(seq: u64) -> NewCommit {
        NewCommit {
            seq,
            change: ChangeId([seq as u8; 32]),
            author: ReplicaId::from_bytes([2; 16]),
            bytes: vec![seq as u8],
        }
    }

    /// A store in a new temporary directory: the directory, the database's path, the store.
    fn open_temp(
        config: &StorageConfig,
        metrics: Arc<Metrics>,
    ) -> (tempfile::TempDir, std::path::PathBuf, Storage) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let storage = Storage::open(&path, config, metrics).unwrap();
        (dir, path, storage)
    }

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    fn doc(n: u8) -> DocumentId {
        DocumentId::from_bytes([n; 16])
    }

    /// Holds SQLite's write lock from another connection, so the writer thread waits in
    /// `BEGIN IMMEDIATE`.
    fn lock_writes(path: &Path) -> Connection {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        conn
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn documents_commit_together_and_fail_alone() {
        let metrics = metrics();
        let (_dir, path, storage) = open_temp(&StorageConfig::default(), metrics.clone());
        for n in 1..=3 {
            assert!(storage.create(doc(n), DocKind::Yrs).await.unwrap());
        }
        assert!(!storage.create(doc(1), DocKind::Yrs).await.unwrap());
        // The writer takes the first document's write and waits for a lock held elsewhere; the
        // writes of the two others queue meanwhile and go into one transaction, where the
        // second document's (its head is wrong) fails alone.
        let lock = lock_writes(&path);
        let transactions = metrics.store_transactions.load(Ordering::Relaxed);
        let a = tokio::spawn({
            let s = storage.clone();
            async move { s.commit(doc(1), 0, vec![commit(1), commit(2)], None).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let b = tokio::spawn({
            let s = storage.clone();
            async move { s.commit(doc(2), 5, vec![commit(6)], None).await }
        });
        let c = tokio::spawn({
            let s = storage.clone();
            async move {
                s.commit(doc(3), 0, vec![commit(1)], Some(b"snap".to_vec()))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        lock.execute_batch("ROLLBACK").unwrap();
        a.await.unwrap().unwrap();
        assert!(matches!(
            b.await.unwrap(),
            Err(StoreError::HeadMismatch {
                expected: 5,
                found: 0,
                ..
            })
        ));
        c.await.unwrap().unwrap();
        assert_eq!(
            metrics.store_transactions.load(Ordering::Relaxed) - transactions,
            2,
            "three documents' writes in two transactions"
        );
        let loaded = storage
            .read(move |s| s.load(doc(3)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(loaded.snapshot.as_deref(), Some(&b"snap"[..]));
        assert_eq!(loaded.head_seq, 1);
        let loaded = storage
            .read(move |s| s.load(doc(1)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(loaded.changes.len(), 2);
        assert_eq!(
            storage.read(move |s| s.head(doc(2))).await.unwrap(),
            Some((DocKind::Yrs, 0))
        );
        // Readers do not write.
        assert!(storage
            .read(move |s| s.create_new(doc(9), DocKind::Yrs))
            .await
            .is_err());
    }

    fn request(document: DocumentId) -> WriteRequest {
        WriteRequest {
            write: Write::Create {
                document,
                kind: DocKind::Yrs,
            },
            reply: oneshot::channel().0,
        }
    }

    #[test]
    fn the_writer_lingers_only_when_other_documents_keep_writing() {
        let window = Duration::from_millis(2);
        let start = Instant::now();
        let mut last = LastGroup::default();
        assert!(
            !last.expects_others(&[request(doc(1))], start, window),
            "nothing committed yet"
        );
        last.record(&[request(doc(1)).write], start);
        let soon = start + Duration::from_millis(1);
        assert!(
            last.expects_others(&[request(doc(2))], soon, window),
            "another document right after a commit"
        );
        assert!(
            !last.expects_others(&[request(doc(1))], soon, window),
            "the same document back to back: its actor waits for each commit"
        );
        let later = start + Duration::from_millis(50);
        assert!(
            !last.expects_others(&[request(doc(2))], later, window),
            "a quiet server"
        );
        assert!(!last.expects_others(&[request(doc(2))], soon, Duration::ZERO));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_of_documents_that_keep_coming_share_a_transaction() {
        let metrics = metrics();
        let config = StorageConfig {
            // Long, so that the test does not depend on the machine's speed.
            commit_window: Duration::from_millis(400),
            ..StorageConfig::default()
        };
        let (_dir, _path, storage) = open_temp(&config, metrics.clone());
        let count = |m: &Metrics| {
            (
                m.store_transactions.load(Ordering::Relaxed),
                m.store_lingers.load(Ordering::Relaxed),
            )
        };
        // One document written back to back never waits.
        assert!(storage.create(doc(1), DocKind::Yrs).await.unwrap());
        let before = count(&metrics);
        for seq in 1..=3 {
            storage
                .commit(doc(1), seq - 1, vec![commit(seq)], None)
                .await
                .unwrap();
        }
        assert_eq!(count(&metrics), (before.0 + 3, before.1), "no lingering");
        // Another document right after: the writer lingers, and a third document's write that
        // comes meanwhile goes into the same transaction.
        let before = count(&metrics);
        let b = tokio::spawn({
            let s = storage.clone();
            async move { s.create(doc(2), DocKind::Yrs).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let c = tokio::spawn({
            let s = storage.clone();
            async move { s.create(doc(3), DocKind::Yrs).await }
        });
        assert!(b.await.unwrap().unwrap());
        assert!(c.await.unwrap().unwrap());
        assert_eq!(
            count(&metrics),
            (before.0 + 1, before.1 + 1),
            "one transaction"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_transaction_fails_every_write_in_it() {
        let config = StorageConfig {
            busy_timeout: Duration::from_millis(50),
            ..StorageConfig::default()
        };
        let (_dir, path, storage) = open_temp(&config, metrics());
        storage.create(doc(1), DocKind::Yrs).await.unwrap();
        let lock = lock_writes(&path);
        let writes = (0..3u8).map(|n| {
            let s = storage.clone();
            tokio::spawn(async move { s.create(doc(10 + n), DocKind::Yrs).await })
        });
        for write in writes.collect::<Vec<_>>() {
            let result = write.await.unwrap();
            assert!(
                matches!(&result, Err(StoreError::GroupCommit(e)) if matches!(**e, StoreError::Sqlite(_))),
                "{result:?}"
            );
        }
        lock.execute_batch("ROLLBACK").unwrap();
        // Nothing of the failed group is stored, and the writer goes on.
        assert_eq!(storage.read(move |s| s.head(doc(10))).await.unwrap(), None);
        assert!(storage.create(doc(10), DocKind::Yrs).await.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_write_queue_makes_writers_wait() {
        let config = StorageConfig {
            write_queue: 2,
            ..StorageConfig::default()
        };
        let (_dir, path, storage) = open_temp(&config, metrics());
        let lock = lock_writes(&path);
        // The writer takes the first write and waits for the lock; two more fill the queue.
        let mut queued = Vec::new();
        for n in 0..3u8 {
            let s = storage.clone();
            queued.push(tokio::spawn(
                async move { s.create(doc(n), DocKind::Yrs).await },
            ));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The fourth does not get in while the queue is full.
        let s = storage.clone();
        let mut fourth = tokio::spawn(async move { s.create(doc(3), DocKind::Yrs).await });
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut fourth)
                .await
                .is_err(),
            "a write got past a full queue"
        );
        assert_eq!(storage.writes.capacity(), 0, "the queue is full");
        lock.execute_batch("ROLLBACK").unwrap();
        for write in queued {
            assert!(write.await.unwrap().unwrap());
        }
        assert!(fourth.await.unwrap().unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_read_queue_makes_readers_wait() {
        let config = StorageConfig {
            readers: 1,
            read_queue: 1,
            ..StorageConfig::default()
        };
        let (_dir, _path, storage) = open_temp(&config, metrics());
        // The only reader is busy until `release` fires; one read fills the queue.
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let s = storage.clone();
        let busy = tokio::spawn(async move {
            s.read(move |_| {
                let _ = gate.lock().unwrap().recv();
                Ok(1)
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let s = storage.clone();
        let queued = tokio::spawn(async move { s.read(|_| Ok(2)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let s = storage.clone();
        let mut third = tokio::spawn(async move { s.read(|_| Ok(3)).await });
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut third)
                .await
                .is_err(),
            "a read got past a full queue"
        );
        assert_eq!(storage.reads.capacity(), 0, "the queue is full");
        release.send(()).unwrap();
        assert_eq!(busy.await.unwrap().unwrap(), 1);
        assert_eq!(queued.await.unwrap().unwrap(), 2);
        assert_eq!(third.await.unwrap().unwrap(), 3);
    }

    fn file_len(path: &Path) -> u64 {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }

    fn big_commit(seq: u64) -> NewCommit {
        NewCommit {
            bytes: vec![seq as u8; 8 * 1024],
            ..commit(seq)
        }
    }

    /// Polls `check` for up to five seconds.
    async fn eventually(mut check: impl FnMut() -> bool) -> bool {
        for _ in 0..500 {
            if check() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_checkpoint_thread_copies_commits_into_the_database_file() {
        let config = StorageConfig {
            checkpoint_delay: Duration::from_millis(1),
            ..StorageConfig::default()
        };
        let (dir, path, storage) = open_temp(&config, metrics());
        storage.create(doc(1), DocKind::Yrs).await.unwrap();
        for seq in 1..=50 {
            storage
                .commit(doc(1), seq - 1, vec![big_commit(seq)], None)
                .await
                .unwrap();
        }
        // ~100 pages: below SQLite's own 1,000-page checkpoint (which the writer no longer
        // runs anyway), so only the checkpoint thread can have put them into the file.
        assert!(
            eventually(|| file_len(&path) >= 50 * 8 * 1024).await,
            "the database file holds {} bytes",
            file_len(&path)
        );
        // The writer stops; the checkpoint thread empties the WAL, and everything reads back.
        drop(storage);
        let wal = dir.path().join("s.db-wal");
        assert!(
            eventually(|| file_len(&wal) == 0).await,
            "the WAL still holds {} bytes",
            file_len(&wal)
        );
        let mut store = Store::open_reader(&path).unwrap();
        let loaded = store.load(doc(1)).unwrap().unwrap();
        assert_eq!(loaded.head_seq, 50);
        assert_eq!(loaded.changes.len(), 50);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_empties_the_wal_without_waiting_out_the_checkpoint_delay() {
        let config = StorageConfig {
            checkpoint_delay: Duration::from_secs(60),
            ..StorageConfig::default()
        };
        let (dir, path, storage) = open_temp(&config, metrics());
        storage.create(doc(1), DocKind::Yrs).await.unwrap();
        storage
            .commit(doc(1), 0, vec![big_commit(1)], None)
            .await
            .unwrap();
        let wal = dir.path().join("s.db-wal");
        assert!(file_len(&wal) > 0, "the commit is in the WAL");
        // The checkpointer is waiting out its minute; the writer's exit cuts the wait short.
        drop(storage);
        assert!(
            eventually(|| file_len(&wal) == 0).await,
            "the WAL still holds {} bytes",
            file_len(&wal)
        );
        let mut store = Store::open_reader(&path).unwrap();
        assert_eq!(store.load(doc(1)).unwrap().unwrap().head_seq, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_stays_bounded_under_a_steady_write_load() {
        let limit_frames = 64; // 256 KiB
        let config = StorageConfig {
            checkpoint_delay: Duration::from_millis(1),
            wal_limit_frames: limit_frames,
            ..StorageConfig::default()
        };
        let (_dir, path, storage) = open_temp(&config, metrics());
        let wal = path.with_extension("db-wal");
        let writers: Vec<_> = (1..=4u8)
            .map(|n| {
                let s = storage.clone();
                tokio::spawn(async move {
                    s.create(doc(n), DocKind::Yrs).await.unwrap();
                    for seq in 1..=250 {
                        s.commit(doc(n), seq - 1, vec![big_commit(seq)], None)
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        let mut largest = 0;
        while !writers.iter().all(|w| w.is_finished()) {
            largest = largest.max(file_len(&wal));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for writer in writers {
            writer.await.unwrap();
        }
        // 1,000 commits of 8 KiB (more than 8 MB of pages) went through a WAL that never grew
        // far past its limit.
        assert!(
            largest < 8 * limit_frames as u64 * 4096,
            "the WAL reached {largest} bytes"
        );
        for n in 1..=4u8 {
            let loaded = storage
                .read(move |s| s.load(doc(n)))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(loaded.head_seq, 250);
            assert_eq!(loaded.changes.len(), 250);
        }
    }

    #[test]
    fn a_file_that_is_not_a_database_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let error = Storage::open(&path, &StorageConfig::default(), metrics())
            .err()
            .expect("garbage opened");
        assert!(matches!(error, StoreError::Open { .. }), "{error:?}");
        assert!(error.to_string().contains("does not open"), "{error}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_read_fails_alone() {
        let config = StorageConfig {
            readers: 1,
            ..StorageConfig::default()
        };
        let (_dir, _path, storage) = open_temp(&config, metrics());
        let result: Result<(), _> = storage.read(|_| panic!("boom")).await;
        assert!(matches!(result, Err(StoreError::Closed)));
        assert_eq!(storage.read(|_| Ok(7)).await.unwrap(), 7);
    }
}
