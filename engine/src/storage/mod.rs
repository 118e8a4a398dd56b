//! Where a replica keeps its documents and its outbox.
//!
//! [`Storage`] is a trait so every replica picks its own: [`MemoryStorage`] for tests and
//! ephemeral replicas, [`SqliteStorage`] (not on wasm32) for native replicas and the server.
//! A [`Batch`] of writes is applied atomically: after a crash either all of it is there or none.
//! A document is stored as an optional compacted snapshot plus the changes appended since;
//! [`Write::Snapshot`] replaces both with one snapshot (compaction).

mod memory;
#[cfg(all(feature = "sqlite", not(target_arch = "wasm32")))]
mod sqlite;

pub use memory::MemoryStorage;
#[cfg(all(feature = "sqlite", not(target_arch = "wasm32")))]
pub use sqlite::SqliteStorage;

use crate::doc::{ChangeId, DocKind};
use crate::ids::{DocumentId, ReplicaId};
use crate::protocol::ErrorCode;

/// What can go wrong in storage.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Stored data that does not read back (a corrupt or truncated row).
    #[error("corrupt storage: {0}")]
    Corrupt(String),
    /// The backend failed.
    #[error("storage backend: {0}")]
    Backend(String),
    /// The database was written by a newer build, in a schema this one does not know; it is
    /// left as it was.
    #[error("the database has schema version {found}; this build knows up to {supported}")]
    NewerSchema {
        /// The database's schema version.
        found: i64,
        /// The newest this build writes.
        supported: i64,
    },
}

#[cfg(all(feature = "sqlite", not(target_arch = "wasm32")))]
impl From<rusqlite::Error> for StorageError {
    fn from(e: rusqlite::Error) -> Self {
        StorageError::Backend(e.to_string())
    }
}

/// A document as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredDocument {
    /// Its kind.
    pub kind: DocKind,
    /// The last compaction, if any.
    pub snapshot: Option<Vec<u8>>,
    /// The changes appended since, in order.
    pub changes: Vec<Vec<u8>>,
    /// The highest commit sequence number this replica has learned for it.
    pub last_seq: u64,
}

/// A local change not yet confirmed by the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEntry {
    /// The document.
    pub document: DocumentId,
    /// The change's id.
    pub change: ChangeId,
    /// The change's bytes, to resend.
    pub bytes: Vec<u8>,
}

/// One write of a [`Batch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Remember the replica's own id.
    SetReplicaId(ReplicaId),
    /// A new document.
    CreateDocument {
        /// Its id.
        document: DocumentId,
        /// Its kind.
        kind: DocKind,
    },
    /// Append a change to a document.
    AppendChange {
        /// The document.
        document: DocumentId,
        /// The change's bytes.
        bytes: Vec<u8>,
    },
    /// Replace a document's snapshot and appended changes with one snapshot.
    Snapshot {
        /// The document.
        document: DocumentId,
        /// Everything, compacted.
        bytes: Vec<u8>,
    },
    /// Record the highest commit sequence number learned for a document.
    SetLastSeq {
        /// The document.
        document: DocumentId,
        /// The number.
        seq: u64,
    },
    /// Add a change to the outbox.
    PushOutbox(OutboxEntry),
    /// Remove a confirmed (or rejected) change from the outbox.
    RemoveOutbox {
        /// The document.
        document: DocumentId,
        /// The change.
        change: ChangeId,
    },
    /// Remember how the server settled one of this replica's changes (replacing what was
    /// remembered for it), so its status survives a restart.
    Settle(SettledEntry),
    /// Forget a settled change's status (the replica keeps a bounded number).
    ForgetSettled {
        /// The document.
        document: DocumentId,
        /// The change.
        change: ChangeId,
    },
}

/// How the server settled one of this replica's changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Committed with this sequence number.
    Confirmed {
        /// The commit sequence number.
        seq: u64,
    },
    /// Refused.
    Rejected {
        /// Why, as a code.
        code: ErrorCode,
        /// Why, in words.
        reason: String,
    },
}

/// A settled change, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettledEntry {
    /// The document.
    pub document: DocumentId,
    /// The change.
    pub change: ChangeId,
    /// How it was settled.
    pub settlement: Settlement,
}

/// Writes applied together or not at all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// The writes, in order.
    pub writes: Vec<Write>,
}

impl Batch {
    /// Adds a write.
    pub fn push(&mut self, write: Write) {
        self.writes.push(write);
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Refuses a batch that writes to a document (a change, a snapshot, a last seq) which
    /// neither `exists` in the store nor is created in the batch, before anything is written:
    /// every backend applies a batch all or nothing, and a write kept for no document would
    /// come back if a document of that id were created later. `exists` is asked once per
    /// document.
    pub fn check_documents(
        &self,
        mut exists: impl FnMut(&DocumentId) -> Result<bool, StorageError>,
    ) -> Result<(), StorageError> {
        let mut known: std::collections::HashSet<DocumentId> = self
            .writes
            .iter()
            .filter_map(|w| match w {
                Write::CreateDocument { document, .. } => Some(*document),
                _ => None,
            })
            .collect();
        for write in &self.writes {
            let (Write::AppendChange { document, .. }
            | Write::Snapshot { document, .. }
            | Write::SetLastSeq { document, .. }) = write
            else {
                continue;
            };
            if known.contains(document) {
                continue;
            }
            if !exists(document)? {
                return Err(StorageError::Backend(format!("no document {document}")));
            }
            known.insert(*document);
        }
        Ok(())
    }
}

/// A replica's durable store.
pub trait Storage {
    /// The replica's id, if one was stored.
    fn replica_id(&mut self) -> Result<Option<ReplicaId>, StorageError>;
    /// Every stored document with its kind.
    fn documents(&mut self) -> Result<Vec<(DocumentId, DocKind)>, StorageError>;
    /// One document, if stored.
    fn load_document(
        &mut self,
        document: DocumentId,
    ) -> Result<Option<StoredDocument>, StorageError>;
    /// The outbox, oldest first.
    fn outbox(&mut self) -> Result<Vec<OutboxEntry>, StorageError>;
    /// The remembered settled changes, oldest settled first.
    fn settled(&mut self) -> Result<Vec<SettledEntry>, StorageError>;
    /// Applies `batch` atomically and durably.
    fn write(&mut self, batch: &Batch) -> Result<(), StorageError>;
}

#[cfg(test)]
mod tests;
