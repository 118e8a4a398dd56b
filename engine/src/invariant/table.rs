//! [`KeyedTable`]: the hash table behind the reconciler's per-collection caches.

use std::borrow::Borrow;
use std::hash::{BuildHasher, Hash};

use hashbrown::hash_table::{self, HashTable};

/// A map from `K` to `V` that keeps each key's hash next to it, for the tables keyed by entry
/// keys and claimed values, which are written after every commit and grow with the document.
///
/// hashbrown's `HashTable` rather than std's `HashMap`, which does not keep hashes: growing a
/// `HashMap` hashes every key again, and each key is a pointer to chase, so on large collections
/// the growth was the largest part of an observation's cost on the server (a cache miss per
/// entry); here slots move without reading keys. It also lets a lookup that misses and the
/// insert that follows be one probe. Hashed with foldhash (randomly seeded per process, so keys
/// chosen by clients cannot be aimed at collisions) rather than SipHash, which showed up in
/// profiles of the commit path. Keys are looked up by a borrowed form `Q` (a key `Arc<str>` by
/// `str`), which is what is hashed, so a key is always hashed as its borrowed form.
#[derive(Clone, Debug)]
pub(crate) struct KeyedTable<K, V> {
    table: HashTable<(u64, K, V)>,
    hasher: foldhash::quality::RandomState,
}

/// A slot of a [`KeyedTable`].
pub(crate) type Slot<'t, K, V> = hash_table::Entry<'t, (u64, K, V)>;

impl<K, V> Default for KeyedTable<K, V> {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl<K, V> KeyedTable<K, V> {
    /// An empty table with room for `capacity` keys.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            table: HashTable::with_capacity(capacity),
            hasher: foldhash::quality::RandomState::default(),
        }
    }

    fn hash<Q: Hash + ?Sized>(&self, key: &Q) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The value of `key`.
    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hash = self.hash(key);
        self.table
            .find(hash, |(h, k, _)| *h == hash && k.borrow() == key)
            .map(|(_, _, v)| v)
    }

    /// The slot of `key` (present or not) and its hash, in one probe. Slots are compared by
    /// hash before key, so a probe reads no key but the one it is looking for.
    pub fn entry<Q>(&mut self, key: &Q) -> (u64, Slot<'_, K, V>)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hash = self.hash(key);
        let entry = self.table.entry(
            hash,
            |(h, k, _)| *h == hash && k.borrow() == key,
            |(h, _, _)| *h,
        );
        (hash, entry)
    }

    /// The slot of `key` if present (never grows the table).
    pub fn find_entry<Q>(&mut self, key: &Q) -> Option<hash_table::OccupiedEntry<'_, (u64, K, V)>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hash = self.hash(key);
        self.table
            .find_entry(hash, |(h, k, _)| *h == hash && k.borrow() == key)
            .ok()
    }

    /// Every key and value, in table order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.table.iter().map(|(_, k, v)| (k, v))
    }

    /// Removes everything (keeps the memory).
    pub fn clear(&mut self) {
        self.table.clear();
    }
}

impl<V> KeyedTable<std::sync::Arc<str>, V> {
    /// Sets `key` to `value`.
    pub fn insert(&mut self, key: std::sync::Arc<str>, value: V) {
        match self.entry::<str>(&key) {
            (_, hash_table::Entry::Occupied(mut slot)) => slot.get_mut().2 = value,
            (hash, hash_table::Entry::Vacant(slot)) => {
                slot.insert((hash, key, value));
            }
        }
    }
}
