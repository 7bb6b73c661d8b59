//! Label sets: an alert's labels or annotations, held as one text buffer and a sorted index of
//! spans into it, rather than a map of separately allocated strings. An alert is parsed into
//! two such sets with a handful of allocations, read by many deliveries, and freed by another
//! thread than the one that parsed it: fewer, larger blocks make each of those cheaper.

use std::borrow::Cow;
use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Name/value pairs sorted by name, each name at most once: labels or annotations.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct LabelSet {
    /// Every name and value, back to back, in name order.
    text: Box<str>,
    /// Per pair: where its name starts, where its value starts (the name's end) and ends.
    spans: Box<[[u32; 3]]>,
}

impl LabelSet {
    /// An empty set.
    pub fn new() -> Self {
        LabelSet::default()
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether the set holds no pair.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    fn pair(&self, span: &[u32; 3]) -> (&str, &str) {
        let [name, value, end] = span.map(|at| at as usize);
        (&self.text[name..value], &self.text[value..end])
    }

    /// The name of a pair, as bytes (comparing them orders names as strings do).
    fn name_bytes(&self, span: &[u32; 3]) -> &[u8] {
        self.text
            .as_bytes()
            .get(span[0] as usize..span[1] as usize)
            .unwrap_or_default()
    }

    /// The value of a name.
    pub fn get(&self, name: &str) -> Option<&str> {
        let wanted = name.as_bytes();
        let span = if self.spans.len() <= 16 {
            // A few pairs: most names differ in length, which is checked first.
            self.spans.iter().find(|span| {
                (span[1] - span[0]) as usize == wanted.len() && self.name_bytes(span) == wanted
            })?
        } else {
            let at = self
                .spans
                .binary_search_by(|span| self.name_bytes(span).cmp(wanted))
                .ok()?;
            self.spans.get(at)?
        };
        self.text.get(span[1] as usize..span[2] as usize)
    }

    /// Whether the set has this name.
    pub fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The pairs, in name order.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            set: self,
            spans: self.spans.iter(),
        }
    }

    /// The names, in order.
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &str> + ExactSizeIterator {
        self.iter().map(|(name, _)| name)
    }

    /// The values, in name order.
    pub fn values(&self) -> impl DoubleEndedIterator<Item = &str> + ExactSizeIterator {
        self.iter().map(|(_, value)| value)
    }

    /// Adds a pair or replaces a name's value. Rebuilds the set: for building small sets, not
    /// for hot paths.
    pub fn insert(&mut self, name: String, value: String) {
        // The new pair comes last, so it replaces a value the name had.
        let pairs = self
            .iter()
            .map(|(n, v)| (Cow::Borrowed(n), Cow::Borrowed(v)))
            .chain(std::iter::once((Cow::Owned(name), Cow::Owned(value))))
            .collect();
        *self = LabelSet::from_pairs(pairs);
    }

    /// The set without its pairs whose value is empty (Alertmanager removes empty-valued
    /// labels before anything else, so that a matcher for a missing label holds for them).
    /// Unchanged, without copying, when no value is empty.
    pub fn without_empty_values(self) -> Self {
        if self.spans.iter().all(|[_, value, end]| value < end) {
            return self;
        }
        LabelSet::from_pairs(
            self.iter()
                .filter(|(_, value)| !value.is_empty())
                .map(|(n, v)| (Cow::Borrowed(n), Cow::Borrowed(v)))
                .collect(),
        )
    }

    /// Builds a set from pairs in any order; of repeated names, the last value wins.
    fn from_pairs(mut pairs: Vec<(Cow<'_, str>, Cow<'_, str>)>) -> Self {
        // Alertmanager (Go) writes maps sorted by key: usually there is nothing to sort. The
        // sort is stable, so of equal names the last one given stays last.
        if !pairs.is_sorted_by(|a, b| a.0 <= b.0) {
            pairs.sort_by(|a, b| a.0.cmp(&b.0));
        }
        // Of equal names the value given last is kept (as a map's insert would leave it).
        pairs.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(later, kept);
            }
            same
        });
        let size: usize = pairs.iter().map(|(n, v)| n.len() + v.len()).sum();
        let mut text = String::with_capacity(size);
        let mut spans = Vec::with_capacity(pairs.len());
        for (name, value) in &pairs {
            // A set larger than 4 GiB cannot arrive: request bodies are limited far below.
            let start = u32::try_from(text.len()).unwrap_or(u32::MAX);
            text.push_str(name);
            let middle = u32::try_from(text.len()).unwrap_or(u32::MAX);
            text.push_str(value);
            let end = u32::try_from(text.len()).unwrap_or(u32::MAX);
            spans.push([start, middle, end]);
        }
        LabelSet {
            text: text.into_boxed_str(),
            spans: spans.into_boxed_slice(),
        }
    }
}

