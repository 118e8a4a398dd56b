use serde_json::json;

use super::*;
use crate::doc::{ChangeId, Op, Path, Version};
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

/// Runs both sync states until neither has anything to send; returns the rounds it took.
fn settle(a: &mut Document, a_sync: &mut DocSync, b: &mut Document, b_sync: &mut DocSync) -> usize {
    for round in 0..20 {
        let from_a = a_sync.poll(a);
        let from_b = b_sync.poll(b);
        if from_a.is_empty() && from_b.is_empty() {
            return round;
        }
        for m in from_a {
            b_sync.receive(b, m).expect("b receives");
        }
        for m in from_b {
            a_sync.receive(a, m).expect("a receives");
        }
    }
    panic!("the sync does not settle");
}

#[test]
fn a_fresh_automerge_client_gets_the_whole_document_in_one_message() {
    let mut server = doc(DocKind::Automerge, 1);
    server.apply_ops(&[init("k0", 0)]).expect("ops");
    for i in 1..200 {
        server.apply_ops(&[put(&format!("k{i}"), i)]).expect("ops");
    }
    for fresh in 0u8..2 {
        let mut client = doc(DocKind::Automerge, 2 + fresh);
        let mut down = DocSync::new(DocKind::Automerge, SyncRole::Downstream);
        let mut up = DocSync::new(DocKind::Automerge, SyncRole::Upstream);
        // The server waits for the client's first message.
        assert!(down.poll(&mut server).is_empty());
        let hello = up.poll(&mut client);
        assert_eq!(hello.len(), 1);
        for m in hello {
            down.receive(&mut server, m).expect("server receives");
        }
        let answer = down.poll(&mut server);
        let [SyncPayload::Automerge(bytes)] = answer.as_slice() else {
            panic!("one Automerge message, got {answer:?}");
        };
        let message = automerge::sync::Message::decode(bytes).expect("decodes");
        assert_eq!(message.version, automerge::sync::MessageVersion::V2);
        assert_eq!(message.changes.len(), 1, "one chunk: the document");
        let chunk = message.changes.iter().next().expect("a chunk");
        let saved = server.save();
        assert_eq!(chunk, saved.as_slice(), "the compacted document");
        let received = up
            .receive(&mut client, answer.into_iter().next().expect("message"))
            .expect("client receives");
        // 200 changes; the second time also the client's and the server's from the first.
        assert_eq!(received.changes.len(), [200, 202][usize::from(fresh)]);
        assert_eq!(client.to_json(), server.to_json());
        // One more round at most (the client says what it now has), and then quiet.
        assert!(settle(&mut server, &mut down, &mut client, &mut up) <= 1);
        // Both ways afterwards.
        client.apply_ops(&[put("from-client", 1)]).expect("ops");
        settle(&mut server, &mut down, &mut client, &mut up);
        assert_eq!(client.to_json(), server.to_json());
        // A change on the server: the next fresh client gets a new save with it.
        server
            .apply_ops(&[put(&format!("more{fresh}"), 1)])
            .expect("ops");
    }
}

#[test]
fn a_fresh_automerge_peer_that_also_has_a_change_converges() {
    let mut server = doc(DocKind::Automerge, 1);
    server.apply_ops(&[init("a", 1)]).expect("ops");
    let mut client = doc(DocKind::Automerge, 2);
    let mut down = DocSync::new(DocKind::Automerge, SyncRole::Downstream);
    let mut up = DocSync::new(DocKind::Automerge, SyncRole::Upstream);
    // The client said "nothing" first, then made a change before the document arrived.
    for m in up.poll(&mut client) {
        down.receive(&mut server, m).expect("server receives");
    }
    client
        .apply_ops(&[Op::Put {
            path: Path::keys(["b"]),
            value: json!(2),
        }])
        .expect("ops");
    settle(&mut server, &mut down, &mut client, &mut up);
    assert_eq!(server.to_json(), json!({"m": {"a": 1}, "b": 2}));
    assert_eq!(client.to_json(), server.to_json());
}

