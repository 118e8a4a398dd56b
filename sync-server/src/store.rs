//! The server's durable store: SQLite in WAL mode with `synchronous=FULL`.
//!
//! - `documents`: one row per document: id, kind and the head sequence number. Every commit
//!   updates it, so it holds nothing large: SQLite rewrites a whole row to change one column,
//!   reading a blob in it back page by page first.
//! - `snapshots`: the last compacted snapshot of a document and the sequence number it covers
//!   (schema 1 kept them in the `documents` row, which made every commit of a document read
//!   its whole snapshot; [`Store::open`] migrates such a file).
//! - `commits`: the commit log, `PRIMARY KEY(document, seq)`: each committed change's id, the
//!   replica whose connection sent it, and its bytes until a snapshot covers it (compaction keeps
//!   the `(seq, change_id)` index and drops the bytes).
//!
//! The server opens one writing connection and a few reading ones, all shared by every document
//! (see `storage`): [`Store::write_group`] commits the writes of many documents in one
//! `BEGIN IMMEDIATE` transaction, each in its own savepoint. Bytes that do not read back are
//! [`StoreError::Corrupt`], never a panic.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use accord_engine::{ChangeId, DocKind, DocumentId, ReplicaId};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored row does not read back.
    #[error("corrupt row for document {document}: {detail}")]
    Corrupt {
        /// The document.
        document: String,
        /// What is wrong.
        detail: String,
    },
    /// The head in storage is not the one the caller committed after (two writers?).
    #[error("document {document}: expected head {expected}, found {found}")]
    HeadMismatch {
        /// The document.
        document: DocumentId,
        /// The head the caller knew.
        expected: u64,
        /// The head in storage.
        found: u64,
    },
    /// The blocking task running a store call failed.
    #[error("store task failed: {0}")]
    Task(String),
    /// The database at this path does not open (not a database, unreadable, corrupt).
    #[error("the database {path} does not open: {source}")]
    Open {
        /// The database file.
        path: String,
        /// Why.
        source: rusqlite::Error,
    },
    /// A commit that does not continue its document's log (each commit's seq is the one after
    /// the last): refused before anything is written.
    #[error("document {document}: the next commit is seq {expected}, not {got}")]
    OutOfOrder {
        /// The document.
        document: DocumentId,
        /// The seq the log continues with.
        expected: u64,
        /// The seq given.
        got: u64,
    },
    /// The transaction this write was grouped into failed as a whole: nothing of it is stored.
    #[error("group commit failed: {0}")]
    GroupCommit(Arc<StoreError>),
    /// The store's threads are gone (the server is stopping, or a store thread died).
    #[error("the store is closed")]
    Closed,
    /// The database was written by a newer server, in a schema this one does not know.
    #[error("the database has schema version {found}; this server knows up to {supported}")]
    NewerSchema {
        /// The database's schema version (`PRAGMA user_version`).
        found: i64,
        /// The newest this server writes.
        supported: i64,
    },
    /// A reading connection found a database its writer has not brought to this server's
    /// schema (the writer migrates when it opens, and is opened first).
    #[error("the database has schema version {found}; open it for writing first, which brings it to {expected}")]
    NotMigrated {
        /// The database's schema version (`PRAGMA user_version`).
        found: i64,
        /// The version this server reads.
        expected: i64,
    },
}

/// A document as stored.
#[derive(Debug)]
pub struct StoredDocument {
    /// Its kind.
    pub kind: DocKind,
    /// The last compaction, if any.
    pub snapshot: Option<Vec<u8>>,
    /// The sequence number the snapshot covers (0 for none).
    pub snapshot_seq: u64,
    /// The latest sequence number.
    pub head_seq: u64,
    /// The id of the change at `head_seq`, if any.
    pub head_change: Option<ChangeId>,
    /// The bytes of the changes after the snapshot, in order.
    pub changes: Vec<Vec<u8>>,
}

/// One change to commit.
#[derive(Clone, Debug)]
pub struct NewCommit {
    /// Its sequence number.
    pub seq: u64,
    /// Its id.
    pub change: ChangeId,
    /// The replica whose connection sent it.
    pub author: ReplicaId,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// One entry of the commit log, as the change feed reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedCommit {
    /// Its sequence number.
    pub seq: u64,
    /// Its id.
    pub change: ChangeId,
    /// The replica whose connection sent it (all zeros: the server itself, for REST changes).
    pub author: ReplicaId,
    /// Its bytes, until a snapshot covers it.
    pub bytes: Option<Vec<u8>>,
}

