//! The status writer: coalesces readiness, delivery and test results per Webhook, and the
//! readiness of each NotificationCondition with the Webhooks that use it, and writes them with
//! server-side apply at most once per interval, and publishes Events. Only the leader writes,
//! and only once the controller has seen every watched object (before that a status would
//! describe a partial table).

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
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::crd::{
    DeliveryOutcome, DeliveryResult, NotificationCondition, NotificationConditionStatus,
    TestResult, Webhook, WebhookStatus,
};
use crate::delivery::{BacklogState, DeliveryObserver, DeliveryReport};
use crate::dispatch::Dispatcher;
use crate::object::{NotReady, ObjectKey};
use crate::outgoing::ReportOutcome;

use super::ReconcileError;

/// The field manager Herald writes status as.
pub const FIELD_MANAGER: &str = "herald";

/// What the writer keeps per Webhook between writes, in a compact form: the status to write is
/// built from it just before each write.
#[derive(Default)]
struct Entry {
    /// The Webhook's uid, once seen: Events refer to it (the rest of the reference is the key).
    uid: Option<Box<str>>,
    /// The generation last reconciled (`observedGeneration`).
    generation: Option<i64>,
    ready: Option<Ready>,
    last_delivery: Option<LastDelivery>,
    /// Boxed: tests are rare.
    last_test: Option<Box<TestResult>>,
    failing: bool,
    /// The backlog and its limit while the backlog is near the limit.
    backlog_near_limit: Option<(usize, usize)>,
    dirty: bool,
    /// Picked by the write round under way.
    queued: bool,
}

/// The `Ready` condition as kept (its `observedGeneration` is the entry's generation).
struct Ready {
    /// Why the webhook cannot deliver; `None` when it can.
    not_ready: Option<Box<NotReady>>,
    since: Timestamp,
}

const READY_REASON: &str = "Ready";
const READY_MESSAGE: &str = "the webhook can deliver";
/// The reason of a Ready condition that is True while the backlog is near its limit.
const BACKLOG_NEAR_LIMIT: &str = "BacklogNearLimit";

/// The note of a backlog near its limit, in the Ready condition and its Event.
fn backlog_message(backlog: usize, limit: usize) -> String {
    format!(
        "the webhook can deliver, but its backlog holds {backlog} deliveries of its limit of {limit} (--backlog-limit); past the limit, new deliveries to it become dead letters (replayable)"
    )
}

impl Ready {
    fn status(&self) -> &'static str {
        if self.not_ready.is_some() {
            "False"
        } else {
            "True"
        }
    }

    fn reason(&self) -> &'static str {
        self.not_ready
            .as_ref()
            .map_or(READY_REASON, |n| n.reason.as_str())
    }

    fn message(&self) -> &str {
        self.not_ready
            .as_ref()
            .map_or(READY_MESSAGE, |n| n.message.as_str())
    }

    fn condition(&self, generation: Option<i64>) -> Condition {
        Condition {
            type_: "Ready".into(),
            status: self.status().into(),
            reason: self.reason().into(),
            message: self.message().into(),
            observed_generation: generation,
            last_transition_time: Time(self.since),
        }
    }
}

/// The most recent delivery as kept: a success keeps its counts, and its message is written
/// from them.
struct LastDelivery {
    time: Timestamp,
    outcome: DeliveryOutcome,
    http_status: Option<u16>,
    summary: Summary,
}

enum Summary {
    Delivered { alerts: usize, attempts: u32 },
    Text(Box<str>),
}

impl Summary {
    fn message(&self) -> String {
        match self {
            Summary::Delivered { alerts, attempts } => {
                format!("delivered {alerts} alert(s) in {attempts} attempt(s)")
            }
            Summary::Text(text) => text.to_string(),
        }
    }
}

impl LastDelivery {
    fn result(&self) -> DeliveryResult {
        DeliveryResult {
            time: Time(self.time),
            outcome: self.outcome,
            http_status: self.http_status,
            message: self.summary.message(),
        }
    }
}

