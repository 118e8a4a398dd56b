//! Bytes from elsewhere into an Automerge document: whole, or not at all.
//!
//! Automerge 0.12 panics on some changes whose bytes parse and whose hashes match but that name
//! what their dependencies never created: an op on an object no change made ("Obj ... Missing
//! from Index", in its batch apply), element ids or actors pointed anywhere (the property test
//! below builds such changes; raw `load_incremental` fails it in its first cases), and it
//! panics after it has started changing the document (the change is in its graph, its ops are
//! not).
//! Anything a peer or the disk hands us must be an error, never a panic: on the server a panic
//! in a document's actor ends the document for every subscriber, and a peer could send the same
//! bytes again and again. So an apply that fails or panics is undone: the document is rebuilt
//! from a checkpoint ([`Guard`]: the document saved, and the chunks of every change applied or
//! committed since, in order), which costs a load but only then. Applying to a copy instead
//! would be simpler, but the copy costs on every apply (Automerge's change graph and op
//! columns): with 32 typists it took the server's CPU from 0.061–0.078 to 0.089–0.095 cores
//! (BENCHMARKS.md, session 25). WebAssembly cannot catch a panic (it aborts there), so on
//! wasm32 the bytes go straight in and nothing is kept.
//!
//! Each apply also empties the document's patch log. `AutoCommit::load_incremental` hands
//! Automerge the document's own `PatchLog`, inactive unless a diff cursor was set, and
//! Automerge 0.12 records every text splice it applies in it all the same (`PatchLog::splice`
//! does not look whether the log is active): with nothing reading it, a document kept ~320
//! bytes per character its peers typed for as long as it stayed loaded (`sync-server/tests/memory.rs`), a
//! relay's documents above all.

#[cfg(not(target_arch = "wasm32"))]
use automerge::transaction::Transactable as _;
use std::sync::Arc;

use automerge::{AutoCommit, ChangeHash, LoadOptions};
#[cfg(not(target_arch = "wasm32"))]
use automerge::{ReadDoc as _, SaveOptions};

use super::error::DocError;

/// What a panic inside Automerge is reported as.
const PANICKED: &str = "Automerge failed applying it (it names what its dependencies do not \
                        create); nothing of it was applied";

/// Changes applied since a checkpoint are kept up to this many bytes, or the size of the saved
/// document when that is larger; beyond, the next apply takes a new checkpoint (a save, paid
/// once per that many bytes received, so its cost per byte stays bounded). Small: every loaded
/// Automerge document that is being edited holds up to this much (~40 keystrokes' changes)
/// besides its save, and a small document saves in microseconds.
#[cfg(not(target_arch = "wasm32"))]
const MIN_SINCE_BYTES: usize = 4 << 10;

/// What a document falls back on when an apply fails: the document as saved at a checkpoint,
/// and the chunks of every change that entered it since, in order. Empty until the first
/// apply needs it, or until the document hands it a save of its own ([`Guard::adopt`]: the
/// bytes it was loaded from, the save it keeps for compaction and fresh peers).
#[derive(Debug, Default)]
pub(crate) struct Guard {
    checkpoint: Option<Checkpoint>,
}

// Never filled on wasm32 (see the module's doc).
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
#[derive(Debug)]
struct Checkpoint {
    /// The document saved (with any changes still waiting for their dependencies; shared with
    /// the save the document keeps, when it is that one).
    saved: Arc<[u8]>,
    /// The chunks applied or committed since, one after the other.
    since: Vec<u8>,
    /// The document's heads once `saved` and `since` are in: when the document's heads are
    /// anything else at the next apply, something entered it unrecorded and a new checkpoint
    /// is taken.
    heads: Vec<ChangeHash>,
}

impl Guard {
    /// Makes `saved`, bytes that hold `doc` as it is now (it was just loaded from them, or
    /// just saved to them), the checkpoint.
    pub(crate) fn adopt(&mut self, doc: &mut AutoCommit, saved: Arc<[u8]>) {
        #[cfg(not(target_arch = "wasm32"))]
        {
            self.checkpoint = Some(Checkpoint {
                saved,
                since: Vec::new(),
                heads: doc.get_heads(),
            });
        }
        #[cfg(target_arch = "wasm32")]
        let _ = (doc, saved);
    }