/// A connection to the server database.
pub struct Store {
    conn: Connection,
}

/// One write of a group commit ([`Store::write_group`]).
#[derive(Debug)]
pub enum Write {
    /// [`Store::commit`].
    Commit {
        /// The document.
        document: DocumentId,
        /// The head the commits follow.
        head_seq: u64,
        /// The commits, consecutive after `head_seq`.
        commits: Vec<NewCommit>,
        /// A snapshot covering the last of them, if one is due.
        snapshot: Option<Vec<u8>>,
    },
    /// [`Store::create_new`].
    Create {
        /// The document.
        document: DocumentId,
        /// Its kind.
        kind: DocKind,
    },
}

impl Write {
    /// The document written.
    pub fn document(&self) -> DocumentId {
        match self {
            Write::Commit { document, .. } | Write::Create { document, .. } => *document,
        }
    }
}

/// What a [`Write`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// The commits are stored.
    Committed,
    /// The document was created (true) or existed already (false).
    Created(bool),
}

/// The schema this build writes (`PRAGMA user_version`); 0 is schema 1, from before the
/// version was recorded.
const SCHEMA_VERSION: i64 = 2;

/// The commit log's table: the same in schemas 1 and 2.
macro_rules! commits_table {
    () => {
        "
CREATE TABLE IF NOT EXISTS commits (
    document BLOB NOT NULL,
    seq INTEGER NOT NULL,
    change_id BLOB NOT NULL,
    author BLOB NOT NULL,
    bytes BLOB,
    PRIMARY KEY (document, seq)
) WITHOUT ROWID;
"
    };
}

const SCHEMA: &str = concat!(
    "
CREATE TABLE IF NOT EXISTS documents (
    id BLOB PRIMARY KEY,
    kind INTEGER NOT NULL,
    head_seq INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshots (
    document BLOB PRIMARY KEY,
    seq INTEGER NOT NULL,
    bytes BLOB NOT NULL
);
",
    commits_table!()
);

/// Schema 1 (user_version 0) as the first release created it: each document's snapshot inside
/// its `documents` row. Kept so that tests can make the files an older server wrote.
#[doc(hidden)]
pub const SCHEMA_1: &str = concat!(
    "
CREATE TABLE documents (
    id BLOB PRIMARY KEY,
    kind INTEGER NOT NULL,
    snapshot BLOB,
    snapshot_seq INTEGER NOT NULL DEFAULT 0,
    head_seq INTEGER NOT NULL DEFAULT 0
);
",
    commits_table!()
);

/// Schema 1 to 2: the snapshots move out of the `documents` rows into their own table (the
/// commit log is unchanged).
const MIGRATE_1_TO_2: &str = "
CREATE TABLE documents_v2 (
    id BLOB PRIMARY KEY,
    kind INTEGER NOT NULL,
    head_seq INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
INSERT INTO documents_v2 (id, kind, head_seq) SELECT id, kind, head_seq FROM documents;
CREATE TABLE snapshots (
    document BLOB PRIMARY KEY,
    seq INTEGER NOT NULL,
    bytes BLOB NOT NULL
);
INSERT INTO snapshots (document, seq, bytes)
    SELECT id, snapshot_seq, snapshot FROM documents WHERE snapshot IS NOT NULL;
DROP TABLE documents;
ALTER TABLE documents_v2 RENAME TO documents;
";

/// Creates the schema in a new database, or brings an older one up to [`SCHEMA_VERSION`], in
/// one transaction (a migration that fails leaves the file as it was). A database written by a
/// newer server is refused rather than written in a format it does not know.
fn prepare_schema(conn: &Connection) -> Result<(), StoreError> {
    let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    refuse_newer(&tx)?;
    let schema_1: bool = tx.query_row(
        "SELECT count(*) FROM pragma_table_info('documents') WHERE name = 'snapshot'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if schema_1 {
        // Copies every snapshot once: the start of an upgraded server takes longer, so say why.
        tracing::info!("migrating the database from schema 1 to {SCHEMA_VERSION}");
        let started = std::time::Instant::now();
        tx.execute_batch(MIGRATE_1_TO_2)?;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "database migrated"
        );
    }
    tx.execute_batch(SCHEMA)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_u64(document: DocumentId, value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt {
        document: document.to_string(),
        detail: format!("negative number {value}"),
    })
}

fn to_kind(document: DocumentId, kind: i64) -> Result<DocKind, StoreError> {
    u8::try_from(kind)
        .ok()
        .and_then(DocKind::from_code)
        .ok_or_else(|| StoreError::Corrupt {
            document: document.to_string(),
            detail: format!("unknown kind {kind}"),
        })
}

fn change_id(document: DocumentId, bytes: &[u8]) -> Result<ChangeId, StoreError> {
    let array: [u8; 32] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        document: document.to_string(),
        detail: format!("change id of {} bytes", bytes.len()),
    })?;
    Ok(ChangeId(array))
}

