//! The Kubernetes controller: watches Webhooks, NotificationConditions and Secrets (metadata
//! only; data is read just for the Secrets webhooks reference), keeps the core's routing table
//! and delivery targets current, writes status, publishes Events and sends test messages.

pub mod leader;
pub mod status;

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::stream::BoxStream;
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
use crate::dispatch::Dispatcher;
use crate::object::ObjectKey;
use crate::routing::ConditionInput;
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
        object.meta().namespace.as_deref()?,
        object.meta().name.as_deref()?,
    ))
}

/// A change seen by one of the watches (with the watch's index in the watched namespaces), or
/// an internal trigger.
enum Change {
    Webhook(usize, Box<Event<Webhook>>),
    Condition(usize, Event<NotificationCondition>),
    Secret(Event<PartialObjectMeta<Secret>>),
    KubeEvent(Box<Event<k8s_openapi::api::events::v1::Event>>),
    /// This replica became leader: rewrite status and look for pending tests.
    Elected,
    /// Read a Webhook again and reconcile it (a Secret it references changed, or an earlier
    /// read failed).
    Refetch(ObjectKey),
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

/// How many objects a watch's initial list (and every re-list) asks for at a time, where the
/// API server cannot stream lists: a page is read and decoded whole before its objects are
/// handled, so this bounds what a list holds at once.
const LIST_PAGE_SIZE: u32 = 100;

/// A watch of one API (Kubernetes' list-then-watch): its list comes as a stream of single
/// objects (a streaming list, `sendInitialEvents`), so that listing thousands of objects never
/// holds more than one of them. An API server that refuses streaming lists (the `WatchList`
/// feature: missing before Kubernetes 1.27, off by default in some later releases) answers the
/// first watch with 400 or 422: the watch then lists in pages of [`LIST_PAGE_SIZE`] instead.
fn list_watch<K>(api: Api<K>, what: &'static str) -> BoxStream<'static, watcher::Result<Event<K>>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    let streaming = watcher::watcher(api.clone(), watcher::Config::default().streaming_lists());
    // The API to list in pages, until the server has shown it streams.
    let fallback = Some(api);
    futures::stream::unfold(
        (streaming.boxed(), fallback),
        move |(mut stream, mut fallback)| async move {
            loop {
                let item = stream.next().await?;
                match &item {
                    Err(watcher::Error::WatchStartFailed(kube::Error::Api(status)))
                        if matches!(status.code, 400 | 422) =>
                    {
                        if let Some(api) = fallback.take() {
                            tracing::info!(
                                "{what}: the API server does not stream lists ({}): listing in pages",
                                status.message
                            );
                            let config = watcher::Config::default().page_size(LIST_PAGE_SIZE);
                            stream = watcher::watcher(api, config).boxed();
                            continue;
                        }
                    }
                    Ok(_) => fallback = None,
                    Err(_) => {}
                }
                return Some((item, (stream, fallback)));
            }
        },
    )
    .boxed()
}

/// One watch stream per namespace (or one for all), each event wrapped as a `Change` with the
/// index of its watch.
fn watch<K>(
    client: &Client,
    namespaces: &[String],
    what: &'static str,
    wrap: fn(usize, Event<K>) -> Change,
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
        .enumerate()
        .map(|(index, api)| -> ChangeStream {
            Box::pin(
                list_watch(api, what)
                    .default_backoff()
                    .map(move |e| match e {
                        Ok(e) => wrap(index, e),
                        Err(e) => Change::WatchError(format!("{what}: {e}")),
                    }),
            )
        })
        .collect()
}

/// The `herald.dev/send-test` token of a Webhook, when set.
fn test_token(webhook: &Webhook) -> Option<&str> {
    webhook
        .annotations()
        .get(TEST_ANNOTATION)
        .map(String::as_str)
        .filter(|t| !t.is_empty())
}

fn watches(client: &Client, namespaces: &[String], watch_events: bool) -> Vec<ChangeStream> {
    let mut streams = watch::<Webhook>(client, namespaces, "webhooks", |i, e| {
        Change::Webhook(i, Box::new(e))
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
        |_, e| Change::Secret(e),
    ));
    if watch_events {
        streams.extend(watch::<k8s_openapi::api::events::v1::Event>(
            client,
            namespaces,
            "events",
            |_, e| Change::KubeEvent(Box::new(e)),
        ));
    }
    streams
}

/// How long to wait before reading a Webhook again after a read failed.
const REFETCH_DELAY: Duration = Duration::from_secs(5);

/// The controller's state, owned by its event loop. What it knows of each Webhook lives where
/// it is used: the routing table holds its labels and routing spec, the status writer its uid
/// and the generation last reconciled. Only test requests and Secret references are kept here,
/// for the Webhooks that have them; a Webhook is read again when a Secret it references changes.
struct Controller {
    client: Client,
    herald: Dispatcher,
    status: Arc<StatusWriter>,
    leader: Arc<AtomicBool>,
    /// The watched namespaces, in watch order; empty when one watch covers every namespace.
    namespaces: Vec<String>,
    /// The `herald.dev/send-test` token of each Webhook that has one.
    test_tokens: HashMap<ObjectKey, Box<str>>,
    /// The names of the Secrets each Webhook references, for those that reference any.
    secret_refs: HashMap<ObjectKey, Box<[String]>>,
    /// Secret data by namespace/name; `None` records that the Secret does not exist.
    secrets: HashMap<ObjectKey, Option<SecretData>>,
    secret_versions: HashMap<ObjectKey, String>,
    /// Per watch, the Webhooks seen during its current re-list, to find what went away (`None`
    /// outside a re-list, and during a list that cannot find any: nothing in its namespaces
    /// was known when it began).
    relisting_webhooks: Vec<Option<HashSet<ObjectKey>>>,
    /// The same for NotificationConditions.
    relisting_conditions: Vec<Option<HashSet<ObjectKey>>>,
    /// Per watch, whether its first list is complete.
    synced_webhooks: Vec<bool>,
    synced_conditions: Vec<bool>,
    tests_in_flight: Arc<std::sync::Mutex<HashSet<(ObjectKey, String)>>>,
    /// Webhooks to read again (after a failed read), fed back into the event loop.
    refetch: mpsc::UnboundedSender<ObjectKey>,
    /// The Webhooks waiting to be read again: a new reason to read one changes nothing.
    refetch_pending: HashSet<ObjectKey>,
    events: crate::events::EventLedger,
}

impl Controller {
    /// Whether a namespace belongs to the watch with this index.
    fn in_scope(&self, watch: usize, namespace: &str) -> bool {
        self.namespaces.get(watch).is_none_or(|ns| ns == namespace)
    }

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

