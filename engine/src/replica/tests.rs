use serde_json::json;

use super::*;
use crate::doc::Path;
use crate::protocol::{decode, Commit, SyncPayload};
use crate::storage::MemoryStorage;

fn doc_id() -> DocumentId {
    DocumentId::from_bytes([5; 16])
}

fn put(key: &str, value: serde_json::Value) -> Op {
    Op::Put {
        path: Path::keys(["m", key]),
        value,
    }
}

fn init_ops() -> Vec<Op> {
    vec![Op::Put {
        path: Path::keys(["m"]),
        value: json!({"created": true}),
    }]
}

fn drain(replica: &mut Replica<impl Storage>) -> Vec<Message> {
    let mut out = Vec::new();
    while let Some(t) = replica.poll_transmit() {
        out.push(decode(&t.frame, &Limits::default()).expect("our frames decode"));
    }
    out
}

fn events(replica: &mut Replica<impl Storage>) -> Vec<Event> {
    std::iter::from_fn(|| replica.poll_event()).collect()
}

#[cfg(all(feature = "sqlite", not(target_arch = "wasm32")))]
#[test]
fn a_reopened_replica_keeps_documents_and_outbox() {
    use crate::storage::SqliteStorage;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("r.db");
    for kind in [DocKind::Automerge, DocKind::Yrs] {
        let document = DocumentId::from_random_bytes([kind.code(); 16]);
        let ids;
        let before;
        {
            let storage = SqliteStorage::open(&path).expect("open");
            let mut replica = Replica::open(
                storage,
                ReplicaId::from_bytes([1; 16]),
                ReplicaConfig::default(),
            )
            .expect("replica");
            replica.create(document, kind).expect("create");
            let a = replica
                .change(document, &init_ops())
                .expect("change")
                .expect("id");
            let b = replica
                .change(document, &[put("x", json!(1))])
                .expect("change")
                .expect("id");
            ids = vec![a, b];
            before = replica.json(document).expect("json");
        }
        let storage = SqliteStorage::open(&path).expect("reopen");
        let mut replica = Replica::open(
            storage,
            ReplicaId::from_bytes([9; 16]),
            ReplicaConfig::default(),
        )
        .expect("replica");
        assert_eq!(
            replica.id(),
            ReplicaId::from_bytes([1; 16]),
            "the stored id wins"
        );
        assert_eq!(replica.json(document).expect("json"), before);
        let pending: Vec<ChangeId> = replica
            .outbox()
            .filter(|e| e.document == document)
            .map(|e| e.change)
            .collect();
        assert_eq!(pending, ids, "{kind}");
    }
}

#[test]
fn acks_move_changes_out_of_the_outbox() {
    for kind in [DocKind::Automerge, DocKind::Yrs] {
        ack_one_reject_one(kind, ReplicaConfig::default());
    }
}

#[test]
fn settled_statuses_are_bounded_the_same_on_disk_and_in_memory() {
    for kind in [DocKind::Automerge, DocKind::Yrs] {
        let config = ReplicaConfig {
            max_tracked_statuses: 1,
            ..ReplicaConfig::default()
        };
        let (mut replica, first, second) = ack_one_reject_one(kind, config.clone());
        // Only the newest status is kept (the bound is 1), in memory and in storage alike.
        assert_eq!(
            replica.change_status(doc_id(), first).expect("status"),
            ChangeStatus::Unknown
        );
        let rejected = ChangeStatus::Rejected {
            code: ErrorCode::Forbidden,
            reason: "read-only".into(),
        };
        assert_eq!(
            replica.change_status(doc_id(), second).expect("status"),
            rejected
        );
        let mut storage = replica.storage().clone();
        assert_eq!(storage.settled().expect("settled").len(), 1);
        // And it reads the same after a restart.
        let mut reopened =
            Replica::open(storage, ReplicaId::from_bytes([1; 16]), config).expect("reopen");
        assert_eq!(
            reopened.change_status(doc_id(), second).expect("status"),
            rejected
        );
        assert_eq!(
            reopened.change_status(doc_id(), first).expect("status"),
            ChangeStatus::Unknown
        );
    }
}

