//! A [`Storage`] for the browser: state in memory, every committed [`Batch`] recorded as
//! key-value writes that the JavaScript side applies to IndexedDB in one transaction.
//!
//! The engine's `Storage` trait is synchronous and IndexedDB is not, so the write path is split:
//! [`KvStorage::write`] validates and applies a batch to memory and queues its key-value writes;
//! the driver takes them ([`KvStorage::take_writes`]), commits them in one IndexedDB transaction,
//! and only then sends the frames the same call queued. Nothing leaves the tab that is not durable
//! locally. At startup the driver reads every pair back and [`KvStorage::load`] rebuilds the state.
//!
//! Key layout (one object store, string keys, byte values; sorted order = load order):
//! - `r`: the replica id (16 bytes).
//! - `d/<doc>`: kind code (1 byte) + last commit sequence number (8 bytes, little endian).
//! - `s/<doc>`: the document's snapshot (last compaction).
//! - `c/<doc>/<n:016x>`: a change appended since the snapshot, in order.
//! - `o/<n:016x>`: an outbox entry: document (16) + change id (32) + change bytes.
//! - `t/<n:016x>`: a settled change's status: document (16) + change id (32) + `0` + commit
//!   sequence number (8, little endian), or `1` + error code (2, little endian) + reason (UTF-8).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use accord_engine::protocol::ErrorCode;
use accord_engine::storage::{
    Batch, OutboxEntry, SettledEntry, Settlement, Storage, StorageError, StoredDocument, Write,
};
use accord_engine::{ChangeId, DocKind, DocumentId, ReplicaId};

/// One key-value write for IndexedDB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvWrite {
    /// Put `value` at `key`.
    Put(String, Vec<u8>),
    /// Delete `key`.
    Delete(String),
    /// Delete every key in `[from, to)`.
    DeleteRange(String, String),
}

#[derive(Clone, Debug)]
struct DocRecord {
    kind: DocKind,
    snapshot: Option<Vec<u8>>,
    changes: BTreeMap<u64, Vec<u8>>,
    next_change: u64,
    last_seq: u64,
}

/// See the [module docs](self).
#[derive(Debug, Default)]
pub struct KvStorage {
    replica: Option<ReplicaId>,
    docs: BTreeMap<DocumentId, DocRecord>,
    outbox: BTreeMap<u64, OutboxEntry>,
    outbox_keys: HashMap<(DocumentId, ChangeId), u64>,
    outbox_next: u64,
    settled: BTreeMap<u64, SettledEntry>,
    settled_keys: HashMap<(DocumentId, ChangeId), u64>,
    settled_next: u64,
    /// Interior mutability: `Replica` lends its storage only as `&S` (see the report).
    pending: RefCell<Vec<KvWrite>>,
}

fn doc_key(doc: &DocumentId) -> String {
    format!("d/{doc}")
}
fn snapshot_key(doc: &DocumentId) -> String {
    format!("s/{doc}")
}
fn change_key(doc: &DocumentId, n: u64) -> String {
    format!("c/{doc}/{n:016x}")
}
fn outbox_key(n: u64) -> String {
    format!("o/{n:016x}")
}
fn settled_key(n: u64) -> String {
    format!("t/{n:016x}")
}

fn settled_value(entry: &SettledEntry) -> Vec<u8> {
    let mut v = Vec::with_capacity(59);
    v.extend_from_slice(entry.document.as_bytes());
    v.extend_from_slice(&entry.change.0);
    match &entry.settlement {
        Settlement::Confirmed { seq } => {
            v.push(0);
            v.extend_from_slice(&seq.to_le_bytes());
        }
        Settlement::Rejected { code, reason } => {
            v.push(1);
            v.extend_from_slice(&code.code().to_le_bytes());
            v.extend_from_slice(reason.as_bytes());
        }
    }
    v
}

fn parse_settled(n: u64, value: &[u8]) -> Result<SettledEntry, StorageError> {
    let truncated = || corrupt(format!("settled entry {n} is truncated"));
    if value.len() < 49 {
        return Err(truncated());
    }
    let mut doc = [0u8; 16];
    doc.copy_from_slice(&value[..16]);
    let mut change = [0u8; 32];
    change.copy_from_slice(&value[16..48]);
    let rest = &value[49..];
    let settlement = match value[48] {
        0 => {
            let seq: [u8; 8] = rest.try_into().map_err(|_| truncated())?;
            Settlement::Confirmed {
                seq: u64::from_le_bytes(seq),
            }
        }
        1 if rest.len() >= 2 => Settlement::Rejected {
            code: ErrorCode::from_code(u16::from_le_bytes([rest[0], rest[1]])),
            reason: String::from_utf8(rest[2..].to_vec()).map_err(|_| {
                corrupt(format!("settled entry {n} has a reason that is not UTF-8"))
            })?,
        },
        tag => return Err(corrupt(format!("settled entry {n} has tag {tag}"))),
    };
    Ok(SettledEntry {
        document: DocumentId::from_bytes(doc),
        change: ChangeId(change),
        settlement,
    })
}
fn doc_value(kind: DocKind, last_seq: u64) -> Vec<u8> {
    let mut v = vec![kind.code()];
    v.extend_from_slice(&last_seq.to_le_bytes());
    v
}

