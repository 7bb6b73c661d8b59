//! Delivery ids: UUIDv7, so that ordering by id is ordering by acceptance time.

use std::fmt;
use std::str::FromStr;

/// The id of a delivery: sent as `Idempotency-Key` and `webhook-id`, the same on every retry,
/// and the key of its pending entry and record. Sixteen bytes, compared as one number (ids sort
/// by the time they were made: the UUID's bytes read as a big-endian number, so that comparing
/// two ids is one integer comparison); written as the hyphenated lowercase UUID.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeliveryId(u128);

/// Why a text is not a delivery id.
#[derive(Debug, thiserror::Error)]
#[error("not a delivery id (a UUID): {0}")]
pub struct InvalidDeliveryId(String);

impl DeliveryId {
    /// A fresh id, later than every id made before it in this process.
    pub fn new() -> Self {
        DeliveryId(uuid::Uuid::now_v7().as_u128())
    }

    /// The hyphenated lowercase text, without allocating.
    pub fn encode<'b>(&self, buffer: &'b mut [u8; uuid::fmt::Hyphenated::LENGTH]) -> &'b str {
        uuid::Uuid::from_u128(self.0)
            .hyphenated()
            .encode_lower(buffer)
    }
}

impl Default for DeliveryId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for DeliveryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&uuid::Uuid::from_u128(self.0).hyphenated(), f)
    }
}

impl FromStr for DeliveryId {
    type Err = InvalidDeliveryId;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::try_parse(text)
            .map(|uuid| DeliveryId(uuid.as_u128()))
            .map_err(|_| InvalidDeliveryId(text.chars().take(64).collect()))
    }
}

impl serde::Serialize for DeliveryId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut buffer = [0u8; uuid::fmt::Hyphenated::LENGTH];
        serializer.serialize_str(self.encode(&mut buffer))
    }
}

impl<'de> serde::Deserialize<'de> for DeliveryId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_creation_and_round_trip_as_text() {
        let ids: Vec<DeliveryId> = (0..1000).map(|_| DeliveryId::new()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "made in order, sorted");
        let texts: Vec<String> = ids.iter().map(ToString::to_string).collect();
        assert!(
            texts.windows(2).all(|w| w[0] < w[1]),
            "text order is id order"
        );
        for (id, text) in ids.iter().zip(&texts) {
            assert_eq!(text.len(), 36);
            assert_eq!(text.parse::<DeliveryId>().expect("parse"), *id);
            let json = serde_json::to_string(id).expect("json");
            assert_eq!(json, format!("\"{text}\""));
            assert_eq!(
                serde_json::from_str::<DeliveryId>(&json).expect("from json"),
                *id
            );
        }
        assert!("not-an-id".parse::<DeliveryId>().is_err());
        assert!(serde_json::from_str::<DeliveryId>("\"x\"").is_err());
    }
}
