use super::*;

fn exercise(storage: &mut dyn Storage) {
    let document = DocumentId::from_bytes([1; 16]);
    let replica = ReplicaId::from_bytes([2; 16]);
    assert_eq!(storage.replica_id().expect("read"), None);
    let mut batch = Batch::default();
    batch.push(Write::SetReplicaId(replica));
    batch.push(Write::CreateDocument {
        document,
        kind: DocKind::Yrs,
    });
    batch.push(Write::AppendChange {
        document,
        bytes: vec![1],
    });
    batch.push(Write::AppendChange {
        document,
        bytes: vec![2],
    });
    batch.push(Write::PushOutbox(OutboxEntry {
        document,
        change: ChangeId([3; 32]),
        bytes: vec![2],
    }));
    batch.push(Write::SetLastSeq { document, seq: 9 });
    storage.write(&batch).expect("write");
    assert_eq!(storage.replica_id().expect("read"), Some(replica));
    assert_eq!(
        storage.documents().expect("list"),
        vec![(document, DocKind::Yrs)]
    );
    let stored = storage
        .load_document(document)
        .expect("load")
        .expect("present");
    assert_eq!(stored.changes, vec![vec![1], vec![2]]);
    assert_eq!(stored.last_seq, 9);
    assert_eq!(storage.outbox().expect("outbox").len(), 1);

    let mut compact = Batch::default();
    compact.push(Write::Snapshot {
        document,
        bytes: vec![9, 9],
    });
    compact.push(Write::RemoveOutbox {
        document,
        change: ChangeId([3; 32]),
    });
    storage.write(&compact).expect("compact");
    let stored = storage
        .load_document(document)
        .expect("load")
        .expect("present");
    assert_eq!(stored.snapshot, Some(vec![9, 9]));
    assert!(stored.changes.is_empty());
    assert!(storage.outbox().expect("outbox").is_empty());
    assert_eq!(
        storage
            .load_document(DocumentId::from_bytes([7; 16]))
            .expect("load"),
        None
    );

    // A write to a document that does not exist refuses the whole batch: nothing of it is kept,
    // and a document of that id created later starts empty.
    let unknown = DocumentId::from_bytes([7; 16]);
    for write in [
        Write::AppendChange {
            document: unknown,
            bytes: vec![5],
        },
        Write::Snapshot {
            document: unknown,
            bytes: vec![6],
        },
        Write::SetLastSeq {
            document: unknown,
            seq: 3,
        },
    ] {
        let mut orphan = Batch::default();
        orphan.push(Write::PushOutbox(OutboxEntry {
            document,
            change: ChangeId([8; 32]),
            bytes: vec![8],
        }));
        orphan.push(write);
        assert!(storage.write(&orphan).is_err(), "a write to no document");
        assert!(storage.outbox().expect("outbox").is_empty(), "nothing kept");
    }
    let mut create = Batch::default();
    create.push(Write::CreateDocument {
        document: unknown,
        kind: DocKind::Automerge,
    });
    storage.write(&create).expect("create");
    assert_eq!(
        storage.load_document(unknown).expect("load"),
        Some(StoredDocument {
            kind: DocKind::Automerge,
            snapshot: None,
            changes: Vec::new(),
            last_seq: 0,
        })
    );

    // Settled statuses: kept in the order settled, replaced per change, forgotten on request.
    let confirmed = SettledEntry {
        document,
        change: ChangeId([3; 32]),
        settlement: Settlement::Confirmed { seq: 12 },
    };
    let rejected = SettledEntry {
        document,
        change: ChangeId([4; 32]),
        settlement: Settlement::Rejected {
            code: crate::protocol::ErrorCode::InvariantViolated,
            reason: "seat 3A is taken".into(),
        },
    };
    let mut settle = Batch::default();
    settle.push(Write::Settle(confirmed.clone()));
    settle.push(Write::Settle(rejected.clone()));
    storage.write(&settle).expect("settle");
    assert_eq!(
        storage.settled().expect("settled"),
        vec![confirmed.clone(), rejected.clone()]
    );
    let mut forget = Batch::default();
    forget.push(Write::ForgetSettled {
        document,
        change: ChangeId([3; 32]),
    });
    storage.write(&forget).expect("forget");
    assert_eq!(storage.settled().expect("settled"), vec![rejected]);
    let mut again = Batch::default();
    again.push(Write::Settle(confirmed.clone()));
    storage.write(&again).expect("settle again");
}

