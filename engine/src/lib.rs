//! Accord's engine: the library every replica embeds.
//!
//! It is sans-IO: it takes bytes and time in and gives bytes and events out. It knows nothing of
//! sockets, threads, the wall clock or unseeded randomness, so the server, native apps, the
//! browser (WASM) and deterministic tests all drive the same code.
//!
//! - [`doc`]: one document API over Automerge and Yrs.
//! - [`protocol`]: the versioned wire protocol, its frames and the size-limited decoder.
//! - [`sync`]: per-peer, per-document sync state for both CRDT kinds.
//! - [`storage`]: the storage trait, an in-memory store and (not on wasm32) SQLite.
//! - [`replica`]: a replica holding many documents, with its outbox, driven sans-IO.

#![deny(missing_docs)]

pub mod doc;
pub mod ids;
pub mod invariant;
pub mod protocol;
pub mod replica;
pub mod storage;
pub mod sync;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

/// How many cases each property test runs: `ACCORD_PROPTEST_CASES` when set (to run them harder,
/// as the README says), else the test's own `default`.
#[cfg(test)]
pub(crate) fn proptest_cases(default: u32) -> u32 {
    std::env::var("ACCORD_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub use doc::{Change, ChangeId, DocError, DocKind, Document, Op, Path, Segment, Version};
pub use ids::{ConnectionId, DocumentId, PeerId, ReplicaId};
