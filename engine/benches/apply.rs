//! What a relay pays to take one remote keystroke into an Automerge text of 1,000, 10,000 and
//! 100,000 characters (one change per character): Automerge 0.12's `load_incremental` (it walks
//! the whole text per apply), a copy of the document (what applying to a copy, so that a
//! panicking apply leaves the document as it was, would add to every apply; `doc::automerge_apply`
//! keeps a checkpoint instead), and the engine's whole path (`Document::apply_changes`: the
//! checkpoint's upkeep, the apply, the recent-change caches). Run: `cargo bench -p
//! accord-engine --bench apply`.

use std::time::Duration;

use accord_engine::{DocKind, Document, DocumentId, ReplicaId};
use automerge::transaction::Transactable;
use automerge::{AutoCommit, ObjType, ReadDoc, ROOT};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};

/// A writer that typed `chars` characters, one change each, and a receiver that holds them.
fn pair(chars: usize) -> (AutoCommit, AutoCommit, automerge::ObjId) {
    let mut writer = AutoCommit::new();
    let text = writer
        .put_object(ROOT, "text", ObjType::Text)
        .expect("text");
    writer.commit();
    for i in 0..chars {
        writer.splice_text(&text, i, 0, "x").expect("typed");
        writer.commit();
    }
    let receiver = AutoCommit::load(&writer.save()).expect("loaded");
    (writer, receiver, text)
}

/// The writer's next keystroke (at the end of the text), as the bytes a relay receives.
fn keystroke(writer: &mut AutoCommit, text: &automerge::ObjId) -> Vec<u8> {
    let heads = writer.get_heads();
    let end = writer.length(text);
    writer.splice_text(text, end, 0, "y").expect("typed");
    writer.commit();
    writer.save_after(&heads)
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("one remote keystroke into a text");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    for chars in [1_000usize, 10_000, 100_000] {
        let (mut writer, mut receiver, text) = pair(chars);
        let bytes = keystroke(&mut writer, &text);
        // Each iteration applies the same keystroke to its own copy of the receiver (made
        // before the clock starts), so every one finds a text of `chars` characters.
        group.bench_function(
            BenchmarkId::new("AutoCommit::load_incremental", chars),
            |b| {
                b.iter_batched_ref(
                    || receiver.clone(),
                    |copy| copy.load_incremental(&bytes).expect("applied"),
                    BatchSize::PerIteration,
                )
            },
        );
        // As a copy would be taken: with its patch log emptied (see `doc::automerge_apply`).
        receiver.reset_diff_cursor();
        group.bench_function(BenchmarkId::new("AutoCommit::clone and drop", chars), |b| {
            b.iter(|| drop(std::hint::black_box(receiver.clone())))
        });
        let id = DocumentId::from_bytes([1; 16]);
        let saved = receiver.save();
        group.bench_function(BenchmarkId::new("Document::apply_changes", chars), |b| {
            b.iter_batched_ref(
                || {
                    Document::load(
                        DocKind::Automerge,
                        ReplicaId::from_bytes([2; 16]),
                        id,
                        Some(&saved),
                        [],
                    )
                    .expect("loaded")
                },
                |document| document.apply_changes(&bytes).expect("applied"),
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
