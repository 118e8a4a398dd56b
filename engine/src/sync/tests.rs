use serde_json::json;

use super::*;
use crate::doc::{Op, Path};
use crate::ids::{DocumentId, ReplicaId};

fn doc(kind: DocKind, replica: u8) -> Document {
    Document::new(
        kind,
        ReplicaId::from_bytes([replica; 16]),
        DocumentId::from_bytes([1; 16]),
    )
}

fn put(key: &str, value: i64) -> Op {
    Op::Put {
        path: Path::keys(["m", key]),
        value: json!(value),
    }
}

fn init(key: &str, value: i64) -> Op {
    Op::Put {
        path: Path::keys(["m"]),
        value: json!({ key: value }),
    }
}

#[test]
fn a_yrs_update_with_missing_dependencies_is_reported_and_asked_again() {
    let mut source = doc(DocKind::Yrs, 1);
    let first = source
        .apply_ops(&[put("a", 1)])
        .expect("ops")
        .expect("change");
    let second = source
        .apply_ops(&[put("b", 2)])
        .expect("ops")
        .expect("change");
    let mut target = doc(DocKind::Yrs, 2);
    let mut sync = DocSync::new(DocKind::Yrs, SyncRole::Downstream);
    let _ = sync.poll(&mut target);
    let received = sync
        .receive(&mut target, SyncPayload::YrsUpdate(second.bytes.clone()))
        .expect("receive");
    assert!(
        received.incomplete,
        "the second change depends on the first"
    );
    assert!(received.changes.is_empty());
    assert!(matches!(
        sync.poll(&mut target).as_slice(),
        [SyncPayload::YrsStep1(_)]
    ));
    let received = sync
        .receive(&mut target, SyncPayload::YrsUpdate(first.bytes))
        .expect("receive");
    assert!(!received.incomplete);
    assert_eq!(received.changes.len(), 1);
    assert_eq!(target.to_json(), json!({"m": {"a": 1}}));
}

#[test]
fn a_read_only_peer_cannot_change_the_document() {
    for kind in [DocKind::Automerge, DocKind::Yrs] {
        let mut writer = doc(kind, 1);
        writer.apply_ops(&[init("a", 1)]).expect("ops");
        let mut server = doc(kind, 2);
        let mut to_server = DocSync::new(kind, SyncRole::Upstream);
        let mut to_writer = DocSync::new(kind, SyncRole::Downstream);
        to_writer.set_read_only(true);
        assert!(to_writer.is_read_only());
        let mut refused = false;
        for _ in 0..10 {
            let out = to_server.poll(&mut writer);
            let back = to_writer.poll(&mut server);
            if out.is_empty() && back.is_empty() {
                break;
            }
            for payload in out {
                match to_writer.receive(&mut server, payload) {
                    Err(DocError::ReadOnly) => refused = true,
                    Err(e) => panic!("{kind}: {e}"),
                    Ok(received) => assert!(received.changes.is_empty(), "{kind}"),
                }
            }
            for payload in back {
                to_server.receive(&mut writer, payload).expect("receive");
            }
        }
        assert_eq!(server.to_json(), json!({}), "{kind}: nothing applied");
        if kind == DocKind::Yrs {
            assert!(refused, "a Yrs write is an error the server can report");
        }
    }
}
