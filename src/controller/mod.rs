//! The Kubernetes controller: watches Webhooks, NotificationConditions and Secrets (metadata
//! only; data is read just for the Secrets webhooks reference), keeps the core's routing table
//! and delivery targets current, writes status, publishes Events and sends test messages.

pub mod leader;
pub mod status;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::crd::{NotificationCondition, TEST_ANNOTATION, Webhook};
use crate::delivery::referenced_secrets;
use crate::herald::Herald;
use crate::routing::{ConditionInput, ObjectKey};
use crate::secret::SecretData;

use self::status::StatusWriter;

/// The name Herald reports Events as.
pub const CONTROLLER_NAME: &str = "herald";

/// What the controller watches and how it writes.
#[derive(Clone, Debug)]
pub struct ControllerSettings {
    /// Namespaces to watch; empty means all.
    pub watch_namespaces: Vec<String>,
    /// This replica's identity (pod name), for Events and the Lease.
    pub identity: String,
    /// How often status is written at most.
    pub status_interval: Duration,
    /// Watch Kubernetes Events for `Events` webhooks.
    pub watch_events: bool,
}

/// The namespace/name of a namespaced object, when it has both.
pub fn key_of<K: ResourceExt>(object: &K) -> Option<ObjectKey> {
    Some(ObjectKey::new(
        object.namespace()?,
        object.meta().name.clone()?,
    ))
}

/// A change seen by one of the watches, or an internal trigger.
enum Change {
    Webhook(Box<Event<Webhook>>),
    Condition(Event<NotificationCondition>),
    Secret(Event<PartialObjectMeta<Secret>>),
    KubeEvent(Box<Event<k8s_openapi::api::events::v1::Event>>),
    /// This replica became leader: rewrite status and look for pending tests.
    Elected,
    /// A watch failed; it retries by itself.
    WatchError(String),
}

type ChangeStream = Pin<Box<dyn Stream<Item = Change> + Send>>;

fn apis<K>(client: &Client, namespaces: &[String]) -> Vec<Api<K>>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    if namespaces.is_empty() {
        vec![Api::all(client.clone())]
    } else {
        namespaces
            .iter()
            .map(|ns| Api::namespaced(client.clone(), ns))
            .collect()
    }
}

/// One watch stream per namespace (or one for all), each event wrapped as a `Change`.
fn watch<K>(
    client: &Client,
    namespaces: &[String],
    what: &'static str,
    wrap: fn(Event<K>) -> Change,
) -> Vec<ChangeStream>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
    K::DynamicType: Default,
{
    use kube::runtime::WatchStreamExt;
    apis::<K>(client, namespaces)
        .into_iter()
        .map(|api| -> ChangeStream {
            Box::pin(
                watcher::watcher(api, watcher::Config::default())
                    .default_backoff()
                    .modify(trim)
                    .map(move |e| {
                        e.map_or_else(|e| Change::WatchError(format!("{what}: {e}")), wrap)
                    }),
            )
        })
        .collect()
}

/// Whether two versions of a Webhook give Herald the same inputs: same object, same spec
/// (generation), labels (for `webhookSelector`) and annotations (test requests).
fn same_inputs(kept: &Webhook, new: &Webhook) -> bool {
    kept.metadata.uid == new.metadata.uid
        && kept.metadata.generation.is_some()
        && kept.metadata.generation == new.metadata.generation
        && kept.metadata.labels == new.metadata.labels
        && kept.metadata.annotations == new.metadata.annotations
}

/// Drops what Herald never reads and the API server sends with every object: managed fields
/// and kubectl's copy of the last applied object (the largest parts of a small object).
fn trim<K: kube::Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

fn watches(client: &Client, namespaces: &[String], watch_events: bool) -> Vec<ChangeStream> {
    let mut streams = watch::<Webhook>(client, namespaces, "webhooks", |e| {
        Change::Webhook(Box::new(e))
    });
    streams.extend(watch::<NotificationCondition>(
        client,
        namespaces,
        "conditions",
        Change::Condition,
    ));
    streams.extend(watch::<PartialObjectMeta<Secret>>(
        client,
        namespaces,
        "secrets",
        Change::Secret,
    ));
    if watch_events {
        streams.extend(watch::<k8s_openapi::api::events::v1::Event>(
            client,
            namespaces,
            "events",
            |e| Change::KubeEvent(Box::new(e)),
        ));
    }
    streams
}

