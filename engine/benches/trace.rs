//! Replays the automerge-paper editing trace (../shared/data/traces/automerge-paper.json.gz) into
//! each CRDT kind through the engine's JSON API and directly through automerge / yrs, so the
//! engine's overhead shows as a ratio; then syncs the finished document to an empty replica.
//!
//! Run: `cargo bench -p accord-engine --bench trace`. Set `ACCORD_TRACES` to the traces folder
//! when it is not at `../shared/data/traces` relative to the workspace root.

use std::io::Read;
use std::path::PathBuf;

use accord_engine::replica::{Replica, ReplicaConfig};
use accord_engine::storage::MemoryStorage;
use accord_engine::{DocKind, Document, DocumentId, Op, Path, PeerId, ReplicaId};
use automerge::transaction::Transactable;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use yrs::{GetString, Text, Transact};

/// One patch: position (UTF-16 units; the trace is ASCII so code points equal them), deleted
/// count, inserted text.
type Patch = (usize, usize, String);

fn traces_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("ACCORD_TRACES") {
        return PathBuf::from(dir);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/traces")
}

fn load_trace() -> Option<(Vec<Patch>, String)> {
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

fn doc_id() -> DocumentId {
    DocumentId::from_bytes([1; 16])
}

fn engine_replay(kind: DocKind, patches: &[Patch]) -> Document {
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
fn automerge_replay(patches: &[Patch], with_bytes: bool) -> automerge::AutoCommit {
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

fn yrs_replay(patches: &[Patch]) -> yrs::Doc {
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

fn sync_to_empty(kind: DocKind, source: &[u8]) -> usize {
    let mut a = Replica::open(
        MemoryStorage::new(),
        ReplicaId::from_bytes([1; 16]),
        ReplicaConfig::default(),
    )
    .expect("replica");
    a.create(doc_id(), kind).expect("create");
    a.document(doc_id())
        .expect("doc")
        .apply_changes(source)
        .expect("load");
    let mut b = Replica::open(
        MemoryStorage::new(),
        ReplicaId::from_bytes([2; 16]),
        ReplicaConfig::default(),
    )
    .expect("replica");
    a.connect_peer(PeerId(2));
    b.connect_peer(PeerId(1));
    a.sync_document(PeerId(2), doc_id()).expect("sync");
    let mut bytes = 0;
    loop {
        let mut moved = false;
        while let Some(t) = a.poll_transmit() {
            bytes += t.frame.len();
            b.handle_frame(PeerId(1), &t.frame).expect("frame");
            moved = true;
        }
        while let Some(t) = b.poll_transmit() {
            bytes += t.frame.len();
            a.handle_frame(PeerId(2), &t.frame).expect("frame");
            moved = true;
        }
        if !moved {
            break;
        }
    }
    bytes
}

fn bench(c: &mut Criterion) {
    let Some((patches, end)) = load_trace() else {
        eprintln!(
            "SKIPPED: automerge-paper trace not found under {} (set ACCORD_TRACES)",
            traces_dir().display()
        );
        return;
    };
    // Correctness first: every path ends with the trace's final text.
    for kind in [DocKind::Automerge, DocKind::Yrs] {
        let doc = engine_replay(kind, &patches);
        assert_eq!(doc.to_json()["text"].as_str(), Some(end.as_str()), "{kind}");
    }
    let direct = yrs_replay(&patches);
    let text = direct.get_or_insert_text("text");
    assert_eq!(text.get_string(&direct.transact()), end, "yrs direct");

    let mut group = c.benchmark_group("automerge-paper replay");
    group.sample_size(10);
    group.bench_function("automerge direct, in memory only", |b| {
        b.iter(|| automerge_replay(&patches, false))
    });
    group.bench_function("automerge direct, with change bytes", |b| {
        b.iter(|| automerge_replay(&patches, true))
    });
    group.bench_function("automerge via engine", |b| {
        b.iter(|| engine_replay(DocKind::Automerge, &patches))
    });
    group.bench_function("yrs direct", |b| b.iter(|| yrs_replay(&patches)));
    group.bench_function("yrs via engine", |b| {
        b.iter(|| engine_replay(DocKind::Yrs, &patches))
    });
    group.finish();

    let mut group = c.benchmark_group("sync finished document to an empty replica");
    group.sample_size(10);
    for kind in [DocKind::Automerge, DocKind::Yrs] {
        let snapshot = engine_replay(kind, &patches).save();
        let bytes = sync_to_empty(kind, &snapshot);
        eprintln!(
            "{kind}: snapshot {} bytes, sync moved {bytes} bytes",
            snapshot.len()
        );
        group.bench_function(kind.to_string(), |b| {
            b.iter_batched(
                || (),
                |_| sync_to_empty(kind, &snapshot),
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
