//! Hash sets and maps keyed by Automerge change hashes, hashed by their first eight bytes.
//!
//! A change hash is a SHA-256 digest: its first bytes are already as well spread as anything a
//! general-purpose hasher could make of them. Hashed with the standard library's SipHash (all
//! 32 bytes, every time), the sets the sync protocol builds per message were a fifth of the
//! relay's CPU at 128 typists. Written by hand because it is ten lines and no crate offers a
//! hasher for keys that are already digests. Crafting changes whose hashes share a prefix
//! costs a search of SHA-256 preimages, so this is no easier to flood than SipHash.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// A hasher for keys that are digests: it keeps the first eight bytes written.
#[derive(Default, Clone, Copy)]
pub(crate) struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut prefix = [0u8; 8];
        let n = bytes.len().min(8);
        prefix[..n].copy_from_slice(&bytes[..n]);
        self.0 = self.0.rotate_left(17) ^ u64::from_le_bytes(prefix);
    }

    fn write_usize(&mut self, n: usize) {
        // The length a slice's hash writes first.
        self.0 = self.0.rotate_left(17) ^ n as u64;
    }
}

/// Builds [`DigestHasher`]s.
pub(crate) type DigestState = BuildHasherDefault<DigestHasher>;
/// A set of change hashes.
pub(crate) type ChangeHashSet<T> = HashSet<T, DigestState>;
/// A map keyed by change hashes.
pub(crate) type ChangeHashMap<K, V> = HashMap<K, V, DigestState>;

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::ChangeHash;
    use std::hash::BuildHasher;

    #[test]
    fn digests_spread_by_their_prefix_and_sets_work() {
        let state = DigestState::default();
        let a = ChangeHash([1; 32]);
        let mut b = [1u8; 32];
        b[0] = 2;
        let b = ChangeHash(b);
        assert_ne!(state.hash_one(a), state.hash_one(b));
        let set: ChangeHashSet<ChangeHash> = [a, b, a].into_iter().collect();
        assert_eq!(set.len(), 2);
        assert!(set.contains(&b));
        let refs: ChangeHashSet<&ChangeHash> = set.iter().collect();
        assert!(refs.contains(&&a), "references hash as their targets");
    }
}
