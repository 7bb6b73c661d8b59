//! The Kubernetes controller: watches Webhooks, NotificationConditions and Secrets (metadata
//! only; data is read just for the Secrets webhooks reference), keeps the core's routing table
//! and delivery targets current, writes status, publishes Events and sends test messages.
//!
//! Pure parts and plumbing are apart: [`index`] keeps what the watches have shown and answers
//! what must be done, fed by watch events alone and tested without an API server; this module
//! is the plumbing that runs the watches, reads Secrets and Webhooks off the event loop, and
//! acts on the core and the status writer. [`relist`] is the list bookkeeping shared with the
//! standalone folder source.

pub mod index;
pub mod kube_events;
pub mod leader;
pub mod relist;
pub mod status;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::crd::{NotificationCondition, Webhook, WebhookStatus};
use crate::delivery::referenced_secrets;
use crate::dispatch::Dispatcher;
use crate::object::{NotReady, NotReadyReason, ObjectKey};
use crate::routing::ConditionInput;
use crate::secret::SecretData;

use self::index::{Index, Kind, test_token};
use self::leader::EventsBookmark;
use self::status::StatusWriter;

pub use self::index::key_of;

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

/// What goes wrong in the controller's work, each with the object it concerns. Every variant
/// has a short label for `herald_reconcile_errors_total{error}`.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A Secret a Webhook references could not be read (the Webhook is read again later).
    #[error("cannot read Secret {secret} for Webhook {webhook}: {source}")]
    SecretRead {
        /// The Webhook.
        webhook: ObjectKey,
        /// The Secret's name.
        secret: String,
        /// Why.
        source: kube::Error,
    },
    /// A Webhook could not be read again (after a Secret change or a failed read).
    #[error("cannot read Webhook {webhook}: {source}")]
    WebhookRead {
        /// The Webhook.
        webhook: ObjectKey,
        /// Why.
        source: kube::Error,
    },
    /// A status write failed (it is written again at the next round).
    #[error("cannot write the status of {kind} {object}: {source}")]
    StatusWrite {
        /// `Webhook` or `NotificationCondition`.
        kind: &'static str,
        /// The object.
        object: ObjectKey,
        /// Why.
        source: kube::Error,
    },
    /// Listing or watching Kubernetes Events failed (the watch starts again).
    #[error("cannot watch Kubernetes Events: {0}")]
    EventWatch(#[source] kube::Error),
    /// A Kubernetes Event could not be queued for delivery.
    #[error("cannot queue a Kubernetes Event: {0}")]
    EventQueue(String),
}

impl ReconcileError {
    /// The Webhook a failed reconcile was for, if any.
    pub fn webhook(&self) -> Option<&ObjectKey> {
        match self {
            ReconcileError::SecretRead { webhook, .. }
            | ReconcileError::WebhookRead { webhook, .. } => Some(webhook),
            _ => None,
        }
    }

    /// The `error` label of `herald_reconcile_errors_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ReconcileError::SecretRead { .. } => "secret_read",
            ReconcileError::WebhookRead { .. } => "webhook_read",
            ReconcileError::StatusWrite { .. } => "status_write",
            ReconcileError::EventWatch(_) => "event_watch",
            ReconcileError::EventQueue(_) => "event_queue",
        }
    }
}

/// A change seen by one of the watches (with the watch's index in the watched namespaces), or
/// the result of a read done off the event loop.
enum Change {
    Webhook(usize, Box<Event<Webhook>>),
    Condition(usize, Box<Event<NotificationCondition>>),
    Secret(Box<Event<PartialObjectMeta<Secret>>>),
    /// The Secrets a Webhook references, read for its reconcile.
    SecretsRead(Box<SecretsRead>),
    /// A Webhook read again.
    WebhookRead(ObjectKey, Result<Option<Box<Webhook>>, kube::Error>),
    /// A watch failed; it retries by itself.
    WatchError(&'static str, String),
}

/// What the reads for one reconcile found.
struct SecretsRead {
    webhook: Box<Webhook>,
    /// When the reconcile began.
    started: Instant,
    /// Per Secret: its key, its change count when the read began, and what the read found.
    reads: Vec<(ObjectKey, u64, Result<Option<SecretData>, kube::Error>)>,
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
    kind: &'static str,
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
                list_watch(api, kind)
                    .default_backoff()
                    .map(move |e| match e {
                        Ok(e) => wrap(index, e),
                        Err(e) => Change::WatchError(kind, e.to_string()),
                    }),
            )
        })
        .collect()
}

