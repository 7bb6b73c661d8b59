//! The status writer: coalesces readiness, delivery and test results per Webhook and writes them
//! with server-side apply at most once per interval, and publishes Events. Only the leader writes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::crd::{DeliveryOutcome, DeliveryResult, TestResult, Webhook, WebhookStatus};
use crate::delivery::{DeliveryObserver, DeliveryReport, ReportOutcome};
use crate::routing::{NotReady, ObjectKey};

/// The field manager Herald writes status as.
pub const FIELD_MANAGER: &str = "herald";

#[derive(Default)]
struct Entry {
    /// The Webhook's uid, once seen: Events refer to it (the rest of the reference is the key).
    uid: Option<String>,
    generation: Option<i64>,
    ready: Option<Condition>,
    last_delivery: Option<DeliveryResult>,
    last_test: Option<TestResult>,
    failing: bool,
    dirty: bool,
}

/// The reference Events give for a Webhook.
fn reference(key: &ObjectKey, uid: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some(<Webhook as kube::Resource>::api_version(&()).into_owned()),
        kind: Some(<Webhook as kube::Resource>::kind(&()).into_owned()),
        name: Some(key.name.clone()),
        namespace: Some(key.namespace.clone()),
        uid: (!uid.is_empty()).then(|| uid.to_string()),
        ..ObjectReference::default()
    }
}

/// Coalescing writer of Webhook status and Events.
pub struct StatusWriter {
    client: kube::Client,
    recorder: Recorder,
    leader: Arc<AtomicBool>,
    /// Boxed entries: most of an entry's size is unused options.
    entries: Mutex<HashMap<ObjectKey, Box<Entry>>>,
    wake: Notify,
}

