//! The automerge-paper trace (read from `../shared/data/traces`, never copied into the
//! repository) and its replays through the engine and through each CRDT crate directly, shared
//! by the trace bench (`benches/trace.rs`) and the interleaved example
//! (`examples/trace_overhead.rs`).

use std::io::Read;
use std::path::PathBuf;

use accord_engine::{DocKind, Document, DocumentId, Op, Path, ReplicaId};
use automerge::transaction::Transactable;
use yrs::{Text, Transact};

/// One patch: position (UTF-16 units; the trace is ASCII so code points equal them), deleted
/// count, inserted text.
pub type Patch = (usize, usize, String);

/// Where the traces live: `ACCORD_TRACES`, or `../shared/data/traces` next to the repository.
pub fn traces_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("ACCORD_TRACES") {
        return PathBuf::from(dir);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/traces")
}

/// The automerge-paper trace's patches and its final text; `None` when it is not there.
pub fn load_trace() -> Option<(Vec<Patch>, String)> {
    let path = traces_dir().join("automerge-paper.json.gz");
    let file = std::fs::File::open(&path).ok()?;
    let mut json = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut json)
        .ok()?;
    let value: serde_json::Value = serde_json::from_str(&json).ok()?;
    let mut patches = Vec::new();
    for txn in value["txns"].as_array()? {
        for patch in txn["patches"].as_array()? {
            patches.push((
                patch[0].as_u64()? as usize,
                patch[1].as_u64()? as usize,
                patch[2].as_str()?.to_owned(),
            ));
        }
    }
    Some((patches, value["endContent"].as_str()?.to_owned()))
}

/// The document id every replay uses.
pub fn doc_id() -> DocumentId {
    DocumentId::from_bytes([1; 16])
}

/// The trace through the engine's JSON API, one change per patch.
pub fn engine_replay(kind: DocKind, patches: &[Patch]) -> Document {
    let mut doc = Document::new(kind, ReplicaId::from_bytes([1; 16]), doc_id());
    let path = Path::keys(["text"]);
    for (index, delete, insert) in patches {
        let op = Op::Splice {
            path: path.clone(),
            index: *index,
            delete: *delete,
            insert: insert.clone(),
        };
        let _ = doc.apply_ops(std::slice::from_ref(&op));
    }
    doc
}

/// Automerge used directly. With `with_bytes`, each change's bytes are taken after its commit,
/// as any app must to persist or send it (the engine does it to store the change and fill the
/// outbox); without, the edits stay in memory only.
pub fn automerge_replay(patches: &[Patch], with_bytes: bool) -> automerge::AutoCommit {
    let mut doc = automerge::AutoCommit::new_with_encoding(automerge::TextEncoding::Utf16CodeUnit);
    let text = doc
        .put_object(automerge::ROOT, "text", automerge::ObjType::Text)
        .expect("text");
    doc.commit();
    for (index, delete, insert) in patches {
        doc.splice_text(&text, *index, *delete as isize, insert)
            .expect("splice");
        let hash = doc.commit();
        if with_bytes {
            if let Some(change) = hash.and_then(|h| doc.get_change_by_hash(&h)) {
                std::hint::black_box(change.raw_bytes());
            }
        }
    }
    doc
}

/// Yrs used directly, encoding each transaction's update.
pub fn yrs_replay(patches: &[Patch]) -> yrs::Doc {
    let doc = yrs::Doc::with_options(yrs::Options {
        offset_kind: yrs::OffsetKind::Utf16,
        ..yrs::Options::default()
    });
    let text = doc.get_or_insert_text("text");
    for (index, delete, insert) in patches {
        let mut txn = doc.transact_mut();
        if *delete > 0 {
            text.remove_range(&mut txn, *index as u32, *delete as u32);
        }
        if !insert.is_empty() {
            text.insert(&mut txn, *index as u32, insert);
        }
        // The engine encodes each change for its outbox; so does a Yjs app for its provider.
        std::hint::black_box(txn.encode_update_v1());
    }
    doc
}
