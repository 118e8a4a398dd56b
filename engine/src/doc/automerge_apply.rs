//! Bytes from elsewhere into an Automerge document: whole, or not at all.
//!
//! Automerge 0.12 panics on some changes whose bytes parse and whose hashes match but that name
//! what their dependencies never created: an op on an object no change made ("Obj ... Missing
//! from Index", in its batch apply), and it panics after it has started changing the document.
//! Anything a peer or the disk hands us must be an error, never a panic: on the server a panic
//! in a document's actor ends the document for every subscriber, and a peer could send the same
//! bytes again and again. So bytes for a loaded document go into a copy, which replaces the
//! document only once the apply returned `Ok`; a refused apply (an error or a panic) leaves the
//! document as it was. The copy costs about a tenth of the apply itself, which walks the whole
//! object since Automerge 0.7 (with one change per character: 21 µs against 212 µs at 1,000
//! characters, 2.7 ms against 19 ms at 100,000). WebAssembly cannot catch a panic (it aborts
//! there), so on wasm32 the bytes go straight in.
//!
//! Each apply also empties the document's patch log. `AutoCommit::load_incremental` hands
//! Automerge the document's own `PatchLog`, inactive unless a diff cursor was set, and
//! Automerge 0.12 records every text splice it applies in it all the same (`PatchLog::splice`
//! does not look whether the log is active): with nothing reading it, a document kept ~257
//! bytes per character its peers typed for as long as it stayed loaded (5.1 MB for 20,000, a
//! relay's documents above all), and every copy above copied them.

use automerge::{AutoCommit, LoadOptions};

use super::error::DocError;

/// What a panic inside Automerge is reported as.
const PANICKED: &str = "Automerge failed applying it (it names what its dependencies do not \
                        create); nothing of it was applied";

/// Applies changes (or a saved document) from elsewhere to `doc` as
/// `AutoCommit::load_incremental` does, or, when that fails or panics, changes nothing and
/// returns the error (`what` names the bytes in it).
pub(crate) fn load_incremental(
    doc: &mut AutoCommit,
    bytes: &[u8],
    what: &'static str,
) -> Result<(), DocError> {
    #[cfg(not(target_arch = "wasm32"))]
    {
        let mut trial = doc.clone();
        // Unwind safety: on a panic `trial` is dropped unseen and `doc` was not touched.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            trial.load_incremental(bytes)
        })) {
            Ok(Ok(_)) => {
                forget_patches(&mut trial);
                *doc = trial;
                Ok(())
            }
            Ok(Err(error)) => Err(DocError::malformed(what, error)),
            Err(_) => Err(DocError::malformed(what, PANICKED)),
        }
    }
    #[cfg(target_arch = "wasm32")]
    {
        let applied = doc
            .load_incremental(bytes)
            .map(|_| ())
            .map_err(|error| DocError::malformed(what, error));
        forget_patches(doc);
        applied
    }
}

/// Drops what Automerge recorded in `doc`'s patch log while nobody reads it (no diff cursor
/// set: an app that set one through [`super::AutomergeDoc::native`] keeps its patches).
fn forget_patches(doc: &mut AutoCommit) {
    if doc.diff_cursor().is_empty() {
        doc.reset_diff_cursor();
    }
}

