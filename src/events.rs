//! Kubernetes Events (events.k8s.io/v1) as Herald alerts, and the bookkeeping that delivers each
//! Event once (again only when its series count changes).

use std::collections::HashMap;

use k8s_openapi::api::events::v1::Event;

use crate::alert::{Alert, AlertStatus, LabelSet};

/// The number of occurrences an Event stands for.
pub fn occurrences(event: &Event) -> i32 {
    event
        .series
        .as_ref()
        .map(|s| s.count)
        .or(event.deprecated_count)
        .unwrap_or(1)
}

/// Maps an Event to alert shape. Labels: `reason`, `type` (Normal/Warning), `namespace`, `kind`
/// and `name` of the involved object, and `reportingController`; annotations: `message` and
/// `action`. `None` for an Event without a reason.
pub fn to_alert(event: &Event) -> Option<Alert> {
    let reason = event.reason.clone().filter(|r| !r.is_empty())?;
    let regarding = event.regarding.as_ref();
    let namespace = regarding
        .and_then(|r| r.namespace.clone())
        .filter(|n| !n.is_empty())
        .or_else(|| event.metadata.namespace.clone());
    let present = |(name, value): (&'static str, Option<String>)| Some((name, value?));
    // Each set built once from the values present.
    let labels: LabelSet = [
        ("reason", Some(reason)),
        ("type", event.type_.clone()),
        ("namespace", namespace),
        ("kind", regarding.and_then(|r| r.kind.clone())),
        ("name", regarding.and_then(|r| r.name.clone())),
        (
            "reportingController",
            event.reporting_controller.clone().filter(|c| !c.is_empty()),
        ),
    ]
    .into_iter()
    .filter_map(present)
    .collect();
    let annotations: LabelSet = [
        ("message", event.note.clone().filter(|n| !n.is_empty())),
        ("action", event.action.clone().filter(|a| !a.is_empty())),
    ]
    .into_iter()
    .filter_map(present)
    .collect();
    let when = event
        .series
        .as_ref()
        .map(|s| s.last_observed_time.0)
        .or_else(|| event.event_time.as_ref().map(|t| t.0))
        .or_else(|| event.deprecated_last_timestamp.as_ref().map(|t| t.0))
        .or_else(|| event.metadata.creation_timestamp.as_ref().map(|t| t.0));
    let uid = event.metadata.uid.clone().unwrap_or_default();
    Some(Alert {
        status: AlertStatus::Firing,
        labels,
        annotations,
        starts_at: when.map(|t| t.to_string()).unwrap_or_default(),
        ends_at: String::new(),
        generator_url: String::new(),
        fingerprint: format!("{uid}/{}", occurrences(event)),
        derived: Default::default(),
    })
}

/// Remembers the occurrence count of each Event seen, so each is delivered once per count.
#[derive(Debug, Default)]
pub struct EventLedger {
    counts: HashMap<String, i32>,
}

impl EventLedger {
    /// Records an Event; true when it is new or its count changed since last seen.
    pub fn record(&mut self, event: &Event) -> bool {
        let Some(uid) = event.metadata.uid.clone() else {
            return true;
        };
        let count = occurrences(event);
        self.counts.insert(uid, count) != Some(count)
    }

    /// Forgets a deleted Event.
    pub fn forget(&mut self, event: &Event) {
        if let Some(uid) = &event.metadata.uid {
            self.counts.remove(uid);
        }
    }

    /// Number of Events remembered.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    /// Whether no Event is remembered.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(yaml: &str) -> Event {
        serde_saphyr::from_str(yaml).expect("event yaml")
    }

    const BACKOFF: &str = r#"
metadata: {name: web.1, namespace: shop, uid: u1}
reason: BackOff
type: Warning
note: Back-off restarting failed container
action: Restarting
reportingController: kubelet
reportingInstance: node-1
eventTime: "2026-11-25T10:00:00.000000Z"
regarding: {kind: Pod, name: web, namespace: shop}
"#;

    #[test]
    fn an_event_becomes_an_alert_with_the_contract_labels() {
        let alert = to_alert(&event(BACKOFF)).expect("alert");
        let labels: Vec<(&str, &str)> = alert.labels.iter().collect();
        assert_eq!(
            labels,
            [
                ("kind", "Pod"),
                ("name", "web"),
                ("namespace", "shop"),
                ("reason", "BackOff"),
                ("reportingController", "kubelet"),
                ("type", "Warning")
            ]
        );
        assert_eq!(
            &alert.annotations["message"],
            "Back-off restarting failed container"
        );
        assert_eq!(alert.fingerprint, "u1/1");
    }

    #[test]
    fn each_event_is_recorded_once_per_count() {
        let mut ledger = EventLedger::default();
        let first = event(BACKOFF);
        assert!(ledger.record(&first));
        assert!(
            !ledger.record(&first),
            "a repeat with the same count is not new"
        );
        let mut again = first.clone();
        again.series = Some(k8s_openapi::api::events::v1::EventSeries {
            count: 2,
            last_observed_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                "2026-11-25T10:05:00Z".parse().expect("time"),
            ),
        });
        assert!(ledger.record(&again));
        assert!(!ledger.record(&again));
        ledger.forget(&again);
        assert!(ledger.is_empty());
    }
}