/// The controller's state, owned by its event loop.
struct Controller {
    client: Client,
    herald: Herald,
    status: Arc<StatusWriter>,
    leader: Arc<AtomicBool>,
    /// Boxed: a Webhook is large, and the map's spare capacity should not hold its size.
    webhooks: HashMap<ObjectKey, Box<Webhook>>,
    conditions: HashSet<ObjectKey>,
    /// Secret data by namespace/name; `None` records that the Secret does not exist.
    secrets: HashMap<ObjectKey, Option<SecretData>>,
    secret_versions: HashMap<ObjectKey, String>,
    /// Webhook and condition lists seen during the current re-list, to find what went away.
    relisting_webhooks: Option<HashSet<ObjectKey>>,
    relisting_conditions: Option<HashSet<ObjectKey>>,
    synced_webhooks: usize,
    synced_conditions: usize,
    tests_in_flight: Arc<std::sync::Mutex<HashSet<(ObjectKey, String)>>>,
    watch_count: usize,
    events: crate::events::EventLedger,
}

impl Controller {
    async fn secret(&mut self, key: &ObjectKey) -> Result<Option<SecretData>, kube::Error> {
        if let Some(cached) = self.secrets.get(key) {
            return Ok(cached.clone());
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &key.namespace);
        let data = api
            .get_opt(&key.name)
            .await?
            .map(|s| SecretData::from_secret(&s));
        self.secrets.insert(key.clone(), data.clone());
        Ok(data)
    }

    async fn reconcile(&mut self, webhook: &Webhook) {
        let Some(key) = key_of(webhook) else { return };
        let mut secrets: HashMap<String, SecretData> = HashMap::new();
        for name in referenced_secrets(&webhook.spec) {
            match self.secret(&ObjectKey::new(&key.namespace, &name)).await {
                Ok(Some(data)) => {
                    secrets.insert(name, data);
                }
                Ok(None) => {}
                Err(e) => {
                    // Treated as missing for now; the Secret watch brings the webhook back.
                    tracing::warn!(webhook = %key, secret = %name, "cannot read Secret: {e}");
                }
            }
        }
        let readiness = self.herald.apply_webhook(
            key.clone(),
            webhook.labels().clone(),
            webhook.spec.clone(),
            |name| secrets.get(name),
        );
        if let Err(not_ready) = &readiness {
            tracing::info!(webhook = %key, reason = %not_ready.reason, "webhook not ready: {}", not_ready.message);
        }
        self.status.set_ready(webhook, &readiness);
        self.maybe_send_test(&key, webhook);
    }

    /// A condition came or went: refresh the readiness shown by the webhooks that name it.
    /// Skipped during the initial sync, which ends with one pass over every webhook.
    fn refresh_condition(&self, condition: &ObjectKey) {
        if !self.herald.is_ready() {
            return;
        }
        let table = self.herald.table();
        for (key, webhook) in &self.webhooks {
            if key.namespace == condition.namespace
                && webhook.spec.conditions.contains(&condition.name)
                && let Some(readiness) = table.readiness(key)
            {
                self.status.set_ready(webhook, &readiness);
            }
        }
    }

    /// Writes the readiness of every webhook (once the initial sync is complete).
    fn refresh_all(&self) {
        let table = self.herald.table();
        for (key, webhook) in &self.webhooks {
            if let Some(readiness) = table.readiness(key) {
                self.status.set_ready(webhook, &readiness);
            }
        }
    }

