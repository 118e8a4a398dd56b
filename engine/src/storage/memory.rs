//! An in-memory [`Storage`]: for tests, and for replicas that keep nothing.

use std::collections::BTreeMap;

use super::{Batch, OutboxEntry, SettledEntry, Storage, StorageError, StoredDocument, Write};
use crate::doc::DocKind;
use crate::ids::{DocumentId, ReplicaId};

/// Keeps everything in memory; clones share nothing.
#[derive(Clone, Debug, Default)]
pub struct MemoryStorage {
    replica: Option<ReplicaId>,
    documents: BTreeMap<DocumentId, StoredDocument>,
    outbox: Vec<OutboxEntry>,
    settled: Vec<SettledEntry>,
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Storage for MemoryStorage {
    fn replica_id(&mut self) -> Result<Option<ReplicaId>, StorageError> {
        Ok(self.replica)
    }

    fn documents(&mut self) -> Result<Vec<(DocumentId, DocKind)>, StorageError> {
        Ok(self.documents.iter().map(|(id, d)| (*id, d.kind)).collect())
    }

    fn load_document(
        &mut self,
        document: DocumentId,
    ) -> Result<Option<StoredDocument>, StorageError> {
        Ok(self.documents.get(&document).cloned())
    }

    fn outbox(&mut self) -> Result<Vec<OutboxEntry>, StorageError> {
        Ok(self.outbox.clone())
    }

    fn settled(&mut self) -> Result<Vec<SettledEntry>, StorageError> {
        Ok(self.settled.clone())
    }

    fn write(&mut self, batch: &Batch) -> Result<(), StorageError> {
        // Validate first so a failing batch changes nothing.
        batch.check_documents(|document| Ok(self.documents.contains_key(document)))?;
        for write in &batch.writes {
            match write {
                Write::SetReplicaId(id) => self.replica = Some(*id),
                Write::CreateDocument { document, kind } => {
                    self.documents.entry(*document).or_insert(StoredDocument {
                        kind: *kind,
                        snapshot: None,
                        changes: Vec::new(),
                        last_seq: 0,
                    });
                }
                Write::AppendChange { document, bytes } => {
                    if let Some(d) = self.documents.get_mut(document) {
                        d.changes.push(bytes.clone());
                    }
                }
                Write::Snapshot { document, bytes } => {
                    if let Some(d) = self.documents.get_mut(document) {
                        d.snapshot = Some(bytes.clone());
                        d.changes.clear();
                    }
                }
                Write::SetLastSeq { document, seq } => {
                    if let Some(d) = self.documents.get_mut(document) {
                        d.last_seq = d.last_seq.max(*seq);
                    }
                }
                Write::PushOutbox(entry) => self.outbox.push(entry.clone()),
                Write::RemoveOutbox { document, change } => self
                    .outbox
                    .retain(|e| !(e.document == *document && e.change == *change)),
                Write::Settle(entry) => {
                    self.settled
                        .retain(|e| !(e.document == entry.document && e.change == entry.change));
                    self.settled.push(entry.clone());
                }
                Write::ForgetSettled { document, change } => self
                    .settled
                    .retain(|e| !(e.document == *document && e.change == *change)),
            }
        }
        Ok(())
    }
}