fn watches(client: &Client, namespaces: &[String]) -> Vec<ChangeStream> {
    let mut streams = watch::<Webhook>(client, namespaces, "Webhook", |i, e| {
        Change::Webhook(i, Box::new(e))
    });
    streams.extend(watch::<NotificationCondition>(
        client,
        namespaces,
        "NotificationCondition",
        |i, e| Change::Condition(i, Box::new(e)),
    ));
    streams.extend(watch::<PartialObjectMeta<Secret>>(
        client,
        namespaces,
        "Secret",
        |_, e| Change::Secret(Box::new(e)),
    ));
    streams
}

/// How long to wait before reading a Webhook again after a read failed the first time; the
/// wait doubles with each failure up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Most reads of Secrets and Webhooks under way at once (a first sync of thousands of Webhooks
/// must not send thousands of requests at once).
const READS_AT_ONCE: usize = 16;

/// The API server side: reads done off the event loop, their results sent back into it.
struct Reader {
    client: Client,
    results: mpsc::UnboundedSender<Change>,
    permits: Arc<tokio::sync::Semaphore>,
}

impl Reader {
    /// Reads the Secrets a Webhook needs, in a task of its own.
    fn secrets(&self, webhook: Box<Webhook>, started: Instant, wanted: Vec<(ObjectKey, u64)>) {
        let client = self.client.clone();
        let results = self.results.clone();
        let permits = self.permits.clone();
        tokio::spawn(async move {
            let _permit = permits.acquire_owned().await;
            let mut reads = Vec::with_capacity(wanted.len());
            for (key, epoch) in wanted {
                let api: Api<Secret> = Api::namespaced(client.clone(), &key.namespace);
                let read = api
                    .get_opt(&key.name)
                    .await
                    .map(|s| s.map(|s| SecretData::from_secret(&s)));
                reads.push((key, epoch, read));
            }
            let _ = results.send(Change::SecretsRead(Box::new(SecretsRead {
                webhook,
                started,
                reads,
            })));
        });
    }

    /// Reads a Webhook again, in a task of its own, after `delay`.
    fn webhook(&self, key: ObjectKey, delay: Duration) {
        let client = self.client.clone();
        let results = self.results.clone();
        let permits = self.permits.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _permit = permits.acquire_owned().await;
            let api: Api<Webhook> = Api::namespaced(client, &key.namespace);
            let read = api.get_opt(&key.name).await.map(|w| w.map(Box::new));
            let _ = results.send(Change::WebhookRead(key, read));
        });
    }
}

/// Whether this replica acts on the whole table: it leads, and has seen everything once.
#[derive(Default)]
struct Role {
    synced: bool,
    acting: bool,
    /// Stops the Kubernetes Event watch this replica runs while acting.
    events: Option<CancellationToken>,
}

/// Work under way for Webhooks: reconciles waiting for Secret reads, the Secret reads under way
/// (with the reconciles waiting for each besides the one that asked for it), and failed
/// reconciles waiting to be retried (with the number of failures so far).
#[derive(Default)]
struct Pending {
    reading: HashMap<ObjectKey, usize>,
    secret_reads: HashMap<ObjectKey, Vec<(Box<Webhook>, Instant)>>,
    retries: HashMap<ObjectKey, u32>,
    tests_in_flight: Arc<std::sync::Mutex<std::collections::HashSet<(ObjectKey, String)>>>,
}

/// The controller's event loop state: the index, the core it keeps current, the status
/// writer, the reader for work off the loop, and its role.
struct Controller {
    index: Index,
    dispatcher: Dispatcher,
    status: Arc<StatusWriter>,
    reader: Reader,
    leader: watch::Receiver<bool>,
    role: Role,
    pending: Pending,
    settings: ControllerSettings,
    bookmark: EventsBookmark,
    cancel: CancellationToken,
}

