//! The dispatcher every source and receiver shares: it routes batches through the routing table
//! and hands their deliveries to the delivery engine. Sources (controller, standalone loader)
//! change webhooks and conditions only through it, so the table and the engine never disagree
//! about which webhooks can deliver.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use crate::alert::AlertBatch;
use crate::crd::{WebhookSpec, WebhookType};
use crate::delivery::{
    DeliveryReport, Engine, EngineConfig, SubmitError, SubmitSummary, Target, TargetPolicy,
};
use crate::metrics::{Metrics, WebhookReadiness};
use crate::object::{NotReady, NotReadyReason, ObjectKey};
use crate::outgoing::RoutedBatch;
use crate::routing::{ConditionInput, Subject, Table, WebhookInput};
use crate::secret::SecretData;
use crate::store::{RecordLimits, Store};

/// Routes batches to webhooks and hands their deliveries to the engine; keeps the routing table,
/// the delivery engine and the metrics in agreement.
#[derive(Clone, Debug)]
pub struct Dispatcher {
    table: Arc<RwLock<Table>>,
    engine: Engine,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    policy: TargetPolicy,
}

/// Why a test message could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    /// No such webhook.
    #[error("webhook {0} not found")]
    NotFound(ObjectKey),
    /// The webhook is disabled or not ready.
    #[error("webhook {key} cannot deliver: {reason}")]
    NotReady {
        /// The webhook.
        key: ObjectKey,
        /// Why.
        reason: NotReady,
    },
}

impl Dispatcher {
    /// A core with an empty table and an in-memory delivery store.
    pub fn new(cluster_namespaces: impl IntoIterator<Item = String>, config: EngineConfig) -> Self {
        let store = Arc::new(Store::memory(RecordLimits::default()));
        Self::with_store(cluster_namespaces, config, store)
    }

    /// A core with an empty table, keeping deliveries in `store`.
    pub fn with_store(
        cluster_namespaces: impl IntoIterator<Item = String>,
        config: EngineConfig,
        store: Arc<Store>,
    ) -> Self {
        let table = Arc::new(RwLock::new(Table::new(cluster_namespaces)));
        let metrics = Arc::new(Metrics::new(TableReadiness(table.clone())));
        Dispatcher {
            table,
            engine: Engine::new(config, metrics.clone(), store),
            metrics,
            ready: Arc::new(AtomicBool::new(false)),
            policy: TargetPolicy::default(),
        }
    }

