//! The cost of checking all five invariant kinds per commit, as medians of 2,000 alternating
//! apply / observe pairs on documents of 1,000, 10,000 and 100,000 entries (steadier than the
//! criterion bench on a busy machine). Run:
//! `cargo run --release -p accord-engine --example invariant_cost`.
//!
//! Two ratios are printed. `observe / apply`: the time of [`Reconciler::observe`] over the time
//! of the apply it follows, on the checked document. `all / bare`: everything the invariant
//! layer adds to a commit, over a bare commit: the same change is applied to a twin document that
//! has no reconciler (so no changed-path tracking either, whose cost falls inside the checked
//! document's apply), and the layer's cost is checked apply + observe - bare apply.

use accord_engine::invariant::{Reconciler, Schema};
#[path = "../benches/support/invariant_trip.rs"]
mod invariant_trip;

use accord_engine::{DocKind, DocumentId};
use invariant_trip::{change, document, SCHEMA};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let schema = Schema::from_json(SCHEMA).unwrap();
    for kind in [DocKind::Automerge, DocKind::Yrs] {
        for n in [1_000usize, 10_000, 100_000] {
            let mut bare = document(kind, n);
            let mut doc = document(kind, n);
            let mut rec = Reconciler::new(
                &schema,
                DocumentId::from_bytes([1; 16]),
                kind,
                "server",
                true,
            );
            assert!(rec.observe(&mut doc, Some(1), &[]).is_empty());
            let (mut a, mut o, mut b) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..2000usize {
                let t = Instant::now();
                bare.apply_ops(&change(i + 2)).unwrap().unwrap();
                b.push(t.elapsed().as_secs_f64() * 1e6);
                let t = Instant::now();
                let c = doc.apply_ops(&change(i + 2)).unwrap().unwrap();
                let t1 = Instant::now();
                let v = rec.observe(&mut doc, Some(i as u64 + 2), &[c.id]);
                let t2 = Instant::now();
                assert!(v.is_empty());
                a.push((t1 - t).as_secs_f64() * 1e6);
                o.push((t2 - t1).as_secs_f64() * 1e6);
            }
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
            let (ea, eo, eb) = (mean(&a), mean(&o), mean(&b));
            let (ma, mo, mb) = (median(a), median(o), median(b));
            println!(
                "{kind} n={n}: apply median {ma:.1} us, observe median {mo:.1} us ({:.0}%); \
                 bare apply median {mb:.1} us (all / bare {:.0}%)",
                100.0 * mo / ma,
                100.0 * (ma + mo - mb) / mb
            );
            println!(
                "    means: apply {ea:.1} us, observe {eo:.1} us ({:.0}%); bare apply {eb:.1} us \
                 (all / bare {:.0}%)",
                100.0 * eo / ea,
                100.0 * (ea + eo - eb) / eb
            );
        }
    }
}
