//! What it costs Automerge itself to apply one typed character from a peer, as the text grows:
//! the pattern of the typists benchmark (8 writers appending one character at a time, every
//! change applied by a server document with `load_incremental`, as the sync protocol does).
//! Automerge only, no Accord code: the floor under the server's per-keystroke CPU. Run:
//! `cargo run --release -p accord-engine --example automerge_apply_cost [writers]` (default 8).

use automerge::{transaction::Transactable, ActorId, AutoCommit, ObjType, ReadDoc, ROOT};
use std::time::Instant;

fn main() {
    let writers_n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(8);
    let mut server = AutoCommit::new();
    let text = server
        .put_object(ROOT, "text", ObjType::Text)
        .expect("text");
    let mut writers: Vec<AutoCommit> = (0..writers_n)
        .map(|i| {
            server
                .fork()
                .with_actor(ActorId::from(vec![i as u8 + 1; 16]))
        })
        .collect();
    let mut applied = 0usize;
    let mut spent = 0.0f64;
    println!("| text length | µs per change applied (mean of the last 800) |");
    println!("|---|---|");
    for report in [800usize, 1_600, 3_200, 6_400] {
        while applied < report {
            let w = applied % writers_n;
            let heads = writers[w].get_heads();
            let at = writers[w].length(&text);
            writers[w].splice_text(&text, at, 0, "x").expect("type");
            let change = writers[w].save_after(&heads);
            let started = Instant::now();
            server.load_incremental(&change).expect("apply");
            if applied + 800 >= report {
                spent += started.elapsed().as_secs_f64();
            }
            // The other writers see it too (they type after it, as real typists do).
            for (o, other) in writers.iter_mut().enumerate() {
                if o != w {
                    other.load_incremental(&change).expect("apply");
                }
            }
            applied += 1;
        }
        println!("| {report} | {:.0} |", spent / 800.0 * 1e6);
        spent = 0.0;
    }
}
