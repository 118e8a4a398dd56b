//! Replays the automerge-paper editing trace (../shared/data/traces/automerge-paper.json.gz) into
//! each CRDT kind through the engine's JSON API and directly through automerge / yrs, so the
//! engine's overhead shows as a ratio; then syncs the finished document to an empty replica.
//!
//! Run: `cargo bench -p accord-engine --bench trace`. Set `ACCORD_TRACES` to the traces folder
//! when it is not at `../shared/data/traces` relative to the workspace root.

mod support;

use accord_engine::replica::{Replica, ReplicaConfig};
use accord_engine::storage::MemoryStorage;
use accord_engine::{DocKind, PeerId, ReplicaId};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use support::trace_replay::{
    automerge_replay, doc_id, engine_replay, load_trace, traces_dir, yrs_replay,
};
use yrs::{GetString, Transact};

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