/// Refuses a database written by a newer server before anything is changed in it (not even its
/// journal mode); [`prepare_schema`] checks again inside its transaction.
fn refuse_newer(conn: &Connection) -> Result<i64, StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(version)
}

/// Checks that a reading connection finds this server's schema (reading the schema also makes
/// a file that is not a database fail here, when it opens).
fn read_schema(conn: &Connection) -> Result<(), StoreError> {
    let version = refuse_newer(conn)?;
    if version != SCHEMA_VERSION {
        return Err(StoreError::NotMigrated {
            found: version,
            expected: SCHEMA_VERSION,
        });
    }
    Ok(())
}

/// How a WAL checkpoint treats the writer and the readers (SQLite's checkpoint modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointMode {
    /// Copy what can be copied now; wait for no one.
    Passive,
    /// Wait for the writer and readers, copy everything, and make the next write start the WAL
    /// from its beginning (bounds the WAL file).
    Restart,
    /// As `Restart`, and truncate the WAL file to nothing.
    Truncate,
}

/// What one checkpoint did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpointed {
    /// It could not finish: another connection held a lock it needed.
    pub busy: bool,
    /// Frames in the WAL (-1 when the database is not in WAL mode).
    pub wal_frames: i64,
    /// Frames of it now copied into the database file.
    pub copied_frames: i64,
}