/// Two local changes; the server confirms the first and refuses the second.
fn ack_one_reject_one(
    kind: DocKind,
    config: ReplicaConfig,
) -> (Replica<MemoryStorage>, ChangeId, ChangeId) {
    {
        let mut replica =
            Replica::open(MemoryStorage::new(), ReplicaId::from_bytes([1; 16]), config)
                .expect("replica");
        replica.create(doc_id(), kind).expect("create");
        let first = replica
            .change(doc_id(), &init_ops())
            .expect("change")
            .expect("id");
        let second = replica
            .change(doc_id(), &[put("a", json!(1))])
            .expect("change")
            .expect("id");
        let server = PeerId(1);
        replica.connect_upstream(server, Some("token".into()));
        replica.sync_document(server, doc_id()).expect("sync");
        let hello = drain(&mut replica);
        assert!(
            matches!(hello.as_slice(), [Message::Hello { token: Some(t), .. }] if t == "token")
        );
        replica
            .handle_message(
                server,
                Message::Welcome {
                    protocol_version: 1,
                    max_frame_bytes: 1 << 20,
                    max_message_bytes: 1 << 26,
                },
            )
            .expect("welcome");
        let subscribe = drain(&mut replica);
        assert!(matches!(
            subscribe.as_slice(),
            [Message::Subscribe { since_seq: 0, .. }]
        ));
        replica
            .handle_message(
                server,
                Message::Subscribed {
                    document: doc_id(),
                    kind,
                    head_seq: 0,
                    read_only: false,
                },
            )
            .expect("subscribed");
        assert!(
            !drain(&mut replica).is_empty(),
            "the first sync message goes out"
        );
        if kind == DocKind::Yrs {
            // The server's step 1 makes the client resend each unconfirmed change on its own.
            let server_doc = Document::new(kind, ReplicaId::from_bytes([2; 16]), doc_id());
            let Document::Yrs(y) = &server_doc else {
                unreachable!()
            };
            replica
                .handle_message(
                    server,
                    Message::Sync {
                        document: doc_id(),
                        payload: SyncPayload::YrsStep1(y.state_vector()),
                    },
                )
                .expect("step1");
            let resent: Vec<ChangeId> = drain(&mut replica)
                .into_iter()
                .filter_map(|m| match m {
                    Message::Sync {
                        payload: SyncPayload::YrsUpdate(u),
                        ..
                    } => Some(ChangeId::of_bytes(&u)),
                    _ => None,
                })
                .collect();
            assert_eq!(resent, vec![first, second]);
        }
        events(&mut replica);
        replica
            .handle_message(
                server,
                Message::Ack {
                    document: doc_id(),
                    commits: vec![Commit {
                        seq: 4,
                        change: first,
                    }],
                },
            )
            .expect("ack");
        assert_eq!(
            events(&mut replica),
            vec![Event::Confirmed {
                document: doc_id(),
                change: first,
                seq: 4
            }]
        );
        assert!(!replica.is_pending(doc_id(), first));
        assert!(replica.is_pending(doc_id(), second));
        assert_eq!(replica.last_seq(doc_id()).expect("seq"), 4);
        replica
            .handle_message(
                server,
                Message::Reject {
                    document: doc_id(),
                    change: second,
                    code: ErrorCode::Forbidden,
                    reason: "read-only".into(),
                },
            )
            .expect("reject");
        assert!(matches!(
            events(&mut replica).as_slice(),
            [Event::Rejected {
                code: ErrorCode::Forbidden,
                ..
            }]
        ));
        assert_eq!(replica.outbox().count(), 0);
        (replica, first, second)
    }
}

#[test]
fn the_outbox_limit_refuses_edits_and_keeps_state() {
    let config = ReplicaConfig {
        max_outbox_changes: 2,
        ..ReplicaConfig::default()
    };
    let mut replica = Replica::open(MemoryStorage::new(), ReplicaId::from_bytes([1; 16]), config)
        .expect("replica");
    replica
        .create(doc_id(), DocKind::Automerge)
        .expect("create");
    replica.change(doc_id(), &init_ops()).expect("1");
    replica.change(doc_id(), &[put("a", json!(1))]).expect("2");
    let full = replica.change(doc_id(), &[put("b", json!(2))]);
    assert!(matches!(full, Err(ReplicaError::OutboxFull(2))));
    assert_eq!(
        replica.json(doc_id()).expect("json"),
        json!({"m": {"created": true, "a": 1}})
    );
}

#[test]
fn a_peer_cannot_make_a_replica_exceed_its_document_limit() {
    let config = ReplicaConfig {
        max_documents: 1,
        ..ReplicaConfig::default()
    };
    let mut replica = Replica::open(MemoryStorage::new(), ReplicaId::from_bytes([1; 16]), config)
        .expect("replica");
    replica.create(doc_id(), DocKind::Yrs).expect("create");
    replica.connect_peer(PeerId(3));
    let result = replica.handle_message(
        PeerId(3),
        Message::Sync {
            document: DocumentId::from_bytes([6; 16]),
            payload: SyncPayload::YrsUpdate(vec![0, 0]),
        },
    );
    assert!(matches!(result, Err(ReplicaError::TooManyDocuments(1))));
}

