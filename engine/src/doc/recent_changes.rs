//! The bytes of the Automerge changes a document has just received or made, by hash.
//!
//! Automerge 0.12 keeps no change as bytes: whenever one is asked for (`get_changes`, and
//! `generate_sync_message` for every change it sends) it is rebuilt from the op set, a walk of
//! the ops in the change's counter range. A relay asks for the same few new changes twice for
//! every peer it forwards them to (once to report them, once per peer's sync message), so the
//! changes it has just received or made are kept here as they came, while they are likely to be
//! sent on: bounded in count and bytes (the oldest go first), and all dropped when the
//! document's peers are up to date ([`RecentChanges::clear`]). A change that is not here is
//! rebuilt by Automerge, as before: this only saves time.

use std::collections::VecDeque;

use automerge::ChangeHash;

use super::change_hash_set::ChangeHashMap;

/// At most this many changes are kept.
pub(crate) const MAX_CHANGES: usize = 8_192;
/// At most this many bytes of changes are kept.
pub(crate) const MAX_BYTES: usize = 4 << 20;
/// A change larger than this is not kept (it would push out hundreds of small ones).
pub(crate) const MAX_CHANGE_BYTES: usize = MAX_BYTES / 16;

/// Recently seen changes' bytes, by hash; bounded, oldest dropped first.
#[derive(Default)]
pub(crate) struct RecentChanges {
    by_hash: ChangeHashMap<ChangeHash, Vec<u8>>,
    /// Insertion order, for dropping the oldest.
    order: VecDeque<ChangeHash>,
    bytes: usize,
}

impl RecentChanges {
    /// Keeps the bytes of the change `hash` (the whole uncompressed chunk, as Automerge encodes
    /// it). The caller vouches that `bytes` are that change.
    pub(crate) fn insert(&mut self, hash: ChangeHash, bytes: &[u8]) {
        if bytes.len() > MAX_CHANGE_BYTES || self.by_hash.contains_key(&hash) {
            return;
        }
        while self.order.len() >= MAX_CHANGES || self.bytes + bytes.len() > MAX_BYTES {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(dropped) = self.by_hash.remove(&oldest) {
                self.bytes -= dropped.len();
            }
        }
        self.bytes += bytes.len();
        self.order.push_back(hash);
        self.by_hash.insert(hash, bytes.to_vec());
    }

    /// The bytes of the change `hash`, if kept.
    pub(crate) fn get(&self, hash: &ChangeHash) -> Option<&[u8]> {
        self.by_hash.get(hash).map(Vec::as_slice)
    }

    /// Drops everything, memory included.
    pub(crate) fn clear(&mut self) {
        *self = Self::default();
    }

    /// How many changes are kept.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }

    /// How many bytes of changes are kept.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(i: usize) -> ChangeHash {
        let mut h = [0u8; 32];
        h[..8].copy_from_slice(&(i as u64).to_le_bytes());
        ChangeHash(h)
    }

    #[test]
    fn the_count_limit_drops_the_oldest() {
        let mut recent = RecentChanges::default();
        for i in 0..MAX_CHANGES + 10 {
            recent.insert(hash(i), &[i as u8; 10]);
        }
        assert_eq!(recent.len(), MAX_CHANGES);
        assert_eq!(recent.bytes(), MAX_CHANGES * 10);
        assert!(recent.get(&hash(9)).is_none(), "the oldest went first");
        assert_eq!(recent.get(&hash(10)), Some(&[10u8; 10][..]));
        assert!(recent.get(&hash(MAX_CHANGES + 9)).is_some());
    }

    #[test]
    fn the_byte_limit_drops_the_oldest_and_large_changes_are_not_kept() {
        let mut recent = RecentChanges::default();
        let size = MAX_CHANGE_BYTES;
        for i in 0..20 {
            recent.insert(hash(i), &vec![1u8; size]);
        }
        assert!(recent.bytes() <= MAX_BYTES);
        assert_eq!(recent.len(), MAX_BYTES / size);
        assert!(recent.get(&hash(0)).is_none());
        assert!(recent.get(&hash(19)).is_some());
        recent.insert(hash(100), &vec![1u8; MAX_CHANGE_BYTES + 1]);
        assert!(recent.get(&hash(100)).is_none(), "too large to keep");
        recent.clear();
        assert_eq!((recent.len(), recent.bytes()), (0, 0));
    }

    #[test]
    fn a_change_kept_twice_counts_once() {
        let mut recent = RecentChanges::default();
        recent.insert(hash(1), &[1, 2, 3]);
        recent.insert(hash(1), &[1, 2, 3]);
        assert_eq!((recent.len(), recent.bytes()), (1, 3));
    }
}
