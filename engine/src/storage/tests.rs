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
        .execute(
            "UPDATE documents SET kind = 1, snapshot = 'text, not a blob'",
            [],
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
