//! The server's durable store: SQLite in WAL mode with `synchronous=FULL`.
//!
//! - `documents`: one row per document: id, kind, the last compacted snapshot, the sequence
//!   number it covers, and the head sequence number.
//! - `commits`: the commit log, `PRIMARY KEY(document, seq)`: each committed change's id, the
//!   replica whose connection sent it, and its bytes until a snapshot covers it (compaction keeps
//!   the `(seq, change_id)` index and drops the bytes).
//!
//! Each document actor opens its own connection; a commit is one `BEGIN IMMEDIATE` transaction.
//! Bytes that do not read back are [`StoreError::Corrupt`], never a panic.

use std::path::Path;
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

/// A connection to the server database.
pub struct Store {
    conn: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS documents (
    id BLOB PRIMARY KEY,
    kind INTEGER NOT NULL,
    snapshot BLOB,
    snapshot_seq INTEGER NOT NULL DEFAULT 0,
    head_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS commits (
    document BLOB NOT NULL,
    seq INTEGER NOT NULL,
    change_id BLOB NOT NULL,
    author BLOB NOT NULL,
    bytes BLOB,
    PRIMARY KEY (document, seq)
) WITHOUT ROWID;
";

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_u64(document: DocumentId, value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt {
        document: document.to_string(),
        detail: format!("negative number {value}"),
    })
}

fn change_id(document: DocumentId, bytes: &[u8]) -> Result<ChangeId, StoreError> {
    let array: [u8; 32] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        document: document.to_string(),
        detail: format!("change id of {} bytes", bytes.len()),
    })?;
    Ok(ChangeId(array))
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self { conn })
    }

    /// The raw connection (for tests and tools).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Loads a document, if stored.
    pub fn load(&mut self, document: DocumentId) -> Result<Option<StoredDocument>, StoreError> {
        let key = document.as_bytes().as_slice();
        let row = self
            .conn
            .query_row(
                "SELECT kind, snapshot, snapshot_seq, head_seq FROM documents WHERE id = ?1",
                [key],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, Option<Vec<u8>>>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                },
            )
            .optional()?;
        let Some((kind, snapshot, snapshot_seq, head_seq)) = row else {
            return Ok(None);
        };
        let kind = u8::try_from(kind)
            .ok()
            .and_then(DocKind::from_code)
            .ok_or_else(|| StoreError::Corrupt {
                document: document.to_string(),
                detail: format!("unknown kind {kind}"),
            })?;
        let snapshot_seq = to_u64(document, snapshot_seq)?;
        let head_seq = to_u64(document, head_seq)?;
        let mut changes = Vec::new();
        let mut statement = self.conn.prepare_cached(
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
        let head_change = self
            .conn
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

    /// Creates an empty document.
    pub fn create(&mut self, document: DocumentId, kind: DocKind) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR IGNORE INTO documents (id, kind) VALUES (?1, ?2)",
            params![document.as_bytes().as_slice(), i64::from(kind.code())],
        )?;
        Ok(())
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
        let key = document.as_bytes().as_slice();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let found: i64 =
            tx.query_row("SELECT head_seq FROM documents WHERE id = ?1", [key], |r| {
                r.get(0)
            })?;
        let found = to_u64(document, found)?;
        if found != head_seq {
            return Err(StoreError::HeadMismatch {
                document,
                expected: head_seq,
                found,
            });
        }
        let mut last = head_seq;
        {
            let mut insert = tx.prepare_cached(
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
                last = commit.seq;
            }
        }
        tx.execute(
            "UPDATE documents SET head_seq = ?2 WHERE id = ?1",
            params![key, to_i64(last)],
        )?;
        if let Some(snapshot) = snapshot {
            tx.execute(
                "UPDATE documents SET snapshot = ?2, snapshot_seq = ?3 WHERE id = ?1",
                params![key, snapshot, to_i64(last)],
            )?;
            tx.execute(
                "UPDATE commits SET bytes = NULL WHERE document = ?1 AND seq <= ?2 AND bytes IS NOT NULL",
                params![key, to_i64(last)],
            )?;
        }
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
        let mut statement = self.conn.prepare_cached(
            "SELECT seq, change_id FROM commits WHERE document = ?1 AND seq > ?2 AND author = ?3 ORDER BY seq LIMIT ?4",
        )?;
        let mut rows = statement.query(params![
            document.as_bytes().as_slice(),
            to_i64(since_seq),
            author.as_bytes().as_slice(),
            i64::try_from(limit).unwrap_or(i64::MAX)
        ])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let seq = to_u64(document, row.get(0)?)?;
            let id: Vec<u8> = row.get(1)?;
            out.push((seq, change_id(document, &id)?));
        }
        Ok(out)
    }

    /// Every commit after `since_seq`, at most `limit`, ascending (for tools and tests).
    pub fn commits_after(
        &mut self,
        document: DocumentId,
        since_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, ChangeId)>, StoreError> {
        let mut statement = self.conn.prepare_cached(
            "SELECT seq, change_id FROM commits WHERE document = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let mut rows = statement.query(params![
            document.as_bytes().as_slice(),
            to_i64(since_seq),
            i64::try_from(limit).unwrap_or(i64::MAX)
        ])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let seq = to_u64(document, row.get(0)?)?;
            let id: Vec<u8> = row.get(1)?;
            out.push((seq, change_id(document, &id)?));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        store
            .connection()
            .execute("UPDATE documents SET kind = 77", [])
            .unwrap();
        assert!(matches!(store.load(doc), Err(StoreError::Corrupt { .. })));
    }
}