    /// Notes `chunk`, a change just committed to `doc` locally, so that a rebuild keeps it.
    pub(crate) fn committed(&mut self, doc: &mut AutoCommit, chunk: &[u8]) {
        if let Some(checkpoint) = &mut self.checkpoint {
            checkpoint.since.extend_from_slice(chunk);
            checkpoint.heads = doc.get_heads();
        }
    }

    /// Makes sure `doc`, whose heads are `heads`, can be rebuilt from the checkpoint: takes a
    /// new one unless the one kept still leads to `doc` and has not grown past its bound.
    #[cfg(not(target_arch = "wasm32"))]
    fn keep_up(&mut self, doc: &mut AutoCommit, heads: &[ChangeHash]) {
        let current = self.checkpoint.as_ref().is_some_and(|c| {
            c.heads == heads && c.since.len() <= c.saved.len().max(MIN_SINCE_BYTES)
        });
        if !current {
            let saved = doc.save_with_options(SaveOptions {
                deflate: false,
                retain_orphans: true,
            });
            self.checkpoint = Some(Checkpoint {
                saved: saved.into(),
                since: Vec::new(),
                heads: heads.to_vec(),
            });
        }
    }
}

/// Applies changes (or a saved document) from elsewhere to `doc` as
/// `AutoCommit::load_incremental` does, or, when that fails or panics, leaves `doc` as it was
/// (rebuilt from `guard`'s checkpoint) and returns the error (`what` names the bytes in it).
pub(crate) fn load_incremental(
    doc: &mut AutoCommit,
    guard: &mut Guard,
    bytes: &[u8],
    what: &'static str,
) -> Result<(), DocError> {
    #[cfg(not(target_arch = "wasm32"))]
    {
        if doc.pending_ops() > 0 {
            // Uncommitted ops (made through `native`) would be committed by the apply and
            // missing from the checkpoint: commit them first, as the apply would.
            doc.commit();
        }
        let before = doc.get_heads();
        guard.keep_up(doc, &before);
        // Unwind safety: on a panic `doc` is rebuilt below before anything reads it again.
        let applied =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| doc.load_incremental(bytes)));
        let error = match applied {
            Ok(Ok(_)) => {
                forget_patches(doc);
                guard.committed(doc, bytes);
                return Ok(());
            }
            Ok(Err(error)) => DocError::malformed(what, error),
            Err(_) => DocError::malformed(what, PANICKED),
        };
        rebuild(doc, guard, &before);
        Err(error)
    }
    #[cfg(target_arch = "wasm32")]
    {
        let _ = guard;
        let applied = doc
            .load_incremental(bytes)
            .map(|_| ())
            .map_err(|error| DocError::malformed(what, error));
        forget_patches(doc);
        applied
    }
}

