//! What is queued, stored and sent: one delivery to one webhook, its id, and how it ended.
//! Plain data shared by the delivery engine and the store, below both.

mod id;

use std::sync::Arc;

use crate::alert::{Alert, AlertBatch, CachedAlerts, GroupSource, LabelSet, SharedKeptAlerts};
use crate::object::ObjectKey;

pub use id::{DeliveryId, InvalidDeliveryId};

/// One notification to one webhook: the unit that is queued, retried and recorded.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    /// Unique id; sent as `Idempotency-Key` and `webhook-id`, the same on every retry.
    pub id: DeliveryId,
    /// The webhook.
    pub webhook: ObjectKey,
    /// A test message.
    pub test: bool,
    /// The alerts that matched this webhook, shared with the other deliveries of their batch.
    pub alerts: Vec<Arc<Alert>>,
    /// Group labels from Alertmanager.
    pub group_labels: Arc<LabelSet>,
    /// Alertmanager's URL.
    #[serde(rename = "externalURL")]
    pub external_url: Arc<str>,
    /// The rest of what Alertmanager said about the group (shared by the batch's deliveries).
    #[serde(default, skip_serializing_if = "is_unknown_group")]
    pub source: Arc<GroupSource>,
}

fn is_unknown_group(source: &Arc<GroupSource>) -> bool {
    source.is_empty()
}

impl Delivery {
    /// A new delivery with a fresh time-ordered id.
    pub fn new(
        webhook: ObjectKey,
        alerts: Vec<Arc<Alert>>,
        group_labels: Arc<LabelSet>,
        external_url: Arc<str>,
    ) -> Self {
        Delivery {
            id: DeliveryId::new(),
            webhook,
            test: false,
            alerts,
            group_labels,
            external_url,
            source: Arc::default(),
        }
    }

    /// One delivery carrying the alerts of several to the same webhook (a digest): each alert
    /// once, in its latest state (the last delivery carrying its fingerprint), in the order
    /// they were last seen. Group labels, URL and group details are kept where all agree.
    pub fn merged(parts: &[Arc<Delivery>]) -> Option<Delivery> {
        let first = parts.first()?;
        let mut latest: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        let all: Vec<&Arc<Alert>> = parts.iter().flat_map(|d| d.alerts.iter()).collect();
        for (i, alert) in all.iter().enumerate() {
            latest.insert(alert.fingerprint.as_str(), i);
        }
        let alerts = all
            .iter()
            .enumerate()
            .filter(|(i, alert)| latest.get(alert.fingerprint.as_str()) == Some(i))
            .map(|(_, alert)| Arc::clone(alert))
            .collect();
        let agree = |same: &dyn Fn(&Delivery) -> bool| parts.iter().all(|d| same(d));
        Some(Delivery {
            id: DeliveryId::new(),
            webhook: first.webhook.clone(),
            test: false,
            alerts,
            group_labels: if agree(&|d| d.group_labels == first.group_labels) {
                first.group_labels.clone()
            } else {
                Arc::default()
            },
            external_url: first.external_url.clone(),
            source: if agree(&|d| d.source == first.source) {
                first.source.clone()
            } else {
                Arc::default()
            },
        })
    }

    /// The delivery as JSON, the same text as its `Serialize`, with each alert's part taken from
    /// the alert, which writes it once for every delivery that carries it (an alert matching
    /// ten webhooks is written once, not ten times, when the store keeps their deliveries).
    pub fn to_json(&self) -> Vec<u8> {
        // Plain structs of strings, numbers and maps always serialise.
        serde_json::to_vec(&DeliveryFromParts(self)).unwrap_or_default()
    }

    /// A delivery read back from the JSON [`Delivery::to_json`] wrote, its alerts shared with
    /// the other deliveries read back that carry them (see [`SharedKeptAlerts`]).
    pub fn from_json(bytes: &[u8], alerts: &SharedKeptAlerts) -> Result<Self, serde_json::Error> {
        let parts: DeliveryParts<'_> = serde_json::from_slice(bytes)?;
        Ok(Delivery {
            id: parts.id,
            webhook: parts.webhook,
            test: parts.test,
            alerts: parts
                .alerts
                .into_iter()
                .map(|raw| alerts.read(raw))
                .collect::<Result<_, _>>()?,
            group_labels: parts.group_labels,
            external_url: parts.external_url,
            source: parts.source,
        })
    }