fn corrupt(what: impl Into<String>) -> StorageError {
    StorageError::Corrupt(what.into())
}

fn parse_doc(s: &str) -> Result<DocumentId, StorageError> {
    s.parse()
        .map_err(|_| corrupt(format!("bad document id {s:?}")))
}

fn parse_hex(s: &str) -> Result<u64, StorageError> {
    u64::from_str_radix(s, 16).map_err(|_| corrupt(format!("bad counter {s:?}")))
}

impl KvStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds the state from every stored (key, value) pair. Unknown keys are ignored (a newer
    /// client may add some); known keys that do not parse are an error.
    pub fn load<'a>(
        pairs: impl IntoIterator<Item = (String, &'a [u8])>,
    ) -> Result<Self, StorageError> {
        let mut store = Self::new();
        let mut changes: Vec<(DocumentId, u64, Vec<u8>)> = Vec::new();
        let mut snapshots: Vec<(DocumentId, Vec<u8>)> = Vec::new();
        for (key, value) in pairs {
            if key == "r" {
                let bytes: [u8; 16] = value
                    .try_into()
                    .map_err(|_| corrupt("replica id is not 16 bytes"))?;
                store.replica = Some(ReplicaId::from_bytes(bytes));
            } else if let Some(doc) = key.strip_prefix("d/") {
                let doc = parse_doc(doc)?;
                if value.len() != 9 {
                    return Err(corrupt(format!(
                        "document record {doc} has {} bytes",
                        value.len()
                    )));
                }
                let kind = DocKind::from_code(value[0])
                    .ok_or_else(|| corrupt(format!("document {doc} has kind {}", value[0])))?;
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&value[1..]);
                store.docs.insert(
                    doc,
                    DocRecord {
                        kind,
                        snapshot: None,
                        changes: BTreeMap::new(),
                        next_change: 0,
                        last_seq: u64::from_le_bytes(seq),
                    },
                );
            } else if let Some(doc) = key.strip_prefix("s/") {
                snapshots.push((parse_doc(doc)?, value.to_vec()));
            } else if let Some(rest) = key.strip_prefix("c/") {
                let (doc, n) = rest
                    .split_once('/')
                    .ok_or_else(|| corrupt(format!("bad change key {key:?}")))?;
                changes.push((parse_doc(doc)?, parse_hex(n)?, value.to_vec()));
            } else if let Some(n) = key.strip_prefix("o/") {
                let n = parse_hex(n)?;
                if value.len() < 48 {
                    return Err(corrupt(format!("outbox entry {n} is truncated")));
                }
                let mut doc = [0u8; 16];
                doc.copy_from_slice(&value[..16]);
                let mut change = [0u8; 32];
                change.copy_from_slice(&value[16..48]);
                let entry = OutboxEntry {
                    document: DocumentId::from_bytes(doc),
                    change: ChangeId(change),
                    bytes: value[48..].to_vec(),
                };
                store.outbox_keys.insert((entry.document, entry.change), n);
                store.outbox.insert(n, entry);
                store.outbox_next = store.outbox_next.max(n + 1);
            } else if let Some(n) = key.strip_prefix("t/") {
                // Statuses are advisory: one that does not parse (truncated, or written by a
                // newer build) is dropped rather than keeping the replica and its outbox from
                // opening.
                match parse_hex(n).and_then(|n| parse_settled(n, value).map(|e| (n, e))) {
                    Ok((n, entry)) => {
                        store.settled_keys.insert((entry.document, entry.change), n);
                        store.settled.insert(n, entry);
                        store.settled_next = store.settled_next.max(n + 1);
                    }
                    Err(_) => store.pending.get_mut().push(KvWrite::Delete(key.clone())),
                }
            }
        }
        for (doc, bytes) in snapshots {
            if let Some(d) = store.docs.get_mut(&doc) {
                d.snapshot = Some(bytes);
            }
        }
        for (doc, n, bytes) in changes {
            if let Some(d) = store.docs.get_mut(&doc) {
                d.changes.insert(n, bytes);
                d.next_change = d.next_change.max(n + 1);
            }
        }
        Ok(store)
    }

    /// The key-value writes of every batch since the last call, in order. Apply them in one
    /// IndexedDB transaction before sending any frame queued since.
    pub fn take_writes(&self) -> Vec<KvWrite> {
        std::mem::take(&mut *self.pending.borrow_mut())
    }

    /// Whether writes wait to be taken.
    pub fn has_writes(&self) -> bool {
        !self.pending.borrow().is_empty()
    }

    /// Unconfirmed local changes held.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }
}

