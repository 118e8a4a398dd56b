//! SQLite storage (rusqlite, bundled): WAL, one transaction per batch, full fsync.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use super::{
    Batch, OutboxEntry, SettledEntry, Settlement, Storage, StorageError, StoredDocument, Write,
};
use crate::doc::{ChangeId, DocKind};
use crate::ids::{DocumentId, ReplicaId};
use crate::protocol::ErrorCode;

/// 2: the `settled` table (statuses of settled local changes). 3: snapshots in a table of
/// their own, out of the `documents` rows (see [`MIGRATE_TO_3`]).
const SCHEMA_VERSION: i64 = 3;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id BLOB PRIMARY KEY,
    kind INTEGER NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS snapshots (
    document BLOB PRIMARY KEY,
    bytes BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    document BLOB NOT NULL,
    bytes BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_by_document ON changes (document, n);
CREATE TABLE IF NOT EXISTS outbox (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    document BLOB NOT NULL,
    change BLOB NOT NULL,
    bytes BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS settled (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    document BLOB NOT NULL,
    change BLOB NOT NULL,
    seq INTEGER,
    code INTEGER,
    reason TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS settled_by_change ON settled (document, change);
";

/// Schemas 1 and 2 to 3: the snapshot moves out of the `documents` row, which every
/// acknowledgement updates (`last_seq`): SQLite rewrites a whole row to change one column, so
/// each of them read a large document's snapshot back and compared it page by page.
const MIGRATE_TO_3: &str = "
CREATE TABLE snapshots (
    document BLOB PRIMARY KEY,
    bytes BLOB NOT NULL
);
INSERT INTO snapshots (document, bytes) SELECT id, snapshot FROM documents WHERE snapshot IS NOT NULL;
CREATE TABLE documents_v3 (
    id BLOB PRIMARY KEY,
    kind INTEGER NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0
);
INSERT INTO documents_v3 (id, kind, last_seq) SELECT id, kind, last_seq FROM documents;
DROP TABLE documents;
ALTER TABLE documents_v3 RENAME TO documents;
";

/// A replica's store in one SQLite file.
pub struct SqliteStorage {
    connection: Connection,
}

impl SqliteStorage {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StorageError> {
        Self::setup(Connection::open(path)?)
    }

    /// An in-memory database (for tests).
    pub fn open_in_memory() -> Result<Self, StorageError> {
        Self::setup(Connection::open_in_memory()?)
    }

    fn setup(connection: Connection) -> Result<Self, StorageError> {
        // A newer build's file is refused before anything in it changes, its journal mode
        // included; the transaction below checks again.
        refuse_newer(&connection)?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "FULL")?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        // One transaction: a migration that fails leaves the file as it was, and no other
        // process changes the schema between the check and the migration.
        let txn = rusqlite::Transaction::new_unchecked(
            &connection,
            rusqlite::TransactionBehavior::Immediate,
        )?;
        refuse_newer(&txn)?;
        let snapshots_in_rows: bool = txn.query_row(
            "SELECT count(*) FROM pragma_table_info('documents') WHERE name = 'snapshot'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if snapshots_in_rows {
            txn.execute_batch(MIGRATE_TO_3)?;
        }
        txn.execute_batch(SCHEMA)?;
        txn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        txn.commit()?;
        Ok(Self { connection })
    }

    /// The underlying connection, for tests that need to reach past the API (e.g. to corrupt
    /// a row on purpose).
    pub fn connection(&self) -> &Connection {
        &self.connection
    }
}

/// [`StorageError::NewerSchema`] for a database a newer build wrote.
fn refuse_newer(connection: &Connection) -> Result<(), StorageError> {
    let version: i64 = connection.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StorageError::NewerSchema {
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(())
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(format!("{what}: {e}"))
}

fn document_id(bytes: Vec<u8>) -> Result<DocumentId, StorageError> {
    let array: [u8; 16] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| corrupt("document id", format!("{} bytes", b.len())))?;
    Ok(DocumentId::from_bytes(array))
}

fn kind(code: i64) -> Result<DocKind, StorageError> {
    u8::try_from(code)
        .ok()
        .and_then(DocKind::from_code)
        .ok_or_else(|| corrupt("document kind", code))
}

/// Reads a column, turning a type mismatch (a corrupt row) into [`StorageError::Corrupt`].
fn column<T: rusqlite::types::FromSql>(
    row: &rusqlite::Row<'_>,
    index: usize,
    what: &str,
) -> Result<T, StorageError> {
    row.get(index).map_err(|e| corrupt(what, e))
}

impl Storage for SqliteStorage {
    fn replica_id(&mut self) -> Result<Option<ReplicaId>, StorageError> {
        let value: Option<Vec<u8>> = self
            .connection
            .query_row("SELECT value FROM meta WHERE key = 'replica_id'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| corrupt("replica id", e))?;
        value
            .map(|v| {
                let array: [u8; 16] = v
                    .try_into()
                    .map_err(|_| corrupt("replica id", "wrong length"))?;
                Ok(ReplicaId::from_bytes(array))
            })
            .transpose()
    }

    fn documents(&mut self) -> Result<Vec<(DocumentId, DocKind)>, StorageError> {
        let mut statement = self
            .connection
            .prepare_cached("SELECT id, kind FROM documents")?;
        let mut rows = statement.query([])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push((
                document_id(column(row, 0, "document id")?)?,
                kind(column(row, 1, "kind")?)?,
            ));
        }
        Ok(out)
    }

    fn load_document(
        &mut self,
        document: DocumentId,
    ) -> Result<Option<StoredDocument>, StorageError> {
        let id = document.as_bytes().as_slice();
        let head = {
            let mut statement = self.connection.prepare_cached(
                "SELECT kind, last_seq, (SELECT bytes FROM snapshots WHERE document = documents.id) \
                 FROM documents WHERE id = ?1",
            )?;
            let mut rows = statement.query(params![id])?;
            match rows.next()? {
                None => None,
                Some(row) => Some((
                    kind(column(row, 0, "kind")?)?,
                    column::<i64>(row, 1, "last seq")?,
                    column::<Option<Vec<u8>>>(row, 2, "snapshot")?,
                )),
            }
        };
        let Some((kind, last_seq, snapshot)) = head else {
            return Ok(None);
        };
        let mut statement = self
            .connection
            .prepare_cached("SELECT bytes FROM changes WHERE document = ?1 ORDER BY n")?;
        let mut rows = statement.query(params![id])?;
        let mut changes = Vec::new();
        while let Some(row) = rows.next()? {
            changes.push(column::<Vec<u8>>(row, 0, "change")?);
        }
        Ok(Some(StoredDocument {
            kind,
            snapshot,
            changes,
            last_seq: u64::try_from(last_seq).map_err(|e| corrupt("last seq", e))?,
        }))
    }

    fn outbox(&mut self) -> Result<Vec<OutboxEntry>, StorageError> {
        let mut statement = self
            .connection
            .prepare_cached("SELECT document, change, bytes FROM outbox ORDER BY n")?;
        let mut rows = statement.query([])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let change: Vec<u8> = column(row, 1, "outbox change id")?;
            let change: [u8; 32] = change
                .try_into()
                .map_err(|_| corrupt("outbox change id", "wrong length"))?;
            out.push(OutboxEntry {
                document: document_id(column(row, 0, "outbox document")?)?,
                change: ChangeId(change),
                bytes: column(row, 2, "outbox bytes")?,
            });
        }
        Ok(out)
    }

    fn settled(&mut self) -> Result<Vec<SettledEntry>, StorageError> {
        let mut statement = self
            .connection
            .prepare_cached("SELECT document, change, seq, code, reason FROM settled ORDER BY n")?;
        let mut rows = statement.query([])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let change: Vec<u8> = column(row, 1, "settled change id")?;
            let change: [u8; 32] = change
                .try_into()
                .map_err(|_| corrupt("settled change id", "wrong length"))?;
            let seq: Option<i64> = column(row, 2, "settled seq")?;
            let code: Option<i64> = column(row, 3, "settled code")?;
            let settlement = match (seq, code) {
                (Some(seq), None) => Settlement::Confirmed {
                    seq: u64::try_from(seq).map_err(|e| corrupt("settled seq", e))?,
                },
                (None, Some(code)) => Settlement::Rejected {
                    code: ErrorCode::from_code(
                        u16::try_from(code).map_err(|e| corrupt("settled code", e))?,
                    ),
                    reason: column::<Option<String>>(row, 4, "settled reason")?.unwrap_or_default(),
                },
                _ => return Err(corrupt("settled change", "neither confirmed nor rejected")),
            };
            out.push(SettledEntry {
                document: document_id(column(row, 0, "settled document")?)?,
                change: ChangeId(change),
                settlement,
            });
        }
        Ok(out)
    }

    fn write(&mut self, batch: &Batch) -> Result<(), StorageError> {
        if batch.is_empty() {
            return Ok(());
        }
        let txn = self.connection.transaction()?;
        batch.check_documents(|document| {
            Ok(txn
                .prepare_cached("SELECT 1 FROM documents WHERE id = ?1")?
                .exists(params![document.as_bytes().as_slice()])?)
        })?;
        for write in &batch.writes {
            match write {
                Write::SetReplicaId(id) => {
                    txn.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES ('replica_id', ?1)",
                        params![id.as_bytes().as_slice()],
                    )?;
                }
                Write::CreateDocument { document, kind } => {
                    txn.execute(
                        "INSERT OR IGNORE INTO documents (id, kind) VALUES (?1, ?2)",
                        params![document.as_bytes().as_slice(), kind.code()],
                    )?;
                }
                Write::AppendChange { document, bytes } => {
                    txn.prepare_cached("INSERT INTO changes (document, bytes) VALUES (?1, ?2)")?
                        .execute(params![document.as_bytes().as_slice(), bytes])?;
                }
                Write::Snapshot { document, bytes } => {
                    let id = document.as_bytes().as_slice();
                    txn.execute(
                        "INSERT INTO snapshots (document, bytes) VALUES (?1, ?2) \
                         ON CONFLICT (document) DO UPDATE SET bytes = excluded.bytes",
                        params![id, bytes],
                    )?;
                    txn.execute("DELETE FROM changes WHERE document = ?1", params![id])?;
                }
                Write::SetLastSeq { document, seq } => {
                    let seq =
                        i64::try_from(*seq).map_err(|e| StorageError::Backend(e.to_string()))?;
                    txn.prepare_cached(
                        "UPDATE documents SET last_seq = MAX(last_seq, ?2) WHERE id = ?1",
                    )?
                    .execute(params![document.as_bytes().as_slice(), seq])?;
                }
                Write::PushOutbox(entry) => {
                    txn.prepare_cached(
                        "INSERT INTO outbox (document, change, bytes) VALUES (?1, ?2, ?3)",
                    )?
                    .execute(params![
                        entry.document.as_bytes().as_slice(),
                        entry.change.0.as_slice(),
                        entry.bytes
                    ])?;
                }
                Write::RemoveOutbox { document, change } => {
                    txn.prepare_cached("DELETE FROM outbox WHERE document = ?1 AND change = ?2")?
                        .execute(params![document.as_bytes().as_slice(), change.0.as_slice()])?;
                }
                Write::Settle(entry) => {
                    let (seq, code, reason) = match &entry.settlement {
                        Settlement::Confirmed { seq } => (
                            Some(
                                i64::try_from(*seq)
                                    .map_err(|e| StorageError::Backend(e.to_string()))?,
                            ),
                            None,
                            None,
                        ),
                        Settlement::Rejected { code, reason } => {
                            (None, Some(i64::from(code.code())), Some(reason.as_str()))
                        }
                    };
                    let document = entry.document.as_bytes().as_slice();
                    let change = entry.change.0.as_slice();
                    txn.prepare_cached("DELETE FROM settled WHERE document = ?1 AND change = ?2")?
                        .execute(params![document, change])?;
                    txn.prepare_cached(
                        "INSERT INTO settled (document, change, seq, code, reason) \
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                    )?
                    .execute(params![document, change, seq, code, reason])?;
                }
                Write::ForgetSettled { document, change } => {
                    txn.prepare_cached("DELETE FROM settled WHERE document = ?1 AND change = ?2")?
                        .execute(params![document.as_bytes().as_slice(), change.0.as_slice()])?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }
}