impl Controller {
    /// Handles one change; a failed reconcile is counted, logged and retried in one place.
    fn handle(&mut self, change: Change) {
        let started = match &change {
            Change::SecretsRead(read) => read.started,
            _ => Instant::now(),
        };
        let result = match change {
            Change::Webhook(watch, event) => {
                self.webhook_event(watch, *event, started);
                Ok(())
            }
            Change::Condition(watch, event) => {
                self.condition_event(watch, *event, started);
                Ok(())
            }
            Change::Secret(event) => {
                self.secret_event(*event);
                Ok(())
            }
            Change::SecretsRead(read) => self.secrets_read(*read),
            Change::WebhookRead(key, read) => self.webhook_read(key, read, started),
            Change::WatchError(kind, e) => {
                tracing::warn!("{kind} watch error (retrying): {e}");
                self.dispatcher.metrics().controller.watch_error(kind);
                Ok(())
            }
        };
        if let Err(error) = result {
            self.failed(error, started);
        }
        self.check_synced();
    }

    /// The list and delete events of a watch of `kind`; returns the object an apply carries.
    fn list_event<K: ResourceExt>(
        &mut self,
        kind: Kind,
        watch: usize,
        event: Event<K>,
    ) -> Option<K> {
        let gone = match event {
            Event::InitApply(object) | Event::Apply(object) => return Some(object),
            Event::Init => {
                if self.index.begin(kind, watch) {
                    self.dispatcher
                        .metrics()
                        .controller
                        .watch_restart(kind.name());
                }
                Vec::new()
            }
            Event::Delete(object) => {
                let key = key_of(&object);
                if let Some(key) = &key {
                    self.index.delete(kind, key);
                }
                key.into_iter().collect()
            }
            Event::InitDone => self.index.finish(kind, watch),
        };
        for key in gone {
            match kind {
                Kind::Webhook => self.delete_webhook(&key),
                Kind::Condition => self.delete_condition(&key),
            }
        }
        None
    }

    fn webhook_event(&mut self, watch: usize, event: Event<Webhook>, started: Instant) {
        let Some(webhook) = self.list_event(Kind::Webhook, watch, event) else {
            return;
        };
        if self.index.apply_webhook(watch, &webhook) {
            self.reconcile(Box::new(webhook), started);
        } else if let Some(token) = test_token(&webhook) {
            self.status.observe_test(&webhook, token);
        }
    }

    fn condition_event(
        &mut self,
        watch: usize,
        event: Event<NotificationCondition>,
        started: Instant,
    ) {
        let Some(condition) = self.list_event(Kind::Condition, watch, event) else {
            return;
        };
        let Some(key) = key_of(&condition) else {
            return;
        };
        if !self.index.apply_condition(watch, &condition) {
            return;
        }
        self.status.set_condition(&condition);
        self.dispatcher.apply_condition(ConditionInput {
            key: key.clone(),
            spec: condition.spec,
        });
        self.refresh_condition(&key);
        let seconds = started.elapsed().as_secs_f64();
        self.dispatcher
            .metrics()
            .controller
            .reconciled(Kind::Condition.name(), seconds, None);
    }

    fn secret_event(&mut self, event: Event<PartialObjectMeta<Secret>>) {
        let (meta, deleted) = match event {
            Event::Apply(m) | Event::InitApply(m) => (m, false),
            Event::Delete(m) => (m, true),
            Event::Init | Event::InitDone => return,
        };
        let Some(key) = key_of(&meta) else { return };
        let version = (!deleted).then(|| meta.resource_version().unwrap_or_default());
        for webhook in self.index.secret_seen(&key, version.as_deref()) {
            tracing::info!(webhook = %webhook, secret = %key, "Secret changed");
            self.reader.webhook(webhook, Duration::ZERO);
        }
    }