#[test]
fn memory_storage_keeps_what_it_is_given() {
    exercise(&mut MemoryStorage::new());
}

#[cfg(all(feature = "sqlite", not(target_arch = "wasm32")))]
#[test]
fn sqlite_storage_keeps_what_it_is_given_across_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.db");
    exercise(&mut SqliteStorage::open(&path).expect("open"));
    let mut reopened = SqliteStorage::open(&path).expect("reopen");
    let stored = reopened
        .load_document(DocumentId::from_bytes([1; 16]))
        .expect("load")
        .expect("present");
    assert_eq!(stored.snapshot, Some(vec![9, 9]));
    let settled = reopened.settled().expect("settled");
    assert_eq!(settled.len(), 2, "statuses survive a reopen");
    assert_eq!(
        settled[1].settlement,
        Settlement::Confirmed { seq: 12 },
        "a status settled again moves to the end"
    );
}

#[cfg(all(feature = "sqlite", not(target_arch = "wasm32")))]
#[test]
fn sqlite_corrupt_rows_are_typed_errors() {
    let mut storage = SqliteStorage::open_in_memory().expect("open");
    storage
        .connection()
        .execute("INSERT INTO documents (id, kind) VALUES (x'0102', 1)", [])
        .expect("insert bad id");
    assert!(matches!(storage.documents(), Err(StorageError::Corrupt(_))));
    storage
        .connection()
        .execute("DELETE FROM documents", [])
        .expect("clear");
    let good = DocumentId::from_bytes([1; 16]);
    storage
        .connection()
        .execute(
            "INSERT INTO documents (id, kind) VALUES (?1, 77)",
            [good.as_bytes().as_slice()],
        )
        .expect("insert bad kind");
    assert!(matches!(
        storage.load_document(good),
        Err(StorageError::Corrupt(_))
    ));
    storage
        .connection()
        .execute("UPDATE documents SET kind = 1", [])
        .expect("good kind");
    storage
        .connection()
        .execute(
            "INSERT INTO snapshots (document, bytes) VALUES (?1, 'text, not a blob')",
            [good.as_bytes().as_slice()],
        )
        .expect("bad snapshot type");
    assert!(matches!(
        storage.load_document(good),
        Err(StorageError::Corrupt(_))
    ));
    storage
        .connection()
        .execute(
            "INSERT INTO outbox (document, change, bytes) VALUES (?1, x'00', x'00')",
            [good.as_bytes().as_slice()],
        )
        .expect("bad outbox row");
    assert!(matches!(storage.outbox(), Err(StorageError::Corrupt(_))));
    storage
        .connection()
        .execute(
            "INSERT INTO settled (document, change, seq, code) VALUES (?1, zeroblob(32), 1, 2)",
            [good.as_bytes().as_slice()],
        )
        .expect("a row both confirmed and rejected");
    assert!(matches!(storage.settled(), Err(StorageError::Corrupt(_))));
}