    /// The delivery with what Alertmanager said about its group.
    pub fn from_group(self, source: &Arc<GroupSource>) -> Self {
        if source.is_empty() {
            return self;
        }
        Delivery {
            source: source.clone(),
            ..self
        }
    }

    /// A test message: one synthetic alert marked `"test": true`.
    pub fn test(webhook: ObjectKey) -> Self {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let alert = Alert::test(&webhook, &now);
        Delivery {
            test: true,
            ..Delivery::new(
                webhook,
                vec![Arc::new(alert)],
                Arc::default(),
                Arc::from(""),
            )
        }
    }
}

/// A delivery written with its alerts' JSON (see [`Delivery::to_json`]); the fields, their
/// names and their order are those of the derived `Serialize`.
struct DeliveryFromParts<'a>(&'a Delivery);

impl serde::Serialize for DeliveryFromParts<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let delivery = self.0;
        let mut out = serializer.serialize_struct("Delivery", 7)?;
        out.serialize_field("id", &delivery.id)?;
        out.serialize_field("webhook", &delivery.webhook)?;
        out.serialize_field("test", &delivery.test)?;
        out.serialize_field("alerts", &CachedAlerts(&delivery.alerts))?;
        out.serialize_field("groupLabels", &delivery.group_labels)?;
        out.serialize_field("externalURL", &delivery.external_url)?;
        if is_unknown_group(&delivery.source) {
            out.skip_field("source")?;
        } else {
            out.serialize_field("source", &delivery.source)?;
        }
        out.end()
    }
}

/// A delivery as its JSON holds it, with its alerts left as JSON text (see
/// [`Delivery::from_json`]); the fields are those of the derived `Deserialize`.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeliveryParts<'a> {
    id: DeliveryId,
    webhook: ObjectKey,
    test: bool,
    #[serde(borrow)]
    alerts: Vec<&'a serde_json::value::RawValue>,
    group_labels: Arc<LabelSet>,
    #[serde(rename = "externalURL")]
    external_url: Arc<str>,
    #[serde(default)]
    source: Arc<GroupSource>,
}

/// A batch routed to its webhooks: its alerts, and for each webhook the indexes of the alerts
/// it gets. The dispatcher routes it; the engine admits it whole and makes it one delivery per
/// webhook.
#[derive(Debug)]
pub struct RoutedBatch {
    batch: AlertBatch,
    per_webhook: Vec<(ObjectKey, Vec<usize>)>,
}

impl RoutedBatch {
    /// A batch and, per webhook, the indexes of its alerts that webhook gets.
    pub fn new(batch: AlertBatch, per_webhook: Vec<(ObjectKey, Vec<usize>)>) -> Self {
        RoutedBatch { batch, per_webhook }
    }

    /// How many deliveries it makes: one per webhook.
    pub fn deliveries(&self) -> usize {
        self.per_webhook.len()
    }

    /// One delivery per webhook, holding the alerts that webhook gets.
    pub fn into_deliveries(self) -> Vec<Delivery> {
        let RoutedBatch { batch, per_webhook } = self;
        // Each alert and the batch's labels are shared by every delivery they go into.
        let alerts: Vec<Arc<Alert>> = batch.alerts.into_iter().map(Arc::new).collect();
        let group_labels = Arc::new(batch.group_labels);
        let external_url: Arc<str> = Arc::from(batch.external_url);
        let source = Arc::new(batch.source);
        per_webhook
            .into_iter()
            .map(|(key, indexes)| {
                let alerts = indexes.into_iter().map(|i| alerts[i].clone()).collect();
                Delivery::new(key, alerts, group_labels.clone(), external_url.clone())
                    .from_group(&source)
            })
            .collect()
    }
}

