//! How a changed path relates to the guarded collections and values, decided once per pair of
//! paths where it can be.
//!
//! After every commit the reconciler asks, for every changed map and every collection, whether
//! the map is the collection, lies inside one of its entries, or is an ancestor of it; and for
//! every value rule whether the change reaches its value. Comparing the paths segment by segment
//! each time was most of an observation's own cost. A Yrs document reports changes to a
//! collection it was asked to track with the collection's own `Arc<Path>`
//! ([`crate::Document::track_entries`]), so those paths are recognised by pointer and their
//! relations read from a table built when the reconciler is made; any other path is compared
//! as before, with the same functions.

use std::sync::Arc;

use crate::doc::{overlaps, Path, Segment, Touched};

/// How a changed map (or value) at some path relates to a collection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Relation {
    /// It is the collection: its keys are the collection's entries.
    Same,
    /// It lies inside the collection, in the entry named by its next segment.
    Inside,
    /// It is an ancestor of the collection: the collection is replaced when the key on the way
    /// to it changes.
    Above,
    /// Neither.
    Unrelated,
}

/// How the path `path` relates to the collection at `at`.
pub(crate) fn relate(path: &[Segment], at: &[Segment]) -> Relation {
    let common = path.iter().zip(at).take_while(|(a, b)| a == b).count();
    if common == at.len() {
        if path.len() == at.len() {
            Relation::Same
        } else {
            Relation::Inside
        }
    } else if common == path.len() {
        Relation::Above
    } else {
        Relation::Unrelated
    }
}

/// Whether changed keys of the map at some path reach the value at a rule's path.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Reach {
    /// Whatever key changed.
    Always,
    /// Only through this key.
    Key(String),
    /// Never.
    Never,
}

/// Whether a change to key `key` of the map at `map` may have changed the value at `value`
/// (as [`overlaps`] decides it), for every key at once.
fn reach(map: &[Segment], value: &[Segment]) -> Reach {
    if value.len() <= map.len() {
        return if map.starts_with(value) {
            Reach::Always
        } else {
            Reach::Never
        };
    }
    match &value[map.len()] {
        Segment::Key(next) if value.starts_with(map) => Reach::Key(next.clone()),
        _ => Reach::Never,
    }
}

/// The relations of the collections' own paths to every collection and every value rule,
/// computed once (see the [module docs](self)).
pub(crate) struct Layout {
    /// The collections' paths: the very `Arc`s the document is given to track.
    paths: Vec<Arc<Path>>,
    /// `relations[i * n + c]`: how collection `i`'s path relates to collection `c`.
    relations: Vec<Relation>,
    /// `reaches[r * n + i]`: whether keys of collection `i` reach value path `r`.
    reaches: Vec<Reach>,
    /// The value paths, in the order they were given.
    values: Vec<Path>,
}

impl Layout {
    /// The layout of the collections at `paths` and the values at `values`.
    pub fn new(paths: Vec<Arc<Path>>, values: Vec<Path>) -> Self {
        let relations = paths
            .iter()
            .flat_map(|i| paths.iter().map(|c| relate(i.segments(), c.segments())))
            .collect();
        let reaches = values
            .iter()
            .flat_map(|value| paths.iter().map(|i| reach(i.segments(), value.segments())))
            .collect();
        Self {
            paths,
            relations,
            reaches,
            values,
        }
    }

    /// Which collection's own path `path` is, by pointer.
    pub fn which(&self, path: &Arc<Path>) -> Option<usize> {
        self.paths.iter().position(|p| Arc::ptr_eq(p, path))
    }

    /// How the map at `path` relates to collection `c`; `exact` is [`Layout::which`] of it.
    pub fn relation(&self, exact: Option<usize>, path: &[Segment], c: usize) -> Relation {
        let n = self.paths.len();
        match exact.and_then(|i| self.relations.get(i * n + c)) {
            Some(relation) => *relation,
            None => self
                .paths
                .get(c)
                .map_or(Relation::Unrelated, |at| relate(path, at.segments())),
        }
    }

    /// Whether the change `t` may have changed the value at value path `r` (nothing if there is
    /// no such path); `exact` is [`Layout::which`] of its path.
    pub fn touches(&self, t: &Touched, exact: Option<usize>, r: usize) -> bool {
        let Some(path) = self.values.get(r) else {
            return false;
        };
        let n = self.paths.len();
        let known = exact
            .filter(|_| !t.keys.is_empty())
            .and_then(|i| self.reaches.get(r * n + i));
        match known {
            Some(Reach::Always) => true,
            Some(Reach::Never) => false,
            Some(Reach::Key(next)) => t.keys.iter().any(|k| *k.key == **next),
            None if t.keys.is_empty() => overlaps(t.path.segments(), None, path.segments()),
            None => t
                .keys
                .iter()
                .any(|k| overlaps(t.path.segments(), Some(&k.key), path.segments())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc::TouchedKey;

    /// Paths that relate in every way: nested collections, siblings, a list on the way.
    fn paths() -> Vec<Path> {
        vec![
            Path::keys(["trip"]),
            Path::keys(["trip", "bookings"]),
            Path::keys(["trip", "bookings", "b1"]),
            Path::keys(["trip", "bookings", "b1", "seat"]),
            Path::keys(["trip", "payments"]),
            Path::keys(["trip", "status"]),
            Path::keys(["wallet", "entries"]),
            Path::keys(["trip"]).index(0).key("x"),
            Path::keys(["trip"]).index(1),
        ]
    }

    /// What the reconciler computed for every pair before the table: the prefix, then the
    /// cases (kept here as the reference the table must agree with).
    fn reference(path: &[Segment], at: &[Segment]) -> Relation {
        let common = path.iter().zip(at).take_while(|(a, b)| a == b).count();
        let inside = common == at.len();
        let above = common == path.len() && path.len() < at.len();
        match (inside, above) {
            (true, _) if path.len() == at.len() => Relation::Same,
            (true, _) => Relation::Inside,
            (false, true) => Relation::Above,
            (false, false) => Relation::Unrelated,
        }
    }

    #[test]
    fn the_table_agrees_with_comparing_the_paths() {
        let paths = paths();
        let shared: Vec<Arc<Path>> = paths.iter().cloned().map(Arc::new).collect();
        let layout = Layout::new(shared.clone(), paths.clone());
        let keys = ["b1", "bookings", "status", "x", "seat", "payments"];
        for (i, p) in shared.iter().enumerate() {
            assert_eq!(layout.which(p), Some(i));
            // The same path in another allocation is not recognised: it is compared instead.
            let copy = Arc::new(Path::clone(p));
            assert_eq!(layout.which(&copy), None);
            for (c, at) in paths.iter().enumerate() {
                let expected = reference(p.segments(), at.segments());
                assert_eq!(layout.relation(Some(i), p.segments(), c), expected);
                assert_eq!(layout.relation(None, p.segments(), c), expected);
            }
            for (r, value) in paths.iter().enumerate() {
                for key in keys {
                    let t = Touched {
                        path: p.clone(),
                        keys: smallvec::smallvec![TouchedKey {
                            key: Arc::from(key),
                            fields: None,
                        }],
                    };
                    let expected = overlaps(p.segments(), Some(key), value.segments());
                    assert_eq!(
                        layout.touches(&t, Some(i), r),
                        expected,
                        "{p} {key} {value}"
                    );
                    assert_eq!(layout.touches(&t, None, r), expected);
                }
            }
        }
    }
}
