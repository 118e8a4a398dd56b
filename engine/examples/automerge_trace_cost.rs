//! What one Automerge release costs on the automerge-paper trace: replaying it as local edits
//! (one change per 10 transactions), the memory that takes, saving, loading the save, and
//! listing every change. Automerge only, no Accord code, and nothing but `automerge`, `flate2`
//! and `serde_json`, so the file can be compiled unchanged against another Automerge release
//! (a scratch crate with `automerge = "=0.6.1"`, `flate2` and `serde_json`) to compare releases
//! side by side; BENCHMARKS.md does that for 0.6.1 against 0.12.
//!
//! Run: `cargo run --release -p accord-engine --example automerge_trace_cost [trace.json.gz]`
//! (default: `../shared/data/traces/automerge-paper.json.gz` next to the repository).

use std::io::Read;
use std::time::Instant;

use automerge::{transaction::Transactable, AutoCommit, ObjType, ReadDoc, ROOT};

/// The process's resident set, in KB (Linux; 0 elsewhere).
fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let path = std::env::args().nth(1).unwrap_or_else(|| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/data/traces/automerge-paper.json.gz"
        )
        .to_owned()
    });
    let mut gz = Vec::new();
    std::fs::File::open(&path)
        .and_then(|mut f| f.read_to_end(&mut gz))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut json = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut json)
        .expect("gzip");
    let trace: serde_json::Value = serde_json::from_str(&json).expect("trace JSON");
    drop(json);
    let txns = trace["txns"].as_array().expect("txns");

    let before = rss_kb();
    let started = Instant::now();
    let mut doc = AutoCommit::new();
    let text = doc.put_object(ROOT, "text", ObjType::Text).expect("text");
    for (i, txn) in txns.iter().enumerate() {
        for patch in txn["patches"].as_array().expect("patches") {
            let pos = patch[0].as_u64().expect("position") as usize;
            let del = patch[1].as_i64().expect("deleted") as isize;
            let ins = patch[2].as_str().expect("inserted");
            doc.splice_text(&text, pos, del, ins).expect("splice");
        }
        if i % 10 == 9 {
            doc.commit();
        }
    }
    doc.commit();
    println!(
        "replay: {:?}, resident +{} KB, {} characters",
        started.elapsed(),
        rss_kb().saturating_sub(before),
        doc.length(&text)
    );
    let started = Instant::now();
    let saved = doc.save();
    println!("save: {:?}, {} bytes", started.elapsed(), saved.len());
    drop(doc);
    let started = Instant::now();
    let mut loaded = AutoCommit::load(&saved).expect("load");
    println!("load: {:?}", started.elapsed());
    let started = Instant::now();
    let again = loaded.save();
    println!(
        "save after load: {:?}, {} bytes",
        started.elapsed(),
        again.len()
    );
    let started = Instant::now();
    let changes = loaded.get_changes(&[]).len();
    println!("all changes listed: {:?}, {changes}", started.elapsed());
}