impl Storage for KvStorage {
    fn replica_id(&mut self) -> Result<Option<ReplicaId>, StorageError> {
        Ok(self.replica)
    }

    fn documents(&mut self) -> Result<Vec<(DocumentId, DocKind)>, StorageError> {
        Ok(self.docs.iter().map(|(id, d)| (*id, d.kind)).collect())
    }

    fn load_document(
        &mut self,
        document: DocumentId,
    ) -> Result<Option<StoredDocument>, StorageError> {
        Ok(self.docs.get(&document).map(|d| StoredDocument {
            kind: d.kind,
            snapshot: d.snapshot.clone(),
            changes: d.changes.values().cloned().collect(),
            last_seq: d.last_seq,
        }))
    }

    fn outbox(&mut self) -> Result<Vec<OutboxEntry>, StorageError> {
        Ok(self.outbox.values().cloned().collect())
    }

    fn settled(&mut self) -> Result<Vec<SettledEntry>, StorageError> {
        Ok(self.settled.values().cloned().collect())
    }

    fn write(&mut self, batch: &Batch) -> Result<(), StorageError> {
        // Validate first so a failing batch changes nothing (as every backend does).
        batch.check_documents(|document| Ok(self.docs.contains_key(document)))?;
        for write in &batch.writes {
            match write {
                Write::SetReplicaId(id) => {
                    self.replica = Some(*id);
                    self.pending
                        .get_mut()
                        .push(KvWrite::Put("r".into(), id.as_bytes().to_vec()));
                }
                Write::CreateDocument { document, kind } => {
                    if !self.docs.contains_key(document) {
                        self.docs.insert(
                            *document,
                            DocRecord {
                                kind: *kind,
                                snapshot: None,
                                changes: BTreeMap::new(),
                                next_change: 0,
                                last_seq: 0,
                            },
                        );
                        self.pending
                            .get_mut()
                            .push(KvWrite::Put(doc_key(document), doc_value(*kind, 0)));
                    }
                }
                Write::AppendChange { document, bytes } => {
                    if let Some(d) = self.docs.get_mut(document) {
                        let n = d.next_change;
                        d.next_change += 1;
                        d.changes.insert(n, bytes.clone());
                        self.pending
                            .get_mut()
                            .push(KvWrite::Put(change_key(document, n), bytes.clone()));
                    }
                }
                Write::Snapshot { document, bytes } => {
                    if let Some(d) = self.docs.get_mut(document) {
                        d.snapshot = Some(bytes.clone());
                        d.changes.clear();
                        self.pending.get_mut().push(KvWrite::DeleteRange(
                            format!("c/{document}/"),
                            format!("c/{document}0"),
                        ));
                        self.pending
                            .get_mut()
                            .push(KvWrite::Put(snapshot_key(document), bytes.clone()));
                    }
                }
                Write::SetLastSeq { document, seq } => {
                    if let Some(d) = self.docs.get_mut(document) {
                        if *seq > d.last_seq {
                            d.last_seq = *seq;
                            self.pending
                                .get_mut()
                                .push(KvWrite::Put(doc_key(document), doc_value(d.kind, *seq)));
                        }
                    }
                }
                Write::PushOutbox(entry) => {
                    let key = (entry.document, entry.change);
                    if self.outbox_keys.contains_key(&key) {
                        continue;
                    }
                    let n = self.outbox_next;
                    self.outbox_next += 1;
                    self.outbox_keys.insert(key, n);
                    self.outbox.insert(n, entry.clone());
                    let mut value = Vec::with_capacity(48 + entry.bytes.len());
                    value.extend_from_slice(entry.document.as_bytes());
                    value.extend_from_slice(&entry.change.0);
                    value.extend_from_slice(&entry.bytes);
                    self.pending
                        .get_mut()
                        .push(KvWrite::Put(outbox_key(n), value));
                }
                Write::RemoveOutbox { document, change } => {
                    if let Some(n) = self.outbox_keys.remove(&(*document, *change)) {
                        self.outbox.remove(&n);
                        self.pending.get_mut().push(KvWrite::Delete(outbox_key(n)));
                    }
                }
                Write::Settle(entry) => {
                    let key = (entry.document, entry.change);
                    if let Some(old) = self.settled_keys.remove(&key) {
                        self.settled.remove(&old);
                        self.pending
                            .get_mut()
                            .push(KvWrite::Delete(settled_key(old)));
                    }
                    let n = self.settled_next;
                    self.settled_next += 1;
                    self.settled_keys.insert(key, n);
                    self.settled.insert(n, entry.clone());
                    self.pending
                        .get_mut()
                        .push(KvWrite::Put(settled_key(n), settled_value(entry)));
                }
                Write::ForgetSettled { document, change } => {
                    if let Some(n) = self.settled_keys.remove(&(*document, *change)) {
                        self.settled.remove(&n);
                        self.pending.get_mut().push(KvWrite::Delete(settled_key(n)));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays the recorded writes into a plain map, as IndexedDB would.
    fn apply(kv: &mut BTreeMap<String, Vec<u8>>, writes: Vec<KvWrite>) {
        for w in writes {
            match w {
                KvWrite::Put(k, v) => {
                    kv.insert(k, v);
                }
                KvWrite::Delete(k) => {
                    kv.remove(&k);
                }
                KvWrite::DeleteRange(from, to) => kv.retain(|k, _| !(*k >= from && *k < to)),
            }
        }
    }

    #[test]
    fn recorded_writes_reload_to_the_same_state() {
        let doc = DocumentId::from_random_bytes([3; 16]);
        let mut s = KvStorage::new();
        let entry = OutboxEntry {
            document: doc,
            change: ChangeId([9; 32]),
            bytes: vec![1, 2, 3],
        };
        s.write(&Batch {
            writes: vec![
                Write::SetReplicaId(ReplicaId::from_bytes([1; 16])),
                Write::CreateDocument {
                    document: doc,
                    kind: DocKind::Yrs,
                },
                Write::AppendChange {
                    document: doc,
                    bytes: vec![7],
                },
                Write::PushOutbox(entry.clone()),
                Write::PushOutbox(OutboxEntry {
                    change: ChangeId([8; 32]),
                    ..entry.clone()
                }),
            ],
        })
        .unwrap();
        s.write(&Batch {
            writes: vec![
                Write::Snapshot {
                    document: doc,
                    bytes: vec![5, 5],
                },
                Write::AppendChange {
                    document: doc,
                    bytes: vec![6],
                },
                Write::SetLastSeq {
                    document: doc,
                    seq: 42,
                },
                Write::RemoveOutbox {
                    document: doc,
                    change: ChangeId([8; 32]),
                },
                Write::Settle(SettledEntry {
                    document: doc,
                    change: ChangeId([8; 32]),
                    settlement: Settlement::Confirmed { seq: 42 },
                }),
                Write::Settle(SettledEntry {
                    document: doc,
                    change: ChangeId([7; 32]),
                    settlement: Settlement::Rejected {
                        code: ErrorCode::InvariantViolated,
                        reason: "seat taken".into(),
                    },
                }),
            ],
        })
        .unwrap();
        assert!(s
            .write(&Batch {
                writes: vec![Write::AppendChange {
                    document: DocumentId::from_random_bytes([4; 16]),
                    bytes: vec![1],
                }],
            })
            .is_err());
        let mut kv = BTreeMap::new();
        apply(&mut kv, s.take_writes());
        let mut back = KvStorage::load(kv.iter().map(|(k, v)| (k.clone(), v.as_slice()))).unwrap();
        assert_eq!(back.replica_id().unwrap(), s.replica_id().unwrap());
        assert_eq!(
            back.load_document(doc).unwrap(),
            s.load_document(doc).unwrap()
        );
        let stored = back.load_document(doc).unwrap().unwrap();
        assert_eq!(stored.snapshot, Some(vec![5, 5]));
        assert_eq!(stored.changes, vec![vec![6]]);
        assert_eq!(stored.last_seq, 42);
        assert_eq!(back.outbox().unwrap(), vec![entry]);
        assert_eq!(back.settled().unwrap(), s.settled().unwrap());
        assert_eq!(back.settled().unwrap().len(), 2);
        let bad = KvStorage::load([("t/0000000000000001".to_owned(), &[1u8; 50][..])])
            .expect("a bad status does not stop the store from opening");
        assert!(bad.settled.is_empty());
        assert_eq!(
            bad.take_writes(),
            vec![KvWrite::Delete("t/0000000000000001".into())]
        );
        assert!(KvStorage::load([("r".to_owned(), &[1u8, 2][..])]).is_err());
    }
}
