//! The bookkeeping of a list-then-watch source, shared by the cluster's watches and the
//! standalone folder: a list (a watch's initial list or re-list, or one reading of the folder)
//! names every object of a kind that exists, so whatever was known before it and is not named
//! by it has gone away.

use std::collections::{HashMap, HashSet};

use crate::object::ObjectKey;

/// The objects of one kind that one source has shown, each with what the source keeps of it
/// (`V`), and the list under way, if any.
#[derive(Debug)]
pub struct Relist<V> {
    known: HashMap<ObjectKey, V>,
    /// The keys named by the list under way; `None` outside a list, and during a list that
    /// began with nothing known (nothing can have gone away then).
    listed: Option<HashSet<ObjectKey>>,
    /// Whether a list has been completed.
    synced: bool,
}

impl<V> Default for Relist<V> {
    fn default() -> Self {
        Relist {
            known: HashMap::new(),
            listed: None,
            synced: false,
        }
    }
}

impl<V> Relist<V> {
    /// A list begins: from now until [`Relist::finish`] every existing object is applied.
    pub fn begin(&mut self) {
        self.listed = (!self.known.is_empty()).then(HashSet::new);
    }

    /// An object exists (listed or changed); returns what was kept of it before.
    pub fn apply(&mut self, key: ObjectKey, value: V) -> Option<V> {
        if let Some(listed) = &mut self.listed {
            listed.insert(key.clone());
        }
        self.known.insert(key, value)
    }

    /// An object was deleted; returns what was kept of it.
    pub fn delete(&mut self, key: &ObjectKey) -> Option<V> {
        self.known.remove(key)
    }

    /// The list is complete: forgets and returns every object known before it that it did not
    /// name, sorted by key.
    pub fn finish(&mut self) -> Vec<(ObjectKey, V)> {
        self.synced = true;
        let Some(listed) = self.listed.take() else {
            return Vec::new();
        };
        let stale: Vec<ObjectKey> = self
            .known
            .keys()
            .filter(|key| !listed.contains(*key))
            .cloned()
            .collect();
        let mut gone: Vec<(ObjectKey, V)> = stale
            .into_iter()
            .filter_map(|key| self.known.remove(&key).map(|value| (key, value)))
            .collect();
        gone.sort_by(|a, b| a.0.cmp(&b.0));
        gone
    }

    /// Whether a list has been completed (the source has shown everything once).
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// What is kept of an object.
    pub fn get(&self, key: &ObjectKey) -> Option<&V> {
        self.known.get(key)
    }

    /// Every known object, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&ObjectKey, &V)> {
        self.known.iter()
    }

    /// Number of known objects.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    /// Whether no object is known.
    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ObjectKey {
        ObjectKey::new("ns", name)
    }

    #[test]
    fn a_relist_forgets_what_it_does_not_name() {
        let mut relist = Relist::default();
        relist.begin();
        assert_eq!(relist.apply(key("a"), 1), None);
        relist.apply(key("b"), 2);
        assert!(relist.finish().is_empty(), "a first list removes nothing");
        assert!(relist.is_synced());

        relist.begin();
        assert_eq!(relist.apply(key("b"), 3), Some(2));
        relist.apply(key("c"), 4);
        assert_eq!(relist.finish(), [(key("a"), 1)]);
        assert_eq!(relist.len(), 2);
        assert_eq!(relist.get(&key("b")), Some(&3));
    }

    #[test]
    fn changes_between_lists_remove_nothing_at_the_next_finish() {
        let mut relist = Relist::default();
        relist.begin();
        relist.apply(key("a"), ());
        relist.finish();
        relist.apply(key("b"), ());
        assert_eq!(relist.delete(&key("a")), Some(()));
        assert!(relist.finish().is_empty(), "no list under way");
        assert_eq!(relist.len(), 1);
    }

    #[test]
    fn an_empty_relist_forgets_everything() {
        let mut relist = Relist::default();
        relist.apply(key("a"), ());
        relist.apply(key("b"), ());
        relist.begin();
        let gone: Vec<ObjectKey> = relist.finish().into_iter().map(|(k, ())| k).collect();
        assert_eq!(gone, [key("a"), key("b")]);
        assert!(relist.is_empty());
    }
}