    /// Sets the rules targets are built under (before any webhook is applied).
    pub fn with_policy(mut self, policy: TargetPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The rules targets are built under.
    pub fn policy(&self) -> &TargetPolicy {
        &self.policy
    }

    /// Read access to the routing table.
    pub fn table(&self) -> RwLockReadGuard<'_, Table> {
        // The table is only ever replaced entry by entry; a poisoned lock still holds a usable table.
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn table_mut(&self) -> RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The delivery engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Marks the routing table as synced (`/readyz` turns ready).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether the routing table has synced.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Adds or replaces a webhook, resolving its Secrets through `lookup` (names in the
    /// webhook's namespace). Returns its readiness.
    pub fn apply_webhook<'a>(
        &self,
        key: ObjectKey,
        labels: BTreeMap<String, String>,
        spec: WebhookSpec,
        lookup: impl Fn(&str) -> Option<&'a SecretData>,
    ) -> Result<(), NotReady> {
        let target = if spec.enabled {
            Target::build(key.clone(), &spec, &self.policy, lookup)
        } else {
            Err(NotReady::new(
                NotReadyReason::Disabled,
                "spec.enabled is false",
            ))
        };
        let credentials = match &target {
            Ok(_) => Ok(()),
            Err(e) if e.reason == NotReadyReason::Disabled => Ok(()),
            Err(e) => Err(e.clone()),
        };
        match target {
            Ok(target) => self.engine.upsert(target),
            Err(_) => self.engine.remove(&key),
        }
        let mut table = self.table_mut();
        table.apply_webhook(WebhookInput {
            key: key.clone(),
            labels: labels.into(),
            spec: spec.into(),
            credentials,
        });
        table.readiness(&key).unwrap_or(Ok(()))
    }

    /// Removes a webhook; its queued deliveries are dropped (a disk store keeps them until the
    /// next start, in case it comes back).
    pub fn delete_webhook(&self, key: &ObjectKey) {
        self.table_mut().delete_webhook(key);
        self.engine.remove(key);
        self.metrics.forget_webhook(key);
    }

    /// Adds or replaces a condition.
    pub fn apply_condition(&self, input: ConditionInput) {
        self.table_mut().apply_condition(input);
    }

    /// Removes a condition (webhooks naming it stop delivering).
    pub fn delete_condition(&self, key: &ObjectKey) {
        self.table_mut().delete_condition(key);
    }

    /// Routes a batch of alerts (or events, for `Events`) and queues one delivery per webhook
    /// holding only the alerts that matched it, if there is room for all of them now. With a
    /// disk store the deliveries are written in the background: a caller that answers for them
    /// uses [`Dispatcher::dispatch_within`], which returns once they are durable.
    pub fn dispatch(
        &self,
        batch: AlertBatch,
        kind: WebhookType,
    ) -> Result<SubmitSummary, SubmitError> {
        self.engine.submit_batch(self.route(batch, kind))
    }

    /// Routes and accepts a batch like [`Dispatcher::dispatch`], returning once its deliveries are
    /// kept (durably with a disk store). When Herald holds as many deliveries as it may, waits
    /// up to `wait` for room before refusing: the batch is parsed and routed once rather than
    /// again on every retry of its sender. An error means none of it was accepted.
    pub async fn dispatch_within(
        &self,
        batch: AlertBatch,
        kind: WebhookType,
        wait: Duration,
    ) -> Result<SubmitSummary, SubmitError> {
        self.engine
            .accept_batch(self.route(batch, kind), wait)
            .await
    }

    /// Which alerts of a batch go to which webhook (alert indexes per webhook).
    fn route(&self, batch: AlertBatch, kind: WebhookType) -> RoutedBatch {
        // Gathered under the read lock without cloning keys; the lock is not held while waiting.
        let per_webhook: Vec<(ObjectKey, Vec<usize>)> = {
            let table = self.table();
            // Sized for a few dozen webhooks: growing a small table is most of its cost.
            let mut per_webhook: foldhash::HashMap<&ObjectKey, Vec<usize>> =
                foldhash::HashMap::with_capacity_and_hasher(32, Default::default());
            for (i, alert) in batch.alerts.iter().enumerate() {
                let subject = match kind {
                    WebhookType::Alarms => Subject::alert(alert),
                    WebhookType::Events => Subject::event(alert),
                };
                table.resolve_each(subject, |key| per_webhook.entry(key).or_default().push(i));
            }
            per_webhook
                .into_iter()
                .map(|(key, indexes)| (key.clone(), indexes))
                .collect()
        };
        RoutedBatch::new(batch, per_webhook)
    }

    /// Sends a test message to a ready webhook and returns its report.
    pub async fn send_test(&self, key: &ObjectKey) -> Result<DeliveryReport, TestError> {
        let readiness = self
            .table()
            .readiness(key)
            .ok_or_else(|| TestError::NotFound(key.clone()))?;
        if let Err(reason) = readiness {
            return Err(TestError::NotReady {
                key: key.clone(),
                reason,
            });
        }
        self.engine
            .send_test(key)
            .await
            .ok_or_else(|| TestError::NotReady {
                key: key.clone(),
                reason: NotReady::new(
                    NotReadyReason::Disabled,
                    "the webhook has no delivery worker",
                ),
            })
    }
}

/// The routing table as the source of the `herald_webhooks` gauge.
#[derive(Debug)]
struct TableReadiness(Arc<RwLock<Table>>);

impl WebhookReadiness for TableReadiness {
    fn count(&self) -> (usize, usize) {
        let table = self.0.read().unwrap_or_else(|e| e.into_inner());
        let ready = table
            .webhooks()
            .filter(|w| matches!(table.readiness(&w.key), Some(Ok(()))))
            .count();
        (ready, table.len() - ready)
    }
}