#[cfg(all(feature = "sqlite", not(target_arch = "wasm32")))]
#[test]
fn a_corrupt_stored_document_is_a_typed_error() {
    use crate::storage::SqliteStorage;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("r.db");
    {
        let mut replica = Replica::open(
            SqliteStorage::open(&path).expect("open"),
            ReplicaId::from_bytes([1; 16]),
            ReplicaConfig::default(),
        )
        .expect("replica");
        replica
            .create(doc_id(), DocKind::Automerge)
            .expect("create");
        replica.change(doc_id(), &init_ops()).expect("change");
    }
    let storage = SqliteStorage::open(&path).expect("reopen");
    storage
        .connection()
        .execute("UPDATE changes SET bytes = x'856f4a83deadbeef'", [])
        .expect("corrupt");
    let mut replica = Replica::open(
        storage,
        ReplicaId::from_bytes([1; 16]),
        ReplicaConfig::default(),
    )
    .expect("replica opens");
    assert!(matches!(
        replica.json(doc_id()),
        Err(ReplicaError::CorruptDocument { .. })
    ));
}

#[test]
fn garbage_frames_are_errors_not_panics() {
    let mut replica = Replica::open(
        MemoryStorage::new(),
        ReplicaId::from_bytes([1; 16]),
        ReplicaConfig::default(),
    )
    .expect("replica");
    replica.connect_peer(PeerId(1));
    assert!(matches!(
        replica.handle_frame(PeerId(1), &[0xee, 1, 2]),
        Err(ReplicaError::Decode(_))
    ));
    assert!(matches!(
        replica.handle_frame(PeerId(2), &[1]),
        Err(ReplicaError::UnknownPeer(_))
    ));
    let bad_sync = crate::protocol::encode(&Message::Sync {
        document: doc_id(),
        payload: SyncPayload::Automerge(vec![0x42, 1, 2, 3]),
    });
    assert!(replica.handle_frame(PeerId(1), &bad_sync).is_err());
}

#[test]
fn frames_to_a_server_respect_its_welcome_limit() {
    let mut replica = Replica::open(
        MemoryStorage::new(),
        ReplicaId::from_bytes([1; 16]),
        ReplicaConfig::default(),
    )
    .expect("replica");
    replica.create(doc_id(), DocKind::Yrs).expect("create");
    let server = PeerId(1);
    replica.connect_upstream(server, None);
    let _ = drain(&mut replica);
    replica
        .handle_message(
            server,
            Message::Welcome {
                protocol_version: 1,
                max_frame_bytes: 8192,
                max_message_bytes: 1 << 26,
            },
        )
        .expect("welcome");
    replica.sync_document(server, doc_id()).expect("sync");
    replica
        .handle_message(
            server,
            Message::Subscribed {
                document: doc_id(),
                kind: DocKind::Yrs,
                head_seq: 0,
                read_only: false,
            },
        )
        .expect("subscribed");
    let big = "x".repeat(100_000);
    replica
        .change(
            doc_id(),
            &[Op::Splice {
                path: Path::keys(["text"]),
                index: 0,
                delete: 0,
                insert: big,
            }],
        )
        .expect("change");
    let server_doc = Document::new(DocKind::Yrs, ReplicaId::from_bytes([2; 16]), doc_id());
    let Document::Yrs(y) = &server_doc else {
        unreachable!()
    };
    replica
        .handle_message(
            server,
            Message::Sync {
                document: doc_id(),
                payload: SyncPayload::YrsStep1(y.state_vector()),
            },
        )
        .expect("step1");
    let frames: Vec<Vec<u8>> = std::iter::from_fn(|| replica.poll_transmit())
        .map(|t| t.frame)
        .collect();
    assert!(frames.len() > 12, "100 KB goes out in chunks");
    assert!(frames.iter().all(|f| f.len() <= 8192));
}

#[test]
fn local_checks_follow_a_document_unloaded_and_changed_again() {
    let schema = crate::invariant::Schema::from_json(
        r#"{"document_type": "ledger", "invariants": [
            {"id": "non-negative", "kind": "range", "path": ["wallet", "entries"],
             "fold": {"amount": "amount"}, "min": 0, "policy": "compensate"}]}"#,
    )
    .expect("schema");
    for kind in [DocKind::Yrs, DocKind::Automerge] {
        let document = DocumentId::from_random_bytes([kind.code() + 60; 16]);
        let mut replica = Replica::open(
            MemoryStorage::new(),
            ReplicaId::from_bytes([1; 16]),
            ReplicaConfig::default(),
        )
        .expect("replica");
        replica.add_schema(schema.clone());
        replica.create(document, kind).expect("create");
        replica
            .change(
                document,
                &[
                    crate::invariant::type_op(kind, "ledger"),
                    Op::Put {
                        path: Path::keys(["wallet"]),
                        value: json!({"entries": {"d1": {"amount": 10}}}),
                    },
                ],
            )
            .expect("change");
        assert!(replica
            .check_invariants(document)
            .expect("check")
            .is_empty());
        replica.unload(document);
        replica
            .change(
                document,
                &[Op::Put {
                    path: Path::keys(["wallet", "entries", "s1"]),
                    value: json!({"amount": -25}),
                }],
            )
            .expect("change after reload");
        let violations = replica.check_invariants(document).expect("check");
        assert_eq!(violations.len(), 1, "{kind:?}: {violations:?}");
        assert_eq!(violations[0].invariant, "non-negative");
    }
}
