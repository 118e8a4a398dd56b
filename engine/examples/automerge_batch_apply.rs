//! What applying remote keystrokes together saves Automerge: 8 writers each type one character
//! concurrently, and a server document applies the 8 changes either one `load_incremental` each
//! or all in one (what `DocSync::receive_many` does with messages queued for a document),
//! alternating between the two as the text grows. Automerge only, no Accord code.
//!
//! Run: `cargo run --release -p accord-engine --example automerge_batch_apply`.

use std::time::Instant;

use automerge::{transaction::Transactable, ActorId, AutoCommit, ObjType, ReadDoc, ROOT};

fn main() {
    const WRITERS: usize = 8;
    let mut server = AutoCommit::new();
    let text = server
        .put_object(ROOT, "text", ObjType::Text)
        .expect("text");
    let mut writers: Vec<AutoCommit> = (0..WRITERS)
        .map(|i| {
            server
                .fork()
                .with_actor(ActorId::from(vec![i as u8 + 1; 16]))
        })
        .collect();
    let mut length = 0usize;
    println!("| text length | 8 changes one by one (µs) | 8 changes in one apply (µs) |");
    println!("|---|---|---|");
    for target in [800usize, 1_600, 3_200, 6_400] {
        let (mut apart, mut together, mut rounds_apart, mut rounds_together) = (0.0, 0.0, 0, 0);
        while length < target {
            let mut chunks = Vec::new();
            for writer in writers.iter_mut() {
                let end = writer.length(&text);
                writer.splice_text(&text, end, 0, "a").expect("splice");
                writer.commit();
                chunks.push(writer.save_incremental());
            }
            let started = Instant::now();
            if (length / WRITERS).is_multiple_of(2) {
                server.load_incremental(&chunks.concat()).expect("apply");
                together += started.elapsed().as_secs_f64();
                rounds_together += 1;
            } else {
                for chunk in &chunks {
                    server.load_incremental(chunk).expect("apply");
                }
                apart += started.elapsed().as_secs_f64();
                rounds_apart += 1;
            }
            length += WRITERS;
            let everything = server.save_incremental();
            for writer in writers.iter_mut() {
                writer.load_incremental(&everything).expect("catch up");
            }
        }
        println!(
            "| {target} | {:.0} | {:.0} |",
            apart / f64::from(rounds_apart.max(1)) * 1e6,
            together / f64::from(rounds_together.max(1)) * 1e6
        );
    }
}