    fn maybe_send_test(&self, key: &ObjectKey, webhook: &Webhook) {
        if !self.leader.load(Ordering::SeqCst) {
            return;
        }
        let Some(token) = webhook
            .annotations()
            .get(TEST_ANNOTATION)
            .filter(|t| !t.is_empty())
        else {
            return;
        };
        // The object's status, or what the status writer knows (the kept copy has no status).
        let done = webhook
            .status
            .as_ref()
            .and_then(|s| s.last_test.as_ref())
            .is_some_and(|t| &t.token == token)
            || self.status.tested(key, token);
        if done {
            return;
        }
        let flight = (key.clone(), token.clone());
        {
            let mut in_flight = self
                .tests_in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if !in_flight.insert(flight.clone()) {
                return;
            }
        }
        let herald = self.herald.clone();
        let status = self.status.clone();
        let in_flight = self.tests_in_flight.clone();
        let key = key.clone();
        let token = token.clone();
        tokio::spawn(async move {
            tracing::info!(webhook = %key, token = %token, "sending test message");
            let result = herald.send_test(&key).await;
            match &result {
                Ok(report) => status.record_test(&key, &token, Ok(report)),
                Err(e) => status.record_test(&key, &token, Err(e.to_string())),
            }
            status.flush().await;
            in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&flight);
        });
    }

    fn delete_webhook(&mut self, key: &ObjectKey) {
        self.webhooks.remove(key);
        self.herald.delete_webhook(key);
        self.status.forget(key);
    }

    fn is_synced(&self) -> bool {
        self.synced_webhooks >= self.watch_count && self.synced_conditions >= self.watch_count
    }

    async fn handle(&mut self, change: Change) {
        match change {
            Change::Webhook(event) => match *event {
                Event::Init => self.relisting_webhooks = Some(HashSet::new()),
                Event::InitApply(webhook) | Event::Apply(webhook) => {
                    let Some(key) = key_of(&webhook) else { return };
                    if let Some(seen) = self.relisting_webhooks.as_mut() {
                        seen.insert(key.clone());
                    }
                    // Herald's own status writes come back as events too: when neither the spec
                    // (generation), the labels nor the annotations changed, there is nothing to
                    // reconcile.
                    let unchanged = self
                        .webhooks
                        .get(&key)
                        .is_some_and(|kept| same_inputs(kept, &webhook));
                    if !unchanged {
                        self.reconcile(&webhook).await;
                    }
                    // The status writer keeps what it needs of the status (seeded at the first
                    // reconcile); the kept copy is for re-reconciling on Secret and condition
                    // changes.
                    let mut webhook = webhook;
                    webhook.status = None;
                    self.webhooks.insert(key, Box::new(webhook));
                }
                Event::Delete(webhook) => {
                    if let Some(key) = key_of(&webhook) {
                        self.delete_webhook(&key);
                    }
                }
                Event::InitDone => {
                    if let Some(seen) = self.relisting_webhooks.take() {
                        // Only this watch's namespaces can be judged by its list; with several
                        // namespaced watches each re-list covers its own namespace.
                        let namespaces: BTreeSet<&str> =
                            seen.iter().map(|k| k.namespace.as_str()).collect();
                        let stale: Vec<ObjectKey> = self
                            .webhooks
                            .keys()
                            .filter(|k| {
                                !seen.contains(*k)
                                    && (self.watch_count == 1
                                        || namespaces.contains(k.namespace.as_str()))
                            })
                            .cloned()
                            .collect();
                        for key in stale {
                            self.delete_webhook(&key);
                        }
                    }
                    self.synced_webhooks += 1;
                }
            },
            Change::Condition(event) => match event {
                Event::Init => self.relisting_conditions = Some(HashSet::new()),
                Event::InitApply(nc) | Event::Apply(nc) => {
                    let Some(key) = key_of(&nc) else { return };
                    if let Some(seen) = self.relisting_conditions.as_mut() {
                        seen.insert(key.clone());
                    }
                    self.herald.apply_condition(ConditionInput {
                        key: key.clone(),
                        spec: nc.spec,
                    });
                    self.conditions.insert(key.clone());
                    self.refresh_condition(&key);
                }
                Event::Delete(nc) => {
                    if let Some(key) = key_of(&nc) {
                        self.herald.delete_condition(&key);
                        self.conditions.remove(&key);
                        self.refresh_condition(&key);
                    }
                }
                Event::InitDone => {
                    if let Some(seen) = self.relisting_conditions.take() {
                        let namespaces: BTreeSet<String> =
                            seen.iter().map(|k| k.namespace.clone()).collect();
                        let stale: Vec<ObjectKey> = self
                            .conditions
                            .iter()
                            .filter(|k| {
                                !seen.contains(*k)
                                    && (self.watch_count == 1 || namespaces.contains(&k.namespace))
                            })
                            .cloned()
                            .collect();
                        for key in stale {
                            self.herald.delete_condition(&key);
                            self.conditions.remove(&key);
                            self.refresh_condition(&key);
                        }
                    }
                    self.synced_conditions += 1;
                }
            },
            Change::Secret(event) => {
                let (meta, deleted) = match event {
                    Event::Apply(m) | Event::InitApply(m) => (m, false),
                    Event::Delete(m) => (m, true),
                    Event::Init | Event::InitDone => return,
                };
                let Some(key) = key_of(&meta) else { return };
                let version = (!deleted).then(|| meta.resource_version().unwrap_or_default());
                let previous = match &version {
                    Some(v) => self.secret_versions.insert(key.clone(), v.clone()),
                    None => self.secret_versions.remove(&key),
                };
                if previous == version {
                    return;
                }
                // The first sighting of a Secret matters only to webhooks that found it missing;
                // ones that read it already hold its data.
                let known = previous.is_some() || matches!(self.secrets.get(&key), Some(None));
                if !known {
                    return;
                }
                self.secrets.remove(&key);
                let affected: Vec<Box<Webhook>> = self
                    .webhooks
                    .iter()
                    .filter(|(k, w)| {
                        k.namespace == key.namespace
                            && referenced_secrets(&w.spec).contains(&key.name)
                    })
                    .map(|(_, w)| w.clone())
                    .collect();
                for webhook in affected {
                    tracing::info!(webhook = %webhook.name_any(), secret = %key, "Secret changed");
                    self.reconcile(&webhook).await;
                }
            }
            Change::KubeEvent(event) => match *event {
                // Events that exist before a (re)list were delivered by whoever ran then:
                // remember their counts, deliver only what happens from now on.
                Event::InitApply(ev) => {
                    self.events.record(&ev);
                }
                Event::Apply(ev) => {
                    // Every replica sees every Event: only the leader delivers them.
                    if self.events.record(&ev)
                        && self.leader.load(Ordering::SeqCst)
                        && let Some(alert) = crate::events::to_alert(&ev)
                    {
                        let batch = crate::alert::AlertBatch {
                            alerts: vec![alert],
                            ..Default::default()
                        };
                        if let Err(e) = self.herald.dispatch(batch, crate::crd::WebhookType::Events)
                        {
                            tracing::warn!("cannot queue a Kubernetes Event: {e}");
                        }
                    }
                }
                Event::Delete(ev) => self.events.forget(&ev),
                Event::Init | Event::InitDone => {}
            },
            Change::Elected => {
                self.status.mark_all_dirty();
                let webhooks: Vec<(ObjectKey, Box<Webhook>)> = self
                    .webhooks
                    .iter()
                    .map(|(k, w)| (k.clone(), w.clone()))
                    .collect();
                for (key, webhook) in webhooks {
                    self.maybe_send_test(&key, &webhook);
                }
            }
            Change::WatchError(e) => tracing::warn!("watch error (retrying): {e}"),
        }
        if !self.herald.is_ready() && self.is_synced() {
            tracing::info!(
                webhooks = self.webhooks.len(),
                conditions = self.conditions.len(),
                "initial sync done"
            );
            // Deliveries accepted before a restart (with --data-dir) go out again now that
            // every webhook is known.
            if let Err(e) = self.herald.engine().resume() {
                tracing::error!("cannot resume pending deliveries: {e}");
            }
            self.herald.set_ready(true);
            self.refresh_all();
        }
    }
}

