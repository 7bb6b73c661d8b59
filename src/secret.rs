//! Secret material: values that must never reach a log, an Event, a status or a metric.

use std::collections::BTreeMap;
use std::fmt;

/// A value whose `Debug` and `Display` print `<redacted>`, so no log line can leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Sensitive<T>(T);

impl<T> Sensitive<T> {
    /// Wraps a secret value.
    pub fn new(value: T) -> Self {
        Sensitive(value)
    }

    /// The secret value, for the one place that must use it.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Sensitive<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl<T> fmt::Display for Sensitive<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The decoded keys and values of one Kubernetes Secret.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretData(BTreeMap<String, Sensitive<Vec<u8>>>);

impl fmt::Debug for SecretData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl SecretData {
    /// Builds from decoded key/value pairs.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, Vec<u8>)>) -> Self {
        SecretData(
            pairs
                .into_iter()
                .map(|(k, v)| (k, Sensitive::new(v)))
                .collect(),
        )
    }

    /// Builds from a Kubernetes Secret (`data`, then `stringData` on top, as the API server does).
    pub fn from_secret(secret: &k8s_openapi::api::core::v1::Secret) -> Self {
        let mut pairs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (k, v) in secret.data.iter().flatten() {
            pairs.insert(k.clone(), v.0.clone());
        }
        for (k, v) in secret.string_data.iter().flatten() {
            pairs.insert(k.clone(), v.clone().into_bytes());
        }
        SecretData::from_pairs(pairs)
    }

    /// The raw bytes of a key.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.0.get(key).map(|v| v.expose().as_slice())
    }

    /// Every key and value.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.0
            .iter()
            .map(|(k, v)| (k.as_str(), v.expose().as_slice()))
    }

    /// A digest of the content, to notice changes without keeping copies around.
    pub fn digest(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        for (k, v) in self.iter() {
            hasher.update((k.len() as u64).to_le_bytes());
            hasher.update(k.as_bytes());
            hasher.update((v.len() as u64).to_le_bytes());
            hasher.update(v);
        }
        hasher.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_values() {
        let data = SecretData::from_pairs([("token".to_string(), b"hunter2".to_vec())]);
        let printed = format!("{data:?} {:?}", Sensitive::new("hunter2"));
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("token"));
    }
}