/// The final outcome of a delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ReportOutcome {
    /// The endpoint answered 2xx.
    Succeeded,
    /// Retries exhausted or a final error.
    Failed,
    /// Never sent: the webhook went away.
    Dropped,
}

impl ReportOutcome {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ReportOutcome::Succeeded => "succeeded",
            ReportOutcome::Failed => "failed",
            ReportOutcome::Dropped => "dropped",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(name: &str) -> Arc<Alert> {
        let mut alert = Alert {
            labels: LabelSet::from([
                ("alertname".to_string(), name.to_string()),
                ("note".to_string(), "quote \" and \\ and \u{e9}".to_string()),
            ]),
            annotations: LabelSet::from([("summary".to_string(), "a summary".to_string())]),
            starts_at: "2026-12-07T10:00:00Z".to_string(),
            ..Alert::default()
        };
        alert.ensure_fingerprint();
        Arc::new(alert)
    }

    /// A delivery of `shared` and another alert, with group labels and a URL.
    fn with_group_labels(shared: &Arc<Alert>) -> Delivery {
        Delivery::new(
            "ns/w1".parse().expect("key"),
            vec![shared.clone(), alert("Second")],
            Arc::new(LabelSet::from([(
                "alertname".to_string(),
                "Shared".to_string(),
            )])),
            Arc::from("http://alertmanager:9093"),
        )
    }

    #[test]
    fn the_json_written_from_parts_is_the_derived_json() {
        let shared = alert("Shared");
        let plain = with_group_labels(&shared);
        let source: Arc<GroupSource> =
            serde_json::from_str(r#"{"receiver":"herald","status":"firing","groupKey":"{}:{}"}"#)
                .expect("group source");
        let with_source = Delivery::new(
            "ns/w2".parse().expect("key"),
            vec![shared],
            Arc::default(),
            Arc::from(""),
        )
        .from_group(&source);
        assert!(!with_source.source.is_empty());
        for delivery in [
            plain,
            with_source,
            Delivery::test("ns/w3".parse().expect("key")),
        ] {
            let derived = serde_json::to_vec(&delivery).expect("derived json");
            assert_eq!(
                String::from_utf8_lossy(&delivery.to_json()),
                String::from_utf8_lossy(&derived)
            );
        }
    }

    #[test]
    fn a_delivery_read_back_is_the_one_written_and_shares_its_alerts() {
        let shared = alert("Shared");
        let first = with_group_labels(&shared);
        let second = Delivery::new(
            "ns/w2".parse().expect("key"),
            vec![shared],
            Arc::default(),
            Arc::from(""),
        );
        let kept = SharedKeptAlerts::default();
        let first_back = Delivery::from_json(&first.to_json(), &kept).expect("read back");
        let second_back = Delivery::from_json(&second.to_json(), &kept).expect("read back");
        // The same as the derived reading (which reads an unset time as Go's zero time).
        for (back, written) in [(&first_back, &first), (&second_back, &second)] {
            let derived: Delivery = serde_json::from_slice(&written.to_json()).expect("derived");
            assert_eq!(back, &derived);
        }
        assert!(
            Arc::ptr_eq(&first_back.alerts[0], &second_back.alerts[0]),
            "one alert, read once for both deliveries"
        );
        assert!(!Arc::ptr_eq(&first_back.alerts[0], &first_back.alerts[1]));
        // What is kept with an alert read back is what a fresh copy of it writes.
        for alert in &first_back.alerts {
            let fresh = Alert::clone(alert);
            assert_eq!(alert.json().map(|j| j.get()), fresh.json().map(|j| j.get()));
            assert_eq!(
                alert.labels_json().map(|j| j.get()),
                fresh.labels_json().map(|j| j.get())
            );
            assert_eq!(
                alert.annotations_json().map(|j| j.get()),
                fresh.annotations_json().map(|j| j.get())
            );
        }
        // Once no delivery holds it, the alert is read anew.
        let held = Arc::downgrade(&first_back.alerts[1]);
        drop(first_back);
        assert!(held.upgrade().is_none());
        assert!(Delivery::from_json(b"{\"id\":", &kept).is_err());
    }
}