/// Runs the controller until `cancel` fires. Readiness turns on after the initial sync.
pub async fn run(
    client: Client,
    herald: Herald,
    settings: ControllerSettings,
    leader: Arc<AtomicBool>,
    elected: mpsc::UnboundedReceiver<()>,
    cancel: CancellationToken,
) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: CONTROLLER_NAME.into(),
            instance: Some(settings.identity.clone()),
        },
    );
    let status = Arc::new(StatusWriter::new(client.clone(), recorder, leader.clone()));
    herald.engine().observe(status.clone());
    let writer = tokio::spawn(status.clone().run(settings.status_interval, cancel.clone()));

    let watch_count = settings.watch_namespaces.len().max(1);
    let mut streams = watches(&client, &settings.watch_namespaces, settings.watch_events);
    streams.push(Box::pin(
        tokio_stream_from_unbounded(elected).map(|()| Change::Elected),
    ));
    let mut changes = futures::stream::select_all(streams);
    let mut controller = Controller {
        client,
        herald,
        status,
        leader,
        webhooks: HashMap::new(),
        conditions: HashSet::new(),
        secrets: HashMap::new(),
        secret_versions: HashMap::new(),
        relisting_webhooks: None,
        relisting_conditions: None,
        synced_webhooks: 0,
        synced_conditions: 0,
        tests_in_flight: Arc::default(),
        watch_count,
        events: crate::events::EventLedger::default(),
    };
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            change = changes.next() => match change {
                Some(change) => controller.handle(change).await,
                None => break,
            },
        }
    }
    let _ = writer.await;
}

fn tokio_stream_from_unbounded<T: Send + 'static>(
    mut rx: mpsc::UnboundedReceiver<T>,
) -> impl Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