impl From<&DeliveryResult> for LastDelivery {
    fn from(result: &DeliveryResult) -> Self {
        LastDelivery {
            time: result.time.0,
            outcome: result.outcome,
            http_status: result.http_status,
            summary: Summary::Text(result.message.as_str().into()),
        }
    }
}

/// The Ready condition to write: a webhook that can deliver while its backlog is near its
/// limit says so in the reason and message (the status stays `True`).
fn ready_condition(
    ready: &Ready,
    generation: Option<i64>,
    backlog_near_limit: Option<(usize, usize)>,
) -> Condition {
    let mut condition = ready.condition(generation);
    if let (None, Some((backlog, limit))) = (&ready.not_ready, backlog_near_limit) {
        condition.reason = BACKLOG_NEAR_LIMIT.into();
        condition.message = backlog_message(backlog, limit);
    }
    condition
}

/// The reference Events give for a Webhook.
fn reference(key: &ObjectKey, uid: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some(<Webhook as kube::Resource>::api_version(&()).into_owned()),
        kind: Some(<Webhook as kube::Resource>::kind(&()).into_owned()),
        name: Some(key.name.to_string()),
        namespace: Some(key.namespace.to_string()),
        uid: (!uid.is_empty()).then(|| uid.to_string()),
        ..ObjectReference::default()
    }
}

/// Sets the entry's Ready condition; whether it differs from what was known (the entry's, or
/// else `previous` from the object's status).
fn update_ready(
    entry: &mut Entry,
    previous: Option<&Condition>,
    generation: Option<i64>,
    readiness: &Result<(), NotReady>,
) -> bool {
    let (status, reason, message) = match readiness {
        Ok(()) => ("True", READY_REASON, READY_MESSAGE),
        Err(not_ready) => (
            "False",
            not_ready.reason.as_str(),
            not_ready.message.as_str(),
        ),
    };
    let message = truncate(message, 1024);
    // The known condition's status, whether it equals the new one, and since when it holds.
    let known = match (&entry.ready, previous) {
        (Some(r), _) => Some((
            r.status(),
            r.reason() == reason && r.message() == message && entry.generation == generation,
            r.since,
        )),
        (None, Some(c)) => Some((
            c.status.as_str(),
            c.reason == reason && c.message == message && c.observed_generation == generation,
            c.last_transition_time.0,
        )),
        (None, None) => None,
    };
    let unchanged = known.is_some_and(|(s, same, _)| s == status && same);
    let since = match known {
        Some((s, _, since)) if s == status => since,
        _ => Timestamp::now(),
    };
    entry.generation = generation;
    entry.ready = Some(Ready {
        not_ready: readiness.as_ref().err().map(|n| {
            Box::new(NotReady {
                reason: n.reason,
                message: message.into_owned(),
            })
        }),
        since,
    });
    !unchanged
}

/// What the writer keeps per NotificationCondition.
struct ConditionEntry {
    /// The generation last applied.
    generation: Option<i64>,
    /// The Ready condition as last written or found on the object: a digest of its message,
    /// its generation and since when it holds.
    written: Option<(u64, Option<i64>, Timestamp)>,
}

/// A digest of a message, to tell whether it changed without keeping it.
fn digest(message: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    message.hash(&mut hasher);
    hasher.finish()
}

/// Most Webhook names a condition's message lists.
const USERS_LISTED: usize = 10;

/// The message of a condition's Ready: how many Webhooks use it, and the first few by name.
fn users_message(users: &[Arc<str>]) -> String {
    match users.len() {
        0 => "used by no Webhook".to_string(),
        n => {
            let listed: Vec<&str> = users.iter().take(USERS_LISTED).map(|u| &**u).collect();
            let more = if n > USERS_LISTED {
                format!(" and {} more", n - USERS_LISTED)
            } else {
                String::new()
            };
            format!("used by {n} Webhook(s): {}{more}", listed.join(", "))
        }
    }
}

