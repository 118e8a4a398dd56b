//! The engine's overhead on the automerge-paper trace, measured in one process with the runs
//! interleaved (steadier than criterion on a busy machine): each round replays the whole trace
//! once directly through the CRDT crate and once through the engine's JSON API, for each kind,
//! and the medians are compared. "Direct" takes each change's bytes after every edit, as any
//! app must to persist or send it (and as the engine does to store the change and fill the
//! outbox); the in-memory-only Automerge figure is printed too.
//!
//! Run: `cargo run --release -p accord-engine --example trace_overhead [rounds]` (default 3).

use std::time::{Duration, Instant};

#[path = "../benches/support/trace_replay.rs"]
#[allow(dead_code)] // the bench uses the rest
mod trace_replay;

use accord_engine::DocKind;
use trace_replay::{automerge_replay, engine_replay, load_trace, yrs_replay};

/// Times `f`, dropping what it built only after the clock stops.
fn timed<T>(f: impl FnOnce() -> T) -> Duration {
    let start = Instant::now();
    let built = std::hint::black_box(f());
    let elapsed = start.elapsed();
    drop(built);
    elapsed
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let Some((patches, _)) = load_trace() else {
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
        am_mem.push(timed(|| automerge_replay(&patches, false)));
        am_bytes.push(timed(|| automerge_replay(&patches, true)));
        am_engine.push(timed(|| engine_replay(DocKind::Automerge, &patches)));
        y_direct.push(timed(|| yrs_replay(&patches)));
        y_engine.push(timed(|| engine_replay(DocKind::Yrs, &patches)));
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