/// Puts back in `doc` what `guard`'s checkpoint holds (the document before the apply that
/// failed, whose heads were `before`), keeping its actor. The checkpoint is bytes this document
/// produced; should they not rebuild it, the document stays as the failed apply left it and
/// the next apply takes a new checkpoint.
#[cfg(not(target_arch = "wasm32"))]
fn rebuild(doc: &mut AutoCommit, guard: &mut Guard, before: &[ChangeHash]) {
    let Some(checkpoint) = guard.checkpoint.as_ref() else {
        return;
    };
    let options = LoadOptions::new().text_encoding(doc.text_encoding());
    let actor = doc.get_actor().clone();
    // Unwind safety: on a panic the half-built copy is dropped unseen.
    let rebuilt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut rebuilt = AutoCommit::load_with_options(&checkpoint.saved, options).ok()?;
        if !checkpoint.since.is_empty() {
            rebuilt.load_incremental(&checkpoint.since).ok()?;
        }
        let mut rebuilt = rebuilt.with_actor(actor);
        let rebuilt_heads = rebuilt.get_heads();
        Some((rebuilt, rebuilt_heads))
    }));
    match rebuilt {
        Ok(Some((mut rebuilt, heads))) if heads == before => {
            forget_patches(&mut rebuilt);
            *doc = rebuilt;
        }
        _ => guard.checkpoint = None,
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
mod tests {
    use automerge::transaction::Transactable;
    use automerge::{ObjType, ReadDoc, ROOT};

    use super::*;

    /// A change from another peer of `doc` that puts `key`.
    fn peer_put(doc: &mut AutoCommit, key: &str) -> Vec<u8> {
        let heads = doc.get_heads();
        let mut peer = doc.fork();
        peer.put(ROOT, key, 2).unwrap();
        peer.commit();
        peer.save_after(&heads)
    }

    #[test]
    fn a_change_automerge_panics_on_is_an_error_and_changes_nothing() {
        let mut doc = AutoCommit::new();
        let mut guard = Guard::default();
        doc.put(ROOT, "k", 1).unwrap();
        doc.commit();
        // A checkpoint, a change received after it and one committed here after that.
        let good = peer_put(&mut doc, "received");
        load_incremental(&mut doc, &mut guard, &good, "automerge change").expect("good");
        doc.put(ROOT, "local", 3).unwrap();
        let hash = doc.commit().expect("a change");
        let local = doc
            .get_change_by_hash(&hash)
            .expect("it")
            .raw_bytes()
            .to_vec();
        guard.committed(&mut doc, &local);
        let heads = doc.get_heads();
        let saved = doc.save();

        let forged = crate::testing::forged_automerge_change();
        let error = load_incremental(&mut doc, &mut guard, forged.raw_bytes(), "automerge change")
            .expect_err("refused");
        assert!(
            error.to_string().contains("nothing of it was applied"),
            "{error}"
        );
        assert_eq!(doc.get_heads(), heads);
        assert_eq!(doc.save(), saved, "the document is as it was");
        // And it takes the next good change as before, and refuses the forged one again.
        let next = peer_put(&mut doc, "next");
        load_incremental(&mut doc, &mut guard, &next, "automerge change").expect("good");
        let heads = doc.get_heads();
        assert!(
            load_incremental(&mut doc, &mut guard, forged.raw_bytes(), "automerge change").is_err()
        );
        assert_eq!(doc.get_heads(), heads);
    }

    #[test]
    fn a_change_made_unrecorded_is_kept_by_the_next_checkpoint() {
        let mut doc = AutoCommit::new();
        let mut guard = Guard::default();
        let good = peer_put(&mut doc, "received");
        load_incremental(&mut doc, &mut guard, &good, "automerge change").expect("good");
        // Committed without telling the guard (as an app through `native` may).
        doc.put(ROOT, "unrecorded", 1).unwrap();
        doc.commit();
        // And ops left uncommitted.
        doc.put(ROOT, "uncommitted", 2).unwrap();
        let forged = crate::testing::forged_automerge_change();
        assert!(
            load_incremental(&mut doc, &mut guard, forged.raw_bytes(), "automerge change").is_err()
        );
        for key in ["unrecorded", "uncommitted", "received"] {
            assert!(doc.get(ROOT, key).unwrap().is_some(), "{key} kept");
        }
    }

    #[test]
    fn loading_what_automerge_panics_on_is_an_error() {
        let error = load(
            crate::testing::forged_automerge_change().raw_bytes(),
            LoadOptions::new(),
        )
        .expect_err("refused");
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
            // A checkpoint with a change received after it, then the one pointed anywhere.
            let mut guard = Guard::default();
            let good = peer_put(&mut doc, "received");
            load_incremental(&mut doc, &mut guard, &good, "automerge change").expect("good");
            let saved = doc.save();
            if load_incremental(&mut doc, &mut guard, change.raw_bytes(), "automerge change").is_err() {
                proptest::prop_assert_eq!(doc.save(), saved);
            }
        }
    }
}
