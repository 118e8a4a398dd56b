//! Bytes that make Automerge 0.12 panic, for tests of the engine and of what embeds it (the
//! server's end-to-end tests). Only with the `testing` feature (and in the engine's own tests).

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ObjType, ROOT};

/// A text insert whose dependency on the text's creation was cut: its bytes parse, its hash
/// matches, and Automerge 0.12 panics applying it to a document that has anything in it ("Obj
/// ... Missing from Index").
pub fn forged_automerge_change() -> automerge::Change {
    let mut other = AutoCommit::new();
    let text = other
        .put_object(ROOT, "text", ObjType::Text)
        .expect("a text");
    other.commit();
    other.splice_text(&text, 0, 0, "hi").expect("typed");
    other.commit();
    let mut expanded = other.get_changes(&[])[1].decode();
    expanded.deps = Vec::new();
    expanded.seq = 1;
    expanded.hash = None;
    expanded.into()
}

/// An Automerge sync message (V1) carrying [`forged_automerge_change`] and naming it as its
/// sender's head.
pub fn forged_automerge_sync_message() -> Vec<u8> {
    let forged = forged_automerge_change();
    automerge::sync::Message {
        heads: vec![forged.hash()],
        need: Vec::new(),
        have: Vec::new(),
        changes: vec![forged.raw_bytes().to_vec()].into(),
        flags: None,
        version: automerge::sync::MessageVersion::V1,
    }
    .encode()
}