    /// Brings a Webhook's new version into the core: at once when every Secret it references
    /// is known, or else after reading them off the loop.
    fn reconcile(&mut self, webhook: Box<Webhook>, started: Instant) {
        let Some(key) = key_of(&*webhook) else { return };
        let wanted: Vec<ObjectKey> = referenced_secrets(&webhook.spec)
            .into_iter()
            .map(|name| ObjectKey::new(key.namespace.clone(), name))
            .filter(|secret| self.index.secret(secret).is_none())
            .collect();
        let Some(first) = wanted.first().cloned() else {
            self.apply(&key, &webhook, started);
            return;
        };
        *self.pending.reading.entry(key).or_default() += 1;
        // A Secret already being read (for another Webhook) is read once: this reconcile
        // waits for that read when it needs nothing else.
        let mut to_read: Vec<(ObjectKey, u64)> = Vec::new();
        for secret in wanted {
            if let std::collections::hash_map::Entry::Vacant(entry) =
                self.pending.secret_reads.entry(secret.clone())
            {
                entry.insert(Vec::new());
                let epoch = self.index.secret_epoch(&secret);
                to_read.push((secret, epoch));
            }
        }
        if to_read.is_empty() {
            if let Some(waiting) = self.pending.secret_reads.get_mut(&first) {
                waiting.push((webhook, started));
            }
        } else {
            self.reader.secrets(webhook, started, to_read);
        }
    }