    /// Whether a new version of a Webhook gives Herald the same inputs as the one last
    /// reconciled: same object and spec (generation), labels (for `webhookSelector`) and test
    /// token. Herald's own status writes come back as such versions.
    fn unchanged(&self, key: &ObjectKey, webhook: &Webhook) -> bool {
        self.status.is_current(
            key,
            webhook.metadata.uid.as_deref(),
            webhook.metadata.generation,
        ) && self.test_tokens.get(key).map(|t| &**t) == test_token(webhook)
            && self.herald.table().webhook(key).is_some_and(|kept| {
                kept.labels.iter().eq(webhook
                    .labels()
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())))
            })
    }

    async fn reconcile(&mut self, webhook: &Webhook) {
        let Some(key) = key_of(webhook) else { return };
        let names = referenced_secrets(&webhook.spec);
        let mut secrets: HashMap<String, SecretData> = HashMap::new();
        for name in &names {
            match self
                .secret(&ObjectKey::new(key.namespace.clone(), name.as_str()))
                .await
            {
                Ok(Some(data)) => {
                    secrets.insert(name.clone(), data);
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
        if names.is_empty() {
            self.secret_refs.remove(&key);
        } else {
            self.secret_refs
                .insert(key.clone(), names.into_iter().collect());
        }
        let token = test_token(webhook);
        match token {
            Some(token) => {
                self.test_tokens.insert(key.clone(), token.into());
            }
            None => {
                self.test_tokens.remove(&key);
            }
        }
        self.maybe_send_test(&key, token, webhook.status.as_ref());
    }

    /// Reads a Webhook again and reconciles it; a failed read is retried after a while.
    async fn refetch(&mut self, key: ObjectKey) {
        if self.refetch_pending.contains(&key) {
            return;
        }
        let api: Api<Webhook> = Api::namespaced(self.client.clone(), &key.namespace);
        match api.get_opt(&key.name).await {
            Ok(Some(webhook)) => self.reconcile(&webhook).await,
            // Deleted: its watch removes it.
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(webhook = %key, "cannot read Webhook (retrying): {e}");
                self.refetch_pending.insert(key.clone());
                let refetch = self.refetch.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(REFETCH_DELAY).await;
                    let _ = refetch.send(key);
                });
            }
        }
    }

    /// A condition came or went: refresh the readiness shown by the webhooks that name it.
    /// Skipped during the initial sync, which ends with one pass over every webhook.
    fn refresh_condition(&self, condition: &ObjectKey) {
        if !self.herald.is_ready() {
            return;
        }
        let table = self.herald.table();
        for webhook in table.webhooks() {
            if webhook.key.namespace == condition.namespace
                && webhook
                    .spec
                    .conditions
                    .iter()
                    .any(|c| *c == *condition.name)
                && let Some(readiness) = table.readiness(&webhook.key)
            {
                self.status.refresh_ready(&webhook.key, &readiness);
            }
        }
    }

    /// Writes the readiness of every webhook (once the initial sync is complete).
    fn refresh_all(&self) {
        let table = self.herald.table();
        for webhook in table.webhooks() {
            if let Some(readiness) = table.readiness(&webhook.key) {
                self.status.refresh_ready(&webhook.key, &readiness);
            }
        }
    }

    /// Sends the test message asked for with `token`, unless it was sent already (as recorded
    /// in `status`, the object's, or by the status writer) or is being sent.
    fn maybe_send_test(
        &self,
        key: &ObjectKey,
        token: Option<&str>,
        status: Option<&crate::crd::WebhookStatus>,
    ) {
        if !self.leader.load(Ordering::SeqCst) {
            return;
        }
        let Some(token) = token else {
            return;
        };
        let done = status
            .and_then(|s| s.last_test.as_ref())
            .is_some_and(|t| t.token == token)
            || self.status.tested(key, token);
        if done {
            return;
        }
        let flight = (key.clone(), token.to_string());
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
        let token = token.to_string();
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
        self.herald.delete_webhook(key);
        self.status.forget(key);
        self.test_tokens.remove(key);
        self.secret_refs.remove(key);
    }

    fn delete_condition(&mut self, key: &ObjectKey) {
        self.herald.delete_condition(key);
        self.refresh_condition(key);
    }

    fn is_synced(&self) -> bool {
        self.synced_webhooks.iter().all(|s| *s) && self.synced_conditions.iter().all(|s| *s)
    }

    async fn handle(&mut self, change: Change) {
        match change {
            Change::Webhook(watch, event) => match *event {
                Event::Init => {
                    let known = self
                        .herald
                        .table()
                        .webhooks()
                        .any(|w| self.in_scope(watch, &w.key.namespace));
                    if let Some(seen) = self.relisting_webhooks.get_mut(watch) {
                        *seen = known.then(HashSet::new);
                    }
                }
                Event::InitApply(webhook) | Event::Apply(webhook) => {
                    let Some(key) = key_of(&webhook) else { return };
                    if self.unchanged(&key, &webhook) {
                        if let Some(token) = test_token(&webhook) {
                            self.status.observe_test(&webhook, token);
                        }
                    } else {
                        self.reconcile(&webhook).await;
                    }
                    if let Some(Some(seen)) = self.relisting_webhooks.get_mut(watch) {
                        seen.insert(key);
                    }
                }
                Event::Delete(webhook) => {
                    if let Some(key) = key_of(&webhook) {
                        self.delete_webhook(&key);
                    }
                }
                Event::InitDone => {
                    if let Some(seen) = self
                        .relisting_webhooks
                        .get_mut(watch)
                        .and_then(Option::take)
                    {
                        let stale: Vec<ObjectKey> = self
                            .herald
                            .table()
                            .webhooks()
                            .filter(|w| {
                                self.in_scope(watch, &w.key.namespace) && !seen.contains(&w.key)
                            })
                            .map(|w| w.key.clone())
                            .collect();
                        for key in stale {
                            self.delete_webhook(&key);
                        }
                    }
                    if let Some(synced) = self.synced_webhooks.get_mut(watch) {
                        *synced = true;
                    }
                }
            },
            Change::Condition(watch, event) => match event {
                Event::Init => {
                    let known = self
                        .herald
                        .table()
                        .condition_keys()
                        .any(|k| self.in_scope(watch, &k.namespace));
                    if let Some(seen) = self.relisting_conditions.get_mut(watch) {
                        *seen = known.then(HashSet::new);
                    }
                }
                Event::InitApply(nc) | Event::Apply(nc) => {
                    let Some(key) = key_of(&nc) else { return };
                    self.herald.apply_condition(ConditionInput {
                        key: key.clone(),
                        spec: nc.spec,
                    });
                    self.refresh_condition(&key);
                    if let Some(Some(seen)) = self.relisting_conditions.get_mut(watch) {
                        seen.insert(key);
                    }
                }
                Event::Delete(nc) => {
                    if let Some(key) = key_of(&nc) {
                        self.delete_condition(&key);
                    }
                }
                Event::InitDone => {
                    if let Some(seen) = self
                        .relisting_conditions
                        .get_mut(watch)
                        .and_then(Option::take)
                    {
                        let stale: Vec<ObjectKey> = self
                            .herald
                            .table()
                            .condition_keys()
                            .filter(|k| self.in_scope(watch, &k.namespace) && !seen.contains(k))
                            .collect();
                        for key in stale {
                            self.delete_condition(&key);
                        }
                    }
                    if let Some(synced) = self.synced_conditions.get_mut(watch) {
                        *synced = true;
                    }
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
                let affected: Vec<ObjectKey> = self
                    .secret_refs
                    .iter()
                    .filter(|(k, names)| {
                        k.namespace == key.namespace && names.iter().any(|n| *n == *key.name)
                    })
                    .map(|(k, _)| k.clone())
                    .collect();
                for webhook in affected {
                    tracing::info!(webhook = %webhook, secret = %key, "Secret changed");
                    self.refetch(webhook).await;
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
                for (key, token) in &self.test_tokens {
                    self.maybe_send_test(key, Some(token), None);
                }
            }
            Change::Refetch(key) => {
                self.refetch_pending.remove(&key);
                self.refetch(key).await;
            }
            Change::WatchError(e) => tracing::warn!("watch error (retrying): {e}"),
        }
        if !self.herald.is_ready() && self.is_synced() {
            let (webhooks, conditions) = {
                let table = self.herald.table();
                (table.len(), table.condition_keys().count())
            };
            tracing::info!(webhooks, conditions, "initial sync done");
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
    herald: Dispatcher,
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
    let (refetch, refetches) = mpsc::unbounded_channel();
    streams.push(Box::pin(
        tokio_stream_from_unbounded(refetches).map(Change::Refetch),
    ));
    let mut changes = futures::stream::select_all(streams);
    let mut controller = Controller {
        client,
        herald,
        status,
        leader,
        namespaces: settings.watch_namespaces.clone(),
        test_tokens: HashMap::new(),
        secret_refs: HashMap::new(),
        secrets: HashMap::new(),
        secret_versions: HashMap::new(),
        relisting_webhooks: vec![None; watch_count],
        relisting_conditions: vec![None; watch_count],
        synced_webhooks: vec![false; watch_count],
        synced_conditions: vec![false; watch_count],
        tests_in_flight: Arc::default(),
        refetch,
        refetch_pending: HashSet::new(),
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

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use futures::StreamExt;
    use http_body_util::Full;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::Api;
    use kube::runtime::watcher::Event;

    use super::{LIST_PAGE_SIZE, list_watch};

    const OBJECT: &str = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"a","namespace":"ns","resourceVersion":"4"}}"#;

    /// A client of a mock API server that answers with `answer(uri)`, recording every
    /// request's URI. A mock: the shared test control plane serves streaming lists, and a
    /// kube-apiserver that refuses them (`--feature-gates=WatchList=false`) is not started for
    /// these two answers; tests/controller.rs covers the streaming path against the real one.
    fn client(answer: fn(&str) -> (u16, String)) -> (kube::Client, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let uri = request.uri().to_string();
            log.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(uri.clone());
            let (status, body) = answer(&uri);
            async move {
                let mut response = http::Response::new(Full::new(Bytes::from(body)));
                *response.status_mut() =
                    http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
                Ok::<_, Infallible>(response)
            }
        });
        (kube::Client::new(service, "ns"), seen)
    }

    /// The names of what the first three events of a watch carry: Init, one object, InitDone.
    async fn first_list(client: kube::Client) -> Vec<String> {
        let api: Api<ConfigMap> = Api::namespaced(client, "ns");
        list_watch(api, "configmaps")
            .take(3)
            .map(|event| match event {
                Ok(Event::Init) => "init".to_string(),
                Ok(Event::InitApply(object)) => object.metadata.name.unwrap_or_default(),
                Ok(Event::InitDone) => "done".to_string(),
                other => format!("unexpected: {other:?}"),
            })
            .collect()
            .await
    }

    #[tokio::test]
    async fn lists_by_streaming_when_the_server_can() {
        let (client, seen) = client(|uri| {
            assert!(uri.contains("sendInitialEvents=true"), "{uri}");
            let bookmark = r#"{"type":"BOOKMARK","object":{"apiVersion":"v1","kind":"ConfigMap","metadata":{"resourceVersion":"5","annotations":{"k8s.io/initial-events-end":"true"}}}}"#;
            (
                200,
                format!("{{\"type\":\"ADDED\",\"object\":{OBJECT}}}\n{bookmark}\n"),
            )
        });
        assert_eq!(first_list(client).await, ["init", "a", "done"]);
        assert_eq!(seen.lock().unwrap_or_else(|e| e.into_inner()).len(), 1);
    }

    #[tokio::test]
    async fn lists_in_pages_when_the_server_refuses_streaming() {
        let (client, seen) = client(|uri| {
            if uri.contains("sendInitialEvents=true") {
                let status = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled","reason":"Invalid","code":422}"#;
                (422, status.to_string())
            } else {
                let list = format!(
                    r#"{{"apiVersion":"v1","kind":"ConfigMapList","metadata":{{"resourceVersion":"5"}},"items":[{OBJECT}]}}"#
                );
                (200, list)
            }
        });
        assert_eq!(first_list(client).await, ["init", "a", "done"]);
        let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(
            seen[1].contains(&format!("limit={LIST_PAGE_SIZE}")),
            "{seen:?}"
        );
        assert!(!seen[1].contains("watch"), "{seen:?}");
    }
}
