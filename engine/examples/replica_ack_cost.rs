//! What one acknowledged write costs a replica's SQLite store that holds a document with a
//! large snapshot: each acknowledgement from the server records the document's last sequence
//! number (`SetLastSeq`) and a change is appended, in one durable transaction (fsync included).
//! Before schema 3 the snapshot lived in the row that `SetLastSeq` updates, and SQLite read it
//! back and compared it page by page on every acknowledgement. Run:
//! `cargo run --release -p accord-engine --example replica_ack_cost [snapshot bytes]`
//! (default 1 MiB; a temporary directory holds the database).

use accord_engine::storage::{Batch, SqliteStorage, Storage, Write};
use accord_engine::{DocKind, DocumentId};
use std::time::Instant;

fn main() {
    let size: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1 << 20);
    let dir = std::env::temp_dir().join(format!("replica-ack-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let mut storage = SqliteStorage::open(dir.join("replica.db")).expect("open");
    let document = DocumentId::from_bytes([1; 16]);
    let mut batch = Batch::default();
    batch.push(Write::CreateDocument {
        document,
        kind: DocKind::Yrs,
    });
    // Bytes that do not compress or repeat page to page, as an encoded document's do not.
    let snapshot = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    batch.push(Write::Snapshot {
        document,
        bytes: snapshot,
    });
    storage.write(&batch).expect("snapshot");
    let writes = 300u64;
    let start = Instant::now();
    for seq in 1..=writes {
        let mut batch = Batch::default();
        batch.push(Write::SetLastSeq { document, seq });
        batch.push(Write::AppendChange {
            document,
            bytes: vec![1, 2, 3],
        });
        storage.write(&batch).expect("write");
    }
    let micros = start.elapsed().as_secs_f64() * 1e6 / writes as f64;
    println!("snapshot of {size} bytes: {micros:.0} us per acknowledged write ({writes} writes)");
    drop(storage);
    let _ = std::fs::remove_dir_all(&dir);
}
