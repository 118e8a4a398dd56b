use proptest::prelude::*;

use super::*;
use crate::doc::{ChangeId, DocKind};
use crate::ids::{DocumentId, ReplicaId};
use crate::protocol::{Commit, ErrorCode, SyncPayload};

fn samples() -> Vec<Message> {
    let document = DocumentId::from_bytes([9; 16]);
    vec![
        Message::Hello {
            protocol_version: 1,
            replica: ReplicaId::from_bytes([1; 16]),
            token: None,
        },
        Message::Welcome {
            protocol_version: 1,
            max_frame_bytes: 1 << 20,
            max_message_bytes: 1 << 26,
        },
        Message::Subscribe {
            document,
            kind: DocKind::Yrs,
            since_seq: 300,
        },
        Message::Subscribed {
            document,
            kind: DocKind::Automerge,
            head_seq: 7,
            read_only: true,
        },
        Message::Unsubscribe { document },
        Message::Sync {
            document,
            payload: SyncPayload::YrsUpdate(vec![1, 2, 3]),
        },
        Message::Ack {
            document,
            commits: vec![
                Commit {
                    seq: 1,
                    change: ChangeId([3; 32]),
                },
                Commit {
                    seq: u64::MAX,
                    change: ChangeId([4; 32]),
                },
            ],
        },
        Message::Reject {
            document,
            change: ChangeId([5; 32]),
            code: ErrorCode::Forbidden,
            reason: "read-only token".into(),
        },
        Message::Error {
            code: ErrorCode::Other(999),
            document: None,
            message: "¿qué?".into(),
        },
    ]
}

#[test]
fn every_message_round_trips() {
    for message in samples() {
        let bytes = encode(&message);
        assert_eq!(decode(&bytes, &Limits::default()), Ok(message));
    }
}

#[test]
fn truncated_and_trailing_frames_are_errors() {
    for message in samples() {
        let bytes = encode(&message);
        for cut in 0..bytes.len() {
            assert!(
                decode(&bytes[..cut], &Limits::default()).is_err(),
                "{message:?} cut at {cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            decode(&longer, &Limits::default()),
            Err(DecodeError::Trailing(1))
        );
    }
}

#[test]
fn large_messages_are_chunked_and_joined() {
    let message = Message::Sync {
        document: DocumentId::from_bytes([1; 16]),
        payload: SyncPayload::Automerge((0..1_500_000u32).map(|i| i as u8).collect()),
    };
    let frames = encode_frames(&message, 64 * 1024, 7);
    assert!(frames.len() > 20);
    assert!(frames.iter().all(|f| f.len() <= 64 * 1024));
    let limits = Limits {
        max_frame_bytes: 64 * 1024,
        max_message_bytes: 2 << 20,
    };
    let mut reassembler = Reassembler::new(limits);
    let mut out = None;
    for (i, frame) in frames.iter().enumerate() {
        let got = reassembler.push(frame).expect("frame decodes");
        if i + 1 < frames.len() {
            assert!(got.is_none());
            assert!(reassembler.buffered_bytes() > 0);
        } else {
            out = got;
        }
    }
    assert_eq!(out, Some(message));
    assert_eq!(reassembler.buffered_bytes(), 0);
}

#[test]
fn limits_are_enforced() {
    let message = Message::Sync {
        document: DocumentId::from_bytes([1; 16]),
        payload: SyncPayload::YrsUpdate(vec![0; 10_000]),
    };
    let limits = Limits {
        max_frame_bytes: 1024,
        max_message_bytes: 4096,
    };
    // A single oversized frame.
    let mut r = Reassembler::new(limits);
    assert!(matches!(
        r.push(&encode(&message)),
        Err(DecodeError::TooLarge { what: "frame", .. })
    ));
    // Chunks adding up past the message limit.
    let mut r = Reassembler::new(limits);
    let frames = encode_frames(&message, 1024, 1);
    let error = frames.iter().find_map(|f| r.push(f).err());
    assert!(matches!(
        error,
        Some(DecodeError::TooLarge {
            what: "message",
            ..
        })
    ));
    // Chunks out of order.
    let mut r = Reassembler::new(limits);
    assert!(matches!(
        r.push(&frames[1]),
        Err(DecodeError::ChunkSequence(_))
    ));
}

fn arbitrary_message() -> impl Strategy<Value = Message> {
    (
        0usize..9,
        any::<u64>(),
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(which, n, bytes)| {
            let mut message = samples()[which].clone();
            match &mut message {
                Message::Sync { payload, .. } => *payload = SyncPayload::Automerge(bytes),
                Message::Subscribe { since_seq, .. } => *since_seq = n,
                Message::Error { message, .. } => *message = String::from_utf8_lossy(&bytes).into(),
                _ => {}
            }
            message
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes, &Limits::default());
        let mut r = Reassembler::new(Limits { max_frame_bytes: 256, max_message_bytes: 1024 });
        let _ = r.push(&bytes);
    }

    #[test]
    fn decoding_mutated_frames_never_panics(
        message in arbitrary_message(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
    ) {
        let mut bytes = encode(&message);
        prop_assert_eq!(decode(&bytes, &Limits::default()), Ok(message));
        for (at, value) in flips {
            let len = bytes.len();
            bytes[at % len] = value;
        }
        let _ = decode(&bytes, &Limits::default());
        let keep = cut % (bytes.len() + 1);
        let _ = decode(&bytes[..keep], &Limits::default());
    }
}