impl std::fmt::Debug for StatusWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatusWriter")
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn truncate(message: &str, max: usize) -> String {
    if message.len() <= max {
        return message.to_string();
    }
    let mut end = max;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

impl StatusWriter {
    /// A writer that writes while `leader` is true.
    pub fn new(client: kube::Client, recorder: Recorder, leader: Arc<AtomicBool>) -> Self {
        StatusWriter {
            client,
            recorder,
            leader,
            entries: Mutex::new(HashMap::new()),
            wake: Notify::new(),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, Box<Entry>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a Webhook's readiness for its current generation. Status already on the object
    /// seeds what this writer keeps (so a restart does not erase the last results); an object
    /// without status (the controller's kept copy) is compared with what this writer knows.
    pub fn set_ready(&self, webhook: &Webhook, readiness: &Result<(), NotReady>) {
        let Some(key) = super::key_of(webhook) else {
            return;
        };
        let existing = webhook.status.clone().unwrap_or_default();
        let previous = existing
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .cloned();
        let (status, reason, message) = match readiness {
            Ok(()) => (
                "True",
                "Ready".to_string(),
                "the webhook can deliver".to_string(),
            ),
            Err(not_ready) => (
                "False",
                not_ready.reason.to_string(),
                not_ready.message.clone(),
            ),
        };
        let mut entries = self.entries();
        let entry = entries.entry(key).or_default();
        let observed_generation = match &webhook.status {
            Some(status) => status.observed_generation,
            None if entry.uid.is_some() => entry.generation,
            None => None,
        };
        if entry.uid.is_none() {
            entry.last_delivery = existing.last_delivery.clone();
            entry.last_test = existing.last_test.clone();
            entry.failing = existing
                .last_delivery
                .as_ref()
                .is_some_and(|d| d.outcome == DeliveryOutcome::Failed);
        }
        // Some once seen, even without a uid (then Events carry none).
        entry.uid = Some(webhook.metadata.uid.clone().unwrap_or_default());
        let known = entry.ready.clone().or(previous);
        let transition = match &known {
            Some(c) if c.status == status => c.last_transition_time.clone(),
            _ => now(),
        };
        let condition = Condition {
            type_: "Ready".into(),
            status: status.into(),
            reason,
            message: truncate(&message, 1024),
            observed_generation: webhook.metadata.generation,
            last_transition_time: transition,
        };
        let unchanged = known.as_ref().is_some_and(|c| {
            c.status == condition.status
                && c.reason == condition.reason
                && c.message == condition.message
                && c.observed_generation == condition.observed_generation
        }) && observed_generation == webhook.metadata.generation;
        entry.generation = webhook.metadata.generation;
        entry.ready = Some(condition);
        if !unchanged {
            entry.dirty = true;
            self.wake.notify_one();
        }
    }

    /// Forgets a deleted Webhook.
    pub fn forget(&self, key: &ObjectKey) {
        self.entries().remove(key);
    }

    /// Marks every known Webhook for a write (after becoming leader).
    pub fn mark_all_dirty(&self) {
        for entry in self.entries().values_mut() {
            entry.dirty = true;
        }
        self.wake.notify_one();
    }

    /// Records a test result, writes it at once and publishes an Event.
    pub fn record_test(
        &self,
        key: &ObjectKey,
        token: &str,
        result: Result<&DeliveryReport, String>,
    ) {
        let (outcome, http_status, message) = match result {
            Ok(report) => (
                if report.outcome == ReportOutcome::Succeeded {
                    DeliveryOutcome::Succeeded
                } else {
                    DeliveryOutcome::Failed
                },
                report.http_status,
                match report.http_status {
                    Some(code) if report.outcome == ReportOutcome::Succeeded => {
                        format!("HTTP {code} in {} ms", report.latency.as_millis())
                    }
                    _ => report.message.clone(),
                },
            ),
            Err(message) => (DeliveryOutcome::Failed, None, message),
        };
        let message = truncate(&message, 1024);
        let reference = {
            let mut entries = self.entries();
            let entry = entries.entry(key.clone()).or_default();
            entry.last_test = Some(TestResult {
                token: token.to_string(),
                time: now(),
                outcome,
                http_status,
                message: message.clone(),
            });
            entry.dirty = true;
            entry.uid.as_deref().map(|uid| reference(key, uid))
        };
        self.wake.notify_one();
        if let Some(reference) = reference {
            let (type_, reason) = match outcome {
                DeliveryOutcome::Succeeded => (EventType::Normal, "TestSucceeded"),
                DeliveryOutcome::Failed => (EventType::Warning, "TestFailed"),
            };
            self.publish(reference, type_, reason, "SendTest", message);
        }
    }

    fn publish(
        &self,
        reference: ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        if !self.leader.load(Ordering::SeqCst) {
            return;
        }
        let recorder = self.recorder.clone();
        let event = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: action.to_string(),
            secondary: None,
        };
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::warn!("cannot publish event: {e}");
            }
        });
    }

    /// Writes dirty status every `interval` (or sooner when woken) until `cancel` fires.
    pub async fn run(self: Arc<Self>, interval: Duration, cancel: CancellationToken) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(interval) => {}
            }
            if self.leader.load(Ordering::SeqCst) {
                self.flush().await;
            }
            // Coalesce: at most one round of writes per interval.
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(interval) => {}
            }
        }
        if self.leader.load(Ordering::SeqCst) {
            self.flush().await;
        }
    }

    /// Whether the test message asked for with this token has been sent and recorded.
    pub fn tested(&self, key: &ObjectKey, token: &str) -> bool {
        self.entries()
            .get(key)
            .and_then(|e| e.last_test.as_ref())
            .is_some_and(|t| t.token == token)
    }

    /// Writes every dirty status now, one at a time (a status is built just before its write,
    /// so writing thousands does not hold thousands of copies).
    pub async fn flush(&self) {
        let dirty: Vec<ObjectKey> = self
            .entries()
            .iter()
            .filter(|(_, e)| e.dirty && e.uid.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        let mut gone = HashSet::new();
        for key in dirty {
            let status = {
                let mut entries = self.entries();
                let Some(e) = entries.get_mut(&key).filter(|e| e.dirty) else {
                    continue;
                };
                e.dirty = false;
                WebhookStatus {
                    observed_generation: e.generation,
                    conditions: e.ready.iter().cloned().collect(),
                    last_delivery: e.last_delivery.clone(),
                    last_test: e.last_test.clone(),
                }
            };
            let api: Api<Webhook> = Api::namespaced(self.client.clone(), &key.namespace);
            let patch = serde_json::json!({
                "apiVersion": "herald.dev/v1alpha1",
                "kind": "Webhook",
                "status": status,
            });
            let params = PatchParams::apply(FIELD_MANAGER).force();
            match api
                .patch_status(&key.name, &params, &Patch::Apply(&patch))
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    gone.insert(key);
                }
                Err(e) => {
                    tracing::warn!(webhook = %key, "cannot write status: {e}");
                    if let Some(entry) = self.entries().get_mut(&key) {
                        entry.dirty = true;
                    }
                }
            }
        }
        let mut entries = self.entries();
        for key in gone {
            entries.remove(&key);
        }
    }
}

impl DeliveryObserver for StatusWriter {
    fn report(&self, report: &DeliveryReport) {
        if report.test {
            return;
        }
        let outcome = match report.outcome {
            ReportOutcome::Succeeded => DeliveryOutcome::Succeeded,
            ReportOutcome::Failed | ReportOutcome::Dropped => DeliveryOutcome::Failed,
        };
        let message = match report.outcome {
            ReportOutcome::Succeeded => format!(
                "delivered {} alert(s) in {} attempt(s)",
                report.alerts, report.attempts
            ),
            _ => truncate(&report.message, 1024),
        };
        let event = {
            let mut entries = self.entries();
            let Some(entry) = entries.get_mut(&report.webhook) else {
                return;
            };
            entry.last_delivery = Some(DeliveryResult {
                time: Time(report.finished_at),
                outcome,
                http_status: report.http_status,
                message: message.clone(),
            });
            entry.dirty = true;
            let failing = outcome == DeliveryOutcome::Failed;
            let changed = failing != entry.failing;
            entry.failing = failing;
            entry
                .uid
                .as_deref()
                .filter(|_| changed)
                .map(|uid| reference(&report.webhook, uid))
        };
        if let Some(reference) = event {
            if outcome == DeliveryOutcome::Failed {
                self.publish(
                    reference,
                    EventType::Warning,
                    "DeliveryFailing",
                    "Deliver",
                    message,
                );
            } else {
                self.publish(
                    reference,
                    EventType::Normal,
                    "DeliveryRecovered",
                    "Deliver",
                    message,
                );
            }
        }
    }
}
