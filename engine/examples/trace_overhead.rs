//! The engine's overhead on the automerge-paper trace, measured in one process with the runs
//! interleaved (steadier than criterion on a busy machine): each round replays the whole trace
//! once directly through the CRDT crate and once through the engine's JSON API, for each kind,
//! and the medians are compared. "Direct" takes each change's bytes after every edit, as any
//! app must to persist or send it (and as the engine does to store the change and fill the
//! outbox); the in-memory-only Automerge figure is printed too.
//!
//! Run: `cargo run --release -p accord-engine --example trace_overhead [rounds]` (default 3).

use std::io::Read;
use std::time::{Duration, Instant};

use accord_engine::{DocKind, Document, DocumentId, Op, Path, ReplicaId};
use automerge::transaction::Transactable;
use yrs::{Text, Transact};

type Patch = (usize, usize, String);

fn load() -> Option<Vec<Patch>> {
    let dir = std::env::var("ACCORD_TRACES")
        .unwrap_or_else(|_| format!("{}/../../shared/data/traces", env!("CARGO_MANIFEST_DIR")));
    let file = std::fs::File::open(format!("{dir}/automerge-paper.json.gz")).ok()?;
    let mut json = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut json)
        .ok()?;
    let value: serde_json::Value = serde_json::from_str(&json).ok()?;
    let mut out = Vec::new();
    for txn in value["txns"].as_array()? {
        for p in txn["patches"].as_array()? {
            out.push((
                p[0].as_u64()? as usize,
                p[1].as_u64()? as usize,
                p[2].as_str()?.to_owned(),
            ));
        }
    }
    Some(out)
}

fn automerge_direct(patches: &[Patch], with_bytes: bool) -> Duration {
    let start = Instant::now();
    let mut doc = automerge::AutoCommit::new_with_encoding(automerge::TextEncoding::Utf16CodeUnit);
    let Ok(text) = doc.put_object(automerge::ROOT, "text", automerge::ObjType::Text) else {
        return Duration::ZERO;
    };
    doc.commit();
    for (index, delete, insert) in patches {
        let _ = doc.splice_text(&text, *index, *delete as isize, insert);
        let hash = doc.commit();
        if with_bytes {
            if let Some(change) = hash.and_then(|h| doc.get_change_by_hash(&h)) {
                std::hint::black_box(change.raw_bytes());
            }
        }
    }
    start.elapsed()
}

fn yrs_direct(patches: &[Patch]) -> Duration {
    let start = Instant::now();
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
        std::hint::black_box(txn.encode_update_v1());
    }
    start.elapsed()
}

fn engine(kind: DocKind, patches: &[Patch]) -> Duration {
    let start = Instant::now();
    let mut doc = Document::new(
        kind,
        ReplicaId::from_bytes([1; 16]),
        DocumentId::from_bytes([1; 16]),
    );
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
    start.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let Some(patches) = load() else {
        eprintln!("SKIPPED: automerge-paper trace not found (set ACCORD_TRACES)");
        return;
    };
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    let (mut am_mem, mut am_bytes, mut am_engine, mut y_direct, mut y_engine) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        am_mem.push(automerge_direct(&patches, false));
        am_bytes.push(automerge_direct(&patches, true));
        am_engine.push(engine(DocKind::Automerge, &patches));
        y_direct.push(yrs_direct(&patches));
        y_engine.push(engine(DocKind::Yrs, &patches));
    }
    let (am_mem, am_bytes, am_engine) = (median(am_mem), median(am_bytes), median(am_engine));
    let (y_direct, y_engine) = (median(y_direct), median(y_engine));
    println!(
        "{} edits, median of {rounds} interleaved rounds",
        patches.len()
    );
    println!("automerge direct, in memory only : {am_mem:?}");
    println!("automerge direct, with change bytes: {am_bytes:?}");
    println!(
        "automerge via engine              : {am_engine:?}  ({:.2}x with bytes, {:.2}x in memory)",
        am_engine.as_secs_f64() / am_bytes.as_secs_f64(),
        am_engine.as_secs_f64() / am_mem.as_secs_f64()
    );
    println!("yrs direct (encodes each update)  : {y_direct:?}");
    println!(
        "yrs via engine                    : {y_engine:?}  ({:.2}x)",
        y_engine.as_secs_f64() / y_direct.as_secs_f64()
    );
}