/// Loads a saved document (a snapshot and/or changes) as `AutoCommit::load_with_options` does,
/// with a panic inside Automerge returned as an error.
pub(crate) fn load(bytes: &[u8], options: LoadOptions<'_>) -> Result<AutoCommit, DocError> {
    const WHAT: &str = "automerge document";
    // Unwind safety: on a panic the half-built document is dropped unseen.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        AutoCommit::load_with_options(bytes, options)
    })) {
        Ok(loaded) => loaded.map_err(|error| DocError::malformed(WHAT, error)),
        Err(_) => Err(DocError::malformed(WHAT, PANICKED)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use automerge::transaction::Transactable;
    use automerge::{ObjType, ROOT};

    use super::*;

    /// A text insert whose dependency on the text's creation was cut: it parses, its hash
    /// matches, and Automerge 0.12 panics applying it to a document that has anything in it.
    pub(crate) fn forged_change() -> automerge::Change {
        let mut other = AutoCommit::new();
        let text = other.put_object(ROOT, "text", ObjType::Text).unwrap();
        other.commit();
        other.splice_text(&text, 0, 0, "hi").unwrap();
        other.commit();
        let mut expanded = other.get_changes(&[])[1].decode();
        expanded.deps = Vec::new();
        expanded.seq = 1;
        expanded.hash = None;
        expanded.into()
    }

    #[test]
    fn a_change_automerge_panics_on_is_an_error_and_changes_nothing() {
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "k", 1).unwrap();
        doc.commit();
        let heads = doc.get_heads();
        let saved = doc.save();
        let forged = forged_change();
        let error = load_incremental(&mut doc, forged.raw_bytes(), "automerge change")
            .expect_err("refused");
        assert!(
            error.to_string().contains("nothing of it was applied"),
            "{error}"
        );
        assert_eq!(doc.get_heads(), heads);
        assert_eq!(doc.save(), saved, "the document is as it was");
        // And it takes the next good change as before.
        let mut peer = doc.fork();
        peer.put(ROOT, "j", 2).unwrap();
        peer.commit();
        let next = peer.save_after(&heads);
        load_incremental(&mut doc, &next, "automerge change").expect("a good change");
        assert_eq!(doc.get_heads(), peer.get_heads());
    }

    #[test]
    fn loading_what_automerge_panics_on_is_an_error() {
        let error = load(forged_change().raw_bytes(), LoadOptions::new()).expect_err("refused");
        assert!(
            error.to_string().contains("nothing of it was applied"),
            "{error}"
        );
        let error = load(b"\x85\x6f\x4a\x83garbage", LoadOptions::new()).expect_err("refused");
        assert!(error.to_string().contains("unknown chunk type"), "{error}");
    }

    /// A document with a map, a text and a list, and a peer's change that touches each.
    fn document_and_change() -> (AutoCommit, automerge::ExpandedChange) {
        let mut doc = AutoCommit::new();
        let text = doc.put_object(ROOT, "text", ObjType::Text).unwrap();
        doc.splice_text(&text, 0, 0, "hello").unwrap();
        let list = doc.put_object(ROOT, "list", ObjType::List).unwrap();
        doc.insert(&list, 0, 1).unwrap();
        doc.insert(&list, 1, 2).unwrap();
        doc.put(ROOT, "k", 1).unwrap();
        doc.commit();
        let heads = doc.get_heads();
        let mut peer = doc.fork();
        peer.splice_text(&text, 2, 1, "XY").unwrap();
        peer.insert(&list, 1, 5).unwrap();
        peer.delete(&list, 0).unwrap();
        peer.put(ROOT, "k", 2).unwrap();
        let map = peer.put_object(ROOT, "m", ObjType::Map).unwrap();
        peer.put(&map, "a", 1).unwrap();
        peer.commit();
        let change = peer.get_changes(&heads)[0].decode();
        (doc, change)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(crate::proptest_cases(64)))]
        /// A peer's change with its ops pointed anywhere (objects, element ids, predecessors,
        /// the insert flag, actions), encoded with a hash that matches: Automerge 0.12 panics
        /// on about two in five. Applied here each is taken whole or refused, never a panic,
        /// and a refused one leaves the document as it was.
        #[test]
        fn changes_pointed_anywhere_are_applied_whole_or_refused(
            mutations in proptest::collection::vec((0..6usize, 0..6u8, proptest::prelude::any::<u64>()), 1..3)
        ) {
            use automerge::legacy::{ElementId, Key, ObjectId, OpId, OpType};
            let (mut doc, mut change) = document_and_change();
            let actors = [doc.get_actor().clone(), change.actor_id.clone()];
            let op_id = |r: u64| OpId(r % 12 + 1, actors[(r / 12 % 2) as usize].clone());
            for (index, kind, r) in mutations {
                let op = &mut change.operations[index % 6];
                match kind {
                    0 => op.obj = if r % 4 == 0 { ObjectId::Root } else { ObjectId::Id(op_id(r)) },
                    1 if r % 3 == 0 => op.key = Key::Seq(ElementId::Head),
                    1 => op.key = Key::Seq(ElementId::Id(op_id(r))),
                    2 => op.pred = vec![op_id(r)].into(),
                    3 => op.insert = !op.insert,
                    4 => {
                        op.action = match r % 3 {
                            0 => OpType::Delete,
                            1 => OpType::Make(ObjType::Text),
                            _ => OpType::Put(automerge::ScalarValue::Int(3)),
                        }
                    }
                    _ => op.pred = Vec::new().into(),
                }
            }
            change.hash = None;
            let change: automerge::Change = change.into();
            let saved = doc.save();
            if load_incremental(&mut doc, change.raw_bytes(), "automerge change").is_err() {
                proptest::prop_assert_eq!(doc.save(), saved);
            }
        }
    }
}