/// A hub and three spokes for [`messages_received_together_match_one_by_one`]: the hub is kept
/// twice, `together` receiving what is queued with [`DocSync::receive_many`] (and answering the
/// spokes), `apart` receiving the same messages one by one.
struct Hub {
    together: Document,
    together_sync: Vec<DocSync>,
    apart: Document,
    apart_sync: Vec<DocSync>,
    spokes: Vec<Document>,
    spoke_sync: Vec<DocSync>,
    inbox: Vec<VecDeque<SyncPayload>>,
    batches: usize,
}

impl Hub {
    fn new(n: usize) -> Self {
        let syncs = |role| {
            (0..n)
                .map(|_| DocSync::new(DocKind::Automerge, role))
                .collect()
        };
        Self {
            together: doc(DocKind::Automerge, 100),
            together_sync: syncs(SyncRole::Downstream),
            apart: doc(DocKind::Automerge, 100),
            apart_sync: syncs(SyncRole::Downstream),
            spokes: (0..n)
                .map(|i| doc(DocKind::Automerge, i as u8 + 1))
                .collect(),
            spoke_sync: syncs(SyncRole::Upstream),
            inbox: vec![VecDeque::new(); n],
            batches: 0,
        }
    }

    fn send(&mut self, spoke: usize) {
        let out = self.spoke_sync[spoke].poll(&mut self.spokes[spoke]);
        self.inbox[spoke].extend(out);
    }

    /// The hub takes the oldest message of every spoke that sent one, both ways.
    fn deliver(&mut self) {
        let from: Vec<usize> = (0..self.inbox.len())
            .filter(|i| !self.inbox[*i].is_empty())
            .collect();
        let payloads: Vec<SyncPayload> = from
            .iter()
            .filter_map(|i| self.inbox[*i].pop_front())
            .collect();
        let apart: Vec<Vec<ChangeId>> = from
            .iter()
            .zip(payloads.clone())
            .map(|(i, p)| {
                let received = self.apart_sync[*i]
                    .receive(&mut self.apart, p)
                    .expect("apart");
                received.changes.iter().map(|c| c.id).collect()
            })
            .collect();
        let mut peers: Vec<&mut DocSync> = self
            .together_sync
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| from.contains(i))
            .map(|(_, s)| s)
            .collect();
        let together = DocSync::receive_many(&mut self.together, &mut peers, payloads);
        let together: Vec<Vec<ChangeId>> = together
            .into_iter()
            .map(|r| r.expect("together").changes.iter().map(|c| c.id).collect())
            .collect();
        if together.iter().filter(|c| !c.is_empty()).count() > 1 {
            self.batches += 1;
        }
        assert_eq!(together, apart, "each message brought the same changes");
        assert_eq!(self.together.to_json(), self.apart.to_json());
        assert_eq!(self.together.version(), self.apart.version());
    }

    fn answer(&mut self, spoke: usize) {
        for payload in self.together_sync[spoke].poll(&mut self.together) {
            self.spoke_sync[spoke]
                .receive(&mut self.spokes[spoke], payload)
                .expect("spoke receives");
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(crate::proptest_cases(32)))]
    /// Automerge messages from several peers applied together leave the document as applying
    /// them one by one does, report each change with the message that brought it, and keep every
    /// peer's sync going to convergence.
    #[test]
    fn messages_received_together_match_one_by_one(
        steps in proptest::collection::vec((0..4u8, 0..3usize, 0..8u8), 1..80)
    ) {
        let mut hub = Hub::new(3);
        for (kind, spoke, key) in steps {
            match kind {
                0 => {
                    hub.spokes[spoke]
                        .apply_ops(&[init(&format!("k{key}"), i64::from(key))])
                        .expect("edit");
                }
                1 => hub.send(spoke),
                2 => hub.deliver(),
                _ => hub.answer(spoke),
            }
        }
        for _ in 0..12 {
            for spoke in 0..3 {
                hub.send(spoke);
            }
            while hub.inbox.iter().any(|i| !i.is_empty()) {
                hub.deliver();
            }
            for spoke in 0..3 {
                hub.answer(spoke);
            }
        }
        for spoke in &hub.spokes {
            proptest::prop_assert_eq!(spoke.to_json(), hub.together.to_json());
        }
    }
}

