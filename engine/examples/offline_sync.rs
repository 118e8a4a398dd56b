//! Two replicas (Ana's phone and Ben's laptop) edit a shared trip offline, then sync directly
//! with each other and print the merged state. Run: `cargo run -p accord-engine --example offline_sync`.

use accord_engine::replica::{Replica, ReplicaConfig, Transmit};
use accord_engine::storage::MemoryStorage;
use accord_engine::{DocKind, DocumentId, Op, Path, PeerId, ReplicaId};
use serde_json::json;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let trip = DocumentId::from_bytes([7; 16]);
    let mut ana = Replica::open(
        MemoryStorage::new(),
        ReplicaId::from_bytes([1; 16]),
        ReplicaConfig::default(),
    )?;
    let mut ben = Replica::open(
        MemoryStorage::new(),
        ReplicaId::from_bytes([2; 16]),
        ReplicaConfig::default(),
    )?;
    ana.create(trip, DocKind::Automerge)?;
    ana.change(
        trip,
        &[
            Op::Put {
                path: Path::keys(["trip"]),
                value: json!({"status": "planning", "seats": {}}),
            },
            Op::Splice {
                path: Path::keys(["trip", "notes"]),
                index: 0,
                delete: 0,
                insert: "Pack light.".into(),
            },
        ],
    )?;
    exchange(&mut ana, &mut ben, trip)?;

    // Offline: both edit.
    ana.change(
        trip,
        &[Op::Put {
            path: Path::keys(["trip", "seats", "12A"]),
            value: json!("ana"),
        }],
    )?;
    ana.change(
        trip,
        &[Op::Splice {
            path: Path::keys(["trip", "notes"]),
            index: 0,
            delete: 0,
            insert: "Ana: ".into(),
        }],
    )?;
    ben.change(
        trip,
        &[Op::Put {
            path: Path::keys(["trip", "seats", "12B"]),
            value: json!("ben"),
        }],
    )?;
    ben.change(
        trip,
        &[Op::Splice {
            path: Path::keys(["trip", "notes"]),
            index: 11,
            delete: 0,
            insert: " Ben: bring snacks.".into(),
        }],
    )?;

    // Back online.
    exchange(&mut ana, &mut ben, trip)?;
    let (a, b) = (ana.json(trip)?, ben.json(trip)?);
    println!("Ana sees: {a}\nBen sees: {b}\nidentical: {}", a == b);
    Ok(())
}

/// Connects the two replicas and passes frames until both are quiet, then disconnects.
fn exchange(
    ana: &mut Replica<MemoryStorage>,
    ben: &mut Replica<MemoryStorage>,
    document: DocumentId,
) -> Result<(), Box<dyn std::error::Error>> {
    ana.connect_peer(PeerId(2));
    ben.connect_peer(PeerId(1));
    ana.sync_document(PeerId(2), document)?;
    if ben.contains(document) {
        ben.sync_document(PeerId(1), document)?;
    }
    loop {
        let to_ben: Vec<Transmit> = std::iter::from_fn(|| ana.poll_transmit()).collect();
        let to_ana: Vec<Transmit> = std::iter::from_fn(|| ben.poll_transmit()).collect();
        if to_ben.is_empty() && to_ana.is_empty() {
            break;
        }
        for t in to_ben {
            ben.handle_frame(PeerId(1), &t.frame)?;
        }
        for t in to_ana {
            ana.handle_frame(PeerId(2), &t.frame)?;
        }
    }
    ana.disconnect(PeerId(2));
    ben.disconnect(PeerId(1));
    Ok(())
}
