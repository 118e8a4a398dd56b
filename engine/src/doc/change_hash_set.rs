//! Hash sets and maps keyed by Automerge change hashes, hashed with foldhash.
//!
//! The sync protocol builds several such sets per message; hashed with the standard library's
//! SipHash they were a fifth of the relay's CPU at 128 typists. foldhash hashes the 32 bytes in
//! a few nanoseconds and is seeded per process, which matters: some of these sets hold hashes
//! copied from a peer's message (its heads, its last sync), not digests of changes we hold, so
//! a peer can send values that share any fixed part. Hashing only a prefix of them (as an
//! earlier version did, taking them for digests) let one message of colliding "hashes" stall a
//! document's actor for seconds.

use std::collections::{HashMap, HashSet};

/// Builds the hashers: foldhash, randomly seeded per process.
pub(crate) type HashState = foldhash::fast::RandomState;
/// A set of change hashes.
pub(crate) type ChangeHashSet<T> = HashSet<T, HashState>;
/// A map keyed by change hashes.
pub(crate) type ChangeHashMap<K, V> = HashMap<K, V, HashState>;

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::ChangeHash;

    #[test]
    fn sets_work_and_references_hash_as_their_targets() {
        let a = ChangeHash([1; 32]);
        let mut b = [1u8; 32];
        b[0] = 2;
        let b = ChangeHash(b);
        let set: ChangeHashSet<ChangeHash> = [a, b, a].into_iter().collect();
        assert_eq!(set.len(), 2);
        assert!(set.contains(&b));
        let refs: ChangeHashSet<&ChangeHash> = set.iter().collect();
        assert!(refs.contains(&&a));
    }

    #[test]
    fn hashes_a_peer_made_to_share_a_prefix_do_not_collide() {
        use std::hash::BuildHasher;
        // 50,000 "hashes" alike but for their last bytes (what a peer can send as its heads):
        // hashed by a prefix they would all fall in one bucket, and every set operation on them
        // would compare against all the others.
        let state = HashState::default();
        let hashes: HashSet<u64> = (0..50_000u32)
            .map(|i| {
                let mut h = [7u8; 32];
                h[28..].copy_from_slice(&i.to_le_bytes());
                state.hash_one(ChangeHash(h))
            })
            .collect();
        assert!(hashes.len() > 49_900, "{} distinct hashes", hashes.len());
    }
}