    /// One reconcile fewer under way for a Webhook.
    fn read_done(&mut self, key: &ObjectKey) {
        if let Some(count) = self.pending.reading.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                self.pending.reading.remove(key);
            }
        }
    }

    /// Secrets were read for a reconcile: keeps what was found, then finishes the reconcile if
    /// its version of the Webhook is still the latest. A failed read shows in the Webhook's
    /// status as `SecretUnreadable` (the core keeps the version it has).
    fn secrets_read(&mut self, read: SecretsRead) -> Result<(), ReconcileError> {
        let SecretsRead {
            webhook,
            started,
            reads,
        } = read;
        let Some(key) = key_of(&*webhook) else {
            return Ok(());
        };
        self.read_done(&key);
        let mut failure = None;
        let mut waiting = Vec::new();
        for (secret, epoch, result) in reads {
            waiting.extend(
                self.pending
                    .secret_reads
                    .remove(&secret)
                    .unwrap_or_default(),
            );
            match result {
                Ok(data) => self.index.store_secret(&secret, epoch, data),
                Err(source) => {
                    failure.get_or_insert(ReconcileError::SecretRead {
                        webhook: key.clone(),
                        secret: secret.name.to_string(),
                        source,
                    });
                }
            }
        }
        // The reconciles that waited for these reads go on (or read again what failed).
        for (waiter, waiter_started) in waiting {
            if let Some(waiter_key) = key_of(&*waiter) {
                self.read_done(&waiter_key);
                if self.index.is_current(&waiter) {
                    self.reconcile(waiter, waiter_started);
                }
            }
        }
        if !self.index.is_current(&webhook) {
            // A newer version is under way, or it was deleted.
            return Ok(());
        }
        match failure {
            // Everything read: reconciles at once (or reads again what changed meanwhile).
            None => {
                self.reconcile(webhook, started);
                Ok(())
            }
            Some(error) => {
                if let ReconcileError::SecretRead { secret, source, .. } = &error {
                    let not_ready = NotReady::new(
                        NotReadyReason::SecretUnreadable,
                        format!("cannot read Secret {secret:?} (retrying): {source}"),
                    );
                    self.status.set_ready(&webhook, &Err(not_ready));
                }
                Err(error)
            }
        }
    }

    /// A Webhook was read again: reconciles it (whatever the index says: a Secret changed).
    fn webhook_read(
        &mut self,
        key: ObjectKey,
        read: Result<Option<Box<Webhook>>, kube::Error>,
        started: Instant,
    ) -> Result<(), ReconcileError> {
        match read {
            Ok(Some(webhook)) => {
                // Only Webhooks the watch shows: one it deleted stays deleted.
                if let Some(watch) = self.index.watch_of(&key.namespace)
                    && self.index.knows_webhook(&key)
                {
                    self.index.apply_webhook(watch, &webhook);
                    self.reconcile(webhook, started);
                }
            }
            // Deleted: its watch removes it.
            Ok(None) => {}
            Err(source) => {
                return Err(ReconcileError::WebhookRead {
                    webhook: key,
                    source,
                });
            }
        }
        Ok(())
    }

    /// A reconcile failed: counts it and reads the Webhook again later, waiting longer after
    /// each failure.
    fn failed(&mut self, error: ReconcileError, started: Instant) {
        tracing::warn!("{error} (retrying)");
        self.dispatcher.metrics().controller.reconciled(
            "Webhook",
            started.elapsed().as_secs_f64(),
            Some(error.metric_label()),
        );
        let Some(key) = error.webhook().cloned() else {
            return;
        };
        let failures = self.pending.retries.entry(key.clone()).or_default();
        *failures += 1;
        let delay = RETRY_FIRST
            .saturating_mul(1 << (*failures - 1).min(6))
            .min(RETRY_MAX);
        self.reader.webhook(key, delay);
    }

    /// Applies a Webhook whose Secrets are all known to the core and records its readiness.
    fn apply(&mut self, key: &ObjectKey, webhook: &Webhook, started: Instant) {
        let namespace = key.namespace.clone();
        let secrets: HashMap<String, &SecretData> = referenced_secrets(&webhook.spec)
            .into_iter()
            .filter_map(|name| {
                let data = self
                    .index
                    .secret(&ObjectKey::new(namespace.clone(), name.as_str()))?
                    .as_ref()?;
                Some((name, data))
            })
            .collect();
        let readiness = self.dispatcher.apply_webhook(
            key.clone(),
            webhook.labels().clone(),
            webhook.spec.clone(),
            |name| secrets.get(name).copied(),
        );
        if let Err(not_ready) = &readiness {
            tracing::info!(webhook = %key, reason = %not_ready.reason, "webhook not ready: {}", not_ready.message);
        }
        self.pending.retries.remove(key);
        self.status.set_ready(webhook, &readiness);
        self.status.namespace_changed(&key.namespace);
        self.dispatcher.metrics().controller.reconciled(
            "Webhook",
            started.elapsed().as_secs_f64(),
            None,
        );
        self.maybe_send_test(key, test_token(webhook), webhook.status.as_ref());
    }

    /// A condition came or went: refresh the readiness shown by the webhooks that name it.
    /// Skipped during the initial sync, which ends with one pass over every webhook.
    fn refresh_condition(&self, condition: &ObjectKey) {
        if !self.role.synced {
            return;
        }
        let table = self.dispatcher.table();
        for webhook in table.webhooks() {
            if webhook.key.namespace == condition.namespace
                && webhook
                    .spec
                    .conditions
                    .iter()
                    .any(|c| *c == *condition.name)
                && !self.pending.retries.contains_key(&webhook.key)
                && let Some(readiness) = table.readiness(&webhook.key)
            {
                self.status.refresh_ready(&webhook.key, &readiness);
            }
        }
    }

    /// Writes the readiness of every webhook and condition (once the initial sync is complete).
    fn refresh_all(&self) {
        let table = self.dispatcher.table();
        for webhook in table.webhooks() {
            if !self.pending.retries.contains_key(&webhook.key)
                && let Some(readiness) = table.readiness(&webhook.key)
            {
                self.status.refresh_ready(&webhook.key, &readiness);
            }
        }
        for (key, _) in self.index.conditions() {
            self.status.namespace_changed(&key.namespace);
        }
    }

    /// Sends the test message asked for with `token`, unless this replica does not act on the
    /// table yet, or it was sent already (as recorded in `status`, the object's, or by the
    /// status writer) or is being sent.
    fn maybe_send_test(
        &self,
        key: &ObjectKey,
        token: Option<&str>,
        status: Option<&WebhookStatus>,
    ) {
        if !self.role.acting || self.pending.reading.contains_key(key) {
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
                .pending
                .tests_in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if !in_flight.insert(flight.clone()) {
                return;
            }
        }
        let dispatcher = self.dispatcher.clone();
        let status = self.status.clone();
        let in_flight = self.pending.tests_in_flight.clone();
        let key = key.clone();
        let token = token.to_string();
        tokio::spawn(async move {
            tracing::info!(webhook = %key, token = %token, "sending test message");
            let result = dispatcher.send_test(&key).await;
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
        self.dispatcher.delete_webhook(key);
        self.status.forget(key);
        self.pending.retries.remove(key);
        self.status.namespace_changed(&key.namespace);
    }

    fn delete_condition(&mut self, key: &ObjectKey) {
        self.dispatcher.delete_condition(key);
        self.status.forget_condition(key);
        self.refresh_condition(key);
    }

    /// Ends the initial sync once every watch has listed and every reconcile it started is
    /// done: only then do readiness, status, tests and Kubernetes Events go ahead.
    fn check_synced(&mut self) {
        if self.role.synced || !self.index.is_synced() || !self.pending.reading.is_empty() {
            return;
        }
        let (webhooks, conditions) = {
            let table = self.dispatcher.table();
            (table.len(), table.condition_keys().count())
        };
        tracing::info!(webhooks, conditions, "initial sync done");
        // Deliveries accepted before a restart (with --data-dir) go out again now that
        // every webhook is known.
        if let Err(e) = self.dispatcher.engine().resume() {
            tracing::error!("cannot resume pending deliveries: {e}");
        }
        self.role.synced = true;
        self.dispatcher.set_ready(true);
        self.status.set_synced();
        self.refresh_all();
        self.update_role();
    }

    /// Starts or stops what this replica does only while it leads a synced table: status
    /// writes (the writer checks for itself), pending tests, the Kubernetes Event watch.
    fn update_role(&mut self) {
        let acting = self.role.synced && *self.leader.borrow();
        if acting == self.role.acting {
            return;
        }
        self.role.acting = acting;
        if acting {
            self.status.mark_all_dirty();
            let tokens: Vec<(ObjectKey, String)> = self
                .index
                .test_tokens()
                .map(|(key, token)| (key.clone(), token.to_string()))
                .collect();
            for (key, token) in tokens {
                self.maybe_send_test(&key, Some(&token), None);
            }
            if self.settings.watch_events {
                let stop = self.cancel.child_token();
                tokio::spawn(kube_events::follow(
                    self.reader.client.clone(),
                    self.settings.watch_namespaces.clone(),
                    self.dispatcher.clone(),
                    self.bookmark.clone(),
                    stop.clone(),
                ));
                self.role.events = Some(stop);
            }
        } else if let Some(stop) = self.role.events.take() {
            stop.cancel();
        }
    }
}

/// Runs the controller until `cancel` fires. Readiness turns on after the initial sync; this
/// replica acts on the table (status, tests, Kubernetes Events) while `leader` holds true.
pub async fn run(
    client: Client,
    dispatcher: Dispatcher,
    settings: ControllerSettings,
    leader: watch::Receiver<bool>,
    bookmark: EventsBookmark,
    cancel: CancellationToken,
) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: CONTROLLER_NAME.into(),
            instance: Some(settings.identity.clone()),
        },
    );
    let status = Arc::new(StatusWriter::new(
        client.clone(),
        recorder,
        dispatcher.clone(),
        leader.clone(),
    ));
    dispatcher.engine().observe(status.clone());
    let writer = tokio::spawn(status.clone().run(settings.status_interval, cancel.clone()));

    let mut streams = watches(&client, &settings.watch_namespaces);
    let (results, mut results_rx) = mpsc::unbounded_channel();
    streams.push(Box::pin(futures::stream::poll_fn(move |cx| {
        results_rx.poll_recv(cx)
    })));
    let mut changes = futures::stream::select_all(streams);
    let mut controller = Controller {
        index: Index::new(&settings.watch_namespaces),
        dispatcher,
        status,
        reader: Reader {
            client,
            results,
            permits: Arc::new(tokio::sync::Semaphore::new(READS_AT_ONCE)),
        },
        leader,
        role: Role::default(),
        pending: Pending::default(),
        settings,
        bookmark,
        cancel: cancel.clone(),
    };
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            Ok(()) = controller.leader.changed() => controller.update_role(),
            change = changes.next() => match change {
                Some(change) => controller.handle(change),
                None => break,
            },
        }
    }
    if let Some(stop) = controller.role.events.take() {
        stop.cancel();
    }
    let _ = writer.await;
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