/// Coalescing writer of Webhook and NotificationCondition status and Events.
pub struct StatusWriter {
    client: kube::Client,
    recorder: Recorder,
    dispatcher: Dispatcher,
    leader: watch::Receiver<bool>,
    /// Whether the controller has seen every watched object once.
    synced: AtomicBool,
    /// Boxed: the map's spare capacity should not hold an entry's size.
    entries: Mutex<HashMap<ObjectKey, Box<Entry>>>,
    conditions: Mutex<HashMap<ObjectKey, ConditionEntry>>,
    /// Namespaces whose conditions' status must be worked out again (a Webhook or condition
    /// in it changed).
    condition_namespaces: Mutex<HashSet<Arc<str>>>,
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

fn truncate(message: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if message.len() <= max {
        return message.into();
    }
    let mut end = max;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end]).into()
}

impl StatusWriter {
    /// A writer that writes while `leader` holds true, once [`StatusWriter::set_synced`].
    pub fn new(
        client: kube::Client,
        recorder: Recorder,
        dispatcher: Dispatcher,
        leader: watch::Receiver<bool>,
    ) -> Self {
        StatusWriter {
            client,
            recorder,
            dispatcher,
            leader,
            synced: AtomicBool::new(false),
            entries: Mutex::new(HashMap::new()),
            conditions: Mutex::new(HashMap::new()),
            condition_namespaces: Mutex::new(HashSet::new()),
            wake: Notify::new(),
        }
    }

    /// The controller has seen every watched object: writes may begin.
    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Whether this replica writes: it leads, and the table is complete.
    fn acting(&self) -> bool {
        *self.leader.borrow() && self.synced.load(Ordering::SeqCst)
    }

    /// Records a NotificationCondition's generation (status already on the object seeds what
    /// was written, so an unchanged status is not written again).
    pub fn set_condition(&self, condition: &NotificationCondition) {
        let Some(key) = super::key_of(condition) else {
            return;
        };
        let written = condition.status.as_ref().and_then(|status| {
            let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
            Some((
                digest(&ready.message),
                status.observed_generation,
                ready.last_transition_time.0,
            ))
        });
        let mut conditions = self.conditions.lock().unwrap_or_else(|e| e.into_inner());
        let entry = conditions.entry(key.clone()).or_insert(ConditionEntry {
            generation: None,
            written,
        });
        entry.generation = condition.metadata.generation;
        drop(conditions);
        self.namespace_changed(&key.namespace);
    }