impl std::ops::Index<&str> for LabelSet {
    type Output = str;

    /// The value of a name; panics when the set does not have it (as a map's index does).
    fn index(&self, name: &str) -> &str {
        match self.get(name) {
            Some(value) => value,
            None => panic!("no label {name:?} in the set"),
        }
    }
}

impl fmt::Debug for LabelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for LabelSet {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        LabelSet::from_pairs(
            iter.into_iter()
                .map(|(k, v)| (Cow::Owned(k.into()), Cow::Owned(v.into())))
                .collect(),
        )
    }
}

impl<const N: usize> From<[(String, String); N]> for LabelSet {
    fn from(pairs: [(String, String); N]) -> Self {
        pairs.into_iter().collect()
    }
}

/// The pairs of a [`LabelSet`], in name order.
#[derive(Clone, Debug)]
pub struct Iter<'a> {
    set: &'a LabelSet,
    spans: std::slice::Iter<'a, [u32; 3]>,
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        self.spans.next().map(|span| self.set.pair(span))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.spans.size_hint()
    }
}

impl DoubleEndedIterator for Iter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.spans.next_back().map(|span| self.set.pair(span))
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl<'a> IntoIterator for &'a LabelSet {
    type Item = (&'a str, &'a str);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl Serialize for LabelSet {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.len()))?;
        for (name, value) in self.iter() {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for LabelSet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SetVisitor;

        impl<'de> Visitor<'de> for SetVisitor {
            type Value = LabelSet;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of strings to strings")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<LabelSet, A::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0).min(256));
                while let Some((name, value)) = map.next_entry::<CowStr<'de>, CowStr<'de>>()? {
                    pairs.push((name.0, value.0));
                }
                Ok(LabelSet::from_pairs(pairs))
            }
        }

        deserializer.deserialize_map(SetVisitor)
    }
}

/// A string borrowed from the input when it has no escapes, owned otherwise.
struct CowStr<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for CowStr<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StrVisitor;

        impl<'de> Visitor<'de> for StrVisitor {
            type Value = CowStr<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                text: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Borrowed(text)))
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(text.to_string())))
            }

            fn visit_string<E: serde::de::Error>(self, text: String) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(text)))
            }

            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Self::Value, E> {
                std::str::from_utf8(bytes)
                    .map(|text| CowStr(Cow::Owned(text.to_string())))
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Bytes(bytes), &self))
            }
        }

        deserializer.deserialize_str(StrVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_is_sorted_holds_each_name_once_and_reads_like_a_map() {
        let set: LabelSet = [("b", "2"), ("a", "1"), ("c", "3"), ("a", "again")]
            .into_iter()
            .collect();
        assert_eq!(
            set.iter().collect::<Vec<_>>(),
            vec![("a", "again"), ("b", "2"), ("c", "3")]
        );
        assert_eq!(set.get("b"), Some("2"));
        assert_eq!(set.get("z"), None);
        assert!(set.contains_key("c") && !set.contains_key(""));
        assert_eq!(set.len(), 3);
        let mut more = set.clone();
        more.insert("b".to_string(), "two".to_string());
        more.insert("0".to_string(), "zero".to_string());
        assert_eq!(
            more.iter().collect::<Vec<_>>(),
            vec![("0", "zero"), ("a", "again"), ("b", "two"), ("c", "3")]
        );
        assert_ne!(set, more);
        assert_eq!(LabelSet::new(), LabelSet::default());
        assert!(LabelSet::new().is_empty());
        let with_empty: LabelSet = [("a", "1"), ("b", ""), ("c", "3")].into_iter().collect();
        let cleaned = with_empty.without_empty_values();
        assert_eq!(
            cleaned.iter().collect::<Vec<_>>(),
            vec![("a", "1"), ("c", "3")]
        );
        assert_eq!(cleaned.clone().without_empty_values(), cleaned);
    }

    #[test]
    fn json_round_trips_like_a_map_and_the_last_repeated_name_wins() {
        let text = r#"{"z":"last","a":"with \"quotes\" and \u00e9","z":"really last","m":""}"#;
        let set: LabelSet = serde_json::from_str(text).expect("parse");
        assert_eq!(set.get("z"), Some("really last"));
        assert_eq!(set.get("a"), Some("with \"quotes\" and é"));
        let as_map: std::collections::BTreeMap<String, String> =
            serde_json::from_str(text).expect("map");
        assert_eq!(
            serde_json::to_string(&set).expect("json"),
            serde_json::to_string(&as_map).expect("json")
        );
        assert!(serde_json::from_str::<LabelSet>(r#"{"a":1}"#).is_err());
        assert!(serde_json::from_str::<LabelSet>(r#"["a"]"#).is_err());
    }
}