impl Store {
    /// Opens (creating if needed) the database at `path` for writing: WAL, `synchronous=FULL`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_writer(path, Duration::from_secs(30))
    }

    /// [`Store::open`], waiting at most `busy` for a lock another process holds.
    pub fn open_writer(path: &Path, busy: Duration) -> Result<Self, StoreError> {
        Self::open_with(path, |conn| {
            conn.busy_timeout(busy)?;
            refuse_newer(conn)?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            prepare_schema(conn)
        })
    }

    /// Opens the database at `path` (which [`Store::open`] created) for reading only. In WAL
    /// mode readers see the last commit and neither wait for the writer nor block it.
    pub fn open_reader(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, |conn| {
            conn.busy_timeout(Duration::from_secs(30))?;
            conn.pragma_update(None, "query_only", true)?;
            read_schema(conn)
        })
    }

    /// Opens a connection to the database at `path` (which [`Store::open`] created) that only
    /// checkpoints the WAL ([`Store::checkpoint`]), for a writer that leaves checkpoints to others
    /// ([`Store::leave_checkpoints_to_others`]).
    pub fn open_checkpointer(path: &Path, busy: Duration) -> Result<Self, StoreError> {
        Self::open_with(path, |conn| {
            conn.busy_timeout(busy)?;
            conn.pragma_update(None, "wal_autocheckpoint", 0)?;
            read_schema(conn)
        })
    }

    /// Opens a connection to `path` and prepares it with `setup`; an SQLite failure is
    /// [`StoreError::Open`] naming the file.
    fn open_with(
        path: &Path,
        setup: impl FnOnce(&Connection) -> Result<(), StoreError>,
    ) -> Result<Self, StoreError> {
        let open = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        let conn = Connection::open(path).map_err(open)?;
        match setup(&conn) {
            Ok(()) => Ok(Self { conn }),
            Err(StoreError::Sqlite(source)) => Err(open(source)),
            Err(other) => Err(other),
        }
    }

    /// Stops this connection from checkpointing the WAL itself. By default SQLite checkpoints
    /// inside the commit that takes the WAL past 1,000 pages: that commit then also copies the
    /// pages into the database file and fsyncs it, and every write grouped into it (every
    /// acknowledgement waiting on it) pays for that. After this call another connection must
    /// checkpoint ([`Store::checkpoint`]), or the WAL grows without bound.
    pub fn leave_checkpoints_to_others(&self) -> Result<(), StoreError> {
        self.conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        Ok(())
    }

    /// Caps this connection's page cache at `kib` KiB (`PRAGMA cache_size`; SQLite's default
    /// is 2,000 KiB per connection).
    pub fn limit_page_cache(&self, kib: u32) -> Result<(), StoreError> {
        self.conn
            .pragma_update(None, "cache_size", -i64::from(kib.max(1)))?;
        Ok(())
    }

    /// Makes SQLite cut the WAL file back to `bytes` when the WAL starts over (a WAL that grew
    /// during a burst does not keep its size on disk).
    pub fn limit_wal_file(&self, bytes: i64) -> Result<(), StoreError> {
        self.conn.pragma_update(None, "journal_size_limit", bytes)?;
        Ok(())
    }

    /// Runs one WAL checkpoint (`PRAGMA wal_checkpoint(mode)`). `Passive` copies what it can
    /// without waiting for anyone; `Restart` waits (up to the busy timeout) for the writer and
    /// the readers so that the next write starts the WAL over; `Truncate` also empties the file.
    pub fn checkpoint(&mut self, mode: CheckpointMode) -> Result<Checkpointed, StoreError> {
        let sql = match mode {
            CheckpointMode::Passive => "PRAGMA wal_checkpoint(PASSIVE)",
            CheckpointMode::Restart => "PRAGMA wal_checkpoint(RESTART)",
            CheckpointMode::Truncate => "PRAGMA wal_checkpoint(TRUNCATE)",
        };
        let done = self.conn.query_row(sql, [], |row| {
            Ok(Checkpointed {
                busy: row.get::<_, i64>(0)? != 0,
                wal_frames: row.get(1)?,
                copied_frames: row.get(2)?,
            })
        })?;
        Ok(done)
    }

    /// Runs `writes` in one transaction (one fsync), each in its own savepoint: a write that
    /// fails is rolled back alone and reported in its slot. The outer error means the
    /// transaction as a whole failed (it did not begin, SQLite aborted it, or the commit
    /// failed): nothing of it is stored.
    pub fn write_group(
        &mut self,
        writes: &[Write],
    ) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
        let mut tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut out = Vec::with_capacity(writes.len());
        for write in writes {
            let savepoint = tx.savepoint()?;
            let result = match write {
                Write::Commit {
                    document,
                    head_seq,
                    commits,
                    snapshot,
                } => write_commit(
                    &savepoint,
                    *document,
                    *head_seq,
                    commits,
                    snapshot.as_deref(),
                )
                .map(|()| Written::Committed),
                Write::Create { document, kind } => {
                    write_create(&savepoint, *document, *kind).map(Written::Created)
                }
            };
            match result {
                Ok(written) => {
                    savepoint.commit()?;
                    out.push(Ok(written));
                }
                Err(error) => {
                    if savepoint.is_autocommit() {
                        // SQLite rolled the whole transaction back (I/O error, disk full).
                        return Err(error);
                    }
                    // Roll this write back, checking that it worked: a silently failed
                    // rollback would commit its half-write with the others, so that fails the
                    // whole group instead.
                    savepoint.finish()?;
                    out.push(Err(error));
                }
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// The raw connection (for tests and tools).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Loads a document, if stored.
    pub fn load(&mut self, document: DocumentId) -> Result<Option<StoredDocument>, StoreError> {
        // One read transaction: the row and the log it heads are of the same commit.
        let tx = self.conn.transaction()?;
        let loaded = load_in(&tx, document)?;
        tx.commit()?;
        Ok(loaded)
    }
    /// Creates an empty document.
    pub fn create(&mut self, document: DocumentId, kind: DocKind) -> Result<(), StoreError> {
        self.create_new(document, kind).map(drop)
    }

    /// Creates an empty document unless one with this id exists; false when it existed.
    pub fn create_new(&mut self, document: DocumentId, kind: DocKind) -> Result<bool, StoreError> {
        write_create(&self.conn, document, kind)
    }

    /// Commits `commits` (consecutive, after `head_seq`) in one transaction and, when given,
    /// stores `snapshot` as covering the last of them and drops the bytes it covers.
    pub fn commit(
        &mut self,
        document: DocumentId,
        head_seq: u64,
        commits: &[NewCommit],
        snapshot: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        write_commit(&tx, document, head_seq, commits, snapshot)?;
        tx.commit()?;
        Ok(())
    }

    /// The commits after `since_seq` sent by `author`, at most `limit`, ascending.
    pub fn commits_by(
        &mut self,
        document: DocumentId,
        since_seq: u64,
        author: ReplicaId,
        limit: usize,
    ) -> Result<Vec<(u64, ChangeId)>, StoreError> {
        let rows = self.read_commits(
            document,
            "SELECT seq, change_id FROM commits WHERE document = ?1 AND seq > ?2 AND author = ?4 ORDER BY seq LIMIT ?3",
            since_seq,
            limit,
            Some(author),
            usize::MAX,
        )?;
        Ok(rows.into_iter().map(|c| (c.seq, c.change)).collect())
    }

    /// Every commit after `since_seq`, at most `limit`, ascending (for tools and tests).
    pub fn commits_after(
        &mut self,
        document: DocumentId,
        since_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, ChangeId)>, StoreError> {
        let rows = self.read_commits(
            document,
            "SELECT seq, change_id FROM commits WHERE document = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            since_seq,
            limit,
            None,
            usize::MAX,
        )?;
        Ok(rows.into_iter().map(|c| (c.seq, c.change)).collect())
    }

    /// The change feed: every commit after `since_seq` with its author and bytes (`None` once a
    /// snapshot covers it), at most `limit` commits and, past the first, at most `max_bytes` of
    /// change bytes, ascending.
    pub fn feed(
        &mut self,
        document: DocumentId,
        since_seq: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<LoggedCommit>, StoreError> {
        self.read_commits(
            document,
            "SELECT seq, change_id, author, bytes FROM commits WHERE document = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            since_seq,
            limit,
            None,
            max_bytes,
        )
    }

    /// The sequence number each change in `changes` was committed at, if it was (a scan of the
    /// document's log per id: for the rare duplicate, not for the hot path).
    pub fn seqs_of(
        &mut self,
        document: DocumentId,
        changes: &[ChangeId],
    ) -> Result<Vec<Option<u64>>, StoreError> {
        let mut statement = self.conn.prepare_cached(
            "SELECT seq FROM commits WHERE document = ?1 AND change_id = ?2 ORDER BY seq LIMIT 1",
        )?;
        let key = document.as_bytes().as_slice();
        let mut out = Vec::with_capacity(changes.len());
        for change in changes {
            let seq: Option<i64> = statement
                .query_row(params![key, change.0.as_slice()], |r| r.get(0))
                .optional()?;
            out.push(seq.map(|seq| to_u64(document, seq)).transpose()?);
        }
        Ok(out)
    }

    /// The kind and head sequence number of a stored document, without loading it.
    pub fn head(&mut self, document: DocumentId) -> Result<Option<(DocKind, u64)>, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT kind, head_seq FROM documents WHERE id = ?1",
                [document.as_bytes().as_slice()],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
            )
            .optional()?;
        let Some((kind, head_seq)) = row else {
            return Ok(None);
        };
        Ok(Some((
            to_kind(document, kind)?,
            to_u64(document, head_seq)?,
        )))
    }

    /// Runs a commit-log query whose parameters are `?1` document, `?2` since, `?3` limit and
    /// optionally `?4` author, and whose columns are `seq, change_id[, author, bytes]`. Stops
    /// before the byte budget is exceeded (the first row always fits).
    fn read_commits(
        &mut self,
        document: DocumentId,
        sql: &str,
        since_seq: u64,
        limit: usize,
        author: Option<ReplicaId>,
        max_bytes: usize,
    ) -> Result<Vec<LoggedCommit>, StoreError> {
        let mut statement = self.conn.prepare_cached(sql)?;
        let full = statement.column_count() >= 4;
        let key = document.as_bytes().as_slice();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut rows = match author {
            Some(author) => statement.query(params![
                key,
                to_i64(since_seq),
                limit,
                author.as_bytes().as_slice()
            ])?,
            None => statement.query(params![key, to_i64(since_seq), limit])?,
        };
        let mut out = Vec::new();
        let mut bytes_read = 0usize;
        while let Some(row) = rows.next()? {
            let seq = to_u64(document, row.get(0)?)?;
            let id: Vec<u8> = row.get(1)?;
            let (author, bytes) = if full {
                let author: Vec<u8> = row.get(2)?;
                let author: [u8; 16] =
                    author
                        .as_slice()
                        .try_into()
                        .map_err(|_| StoreError::Corrupt {
                            document: document.to_string(),
                            detail: format!("author of {} bytes", author.len()),
                        })?;
                (
                    ReplicaId::from_bytes(author),
                    row.get::<_, Option<Vec<u8>>>(3)?,
                )
            } else {
                (ReplicaId::from_bytes([0; 16]), None)
            };
            let size = bytes.as_ref().map_or(0, Vec::len);
            if !out.is_empty() && bytes_read.saturating_add(size) > max_bytes {
                break;
            }
            bytes_read = bytes_read.saturating_add(size);
            out.push(LoggedCommit {
                seq,
                change: change_id(document, &id)?,
                author,
                bytes,
            });
        }
        Ok(out)
    }
}