    /// Forgets a deleted NotificationCondition.
    pub fn forget_condition(&self, key: &ObjectKey) {
        self.conditions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// Something in a namespace changed that may change which Webhooks use its conditions.
    pub fn namespace_changed(&self, namespace: &Arc<str>) {
        self.condition_namespaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(namespace.clone());
        self.wake.notify_one();
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, Box<Entry>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a Webhook's readiness for its current generation. Status already on the object
    /// seeds what this writer keeps (so a restart does not erase the last results).
    pub fn set_ready(&self, webhook: &Webhook, readiness: &Result<(), NotReady>) {
        let Some(key) = super::key_of(webhook) else {
            return;
        };
        let mut entries = self.entries();
        let entry = entries.entry(key).or_default();
        let existing = webhook.status.as_ref();
        let observed_generation = match existing {
            Some(status) => status.observed_generation,
            None if entry.uid.is_some() => entry.generation,
            None => None,
        };
        if entry.uid.is_none()
            && let Some(existing) = existing
        {
            entry.last_delivery = existing.last_delivery.as_ref().map(LastDelivery::from);
            entry.last_test = existing.last_test.clone().map(Box::new);
            entry.failing = existing
                .last_delivery
                .as_ref()
                .is_some_and(|d| d.outcome == DeliveryOutcome::Failed);
        }
        // Some once seen, even without a uid (then Events carry none).
        let uid = webhook.metadata.uid.as_deref().unwrap_or_default();
        if entry.uid.as_deref() != Some(uid) {
            entry.uid = Some(uid.into());
        }
        let previous = existing.and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
        let changed = update_ready(entry, previous, webhook.metadata.generation, readiness);
        if changed || observed_generation != webhook.metadata.generation {
            entry.dirty = true;
            self.wake.notify_one();
        }
    }

    /// Records the readiness of a Webhook already seen by [`StatusWriter::set_ready`] (after a
    /// condition it names came or went); unknown Webhooks are left alone.
    pub fn refresh_ready(&self, key: &ObjectKey, readiness: &Result<(), NotReady>) {
        let mut entries = self.entries();
        let Some(entry) = entries.get_mut(key).filter(|e| e.uid.is_some()) else {
            return;
        };
        let generation = entry.generation;
        if update_ready(entry, None, generation, readiness) {
            entry.dirty = true;
            self.wake.notify_one();
        }
    }

    /// Whether the Webhook `uid` at `generation` is the one last recorded for `key` (its status
    /// is current: labels and annotations aside, a new version changes nothing Herald reads).
    pub fn is_current(&self, key: &ObjectKey, uid: Option<&str>, generation: Option<i64>) -> bool {
        generation.is_some()
            && self.entries().get(key).is_some_and(|e| {
                e.uid.as_deref() == Some(uid.unwrap_or_default()) && e.generation == generation
            })
    }

    /// Records the result of the test asked for with the Webhook's current token, as its status
    /// shows it (written by another replica): a replica that becomes leader then neither sends
    /// that test again nor writes an older result over it.
    pub fn observe_test(&self, webhook: &Webhook, token: &str) {
        let Some(key) = super::key_of(webhook) else {
            return;
        };
        let Some(test) = webhook
            .status
            .as_ref()
            .and_then(|s| s.last_test.as_ref())
            .filter(|t| t.token == token)
        else {
            return;
        };
        if let Some(entry) = self.entries().get_mut(&key)
            && entry.last_test.as_ref().is_none_or(|t| t.token != token)
        {
            entry.last_test = Some(Box::new(test.clone()));
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
        let message = truncate(&message, 1024).into_owned();
        let reference = {
            let mut entries = self.entries();
            let entry = entries.entry(key.clone()).or_default();
            entry.last_test = Some(Box::new(TestResult {
                token: token.to_string(),
                time: now(),
                outcome,
                http_status,
                message: message.clone(),
            }));
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
        if !self.acting() {
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
            if self.acting() {
                self.flush().await;
            }
            // Coalesce: at most one round of writes per interval.
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(interval) => {}
            }
        }
        if self.acting() {
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
    /// so writing thousands does not hold thousands of copies). The round covers the entries
    /// dirty when it starts, taken a few at a time; what turns dirty meanwhile waits for the next.
    pub async fn flush(&self) {
        self.flush_webhooks().await;
        self.flush_conditions().await;
    }

    /// Writes the status of every condition in the namespaces marked changed whose Ready
    /// message or generation differs from what was written.
    async fn flush_conditions(&self) {
        let namespaces: HashSet<Arc<str>> = self
            .condition_namespaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        if namespaces.is_empty() {
            return;
        }
        // Which Webhooks each condition of those namespaces applies to, in one pass.
        let mut users: HashMap<ObjectKey, Vec<Arc<str>>> = HashMap::new();
        {
            let table = self.dispatcher.table();
            let mut webhooks: Vec<&ObjectKey> = table
                .webhooks()
                .map(|w| &w.key)
                .filter(|k| namespaces.contains(&k.namespace))
                .collect();
            webhooks.sort();
            for key in webhooks {
                for condition in table.conditions_of(key) {
                    users
                        .entry(ObjectKey::new(key.namespace.clone(), condition))
                        .or_default()
                        .push(key.name.clone());
                }
            }
        }
        let due: Vec<(ObjectKey, String, Option<i64>)> = self
            .conditions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(key, _)| namespaces.contains(&key.namespace))
            .filter_map(|(key, entry)| {
                let message = users_message(users.get(key).map(Vec::as_slice).unwrap_or_default());
                let same = entry
                    .written
                    .as_ref()
                    .is_some_and(|(m, g, _)| *m == digest(&message) && *g == entry.generation);
                (!same).then(|| (key.clone(), message, entry.generation))
            })
            .collect();
        for (key, message, generation) in due {
            if let Err(e) = self.write_condition(&key, &message, generation).await {
                tracing::warn!("{e}");
                self.dispatcher
                    .metrics()
                    .controller
                    .error("NotificationCondition", e.metric_label());
                // Worked out again at the next round.
                self.namespace_changed(&key.namespace);
            }
        }
    }

    /// Writes an object's status with server-side apply, as Herald's field manager.
    async fn apply_status<K>(
        &self,
        key: &ObjectKey,
        status: &impl serde::Serialize,
    ) -> Result<(), kube::Error>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), &key.namespace);
        let patch = serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "status": status,
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        api.patch_status(&key.name, &params, &Patch::Apply(&patch))
            .await
            .map(|_| ())
    }

    /// Writes one condition's status: `Ready` with the Webhooks that use it.
    async fn write_condition(
        &self,
        key: &ObjectKey,
        message: &str,
        generation: Option<i64>,
    ) -> Result<(), ReconcileError> {
        let since = self
            .conditions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .and_then(|e| e.written.as_ref().map(|(_, _, since)| *since))
            .unwrap_or_else(Timestamp::now);
        let status = NotificationConditionStatus {
            observed_generation: generation,
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: READY_REASON.into(),
                message: message.to_string(),
                observed_generation: generation,
                last_transition_time: Time(since),
            }],
        };
        match self
            .apply_status::<NotificationCondition>(key, &status)
            .await
        {
            Ok(_) => {
                if let Some(entry) = self
                    .conditions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_mut(key)
                {
                    entry.written = Some((digest(message), generation, since));
                }
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                self.forget_condition(key);
                Ok(())
            }
            Err(source) => Err(ReconcileError::StatusWrite {
                kind: "NotificationCondition",
                object: key.clone(),
                source,
            }),
        }
    }

    async fn flush_webhooks(&self) {
        const BATCH: usize = 64;
        for entry in self.entries().values_mut() {
            entry.queued = entry.dirty && entry.uid.is_some();
        }
        loop {
            let batch: Vec<ObjectKey> = self
                .entries()
                .iter_mut()
                .filter(|(_, e)| e.queued)
                .take(BATCH)
                .map(|(k, e)| {
                    e.queued = false;
                    k.clone()
                })
                .collect();
            if batch.is_empty() {
                break;
            }
            for key in batch {
                self.write(key).await;
            }
        }
    }

    /// Writes one Webhook's status, if still dirty.
    async fn write(&self, key: ObjectKey) {
        let status = {
            let mut entries = self.entries();
            let Some(e) = entries.get_mut(&key).filter(|e| e.dirty) else {
                return;
            };
            e.dirty = false;
            WebhookStatus {
                observed_generation: e.generation,
                conditions: e
                    .ready
                    .iter()
                    .map(|r| ready_condition(r, e.generation, e.backlog_near_limit))
                    .collect(),
                last_delivery: e.last_delivery.as_ref().map(LastDelivery::result),
                last_test: e.last_test.as_deref().cloned(),
            }
        };
        match self.apply_status::<Webhook>(&key, &status).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {
                self.entries().remove(&key);
            }
            Err(source) => {
                let error = ReconcileError::StatusWrite {
                    kind: "Webhook",
                    object: key.clone(),
                    source,
                };
                tracing::warn!("{error}");
                self.dispatcher
                    .metrics()
                    .controller
                    .error("Webhook", error.metric_label());
                if let Some(entry) = self.entries().get_mut(&key) {
                    entry.dirty = true;
                }
            }
        }
    }
}

