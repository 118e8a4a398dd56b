//! The cost of the invariant layer on commit throughput: one change (a new ledger entry and a
//! new booking) applied to documents holding 1,000, 10,000 and 100,000 entries, with and
//! without the reconciler observing after it. The per-change cost must not grow with the
//! document. Run: `cargo bench -p accord-engine --bench invariants`.

mod support;

use accord_engine::invariant::{Reconciler, Schema};
use accord_engine::{DocKind, DocumentId};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use support::invariant_trip::{change, document, SCHEMA};

fn bench(c: &mut Criterion) {
    let schema = Schema::from_json(SCHEMA).expect("schema");
    for kind in [DocKind::Automerge, DocKind::Yrs] {
        let mut group = c.benchmark_group(format!("commit one change ({kind})"));
        group.sample_size(20);
        for entries in [1_000usize, 10_000, 100_000] {
            let mut plain = document(kind, entries);
            let mut i = 0;
            group.bench_with_input(
                BenchmarkId::new("without invariants", entries),
                &entries,
                |b, _| {
                    b.iter(|| {
                        i += 1;
                        plain.apply_ops(&change(i)).expect("change")
                    })
                },
            );
            let mut checked = document(kind, entries);
            let mut reconciler = Reconciler::new(
                &schema,
                DocumentId::from_bytes([1; 16]),
                kind,
                "server",
                true,
            );
            assert!(reconciler.observe(&mut checked, Some(1), &[]).is_empty());
            let mut seq = 1;
            group.bench_with_input(
                BenchmarkId::new("with all five invariants", entries),
                &entries,
                |b, _| {
                    b.iter(|| {
                        seq += 1;
                        let applied = checked.apply_ops(&change(seq as usize)).expect("change");
                        // As the server does: the change just committed is named.
                        let ids: Vec<_> = applied.iter().map(|c| c.id).collect();
                        let violations = reconciler.observe(&mut checked, Some(seq), &ids);
                        assert!(violations.is_empty());
                        applied
                    })
                },
            );
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