fn write_create(
    conn: &Connection,
    document: DocumentId,
    kind: DocKind,
) -> Result<bool, StoreError> {
    let inserted = conn
        .prepare_cached("INSERT OR IGNORE INTO documents (id, kind) VALUES (?1, ?2)")?
        .execute(params![
            document.as_bytes().as_slice(),
            i64::from(kind.code())
        ])?;
    Ok(inserted == 1)
}

/// The body of [`Store::commit`], inside the caller's transaction or savepoint.
fn write_commit(
    conn: &Connection,
    document: DocumentId,
    head_seq: u64,
    commits: &[NewCommit],
    snapshot: Option<&[u8]>,
) -> Result<(), StoreError> {
    let key = document.as_bytes().as_slice();
    let found: Option<i64> = conn
        .prepare_cached("SELECT head_seq FROM documents WHERE id = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?;
    let Some(found) = found else {
        return Err(StoreError::Corrupt {
            document: document.to_string(),
            detail: "committing to a document that is not stored".into(),
        });
    };
    let found = to_u64(document, found)?;
    if found != head_seq {
        return Err(StoreError::HeadMismatch {
            document,
            expected: head_seq,
            found,
        });
    }
    // The log has no gaps: a load would refuse it as corrupt, so refuse the write instead.
    for (expected, commit) in (head_seq.saturating_add(1)..).zip(commits) {
        if commit.seq != expected {
            return Err(StoreError::OutOfOrder {
                document,
                expected,
                got: commit.seq,
            });
        }
    }
    let last = commits.last().map_or(head_seq, |c| c.seq);
    {
        let mut insert = conn.prepare_cached(
            "INSERT INTO commits (document, seq, change_id, author, bytes) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for commit in commits {
            insert.execute(params![
                key,
                to_i64(commit.seq),
                commit.change.0.as_slice(),
                commit.author.as_bytes().as_slice(),
                commit.bytes
            ])?;
        }
    }
    conn.prepare_cached("UPDATE documents SET head_seq = ?2 WHERE id = ?1")?
        .execute(params![key, to_i64(last)])?;
    if let Some(snapshot) = snapshot {
        // Only the commits after the previous snapshot still have bytes: the ones before it
        // were cleared when it was stored, so the log is not walked from its start each time.
        let previous: i64 = conn
            .prepare_cached("SELECT seq FROM snapshots WHERE document = ?1")?
            .query_row([key], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        conn.prepare_cached(
            "INSERT INTO snapshots (document, seq, bytes) VALUES (?1, ?2, ?3) \
             ON CONFLICT (document) DO UPDATE SET seq = excluded.seq, bytes = excluded.bytes",
        )?
        .execute(params![key, to_i64(last), snapshot])?;
        conn.prepare_cached(
            "UPDATE commits SET bytes = NULL WHERE document = ?1 AND seq > ?2 AND seq <= ?3",
        )?
        .execute(params![key, previous, to_i64(last)])?;
    }
    Ok(())
}

fn load_in(conn: &Connection, document: DocumentId) -> Result<Option<StoredDocument>, StoreError> {
    let key = document.as_bytes().as_slice();
    let row = conn
        .prepare_cached("SELECT kind, head_seq FROM documents WHERE id = ?1")?
        .query_row([key], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
        .optional()?;
    let Some((kind, head_seq)) = row else {
        return Ok(None);
    };
    let stored = conn
        .prepare_cached("SELECT seq, bytes FROM snapshots WHERE document = ?1")?
        .query_row([key], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
        })
        .optional()?;
    let (snapshot_seq, snapshot) = match stored {
        Some((seq, bytes)) => (to_u64(document, seq)?, Some(bytes)),
        None => (0, None),
    };
    let kind = to_kind(document, kind)?;
    let head_seq = to_u64(document, head_seq)?;
    let mut changes = Vec::new();
    let mut statement = conn.prepare_cached(
        "SELECT seq, bytes FROM commits WHERE document = ?1 AND seq > ?2 ORDER BY seq",
    )?;
    let mut rows = statement.query(params![key, to_i64(snapshot_seq)])?;
    let mut expected = snapshot_seq + 1;
    while let Some(row) = rows.next()? {
        let seq = to_u64(document, row.get(0)?)?;
        let bytes: Option<Vec<u8>> = row.get(1)?;
        let bytes = bytes.ok_or_else(|| StoreError::Corrupt {
            document: document.to_string(),
            detail: format!("commit {seq} after the snapshot has no bytes"),
        })?;
        if seq != expected {
            return Err(StoreError::Corrupt {
                document: document.to_string(),
                detail: format!("commit log has a gap: {seq} where {expected} was due"),
            });
        }
        expected += 1;
        changes.push(bytes);
    }
    drop(rows);
    drop(statement);
    if expected - 1 != head_seq {
        return Err(StoreError::Corrupt {
            document: document.to_string(),
            detail: format!("head is {head_seq} but the log ends at {}", expected - 1),
        });
    }
    let head_change = conn
        .query_row(
            "SELECT change_id FROM commits WHERE document = ?1 AND seq = ?2",
            params![key, to_i64(head_seq)],
            |r| r.get::<_, Vec<u8>>(0),
        )
        .optional()?
        .map(|bytes| change_id(document, &bytes))
        .transpose()?;
    Ok(Some(StoredDocument {
        kind,
        snapshot,
        snapshot_seq,
        head_seq,
        head_change,
        changes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_cache_is_capped_in_kib() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        let cache = |store: &Store| -> i64 {
            store
                .conn
                .pragma_query_value(None, "cache_size", |row| row.get(0))
                .unwrap()
        };
        assert_eq!(cache(&store), -2_000, "SQLite's default");
        store.limit_page_cache(256).unwrap();
        assert_eq!(cache(&store), -256);
    }

    #[test]
    fn a_schema_1_database_is_migrated_with_its_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let (compacted, fresh) = (
            DocumentId::from_bytes([1; 16]),
            DocumentId::from_bytes([2; 16]),
        );
        {
            let old = Connection::open(&path).unwrap();
            old.execute_batch(SCHEMA_1).unwrap();
            old.execute(
                "INSERT INTO documents VALUES (?1, 1, x'5e', 2, 3), (?2, 2, NULL, 0, 1)",
                params![compacted.as_bytes().as_slice(), fresh.as_bytes().as_slice()],
            )
            .unwrap();
            for (doc, seq, bytes) in [
                (compacted, 1, None),
                (compacted, 2, None),
                (compacted, 3, Some(vec![3u8])),
                (fresh, 1, Some(vec![1u8])),
            ] {
                old.execute(
                    "INSERT INTO commits VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        doc.as_bytes().as_slice(),
                        seq,
                        [seq as u8; 32].as_slice(),
                        [7u8; 16].as_slice(),
                        bytes
                    ],
                )
                .unwrap();
            }
        }
        let mut store = Store::open(&path).unwrap();
        let version: i64 = store
            .connection()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let loaded = store.load(compacted).unwrap().unwrap();
        assert_eq!(loaded.kind, DocKind::Automerge, "kind 1");
        assert_eq!(loaded.snapshot.as_deref(), Some(&[0x5e][..]));
        assert_eq!((loaded.snapshot_seq, loaded.head_seq), (2, 3));
        assert_eq!(loaded.changes, vec![vec![3u8]]);
        assert_eq!(loaded.head_change, Some(ChangeId([3; 32])));
        let loaded = store.load(fresh).unwrap().unwrap();
        assert_eq!(loaded.kind, DocKind::Yrs, "kind 2");
        assert_eq!(
            (loaded.snapshot, loaded.snapshot_seq, loaded.head_seq),
            (None, 0, 1)
        );
        // It is written in the new schema from here on, and opens again as it is.
        let next = NewCommit {
            seq: 4,
            change: ChangeId([4; 32]),
            author: ReplicaId::from_bytes([7; 16]),
            bytes: vec![4],
        };
        store.commit(compacted, 3, &[next], Some(b"s4")).unwrap();
        drop(store);
        let mut store = Store::open(&path).unwrap();
        let loaded = store.load(compacted).unwrap().unwrap();
        assert_eq!(loaded.snapshot.as_deref(), Some(&b"s4"[..]));
        assert_eq!((loaded.snapshot_seq, loaded.head_seq), (4, 4));
        assert!(loaded.changes.is_empty());
        let feed = store.feed(compacted, 0, 10, usize::MAX).unwrap();
        assert!(feed.iter().all(|c| c.bytes.is_none()), "all compacted");
        assert_eq!(feed.len(), 4);
    }

    #[test]
    fn a_database_from_a_newer_server_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        // A newer server's file, in a rollback journal (a format this one does not know could
        // be anything): refused before its journal mode, too, is changed.
        let newer = Connection::open(&path).unwrap();
        newer
            .execute_batch("CREATE TABLE future (x); PRAGMA journal_mode = DELETE;")
            .unwrap();
        newer
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(newer);
        let refused = |opened: Result<Store, StoreError>| match opened {
            Err(StoreError::NewerSchema { found, supported }) => {
                assert_eq!((found, supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
            }
            other => panic!("expected NewerSchema, got {:?}", other.map(drop)),
        };
        refused(Store::open(&path));
        refused(Store::open_reader(&path));
        refused(Store::open_checkpointer(&path, Duration::from_secs(1)));
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        let journal: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!((version, journal.as_str()), (SCHEMA_VERSION + 1, "delete"));
    }

    #[test]
    fn a_reader_refuses_a_database_its_writer_has_not_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch(SCHEMA_1)
            .unwrap();
        match Store::open_reader(&path) {
            Err(StoreError::NotMigrated { found, expected }) => {
                assert_eq!((found, expected), (0, SCHEMA_VERSION));
            }
            other => panic!("expected NotMigrated, got {:?}", other.map(drop)),
        }
        // Once the writer has opened it, readers and the checkpointer open it too.
        drop(Store::open(&path).unwrap());
        Store::open_reader(&path).unwrap();
        Store::open_checkpointer(&path, Duration::from_secs(1)).unwrap();
    }

    #[test]
    fn commits_compaction_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let doc = DocumentId::from_bytes([1; 16]);
        let author = ReplicaId::from_bytes([2; 16]);
        let mut store = Store::open(&path).unwrap();
        assert!(store.load(doc).unwrap().is_none());
        store.create(doc, DocKind::Yrs).unwrap();
        let commit = |seq: u64| NewCommit {
            seq,
            change: ChangeId([seq as u8; 32]),
            author,
            bytes: vec![seq as u8],
        };
        store.commit(doc, 0, &[commit(1), commit(2)], None).unwrap();
        assert!(matches!(
            store.commit(doc, 1, &[commit(2)], None),
            Err(StoreError::HeadMismatch { .. })
        ));
        // A gap (or a repeat) in the seqs is refused, and nothing of it is written.
        for wrong in [
            vec![commit(4)],
            vec![commit(3), commit(3)],
            vec![commit(3), commit(5)],
        ] {
            assert!(matches!(
                store.commit(doc, 2, &wrong, Some(b"never")),
                Err(StoreError::OutOfOrder {
                    expected: 3 | 4,
                    ..
                })
            ));
            let loaded = store.load(doc).unwrap().unwrap();
            assert_eq!((loaded.head_seq, loaded.snapshot), (2, None));
        }
        store.commit(doc, 2, &[commit(3)], Some(b"snap")).unwrap();
        store.commit(doc, 3, &[commit(4)], None).unwrap();
        let loaded = store.load(doc).unwrap().unwrap();
        assert_eq!(loaded.snapshot.as_deref(), Some(&b"snap"[..]));
        assert_eq!((loaded.snapshot_seq, loaded.head_seq), (3, 4));
        assert_eq!(loaded.changes, vec![vec![4u8]]);
        assert_eq!(loaded.head_change, Some(ChangeId([4; 32])));
        assert_eq!(store.commits_by(doc, 1, author, 10).unwrap().len(), 3);
        assert_eq!(
            store
                .commits_by(doc, 0, ReplicaId::from_bytes([9; 16]), 10)
                .unwrap()
                .len(),
            0
        );
        assert_eq!(store.head(doc).unwrap(), Some((DocKind::Yrs, 4)));
        assert_eq!(store.head(DocumentId::from_bytes([5; 16])).unwrap(), None);
        assert!(!store.create_new(doc, DocKind::Automerge).unwrap());
        let feed = store.feed(doc, 1, 10, usize::MAX).unwrap();
        assert_eq!(
            feed.iter().map(|c| c.seq).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        assert_eq!(feed[0].author, author);
        assert_eq!(feed[0].bytes, None, "compacted");
        assert_eq!(feed[2].bytes, Some(vec![4u8]));
        assert_eq!(store.feed(doc, 0, 2, usize::MAX).unwrap().len(), 2);
        // The byte budget stops after the first row that does not fit (the first always does).
        assert_eq!(store.feed(doc, 3, 10, 0).unwrap().len(), 1);
        assert_eq!(store.commits_after(doc, 2, 10).unwrap().len(), 2);
        assert_eq!(
            store
                .seqs_of(doc, &[ChangeId([3; 32]), ChangeId([7; 32])])
                .unwrap(),
            vec![Some(3), None]
        );
        store
            .connection()
            .execute("UPDATE documents SET kind = 77", [])
            .unwrap();
        assert!(matches!(store.load(doc), Err(StoreError::Corrupt { .. })));
    }
}