impl DeliveryObserver for StatusWriter {
    fn backlog(&self, webhook: &ObjectKey, state: BacklogState) {
        let reference = {
            let mut entries = self.entries();
            let Some(entry) = entries.get_mut(webhook) else {
                return;
            };
            entry.backlog_near_limit = state.near_limit.then_some((state.backlog, state.limit));
            entry.dirty = true;
            entry.uid.as_deref().map(|uid| reference(webhook, uid))
        };
        self.wake.notify_one();
        if let Some(reference) = reference {
            if state.near_limit {
                let note = backlog_message(state.backlog, state.limit);
                self.publish(
                    reference,
                    EventType::Warning,
                    BACKLOG_NEAR_LIMIT,
                    "Deliver",
                    note,
                );
            } else {
                let note = format!(
                    "the webhook's backlog is back to {} deliveries of its limit of {}",
                    state.backlog, state.limit
                );
                self.publish(
                    reference,
                    EventType::Normal,
                    "BacklogRecovered",
                    "Deliver",
                    note,
                );
            }
        }
    }

    fn report(&self, report: &DeliveryReport) {
        if report.test {
            return;
        }
        let outcome = match report.outcome {
            ReportOutcome::Succeeded => DeliveryOutcome::Succeeded,
            ReportOutcome::Failed | ReportOutcome::Dropped => DeliveryOutcome::Failed,
        };
        let summary = match report.outcome {
            ReportOutcome::Succeeded => Summary::Delivered {
                alerts: report.alerts,
                attempts: report.attempts,
            },
            _ => Summary::Text(truncate(&report.message, 1024).into()),
        };
        let event = {
            let mut entries = self.entries();
            let Some(entry) = entries.get_mut(&report.webhook) else {
                return;
            };
            let failing = outcome == DeliveryOutcome::Failed;
            let changed = failing != entry.failing;
            entry.failing = failing;
            entry.dirty = true;
            let event = entry
                .uid
                .as_deref()
                .filter(|_| changed)
                .map(|uid| (reference(&report.webhook, uid), summary.message()));
            entry.last_delivery = Some(LastDelivery {
                time: report.finished_at,
                outcome,
                http_status: report.http_status,
                summary,
            });
            event
        };
        if let Some((reference, message)) = event {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::NotReadyReason;

    #[test]
    fn a_conditions_message_names_its_first_users() {
        assert_eq!(users_message(&[]), "used by no Webhook");
        let users: Vec<Arc<str>> = (0..12).map(|i| Arc::from(format!("w{i:02}"))).collect();
        assert_eq!(users_message(&users[..2]), "used by 2 Webhook(s): w00, w01");
        assert_eq!(
            users_message(&users),
            "used by 12 Webhook(s): w00, w01, w02, w03, w04, w05, w06, w07, w08, w09 and 2 more"
        );
    }

    #[test]
    fn a_backlog_near_its_limit_shows_in_the_ready_reason_while_the_webhook_can_deliver() {
        let ready = Ready {
            not_ready: None,
            since: Timestamp::now(),
        };
        let plain = ready_condition(&ready, Some(2), None);
        assert_eq!(
            (plain.status.as_str(), plain.reason.as_str()),
            ("True", "Ready")
        );
        let near = ready_condition(&ready, Some(2), Some((80_000, 100_000)));
        assert_eq!(near.status, "True");
        assert_eq!(near.reason, BACKLOG_NEAR_LIMIT);
        assert!(
            near.message.contains("80000") && near.message.contains("100000"),
            "{}",
            near.message
        );
        let not_ready = Ready {
            not_ready: Some(Box::new(NotReady {
                reason: NotReadyReason::Disabled,
                message: "disabled".into(),
            })),
            since: Timestamp::now(),
        };
        let disabled = ready_condition(&not_ready, Some(2), Some((80_000, 100_000)));
        assert_eq!(
            (disabled.status.as_str(), disabled.reason.as_str()),
            ("False", "Disabled"),
            "a webhook that cannot deliver keeps its own reason"
        );
    }
}