#[test]
fn automerge_messages_from_several_peers_are_applied_together() {
    let mut hub = Hub::new(3);
    for spoke in 0..3 {
        hub.spokes[spoke]
            .apply_ops(&[init("x", spoke as i64)])
            .expect("edit");
        hub.send(spoke);
    }
    // First messages (heads only: nothing was asked yet), then their changes.
    hub.deliver();
    for spoke in 0..3 {
        hub.answer(spoke);
        hub.send(spoke);
    }
    hub.deliver();
    assert_eq!(hub.batches, 1, "three messages with changes, one batch");
    assert!(hub.together.to_json()["m"]["x"].is_i64());
    assert_eq!(hub.together.to_json(), hub.apart.to_json());
}

/// A change Automerge panics on (see `doc::automerge_apply`), sent among other peers' good
/// messages: the batch fails, each message is received again on its own, and only the forged
/// one is refused.
#[test]
fn a_forged_change_among_messages_received_together_is_refused_alone() {
    let mut hub = Hub::new(3);
    for spoke in 0..2 {
        let edit = Op::Put {
            path: Path::keys([format!("s{spoke}")]),
            value: json!(spoke),
        };
        hub.spokes[spoke].apply_ops(&[edit]).expect("edit");
        hub.send(spoke);
    }
    // First messages (heads only), then the ones with the changes.
    hub.deliver();
    for spoke in 0..2 {
        hub.answer(spoke);
        hub.send(spoke);
    }
    let payloads: Vec<SyncPayload> = (0..2)
        .filter_map(|spoke| hub.inbox[spoke].pop_front())
        .chain([SyncPayload::Automerge(
            crate::testing::forged_automerge_sync_message(),
        )])
        .collect();
    let mut peers: Vec<&mut DocSync> = hub.together_sync.iter_mut().collect();
    let results = DocSync::receive_many(&mut hub.together, &mut peers, payloads);
    for (spoke, result) in results.iter().take(2).enumerate() {
        let received = result.as_ref().expect("a good message");
        assert_eq!(received.changes.len(), 1, "spoke {spoke}'s change");
    }
    assert!(
        matches!(&results[2], Err(DocError::Malformed { detail, .. }) if detail.contains("nothing of it was applied")),
        "{:?}",
        results[2]
    );
    assert_eq!(hub.together.to_json(), json!({"s0": 0, "s1": 1}));
}

#[test]
fn a_yrs_step_1_is_checked_when_it_arrives_and_answered_with_what_the_peer_lacks() {
    let mut server = doc(DocKind::Yrs, 1);
    server.apply_ops(&[init("a", 1)]).expect("ops");
    let mut to_client = DocSync::new(DocKind::Yrs, SyncRole::Downstream);
    let _ = to_client.poll(&mut server);
    // Not a state vector: refused now, and no step 2 is due for it.
    let refused = to_client.receive(&mut server, SyncPayload::YrsStep1(vec![0xff, 0xff, 0xff]));
    assert!(
        matches!(refused, Err(DocError::Malformed { .. })),
        "{refused:?}"
    );
    assert!(!to_client.is_live());
    assert!(to_client.poll(&mut server).is_empty());
    // An empty state vector: the answer is the whole document.
    let mut client = doc(DocKind::Yrs, 2);
    let Version::StateVector(empty) = client.version() else {
        panic!("a Yrs document's version is a state vector")
    };
    to_client
        .receive(&mut server, SyncPayload::YrsStep1(empty))
        .expect("an empty state vector");
    let answer = to_client.poll(&mut server);
    let [SyncPayload::YrsStep2(update)] = answer.as_slice() else {
        panic!("one step 2, not {answer:?}")
    };
    let Document::Yrs(c) = &mut client else {
        panic!("a Yrs document")
    };
    c.apply_changes(update).expect("apply");
    assert_eq!(client.to_json(), json!({"m": {"a": 1}}));
}