#[cfg(all(feature = "sqlite", not(target_arch = "wasm32")))]
#[test]
fn sqlite_schema_2_is_migrated_with_its_snapshots() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("replica.db");
    let compacted = DocumentId::from_bytes([1; 16]);
    let fresh = DocumentId::from_bytes([2; 16]);
    {
        // Schema 2 as it was created: the snapshot inside the `documents` row.
        let old = rusqlite::Connection::open(&path).expect("open");
        old.execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
             CREATE TABLE documents (id BLOB PRIMARY KEY, kind INTEGER NOT NULL, snapshot BLOB,
                 last_seq INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE changes (n INTEGER PRIMARY KEY AUTOINCREMENT, document BLOB NOT NULL,
                 bytes BLOB NOT NULL);
             CREATE INDEX changes_by_document ON changes (document, n);
             PRAGMA user_version = 2;",
        )
        .expect("schema 2");
        old.execute(
            "INSERT INTO documents VALUES (?1, 2, x'0909', 5), (?2, 1, NULL, 0)",
            [compacted.as_bytes().as_slice(), fresh.as_bytes().as_slice()],
        )
        .expect("documents");
        old.execute(
            "INSERT INTO changes (document, bytes) VALUES (?1, x'03')",
            [compacted.as_bytes().as_slice()],
        )
        .expect("a change after the snapshot");
    }
    let mut storage = SqliteStorage::open(&path).expect("migrate");
    let version: i64 = storage
        .connection()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("version");
    assert_eq!(version, 3);
    let stored = storage
        .load_document(compacted)
        .expect("load")
        .expect("present");
    assert_eq!(stored.kind, DocKind::Yrs);
    assert_eq!(stored.snapshot, Some(vec![9, 9]));
    assert_eq!(stored.changes, vec![vec![3]]);
    assert_eq!(stored.last_seq, 5);
    let stored = storage
        .load_document(fresh)
        .expect("load")
        .expect("present");
    assert_eq!(
        (stored.kind, stored.snapshot, stored.last_seq),
        (DocKind::Automerge, None, 0)
    );
    // Written in schema 3 from here on; acknowledgements no longer touch the snapshot.
    let mut batch = Batch::default();
    batch.push(Write::SetLastSeq {
        document: compacted,
        seq: 8,
    });
    batch.push(Write::Snapshot {
        document: fresh,
        bytes: vec![4],
    });
    storage.write(&batch).expect("write");
    drop(storage);
    let mut storage = SqliteStorage::open(&path).expect("reopen");
    let stored = storage
        .load_document(compacted)
        .expect("load")
        .expect("present");
    assert_eq!((stored.snapshot, stored.last_seq), (Some(vec![9, 9]), 8));
    let stored = storage
        .load_document(fresh)
        .expect("load")
        .expect("present");
    assert_eq!(stored.snapshot, Some(vec![4]));
}

#[cfg(all(feature = "sqlite", not(target_arch = "wasm32")))]
#[test]
fn sqlite_a_newer_schema_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("replica.db");
    drop(SqliteStorage::open(&path).expect("create"));
    let newer = |version: Option<i64>| {
        let connection = rusqlite::Connection::open(&path).expect("open");
        if let Some(version) = version {
            connection
                .pragma_update(None, "user_version", version)
                .expect("set");
        }
        connection
            .pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))
            .expect("read")
    };
    assert_eq!(newer(Some(99)), 99);
    assert!(matches!(
        SqliteStorage::open(&path),
        Err(StorageError::NewerSchema { found: 99, supported }) if supported < 99
    ));
    assert_eq!(newer(None), 99, "the file is left as it was");
    // Its journal mode included: a newer build's file may use another one.
    let connection = rusqlite::Connection::open(&path).expect("open");
    let journal: String = connection
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .expect("journal mode");
    assert_eq!(journal, "wal", "the mode the file was created with");
    connection
        .pragma_update(None, "journal_mode", "DELETE")
        .expect("rollback journal");
    drop(connection);
    assert!(matches!(
        SqliteStorage::open(&path),
        Err(StorageError::NewerSchema { .. })
    ));
    let journal: String = rusqlite::Connection::open(&path)
        .expect("open")
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .expect("journal mode");
    assert_eq!(journal, "delete", "the journal mode is left as it was");
}
